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
//! A claim that the limit held back asks for a wake-up (`_rate_wake_at`): when
//! the oldest counted claims leave the window, the background worker tells
//! the queue's workers (NOTIFY baton_ready, `_rate_due`), so that a worker
//! that came back short does not wait for its next poll.
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
/// Queue names are at most 200 bytes (sql/schema.sql, _check_length).
const NAME: usize = 200;

#[derive(Clone, Copy)]
struct Window {
    /// The database (0: a free entry) and the queue's name hash.
    database: u32,
    queue: u64,
    period_us: i64,
    /// The newest bucket written: a window whose newest bucket is over is free.
    newest: i64,
    /// When its workers are to be told that claims are free again (0: no).
    wake_at: i64,
    name_len: usize,
    name: [u8; NAME],
    bucket: [i64; RING],
    count: [u32; RING],
}

impl Window {
    const FREE: Window = Window {
        database: 0,
        queue: 0,
        period_us: 0,
        newest: i64::MIN,
        wake_at: 0,
        name_len: 0,
        name: [0; NAME],
        bucket: [i64::MIN; RING],
        count: [0; RING],
    };

    fn new(database: u32, queue: u64, name: &str, period_us: i64) -> Window {
        let mut w = Window {
            database,
            queue,
            period_us,
            ..Window::FREE
        };
        let bytes = &name.as_bytes()[..name.len().min(NAME)];
        w.name[..bytes.len()].copy_from_slice(bytes);
        w.name_len = bytes.len();
        w
    }

    fn width(period_us: i64) -> i64 {
        period_us.saturating_add(BUCKETS - 1) / BUCKETS
    }

    /// Buckets after this one are live at `at`.
    fn oldest_dead(&self, at: i64) -> i64 {
        at.saturating_sub(self.period_us)
            .div_euclid(Self::width(self.period_us))
    }

    fn is_over(&self, at: i64) -> bool {
        self.database == 0 || self.newest <= self.oldest_dead(at)
    }

    /// When the oldest counted claims leave the window (`at` if none).
    fn next_free(&self, at: i64) -> i64 {
        let dead = self.oldest_dead(at);
        let width = Self::width(self.period_us);
        (0..RING)
            .filter(|&i| self.bucket[i] > dead && self.count[i] > 0)
            .map(|i| {
                self.bucket[i]
                    .saturating_mul(width)
                    .saturating_add(self.period_us)
            })
            .min()
            .unwrap_or(at)
    }

    fn name(&self) -> String {
        String::from_utf8_lossy(&self.name[..self.name_len]).into_owned()
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

/// The bucket a claim at `at` is counted in: the one that ends after it.
/// (Saturating: `at` may be any timestamp a caller passes, even infinity.)
fn bucket_of(at: i64, period_us: i64) -> i64 {
    at.div_euclid(Window::width(period_us)).saturating_add(1)
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
            let i = w
                .queues
                .iter()
                .position(|q| q.is_over(at) && q.wake_at <= at)?;
            w.queues[i] = Window::new(database, key, queue, period_us);
            i
        }
    };
    let q = &mut w.queues[i];
    if q.period_us != period_us {
        *q = Window::new(database, key, queue, period_us);
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
        let b = bucket_of(at, period_us);
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
    let b = bucket_of(at, period_us);
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

/// The limit held a claim of `queue` back at `at`: tell its workers when
/// claims are free again. Returns that time (for `_wake_scheduler`).
#[pg_extern(volatile, parallel_unsafe, name = "_rate_wake_at")]
fn rate_wake_at(
    queue: &str,
    period_us: i64,
    at: pgrx::datum::TimestampWithTimeZone,
) -> Option<pgrx::datum::TimestampWithTimeZone> {
    require_shared();
    let at: i64 = at.into_inner();
    let mut w = WINDOWS.exclusive();
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let key = queue_hash(queue);
    let q = w
        .queues
        .iter_mut()
        .find(|q| q.database == database && q.queue == key && q.period_us == period_us)?;
    let free = q.next_free(at);
    if q.wake_at == 0 || free < q.wake_at {
        q.wake_at = free;
    }
    pgrx::datum::TimestampWithTimeZone::try_from(free).ok()
}

/// The background worker: the queues of this database whose claims are
/// free again by `at` (their wake-ups are done: cleared).
#[pg_extern(volatile, parallel_unsafe, name = "_rate_due")]
fn rate_due(at: pgrx::datum::TimestampWithTimeZone) -> SetOfIterator<'static, String> {
    if !SHARED.load(Ordering::Relaxed) {
        return SetOfIterator::new(Vec::new());
    }
    let at: i64 = at.into_inner();
    let mut w = WINDOWS.exclusive();
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut due = Vec::new();
    for q in w.queues.iter_mut() {
        if q.database == database && q.wake_at != 0 && q.wake_at <= at {
            q.wake_at = 0;
            due.push(q.name());
        }
    }
    SetOfIterator::new(due)
}

/// The soonest wake-up of this database's rate-limited queues, if any.
#[pg_extern(volatile, parallel_unsafe, name = "_rate_next_wake")]
fn rate_next_wake() -> Option<pgrx::datum::TimestampWithTimeZone> {
    if !SHARED.load(Ordering::Relaxed) {
        return None;
    }
    let w = WINDOWS.share();
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    w.queues
        .iter()
        .filter(|q| q.database == database && q.wake_at != 0)
        .map(|q| q.wake_at)
        .min()
        .and_then(|at| pgrx::datum::TimestampWithTimeZone::try_from(at).ok())
}
