//! Waking the background worker when a sooner timer is added.
//!
//! The worker sleeps on its latch until its next timer (`sql/timer.sql`). In
//! shared memory it keeps its PGPROC number and the time it plans to wake up.
//! A backend that adds a timer calls `baton._wake_scheduler(at)`; at commit
//! (when the timer is visible to the worker) it sets the worker's latch if
//! `at` comes before the planned wake-up. While the worker runs a round it
//! plans no time (`i64::MAX`), so that a timer committed during the round
//! wakes it again at once instead of being missed by the round's snapshot.
//!
//! Times are PostgreSQL timestamps: microseconds since 2000-01-01 UTC.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic, PgXactCallbackEvent};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};

/// The worker's PGPROC number, -1 while it is not running.
static WORKER_PROCNO: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"pg_baton_worker_procno") };
/// When the worker plans to wake up; i64::MAX while it runs a round.
static PLANNED_WAKE: PgAtomic<AtomicI64> = unsafe { PgAtomic::new(c"pg_baton_planned_wake") };
/// Set in the postmaster when the shared memory above exists (the library
/// was preloaded); backends inherit it.
static SHARED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The soonest timer this transaction added, if any.
    static PENDING: Cell<Option<i64>> = const { Cell::new(None) };
}

pub fn init() {
    pg_shmem_init!(WORKER_PROCNO = AtomicI32::new(-1));
    pg_shmem_init!(PLANNED_WAKE = AtomicI64::new(i64::MAX));
    SHARED.store(true, Ordering::Relaxed);
}

/// The worker: about to run a round (no wake-up planned, see above).
pub fn worker_round_begins() {
    PLANNED_WAKE.get().store(i64::MAX, Ordering::SeqCst);
}

/// The worker: it will sleep until `at` unless woken.
pub fn worker_sleeps_until(at: i64) {
    PLANNED_WAKE.get().store(at, Ordering::SeqCst);
}

/// The worker: it runs (or stops, with -1).
pub fn worker_is(procno: i32) {
    WORKER_PROCNO.get().store(procno, Ordering::SeqCst);
}

/// A timer due at `at` was added in this transaction: wake the worker at
/// commit if it would sleep past it. Without the preloaded library (no
/// worker) it does nothing.
#[pg_extern(volatile, parallel_unsafe, name = "_wake_scheduler")]
fn wake_scheduler(at: Option<pgrx::datum::TimestampWithTimeZone>) {
    let Some(at) = at else { return };
    if !SHARED.load(Ordering::Relaxed) {
        return;
    }
    let at: i64 = at.into_inner();
    let first = PENDING.with(|p| {
        let before = p.get();
        p.set(Some(before.map_or(at, |b| b.min(at))));
        before.is_none()
    });
    if first {
        pgrx::register_xact_callback(PgXactCallbackEvent::Commit, || {
            if let Some(at) = PENDING.with(|p| p.take()) {
                wake_if_sooner(at);
            }
        });
        pgrx::register_xact_callback(PgXactCallbackEvent::Abort, || {
            PENDING.with(|p| p.set(None));
        });
    }
}

fn wake_if_sooner(at: i64) {
    let procno = WORKER_PROCNO.get().load(Ordering::SeqCst);
    if procno >= 0 && at < PLANNED_WAKE.get().load(Ordering::SeqCst) {
        unsafe { pg_sys::ProcSendSignal(procno) };
    }
}
