//! Rate limits: the claims of each rate-limited queue over its last period,
//! kept in shared memory (sql/flow.sql takes and gives back claims).
//!
//! No row and no transaction-long lock: a claim takes its share under an
//! LWLock held for the few instructions below, so claimers on every
//! connection never wait on each other's transactions (a counter row would
//! make each claim wait for the previous claim's commit).
//!
//! The window slides. Each queue's claims are counted in buckets of
//! period/64; a claim at time t is counted in the bucket that ends after t
//! and stays counted until that bucket's end plus the period. So every claim
//! of the last period is always counted (the limit is never exceeded in any
//! window of that length), and one is counted at most period/64 longer than
//! it has to: a queue that is always behind gets at least 64/65 of its limit.
//!
//! The window starts empty when PostgreSQL starts (shared memory does not
//! survive a restart); claims that a rolled-back transaction took are not
//! given back (they count, and so the limit holds). Times are PostgreSQL
//! timestamps: microseconds since 2000-01-01 UTC.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};

/// Queues whose windows can be kept at once (per server, over all databases).
const QUEUES: usize = 128;
/// Buckets per period: the resolution of the window.
const BUCKETS: i64 = 64;
/// Ring of buckets per queue: more than the live ones (BUCKETS + 2).
const RING: usize = 72;

#[derive(Clone, Copy)]
struct Window {
    /// The database (0: a free entry) and the queue's name hash.
    database: u32,
    queue: u64,
    period_us: i64,
    /// The newest bucket written: a window whose newest bucket is over is free.
    newest: i64,
    bucket: [i64; RING],
    count: [u32; RING],
}

impl Window {
    const FREE: Window = Window {
        database: 0,
        queue: 0,
        period_us: 0,
        newest: i64::MIN,
        bucket: [i64::MIN; RING],
        count: [0; RING],
    };

    fn width(period_us: i64) -> i64 {
        (period_us + BUCKETS - 1) / BUCKETS
    }

    /// Buckets after this one are live at `at`.
    fn oldest_dead(&self, at: i64) -> i64 {
        (at - self.period_us).div_euclid(Self::width(self.period_us))
    }

    fn is_over(&self, at: i64) -> bool {
        self.database == 0 || self.newest <= self.oldest_dead(at)
    }

    fn used(&self, at: i64) -> i64 {
        let dead = self.oldest_dead(at);
        (0..RING)
            .filter(|&i| self.bucket[i] > dead)
            .map(|i| self.count[i] as i64)
            .sum()
    }
}

struct Windows {
    queues: [Window; QUEUES],
}

unsafe impl PGRXSharedMemory for Windows {}

static WINDOWS: PgLwLock<Windows> = unsafe { PgLwLock::new(c"pg_baton_rate_windows") };
/// Set in the postmaster when the shared memory exists (preloaded library).
static SHARED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(
        WINDOWS = Windows {
            queues: [Window::FREE; QUEUES]
        }
    );
    SHARED.store(true, Ordering::Relaxed);
}

fn queue_hash(queue: &str) -> u64 {
    let mut h = DefaultHasher::new();
    queue.hash(&mut h);
    h.finish()
}

fn require_shared() {
    if !SHARED.load(Ordering::Relaxed) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "rate limits need pg_baton in shared_preload_libraries",
            "Add pg_baton to shared_preload_libraries and restart PostgreSQL, or remove the queue's rate_limit."
        );
    }
}

/// The window of `queue` in this database, made (or started again, when the
/// period changed) if needed. None when every entry is taken by a live window.
fn window<'a>(w: &'a mut Windows, queue: &str, period_us: i64, at: i64) -> Option<&'a mut Window> {
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let key = queue_hash(queue);
    let i = match w
        .queues
        .iter()
        .position(|q| q.database == database && q.queue == key)
    {
        Some(i) => i,
        None => {
            let i = w.queues.iter().position(|q| q.is_over(at))?;
            w.queues[i] = Window {
                database,
                queue: key,
                period_us,
                ..Window::FREE
            };
            i
        }
    };
    let q = &mut w.queues[i];
    if q.period_us != period_us {
        *q = Window {
            database,
            queue: key,
            period_us,
            ..Window::FREE
        };
    }
    Some(q)
}

/// Take up to `want` claims of `queue`'s limit at `at`: how many it may make.
#[pg_extern(volatile, parallel_unsafe, name = "_rate_take")]
fn rate_take(
    queue: &str,
    rate_limit: i32,
    period_us: i64,
    want: i32,
    at: pgrx::datum::TimestampWithTimeZone,
) -> i32 {
    require_shared();
    if want <= 0 || rate_limit <= 0 || period_us <= 0 {
        return 0;
    }
    let at: i64 = at.into_inner();
    let mut w = WINDOWS.exclusive();
    let Some(q) = window(&mut w, queue, period_us, at) else {
        drop(w);
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("more than {QUEUES} rate-limited queues claimed within their periods"),
            "Fewer queues with a rate_limit, or shorter rate periods."
        );
    };
    let granted = (rate_limit as i64 - q.used(at)).clamp(0, want as i64);
    if granted > 0 {
        let b = at.div_euclid(Window::width(period_us)) + 1;
        let i = b.rem_euclid(RING as i64) as usize;
        if q.bucket[i] != b {
            q.bucket[i] = b;
            q.count[i] = 0;
        }
        q.count[i] += granted as u32;
        q.newest = q.newest.max(b);
    }
    granted as i32
}

/// Give back `n` claims taken at `at` and not made (fewer steps were ready).
#[pg_extern(volatile, parallel_unsafe, name = "_rate_give_back")]
fn rate_give_back(queue: &str, period_us: i64, n: i32, at: pgrx::datum::TimestampWithTimeZone) {
    require_shared();
    if n <= 0 || period_us <= 0 {
        return;
    }
    let at: i64 = at.into_inner();
    let mut w = WINDOWS.exclusive();
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let key = queue_hash(queue);
    let Some(q) = w
        .queues
        .iter_mut()
        .find(|q| q.database == database && q.queue == key && q.period_us == period_us)
    else {
        return;
    };
    let b = at.div_euclid(Window::width(period_us)) + 1;
    let i = b.rem_euclid(RING as i64) as usize;
    if q.bucket[i] == b {
        q.count[i] = q.count[i].saturating_sub(n as u32);
    }
}

/// Claims of `queue` counted in its window at `at` (queue_stats).
#[pg_extern(volatile, parallel_unsafe, name = "_rate_used")]
fn rate_used(queue: &str, period_us: i64, at: pgrx::datum::TimestampWithTimeZone) -> i64 {
    if !SHARED.load(Ordering::Relaxed) || period_us <= 0 {
        return 0;
    }
    let at: i64 = at.into_inner();
    let w = WINDOWS.share();
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let key = queue_hash(queue);
    w.queues
        .iter()
        .find(|q| q.database == database && q.queue == key && q.period_us == period_us)
        .map_or(0, |q| q.used(at))
}
