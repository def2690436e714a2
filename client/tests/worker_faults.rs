//! The worker when things go wrong: an output jsonb cannot store, a report
//! whose connection is killed or that waits on a lock, a shutdown with steps
//! finishing at different times, a step the worker has no handler for, and
//! exactly-once completions inside REPEATABLE READ transactions.
//!
//! Each test waits on states (a row, a blocked backend), never on the clock:
//! every wait is bounded and only its failure message names a time.

mod common;

use baton::{Client, EnqueueOptions, Step, StepContext, Worker, WorkflowDef};
use common::workers::{client_named, shut, spawn};
use common::{blocked_by, eventually, unique, url};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_postgres::IsolationLevel;

async fn client() -> Client {
    Client::connect(&url()).await.expect("connect")
}

/// A one-step workflow ("s") on a queue of its own: (workflow, queue).
async fn one_step(c: &Client, prefix: &str, max_attempts: u32) -> (String, String) {
    let (wf, queue) = (unique(prefix), unique("q"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("s").max_attempts(max_attempts)),
    )
    .await
    .unwrap();
    (wf, queue)
}

/// The lease of the tests that watch heartbeats renew it (every third of it):
/// short enough to see renewals soon, long enough that a stalled machine
/// does not miss one.
const LEASE: Duration = Duration::from_secs(3);

/// Handlers that run until the test opens their gate: input `{"n": n}`
/// reports `n` on `started` when it begins, and returns `{"n": n}` once gate
/// `n` has a permit.
#[derive(Clone)]
struct Gates {
    gates: Arc<Mutex<HashMap<i64, Arc<Semaphore>>>>,
    started: mpsc::UnboundedSender<i64>,
}

impl Gates {
    fn new() -> (Self, mpsc::UnboundedReceiver<i64>) {
        let (started, rx) = mpsc::unbounded_channel();
        (
            Gates {
                gates: Arc::default(),
                started,
            },
            rx,
        )
    }
    fn gate(&self, n: i64) -> Arc<Semaphore> {
        self.gates
            .lock()
            .unwrap()
            .entry(n)
            .or_insert_with(|| Arc::new(Semaphore::new(0)))
            .clone()
    }
    fn open(&self, n: i64) {
        self.gate(n).add_permits(1);
    }
    async fn run(self, ctx: StepContext) -> Result<serde_json::Value, baton::StepError> {
        let input: serde_json::Value = ctx.input()?;
        let n = input["n"].as_i64().unwrap();
        let _ = self.started.send(n);
        // forgotten, not returned: the test sees that the handler went on
        self.gate(n).acquire().await.unwrap().forget();
        Ok(json!({ "n": n }))
    }
}

async fn recv_started(rx: &mut mpsc::UnboundedReceiver<i64>, how_many: usize) {
    for _ in 0..how_many {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("handlers start within 10 s")
            .unwrap();
    }
}

/// (status, attempt, error, lease_expires_at - $2) of the step of run `run`.
async fn step_row(
    db: &tokio_postgres::Client,
    run: uuid::Uuid,
) -> (String, i32, Option<String>, Option<f64>) {
    let row = db
        .query_one(
            "SELECT status::text, attempt, error, extract(epoch FROM lease_expires_at)::float8 \
             FROM baton.workflow_steps WHERE workflow_id = $1",
            &[&run],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// The server's clock, as seconds since the epoch.
async fn server_now(db: &tokio_postgres::Client) -> f64 {
    db.query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .unwrap()
        .get(0)
}

/// Another session holding a run's lock in an open transaction (`locker`,
/// backend `holder`), and one to watch with (`db`).
struct RunLock {
    locker: tokio_postgres::Client,
    db: tokio_postgres::Client,
    holder: i32,
}

/// Take the run's lock in another session, open `gate` so that the handler
/// finishes, and wait until the worker's report is blocked on the lock.
async fn hold_run_lock(run: uuid::Uuid, gates: &Gates, gate: i64, what: &str) -> RunLock {
    let (locker, holder) = common::hold_open("SELECT baton._lock_run($1)", &[&run]).await;
    let db = common::connect().await;
    gates.open(gate);
    assert!(
        eventually(Duration::from_secs(10), || async {
            !blocked_by(&db, holder).await.is_empty()
        })
        .await,
        "{what}"
    );
    RunLock { locker, db, holder }
}

/// Wait until the lease of `run`'s step reaches past `since + margin`
/// seconds (server clock): with a margin of more than a lease, a heartbeat
/// renewed it after `since`.
async fn lease_renewed_after(
    db: &tokio_postgres::Client,
    run: uuid::Uuid,
    since: f64,
    margin: f64,
) -> bool {
    eventually(Duration::from_secs(15), || async {
        let (status, _, _, expires) = step_row(db, run).await;
        status == "running" && expires.is_some_and(|e| e > since + margin)
    })
    .await
}

/// Wait until every run in `runs` has finished; returns their statuses.
async fn finished(c: &Client, runs: &[uuid::Uuid]) -> Vec<String> {
    let ok = eventually(Duration::from_secs(30), || async {
        for run in runs {
            let status = c.run(*run).await.unwrap().status;
            if status == "pending" || status == "running" {
                return false;
            }
        }
        true
    })
    .await;
    let mut statuses = Vec::new();
    for run in runs {
        statuses.push(c.run(*run).await.unwrap().status);
    }
    assert!(ok, "runs still unfinished after 30 s: {statuses:?}");
    statuses
}

/// A: an output holding a NUL character (serde_json writes "\u0000", which
/// jsonb refuses with 22P05 before any function runs) fails only its own
/// step, non-retryably and saying why; the steps reported with it succeed.
#[tokio::test]
async fn an_output_with_a_nul_fails_only_its_own_step() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "nul", 1).await;
    // All three finish together, so that they are reported in one call.
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let b = barrier.clone();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .concurrency(3)
        .lease(LEASE)
        .handler(&wf, "s", move |ctx| {
            let b = b.clone();
            async move {
                let input: serde_json::Value = ctx.input()?;
                b.wait().await;
                if input["n"] == 1 {
                    Ok(json!({ "text": "a\u{0}b" }))
                } else {
                    Ok(json!({ "text": "fine" }))
                }
            }
        })
        .build();
    let (stop, handle) = spawn(worker);
    let mut runs = Vec::new();
    for n in 0..3 {
        runs.push(
            c.enqueue(&wf, &json!({ "n": n }), EnqueueOptions::default())
                .await
                .unwrap(),
        );
    }
    let statuses = finished(&c, &runs).await;
    assert_eq!(statuses, ["succeeded", "failed", "succeeded"]);
    let db = common::connect().await;
    for (n, run) in runs.iter().enumerate() {
        let (status, attempt, error, _) = step_row(&db, *run).await;
        assert_eq!(attempt, 1, "step {n}: one attempt");
        if n == 1 {
            assert_eq!(status, "failed");
            let error = error.unwrap_or_default();
            assert!(error.contains("NUL"), "the reason is given: {error}");
            let outcome: String = db
                .query_one(
                    "SELECT outcome FROM baton.step_attempts WHERE workflow_id = $1",
                    &[run],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                outcome, "failed",
                "failed by the worker, not by an expired lease"
            );
        } else {
            assert_eq!(status, "succeeded", "step {n}");
        }
    }
    shut(stop, handle).await;
}

/// A (transient): a report whose connection is terminated (57P01) while it
/// waits is retried on a new connection, and the step's lease is renewed
/// meanwhile; with max_attempts = 1 the run still succeeds.
#[tokio::test]
async fn a_report_whose_connection_is_killed_is_retried() {
    let app = unique("killed");
    let c = client_named(&app).await;
    let (wf, queue) = one_step(&c, "killed", 1).await;
    let (gates, mut started) = Gates::new();
    let g = gates.clone();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .lease(LEASE)
        .handler(&wf, "s", move |ctx| g.clone().run(ctx))
        .build();
    let (stop, handle) = spawn(worker);
    let run = c
        .enqueue(&wf, &json!({ "n": 1 }), EnqueueOptions::default())
        .await
        .unwrap();
    recv_started(&mut started, 1).await;

    // Hold the run's lock: the report (complete_and_claim) waits for it.
    let RunLock { locker, db, holder } =
        hold_run_lock(run, &gates, 1, "the report waits for the run lock").await;
    let first = blocked_by(&db, holder).await[0];
    let since = server_now(&db).await;
    db.execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    // The retry waits for the lock again, from another backend.
    assert!(
        eventually(Duration::from_secs(10), || async {
            blocked_by(&db, holder).await.iter().any(|p| *p != first)
        })
        .await,
        "the report is retried after its connection was killed"
    );
    assert!(
        lease_renewed_after(&db, run, since, 1.5 * LEASE.as_secs_f64()).await,
        "the lease of the unreported step is renewed while the report is retried"
    );
    locker.batch_execute("COMMIT").await.unwrap();

    let out: serde_json::Value = c.wait_for(run, Duration::from_secs(15)).await.unwrap();
    assert_eq!(out, json!({ "s": { "n": 1 } }));
    assert_eq!(step_row(&db, run).await.1, 1, "one attempt");
    shut(stop, handle).await;
}

/// C: steps that finished keep their leases until their completion has
/// landed, both the one in a report that waits (here on the run lock) and
/// the one queued behind it.
#[tokio::test]
async fn finished_steps_keep_their_leases_until_reported() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "queued", 1).await;
    let (gates, mut started) = Gates::new();
    let g = gates.clone();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .concurrency(2)
        .lease(LEASE)
        .handler(&wf, "s", move |ctx| g.clone().run(ctx))
        .build();
    let (stop, handle) = spawn(worker);
    let x = c
        .enqueue(&wf, &json!({ "n": 1 }), EnqueueOptions::default())
        .await
        .unwrap();
    let y = c
        .enqueue(&wf, &json!({ "n": 2 }), EnqueueOptions::default())
        .await
        .unwrap();
    recv_started(&mut started, 2).await;

    let RunLock { locker, db, .. } =
        hold_run_lock(x, &gates, 1, "x's report waits for the run lock").await;
    // y finishes while x's report is in flight: it waits for the next report.
    gates.open(2);
    assert!(
        eventually(Duration::from_secs(10), || async {
            gates.gate(2).available_permits() == 0
        })
        .await
    );
    let since = server_now(&db).await;
    assert!(
        lease_renewed_after(&db, y, since, 1.5 * LEASE.as_secs_f64()).await,
        "the lease of a completion queued behind a report is renewed"
    );
    assert!(
        lease_renewed_after(&db, x, since, 1.5 * LEASE.as_secs_f64()).await,
        "the lease of a completion in a report that waits is renewed"
    );
    locker.batch_execute("COMMIT").await.unwrap();
    for run in [x, y] {
        let _: serde_json::Value = c.wait_for(run, Duration::from_secs(15)).await.unwrap();
        assert_eq!(step_row(&db, run).await.1, 1, "one attempt");
    }
    shut(stop, handle).await;
}

/// B: after the shutdown signal, a step that finishes is reported at once,
/// not when the last running step ends or the grace period is over.
#[tokio::test]
async fn shutdown_reports_steps_as_they_finish() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "grace", 3).await;
    let (gates, mut started) = Gates::new();
    let g = gates.clone();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .concurrency(2)
        .shutdown_grace(Duration::from_secs(120))
        .handler(&wf, "s", move |ctx| g.clone().run(ctx))
        .build();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let (entered, entered_rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
        let _ = entered.send(());
    }));
    let x = c
        .enqueue(&wf, &json!({ "n": 1 }), EnqueueOptions::default())
        .await
        .unwrap();
    let y = c
        .enqueue(&wf, &json!({ "n": 2 }), EnqueueOptions::default())
        .await
        .unwrap();
    recv_started(&mut started, 2).await;
    stop.send(()).unwrap();
    entered_rx.await.unwrap(); // the worker is shutting down
    gates.open(1);
    let db = common::connect().await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            c.run(x).await.unwrap().status == "succeeded"
        })
        .await,
        "a step finished during the grace period is reported before the others end"
    );
    assert_eq!(step_row(&db, x).await.1, 1, "x ran once");
    assert_eq!(step_row(&db, y).await.0, "running", "y still runs");
    gates.open(2);
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("the worker stops once y is reported")
        .unwrap()
        .unwrap();
    let out: serde_json::Value = c.wait_for(y, Duration::from_secs(5)).await.unwrap();
    assert_eq!(out, json!({ "s": { "n": 2 } }));
    assert_eq!(step_row(&db, y).await.1, 1, "y ran once");
}

/// D: a worker without a handler for a step it claimed hands the step back
/// without using up an attempt; a worker with the handler then runs it.
#[tokio::test]
async fn a_step_without_a_handler_is_handed_back_without_an_attempt() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "nohandler", 1).await;
    let other = unique("other");
    let stranger = Worker::builder(&c)
        .queues([queue.clone()])
        .poll_interval(Duration::from_millis(100))
        .handler(&other, "s", |_ctx| async { Ok(()) })
        .build();
    let (stop, handle) = spawn(stranger);
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    // A claim started the run.
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.run(run).await.unwrap().status != "pending"
        })
        .await
    );
    shut(stop, handle).await;
    let db = common::connect().await;
    let (status, attempt, _, _) = step_row(&db, run).await;
    assert!(
        status == "ready" || status == "scheduled",
        "handed back, not failed: {status}"
    );
    assert_eq!(attempt, 0, "no attempt used");
    let attempts: i64 = db
        .query_one(
            "SELECT count(*) FROM baton.step_attempts WHERE workflow_id = $1",
            &[&run],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 0);

    let owner = Worker::builder(&c)
        .queues([queue.clone()])
        .poll_interval(Duration::from_millis(200))
        .handler(&wf, "s", |_ctx| async { Ok("mine") })
        .build();
    let (stop, handle) = spawn(owner);
    let out: serde_json::Value = c.wait_for(run, Duration::from_secs(30)).await.unwrap();
    assert_eq!(out, json!({ "s": "mine" }));
    assert_eq!(step_row(&db, run).await.1, 1);
    shut(stop, handle).await;
}

/// What an exactly-once handler's completion returned, for the test to check.
/// Err: (SQLSTATE, is_lease_lost, is_transient).
type Results = Arc<Mutex<Vec<Result<(), (Option<String>, bool, bool)>>>>;

/// E: in a REPEATABLE READ transaction, complete_in after the lease was
/// taken away (the row changed after the snapshot: 40001, not BT001) is
/// `Error::LeaseLost`.
#[tokio::test]
async fn repeatable_read_completion_after_the_lease_was_lost_is_lease_lost() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "rr_lost", 3).await;
    let (in_step_tx, in_step) = oneshot::channel::<()>();
    let (go_on_tx, go_on) = oneshot::channel::<()>();
    let in_step_tx = Arc::new(Mutex::new(Some(in_step_tx)));
    let go_on = Arc::new(tokio::sync::Mutex::new(Some(go_on)));
    let results: Results = Arc::default();
    let r = results.clone();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .lease(Duration::from_secs(60))
        .handler(&wf, "s", move |ctx| {
            let (r, in_step_tx, go_on) = (r.clone(), in_step_tx.clone(), go_on.clone());
            async move {
                let mut conn = ctx.client().pool().get().await?;
                let tx = conn
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .start()
                    .await?;
                tx.query_one("SELECT 1", &[]).await?; // the snapshot
                if let Some(s) = in_step_tx.lock().unwrap().take() {
                    let _ = s.send(());
                }
                if let Some(g) = go_on.lock().await.take() {
                    let _ = g.await;
                }
                let result = ctx.complete_in(&*tx, &json!({ "by": "worker" })).await;
                r.lock()
                    .unwrap()
                    .push(result.as_ref().map(|_| ()).map_err(|e| {
                        (
                            e.sqlstate().map(str::to_string),
                            e.is_lease_lost(),
                            e.is_transient(),
                        )
                    }));
                result.map_err(|e| baton::StepError::retryable(e.to_string()))?;
                tx.commit().await?;
                Ok(())
            }
        })
        .build();
    let (stop, handle) = spawn(worker);
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    in_step.await.unwrap();
    // Take the lease away (expire it and claim it in one transaction, so that
    // nobody else takes it first) and complete the step as the thief.
    let db = common::connect().await;
    db.batch_execute("BEGIN").await.unwrap();
    db.execute(
        "UPDATE baton.steps SET lease_expires_at = now() - interval '1 second' WHERE run_id = $1",
        &[&run],
    )
    .await
    .unwrap();
    let row = db
        .query_one(
            "SELECT step_id, lease_token FROM baton.claim_steps('thief', ARRAY[$1])",
            &[&queue],
        )
        .await
        .unwrap();
    db.batch_execute("COMMIT").await.unwrap();
    let (step_id, token): (i64, uuid::Uuid) = (row.get(0), row.get(1));
    db.query_one(
        "SELECT baton.complete_step($1, $2, '{\"by\": \"thief\"}')",
        &[&step_id, &token],
    )
    .await
    .unwrap();
    go_on_tx.send(()).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            !results.lock().unwrap().is_empty()
        })
        .await
    );
    assert_eq!(
        results.lock().unwrap()[0],
        Err((Some("BT001".to_string()), true, false)),
        "a lost lease, not a serialization failure"
    );
    let out: serde_json::Value = c.wait_for(run, Duration::from_secs(10)).await.unwrap();
    assert_eq!(out, json!({ "s": { "by": "thief" } }));
    shut(stop, handle).await;
}

/// E: in a REPEATABLE READ transaction, complete_in after the worker's own
/// heartbeat touched the step (the lease still held) stays a serialization
/// failure (40001, retryable): the handler retries its transaction and
/// completes.
#[tokio::test]
async fn repeatable_read_completion_after_a_heartbeat_stays_a_serialization_failure() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "rr_beat", 1).await;
    let results: Results = Arc::default();
    let r = results.clone();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .lease(Duration::from_millis(1500)) // a heartbeat every 500 ms
        .handler(&wf, "s", move |ctx| {
            let r = r.clone();
            async move {
                let mut conn = ctx.client().pool().get().await?;
                loop {
                    let tx = conn
                        .build_transaction()
                        .isolation_level(IsolationLevel::RepeatableRead)
                        .start()
                        .await?;
                    let first = r.lock().unwrap().is_empty();
                    // The snapshot, and the lease as it shows it.
                    let seen: f64 = tx
                        .query_one(
                            "SELECT extract(epoch FROM lease_expires_at)::float8 FROM baton.steps WHERE step_id = $1",
                            &[&ctx.step_id],
                        )
                        .await?
                        .get(0);
                    if first {
                        // Wait (on another connection) for a heartbeat.
                        let other = ctx.client().pool().get().await?;
                        loop {
                            let now: f64 = other
                                .query_one(
                                    "SELECT extract(epoch FROM lease_expires_at)::float8 FROM baton.steps WHERE step_id = $1",
                                    &[&ctx.step_id],
                                )
                                .await?
                                .get(0);
                            if now != seen {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    let result = ctx.complete_in(&*tx, &json!({ "ok": true })).await;
                    r.lock().unwrap().push(
                        result
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| {
                            (e.sqlstate().map(str::to_string), e.is_lease_lost(), e.is_transient())
                        }),
                    );
                    match result {
                        Ok(()) => {
                            tx.commit().await?;
                            return Ok(());
                        }
                        Err(e) if e.sqlstate() == Some("40001") && r.lock().unwrap().len() < 20 => {
                            drop(tx);
                            continue;
                        }
                        Err(e) => return Err(baton::StepError::fatal(e.to_string())),
                    }
                }
            }
        })
        .build();
    let (stop, handle) = spawn(worker);
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    let out: serde_json::Value = c.wait_for(run, Duration::from_secs(20)).await.unwrap();
    assert_eq!(out, json!({ "s": { "ok": true } }));
    let results = results.lock().unwrap().clone();
    assert_eq!(
        results[0],
        Err((Some("40001".to_string()), false, true)),
        "the lease is held: the serialization failure stays, retryable"
    );
    assert_eq!(results.last(), Some(&Ok(())));
    shut(stop, handle).await;
}
