//! `baton.*` settings (GUCs).
//!
//! `baton.database` decides which database the background worker connects to, so
//! it can only be read at server start; it is defined only while the library is
//! being preloaded (a postmaster-level GUC defined later would make a plain
//! `CREATE EXTENSION` fail). `baton.interval` can change on reload.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use std::ffi::CString;

pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static RECLAIM_BATCH: GucSetting<i32> = GucSetting::<i32>::new(500);
pub static RETENTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"7 days"));
pub static PRUNE_BATCH: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static HORIZON_WARNING_S: GucSetting<i32> = GucSetting::<i32>::new(300);

pub fn register() {
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_string_guc(
            c"baton.database",
            c"Database the pg_baton background worker serves.",
            c"The extension must be created in this database. Read at server start.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"baton.interval",
        c"How often the pg_baton background worker wakes up.",
        c"Each round reclaims expired leases and wakes delayed steps.",
        &INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"baton.reclaim_batch",
        c"Most expired leases the background worker reclaims per round.",
        c"Keeps each round's transaction short; the rest waits for the next round.",
        &RECLAIM_BATCH,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"baton.retention",
        c"How long finished runs are kept before the background worker deletes them.",
        c"An interval such as '7 days'; empty keeps them forever.",
        &RETENTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"baton.prune_batch",
        c"Most finished runs deleted per background worker round.",
        c"Keeps each round's transaction short.",
        &PRUNE_BATCH,
        1,
        100_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"baton.horizon_warning",
        c"Warn when a transaction has held back vacuum for longer than this.",
        c"Such a transaction keeps dead step versions in place, and claims slow down; 0 turns the warning off.",
        &HORIZON_WARNING_S,
        0,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
}

/// The database name for the worker, as a Rust string.
pub fn database() -> String {
    DATABASE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".to_string())
}
