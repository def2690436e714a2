//! The pg_baton benchmark harness. Starts from an empty schema (it drops and
//! re-creates the extension in the target database!) and prints one line per
//! figure:
//!
//!   RESULT system=pg_baton workload=<W> workflows=<n> steps=<n> wall_s=<x> steps_per_s=<x> ms_per_step=<x> enqueue_per_s=<x>
//!
//! (INFO lines for figures that are no workload's: comparisons, and QS), then
//! one TARGET line per target, as a ratio against its reference measured in
//! the same run (W0 for W1 and W2, W1 for W4 and W8, W9_base for W9_rate and
//! W9_key, the rate limit for W9_bind). Workloads: W0 floor (one durable
//! commit), W1 throughput, W2 latency, W3 enqueue, W4 W1 with a big history,
//! W5 wake-up, W6 W2 beside 100,000 healthy leases in another queue, W7 timer
//! lateness (sleep steps fired by the background worker), W8 a map over
//! 100,000 elements (and W8_base, W1's shape with as many steps), soak;
//! W1_py and W2_py are W1 and W2 run by the Python example worker.
//! Flow control (sql/flow.sql), with 8 concurrent claimers (8 workers: W1's
//! one worker makes one claim at a time): W9_base W1's workload on an
//! unlimited queue, W9_rate with a rate limit too high to bind, W9_key with a
//! per-key limit over 100 keys that cannot bind (20 per key), W9_bind the claim
//! rate under a binding rate limit (400 per second); selecting W9_rate or
//! W9_key runs W9_base too. QS: the time of `SELECT * FROM baton.queue_stats`
//! on the fresh schema (QS_empty, first) and beside W4's history (written
//! for QS if W4 is not run), whose steps are out of its windows; it also
//! counts the last minute's completions, so the INFO lines say how many. TK:
//! the time from a registered worker's death (its connections cut) to its
//! leases handed back by the background worker.
//!
//!   BATON_URL=postgres://... cargo run --release -p baton --example bench -- [--quick] [--only W0,W2] [--soak-secs N] [--repeat N] [--py-threads N] [--w9-slots N] [--w9-poll-ms N]
//!
//! `--repeat N` runs the selection N times on a fresh schema each time, then
//! prints a MEDIAN line per workload and per target (the median of the
//! per-run ratios). `--w9-slots` (default 8) and `--w9-poll-ms` (default 200)
//! shape W9's 8 workers: by default each is W1's worker.
//!
//! `scripts/bench` runs it on a fresh release build and cluster; `scripts/test`
//! runs `--quick` so it cannot rot.

use baton::{Client, EnqueueOptions, Step, Worker, WorkflowDef};
use serde_json::json;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

struct Opts {
    url: String,
    quick: bool,
    only: Option<Vec<String>>,
    soak_secs: u64,
    repeat: usize,
    py_threads: usize,
    w9_slots: usize,
    w9_poll: Duration,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            url: std::env::var("BATON_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55442/baton_bench".into()),
            quick: false,
            only: None,
            soak_secs: 600,
            repeat: 1,
            py_threads: 8,
            w9_slots: 8,
            w9_poll: Duration::from_millis(200),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => {
                    o.quick = true;
                    o.soak_secs = o.soak_secs.min(30);
                }
                "--only" => {
                    o.only = args
                        .next()
                        .map(|s| s.split(',').map(|w| w.trim().to_uppercase()).collect())
                }
                "--soak-secs" => {
                    o.soak_secs = args
                        .next()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(o.soak_secs)
                }
                "--repeat" => {
                    o.repeat = args
                        .next()
                        .and_then(|s| s.parse().ok())
                        .filter(|&n| n >= 1)
                        .expect("--repeat takes a count of 1 or more")
                }
                "--py-threads" => {
                    o.py_threads = args
                        .next()
                        .and_then(|s| s.parse().ok())
                        .filter(|&n| n >= 1)
                        .expect("--py-threads takes a count of 1 or more")
                }
                "--w9-slots" => {
                    o.w9_slots = args
                        .next()
                        .and_then(|s| s.parse().ok())
                        .filter(|&n| n >= 1)
                        .expect("--w9-slots takes a count of 1 or more")
                }
                "--w9-poll-ms" => {
                    o.w9_poll = args
                        .next()
                        .and_then(|s| s.parse().ok())
                        .filter(|&n| n >= 1)
                        .map(Duration::from_millis)
                        .expect("--w9-poll-ms takes a count of 1 or more")
                }
                other => panic!("unknown argument {other}; see the header of examples/bench.rs"),
            }
        }
        o
    }
    fn runs(&self, w: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == w))
    }
    fn n(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Figure {
    workflows: usize,
    steps: usize,
    wall_s: f64,
    enqueue_per_s: f64,
}

impl Figure {
    fn steps_per_s(&self) -> f64 {
        self.steps as f64 / self.wall_s
    }
    fn ms_per_step(&self) -> f64 {
        self.wall_s * 1000.0 / self.steps as f64
    }
    fn print(&self, workload: &str, extra: &str) {
        record(workload, self.steps_per_s(), self.ms_per_step());
        println!(
            "RESULT system=pg_baton workload={workload} workflows={} steps={} wall_s={:.3} steps_per_s={:.1} ms_per_step={:.3} enqueue_per_s={:.1}{extra}",
            self.workflows,
            self.steps,
            self.wall_s,
            self.steps_per_s(),
            self.ms_per_step(),
            self.enqueue_per_s
        );
    }
}

async fn raw(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = Opts::parse();
    let admin = raw(&o.url).await;
    admin
        .batch_execute("SET client_min_messages = warning; DROP EXTENSION IF EXISTS pg_baton CASCADE; CREATE EXTENSION pg_baton;")
        .await
        .expect("reset the schema");
    let info = admin
        .query_one(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'), current_setting('fsync'), \
                    current_setting('shared_buffers')",
            &[],
        )
        .await
        .unwrap();
    println!(
        "# machine: {} cores; PostgreSQL {}; synchronous_commit={} fsync={} shared_buffers={}; mode={}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        info.get::<_, String>(0),
        info.get::<_, String>(1),
        info.get::<_, String>(2),
        info.get::<_, String>(3),
        if o.quick { "quick" } else { "full" }
    );
    for run in 1..=o.repeat {
        if o.repeat > 1 {
            println!("# run {run} of {}", o.repeat);
        }
        if run > 1 {
            admin
                .batch_execute("SET client_min_messages = warning; DROP EXTENSION pg_baton CASCADE; CREATE EXTENSION pg_baton;")
                .await
                .expect("reset the schema");
        }
        // a new client each run: the old one's prepared statements name the
        // dropped functions
        let client = Client::connect(&o.url).await.expect("client");
        one_run(&o, &client, &admin).await;
    }
    if o.repeat > 1 {
        print_medians(o.repeat);
    }
}

/// The selected workloads once, each figure printed as it is taken, then the
/// targets as ratios within this run.
async fn one_run(o: &Opts, client: &Client, admin: &tokio_postgres::Client) {
    let mut qs_empty = None;
    if o.runs("QS") {
        qs_empty = Some(queue_stats_time(o, admin, "QS_empty", "a fresh schema").await);
    }
    let mut w0 = (None, None);
    if o.runs("W0") {
        w0.0 = Some(floor(o, 1).await);
        w0.1 = Some(floor(o, 8).await);
    }
    let mut w1 = None;
    if o.runs("W1") || o.runs("W4") {
        w1 = Some(throughput(o, client, "W1").await);
    }
    let (mut w9_base, mut w9_rate, mut w9_key, mut w9_bind) = (None, None, None, None);
    if o.runs("W9_BASE") || o.runs("W9_RATE") || o.runs("W9_KEY") {
        let plain = |i: usize| json!({ "i": i % 500 });
        let base = flow_throughput(o, client, "W9_base", "bench_w9_base", Flow::NONE, plain).await;
        if let Some(w1) = w1 {
            println!(
                "INFO W9_base ({W9_CLAIMERS} workers of {} slots, each its own claimer) steps per s {:.1} is {:.0}% of W1 (one worker of 8 slots: one claimer) {:.1}",
                o.w9_slots,
                base.steps_per_s(),
                100.0 * base.steps_per_s() / w1.steps_per_s(),
                w1.steps_per_s()
            );
        }
        w9_base = Some(base);
    }
    if o.runs("W9_RATE") {
        // a million claims per second: never reached
        let flow = Flow {
            rate: Some((1_000_000, 1.0)),
            key: None,
        };
        let plain = |i: usize| json!({ "i": i % 500 });
        w9_rate = Some(flow_throughput(o, client, "W9_rate", "bench_w9_rate", flow, plain).await);
    }
    if o.runs("W9_KEY") {
        let flow = Flow {
            rate: None,
            key: Some(("$.tenant", W9_PER_KEY)),
        };
        let tenant = |i: usize| json!({ "tenant": i % W9_KEYS });
        w9_key = Some(flow_throughput(o, client, "W9_key", "bench_w9_key", flow, tenant).await);
    }
    if o.runs("W9_BIND") {
        w9_bind = Some(bound_rate(o, client, admin).await);
    }
    let mut w2 = None;
    if o.runs("W2") {
        w2 = Some(latency(o, client).await);
        latency_sql(o, client).await;
    }
    if o.runs("W1_PY") {
        python_throughput(o, client).await;
    }
    if o.runs("W2_PY") {
        python_latency(o, client).await;
    }
    if o.runs("W3") {
        enqueue(o, client).await;
    }
    let mut w4 = None;
    if o.runs("W4") || o.runs("QS") {
        if w1.is_none() {
            // the history's workflow, which W1 defines
            drop(three_steps(client, "bench_w1", String::new(), Arc::default()).await);
        }
        fill_history(o, admin).await;
    }
    if let Some(empty) = qs_empty {
        // before W4's drain, whose steps would be the last minute's too
        let with_history = queue_stats_time(
            o,
            admin,
            "QS",
            "beside W4's history, which finished two hours ago: outside queue_stats' windows",
        )
        .await;
        println!(
            "INFO QS queue_stats beside W4's history {with_history:.3} ms against {empty:.3} ms on an empty history ({:.1} x)",
            with_history / empty
        );
    }
    if o.runs("W4") {
        w4 = Some(throughput(o, client, "W4").await);
    }
    let mut w5 = None;
    if o.runs("W5") {
        w5 = Some(wakeup(o, client).await);
    }
    let mut w6 = None;
    if o.runs("W6") {
        w6 = Some(latency_beside_leases(o, client, admin).await);
    }
    let mut w7 = None;
    if o.runs("W7") {
        w7 = Some(lateness(o, client).await);
    }
    let mut w8 = None;
    if o.runs("W8") {
        w8 = Some(map_fan_out(o, client).await);
        // W1's shape with as many steps as W8 has items: a backlog as deep
        let base = throughput_of(client, "W8_base", o.n(100_000, 2000).div_ceil(3)).await;
        let w8 = w8.expect("just measured");
        println!(
            "INFO W8 map items per s {:.1} is {:.0}% of W8_base (W1's shape, {} steps) {:.1} steps per s",
            w8.steps_per_s(),
            100.0 * w8.steps_per_s() / base.steps_per_s(),
            base.steps,
            base.steps_per_s()
        );
    }
    let mut tk = None;
    if o.runs("TK") {
        tk = Some(takeover(o, admin).await);
    }
    if o.runs("SOAK") {
        soak(o, client, admin).await;
    }

    // Targets, as ratios within this run.
    if let Some(tk) = tk {
        record_target("TK", tk);
        target(
            "TK",
            target_met("TK", tk),
            &format!("median takeover {tk:.3} s <= 1.5 s after a worker died holding 30 s leases"),
        );
    }
    if let Some((median, p99)) = w7 {
        record_target("W7", median);
        record_target("W7_P99", p99);
        target(
            "W7",
            target_met("W7", median),
            &format!("median lateness {median:.2} ms <= 20"),
        );
        target(
            "W7_P99",
            target_met("W7_P99", p99),
            &format!("p99 lateness {p99:.2} ms <= 100"),
        );
    }
    if let (Some(w8), Some(w1)) = (w8, w1) {
        let ratio = w8.steps_per_s() / w1.steps_per_s();
        record_target("W8", ratio);
        target(
            "W8",
            target_met("W8", ratio),
            &format!(
                "map items per s {:.1} is {:.0}% of W1 steps per s {:.1} (>= 90%)",
                w8.steps_per_s(),
                ratio * 100.0,
                w1.steps_per_s()
            ),
        );
    }
    if let (Some(f1), Some(w2)) = (w0.0, w2) {
        let limit = 1.5 * f1.ms_per_step();
        let ratio = w2.ms_per_step() / f1.ms_per_step();
        record_target("W2", ratio);
        target(
            "W2",
            target_met("W2", ratio),
            &format!(
                "ms_per_step={:.3} <= 1.5 x W0(1 client) {:.3} = {limit:.3}",
                w2.ms_per_step(),
                f1.ms_per_step()
            ),
        );
    }
    if let Some((base, w6)) = w6 {
        let ratio = w6.ms_per_step() / base.ms_per_step();
        record_target("W6", ratio);
        target(
            "W6",
            target_met("W6", ratio),
            &format!(
                "ms_per_step={:.3} <= 1.2 x W6_base {:.3} (healthy leases elsewhere cost a chain nothing)",
                w6.ms_per_step(),
                base.ms_per_step()
            ),
        );
    }
    if let (Some(f8), Some(w1)) = (w0.1, w1) {
        let ratio = w1.steps_per_s() / f8.steps_per_s();
        record_target("W1", ratio);
        target(
            "W1",
            target_met("W1", ratio),
            &format!(
                "steps_per_s={:.1} >= W0(8 clients) commits_per_s={:.1}",
                w1.steps_per_s(),
                f8.steps_per_s()
            ),
        );
    }
    if let (Some(w1), Some(w4)) = (w1, w4) {
        let ratio = w4.steps_per_s() / w1.steps_per_s();
        record_target("W4", ratio);
        target(
            "W4",
            target_met("W4", ratio),
            &format!(
                "steps_per_s={:.1} is {:.0}% of W1 {:.1} (>= 90%)",
                w4.steps_per_s(),
                ratio * 100.0,
                w1.steps_per_s()
            ),
        );
    }
    for (w, figure) in [("W9_RATE", w9_rate), ("W9_KEY", w9_key)] {
        if let (Some(f), Some(base)) = (figure, w9_base) {
            let ratio = f.steps_per_s() / base.steps_per_s();
            record_target(w, ratio);
            target(
                w,
                target_met(w, ratio),
                &format!(
                    "steps_per_s={:.1} is {:.0}% of W9_base {:.1} (W1 on an unlimited queue with the same {W9_CLAIMERS} claimers; >= 80%)",
                    f.steps_per_s(),
                    ratio * 100.0,
                    base.steps_per_s()
                ),
            );
        }
    }
    if let Some(ratio) = w9_bind {
        let (limit, period) = W9_BIND_LIMIT;
        record_target("W9_BIND", ratio);
        target(
            "W9_BIND",
            target_met("W9_BIND", ratio),
            &format!(
                "claims per s {:.1} is {:.1}% of the limit {:.1} (within 5%)",
                ratio * limit as f64 / period,
                ratio * 100.0,
                limit as f64 / period
            ),
        );
    }
    if let Some(median) = w5 {
        record_target("W5", median);
        target(
            "W5",
            target_met("W5", median),
            &format!("median wake-up {median:.2} ms < 5 ms"),
        );
    }
}

thread_local! {
    /// Every figure and target ratio of the process, for the medians of --repeat.
    static FIGURES: RefCell<BTreeMap<String, Vec<(f64, f64)>>> = const { RefCell::new(BTreeMap::new()) };
    static RATIOS: RefCell<BTreeMap<&'static str, Vec<f64>>> = const { RefCell::new(BTreeMap::new()) };
}

fn record(workload: &str, steps_per_s: f64, ms_per_step: f64) {
    FIGURES.with(|f| {
        f.borrow_mut()
            .entry(workload.to_string())
            .or_default()
            .push((steps_per_s, ms_per_step))
    });
}

/// A target's value in one run: W1 and W4 as a ratio to their reference (at
/// least 1.0 and 0.9), W2 as a multiple of W0 (at most 1.5), W5 in ms (under
/// 5), W9_rate and W9_key as a ratio to W9_base (at least 0.8), W9_bind as a
/// ratio to its rate limit (0.95 to 1.05).
fn record_target(w: &'static str, value: f64) {
    RATIOS.with(|r| r.borrow_mut().entry(w).or_default().push(value));
}

/// The issue's targets, one place for the per-run lines and the medians.
fn target_met(w: &str, value: f64) -> bool {
    match w {
        "W1" => value >= 1.0,
        "W2" => value <= 1.5,
        "W4" => value >= 0.9,
        "W6" => value <= 1.2,
        "W7" => value <= 20.0,
        "W7_P99" => value <= 100.0,
        "W8" => value >= 0.9,
        "W9_RATE" | "W9_KEY" => value >= 0.8,
        "W9_BIND" => (value - 1.0).abs() <= 0.05,
        "TK" => value <= 1.5,
        _ => value < 5.0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// After --repeat N: each workload's median figure and each target's median
/// ratio, with every run's value, so a set of runs reports itself.
fn print_medians(runs: usize) {
    FIGURES.with(|f| {
        for (w, v) in f.borrow().iter() {
            let per_s: Vec<f64> = v.iter().map(|x| x.0).collect();
            let ms: Vec<f64> = v.iter().map(|x| x.1).collect();
            println!(
                "MEDIAN workload={w} runs={runs} steps_per_s={:.1} ms_per_step={:.3} (ms_per_step: {})",
                median(per_s),
                median(ms.clone()),
                ms.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ")
            );
        }
    });
    RATIOS.with(|r| {
        for (w, v) in r.borrow().iter() {
            let m = median(v.clone());
            let met = target_met(w, m);
            let rule = match *w {
                "W1" => "W1/W0(8 clients) >= 1.0",
                "W2" => "W2/W0(1 client) <= 1.5",
                "W4" => "W4/W1 >= 0.9",
                "W6" => "W6/W6_base <= 1.2",
                "W7" => "W7 median lateness ms <= 20",
                "W7_P99" => "W7 p99 lateness ms <= 100",
                "W8" => "W8 map items/s / W1 steps/s >= 0.9",
                "W9_RATE" => "W9_rate/W9_base >= 0.8",
                "W9_KEY" => "W9_key/W9_base >= 0.8",
                "W9_BIND" => "W9_bind claims/s / rate limit within 0.95 to 1.05",
                "TK" => "TK median takeover s <= 1.5",
                _ => "W5 median wake-up ms < 5",
            };
            println!(
                "MEDIAN TARGET {w} {} {rule}: median {m:.2} (runs: {})",
                if met { "met" } else { "MISSED" },
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    });
}

fn target(w: &str, met: bool, detail: &str) {
    println!("TARGET {w} {} {detail}", if met { "met" } else { "MISSED" });
}

/// W0: what one durable commit costs: update one row and insert one row.
async fn floor(o: &Opts, clients: usize) -> Figure {
    let setup = raw(&o.url).await;
    setup
        .batch_execute(
            "DROP TABLE IF EXISTS bench_floor, bench_log; \
             CREATE TABLE bench_floor (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0); \
             CREATE TABLE bench_log (id bigserial PRIMARY KEY, client int, at timestamptz); \
             INSERT INTO bench_floor (id) SELECT g FROM generate_series(0, 15) g;",
        )
        .await
        .unwrap();
    let per_client = o.n(2000, 200) / clients.min(4);
    // Connected and prepared before the clock starts, as the workers are
    // warmed up before theirs: W0 measures commits, not connection set-up.
    let mut sessions = Vec::new();
    for c in 0..clients {
        let db = raw(&o.url).await;
        let update = db
            .prepare("UPDATE bench_floor SET n = n + 1 WHERE id = $1")
            .await
            .unwrap();
        let insert = db
            .prepare("INSERT INTO bench_log (client, at) VALUES ($1, now())")
            .await
            .unwrap();
        sessions.push((db, update, insert, c as i32));
    }
    checkpoint(&setup).await;
    let flushes_before = wal_flushes(&setup).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (mut db, update, insert, id) in sessions {
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_client {
                let tx = db.transaction().await.unwrap();
                tx.execute(&update, &[&id]).await.unwrap();
                tx.execute(&insert, &[&id]).await.unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let f = Figure {
        workflows: 0,
        steps: per_client * clients,
        wall_s: start.elapsed().as_secs_f64(),
        enqueue_per_s: 0.0,
    };
    let flushes = wal_flushes(&setup).await - flushes_before;
    f.print(
        &format!("W0_{clients}client"),
        &format!(
            " commits_per_s={:.1} clients={clients}{}",
            f.steps_per_s(),
            per_flush(f.steps, flushes)
        ),
    );
    setup
        .batch_execute("DROP TABLE bench_floor, bench_log")
        .await
        .unwrap();
    f
}

/// Enqueue `n` runs of `workflow` in batches through enqueue_workflows.
async fn enqueue_many(client: &Client, workflow: &str, n: usize) -> f64 {
    enqueue_inputs(client, workflow, n, |i| json!({ "i": i % 500 })).await
}

/// `enqueue_many` with the input of the i-th run (from 0) given by `input`.
async fn enqueue_inputs(
    client: &Client,
    workflow: &str,
    n: usize,
    input: impl Fn(usize) -> serde_json::Value,
) -> f64 {
    let conn = client.pool().get().await.unwrap();
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let batch = left.min(500);
        let inputs: Vec<serde_json::Value> = (n - left..n - left + batch).map(&input).collect();
        conn.query_one(
            "SELECT baton.enqueue_workflows($1, $2)",
            &[&workflow, &inputs],
        )
        .await
        .unwrap();
        left -= batch;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Vacuum and analyze before a drain is timed, so that autovacuum cleaning up
/// after the previous workload, or auto-analyze noticing the new backlog, does
/// not run inside the measurement (on 2 cores it takes one of them).
async fn settle(client: &Client) {
    let conn = client.pool().get().await.unwrap();
    conn.batch_execute("VACUUM ANALYZE baton.runs, baton.steps, baton.attempts")
        .await
        .unwrap();
}

/// Write every dirty buffer out before a workload is timed (W0 before its
/// clock, W1, W2 and W4 before their runs are enqueued): otherwise the kernel
/// writes back what the previous workload left while this one waits on its
/// WAL flushes, and a workload's figure depends on what ran before it. W4
/// already needed it after writing its history.
async fn checkpoint(db: &tokio_postgres::Client) {
    db.batch_execute("CHECKPOINT").await.unwrap();
}

/// WAL flushes so far (`pg_stat_wal.wal_sync`): one flush makes every commit
/// waiting on it durable, so commits per flush says how well they are grouped.
/// A backend reports these counters at the latest when it exits; W0's
/// sessions are closed when they finish, and this waits for them to exit.
/// (A pooled connection that stays open may report up to 10 s late, so the
/// drains are not counted this way.)
async fn wal_flushes(db: &tokio_postgres::Client) -> i64 {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    db.query_one("SELECT wal_sync FROM pg_stat_wal", &[])
        .await
        .unwrap()
        .get(0)
}

fn per_flush(n: usize, flushes: i64) -> String {
    format!(
        " wal_flushes={flushes} per_flush={:.1}",
        n as f64 / flushes.max(1) as f64
    )
}

/// A no-op worker running in the background until `stop`.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<baton::Result<()>>,
}

impl Running {
    fn start(worker: baton::WorkerBuilder) -> Running {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(worker.build().run_until(async {
            let _ = stopped.await;
        }));
        Running { stop, handle }
    }
    async fn stop(self) {
        self.stop.send(()).ok();
        self.handle.await.unwrap().unwrap();
    }
}

/// Signalled by the handlers that count finished runs, so that a drain's
/// clock stops when its last run finishes, not at the next tick of a polling
/// timer (tokio's timers tick in milliseconds: W2 takes about 120 ms).
static FINISHED: tokio::sync::Notify = tokio::sync::Notify::const_new();

fn finished_one(done: &AtomicUsize) {
    done.fetch_add(1, Ordering::SeqCst);
    FINISHED.notify_one();
}

async fn wait_for(done: &AtomicUsize, n: usize) {
    // notify_one keeps a permit when nobody waits: a run that finishes
    // between the check and the wait is not missed
    while done.load(Ordering::SeqCst) < n {
        FINISHED.notified().await;
    }
}

async fn pause(client: &Client, queue: &str, paused: bool) {
    configure(client, queue, paused, Flow::NONE).await;
}

/// The flow control of a W9 queue (sql/flow.sql): a rate limit (claims per
/// period, in seconds) and a per-key limit (the key's JSON path, running
/// steps per key). configure_queue sets every setting at each call, so
/// pausing a W9 queue gives them again.
#[derive(Clone, Copy)]
struct Flow {
    rate: Option<(i32, f64)>,
    key: Option<(&'static str, i32)>,
}

impl Flow {
    const NONE: Flow = Flow {
        rate: None,
        key: None,
    };
}

async fn configure(client: &Client, queue: &str, paused: bool, flow: Flow) {
    let conn = client.pool().get().await.unwrap();
    let (rate_limit, rate_secs) = flow.rate.unzip();
    let (key, per_key) = flow.key.unzip();
    conn.execute(
        "SELECT baton.configure_queue($1, paused => $2, rate_limit => $3, \
                rate_period => make_interval(secs => $4::float8), concurrency_key => $5, per_key_concurrency => $6)",
        &[&queue, &paused, &rate_limit, &rate_secs, &key, &per_key],
    )
    .await
    .unwrap();
}

/// The timed part of W1, W2 and W4, in the steady state that W0 measures too
/// (its statements are prepared before its clock starts): the worker first
/// runs `warm_up` (it plans its statements and fills its caches on each
/// connection, some tens of milliseconds), then its queue is paused while
/// `work` is enqueued and the tables are vacuumed. The clock runs from
/// unpausing (the worker hears of it by NOTIFY) until `expect` more runs
/// have finished. Returns the drain's wall time and what `work` returned.
async fn drain<W, E>(
    client: &Client,
    worker: baton::WorkerBuilder,
    queue: &str,
    done: &AtomicUsize,
    warm_up: W,
    work: E,
    expect: usize,
) -> (f64, f64)
where
    W: std::future::Future<Output = usize>,
    E: std::future::Future<Output = f64>,
{
    drain_with(
        client,
        vec![worker],
        queue,
        Flow::NONE,
        done,
        warm_up,
        work,
        expect,
    )
    .await
}

/// `drain` with several workers on one queue, and the queue's flow control
/// kept through the pause (W9).
#[allow(clippy::too_many_arguments)]
async fn drain_with<W, E>(
    client: &Client,
    workers: Vec<baton::WorkerBuilder>,
    queue: &str,
    flow: Flow,
    done: &AtomicUsize,
    warm_up: W,
    work: E,
    expect: usize,
) -> (f64, f64)
where
    W: std::future::Future<Output = usize>,
    E: std::future::Future<Output = f64>,
{
    let running: Vec<Running> = workers.into_iter().map(Running::start).collect();
    let warm = warm_up.await;
    wait_for(done, warm).await;
    configure(client, queue, true, flow).await;
    checkpoint(&client.pool().get().await.unwrap()).await;
    let result = work.await;
    settle(client).await;
    let start = Instant::now();
    configure(client, queue, false, flow).await;
    wait_for(done, warm + expect).await;
    let wall = start.elapsed().as_secs_f64();
    for r in running {
        r.stop().await;
    }
    (wall, result)
}

/// Define `wf`: three sequential no-op steps a, b, c on queue `wf`; and a
/// worker with concurrency 8 for it that counts finished runs in `done`.
async fn three_steps(
    client: &Client,
    wf: &str,
    name: String,
    done: Arc<AtomicUsize>,
) -> baton::WorkerBuilder {
    client
        .define_workflow(
            &WorkflowDef::new(wf)
                .queue(wf)
                .step(Step::new("a"))
                .step(Step::new("b").after(["a"]))
                .step(Step::new("c").after(["b"])),
        )
        .await
        .unwrap();
    three_step_worker(client, wf, name, done, 8)
}

/// The worker of `three_steps` with `slots` slots (W1's has 8).
fn three_step_worker(
    client: &Client,
    wf: &str,
    name: String,
    done: Arc<AtomicUsize>,
    slots: usize,
) -> baton::WorkerBuilder {
    Worker::builder(client)
        .name(name)
        .queues([wf])
        .concurrency(slots)
        .poll_interval(Duration::from_millis(200))
        .handler(wf, "a", |_| async { Ok(()) })
        .handler(wf, "b", |_| async { Ok(()) })
        .handler(wf, "c", move |_| {
            finished_one(&done);
            async { Ok(()) }
        })
}

/// W1 / W4: workflows of 3 sequential no-op steps, drained by one worker with concurrency 8.
async fn throughput(o: &Opts, client: &Client, label: &str) -> Figure {
    throughput_of(client, label, o.n(2000, 200)).await
}

/// W1's shape with `n` runs: W1, W4, and W8_base (as many steps as W8 has
/// items).
async fn throughput_of(client: &Client, label: &str, n: usize) -> Figure {
    let wf = "bench_w1";
    let done = Arc::new(AtomicUsize::new(0));
    let worker = three_steps(client, wf, format!("bench-{label}"), done.clone()).await;
    let warm = 50;
    let (wall, enqueue_per_s) = drain(
        client,
        worker,
        wf,
        &done,
        async {
            enqueue_many(client, wf, warm).await;
            warm
        },
        enqueue_many(client, wf, n),
        n,
    )
    .await;
    let f = Figure {
        workflows: n,
        steps: n * 3,
        wall_s: wall,
        enqueue_per_s,
    };
    f.print(label, "");
    f
}

/// W9: flow control (sql/flow.sql) under concurrent claimers. A Worker has
/// at most one claim turn in flight (client/src/worker.rs), so W1's single
/// worker with 8 slots is one claim session; W9's workloads are drained by
/// W9_CLAIMERS workers of `--w9-slots` slots each (default 8: eight of W1's
/// workers; 1: W1's 8 slots in all, each its own claimer, which claims one
/// step per turn), polling every `--w9-poll-ms` (default 200, as W1's
/// worker: a worker whose claim came back short claims again at the next
/// poll, or when a NOTIFY says steps are ready).
const W9_CLAIMERS: usize = 8;

/// The per-key limit of W9_key: 100 keys (`{"tenant": i % 100}`) of 20
/// running steps each. Each key has 20 runs in W9_key (2,000 in all; 200 in
/// quick mode), so the limit can never bind: the figure is what per-key
/// accounting costs (every claim counts each key it takes under the key's
/// lock). A tighter limit binds sooner than the 64 worker slots suggest: a
/// step counts as running until its report commits, and the workers claim
/// again while their reports are in flight (docs/operations.md, flow control).
const W9_KEYS: usize = 100;
const W9_PER_KEY: i32 = 20;

/// W9_base, W9_rate, W9_key: W1's workload (runs of three no-op steps,
/// 2,000 of them, drained as `drain` times W1) claimed by W9's claimers,
/// on an unlimited queue (W9_base: the reference of the other two), on a
/// queue with a rate limit too high to bind (W9_rate), and on one with a
/// per-key limit that cannot bind (W9_key). A queue with flow
/// control has every step claimed (`_complete` hands none off).
async fn flow_throughput(
    o: &Opts,
    client: &Client,
    label: &str,
    wf: &str,
    flow: Flow,
    input: fn(usize) -> serde_json::Value,
) -> Figure {
    let n = o.n(2000, 200);
    let done = Arc::new(AtomicUsize::new(0));
    drop(three_steps(client, wf, String::new(), done.clone()).await); // defines wf
                                                                      // the warm-up claims through the same path as the drain
    configure(client, wf, false, flow).await;
    let workers = (0..W9_CLAIMERS)
        .map(|k| {
            three_step_worker(
                client,
                wf,
                format!("bench-{label}-{k}"),
                done.clone(),
                o.w9_slots,
            )
            .poll_interval(o.w9_poll)
        })
        .collect();
    let warm = 50;
    let (wall, enqueue_per_s) = drain_with(
        client,
        workers,
        wf,
        flow,
        &done,
        async {
            enqueue_inputs(client, wf, warm, input).await;
            warm
        },
        enqueue_inputs(client, wf, n, input),
        n,
    )
    .await;
    let f = Figure {
        workflows: n,
        steps: n * 3,
        wall_s: wall,
        enqueue_per_s,
    };
    let mut extra = format!(
        " claimers={W9_CLAIMERS} slots_each={} poll_ms={}",
        o.w9_slots,
        o.w9_poll.as_millis()
    );
    if let Some((limit, secs)) = flow.rate {
        extra += &format!(" rate_limit={limit} rate_period_s={secs}");
    }
    if let Some((key, per_key)) = flow.key {
        extra += &format!(" concurrency_key={key} per_key_concurrency={per_key} keys={W9_KEYS}");
    }
    f.print(label, &extra);
    f
}

/// The rate limit of W9_bind: claims per period (seconds).
const W9_BIND_LIMIT: (i32, f64) = (400, 1.0);

/// W9_bind: a binding rate limit (400 claims per second) over a backlog of
/// single-step runs far larger than it lets through (20,000; 5,000 in quick
/// mode), claimed by W9's claimers (a claimer that finds the limit used up
/// waits for its next poll: nothing notifies it when the window frees, so
/// the poll interval is part of the rate reached). The window starts
/// empty, so its first period is a burst: the claims are counted after a
/// first period of 2 s (1.5 s in quick mode), for 10 s (2.5 s), from the
/// steps' `started_at` (the claim's transaction start, the database's
/// clock). Two rates: the claims in the measured window over its length,
/// and over whole multiples of the limit (from the first claim in the
/// window to the claim that many later: a limiter that lets its claims
/// through in bursts once per period is measured over whole periods, not
/// a window that holds one burst more or less). Returns the latter as a
/// ratio to the limit.
async fn bound_rate(o: &Opts, client: &Client, admin: &tokio_postgres::Client) -> f64 {
    let wf = "bench_w9_bind";
    let (limit, period) = W9_BIND_LIMIT;
    let flow = Flow {
        rate: Some(W9_BIND_LIMIT),
        key: None,
    };
    let backlog = o.n(20_000, 5_000);
    let (first, measured) = if o.quick { (1.5, 2.5) } else { (2.0, 10.0) };
    client
        .define_workflow(&WorkflowDef::new(wf).queue(wf).step(Step::new("s")))
        .await
        .unwrap();
    configure(client, wf, true, flow).await;
    let enqueue_per_s = enqueue_many(client, wf, backlog).await;
    settle(client).await;
    checkpoint(admin).await;
    let running: Vec<Running> = (0..W9_CLAIMERS)
        .map(|k| {
            Running::start(
                Worker::builder(client)
                    .name(format!("bench-W9_bind-{k}"))
                    .queues([wf])
                    .concurrency(o.w9_slots)
                    .poll_interval(o.w9_poll)
                    .handler(wf, "s", |_| async { Ok(()) }),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await; // connected, listening
    configure(client, wf, false, flow).await;
    let clock = "SELECT extract(epoch FROM clock_timestamp())::float8";
    tokio::time::sleep(Duration::from_secs_f64(first)).await;
    let t0: f64 = admin.query_one(clock, &[]).await.unwrap().get(0);
    tokio::time::sleep(Duration::from_secs_f64(measured)).await;
    let t1: f64 = admin.query_one(clock, &[]).await.unwrap().get(0);
    for r in running {
        r.stop().await;
    }
    let at: Vec<f64> = admin
        .query(
            "SELECT extract(epoch FROM started_at)::float8 AS t FROM baton.steps \
              WHERE queue = $1 AND extract(epoch FROM started_at)::float8 >= $2 AND extract(epoch FROM started_at)::float8 < $3 \
              ORDER BY t",
            &[&wf, &t0, &t1],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM baton.steps WHERE queue = $1 AND status = 'ready'",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    admin
        .execute("DELETE FROM baton.runs WHERE workflow = $1", &[&wf])
        .await
        .unwrap();
    let per_s = limit as f64 / period;
    let claims = at.len();
    let window_rate = claims as f64 / (t1 - t0);
    // whole multiples of the limit: claims 0 and k * limit of the window
    let whole = (claims.saturating_sub(1) / limit as usize) * limit as usize;
    let aligned_rate = if whole > 0 {
        whole as f64 / (at[whole] - at[0])
    } else {
        window_rate
    };
    record("W9_bind", aligned_rate, 1000.0 / aligned_rate);
    println!(
        "RESULT system=pg_baton workload=W9_bind workflows={claims} steps={claims} wall_s={:.3} steps_per_s={aligned_rate:.1} \
         ms_per_step={:.3} enqueue_per_s={enqueue_per_s:.1} rate_limit={limit} rate_period_s={period} limit_per_s={per_s:.1} \
         claims_per_s_window={window_rate:.1} claims_per_s_whole_limits={aligned_rate:.1} whole_limits_claims={whole} \
         claimers={W9_CLAIMERS} slots_each={} poll_ms={} backlog={backlog} ready_left={left}",
        t1 - t0,
        1000.0 / aligned_rate,
        o.w9_slots,
        o.w9_poll.as_millis()
    );
    if left == 0 {
        println!("INFO W9_bind the backlog ran out: the rate was not bound by the limit alone");
    }
    aligned_rate / per_s
}

/// QS: `SELECT * FROM baton.queue_stats` on one session: the first call
/// (which plans the function's query), then, after five more (PL/pgSQL plans
/// a statement anew for its first five runs, then keeps a generic plan if it
/// is no worse), the median of `o.n(25, 9)` calls: what a dashboard polling
/// on a pooled connection pays. `what` says which history it ran beside.
async fn queue_stats_time(
    o: &Opts,
    admin: &tokio_postgres::Client,
    label: &str,
    what: &str,
) -> f64 {
    let stmt = admin
        .prepare("SELECT * FROM baton.queue_stats")
        .await
        .unwrap();
    let start = Instant::now();
    let rows = admin.query(&stmt, &[]).await.unwrap();
    let first = start.elapsed().as_secs_f64() * 1000.0;
    let last_minute: i64 = rows
        .iter()
        .map(|r| r.get::<_, i64>("completed_last_minute"))
        .sum();
    let rows = rows.len();
    for _ in 0..5 {
        admin.query(&stmt, &[]).await.unwrap();
    }
    let calls = o.n(25, 9);
    let mut ms = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        admin.query(&stmt, &[]).await.unwrap();
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let (min, max) = ms
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let m = median(ms);
    let counts = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE finished_at IS NOT NULL), \
                    count(*) FILTER (WHERE finished_at > clock_timestamp() - interval '1 hour') FROM baton.steps",
            &[],
        )
        .await
        .unwrap();
    let (finished, last_hour): (i64, i64) = (counts.get(0), counts.get(1));
    record(label, 0.0, m);
    println!(
        "INFO {label} queue_stats median_ms={m:.3} min_ms={min:.3} max_ms={max:.3} calls={calls} first_call_ms={first:.3} queues={rows} completed_last_minute={last_minute} \
         finished_steps={finished} finished_last_hour={last_hour} ({what})"
    );
    m
}

/// W2: one workflow of 200 sequential steps, one worker.
async fn latency(o: &Opts, client: &Client) -> Figure {
    chain(o, client, "W2", "bench_w2", 1).await
}

/// W6: a chain beside 100,000 healthy leases in another queue (5,000 in
/// quick mode), by a worker with 8 slots: each of its turns asks for the free
/// slots, gets the one step it hands off and so comes back short, and
/// reclaims expired leases; that must read only expired ones, not every
/// running step of the database. W6_base is the same chain and worker
/// without the leases, just before.
async fn latency_beside_leases(
    o: &Opts,
    client: &Client,
    admin: &tokio_postgres::Client,
) -> (Figure, Figure) {
    let base = chain(o, client, "W6_base", "bench_w6_base", 8).await;
    let held = o.n(100_000, 5_000);
    admin
        .batch_execute(&format!(
            "SELECT baton.define_workflow('bench_w6_held', '{{\"queue\": \"bench_w6_held\", \"steps\": [{{\"name\": \"hold\"}}]}}');
             SELECT count(*) FROM unnest(baton.enqueue_workflows('bench_w6_held', array_fill('{{}}'::jsonb, ARRAY[{held}])));
             DO $$ BEGIN
                 FOR i IN 1 .. ceil({held} / 1000.0) LOOP
                     PERFORM baton.claim_steps('bench-w6-holder', ARRAY['bench_w6_held'], 1000, '1 hour');
                 END LOOP;
             END $$;"
        ))
        .await
        .expect("lease the W6 steps");
    admin
        .batch_execute("VACUUM ANALYZE baton.steps")
        .await
        .unwrap();
    let f = chain(o, client, "W6", "bench_w6", 8).await;
    admin
        .batch_execute("DELETE FROM baton.runs WHERE workflow = 'bench_w6_held'")
        .await
        .unwrap();
    (base, f)
}

/// One workflow of n sequential steps on queue `wf`, one worker with
/// `slots` slots.
async fn chain(o: &Opts, client: &Client, label: &str, wf: &str, slots: usize) -> Figure {
    let n = o.n(200, 50);
    let mut def = WorkflowDef::new(wf).queue(wf).step(Step::new("s0"));
    for i in 1..n {
        def = def.step(Step::new(format!("s{i}")).after([format!("s{}", i - 1)]));
    }
    client.define_workflow(&def).await.unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let mut worker = Worker::builder(client)
        .name(format!("bench-{label}"))
        .queues([wf])
        .concurrency(slots);
    for i in 0..n {
        let d = done.clone();
        worker = worker.handler(wf, &format!("s{i}"), move |_| {
            if i == n - 1 {
                finished_one(&d);
            }
            async { Ok(()) }
        });
    }
    let one_run = || async {
        client
            .enqueue(wf, &json!({}), EnqueueOptions::default())
            .await
            .unwrap();
    };
    // warm-up: one run of the same workflow
    let (wall, _) = drain(
        client,
        worker,
        wf,
        &done,
        async {
            one_run().await;
            1
        },
        async {
            one_run().await;
            0.0
        },
        1,
    )
    .await;
    let f = Figure {
        workflows: 1,
        steps: n,
        wall_s: wall,
        enqueue_per_s: 0.0,
    };
    f.print(label, "");
    f
}

/// W2 again, driven by a bare loop on one connection, as a worker in any
/// language can be: one prepared complete_and_claim per step. The difference
/// to W2 is what the Rust worker adds (tasks, channels, heartbeats).
async fn latency_sql(o: &Opts, client: &Client) -> Figure {
    let wf = "bench_w2";
    let n = o.n(200, 50);
    client
        .enqueue(wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    settle(client).await;
    let conn = client.pool().get().await.unwrap();
    let turn = conn
        .prepare(
            "SELECT step_id, lease_token FROM baton.complete_and_claim($1, $2, $3, 'bench-W2-sql', ARRAY[$4], 1)",
        )
        .await
        .unwrap();
    let (mut ids, mut tokens) = (Vec::<i64>::new(), Vec::<uuid::Uuid>::new());
    let start = Instant::now();
    for i in 0..=n {
        let outputs: Vec<serde_json::Value> = ids.iter().map(|_| json!({})).collect();
        let rows = conn
            .query(&turn, &[&ids, &tokens, &outputs, &wf])
            .await
            .unwrap();
        assert_eq!(
            rows.len(),
            usize::from(i < n),
            "the next step is claimed with the completion"
        );
        ids = rows.iter().map(|r| r.get(0)).collect();
        tokens = rows.iter().map(|r| r.get(1)).collect();
    }
    let f = Figure {
        workflows: 1,
        steps: n,
        wall_s: start.elapsed().as_secs_f64(),
        enqueue_per_s: 0.0,
    };
    f.print("W2_sql", "");
    f
}

/// The Python example worker (examples/python_worker.py, or the script
/// named by BATON_PY_WORKER) in a subprocess with `--py-threads` claimer
/// threads. A small driver gives it no-op handlers for `wf`; the handler of
/// the last step prints a line with the worker's counters (claims, and those
/// that came back empty), which ends a drain as FINISHED does for the Rust
/// worker. Closing its stdin stops it (SIGTERM: it reports what it holds).
struct PyWorker {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

const PY_DRIVER: &str = r#"
import importlib.util, os, signal, sys, threading
spec = importlib.util.spec_from_file_location("worker", sys.argv[1])
w = importlib.util.module_from_spec(spec)
spec.loader.exec_module(w)
wf, steps = sys.argv[2], sys.argv[3].split(",")
lock = threading.Lock()
def last(*_):
    with lock:
        print(f"done {w.STATS['claims']} {w.STATS['empty']}", flush=True)
w.HANDLERS.update({(wf, s): (lambda *_: None) for s in steps})
w.HANDLERS[(wf, steps[-1])] = last
threading.Thread(target=lambda: (sys.stdin.read(), os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
w.main(sys.argv[4:])
"#;

impl PyWorker {
    fn start(o: &Opts, wf: &str, steps: &[String]) -> PyWorker {
        use std::process::{Command, Stdio};
        let script = std::env::var("BATON_PY_WORKER").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/python_worker.py").into()
        });
        // Debian's python3, which has python3-psycopg (as in polyglot.sh)
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", PY_DRIVER, &script, wf, &steps.join(",")])
            .args([&o.url, wf, "--threads", &o.py_threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start /usr/bin/python3 (python3-psycopg)");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(out).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        PyWorker { child, lines }
    }

    /// Waits for `runs` more finished runs; the counters at the last one.
    async fn finished(&mut self, runs: usize) -> (i64, i64) {
        let mut at = (0, 0);
        for _ in 0..runs {
            let line = self.lines.recv().await.expect("the Python worker exited");
            let n: Vec<i64> = line
                .strip_prefix("done ")
                .and_then(|l| l.split(' ').map(|x| x.parse().ok()).collect())
                .unwrap_or_else(|| panic!("unexpected line from the Python worker: {line}"));
            at = (n[0], n[1]);
        }
        at
    }

    fn stop(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the Python worker failed: {status}");
    }
}

/// W1_py and W2_py: runs of a chain of no-op `steps` drained by the Python
/// worker, timed as `drain` times the Rust worker: `warm` runs first, then
/// `runs` enqueued while the queue is paused, the clock from unpausing to
/// the last run's last handler. Checks that every step of every run
/// succeeded. Returns the figure, the worker's empty claims during the drain,
/// and the RESULT line's suffix with its counters.
async fn python_drain(
    o: &Opts,
    client: &Client,
    wf: &str,
    steps: &[String],
    warm: usize,
    runs: usize,
) -> (Figure, i64, String) {
    let mut def = WorkflowDef::new(wf).queue(wf);
    for (i, s) in steps.iter().enumerate() {
        def = def.step(match i {
            0 => Step::new(s),
            _ => Step::new(s).after([&steps[i - 1]]),
        });
    }
    client.define_workflow(&def).await.unwrap();
    let mut worker = PyWorker::start(o, wf, steps);
    enqueue_many(client, wf, warm).await;
    let before = worker.finished(warm).await;
    pause(client, wf, true).await;
    checkpoint(&client.pool().get().await.unwrap()).await;
    let enqueue_per_s = enqueue_many(client, wf, runs).await;
    settle(client).await;
    let start = Instant::now();
    pause(client, wf, false).await;
    let after = worker.finished(runs).await;
    let wall = start.elapsed().as_secs_f64();
    worker.stop();
    let row = client
        .pool()
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FILTER (WHERE s.status = 'succeeded'), count(*)
               FROM baton.workflow_runs r JOIN baton.workflow_steps s ON s.workflow_id = r.id
              WHERE r.workflow = $1",
            &[&wf],
        )
        .await
        .unwrap();
    let expect = ((warm + runs) * steps.len()) as i64;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (expect, expect),
        "every step of every {wf} run succeeded"
    );
    let (claims, empty) = (after.0 - before.0, after.1 - before.1);
    let f = Figure {
        workflows: runs,
        steps: runs * steps.len(),
        wall_s: wall,
        enqueue_per_s,
    };
    let extra = format!(
        " threads={} claims={claims} empty_claims={empty} empty_claims_per_step={:.3}",
        o.py_threads,
        empty as f64 / f.steps as f64
    );
    (f, empty, extra)
}

/// W1_py: W1's workload (runs of 3 sequential no-op steps) drained by the
/// Python worker.
async fn python_throughput(o: &Opts, client: &Client) {
    let steps = ["a", "b", "c"].map(String::from);
    let (f, _, extra) = python_drain(o, client, "bench_w1_py", &steps, 50, o.n(2000, 200)).await;
    f.print("W1_py", &extra);
}

/// W2_py: W2's chain of 200 steps (also in --quick: it is the check below)
/// run by the Python worker. With one listener per process waking one
/// claimer, and the chain handed from step to step by complete_and_claim,
/// the chain makes next to no empty claims however many threads the worker
/// has (3 in the drain: the pause, the enqueue and the warm-up's last
/// report); a listener per thread made about 7 per step with 8 threads. A
/// count, not a time, so the check holds on any machine.
async fn python_latency(o: &Opts, client: &Client) {
    let n = 200;
    let steps: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    let (f, empty, extra) = python_drain(o, client, "bench_w2_py", &steps, 1, 1).await;
    f.print("W2_py", &extra);
    assert!(
        empty <= (n / 10) as i64,
        "W2_py: {empty} empty claims for a chain of {n} steps with {} threads (at most {} expected)",
        o.py_threads,
        n / 10
    );
}

/// W3: single-step workflows enqueued one at a time, in batches, and in batches with keys.
async fn enqueue(o: &Opts, client: &Client) {
    let wf = "bench_w3";
    client
        .define_workflow(&WorkflowDef::new(wf).queue(wf).step(Step::new("s")))
        .await
        .unwrap();
    let n = o.n(10_000, 1000);
    let conn = client.pool().get().await.unwrap();
    let stmt = conn
        .prepare("SELECT baton.enqueue_workflow($1, $2)")
        .await
        .unwrap();
    let start = Instant::now();
    for i in 0..n {
        conn.query_one(&stmt, &[&wf, &json!({ "i": i })])
            .await
            .unwrap();
    }
    let wall = start.elapsed().as_secs_f64();
    Figure {
        workflows: n,
        steps: n,
        wall_s: wall,
        enqueue_per_s: n as f64 / wall,
    }
    .print("W3_single", "");

    for keyed in [false, true] {
        let start = Instant::now();
        for b in 0..n / 100 {
            let inputs: Vec<serde_json::Value> = (0..100).map(|i| json!({ "i": i })).collect();
            let keys: Option<Vec<String>> =
                keyed.then(|| (0..100).map(|i| format!("key-{b}-{i}")).collect());
            conn.query_one(
                "SELECT baton.enqueue_workflows($1, $2, $3)",
                &[&wf, &inputs, &keys],
            )
            .await
            .unwrap();
        }
        let wall = start.elapsed().as_secs_f64();
        let label = if keyed {
            "W3_batch100_keys"
        } else {
            "W3_batch100"
        };
        Figure {
            workflows: n,
            steps: n,
            wall_s: wall,
            enqueue_per_s: n as f64 / wall,
        }
        .print(label, "");
    }
    conn.execute("DELETE FROM baton.runs WHERE workflow = $1", &[&wf])
        .await
        .unwrap();
}

/// W4's history: finished runs of bench_w1 (3 steps each) written straight
/// into the tables, 1,000,000 steps in all. As in real history, a few steps
/// (1 in 100) succeeded at the second attempt: the first is in `attempts`;
/// and it is old: it finished two hours ago, outside queue_stats' windows
/// of the last minute and hour (QS measures queue_stats beside it). All of
/// its times are the same, as when they were now(): W4's claims read none.
async fn fill_history(o: &Opts, admin: &tokio_postgres::Client) {
    let runs = (o.n(1_000_000, 60_000) / 3) as i64;
    let start = Instant::now();
    admin
        .execute(
            "WITH g AS MATERIALIZED (SELECT gen_random_uuid() AS id, n FROM generate_series(1, $1::bigint) n),
             r AS (
               INSERT INTO baton.runs (id, workflow, version, status, queue, input, output, created_at, started_at, finished_at)
               SELECT g.id, 'bench_w1', 1, 'succeeded', 'bench_w1', '{}', '{\"c\": null}', (now() - interval '2 hours'), (now() - interval '2 hours'), (now() - interval '2 hours') FROM g),
             s AS (
               INSERT INTO baton.steps (run_id, step_no, name, status, upstream, downstream, waiting_on, queue, priority,
                                        run_at, attempt, max_attempts, worker, started_at, finished_at)
               SELECT g.id, k, 'abc'::text, 'succeeded', CASE WHEN k = 0 THEN '{}' ELSE ARRAY[k - 1] END,
                      CASE WHEN k = 2 THEN '{}' ELSE ARRAY[k + 1] END, 0, 'bench_w1', 0, (now() - interval '2 hours'),
                      CASE WHEN g.n % 33 = 0 AND k = 0 THEN 2 ELSE 1 END, 3, 'history', (now() - interval '2 hours'), (now() - interval '2 hours')
                 FROM g, generate_series(0, 2) k
               RETURNING run_id, step_id, attempt)
             INSERT INTO baton.attempts (run_id, step_id, attempt, step, worker, started_at, outcome, error)
             SELECT run_id, step_id, 1, 'a', 'history', (now() - interval '2 hours'), 'failed', 'boom' FROM s WHERE attempt = 2",
            &[&runs],
        )
        .await
        .unwrap();
    admin
        .batch_execute("VACUUM ANALYZE baton.runs, baton.steps, baton.attempts")
        .await
        .unwrap();
    // Flush it all now, so that W4 measures claiming beside a big history and
    // not the checkpoint that writing it would otherwise cause.
    admin.batch_execute("CHECKPOINT").await.unwrap();
    println!(
        "# W4 history: {} finished steps written in {:.1} s",
        runs * 3,
        start.elapsed().as_secs_f64()
    );
}

/// W5: from a committed enqueue to the start of the step on an idle worker.
async fn wakeup(o: &Opts, client: &Client) -> f64 {
    let wf = "bench_w5";
    client
        .define_workflow(&WorkflowDef::new(wf).queue(wf).step(Step::new("s")))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = Worker::builder(client)
        .name("bench-W5")
        .queues([wf])
        .concurrency(1)
        .poll_interval(Duration::from_secs(60))
        .handler(wf, "s", move |_| {
            let _ = tx.send(Instant::now());
            async { Ok(()) }
        })
        .build();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tries = o.n(200, 30);
    let mut ms = Vec::with_capacity(tries);
    let conn = client.pool().get().await.unwrap();
    for i in 0..tries {
        conn.query_one(
            "SELECT baton.enqueue_workflow($1, $2)",
            &[&wf, &json!({ "i": i })],
        )
        .await
        .unwrap();
        let committed = Instant::now();
        let started = rx.recv().await.unwrap();
        ms.push(started.saturating_duration_since(committed).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await; // idle again
    }
    stop.send(()).ok();
    handle.await.unwrap().unwrap();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = ms[ms.len() / 2];
    record("W5", 0.0, median);
    let p99 = ms[(ms.len() * 99 / 100).min(ms.len() - 1)];
    println!(
        "RESULT system=pg_baton workload=W5 workflows={tries} steps={tries} wall_s=0 steps_per_s=0 ms_per_step={median:.3} enqueue_per_s=0 median_ms={median:.3} p99_ms={p99:.3}"
    );
    median
}

/// TK: takeover of a dead worker's leases. A worker registered under its
/// name (`baton.register_worker`, on its LISTEN connection) holds 8 steps
/// under a 30 s lease, then dies: its task stops and every connection of it
/// is cut (as a killed process's are), at a random moment. The figure is the
/// time until the
/// background worker has handed all 8 back (polled every 5 ms), once per
/// trial; its round comes every `baton.interval`. Returns the median in s.
async fn takeover(o: &Opts, admin: &tokio_postgres::Client) -> f64 {
    let wf = "bench_tk";
    admin
        .query_one(
            "SELECT baton.define_workflow($1, $2)",
            &[
                &wf,
                &json!({"queue": wf, "steps": [{"name": "s", "max_attempts": 1000}]}),
            ],
        )
        .await
        .unwrap();
    admin
        .query_one(
            "SELECT baton.enqueue_workflows($1, array_fill('{}'::jsonb, ARRAY[8]))",
            &[&wf],
        )
        .await
        .unwrap();
    let held = |name: String| async move {
        admin
            .query_one(
                "SELECT count(*) FROM baton.steps WHERE worker = $1 AND status = 'running'",
                &[&name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let tries = o.n(20, 3);
    let mut secs = Vec::with_capacity(tries);
    for i in 0..tries {
        let (app, name) = (format!("bench_tk_{i}"), format!("bench-TK-{i}"));
        let sep = if o.url.contains('?') { '&' } else { '?' };
        let client = Client::connect(&format!("{}{sep}application_name={app}", o.url))
            .await
            .expect("client");
        let worker = Worker::builder(&client)
            .name(&name)
            .queues([wf])
            .concurrency(8)
            .lease(Duration::from_secs(30))
            .poll_interval(Duration::from_millis(100))
            .handler(wf, "s", |_| async {
                std::future::pending::<()>().await;
                Ok(())
            })
            .build();
        let handle = tokio::spawn(worker.run());
        while held(name.clone()).await < 8 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // at a random point of the background worker's round: the steps
        // were claimed right after the last one handed them back
        let ms = rand::random::<u64>() % 1000;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        handle.abort();
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap();
        let died = Instant::now();
        while held(name.clone()).await > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        secs.push(died.elapsed().as_secs_f64());
    }
    let interval: String = admin
        .query_one("SELECT current_setting('baton.interval')", &[])
        .await
        .unwrap()
        .get(0);
    let max = secs.iter().copied().fold(0.0, f64::max);
    let median = median(secs);
    record("TK", 0.0, median * 1000.0);
    println!(
        "RESULT system=pg_baton workload=TK workflows=8 steps=8 wall_s=0 steps_per_s=0 ms_per_step={:.1} enqueue_per_s=0 trials={tries} median_s={median:.3} max_s={max:.3} lease_s=30 baton_interval={interval}",
        median * 1000.0
    );
    median
}

/// W7: timer lateness. Sleep steps (`sleep_until` a time in the run's input,
/// spread over a few seconds) are fired by the background worker, which
/// sleeps until the next one is due and is woken at commit when a sooner one
/// is added. Lateness is the time from a step's due time to the start of the
/// transaction that made it succeed, read from the database (one clock).
/// Returns (median, p99) in ms.
async fn lateness(o: &Opts, client: &Client) -> (f64, f64) {
    let wf = "bench_w7";
    let conn = client.pool().get().await.unwrap();
    conn.query_one(
        "SELECT baton.define_workflow($1, $2)",
        &[
            &wf,
            &json!({"steps": [{"name": "nap", "sleep_until": "$.input.at"}]}),
        ],
    )
    .await
    .unwrap();
    let n = o.n(1000, 50) as i32;
    let spread = if o.quick { 1.0 } else { 5.0 };
    // in batches of 50, a few ms apart, so that timers are added while
    // others are being fired
    let mut left = n;
    while left > 0 {
        let batch = left.min(50);
        conn.query_one(
            "SELECT baton.enqueue_workflows($1, ARRAY(SELECT jsonb_build_object('at', clock_timestamp() \
             + make_interval(secs => 0.2 + random() * $3)) FROM generate_series(1, $2)))",
            &[&wf, &batch, &spread],
        )
        .await
        .unwrap();
        left -= batch;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(spread + 30.0);
    loop {
        let left: i64 = conn
            .query_one(
                "SELECT count(*) FROM baton.runs WHERE workflow = $1 AND status <> 'succeeded'",
                &[&wf],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "W7: {left} sleep steps did not fire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = conn
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms) \
               FROM (SELECT (extract(epoch FROM s.finished_at - (r.input ->> 'at')::timestamptz) * 1000)::float8 AS ms \
                       FROM baton.runs r JOIN baton.steps s ON s.run_id = r.id WHERE r.workflow = $1) l",
            &[&wf],
        )
        .await
        .unwrap();
    let (median, p99, max): (f64, f64, f64) = (row.get(0), row.get(1), row.get(2));
    record("W7", 0.0, median);
    println!(
        "RESULT system=pg_baton workload=W7 workflows={n} steps={n} wall_s=0 steps_per_s=0 ms_per_step={median:.3} enqueue_per_s=0 median_ms={median:.3} p99_ms={p99:.3} max_ms={max:.3}"
    );
    (median, p99)
}

/// W8: one run whose `split` step outputs an array of 100,000 numbers (2,000
/// in quick mode), a map step over it with a no-op handler, then `join`; one
/// worker with concurrency 8, as W1. Timed from the end of `split` (its
/// completion inserts the items) to the end of the map step, from the
/// database's clock: items per second against W1's steps per second.
async fn map_fan_out(o: &Opts, client: &Client) -> Figure {
    let wf = "bench_w8";
    let n = o.n(100_000, 2000);
    client
        .define_workflow(
            &WorkflowDef::new(wf)
                .queue(wf)
                .step(Step::new("split"))
                .step(Step::map("each", "split"))
                .step(Step::new("join").after(["each"])),
        )
        .await
        .unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let finished = done.clone();
    let worker = Worker::builder(client)
        .name("bench-W8")
        .queues([wf])
        .concurrency(8)
        .poll_interval(Duration::from_millis(200))
        .handler(wf, "split", move |_| async move {
            Ok((0..n).collect::<Vec<usize>>())
        })
        .handler(wf, "each", |_| async { Ok(()) })
        .handler(wf, "join", move |_| {
            finished_one(&finished);
            async { Ok(()) }
        });
    settle(client).await;
    let running = Running::start(worker);
    let run = client
        .enqueue(wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    wait_for(&done, 1).await;
    running.stop().await;
    let conn = client.pool().get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT extract(epoch FROM m.finished_at - s.finished_at)::float8, \
                    extract(epoch FROM (SELECT min(i.finished_at) FROM baton.steps i WHERE i.run_id = $1 AND i.map_index IS NOT NULL) - s.finished_at)::float8, \
                    jsonb_array_length(m.output) \
               FROM baton.steps s JOIN baton.steps m ON m.run_id = s.run_id AND m.name = 'each' AND m.map_index IS NULL \
              WHERE s.run_id = $1 AND s.name = 'split'",
            &[&run],
        )
        .await
        .unwrap();
    let (wall, fan_out, items): (f64, f64, i32) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        items as usize, n,
        "W8: the map's output has every item's result"
    );
    let f = Figure {
        workflows: 1,
        steps: n,
        wall_s: wall,
        enqueue_per_s: 0.0,
    };
    // first_item_ms: from the end of split to the first item's completion,
    // which includes the insert of every item (in split's completion)
    f.print("W8", &format!(" first_item_ms={:.1}", fan_out * 1000.0));
    f
}

/// Soak: a steady load while the table sizes are sampled; retention keeps
/// history bounded, so sizes must level off.
async fn soak(o: &Opts, client: &Client, admin: &tokio_postgres::Client) {
    let wf = "bench_soak";
    let secs = o.soak_secs;
    let retention = if o.quick { "5 seconds" } else { "1 minute" };
    let every = if o.quick { 5 } else { 10 };
    // Start from empty tables: the soak measures what a steady load leaves behind.
    admin
        .batch_execute("TRUNCATE baton.runs, baton.steps, baton.attempts, baton.checkpoints")
        .await
        .unwrap();
    admin.batch_execute("CHECKPOINT").await.unwrap();
    for sql in [
        format!("ALTER SYSTEM SET baton.retention = '{retention}'"),
        "ALTER SYSTEM SET baton.prune_batch = 5000".to_string(),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    let done = Arc::new(AtomicUsize::new(0));
    let worker = three_steps(client, wf, "bench-soak".into(), done.clone())
        .await
        .build();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    // 200 runs (600 steps) per second, in batches of 20 every 100 ms.
    let producer_client = client.clone();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let producer = tokio::spawn(async move {
        let conn = producer_client.pool().get().await.unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut sent = 0usize;
        while Instant::now() < deadline {
            tick.tick().await;
            let inputs: Vec<serde_json::Value> = (0..20).map(|i| json!({ "i": i })).collect();
            conn.query_one(
                "SELECT baton.enqueue_workflows($1, $2)",
                &[&"bench_soak", &inputs],
            )
            .await
            .unwrap();
            sent += 20;
        }
        sent
    });
    let start = Instant::now();
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(every)).await;
        let row = admin
            .query_one(
                "SELECT pg_total_relation_size('baton.steps'), pg_total_relation_size('baton.runs'),
                        pg_total_relation_size('baton.attempts'), pg_indexes_size('baton.steps'),
                        (SELECT sum(n_dead_tup)::bigint FROM pg_stat_user_tables WHERE schemaname = 'baton'),
                        (SELECT count(*) FROM baton.steps WHERE status = 'ready')",
                &[],
            )
            .await
            .unwrap();
        let (steps, runs, attempts, idx, dead, ready): (i64, i64, i64, i64, i64, i64) = (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get::<_, Option<i64>>(4).unwrap_or(0),
            row.get(5),
        );
        println!(
            "SOAK t={:.0}s done_runs={} steps_kb={} steps_index_kb={} runs_kb={} attempts_kb={} dead_tuples={dead} ready_backlog={ready}",
            start.elapsed().as_secs_f64(),
            done.load(Ordering::SeqCst),
            steps / 1024,
            idx / 1024,
            runs / 1024,
            attempts / 1024
        );
        samples.push(steps + runs + attempts);
    }
    let sent = producer.await.unwrap();
    stop.send(()).ok();
    handle.await.unwrap().unwrap();
    let wall = start.elapsed().as_secs_f64();
    let finished = done.load(Ordering::SeqCst);
    // Growth of the total size over the second half of the run.
    let growth = match (samples.get(samples.len() / 2), samples.last()) {
        (Some(mid), Some(last)) if *mid > 0 => *last as f64 / *mid as f64,
        _ => 1.0,
    };
    Figure {
        workflows: finished,
        steps: finished * 3,
        wall_s: wall,
        enqueue_per_s: sent as f64 / wall,
    }
    .print("soak", &format!(" size_growth_second_half={growth:.2}"));
    for sql in [
        "ALTER SYSTEM RESET baton.retention",
        "ALTER SYSTEM RESET baton.prune_batch",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
}
