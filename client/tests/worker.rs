//! The client crate against the test cluster: workers, shutdown, wake-ups,
//! heartbeats, exactly-once steps, checkpoints and typed errors.

mod common;

use baton::{Client, EnqueueOptions, Error, Step, StepError, Worker, WorkflowDef};
use common::{unique, url};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

async fn client() -> Client {
    Client::connect(&url()).await.expect("connect")
}

/// Stop a worker started by `spawn` and check it stopped cleanly.
async fn shut(stop: oneshot::Sender<()>, handle: tokio::task::JoinHandle<baton::Result<()>>) {
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

/// A one-step workflow on a queue of its own: (workflow, queue).
async fn one_step(c: &Client, prefix: &str, step: &str) -> (String, String) {
    let (wf, queue) = (unique(prefix), unique("q"));
    c.define_workflow(&WorkflowDef::new(&wf).queue(&queue).step(Step::new(step)))
        .await
        .unwrap();
    (wf, queue)
}

/// Start `worker` in the background; the returned sender stops it.
fn spawn(
    worker: Worker,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<baton::Result<()>>,
) {
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(worker.run_until(async {
        let _ = rx.await;
    }));
    (tx, handle)
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Order {
    id: u32,
}

#[tokio::test]
async fn two_workers_share_a_queue_and_finish_every_run() {
    let c = client().await;
    let wf = unique("shared");
    let queue = unique("q");
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("a"))
            .step(Step::new("b").after(["a"])),
    )
    .await
    .unwrap();
    let make = |name: &str| {
        let wf2 = wf.clone();
        Worker::builder(&c)
            .name(name)
            .queues([queue.clone()])
            .concurrency(3)
            .handler(&wf, "a", |ctx| async move {
                let order: Order = ctx.input()?;
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(order.id * 2)
            })
            .handler(&wf2, "b", |ctx| async move {
                let doubled: u32 = ctx.upstream("a")?;
                Ok(json!({ "result": doubled + 1 }))
            })
            .build()
    };
    let (stop1, h1) = spawn(make("w1"));
    let (stop2, h2) = spawn(make("w2"));
    let mut runs = Vec::new();
    for id in 0..30 {
        runs.push((
            id,
            c.enqueue(&wf, &Order { id }, EnqueueOptions::default())
                .await
                .unwrap(),
        ));
    }
    for (id, run) in runs {
        let out: serde_json::Value = c.wait_for(run, Duration::from_secs(30)).await.unwrap();
        assert_eq!(out, json!({ "b": { "result": id * 2 + 1 } }));
    }
    let conn = c.pool().get().await.unwrap();
    let workers: i64 = conn
        .query_one(
            "SELECT count(DISTINCT a.worker) FROM baton.step_attempts a JOIN baton.workflow_runs r ON r.id = a.workflow_id WHERE r.workflow = $1",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(workers, 2, "both workers took part");
    stop1.send(()).unwrap();
    stop2.send(()).unwrap();
    h1.await.unwrap().unwrap();
    h2.await.unwrap().unwrap();
}

/// More slots than one call may lease (`max_steps` is at most 1000): the
/// worker asks for 1000 at a time and still runs every step; and with
/// `durable_claims(true)` its claims take the plain, durable path.
#[tokio::test]
async fn a_worker_with_more_slots_than_one_claim_may_lease() {
    let c = client().await;
    for durable in [false, true] {
        let (wf, queue) = one_step(&c, "many_slots", "s").await;
        let worker = Worker::builder(&c)
            .queues([queue.clone()])
            .concurrency(1500)
            .durable_claims(durable)
            .poll_interval(Duration::from_millis(100))
            .handler(&wf, "s", |_ctx| async { Ok(json!({ "ok": true })) })
            .build();
        let (stop, handle) = spawn(worker);
        let mut runs = Vec::new();
        for _ in 0..5 {
            runs.push(
                c.enqueue(&wf, &json!({}), EnqueueOptions::default())
                    .await
                    .unwrap(),
            );
        }
        for run in runs {
            let out: serde_json::Value = c.wait_for(run, Duration::from_secs(10)).await.unwrap();
            assert_eq!(
                out,
                json!({ "s": { "ok": true } }),
                "durable_claims({durable})"
            );
        }
        shut(stop, handle).await;
    }
}

/// Shutdown lets a running step finish within the grace period.
#[tokio::test]
async fn graceful_shutdown_finishes_steps_in_flight() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "drain", "slow").await;
    let started = Arc::new(tokio::sync::Notify::new());
    let s2 = started.clone();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .shutdown_grace(Duration::from_secs(10))
        .handler(&wf, "slow", move |_ctx| {
            let s2 = s2.clone();
            async move {
                s2.notify_one();
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok("finished")
            }
        })
        .build();
    let (stop, handle) = spawn(worker);
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    started.notified().await;
    shut(stop, handle).await;
    let info = c.run(run).await.unwrap();
    assert_eq!(info.status, "succeeded");
    assert_eq!(info.output, Some(json!({ "slow": "finished" })));
}

/// A step still running when the grace period ends is handed back at once,
/// without using up an attempt, and another worker takes it.
#[tokio::test]
async fn shutdown_hands_back_steps_that_outlive_the_grace_period() {
    let c = client().await;
    let wf = unique("handback");
    let queue = unique("q");
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("stuck").max_attempts(1)),
    )
    .await
    .unwrap();
    let started = Arc::new(tokio::sync::Notify::new());
    let s2 = started.clone();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .shutdown_grace(Duration::from_millis(100))
        .handler(&wf, "stuck", move |_ctx| {
            let s2 = s2.clone();
            async move {
                s2.notify_one();
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        })
        .build();
    let (stop, handle) = spawn(worker);
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    started.notified().await;
    shut(stop, handle).await;

    let conn = c.pool().get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT status, attempt FROM baton.workflow_steps WHERE workflow_id = $1",
            &[&run],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("ready".to_string(), 0)
    );

    // max_attempts is 1, so only an uncounted hand-back lets this succeed.
    let rescuer = Worker::builder(&c)
        .queues([queue.clone()])
        .handler(&wf, "stuck", |_ctx| async { Ok("rescued") })
        .build();
    let (stop, handle) = spawn(rescuer);
    let out: serde_json::Value = c.wait_for(run, Duration::from_secs(10)).await.unwrap();
    assert_eq!(out, json!({ "stuck": "rescued" }));
    shut(stop, handle).await;
}

/// An idle worker that polls only every 60 s starts a new step within a
/// fraction of a second: NOTIFY woke it.
#[tokio::test]
async fn notify_wakes_an_idle_worker_long_before_it_would_poll() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "wake", "s").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .poll_interval(Duration::from_secs(60))
        .handler(&wf, "s", move |_ctx| {
            let _ = tx.send(Instant::now());
            async { Ok(()) }
        })
        .build();
    let (stop, handle) = spawn(worker);
    tokio::time::sleep(Duration::from_millis(500)).await; // idle, listening
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        c.enqueue(&wf, &json!({}), EnqueueOptions::default())
            .await
            .unwrap();
        let started = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        latencies.push(started - t0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies.sort();
    let median = latencies[2];
    assert!(
        median < Duration::from_secs(2),
        "median wake-up {median:?} vs a 60 s poll interval"
    );
    shut(stop, handle).await;
}

/// A step that runs three times longer than its lease survives on heartbeats:
/// one attempt, no lease lost.
#[tokio::test]
async fn heartbeats_keep_a_long_step_alive() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "long", "long").await;
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .lease(Duration::from_millis(1500))
        .handler(&wf, "long", |_ctx| async {
            tokio::time::sleep(Duration::from_millis(4500)).await;
            Ok("done")
        })
        .build();
    let (stop, handle) = spawn(worker);
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    let _: serde_json::Value = c.wait_for(run, Duration::from_secs(10)).await.unwrap();
    let conn = c.pool().get().await.unwrap();
    let outcomes: Vec<String> = conn
        .query(
            "SELECT outcome FROM baton.step_attempts WHERE workflow_id = $1",
            &[&run],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(outcomes, vec!["succeeded".to_string()]);
    shut(stop, handle).await;
}

/// Exactly-once: the handler writes and completes in one transaction; the
/// lease is taken away mid-step, so its write rolls back with the completion.
#[tokio::test]
async fn transactional_step_rolls_back_when_its_lease_is_lost() {
    let c = client().await;
    let wf = unique("tx");
    let queue = unique("q");
    let table = unique("charges");
    let conn = c.pool().get().await.unwrap();
    conn.batch_execute(&format!("CREATE TABLE {table} (run_id uuid, attempt int)"))
        .await
        .unwrap();
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("charge")),
    )
    .await
    .unwrap();

    let (in_step_tx, in_step) = oneshot::channel::<()>();
    let (go_on_tx, go_on) = oneshot::channel::<()>();
    let in_step_tx = Arc::new(std::sync::Mutex::new(Some(in_step_tx)));
    let go_on = Arc::new(tokio::sync::Mutex::new(Some(go_on)));
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (t, r) = (table.clone(), results.clone());
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .lease(Duration::from_secs(60)) // heartbeats will not notice in time
        .handler(&wf, "charge", move |ctx| {
            let (t, r, in_step_tx, go_on) =
                (t.clone(), r.clone(), in_step_tx.clone(), go_on.clone());
            async move {
                let mut conn = ctx.client().pool().get().await?;
                let tx = conn.transaction().await?;
                tx.execute(
                    &format!("INSERT INTO {t} VALUES ($1, $2)"),
                    &[&ctx.run_id, &ctx.attempt],
                )
                .await?;
                if let Some(s) = in_step_tx.lock().unwrap().take() {
                    let _ = s.send(());
                }
                if let Some(g) = go_on.lock().await.take() {
                    let _ = g.await;
                }
                let result = ctx.complete_in(&*tx, &json!({"charged": true})).await;
                r.lock().unwrap().push(
                    result
                        .as_ref()
                        .map_err(|e| e.sqlstate().map(str::to_string))
                        .map(|_| ()),
                );
                result.map_err(|e| StepError::retryable(e.to_string()))?;
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

    // Take the lease away: expire it and claim the step from another session,
    // in one transaction so that nobody else (the worker's own next claim, the
    // background worker) can take the expired lease first.
    tokio::time::sleep(Duration::from_millis(200)).await; // let the worker go idle
    conn.batch_execute("BEGIN").await.unwrap();
    conn.execute(
        "UPDATE baton.steps SET lease_expires_at = now() - interval '1 second' WHERE run_id = $1",
        &[&run],
    )
    .await
    .unwrap();
    let row = conn
        .query_one(
            "SELECT step_id, lease_token FROM baton.claim_steps('thief', ARRAY[$1])",
            &[&queue],
        )
        .await
        .unwrap();
    conn.batch_execute("COMMIT").await.unwrap();
    let (step_id, token): (i64, uuid::Uuid) = (row.get(0), row.get(1));
    conn.query_one(
        "SELECT baton.complete_step($1, $2, '{\"by\": \"thief\"}')",
        &[&step_id, &token],
    )
    .await
    .unwrap();
    go_on_tx.send(()).unwrap();

    let out: serde_json::Value = c.wait_for(run, Duration::from_secs(10)).await.unwrap();
    assert_eq!(out, json!({"charge": {"by": "thief"}}));
    // Wait for the handler to report, then check nothing of it stayed.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            !results.lock().unwrap().is_empty()
        })
        .await
    );
    assert_eq!(results.lock().unwrap()[0], Err(Some("BT001".to_string())));
    let rows: i64 = conn
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the lost attempt's write rolled back");
    shut(stop, handle).await;
}

/// ctx.checkpoint runs its closure once: the attempt after a crash (here a
/// panic, which fails the attempt but not the worker) replays the saved result.
#[tokio::test]
async fn checkpoints_replay_after_a_crashed_attempt() {
    let c = client().await;
    let wf = unique("ckpt");
    let queue = unique("q");
    c.define_workflow(&WorkflowDef::new(&wf).queue(&queue).step(
        Step::new("pay").max_attempts(3).backoff(baton::Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(50),
            multiplier: 1.0,
        }),
    ))
    .await
    .unwrap();
    let charges = Arc::new(AtomicUsize::new(0));
    let ch = charges.clone();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .poll_interval(Duration::from_millis(100))
        .handler(&wf, "pay", move |ctx| {
            let ch = ch.clone();
            async move {
                let receipt: String = ctx
                    .checkpoint("charge", || async {
                        let n = ch.fetch_add(1, Ordering::SeqCst) + 1;
                        Ok(format!("receipt-{n}"))
                    })
                    .await?;
                if ctx.attempt == 1 {
                    panic!("crash after charging");
                }
                Ok(json!({ "receipt": receipt, "attempt": ctx.attempt }))
            }
        })
        .build();
    let (stop, handle) = spawn(worker);
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    let out: serde_json::Value = c.wait_for(run, Duration::from_secs(10)).await.unwrap();
    assert_eq!(out, json!({"pay": {"receipt": "receipt-1", "attempt": 2}}));
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "the checkpointed closure ran once"
    );
    let conn = c.pool().get().await.unwrap();
    let err: String = conn
        .query_one(
            "SELECT error FROM baton.step_attempts WHERE workflow_id = $1 AND attempt = 1",
            &[&run],
        )
        .await
        .unwrap()
        .get(0);
    assert!(err.contains("crash after charging"), "{err}");
    shut(stop, handle).await;
}

/// Bad input surfaces as typed errors that keep their SQLSTATE.
#[tokio::test]
async fn errors_are_typed() {
    let c = client().await;
    let err = c
        .enqueue(&unique("missing"), &json!({}), EnqueueOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    assert_eq!(err.sqlstate(), Some("42704"));

    let bad = WorkflowDef::new(unique("bad")).step(Step::new("a").after(["nope"]));
    let err = c.define_workflow(&bad).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    assert_eq!(err.sqlstate(), Some("22023"));
    assert!(err.to_string().contains("nope"));

    let err = c.cancel(uuid::Uuid::new_v4()).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)));

    // A run's output read as the wrong type is a JSON error, not a panic.
    let (wf, queue) = one_step(&c, "typed", "s").await;
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .handler(&wf, "s", |_| async { Ok("text") })
        .build();
    let (stop, handle) = spawn(worker);
    let err = c
        .wait_for::<Vec<u32>>(run, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Json(_)), "{err:?}");

    // A lease that is not held.
    let conn = c.pool().get().await.unwrap();
    let e = conn
        .query_one("SELECT baton.heartbeat(-1, gen_random_uuid())", &[])
        .await
        .unwrap_err();
    assert!(Error::from(e).is_lease_lost());

    // A failed run is an error carrying the step's message.
    let wf2 = unique("fails");
    c.define_workflow(&WorkflowDef::new(&wf2).queue(&queue).step(Step::new("s")))
        .await
        .unwrap();
    shut(stop, handle).await;
    let worker = Worker::builder(&c)
        .queues([queue.clone()])
        .handler(&wf2, "s", |_| async {
            Err::<(), _>(StepError::fatal("card declined"))
        })
        .build();
    let (stop, handle) = spawn(worker);
    let run = c
        .enqueue(&wf2, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    match c
        .wait_for::<serde_json::Value>(run, Duration::from_secs(10))
        .await
    {
        Err(Error::RunFailed { error, .. }) => assert!(error.contains("card declined"), "{error}"),
        other => panic!("expected RunFailed, got {other:?}"),
    }
    shut(stop, handle).await;
}

/// enqueue_in: the run exists if and only if the caller's transaction commits.
#[tokio::test]
async fn enqueue_inside_the_callers_transaction() {
    let c = client().await;
    let wf = unique("intx");
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(unique("q"))
            .step(Step::new("s")),
    )
    .await
    .unwrap();
    let mut conn = c.pool().get().await.unwrap();

    let tx = conn.transaction().await.unwrap();
    let gone = baton::enqueue_in(&*tx, &wf, &json!({"n": 1}), EnqueueOptions::default())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(matches!(c.run(gone).await, Err(Error::NotFound(_))));

    let tx = conn.transaction().await.unwrap();
    let kept = baton::enqueue_in(
        &*tx,
        &wf,
        &json!({"n": 2}),
        EnqueueOptions::default().idempotency_key("k").priority(5),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(c.run(kept).await.unwrap().status, "pending");
    let again = c
        .enqueue(
            &wf,
            &json!({"n": 3}),
            EnqueueOptions::default().idempotency_key("k"),
        )
        .await
        .unwrap();
    assert_eq!(again, kept);
}
