//! Flow control (pg_baton 0.4.0) through the client crate, against the test
//! cluster: queue settings as `configure_queue_with` sets them and
//! `queue_stats` reads them back, with every refusal; per-key concurrency
//! and rate limits under 8 claimer sessions, each on a connection of its
//! own calling `claim_steps` and `complete_step` in a loop. Every test has a
//! queue of its own. Nothing here asserts how fast anything is.

mod common;

use baton::{
    Client, EnqueueOptions, Error, KeyConcurrency, QueueConfig, RateLimit, Step, WorkflowDef,
};
use common::{connect, unique, url};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_postgres::Client as Db;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
const LEASE_SECS: u64 = 30;

async fn client() -> Client {
    Client::connect(&url()).await.expect("connect")
}

/// A workflow of one task step "s" on a queue of its own: (workflow, queue).
async fn one_step(c: &Client, prefix: &str) -> (String, String) {
    let (wf, queue) = (unique(prefix), unique("flow_q"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("s").max_attempts(1)),
    )
    .await
    .unwrap();
    (wf, queue)
}

/// One run of `workflow` per input, in input order (one call).
async fn enqueue_all(db: &Db, workflow: &str, inputs: &[Value]) -> Vec<Uuid> {
    db.query_one(
        "SELECT baton.enqueue_workflows($1, $2::jsonb[])",
        &[&workflow, &inputs],
    )
    .await
    .unwrap()
    .get(0)
}

struct Claim {
    step_id: i64,
    token: Uuid,
    input: Value,
    /// When the database leased it: its lease's end minus the lease.
    at: SystemTime,
}

async fn claim<C: tokio_postgres::GenericClient>(
    db: &C,
    worker: &str,
    queue: &str,
    max: i32,
) -> Result<Vec<Claim>, tokio_postgres::Error> {
    let secs = LEASE_SECS as f64;
    Ok(db
        .query(
            "SELECT step_id, lease_token, input, lease_expires_at \
             FROM baton.claim_steps($1, ARRAY[$2], $3, make_interval(secs => $4))",
            &[&worker, &queue, &max, &secs],
        )
        .await?
        .iter()
        .map(|r| Claim {
            step_id: r.get(0),
            token: r.get(1),
            input: r.get(2),
            at: r.get::<_, SystemTime>(3) - Duration::from_secs(LEASE_SECS),
        })
        .collect())
}

async fn complete(db: &Db, c: &Claim) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "SELECT baton.complete_step($1, $2)",
        &[&c.step_id, &c.token],
    )
    .await
    .map(|_| ())
}

async fn stats_of(c: &Client, queue: &str) -> baton::QueueStats {
    c.queue_stats()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.queue == queue)
        .unwrap_or_else(|| panic!("queue {queue} is not in queue_stats"))
}

/// A small PRNG (xorshift), seeded at random.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Rng(Uuid::new_v4().as_u128() as u64 | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Settings and statistics
// ---------------------------------------------------------------------------

/// Every setting goes in with `configure_queue_with` and comes back in
/// `queue_stats`; the older `configure_queue` still works and clears flow
/// control; bad settings are `InvalidInput` (22023) and change nothing. The
/// backlog and outcome counts of the queue.
#[tokio::test]
async fn queue_settings_and_statistics() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = one_step(&c, "flow_stats").await;
    let config = QueueConfig::new()
        .concurrency(10)
        .rate_limit(50, Duration::from_millis(2500))
        .per_key_concurrency("$.customer", 2);
    c.configure_queue_with(&queue, &config).await.unwrap();
    let stats = stats_of(&c, &queue).await;
    let normalized = QueueConfig {
        per_key: Some(KeyConcurrency {
            key: "$.\"customer\"".to_string(),
            limit: 2,
        }),
        ..config.clone()
    };
    assert_eq!(stats.config, normalized);
    assert_eq!(
        stats.config.rate_limit,
        Some(RateLimit {
            limit: 50,
            period: Duration::from_millis(2500)
        })
    );
    assert_eq!(
        (stats.ready, stats.running, stats.rate_used),
        (0, 0, Some(0))
    );
    assert_eq!(stats.oldest_ready_age, Duration::ZERO, "none ready");

    // the backlog: ready, delayed, running; then the outcomes
    enqueue_all(
        &db,
        &wf,
        &[
            json!({"customer": 1}),
            json!({"customer": 1}),
            json!({"customer": 1}),
        ],
    )
    .await;
    c.enqueue(
        &wf,
        &json!({}),
        EnqueueOptions::default().delay(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let stats = stats_of(&c, &queue).await;
    assert_eq!((stats.ready, stats.delayed, stats.running), (3, 1, 0));
    assert!(stats.oldest_ready_age > Duration::ZERO);
    let claimed = claim(&db, "stats", &queue, 10).await.unwrap();
    assert_eq!(claimed.len(), 2, "two per customer");
    let stats = stats_of(&c, &queue).await;
    assert_eq!(
        (stats.ready, stats.running, stats.rate_used),
        (1, 2, Some(2))
    );
    complete(&db, &claimed[0]).await.unwrap();
    db.execute(
        "SELECT baton.fail_step($1, $2, 'no', false)",
        &[&claimed[1].step_id, &claimed[1].token],
    )
    .await
    .unwrap();
    let stats = stats_of(&c, &queue).await;
    assert_eq!(
        (
            stats.ready,
            stats.running,
            stats.completed_last_minute,
            stats.failed_last_hour
        ),
        (1, 0, 1, 1)
    );

    // the refusals
    let bad = [
        QueueConfig::new().concurrency(-1),
        QueueConfig::new().rate_limit(0, Duration::from_secs(1)),
        QueueConfig::new().rate_limit(-5, Duration::from_secs(1)),
        QueueConfig::new().rate_limit(1, Duration::ZERO),
        QueueConfig::new().rate_limit(1, Duration::from_micros(999)),
        QueueConfig::new().rate_limit(1, Duration::from_secs(11 * 366 * 86400)),
        QueueConfig::new().rate_limit(1, Duration::MAX),
        QueueConfig::new().per_key_concurrency("$.customer", 0),
        QueueConfig::new().per_key_concurrency("not a (path", 1),
        QueueConfig::new().per_key_concurrency("", 1),
    ];
    for config in &bad {
        match c.configure_queue_with(&queue, config).await {
            Err(Error::InvalidInput { code, .. }) if code == "22023" => {}
            other => panic!("{config:?}: expected InvalidInput 22023, got {other:?}"),
        }
    }
    match c.configure_queue_with(" ", &QueueConfig::new()).await {
        Err(Error::InvalidInput { .. }) => {}
        other => panic!("a blank queue name: {other:?}"),
    }
    assert_eq!(stats_of(&c, &queue).await.config, normalized, "unchanged");

    // the older call: concurrency and paused, and no flow control
    c.configure_queue(&queue, Some(3), true).await.unwrap();
    let stats = stats_of(&c, &queue).await;
    assert_eq!(
        stats.config,
        QueueConfig {
            concurrency: Some(3),
            paused: true,
            ..QueueConfig::default()
        }
    );
    assert_eq!(stats.rate_used, None);
    assert!(
        claim(&db, "stats", &queue, 10).await.unwrap().is_empty(),
        "paused"
    );
    c.configure_queue_with(&queue, &QueueConfig::default())
        .await
        .unwrap();
    assert_eq!(stats_of(&c, &queue).await.config, QueueConfig::default());
    let last = claim(&db, "stats", &queue, 10).await.unwrap();
    assert_eq!(last.len(), 1);
    complete(&db, &last[0]).await.unwrap();
}

/// A rate limit's window: a claim takes at most what is left of it, and
/// what a claim did not use (fewer steps were ready) goes back to it.
#[tokio::test]
async fn a_rate_limit_gives_back_what_a_claim_did_not_use() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = one_step(&c, "flow_give_back").await;
    c.configure_queue_with(
        &queue,
        &QueueConfig::new().rate_limit(5, Duration::from_secs(600)),
    )
    .await
    .unwrap();
    enqueue_all(&db, &wf, &[json!({}), json!({})]).await;
    assert_eq!(claim(&db, "gb", &queue, 10).await.unwrap().len(), 2);
    assert_eq!(stats_of(&c, &queue).await.rate_used, Some(2));
    enqueue_all(&db, &wf, &vec![json!({}); 10]).await;
    assert_eq!(
        claim(&db, "gb", &queue, 10).await.unwrap().len(),
        3,
        "5 per period, 2 used"
    );
    assert!(claim(&db, "gb", &queue, 10).await.unwrap().is_empty());
    let stats = stats_of(&c, &queue).await;
    assert_eq!(
        (stats.rate_used, stats.ready, stats.running),
        (Some(5), 7, 5)
    );
    db.execute(
        "SELECT baton.cancel_workflow(id) FROM baton.runs WHERE workflow = $1",
        &[&wf],
    )
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------
// Per-key concurrency
// ---------------------------------------------------------------------------

/// 8 claimer sessions on a queue with at most 2 running steps per customer
/// (4 customers with 30 runs each, and 16 runs without a customer, which
/// are not limited). Each session counts a step of its customer in after
/// its claim returned and out before completing it, so the count is never
/// below what runs in the database: it never goes past 2. A session checking
/// the database's running steps per customer sees the same. A first claim,
/// alone, takes exactly 2 per customer and every run without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_key_concurrency_holds_under_eight_claimers() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = one_step(&c, "flow_keyed").await;
    const PER_KEY: i64 = 2;
    c.configure_queue_with(
        &queue,
        &QueueConfig::new().per_key_concurrency("$.customer", PER_KEY as i32),
    )
    .await
    .unwrap();
    let mut inputs = Vec::new();
    for i in 0..120 {
        // string and number keys
        let customer = if i % 4 == 3 {
            json!(7)
        } else {
            json!(format!("c{}", i % 4))
        };
        inputs.push(json!({ "customer": customer, "i": i }));
        if i % 8 == 0 || i % 8 == 5 {
            inputs.push(json!({ "i": 1000 + i }));
        }
    }
    let total = inputs.len();
    assert_eq!(total, 150);
    enqueue_all(&db, &wf, &inputs).await;

    let key_of = |input: &Value| input.get("customer").map(|k| k.to_string());
    // alone: exactly the limit of every customer, and all without one
    let first = claim(&db, "keyed-first", &queue, 1000).await.unwrap();
    let mut per: HashMap<Option<String>, i64> = HashMap::new();
    for cl in &first {
        *per.entry(key_of(&cl.input)).or_default() += 1;
    }
    assert_eq!(
        per.remove(&None),
        Some(30),
        "runs without a customer are not limited"
    );
    assert_eq!(per.len(), 4);
    assert!(per.values().all(|&n| n == PER_KEY), "{per:?}");
    for cl in &first {
        complete(&db, cl).await.unwrap();
    }

    let running: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let highest = Arc::new(Mutex::new(0i64));
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let completed = Arc::new(AtomicUsize::new(first.len()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut sessions = Vec::new();
    for n in 0..8 {
        let (queue, running, highest, problems, completed) = (
            queue.clone(),
            running.clone(),
            highest.clone(),
            problems.clone(),
            completed.clone(),
        );
        sessions.push(tokio::spawn(async move {
            let db = connect().await;
            let mut rng = Rng::new();
            let name = format!("keyed-{n}");
            let deadline = tokio::time::Instant::now() + WAIT;
            while completed.load(Ordering::SeqCst) < total && tokio::time::Instant::now() < deadline
            {
                let claimed = match claim(&db, &name, &queue, 1 + rng.below(3) as i32).await {
                    Ok(c) => c,
                    Err(e) => {
                        problems
                            .lock()
                            .unwrap()
                            .push(format!("claim: {}", describe(&e)));
                        continue;
                    }
                };
                if claimed.is_empty() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                for cl in &claimed {
                    if let Some(key) = key_of(&cl.input) {
                        let mut r = running.lock().unwrap();
                        let n = r.entry(key.clone()).or_default();
                        *n += 1;
                        let mut h = highest.lock().unwrap();
                        *h = (*h).max(*n);
                        if *n > PER_KEY {
                            problems
                                .lock()
                                .unwrap()
                                .push(format!("{n} steps of customer {key} at once"));
                        }
                    }
                }
                // hold them a little, as a handler would
                tokio::time::sleep(Duration::from_micros(rng.below(4000))).await;
                for cl in &claimed {
                    if let Some(key) = key_of(&cl.input) {
                        *running.lock().unwrap().get_mut(&key).unwrap() -= 1;
                    }
                    match complete(&db, cl).await {
                        Ok(()) => {
                            completed.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => problems
                            .lock()
                            .unwrap()
                            .push(format!("complete: {}", describe(&e))),
                    }
                }
            }
        }));
    }
    let monitor = {
        let (queue, stop, problems) = (queue.clone(), stop.clone(), problems.clone());
        tokio::spawn(async move {
            let db = connect().await;
            let mut highest = 0i64;
            while !stop.load(Ordering::SeqCst) {
                let most: Option<i64> = db
                    .query_one(
                        "SELECT max(n) FROM (SELECT count(*) AS n FROM baton.steps
                          WHERE queue = $1 AND status = 'running' AND flow_key IS NOT NULL GROUP BY flow_key) k",
                        &[&queue],
                    )
                    .await
                    .unwrap()
                    .get(0);
                highest = highest.max(most.unwrap_or(0));
                if most.unwrap_or(0) > PER_KEY {
                    problems
                        .lock()
                        .unwrap()
                        .push(format!("the database runs {most:?} steps of one customer"));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            highest
        })
    };
    for s in sessions {
        s.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let db_highest = monitor.await.unwrap();
    let problems = problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(
        completed.load(Ordering::SeqCst),
        total,
        "every step claimed and completed once"
    );
    let highest = *highest.lock().unwrap();
    eprintln!("most steps of one customer at once: {highest} (claimers), {db_highest} (database)");
    assert!(highest <= PER_KEY && db_highest <= PER_KEY);
    let r = db
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FROM baton.runs WHERE workflow = $1",
            &[&wf],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, i64>(1)),
        (total as i64, total as i64)
    );
    let attempts: i64 = db
        .query_one(
            "SELECT count(*) FROM baton.step_attempts a JOIN baton.runs r ON r.id = a.workflow_id \
             WHERE r.workflow = $1",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, total as i64, "one attempt per step");
}

/// A customer with 500 runs at the head of the queue does not starve one
/// with 5 runs behind them: while the first is at its limit (3 steps held,
/// never completed), 8 claimer sessions take each of the second's 5 steps
/// (completing them as they come), and none more of the first's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_key_does_not_starve_another() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = one_step(&c, "flow_starve").await;
    c.configure_queue_with(
        &queue,
        &QueueConfig::new().per_key_concurrency("$.customer", 3),
    )
    .await
    .unwrap();
    enqueue_all(&db, &wf, &vec![json!({"customer": "A"}); 500]).await;
    enqueue_all(&db, &wf, &vec![json!({"customer": "B"}); 5]).await;
    let held = claim(&db, "starve-first", &queue, 3).await.unwrap();
    assert_eq!(held.len(), 3);
    assert!(
        held.iter().all(|cl| cl.input["customer"] == "A"),
        "A's runs come first"
    );

    let done_b = Arc::new(AtomicUsize::new(0));
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut sessions = Vec::new();
    for n in 0..8 {
        let (queue, done_b, problems) = (queue.clone(), done_b.clone(), problems.clone());
        sessions.push(tokio::spawn(async move {
            let db = connect().await;
            let deadline = tokio::time::Instant::now() + WAIT;
            // until B's 5 are done, and some rounds more (for an A that
            // would wrongly come after them)
            let mut rounds_after = 0;
            while rounds_after < 20 && tokio::time::Instant::now() < deadline {
                match claim(&db, &format!("starve-{n}"), &queue, 1).await {
                    Ok(claimed) => {
                        for cl in claimed {
                            if cl.input["customer"] != "B" {
                                problems
                                    .lock()
                                    .unwrap()
                                    .push(format!("claimed {}", cl.input));
                                continue;
                            }
                            match complete(&db, &cl).await {
                                Ok(()) => {
                                    done_b.fetch_add(1, Ordering::SeqCst);
                                }
                                Err(e) => problems.lock().unwrap().push(describe(&e)),
                            }
                        }
                    }
                    Err(e) => problems.lock().unwrap().push(describe(&e)),
                }
                if done_b.load(Ordering::SeqCst) == 5 {
                    rounds_after += 1;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    for s in sessions {
        s.await.unwrap();
    }
    let problems = problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(done_b.load(Ordering::SeqCst), 5, "all of B's steps");
    let r = db
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'running'), count(*) FILTER (WHERE status = 'ready')
               FROM baton.steps WHERE queue = $1 AND status IN ('running', 'ready')",
            &[&queue],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, i64>(1)),
        (3, 497),
        "A: 3 held, the rest ready"
    );
    db.execute(
        "SELECT baton.cancel_workflow(id) FROM baton.runs WHERE workflow = $1",
        &[&wf],
    )
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------

/// A claim inside a transaction of ours: the clock just before it (the
/// limit's clock reading comes after it), and the claimed steps.
async fn claim_timed(
    db: &mut Db,
    worker: &str,
    queue: &str,
    max: i32,
) -> Result<(SystemTime, Vec<Claim>), tokio_postgres::Error> {
    let tx = db.transaction().await?;
    let before: SystemTime = tx.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    let claimed = claim(&tx, worker, queue, max).await?;
    tx.commit().await?;
    Ok((before, claimed))
}

/// 8 claimer sessions on a queue limited to 4 claims per 300 ms, with 32
/// steps ready from the start (each session claims 1 to 3 at a time and
/// completes them). As the database timed the claims (each lease's end
/// minus the lease): no window of 250 ms (the period less 50 ms for the time
/// between the limit's clock reading and the lease's) holds more than 4
/// claims. And exactly, whatever the stalls: of any 5 claims, the last
/// lease comes at least the period (less its 1/64 resolution) after the
/// first one's claim began. The limit binds: the first period has fewer
/// claims than steps were ready. Every step is claimed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_under_eight_claimers() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = one_step(&c, "flow_rate").await;
    const LIMIT: usize = 4;
    let period = Duration::from_millis(300);
    let tolerance = Duration::from_millis(50);
    let config = QueueConfig::new().rate_limit(LIMIT as i32, period);
    c.configure_queue_with(&queue, &config).await.unwrap();
    const STEPS: usize = 32;
    enqueue_all(&db, &wf, &vec![json!({}); STEPS]).await;

    // Each session first claims from an empty queue with the same settings
    // (so that its first measured claim does not plan the functions), then
    // all start at once.
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let claims: Arc<Mutex<Vec<(SystemTime, SystemTime)>>> = Arc::default();
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut sessions = Vec::new();
    for n in 0..8 {
        let (queue, claims, problems, barrier) = (
            queue.clone(),
            claims.clone(),
            problems.clone(),
            barrier.clone(),
        );
        let (c, config) = (c.clone(), config.clone());
        sessions.push(tokio::spawn(async move {
            let mut db = connect().await;
            let warm = unique("flow_rate_warm");
            c.configure_queue_with(&warm, &config).await.unwrap();
            claim_timed(&mut db, "warm", &warm, 3).await.unwrap();
            barrier.wait().await;
            let mut rng = Rng::new();
            let name = format!("rate-{n}");
            let deadline = tokio::time::Instant::now() + WAIT;
            while claims.lock().unwrap().len() < STEPS && tokio::time::Instant::now() < deadline {
                let (before, claimed) =
                    match claim_timed(&mut db, &name, &queue, 1 + rng.below(3) as i32).await {
                        Ok(c) => c,
                        Err(e) => {
                            problems
                                .lock()
                                .unwrap()
                                .push(format!("claim: {}", describe(&e)));
                            continue;
                        }
                    };
                claims
                    .lock()
                    .unwrap()
                    .extend(claimed.iter().map(|cl| (before, cl.at)));
                for cl in &claimed {
                    if let Err(e) = complete(&db, cl).await {
                        problems
                            .lock()
                            .unwrap()
                            .push(format!("complete: {}", describe(&e)));
                    }
                }
                if claimed.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    for s in sessions {
        s.await.unwrap();
    }
    let problems = problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "{problems:#?}");
    let claims = claims.lock().unwrap().clone();
    assert_eq!(claims.len(), STEPS, "every step claimed once");

    let mut times: Vec<SystemTime> = claims.iter().map(|(_, at)| *at).collect();
    times.sort();
    let since = |u: &SystemTime| u.duration_since(times[0]).unwrap().as_millis();
    let window = period - tolerance;
    for (i, &t) in times.iter().enumerate() {
        let within = times[i..].iter().take_while(|&&u| u < t + window).count();
        assert!(
            within <= LIMIT,
            "{within} claims within {window:?} from claim {i}, at (ms): {:?}",
            times.iter().map(since).collect::<Vec<_>>()
        );
    }
    let first_period = times.iter().take_while(|&&u| u < times[0] + window).count();
    assert!(
        first_period < STEPS,
        "the limit binds: {first_period} of {STEPS} at once"
    );

    // exactly: each claim as the earliest of LIMIT + 1, with the LIMIT others
    // that began no earlier and leased soonest
    let resolution = period / 64 + Duration::from_millis(1);
    for (i, &(began, leased)) in claims.iter().enumerate() {
        let mut others: Vec<SystemTime> = claims
            .iter()
            .enumerate()
            .filter(|&(j, &(b, _))| j != i && b >= began)
            .map(|(_, &(_, at))| at)
            .collect();
        if others.len() < LIMIT {
            continue;
        }
        others.sort();
        let last = others[LIMIT - 1].max(leased);
        let spread = last.duration_since(began).unwrap_or_default();
        assert!(
            spread + resolution >= period,
            "{} claims within {spread:?}",
            LIMIT + 1
        );
    }
    let succeeded: i64 = db
        .query_one(
            "SELECT count(*) FROM baton.runs WHERE workflow = $1 AND status = 'succeeded'",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(succeeded, STEPS as i64);
}
