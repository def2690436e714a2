//! The background worker: one loop that keeps time for pg_baton.
//!
//! Each round is one short transaction. Once per `baton.interval` it calls
//! `baton._tick()`, which reclaims expired leases, fires timers and prunes
//! old runs (see `sql/tick.sql`); between those it wakes only for the next
//! timer (a sleep, a timeout, a deadline, a schedule tick, a delayed step)
//! and calls `baton._fire_timers()`. It sleeps on its latch until the sooner
//! of the two; a backend that adds a sooner timer sets the latch at commit
//! (`latch`), so an idle database costs nothing more than one round an
//! interval. No transaction stays open between rounds. SIGTERM stops it at
//! once and SIGHUP reloads `baton.interval`.
//! Errors inside a round are caught per task by the SQL; anything else ends the
//! process with the error in the log and the postmaster restarts it.
//!
//! It always exits so that the postmaster starts it again (exit code 1): after
//! `DROP DATABASE ... WITH (FORCE)` or `pg_terminate_backend` it comes back by
//! itself (a shutdown restarts nothing). When its database does not exist it
//! waits for it without a connection, and says so once in the log; then, in
//! the database, it waits for `CREATE EXTENSION pg_baton`.

use crate::{latch, rate, settings};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// When the last vacuum-horizon warning was logged (seconds since the epoch):
/// it is logged at most once a minute, not once a round.
static HORIZON_WARNED_AT: AtomicU64 = AtomicU64::new(0);

/// Set while the scheduler connects to its database, in shared memory so that
/// it outlives the process: a connection to a database that does not exist
/// ends the process (FATAL) with it still set, and the next start then waits
/// for the database instead of failing again every restart interval.
static CONNECTING: PgAtomic<AtomicBool> =
    unsafe { PgAtomic::new(c"pg_baton_scheduler_connecting") };

pub fn register() {
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return; // loaded by CREATE EXTENSION only: the SQL works, no scheduler
    }
    pg_shmem_init!(CONNECTING);
    latch::init();
    rate::init();
    BackgroundWorkerBuilder::new("pg_baton scheduler")
        .set_type("pg_baton scheduler")
        .set_function("baton_scheduler_main")
        .set_library("pg_baton")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn baton_scheduler_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = settings::database();
    if CONNECTING.get().load(Ordering::Relaxed) {
        wait_for_database(&database);
    }
    CONNECTING.get().store(true, Ordering::Relaxed);
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    CONNECTING.get().store(false, Ordering::Relaxed);
    log!("pg_baton scheduler started (database \"{database}\")");
    latch::worker_is(unsafe { (*pg_sys::MyProc).pgprocno });

    let mut installed = true;
    let mut sleep = interval();
    let mut last_full = Instant::now();
    let mut skipping = 0u32; // rounds in a row that skipped a due timer
    loop {
        if !BackgroundWorker::wait_latch(Some(sleep)) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        latch::worker_round_begins();
        let full = last_full.elapsed() >= interval();
        if full {
            last_full = Instant::now();
        }
        let round = BackgroundWorker::transaction(|| round(full));
        if round.installed != installed {
            installed = round.installed;
            if !installed {
                log!("pg_baton scheduler: extension not installed in \"{database}\"; waiting for CREATE EXTENSION pg_baton");
            }
        }
        // Until the next full round or the next timer, whichever is first. A
        // timer that is due but was skipped (its run busy with another
        // transition) is tried again after a pause, not in a spin: 10 ms,
        // doubling while rounds keep skipping (a transaction left open on
        // the run), up to the interval.
        skipping = if round.skipped { skipping + 1 } else { 0 };
        sleep = interval().saturating_sub(last_full.elapsed());
        if let Some(due) = round.next_due {
            let floor = match skipping {
                0 => Duration::ZERO,
                n => Duration::from_millis(10u64 << (n - 1).min(10)),
            };
            sleep = sleep.min(due.max(floor));
        }
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        latch::worker_sleeps_until(now.saturating_add(sleep.as_micros() as i64));
    }
    latch::worker_is(-1);
    log!("pg_baton scheduler stopped");
    restart();
}

/// Exit so that the postmaster starts the scheduler again after its restart
/// interval (during a shutdown it starts nothing).
fn restart() -> ! {
    unsafe { pg_sys::proc_exit(1) }
}

/// The last start could not connect: the database does not exist. Wait for
/// it with no database connection (only the shared catalogs), then restart
/// to connect to it.
fn wait_for_database(database: &str) -> ! {
    BackgroundWorker::connect_worker_to_spi(None, None);
    let name = CString::new(database).unwrap_or_default();
    let exists = || {
        BackgroundWorker::transaction(|| unsafe {
            pg_sys::get_database_oid(name.as_ptr(), true) != pg_sys::InvalidOid
        })
    };
    // Created meanwhile (the common case at server start: createdb right
    // after pg_ctl start): restart to connect, with nothing to say.
    if exists() {
        CONNECTING.get().store(false, Ordering::Relaxed);
        restart();
    }
    log!("pg_baton scheduler: waiting for database \"{database}\" to be created");
    loop {
        let wait = Duration::from_millis(settings::INTERVAL_MS.get().max(10) as u64);
        if !BackgroundWorker::wait_latch(Some(wait)) {
            restart();
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if exists() {
            log!("pg_baton scheduler: database \"{database}\" exists now; restarting to connect to it");
            CONNECTING.get().store(false, Ordering::Relaxed);
            restart();
        }
    }
}

fn interval() -> Duration {
    Duration::from_millis(settings::INTERVAL_MS.get().max(10) as u64)
}

/// What a round found.
struct Round {
    installed: bool,
    /// How long until the next timer, if there is one.
    next_due: Option<Duration>,
    /// A due timer was skipped because its run was busy.
    skipped: bool,
}

/// One round: `_tick()` when `full`, else `_fire_timers()` (an extension
/// older than 0.3.0 has only `_tick`).
fn round(full: bool) -> Round {
    let mut result = Round {
        installed: false,
        next_due: None,
        skipped: false,
    };
    let timers = Spi::get_one::<bool>("SELECT to_regproc('baton._fire_timers') IS NOT NULL")
        .ok()
        .flatten();
    let installed = timers.unwrap_or(false)
        || Spi::get_one::<bool>("SELECT to_regproc('baton._tick') IS NOT NULL")
            .ok()
            .flatten()
            .unwrap_or(false);
    if !installed {
        return result;
    }
    result.installed = true;
    let sql = if full || timers != Some(true) {
        "SELECT baton._tick()"
    } else {
        "SELECT baton._fire_timers()"
    };
    let report = Spi::get_one::<pgrx::JsonB>(sql);
    if let Ok(Some(pgrx::JsonB(report))) = &report {
        result.next_due = report
            .get("next_due_ms")
            .and_then(|v| v.as_f64())
            .map(|ms| Duration::from_micros((ms.max(0.0) * 1000.0) as u64));
        result.skipped = report.get("skipped").and_then(|v| v.as_i64()).unwrap_or(0) > 0;
    }
    match report {
        Ok(Some(pgrx::JsonB(report))) => {
            let reclaimed = report
                .get("reclaimed")
                .and_then(|v| v.as_i64())
                .unwrap_or(0);
            let woken = report.get("woken").and_then(|v| v.as_i64()).unwrap_or(0);
            let pruned = report.get("pruned").and_then(|v| v.as_i64()).unwrap_or(0);
            if pruned > 0 {
                debug1!(
                    "pg_baton scheduler: deleted {pruned} finished run(s) past baton.retention"
                );
            }
            if reclaimed > 0 {
                log!("pg_baton scheduler: reclaimed {reclaimed} expired lease(s)");
            }
            if let Some(h) = report.get("horizon") {
                warn_horizon(h);
            }
            if woken > 0 {
                debug1!("pg_baton scheduler: woke {woken} queue(s) with delayed steps now due");
            }
        }
        Ok(None) => {}
        Err(e) => warning!("pg_baton scheduler: round failed: {e}"),
    }
    result
}

/// A transaction has held back vacuum for longer than baton.horizon_warning
/// (see `_tick`): say who, and what to do, once a minute.
fn warn_horizon(h: &serde_json::Value) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if now < HORIZON_WARNED_AT.load(Ordering::Relaxed) + 60 {
        return;
    }
    HORIZON_WARNED_AT.store(now, Ordering::Relaxed);
    let pid = h.get("pid").and_then(|v| v.as_i64()).unwrap_or(0);
    let seconds = h.get("seconds").and_then(|v| v.as_i64()).unwrap_or(0);
    let state = h.get("state").and_then(|v| v.as_str()).unwrap_or("?");
    let app = h
        .get("application_name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    warning!(
        "pg_baton scheduler: a transaction (pid {pid}, state \"{state}\", application \"{app}\") has been open for {seconds} s and holds back vacuum: dead step versions pile up and claims slow down. End it (SELECT pg_terminate_backend({pid})) or set idle_in_transaction_session_timeout; baton.horizon_warning sets when this is logged"
    );
}
