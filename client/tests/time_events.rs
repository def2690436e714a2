//! Time and events (pg_baton 0.3.0) through the client crate, against the
//! test cluster: the step kinds the database runs (sleep, sleep_until,
//! wait_event, workflow, map) end to end with real workers, handlers that
//! sleep or wait for an event without holding a slot, run events, cron
//! schedules and deadlines. Every test has workflows and queues of its own.

mod common;

use baton::{
    send_event_in, Client, EnqueueOptions, Error, Overlap, ScheduleOptions, Step, StepError,
    Worker, WorkflowDef,
};
use common::{eventually, unique, url};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

async fn client() -> Client {
    Client::connect(&url()).await.expect("connect")
}

type Running = (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<baton::Result<()>>,
);

/// Start `worker` in the background; `shut` stops it.
fn spawn(worker: Worker) -> Running {
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(worker.run_until(async {
        let _ = rx.await;
    }));
    (tx, handle)
}

async fn shut((stop, handle): Running) {
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

/// A worker of `queue` that polls often (the background worker makes
/// waiting steps ready every 200 ms on the test cluster).
fn worker(c: &Client, queue: &str) -> baton::WorkerBuilder {
    Worker::builder(c)
        .queues([queue.to_string()])
        .poll_interval(Duration::from_millis(100))
        .lease(Duration::from_secs(10))
}

/// A workflow of one task step "s" on a queue of its own: (workflow, queue).
async fn one_step(c: &Client, prefix: &str) -> (String, String) {
    let (wf, queue) = (unique(prefix), unique("q"));
    c.define_workflow(&WorkflowDef::new(&wf).queue(&queue).step(Step::new("s")))
        .await
        .unwrap();
    (wf, queue)
}

/// A run of `wf` with input {}.
async fn start(c: &Client, wf: &str) -> Uuid {
    c.enqueue(wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap()
}

async fn step_row(c: &Client, run: Uuid, step: &str) -> Option<(String, Option<Value>)> {
    let conn = c.pool().get().await.unwrap();
    conn.query_opt(
        "SELECT status, output FROM baton.workflow_steps WHERE workflow_id = $1 AND step = $2 \
         ORDER BY step_id LIMIT 1",
        &[&run, &step],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1)))
}

async fn step_status(c: &Client, run: Uuid, step: &str) -> String {
    step_row(c, run, step)
        .await
        .map(|(s, _)| s)
        .unwrap_or_default()
}

/// Wait until step `step` of `run` has status `status`.
async fn until_status(c: &Client, run: Uuid, step: &str, status: &str) {
    let ok = eventually(WAIT, || async { step_status(c, run, step).await == status }).await;
    assert!(
        ok,
        "step {step} of {run} never became {status} (it is {})",
        step_status(c, run, step).await
    );
}

/// A timestamp `from_now` ahead, as PostgreSQL writes timestamptz text.
async fn db_time_text(c: &Client, from_now: Duration) -> String {
    let conn = c.pool().get().await.unwrap();
    conn.query_one(
        "SELECT (now() + make_interval(secs => $1))::text",
        &[&from_now.as_secs_f64()],
    )
    .await
    .unwrap()
    .get(0)
}

// ---------------------------------------------------------------------------
// Step kinds of a definition
// ---------------------------------------------------------------------------

/// A sleep step between two task steps: the second runs after the sleep,
/// and the sleep's output is null.
#[tokio::test]
async fn a_sleep_step_delays_what_follows() {
    let c = client().await;
    let (wf, queue) = (unique("sleep_step"), unique("q"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("a"))
            .step(Step::sleep("nap", Duration::from_millis(400)).after(["a"]))
            .step(Step::new("b").after(["nap"])),
    )
    .await
    .unwrap();
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "a", |_ctx| async move {
                Ok(SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64)
            })
            .handler(&wf, "b", |ctx| async move {
                let a_done: u64 = ctx.upstream("a").unwrap_or(0);
                let nap: Value = ctx.upstream("nap")?;
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64;
                Ok(json!({ "nap": nap, "waited_ms": now.saturating_sub(a_done) }))
            })
            .build(),
    );
    let started = Instant::now();
    let run = start(&c, &wf).await;
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(out["nap"], Value::Null, "a sleep step's output is null");
    assert_eq!(step_row(&c, run, "nap").await.unwrap().0, "succeeded");
    shut(w).await;
}

/// A sleep_until step waits for the time found in the run's input; a time
/// in the past passes at once, a missing one fails the step.
#[tokio::test]
async fn a_sleep_until_step_waits_for_the_time_in_the_input() {
    let c = client().await;
    let (wf, queue) = (unique("sleep_until"), unique("q"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::sleep_until("later", "$.input.send_at"))
            .step(Step::new("send").after(["later"])),
    )
    .await
    .unwrap();
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "send", |_ctx| async move { Ok("sent") })
            .build(),
    );
    let at = db_time_text(&c, Duration::from_millis(500)).await;
    let started = Instant::now();
    let run = c
        .enqueue(&wf, &json!({ "send_at": at }), EnqueueOptions::default())
        .await
        .unwrap();
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(400), "it waited");
    assert_eq!(out, json!({ "send": "sent" }));

    // a time in the past: at once
    let past = db_time_text(&c, Duration::ZERO).await;
    let run = c
        .enqueue(&wf, &json!({ "send_at": past }), EnqueueOptions::default())
        .await
        .unwrap();
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert_eq!(out, json!({ "send": "sent" }));
    // no timestamp there: the step fails
    let run = start(&c, &wf).await;
    match c.wait_for::<Value>(run, WAIT).await {
        Err(Error::RunFailed { error, .. }) => {
            assert!(
                error.contains("send_at"),
                "the error names the path: {error}"
            )
        }
        other => panic!("expected a failed run, got {other:?}"),
    }
    shut(w).await;
}

/// A wait_event step waits (status `waiting`), `send_event` completes it
/// (true) and the next step gets the payload as the step's output.
#[tokio::test]
async fn a_wait_event_step_succeeds_with_the_events_payload() {
    let c = client().await;
    let (wf, queue) = (unique("wait_step"), unique("q"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::wait_event("approval", "approved").timeout(Duration::from_secs(60)))
            .step(Step::new("ship").after(["approval"])),
    )
    .await
    .unwrap();
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "ship", |ctx| async move {
                let approval: Value = ctx.upstream("approval")?;
                Ok(json!({ "shipped_by": approval["by"] }))
            })
            .build(),
    );
    let run = start(&c, &wf).await;
    until_status(&c, run, "approval", "waiting").await;
    // another name: kept, completes nothing
    assert!(!c.send_event(run, "rejected", &json!({})).await.unwrap());
    assert!(c
        .send_event(run, "approved", &json!({ "by": "ada" }))
        .await
        .unwrap());
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert_eq!(out, json!({ "ship": { "shipped_by": "ada" } }));
    assert_eq!(
        step_row(&c, run, "approval").await.unwrap().1,
        Some(json!({ "by": "ada" }))
    );
    // a finished run keeps an event, and says false
    assert!(!c.send_event(run, "approved", &json!(1)).await.unwrap());
    // an unknown run
    match c.send_event(Uuid::new_v4(), "approved", &json!(1)).await {
        Err(e @ Error::NotFound(_)) => assert_eq!(e.sqlstate(), Some("42704")),
        other => panic!("expected NotFound, got {other:?}"),
    }
    shut(w).await;
}

/// An event sent before its step is reached is kept: the step, once
/// reached, consumes it at once.
#[tokio::test]
async fn an_event_sent_early_is_kept_for_the_step() {
    let c = client().await;
    let (wf, queue) = (unique("early_event"), unique("q"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("first"))
            .step(Step::wait_event("approval", "approved").after(["first"])),
    )
    .await
    .unwrap();
    let run = start(&c, &wf).await;
    // no worker yet: "first" has not run, nothing waits
    assert!(!c
        .send_event(run, "approved", &json!("early"))
        .await
        .unwrap());
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "first", |_ctx| async move { Ok(1) })
            .build(),
    );
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert_eq!(out, json!({ "approval": "early" }));
    shut(w).await;
}

/// `send_event_in` inside the caller's transaction: a rollback sends nothing.
#[tokio::test]
async fn send_event_in_follows_the_callers_transaction() {
    let c = client().await;
    let (wf, queue) = (unique("event_tx"), unique("q"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::wait_event("approval", "approved")),
    )
    .await
    .unwrap();
    let run = start(&c, &wf).await;
    until_status(&c, run, "approval", "waiting").await;
    let mut conn = c.pool().get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    assert!(send_event_in(&*tx, run, "approved", &json!("no"))
        .await
        .unwrap());
    tx.rollback().await.unwrap();
    assert_eq!(step_status(&c, run, "approval").await, "waiting");
    let tx = conn.transaction().await.unwrap();
    assert!(send_event_in(&*tx, run, "approved", &json!("yes"))
        .await
        .unwrap());
    tx.commit().await.unwrap();
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert_eq!(out, json!({ "approval": "yes" }));
}

/// A wait_event step's timeout: `continue` succeeds with null, `fail` fails
/// the attempt (here the last one).
#[tokio::test]
async fn a_wait_event_step_times_out() {
    let c = client().await;
    let (wf_continue, wf_fail, queue) = (unique("timeout_go"), unique("timeout_fail"), unique("q"));
    c.define_workflow(
        &WorkflowDef::new(&wf_continue)
            .queue(&queue)
            .step(
                Step::wait_event("approval", "approved")
                    .timeout(Duration::from_millis(300))
                    .on_timeout_continue(),
            )
            .step(Step::new("after").after(["approval"])),
    )
    .await
    .unwrap();
    c.define_workflow(
        &WorkflowDef::new(&wf_fail).queue(&queue).step(
            Step::wait_event("approval", "approved")
                .timeout(Duration::from_millis(300))
                .max_attempts(1),
        ),
    )
    .await
    .unwrap();
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf_continue, "after", |ctx| async move {
                let approval: Value = ctx.upstream("approval")?;
                Ok(json!({ "approval_was": approval }))
            })
            .build(),
    );
    let go = c
        .enqueue(&wf_continue, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    let fail = c
        .enqueue(&wf_fail, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    let out: Value = c.wait_for(go, WAIT).await.unwrap();
    assert_eq!(out, json!({ "after": { "approval_was": null } }));
    assert!(matches!(
        c.wait_for::<Value>(fail, WAIT).await,
        Err(Error::RunFailed { .. })
    ));
    shut(w).await;
}

/// A workflow step starts a child run and succeeds with its output; the
/// child's input is the parent's input and upstream outputs.
#[tokio::test]
async fn a_workflow_step_runs_a_child_workflow() {
    let c = client().await;
    let (parent, child, queue) = (unique("parent"), unique("child"), unique("q"));
    c.define_workflow(
        &WorkflowDef::new(&child)
            .queue(&queue)
            .step(Step::new("double")),
    )
    .await
    .unwrap();
    c.define_workflow(
        &WorkflowDef::new(&parent)
            .queue(&queue)
            .step(Step::new("prepare"))
            .step(Step::workflow("pay", &child).after(["prepare"]))
            .step(Step::new("done").after(["pay"])),
    )
    .await
    .unwrap();
    let w = spawn(
        worker(&c, &queue)
            .handler(&parent, "prepare", |_ctx| async move { Ok(21) })
            .handler(&child, "double", |ctx| async move {
                let doc: Value = ctx.input()?;
                let n = doc["upstream"]["prepare"].as_i64().unwrap_or(0);
                Ok(json!({ "amount": n * 2, "order": doc["input"]["order"] }))
            })
            .handler(&parent, "done", |ctx| async move {
                let paid: Value = ctx.upstream("pay")?;
                Ok(paid)
            })
            .build(),
    );
    let run = c
        .enqueue(&parent, &json!({ "order": 7 }), EnqueueOptions::default())
        .await
        .unwrap();
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert_eq!(
        out,
        json!({ "done": { "double": { "amount": 42, "order": 7 } } })
    );
    let conn = c.pool().get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT parent_step, status FROM baton.workflow_runs WHERE parent_id = $1",
            &[&run],
        )
        .await
        .unwrap();
    let (step, status): (String, String) = (row.get(0), row.get(1));
    assert_eq!((step.as_str(), status.as_str()), ("pay", "succeeded"));
    shut(w).await;
}

/// A map step over 50 elements: each item is claimed by the worker with its
/// index and element, and the map's output is the items' outputs in order.
#[tokio::test]
async fn a_map_step_over_fifty_items_keeps_their_order() {
    let c = client().await;
    let (wf, queue) = (unique("map"), unique("q"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("config"))
            .step(Step::new("split"))
            .step(Step::map("each", "split").after(["config"]).max_attempts(3))
            .step(Step::new("total").after(["each"])),
    )
    .await
    .unwrap();
    let items_run = Arc::new(AtomicUsize::new(0));
    let seen = items_run.clone();
    let w = spawn(
        worker(&c, &queue)
            .concurrency(8)
            .handler(
                &wf,
                "config",
                |_ctx| async move { Ok(json!({ "factor": 10 })) },
            )
            .handler(&wf, "split", |_ctx| async move {
                Ok((0..50).map(|i| json!({ "n": i })).collect::<Vec<_>>())
            })
            .handler(&wf, "each", move |ctx| {
                let seen = seen.clone();
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let index = ctx
                        .map_index()
                        .ok_or_else(|| StepError::fatal("not a map item"))?;
                    let item: Value = ctx.map_item()?;
                    if item["n"] != json!(index) {
                        return Err(StepError::fatal(format!("item {item} at {index}")));
                    }
                    let config: Value = ctx.upstream("config")?;
                    // the source step is not in an item's upstream
                    if ctx.upstream::<Value>("split").is_ok() {
                        return Err(StepError::fatal("split in the upstream"));
                    }
                    Ok(item["n"].as_i64().unwrap() * config["factor"].as_i64().unwrap())
                }
            })
            .handler(&wf, "total", |ctx| async move {
                let each: Vec<i64> = ctx.upstream("each")?;
                Ok(each)
            })
            .build(),
    );
    let run = start(&c, &wf).await;
    let out: Value = c.wait_for(run, Duration::from_secs(60)).await.unwrap();
    let expected: Vec<i64> = (0..50).map(|i| i * 10).collect();
    assert_eq!(out, json!({ "total": expected }));
    assert_eq!(items_run.load(Ordering::SeqCst), 50, "each item ran once");
    shut(w).await;
}

/// A map over an empty array succeeds at once with `[]`; ordinary steps see
/// no map index.
#[tokio::test]
async fn a_map_over_nothing_is_an_empty_array() {
    let c = client().await;
    let (wf, queue) = (unique("map_empty"), unique("q"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("split"))
            .step(Step::map("each", "split"))
            .step(Step::new("total").after(["each"])),
    )
    .await
    .unwrap();
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "split", |ctx| async move {
                if ctx.map_index().is_some() || ctx.map_item::<Value>().is_ok() {
                    return Err(StepError::fatal("an ordinary step is no map item"));
                }
                Ok(Vec::<i32>::new())
            })
            .handler(&wf, "each", |_ctx| async move {
                Err::<Value, _>(StepError::fatal("no item expected"))
            })
            .handler(
                &wf,
                "total",
                |ctx| async move { ctx.upstream::<Value>("each") },
            )
            .build(),
    );
    let run = start(&c, &wf).await;
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert_eq!(out, json!({ "total": [] }));
    shut(w).await;
}

// ---------------------------------------------------------------------------
// Handlers that sleep and wait
// ---------------------------------------------------------------------------

/// `ctx.sleep` suspends the step and the handler runs again after it: the
/// code before the sleep (in a checkpoint) ran once, the run finishes.
#[tokio::test]
async fn ctx_sleep_suspends_and_resumes_the_handler() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "ctx_sleep").await;
    let charged = Arc::new(AtomicUsize::new(0));
    let executions = Arc::new(AtomicUsize::new(0));
    let (charged2, executions2) = (charged.clone(), executions.clone());
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "s", move |ctx| {
                let (charged, executions) = (charged2.clone(), executions2.clone());
                async move {
                    executions.fetch_add(1, Ordering::SeqCst);
                    let receipt: String = ctx
                        .checkpoint("charge", || async {
                            charged.fetch_add(1, Ordering::SeqCst);
                            Ok(format!("receipt-{}", ctx.attempt))
                        })
                        .await?;
                    ctx.sleep(Duration::from_millis(300)).await?;
                    Ok(json!({ "receipt": receipt, "attempt": ctx.attempt }))
                }
            })
            .build(),
    );
    let started = Instant::now();
    let run = start(&c, &wf).await;
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300), "it slept");
    assert_eq!(
        charged.load(Ordering::SeqCst),
        1,
        "the code before the sleep ran once"
    );
    assert!(
        executions.load(Ordering::SeqCst) >= 2,
        "the handler ran again after the sleep"
    );
    // suspending uses no attempt
    assert_eq!(out["s"], json!({ "receipt": "receipt-1", "attempt": 1 }));
    let conn = c.pool().get().await.unwrap();
    let failed: i64 = conn
        .query_one(
            "SELECT count(*) FROM baton.step_attempts WHERE workflow_id = $1 AND outcome <> 'succeeded'",
            &[&run],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed, 0, "no failed attempt recorded");
    shut(w).await;
}

/// Two sleeps in a row: each wakes once, in order.
#[tokio::test]
async fn ctx_sleep_twice_in_one_handler() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "ctx_sleep2").await;
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "s", |ctx| async move {
                ctx.sleep(Duration::from_millis(200)).await?;
                ctx.sleep(Duration::ZERO).await?; // no suspension at all
                ctx.sleep(Duration::from_millis(200)).await?;
                Ok("slept twice")
            })
            .build(),
    );
    let started = Instant::now();
    let run = start(&c, &wf).await;
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(out, json!({ "s": "slept twice" }));
    shut(w).await;
}

/// A step sleeping for a month holds no worker slot: a worker of one slot
/// runs other steps meanwhile.
#[tokio::test]
async fn a_long_sleep_holds_no_worker_slot() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "month").await;
    let w = spawn(
        worker(&c, &queue)
            .concurrency(1)
            .handler(&wf, "s", |ctx| async move {
                let input: Value = ctx.input()?;
                if input["sleep"] == json!(true) {
                    ctx.sleep(Duration::from_secs(30 * 86400)).await?;
                }
                Ok("done")
            })
            .build(),
    );
    let sleeper = c
        .enqueue(&wf, &json!({ "sleep": true }), EnqueueOptions::default())
        .await
        .unwrap();
    until_status(&c, sleeper, "s", "waiting").await;
    for _ in 0..3 {
        let run = c
            .enqueue(&wf, &json!({ "sleep": false }), EnqueueOptions::default())
            .await
            .unwrap();
        let out: Value = c.wait_for(run, WAIT).await.unwrap();
        assert_eq!(out, json!({ "s": "done" }));
    }
    let conn = c.pool().get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT status, lease_expires_at IS NULL, wake_at > now() + interval '29 days' \
             FROM baton.workflow_steps WHERE workflow_id = $1",
            &[&sleeper],
        )
        .await
        .unwrap();
    let (status, no_lease, wakes_late): (String, bool, Option<bool>) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(status, "waiting");
    assert!(no_lease, "the lease was given back");
    assert_eq!(wakes_late, Some(true), "it wakes in a month");
    assert!(c.cancel(sleeper).await.unwrap());
    shut(w).await;
}

/// `ctx.wait_event` gets the payload sent by `send_event`; the code before
/// the wait ran once.
#[tokio::test]
async fn ctx_wait_event_gets_the_event_sent() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "ctx_wait").await;
    let before = Arc::new(AtomicUsize::new(0));
    let before2 = before.clone();
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "s", move |ctx| {
                let before = before2.clone();
                async move {
                    ctx.checkpoint("before", || async {
                        Ok(before.fetch_add(1, Ordering::SeqCst))
                    })
                    .await?;
                    let approval: Option<Value> = ctx
                        .wait_event("approved", Some(Duration::from_secs(60)))
                        .await?;
                    Ok(json!({ "approval": approval }))
                }
            })
            .build(),
    );
    let run = start(&c, &wf).await;
    until_status(&c, run, "s", "waiting").await;
    assert!(c
        .send_event(run, "approved", &json!({ "by": "grace" }))
        .await
        .unwrap());
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert_eq!(out, json!({ "s": { "approval": { "by": "grace" } } }));
    assert_eq!(before.load(Ordering::SeqCst), 1);
    shut(w).await;
}

/// An event sent before the handler waits is delivered at once.
#[tokio::test]
async fn ctx_wait_event_takes_an_event_sent_before() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "ctx_wait_early").await;
    let run = start(&c, &wf).await;
    assert!(!c.send_event(run, "go", &json!(5)).await.unwrap());
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "s", |ctx| async move {
                let n: Option<i64> = ctx.wait_event("go", None).await?;
                Ok(n)
            })
            .build(),
    );
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert_eq!(out, json!({ "s": 5 }));
    shut(w).await;
}

/// `ctx.wait_event` with a timeout and no event: None.
#[tokio::test]
async fn ctx_wait_event_times_out_with_none() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "ctx_wait_timeout").await;
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "s", |ctx| async move {
                let got: Option<Value> = ctx
                    .wait_event("never", Some(Duration::from_millis(300)))
                    .await?;
                Ok(json!({ "timed_out": got.is_none() }))
            })
            .build(),
    );
    let started = Instant::now();
    let run = start(&c, &wf).await;
    let out: Value = c.wait_for(run, WAIT).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(out, json!({ "s": { "timed_out": true } }));
    shut(w).await;
}

// ---------------------------------------------------------------------------
// Values a run publishes
// ---------------------------------------------------------------------------

/// set_event / get_event, and wait_event_value woken by the notification
/// (or timing out).
#[tokio::test]
async fn set_get_and_wait_for_event_values() {
    let c = client().await;
    let (wf, _queue) = one_step(&c, "values").await;
    let run = start(&c, &wf).await;
    assert_eq!(c.get_event::<Value>(run, "progress").await.unwrap(), None);
    match c
        .wait_event_value::<Value>(run, "progress", Duration::from_millis(300))
        .await
    {
        Err(Error::EventTimeout { run_id, key }) => {
            assert_eq!((run_id, key.as_str()), (run, "progress"))
        }
        other => panic!("expected EventTimeout, got {other:?}"),
    }

    let setter = {
        let c = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c.set_event(run, "other", &json!("x")).await.unwrap();
            c.set_event(run, "progress", &json!({ "pct": 50 }))
                .await
                .unwrap();
        })
    };
    let started = Instant::now();
    let got: Value = c
        .wait_event_value(run, "progress", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got, json!({ "pct": 50 }));
    assert!(started.elapsed() < Duration::from_secs(5));
    setter.await.unwrap();

    // the latest wins; a value already there is returned at once
    c.set_event(run, "progress", &json!({ "pct": 100 }))
        .await
        .unwrap();
    let now: Value = c
        .wait_event_value(run, "progress", Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(now, json!({ "pct": 100 }));
    assert_eq!(
        c.get_event::<Value>(run, "progress").await.unwrap(),
        Some(json!({ "pct": 100 }))
    );
    // a JSON null is a value too
    c.set_event(run, "nothing", &Value::Null).await.unwrap();
    assert_eq!(
        c.get_event::<Value>(run, "nothing").await.unwrap(),
        Some(Value::Null)
    );
    assert!(matches!(
        c.set_event(Uuid::new_v4(), "k", &json!(1)).await,
        Err(Error::NotFound(_))
    ));
}

/// A handler publishes progress with `ctx.client().set_event` while its run
/// goes on; the caller waits for it.
#[tokio::test]
async fn a_handler_publishes_a_value_the_caller_waits_for() {
    let c = client().await;
    let (wf, queue) = one_step(&c, "publish").await;
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "s", |ctx| async move {
                ctx.client()
                    .set_event(ctx.run_id, "status", &json!("half way"))
                    .await
                    .map_err(|e| StepError::retryable(e.to_string()))?;
                Ok("done")
            })
            .build(),
    );
    let run = start(&c, &wf).await;
    let status: String = c
        .wait_event_value(run, "status", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(status, "half way");
    let _: Value = c.wait_for(run, WAIT).await.unwrap();
    shut(w).await;
}

// ---------------------------------------------------------------------------
// Schedules and deadlines
// ---------------------------------------------------------------------------

#[tokio::test]
async fn schedules_are_created_listed_replaced_and_removed() {
    let c = client().await;
    let (wf, name) = (unique("nightly_wf"), unique("nightly"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(unique("q"))
            .step(Step::new("s")),
    )
    .await
    .unwrap();
    c.schedule(
        &name,
        "0 2 * * *",
        &wf,
        ScheduleOptions::default()
            .input(json!({ "report": "daily" }))
            .timezone("Europe/Paris")
            .overlap(Overlap::Skip),
    )
    .await
    .unwrap();
    let all = c.schedules().await.unwrap();
    let s = all
        .iter()
        .find(|s| s.name == name)
        .expect("the schedule is listed");
    assert_eq!(s.cron, "0 2 * * *");
    assert_eq!(s.timezone, "Europe/Paris");
    assert_eq!(s.workflow, wf);
    assert_eq!(s.input, json!({ "report": "daily" }));
    assert_eq!(s.overlap(), Some(Overlap::Skip));
    assert!(!s.paused);
    let next = s.next_run_at.expect("a next tick");
    let ahead = next.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(
        ahead <= Duration::from_secs(25 * 3600),
        "the next tick is within a day: {ahead:?}"
    );
    assert_eq!(s.last_run_id, None);

    // create or replace
    c.schedule(
        &name,
        "*/5 * * * *",
        &wf,
        ScheduleOptions::default().paused(true),
    )
    .await
    .unwrap();
    let s = c
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap();
    assert_eq!(
        (s.cron.as_str(), s.timezone.as_str(), s.paused),
        ("*/5 * * * *", "UTC", true)
    );
    assert_eq!(s.overlap(), Some(Overlap::Allow));
    assert_eq!(s.input, json!({}));

    assert!(c.unschedule(&name).await.unwrap());
    assert!(!c.unschedule(&name).await.unwrap());
    assert!(c.schedules().await.unwrap().iter().all(|s| s.name != name));

    // refused
    let bad = |r: baton::Result<()>| match r {
        Err(e) => e.sqlstate().map(str::to_string),
        Ok(()) => None,
    };
    let o = ScheduleOptions::default;
    assert_eq!(
        bad(c.schedule(&name, "not a cron", &wf, o()).await).as_deref(),
        Some("22023")
    );
    assert_eq!(
        bad(c
            .schedule(&name, "0 2 * * *", &wf, o().timezone("Mars/Olympus"))
            .await)
        .as_deref(),
        Some("22023")
    );
    assert_eq!(
        bad(c.schedule(&name, "0 2 * * *", &unique("nope"), o()).await).as_deref(),
        Some("42704")
    );
    assert!(c.schedules().await.unwrap().iter().all(|s| s.name != name));
}

/// A deadline from `EnqueueOptions` fails a run that does not finish in time
/// (no worker here); the definition's timeout does the same.
#[tokio::test]
async fn a_run_past_its_deadline_fails() {
    let c = client().await;
    let (wf, wf_timeout, queue) = (unique("deadline"), unique("def_timeout"), unique("q"));
    c.define_workflow(&WorkflowDef::new(&wf).queue(&queue).step(Step::new("s")))
        .await
        .unwrap();
    c.define_workflow(
        &WorkflowDef::new(&wf_timeout)
            .queue(&queue)
            .timeout(Duration::from_millis(300))
            .step(Step::new("s")),
    )
    .await
    .unwrap();
    let deadline = SystemTime::now() + Duration::from_millis(300);
    let run = c
        .enqueue(
            &wf,
            &json!({}),
            EnqueueOptions::default().deadline(deadline),
        )
        .await
        .unwrap();
    let by_def = c
        .enqueue(&wf_timeout, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    let conn = c.pool().get().await.unwrap();
    let stored: Option<SystemTime> = conn
        .query_one(
            "SELECT deadline FROM baton.workflow_runs WHERE id = $1",
            &[&run],
        )
        .await
        .unwrap()
        .get(0);
    let stored = stored.expect("the deadline is stored");
    let diff = stored
        .duration_since(deadline)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap();
    assert!(diff < Duration::from_millis(1), "stored as given: {diff:?}");
    for r in [run, by_def] {
        match c.wait_for::<Value>(r, WAIT).await {
            Err(Error::RunFailed { error, .. }) => {
                assert!(error.contains("deadline"), "{error}")
            }
            other => panic!("expected the run to fail, got {other:?}"),
        }
    }
    let status: String = conn
        .query_one(
            "SELECT status FROM baton.workflow_steps WHERE workflow_id = $1",
            &[&run],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "cancelled", "its unfinished step is cancelled");
    // a deadline far ahead changes nothing
    let w = spawn(
        worker(&c, &queue)
            .handler(&wf, "s", |_ctx| async move { Ok(1) })
            .build(),
    );
    let ok = c
        .enqueue(
            &wf,
            &json!({}),
            EnqueueOptions::default().deadline(SystemTime::now() + Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    let out: Value = c.wait_for(ok, WAIT).await.unwrap();
    assert_eq!(out, json!({ "s": 1 }));
    shut(w).await;
}
