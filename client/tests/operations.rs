//! Operating runs (pg_baton 0.4.0) through the client crate, against the test
//! cluster: resume, retry_from, fork, delete and purge on runs in every state
//! with every refusal matched on its `Error` variant, the `_in` variants in
//! the caller's transaction, the run log, the graph and the stored versions;
//! then the operations racing real worker sessions on the same runs, and
//! purge racing workers and resumes. Every test has workflows and queues of
//! its own; only `purge_while_workers_run` makes runs look old.

mod common;

use baton::{
    delete_in, fork_in, resume_in, retry_from_in, Backoff, Client, EnqueueOptions, Error,
    ForkOptions, ForkVersion, Step, WorkflowDef,
};
use common::{connect, eventually, unique, url};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_postgres::Client as Db;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// `$call` failed with an error matching `$pat`: that error.
macro_rules! refused {
    ($call:expr, $pat:pat) => {
        match $call {
            Err(e @ $pat) => e,
            other => panic!(
                "{}: expected {}, got {:?}",
                stringify!($call),
                stringify!($pat),
                other
            ),
        }
    };
}

async fn client() -> Client {
    Client::connect(&url()).await.expect("connect")
}

/// A chain a -> b -> c on a queue of its own, b with two attempts:
/// (workflow, queue).
async fn chain(c: &Client) -> (String, String) {
    let (wf, queue) = (unique("op_chain"), unique("op_q"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("a"))
            .step(Step::new("b").after(["a"]).max_attempts(2))
            .step(Step::new("c").after(["b"])),
    )
    .await
    .unwrap();
    (wf, queue)
}

async fn start(c: &Client, wf: &str, input: Value) -> Uuid {
    c.enqueue(wf, &input, EnqueueOptions::default())
        .await
        .unwrap()
}

/// Claim one step of `queue` and complete it with `{"step": name, "input":
/// input}`, or fail it for good when it is named `fail`. The step's name, or
/// None when nothing was ready.
async fn work(db: &Db, queue: &str, fail: Option<&str>) -> Option<String> {
    let row = db
        .query_opt(
            "SELECT step_id, lease_token, step, input FROM baton.claim_steps('op-worker', ARRAY[$1])",
            &[&queue],
        )
        .await
        .unwrap()?;
    let (id, token, step, input): (i64, Uuid, String, Value) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if fail == Some(step.as_str()) {
        db.execute(
            "SELECT baton.fail_step($1, $2, 'boom', retryable => false)",
            &[&id, &token],
        )
        .await
        .unwrap();
    } else {
        let output = json!({ "step": step, "input": input });
        db.execute(
            "SELECT baton.complete_step($1, $2, $3)",
            &[&id, &token, &output],
        )
        .await
        .unwrap();
    }
    Some(step)
}

async fn status(c: &Client, run: Uuid) -> String {
    c.run(run).await.unwrap().status
}

/// The steps of `run` (not map items) by name: (status, attempt,
/// max_attempts, output).
async fn steps_of(db: &Db, run: Uuid) -> BTreeMap<String, (String, i32, i32, Option<Value>)> {
    db.query(
        "SELECT step, status, attempt, max_attempts, output FROM baton.workflow_steps \
         WHERE workflow_id = $1 AND map_index IS NULL",
        &[&run],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
    .collect()
}

fn step_status(steps: &BTreeMap<String, (String, i32, i32, Option<Value>)>) -> Vec<(&str, &str)> {
    steps
        .iter()
        .map(|(name, (status, ..))| (name.as_str(), status.as_str()))
        .collect()
}

/// Every attempt of `run`'s steps (step_attempts): step -> [(attempt, outcome)],
/// in attempt order.
async fn attempts_of(db: &Db, run: Uuid) -> BTreeMap<String, Vec<(i32, String)>> {
    let mut out: BTreeMap<String, Vec<(i32, String)>> = BTreeMap::new();
    for r in db
        .query(
            "SELECT step, attempt, outcome FROM baton.step_attempts WHERE workflow_id = $1 \
             ORDER BY step, attempt",
            &[&run],
        )
        .await
        .unwrap()
    {
        out.entry(r.get(0)).or_default().push((r.get(1), r.get(2)));
    }
    out
}

fn attempts(list: &[(i32, &str)]) -> Vec<(i32, String)> {
    list.iter().map(|(n, o)| (*n, o.to_string())).collect()
}

async fn log_actions(c: &Client, run: Uuid) -> Vec<(String, Option<String>)> {
    c.workflow_log(run)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.action, e.step))
        .collect()
}

fn action(a: &str, step: Option<&str>) -> (String, Option<String>) {
    (a.to_string(), step.map(str::to_string))
}

// ---------------------------------------------------------------------------
// Each operation on runs in every state
// ---------------------------------------------------------------------------

/// An unknown run is `NotFound` for every operation and the graph, a bad
/// purge argument `InvalidInput` (22023), a NULL `InvalidInput` (22004);
/// the log of an unknown run is empty.
#[tokio::test]
async fn refusals_of_an_unknown_run_and_bad_arguments() {
    let c = client().await;
    let nobody = Uuid::new_v4();
    refused!(c.resume(nobody).await, Error::NotFound(_));
    refused!(c.retry_from(nobody, "a").await, Error::NotFound(_));
    refused!(
        c.fork(nobody, "a", ForkOptions::default()).await,
        Error::NotFound(_)
    );
    refused!(c.delete(nobody, false).await, Error::NotFound(_));
    refused!(c.delete(nobody, true).await, Error::NotFound(_));
    let e = refused!(c.workflow_graph(nobody).await, Error::NotFound(_));
    assert_eq!(e.sqlstate(), Some("42704"));
    assert!(e.to_string().contains(&nobody.to_string()), "{e}");
    assert!(c.workflow_log(nobody).await.unwrap().is_empty());

    let day = Duration::from_secs(86400);
    for batch in [0, -1, 100_001] {
        let e = refused!(c.purge(day, Some(batch)).await, Error::InvalidInput { .. });
        assert_eq!(e.sqlstate(), Some("22023"), "{e}");
    }
    // longer ago than any timestamp (and than any interval): nothing is that old
    assert_eq!(c.purge(Duration::MAX, None).await.unwrap(), 0);
    assert_eq!(
        c.purge(Duration::from_secs(400_000 * 365 * 86400), Some(10))
            .await
            .unwrap(),
        0
    );

    // NULLs, which the typed API cannot pass, map to InvalidInput too
    let conn = c.pool().get().await.unwrap();
    for sql in [
        "SELECT baton.resume_workflow(NULL)",
        "SELECT baton.retry_from(NULL, 'a')",
        "SELECT baton.fork_workflow(NULL, 'a')",
        "SELECT baton.delete_workflow(NULL)",
        "SELECT baton.purge(NULL)",
    ] {
        let e = Error::from(conn.query_one(sql, &[]).await.unwrap_err());
        match &e {
            Error::InvalidInput { code, .. } if code == "22004" => {}
            other => panic!("{sql}: expected InvalidInput 22004, got {other:?}"),
        }
    }
}

/// A pending run: resume, retry_from and delete without force are refused
/// (`WrongState`, naming the state); a fork works (nothing to copy); delete
/// with force cancels and deletes it, and the fork lives on.
#[tokio::test]
async fn a_pending_run() {
    let c = client().await;
    let db = connect().await;
    let (wf, _queue) = chain(&c).await;
    let run = start(&c, &wf, json!({"n": 1})).await;
    assert_eq!(status(&c, run).await, "pending");

    let e = refused!(c.resume(run).await, Error::WrongState { .. });
    assert!(e.to_string().contains("pending"), "{e}");
    assert_eq!(e.sqlstate(), Some("55000"));
    assert!(!e.is_transient());
    refused!(c.retry_from(run, "a").await, Error::WrongState { .. });
    refused!(c.retry_from(run, "nope").await, Error::WrongState { .. });
    refused!(c.delete(run, false).await, Error::WrongState { .. });
    assert_eq!(
        status(&c, run).await,
        "pending",
        "a refusal changes nothing"
    );

    let fork = c.fork(run, "b", ForkOptions::default()).await.unwrap();
    let graph = c.workflow_graph(fork).await.unwrap();
    assert_eq!(graph.run.forked_from, Some(run));
    assert_eq!(graph.run.status, "pending");
    assert_eq!(
        step_status(&steps_of(&db, fork).await),
        [("a", "ready"), ("b", "blocked"), ("c", "blocked")]
    );

    c.delete(run, true).await.unwrap();
    refused!(c.run(run).await, Error::NotFound(_));
    refused!(c.workflow_graph(run).await, Error::NotFound(_));
    refused!(c.delete(run, true).await, Error::NotFound(_));
    assert!(c.workflow_log(run).await.unwrap().is_empty());
    assert!(steps_of(&db, run).await.is_empty());
    // the fork does not depend on its source
    assert_eq!(status(&c, fork).await, "pending");
    let log = c.workflow_log(fork).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].action, "forked_from");
    assert_eq!(log[0].detail.as_ref().unwrap()["run"], json!(run));
    c.delete(fork, true).await.unwrap();
}

/// A running run: the same refusals; a fork copies the succeeded step; a
/// forced delete while a worker holds a step ends its lease (`BT001`).
#[tokio::test]
async fn a_running_run() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = chain(&c).await;
    let run = start(&c, &wf, json!({"n": 2})).await;
    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("a"));
    assert_eq!(status(&c, run).await, "running");

    let e = refused!(c.resume(run).await, Error::WrongState { .. });
    assert!(e.to_string().contains("running"), "{e}");
    refused!(c.retry_from(run, "b").await, Error::WrongState { .. });
    refused!(c.delete(run, false).await, Error::WrongState { .. });

    let fork = c.fork(run, "b", ForkOptions::default()).await.unwrap();
    let (source, forked) = (steps_of(&db, run).await, steps_of(&db, fork).await);
    assert_eq!(
        step_status(&forked),
        [("a", "succeeded"), ("b", "ready"), ("c", "blocked")]
    );
    assert_eq!(forked["a"].3, source["a"].3, "a's output is copied");
    assert_eq!(forked["a"].1, 0, "a copied step made no attempt");
    assert!(attempts_of(&db, fork).await.is_empty());

    // a worker holds the source's b; the forced delete ends its lease
    let held = db
        .query(
            "SELECT step_id, lease_token, workflow_id FROM baton.claim_steps('op-worker', ARRAY[$1], 10)",
            &[&queue],
        )
        .await
        .unwrap();
    assert_eq!(held.len(), 2, "b of the run and b of the fork");
    c.delete(run, true).await.unwrap();
    refused!(c.run(run).await, Error::NotFound(_));
    for r in &held {
        let (id, token, of): (i64, Uuid, Uuid) = (r.get(0), r.get(1), r.get(2));
        let done = db
            .query_one("SELECT baton.complete_step($1, $2)", &[&id, &token])
            .await;
        if of == run {
            let e = Error::from(done.unwrap_err());
            assert!(e.is_lease_lost(), "{e:?}");
        } else {
            done.unwrap();
        }
    }
    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("c"));
    assert_eq!(status(&c, fork).await, "succeeded");
}

/// A failed run resumes: the failed step runs again with a fresh budget
/// (its attempts go on), what follows it after it, and the succeeded step
/// keeps its output. Resuming a running or succeeded run is refused; so is
/// running again from an unknown step.
#[tokio::test]
async fn a_failed_run_resumes() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = chain(&c).await;
    let run = start(&c, &wf, json!({"n": 3})).await;
    work(&db, &queue, None).await;
    assert_eq!(work(&db, &queue, Some("b")).await.as_deref(), Some("b"));
    let failed = c.run(run).await.unwrap();
    assert_eq!(failed.status, "failed");
    assert!(failed.error.unwrap().contains("boom"));
    let before = steps_of(&db, run).await;
    assert_eq!(
        step_status(&before),
        [("a", "succeeded"), ("b", "failed"), ("c", "cancelled")]
    );

    refused!(c.retry_from(run, "nope").await, Error::NotFound(_));
    refused!(c.retry_from(run, "").await, Error::NotFound(_));
    // a fork of the failed run runs b again in a new run
    let fork = c.fork(run, "b", ForkOptions::default()).await.unwrap();
    assert_eq!(
        step_status(&steps_of(&db, fork).await),
        [("a", "succeeded"), ("b", "ready"), ("c", "blocked")]
    );
    c.delete(fork, true).await.unwrap();
    assert_eq!(status(&c, run).await, "failed", "the source is not changed");
    c.resume(run).await.unwrap();
    let resumed = c.run(run).await.unwrap();
    assert_eq!((resumed.status.as_str(), resumed.error), ("running", None));
    let after = steps_of(&db, run).await;
    assert_eq!(
        step_status(&after),
        [("a", "succeeded"), ("b", "ready"), ("c", "blocked")]
    );
    assert_eq!(after["a"], before["a"], "a is not run again");
    assert_eq!(
        (after["b"].1, after["b"].2),
        (1, 3),
        "b's attempts go on, with two more"
    );
    refused!(c.resume(run).await, Error::WrongState { .. });

    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("b"));
    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("c"));
    assert_eq!(status(&c, run).await, "succeeded");
    let e = refused!(c.resume(run).await, Error::WrongState { .. });
    assert!(e.to_string().contains("succeeded"), "{e}");

    let log = c.workflow_log(run).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["forked", "resumed"]
    );
    assert_eq!(log[0].detail.as_ref().unwrap()["run"], json!(fork));
    let detail = log[1].detail.clone().unwrap();
    assert_eq!(
        (&detail["was"], &detail["steps"]),
        (&json!("failed"), &json!(2))
    );
    assert!(detail["error"].as_str().unwrap().contains("boom"));
    assert_eq!(log[1].actor, "postgres");
    assert_eq!(
        attempts_of(&db, run).await,
        BTreeMap::from([
            ("a".to_string(), attempts(&[(1, "succeeded")])),
            (
                "b".to_string(),
                attempts(&[(1, "failed"), (2, "succeeded")])
            ),
            ("c".to_string(), attempts(&[(1, "succeeded")])),
        ])
    );

    // a failed run is finished: deleted without force
    let other = start(&c, &wf, json!({"n": 33})).await;
    work(&db, &queue, None).await;
    work(&db, &queue, Some("b")).await;
    assert_eq!(status(&c, other).await, "failed");
    c.delete(other, false).await.unwrap();
    refused!(c.run(other).await, Error::NotFound(_));
    refused!(c.resume(other).await, Error::NotFound(_));
}

/// A succeeded run runs again from a step: that step and what follows it,
/// with upstream outputs reused and the earlier successes kept in the history.
#[tokio::test]
async fn a_succeeded_run_runs_again_from_a_step() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = chain(&c).await;
    let run = start(&c, &wf, json!({"n": 4})).await;
    for _ in 0..3 {
        work(&db, &queue, None).await.unwrap();
    }
    assert_eq!(status(&c, run).await, "succeeded");
    let before = steps_of(&db, run).await;

    c.retry_from(run, "b").await.unwrap();
    let after = steps_of(&db, run).await;
    assert_eq!(status(&c, run).await, "running");
    assert_eq!(
        step_status(&after),
        [("a", "succeeded"), ("b", "ready"), ("c", "blocked")]
    );
    assert_eq!(after["a"], before["a"]);
    assert_eq!(after["b"].3, None, "b's output is cleared");
    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("b"));
    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("c"));
    let done = c.run(run).await.unwrap();
    assert_eq!(done.status, "succeeded");
    assert_eq!(done.output.unwrap()["c"]["input"], json!({"n": 4}));
    assert_eq!(
        attempts_of(&db, run).await,
        BTreeMap::from([
            ("a".to_string(), attempts(&[(1, "succeeded")])),
            (
                "b".to_string(),
                attempts(&[(1, "succeeded"), (2, "succeeded")])
            ),
            (
                "c".to_string(),
                attempts(&[(1, "succeeded"), (2, "succeeded")])
            ),
        ])
    );
    assert_eq!(
        log_actions(&c, run).await,
        [action("retried_from", Some("b"))]
    );
}

/// A cancelled run: resume runs its cancelled steps, retry_from works on it
/// too, and a finished run is deleted without force.
#[tokio::test]
async fn a_cancelled_run() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = chain(&c).await;
    let run = start(&c, &wf, json!({"n": 5})).await;
    work(&db, &queue, None).await;
    assert!(c.cancel(run).await.unwrap());
    assert!(!c.cancel(run).await.unwrap(), "already finished");
    assert_eq!(
        step_status(&steps_of(&db, run).await),
        [("a", "succeeded"), ("b", "cancelled"), ("c", "cancelled")]
    );
    let fork = c.fork(run, "b", ForkOptions::default()).await.unwrap();
    assert_eq!(
        step_status(&steps_of(&db, fork).await),
        [("a", "succeeded"), ("b", "ready"), ("c", "blocked")]
    );
    c.delete(fork, true).await.unwrap();
    c.resume(run).await.unwrap();
    assert_eq!(
        step_status(&steps_of(&db, run).await),
        [("a", "succeeded"), ("b", "ready"), ("c", "blocked")]
    );
    assert!(c.cancel(run).await.unwrap());
    c.retry_from(run, "a").await.unwrap();
    assert_eq!(
        step_status(&steps_of(&db, run).await),
        [("a", "ready"), ("b", "blocked"), ("c", "blocked")]
    );
    for step in ["a", "b", "c"] {
        assert_eq!(work(&db, &queue, None).await.as_deref(), Some(step));
    }
    assert_eq!(status(&c, run).await, "succeeded");
    assert_eq!(
        log_actions(&c, run).await,
        [
            action("cancelled", None),
            action("forked", Some("b")),
            action("resumed", None),
            action("cancelled", None),
            action("retried_from", Some("a")),
        ]
    );
    c.delete(run, false).await.unwrap();
    refused!(c.run(run).await, Error::NotFound(_));

    // a cancelled run is finished: deleted without force
    let other = start(&c, &wf, json!({"n": 55})).await;
    assert!(c.cancel(other).await.unwrap());
    c.delete(other, false).await.unwrap();
    refused!(c.run(other).await, Error::NotFound(_));
}

/// Forks with another input, onto the latest or a given version (steps
/// matched by name), and the refusals: unknown step or version, a version
/// that is no number, an input that does not serialize. The versions and
/// their unfinished runs as workflow_definitions shows them.
#[tokio::test]
async fn forks_with_inputs_and_versions() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = chain(&c).await;
    let run = start(&c, &wf, json!({"n": 1})).await;
    for _ in 0..3 {
        work(&db, &queue, None).await.unwrap();
    }

    let f = c
        .fork(run, "c", ForkOptions::default().input(&json!({"n": 20})))
        .await
        .unwrap();
    let info = c.run(f).await.unwrap();
    assert_eq!((info.version, info.status.as_str()), (1, "pending"));
    assert_eq!(
        step_status(&steps_of(&db, f).await),
        [("a", "succeeded"), ("b", "succeeded"), ("c", "ready")]
    );
    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("c"));
    let out = c.run(f).await.unwrap().output.unwrap();
    assert_eq!(
        out,
        json!({"c": {"step": "c", "input": {"n": 20}}}),
        "the new input"
    );
    let (source, forked) = (steps_of(&db, run).await, steps_of(&db, f).await);
    assert_eq!(forked["a"].3, source["a"].3, "a's output, copied");
    assert_eq!(forked["b"].3, source["b"].3, "b's output, copied");

    refused!(
        c.fork(run, "nope", ForkOptions::default()).await,
        Error::NotFound(_)
    );
    refused!(
        c.fork(
            run,
            "a",
            ForkOptions::default().version(ForkVersion::Number(7))
        )
        .await,
        Error::NotFound(_)
    );
    let e = refused!(
        c.fork(
            run,
            "a",
            ForkOptions::default().version(ForkVersion::Number(-1))
        )
        .await,
        Error::InvalidInput { .. }
    );
    assert_eq!(e.sqlstate(), Some("22023"));
    let mut unserializable = HashMap::new();
    unserializable.insert((1, 2), "no JSON object has tuple keys");
    refused!(
        c.fork(run, "a", ForkOptions::default().input(&unserializable))
            .await,
        Error::Json(_)
    );
    assert_eq!(
        log_actions(&c, run).await,
        [action("forked", Some("c"))],
        "no refused fork left a trace"
    );

    // version 2 renames c to d
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("a"))
            .step(Step::new("b").after(["a"]))
            .step(Step::new("d").after(["b"])),
    )
    .await
    .unwrap();
    let latest = c
        .fork(
            run,
            "b",
            ForkOptions::default().version(ForkVersion::Latest),
        )
        .await
        .unwrap();
    assert_eq!(c.run(latest).await.unwrap().version, 2);
    assert_eq!(
        step_status(&steps_of(&db, latest).await),
        [("a", "succeeded"), ("b", "ready"), ("d", "blocked")]
    );
    let first = c
        .fork(
            run,
            "b",
            ForkOptions::default().version(ForkVersion::Number(1)),
        )
        .await
        .unwrap();
    assert_eq!(c.run(first).await.unwrap().version, 1);
    let log = c.workflow_log(first).await.unwrap();
    assert_eq!(log[0].detail.as_ref().unwrap()["copied"], json!(["a"]));

    let versions: Vec<_> = c
        .workflow_definitions()
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.name == wf)
        .collect();
    assert_eq!(versions.len(), 2);
    assert_eq!(
        versions
            .iter()
            .map(|d| (d.version, d.unfinished_runs, d.latest))
            .collect::<Vec<_>>(),
        [(1, 1, false), (2, 1, true)]
    );
    assert_eq!(versions[1].definition["steps"][2]["name"], json!("d"));
    let age = SystemTime::now()
        .duration_since(versions[0].created_at)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(600), "{age:?}");
    for r in [latest, first] {
        c.cancel(r).await.unwrap();
    }
}

/// Fork after resume after retry_from: the history of the run stays
/// readable, every attempt present once, numbered on from 1 per step; the
/// log tells what happened, in order; the fork's history has only its own
/// attempts.
#[tokio::test]
async fn fork_after_resume_after_retry_from_keeps_the_history() {
    let c = client().await;
    let db = connect().await;
    let (wf, queue) = chain(&c).await;
    let run = start(&c, &wf, json!({"n": 6})).await;
    work(&db, &queue, None).await;
    work(&db, &queue, Some("b")).await;
    assert_eq!(status(&c, run).await, "failed");
    c.retry_from(run, "a").await.unwrap();
    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("a"));
    assert_eq!(work(&db, &queue, Some("b")).await.as_deref(), Some("b"));
    assert_eq!(status(&c, run).await, "failed");
    c.resume(run).await.unwrap();
    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("b"));
    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("c"));
    assert_eq!(status(&c, run).await, "succeeded");
    let fork = c.fork(run, "c", ForkOptions::default()).await.unwrap();
    assert_eq!(work(&db, &queue, None).await.as_deref(), Some("c"));
    assert_eq!(status(&c, fork).await, "succeeded");

    let history = attempts_of(&db, run).await;
    assert_eq!(
        history,
        BTreeMap::from([
            (
                "a".to_string(),
                attempts(&[(1, "succeeded"), (2, "succeeded")])
            ),
            (
                "b".to_string(),
                attempts(&[(1, "failed"), (2, "failed"), (3, "succeeded")])
            ),
            ("c".to_string(), attempts(&[(1, "succeeded")])),
        ])
    );
    // one row per (step_id, attempt), numbered 1, 2, ... per step
    let rows = db
        .query(
            "SELECT step_id, array_agg(attempt ORDER BY attempt) FROM baton.step_attempts \
             WHERE workflow_id = $1 GROUP BY step_id",
            &[&run],
        )
        .await
        .unwrap();
    for r in rows {
        let numbers: Vec<i32> = r.get(1);
        assert_eq!(numbers, (1..=numbers.len() as i32).collect::<Vec<_>>());
    }
    assert_eq!(
        attempts_of(&db, fork).await,
        BTreeMap::from([("c".to_string(), attempts(&[(1, "succeeded")]))])
    );

    let log = c.workflow_log(run).await.unwrap();
    assert_eq!(
        log.iter()
            .map(|e| (e.action.as_str(), e.step.as_deref()))
            .collect::<Vec<_>>(),
        [
            ("retried_from", Some("a")),
            ("resumed", None),
            ("forked", Some("c"))
        ]
    );
    assert!(log
        .windows(2)
        .all(|w| w[0].seq < w[1].seq && w[0].at <= w[1].at));
    assert!(log.iter().all(|e| e.run_id == run));
    assert_eq!(log[2].detail.as_ref().unwrap()["run"], json!(fork));
    let fork_log = c.workflow_log(fork).await.unwrap();
    assert_eq!(fork_log.len(), 1);
    let detail = fork_log[0].detail.clone().unwrap();
    assert_eq!(detail["run"], json!(run));
    assert_eq!(detail["copied"], json!(["a", "b"]));
    assert_eq!(detail["input_replaced"], json!(false));

    let graph = c.workflow_graph(run).await.unwrap();
    assert_eq!(
        graph
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.attempt, s.max_attempts))
            .collect::<Vec<_>>(),
        [("a", 2, 4), ("b", 3, 4), ("c", 1, 3)]
    );
}

/// The child run that the first step of `run` started (within `WAIT`).
async fn child_of(c: &Client, run: Uuid) -> Uuid {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let graph = c.workflow_graph(run).await.unwrap();
        if let Some(kid) = graph.steps[0].child_runs.as_ref().and_then(|k| k.first()) {
            return kid.id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the child run of {run} never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// delete_workflow takes the run's child runs with it; an unfinished parent
/// needs force. Everything of a deleted run goes: steps, attempts, log.
#[tokio::test]
async fn delete_takes_child_runs_and_everything_of_the_run() {
    let c = client().await;
    let db = connect().await;
    let (child, parent, queue) = (unique("op_child"), unique("op_parent"), unique("op_q"));
    c.define_workflow(
        &WorkflowDef::new(&child)
            .queue(&queue)
            .step(Step::new("inner")),
    )
    .await
    .unwrap();
    c.define_workflow(
        &WorkflowDef::new(&parent)
            .queue(&queue)
            .step(Step::workflow("call", &child)),
    )
    .await
    .unwrap();
    let p = start(&c, &parent, json!({})).await;
    let kid = child_of(&c, p).await;
    refused!(c.delete(p, false).await, Error::WrongState { .. });
    c.delete(p, true).await.unwrap();
    refused!(c.run(p).await, Error::NotFound(_));
    refused!(c.run(kid).await, Error::NotFound(_));

    // a finished parent whose child ran again after it finished (which
    // leaves the parent as it was): all of it goes, without force
    let p = start(&c, &parent, json!({})).await;
    let kid = child_of(&c, p).await;
    work(&db, &queue, None).await.unwrap();
    let ok = eventually(WAIT, || async { status(&c, p).await == "succeeded" }).await;
    assert!(ok, "the parent never succeeded");
    c.retry_from(kid, "inner").await.unwrap();
    work(&db, &queue, None).await.unwrap();
    assert_eq!(status(&c, kid).await, "succeeded");
    assert_eq!(status(&c, p).await, "succeeded");
    let counts = |ids: Vec<Uuid>| {
        let db = &db;
        async move {
            let r = db
                .query_one(
                    "SELECT (SELECT count(*) FROM baton.runs WHERE id = ANY ($1)),
                            (SELECT count(*) FROM baton.steps WHERE run_id = ANY ($1)),
                            (SELECT count(*) FROM baton.attempts WHERE run_id = ANY ($1)),
                            (SELECT count(*) FROM baton.run_log WHERE run_id = ANY ($1))",
                    &[&ids],
                )
                .await
                .unwrap();
            (
                r.get::<_, i64>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
                r.get::<_, i64>(3),
            )
        }
    };
    let (runs, steps, archived, log) = counts(vec![p, kid]).await;
    assert_eq!((runs, steps), (2, 2));
    assert!(
        archived >= 1 && log >= 1,
        "the kid's first success, its log"
    );
    c.delete(p, false).await.unwrap();
    assert_eq!(counts(vec![p, kid]).await, (0, 0, 0, 0));
}

/// The graph of a run with a map step and a child-workflow step: steps in
/// definition order with their kinds, the map's items by status, the child
/// run, the edges; timestamps read as times.
#[tokio::test]
async fn the_graph_of_a_run() {
    let c = client().await;
    let db = connect().await;
    let (child, wf, queue) = (unique("g_child"), unique("g_wf"), unique("g_q"));
    c.define_workflow(
        &WorkflowDef::new(&child)
            .queue(&queue)
            .step(Step::new("inner")),
    )
    .await
    .unwrap();
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("list"))
            .step(Step::map("each", "list"))
            .step(Step::workflow("call", &child).after(["list"]))
            .step(Step::new("done").after(["each", "call"])),
    )
    .await
    .unwrap();
    let run = start(&c, &wf, json!({})).await;
    let claimed = db
        .query_one(
            "SELECT step_id, lease_token FROM baton.claim_steps('g-worker', ARRAY[$1])",
            &[&queue],
        )
        .await
        .unwrap();
    let (id, token): (i64, Uuid) = (claimed.get(0), claimed.get(1));
    db.execute(
        "SELECT baton.complete_step($1, $2, '[1, 2, 3]')",
        &[&id, &token],
    )
    .await
    .unwrap();
    // one item succeeds
    let item = db
        .query_one(
            "SELECT step_id, lease_token FROM baton.claim_steps('g-worker', ARRAY[$1]) WHERE map_index IS NOT NULL",
            &[&queue],
        )
        .await
        .unwrap();
    let (id, token): (i64, Uuid) = (item.get(0), item.get(1));
    db.execute("SELECT baton.complete_step($1, $2, '1')", &[&id, &token])
        .await
        .unwrap();

    let graph = c.workflow_graph(run).await.unwrap();
    assert_eq!(
        (graph.run.id, graph.run.workflow.as_str()),
        (run, wf.as_str())
    );
    assert_eq!(
        (graph.run.version, graph.run.status.as_str()),
        (1, "running")
    );
    assert_eq!((graph.run.parent_id, graph.run.forked_from), (None, None));
    let now = SystemTime::now();
    for t in [graph.run.created_at, graph.run.started_at.unwrap()] {
        let off = now.duration_since(t).unwrap_or_else(|e| e.duration());
        assert!(off < Duration::from_secs(600), "{t:?} vs {now:?}");
    }
    assert_eq!(graph.run.finished_at, None);
    assert_eq!(
        graph
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.kind.as_str(), s.status.as_str()))
            .collect::<Vec<_>>(),
        [
            ("list", "task", "succeeded"),
            ("each", "map", "waiting"),
            ("call", "workflow", "waiting"),
            ("done", "task", "blocked"),
        ]
    );
    let list = &graph.steps[0];
    assert_eq!(list.worker.as_deref(), Some("g-worker"));
    assert!(list.started_at.unwrap() <= list.finished_at.unwrap());
    assert!(list.after.is_empty() && list.map.is_none() && list.child_runs.is_none());
    let map = graph.steps[1].map.as_ref().unwrap();
    assert_eq!(
        (
            map.items,
            map.count("ready"),
            map.count("succeeded"),
            map.count("failed")
        ),
        (3, 2, 1, 0)
    );
    assert_eq!(graph.steps[1].after, ["list"]);
    let kids = graph.steps[2].child_runs.as_ref().unwrap();
    assert_eq!(kids.len(), 1);
    assert_eq!(c.run(kids[0].id).await.unwrap().workflow, child);
    assert_eq!(graph.steps[3].after, ["each", "call"]);
    assert_eq!(graph.steps[3].finished_at, None);
    assert_eq!(
        graph
            .edges
            .iter()
            .map(|e| (e.from.as_str(), e.to.as_str()))
            .collect::<Vec<_>>(),
        [
            ("list", "each"),
            ("list", "call"),
            ("each", "done"),
            ("call", "done")
        ]
    );
    // the child knows its parent; a fork its source
    let kid = c.workflow_graph(kids[0].id).await.unwrap();
    assert_eq!(kid.run.parent_id, Some(run));
    let fork = c.fork(run, "done", ForkOptions::default()).await.unwrap();
    assert_eq!(
        c.workflow_graph(fork).await.unwrap().run.forked_from,
        Some(run)
    );
    c.cancel(fork).await.unwrap();
    c.cancel(run).await.unwrap();
    let graph = c.workflow_graph(run).await.unwrap();
    assert!(graph.run.finished_at.is_some());
    let map = graph.steps[1].map.as_ref().unwrap();
    assert_eq!((map.count("succeeded"), map.count("cancelled")), (1, 2));
}

/// The `_in` variants run in the caller's transaction: rolled back, the
/// operation did not happen; committed, it did. A refusal aborts it.
#[tokio::test]
async fn operations_in_a_transaction_happen_if_it_commits() {
    let c = client().await;
    let mut db = connect().await;
    let (wf, queue) = chain(&c).await;
    let run = start(&c, &wf, json!({"n": 7})).await;
    work(&db, &queue, None).await;
    work(&db, &queue, Some("b")).await;

    let tx = db.transaction().await.unwrap();
    resume_in(&tx, run).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(status(&c, run).await, "failed");
    let tx = db.transaction().await.unwrap();
    resume_in(&tx, run).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(status(&c, run).await, "running");

    let tx = db.transaction().await.unwrap();
    refused!(resume_in(&tx, run).await, Error::WrongState { .. });
    assert!(tx.query_one("SELECT 1", &[]).await.is_err(), "aborted");
    tx.rollback().await.unwrap();

    work(&db, &queue, None).await.unwrap();
    work(&db, &queue, None).await.unwrap();
    assert_eq!(status(&c, run).await, "succeeded");
    let tx = db.transaction().await.unwrap();
    retry_from_in(&tx, run, "c").await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(status(&c, run).await, "succeeded");
    let tx = db.transaction().await.unwrap();
    retry_from_in(&tx, run, "c").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(status(&c, run).await, "running");

    let tx = db.transaction().await.unwrap();
    let gone = fork_in(&tx, run, "c", ForkOptions::default())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    refused!(c.run(gone).await, Error::NotFound(_));
    let tx = db.transaction().await.unwrap();
    let fork = fork_in(
        &tx,
        run,
        "c",
        ForkOptions::default().input(&json!({"n": 70})),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(status(&c, fork).await, "pending");

    let tx = db.transaction().await.unwrap();
    delete_in(&tx, run, true).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(status(&c, run).await, "running");
    let tx = db.transaction().await.unwrap();
    refused!(delete_in(&tx, run, false).await, Error::WrongState { .. });
    tx.rollback().await.unwrap();
    let tx = db.transaction().await.unwrap();
    delete_in(&tx, run, true).await.unwrap();
    delete_in(&tx, fork, true).await.unwrap();
    tx.commit().await.unwrap();
    refused!(c.run(run).await, Error::NotFound(_));
    refused!(c.run(fork).await, Error::NotFound(_));
    assert_eq!(
        log_actions(&c, run).await,
        [],
        "a deleted run's log goes with it"
    );
}

// ---------------------------------------------------------------------------
// Races with worker sessions
// ---------------------------------------------------------------------------

/// How a worker session ended an attempt it claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    /// Its completion or failure was refused (BT001): the run was
    /// cancelled, deleted or failed meanwhile.
    Lost,
}

impl Outcome {
    /// The outcome step_attempts records for it (nothing else ends an
    /// attempt here: leases are far longer than the tests).
    fn recorded(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Lost => "cancelled",
        }
    }
}

/// What the sessions of a race saw.
#[derive(Default)]
struct Ledger {
    /// Every attempt claimed, by (step_id, attempt): its run, and how it
    /// ended (None while it runs).
    claims: HashMap<(i64, i32), (Uuid, Option<Outcome>)>,
    /// Anything unexpected: an error, an attempt handed out twice.
    problems: Vec<String>,
}

impl Ledger {
    fn problem(&mut self, what: String) {
        if self.problems.len() < 100 {
            self.problems.push(what);
        }
    }
}

type Shared = Arc<Mutex<Ledger>>;

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// A small PRNG (xorshift), seeded at random: no dependency for it.
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

/// A worker session on a connection of its own until `stop`: it claims up
/// to 4 steps of `queue` at a time and completes them in one call (over
/// several runs at once); with `failures`, it fails some attempts,
/// retryable (6%) or not (3%). A step named `root` outputs `[1, 2, 3]` (for
/// a map over it).
async fn worker_session(
    name: String,
    queue: String,
    ledger: Shared,
    stop: Arc<AtomicBool>,
    failures: bool,
) {
    let db = connect().await;
    let mut rng = Rng::new();
    while !stop.load(Ordering::Relaxed) {
        let rows = match db
            .query(
                "SELECT step_id, lease_token, workflow_id, step, attempt \
                 FROM baton.claim_steps($1, ARRAY[$2], 4, '30 seconds')",
                &[&name, &queue],
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                ledger
                    .lock()
                    .unwrap()
                    .problem(format!("claim: {}", describe(&e)));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let mut done = (Vec::new(), Vec::new(), Vec::new());
        let mut failed = Vec::new();
        {
            let mut l = ledger.lock().unwrap();
            for r in &rows {
                let (id, token, run, step, attempt): (i64, Uuid, Uuid, String, i32) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                if l.claims.insert((id, attempt), (run, None)).is_some() {
                    l.problem(format!("step {id} attempt {attempt} was claimed twice"));
                }
                let roll = if failures { rng.below(100) } else { 100 };
                if roll < 9 {
                    failed.push((id, attempt, token, roll >= 6));
                } else {
                    let output = if step == "root" {
                        json!([1, 2, 3])
                    } else {
                        json!({ "step": step, "attempt": attempt })
                    };
                    done.0.push(id);
                    done.1.push(token);
                    done.2.push((output, attempt));
                }
            }
        }
        if !done.0.is_empty() {
            let outputs: Vec<Value> = done.2.iter().map(|(o, _)| o.clone()).collect();
            match db
                .query(
                    "SELECT step_id, status FROM baton.complete_steps($1, $2, $3)",
                    &[&done.0, &done.1, &outputs],
                )
                .await
            {
                Ok(statuses) => {
                    let mut l = ledger.lock().unwrap();
                    for (r, (_, attempt)) in statuses.iter().zip(&done.2) {
                        let (id, status): (i64, String) = (r.get(0), r.get(1));
                        let outcome = if status == "lease_lost" {
                            Outcome::Lost
                        } else {
                            Outcome::Succeeded
                        };
                        if let Some(claim) = l.claims.get_mut(&(id, *attempt)) {
                            claim.1 = Some(outcome);
                        }
                    }
                }
                Err(e) => ledger
                    .lock()
                    .unwrap()
                    .problem(format!("complete_steps: {}", describe(&e))),
            }
        }
        for (id, attempt, token, fatal) in failed {
            let result = db
                .query_one(
                    "SELECT baton.fail_step($1, $2, 'boom', retryable => $3)",
                    &[&id, &token, &!fatal],
                )
                .await;
            let mut l = ledger.lock().unwrap();
            let outcome = match result {
                Ok(_) => Outcome::Failed,
                Err(e) if e.code().map(|c| c.code()) == Some("BT001") => Outcome::Lost,
                Err(e) => {
                    l.problem(format!("fail_step: {}", describe(&e)));
                    continue;
                }
            };
            if let Some(claim) = l.claims.get_mut(&(id, attempt)) {
                claim.1 = Some(outcome);
            }
        }
    }
}

/// Until `stop`, checks what must hold in every snapshot for the runs of
/// `workflows`: a lease token exactly while a step runs; a finished run has
/// no unfinished step; a succeeded run only succeeded steps.
async fn monitor_session(workflows: Vec<String>, ledger: Shared, stop: Arc<AtomicBool>) {
    let db = connect().await;
    while !stop.load(Ordering::Relaxed) {
        match db.query_one(CONSISTENT, &[&workflows]).await {
            Ok(r) => {
                let counts: (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
                if counts != (0, 0, 0) {
                    ledger.lock().unwrap().problem(format!(
                        "inconsistent snapshot (fencing, unfinished steps of finished runs, \
                         unsucceeded steps of succeeded runs): {counts:?}"
                    ));
                }
            }
            Err(e) => ledger
                .lock()
                .unwrap()
                .problem(format!("monitor: {}", describe(&e))),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const CONSISTENT: &str = "
    SELECT (SELECT count(*) FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
             WHERE r.workflow = ANY ($1) AND (s.lease_token IS NOT NULL) <> (s.status = 'running')),
           (SELECT count(*) FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
             WHERE r.workflow = ANY ($1) AND r.finished_at IS NOT NULL
               AND s.status IN ('blocked', 'scheduled', 'ready', 'running', 'waiting')),
           (SELECT count(*) FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
             WHERE r.workflow = ANY ($1) AND r.status = 'succeeded' AND s.status <> 'succeeded')";

/// The runs an operator works on: top-level runs (enqueued or forked) of
/// the fan-out workflow (`true`) or of the child workflow (`false`).
type Tracked = Arc<Mutex<Vec<(Uuid, bool)>>>;

const FAN_STEPS: [&str; 7] = ["root", "f1", "f2", "f3", "each", "sub", "join"];

/// An operator on the client's pool: `ops` random operations on random runs
/// (tracked ones, and child runs), with the client's API. Refusals
/// (`WrongState`, `NotFound`) are expected; any other error is a problem.
/// Returns how many of each operation succeeded.
#[allow(clippy::too_many_arguments)]
async fn operator_session(
    c: Client,
    child_wf: String,
    tracked: Tracked,
    deleted: Arc<Mutex<HashSet<Uuid>>>,
    ledger: Shared,
    ops: usize,
    max_runs: usize,
) -> BTreeMap<&'static str, usize> {
    let mut rng = Rng::new();
    let mut done = BTreeMap::new();
    let mut children: Vec<Uuid> = Vec::new();
    for i in 0..ops {
        if i % 20 == 0 {
            let conn = c.pool().get().await.unwrap();
            children = conn
                .query(
                    "SELECT id FROM baton.runs WHERE workflow = $1 AND parent_id IS NOT NULL",
                    &[&child_wf],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
        }
        let (run, fan) = if !children.is_empty() && rng.below(5) == 0 {
            (children[rng.below(children.len() as u64) as usize], false)
        } else {
            let t = tracked.lock().unwrap();
            t[rng.below(t.len() as u64) as usize]
        };
        let step = if fan {
            FAN_STEPS[rng.below(FAN_STEPS.len() as u64) as usize]
        } else {
            "work"
        };
        let roll = rng.below(100);
        let fork_room = tracked.lock().unwrap().len() < max_runs;
        let (name, result): (&'static str, baton::Result<()>) = if roll < 20 {
            match c.cancel(run).await {
                Ok(true) => ("cancel", Ok(())),
                Ok(false) => continue,
                Err(e) => ("cancel", Err(e)),
            }
        } else if roll < 40 {
            ("resume", c.resume(run).await)
        } else if roll < 60 {
            ("retry_from", c.retry_from(run, step).await)
        } else if roll < 68 {
            // cancel and resume in one transaction of the caller's: a restart
            // of the steps that did not succeed, the run lock held throughout
            let mut conn = c.pool().get().await.unwrap();
            let tx = conn.transaction().await.unwrap();
            let result = match tx
                .query_one("SELECT baton.cancel_workflow($1)", &[&run])
                .await
            {
                Ok(_) => resume_in(&*tx, run).await,
                Err(e) => Err(e.into()),
            };
            let result = match result {
                Ok(()) => tx.commit().await.map_err(Error::from),
                Err(e) => Err(e),
            };
            ("restart", result)
        } else if roll < 84 {
            if !fork_room {
                continue;
            }
            let opts = match rng.below(3) {
                0 => ForkOptions::default(),
                1 => ForkOptions::default().input(&json!({"forked": i})),
                _ => ForkOptions::default().version(ForkVersion::Latest),
            };
            // half of them replace their source: fork and cancel it at once
            let replace = rng.below(2) == 0;
            let mut conn = c.pool().get().await.unwrap();
            let tx = conn.transaction().await.unwrap();
            let mut result = fork_in(&*tx, run, step, opts).await;
            if replace {
                if let Ok(id) = result {
                    result = tx
                        .query_one("SELECT baton.cancel_workflow($1)", &[&run])
                        .await
                        .map(|_| id)
                        .map_err(Error::from);
                }
            }
            let result = match result {
                Ok(id) => tx.commit().await.map(|_| id).map_err(Error::from),
                Err(e) => Err(e),
            };
            let name = if replace { "fork_and_cancel" } else { "fork" };
            match result {
                Ok(id) => {
                    tracked.lock().unwrap().push((id, fan));
                    (name, Ok(()))
                }
                Err(e) => (name, Err(e)),
            }
        } else {
            if tracked.lock().unwrap().len() < 8 {
                continue;
            }
            let result = c.delete(run, rng.below(2) == 0).await;
            if result.is_ok() {
                tracked.lock().unwrap().retain(|(id, _)| *id != run);
                deleted.lock().unwrap().insert(run);
            }
            ("delete", result)
        };
        match result {
            Ok(()) => *done.entry(name).or_insert(0) += 1,
            Err(Error::WrongState { .. } | Error::NotFound(_)) => {}
            Err(e) => ledger.lock().unwrap().problem(format!(
                "{name} of {run}: {e} (SQLSTATE {:?})",
                e.sqlstate()
            )),
        }
        tokio::time::sleep(Duration::from_micros(rng.below(3000))).await;
    }
    done
}

fn quick_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(40),
        multiplier: 2.0,
    }
}

/// Print what is left unfinished of `workflows`' runs, for a failure message.
async fn unfinished_report(db: &Db, workflows: &[String]) -> String {
    db.query(
        "SELECT r.id::text, r.status::text, r.parent_id::text,
                string_agg(s.name || coalesce('#' || s.map_index, '') || '=' || s.status || '/' || s.attempt
                           || coalesce(' waits ' || s.waiting_on, ''), ', ' ORDER BY s.step_no)
           FROM baton.runs r JOIN baton.steps s ON s.run_id = r.id
          WHERE r.workflow = ANY ($1) AND r.finished_at IS NULL
          GROUP BY r.id, r.status, r.parent_id LIMIT 10",
        &[&workflows],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        format!(
            "{} {} parent {:?}: {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, Option<String>>(2),
            r.get::<_, String>(3)
        )
    })
    .collect::<Vec<_>>()
    .join("\n")
}

/// A fan-out workflow (a root; three steps, a map over the root's output
/// and a child workflow after it; a join after all of them), 6 worker
/// sessions claiming and completing in batches over several runs (failing
/// some attempts), 3 operators calling cancel, resume, retry_from, fork and
/// delete on the same runs and their child runs in a loop (also cancel and
/// resume, or fork and cancel, in one transaction of theirs, with the `_in`
/// variants), and a session
/// checking every snapshot. No deadlock (40P01) or other error; every run
/// reaches a final state; each attempt was handed out once, and the history
/// (step_attempts) holds exactly the attempts the workers claimed, each with
/// the outcome the worker saw, numbered 1, 2, ... per step; deleted runs
/// leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_race_worker_sessions_on_the_same_runs() {
    let c = client().await;
    let admin = connect().await;
    let (child, wf, queue) = (unique("race_kid"), unique("race_fan"), unique("race_q"));
    c.define_workflow(
        &WorkflowDef::new(&child)
            .queue(&queue)
            .step(Step::new("work").max_attempts(3).backoff(quick_backoff())),
    )
    .await
    .unwrap();
    let task = |name: &str| Step::new(name).max_attempts(3).backoff(quick_backoff());
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(task("root"))
            .step(task("f1").after(["root"]))
            .step(task("f2").after(["root"]))
            .step(task("f3").after(["root"]))
            .step(
                Step::map("each", "root")
                    .max_attempts(3)
                    .backoff(quick_backoff()),
            )
            .step(
                Step::workflow("sub", &child)
                    .after(["root"])
                    .max_attempts(2),
            )
            .step(task("join").after(["f1", "f2", "f3", "each", "sub"])),
    )
    .await
    .unwrap();
    let workflows = vec![wf.clone(), child.clone()];
    let tracked: Tracked = Arc::new(Mutex::new(Vec::new()));
    for i in 0..16 {
        let run = start(&c, &wf, json!({ "i": i })).await;
        tracked.lock().unwrap().push((run, true));
    }

    let ledger: Shared = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut sessions = Vec::new();
    for n in 0..6 {
        sessions.push(tokio::spawn(worker_session(
            format!("race-worker-{n}"),
            queue.clone(),
            ledger.clone(),
            stop.clone(),
            true,
        )));
    }
    sessions.push(tokio::spawn(monitor_session(
        workflows.clone(),
        ledger.clone(),
        stop.clone(),
    )));
    let deleted: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let operators: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(operator_session(
                c.clone(),
                child.clone(),
                tracked.clone(),
                deleted.clone(),
                ledger.clone(),
                250,
                40,
            ))
        })
        .collect();
    let mut done: BTreeMap<&str, usize> = BTreeMap::new();
    for o in operators {
        for (name, n) in o.await.unwrap() {
            *done.entry(name).or_insert(0) += n;
        }
    }

    // every run reaches a final state
    let drained = eventually(WAIT, || async {
        admin
            .query_one(
                "SELECT count(*) FROM baton.runs WHERE workflow = ANY ($1) AND finished_at IS NULL",
                &[&workflows],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
    let left = if drained {
        String::new()
    } else {
        unfinished_report(&admin, &workflows).await
    };
    stop.store(true, Ordering::Relaxed);
    for s in sessions {
        s.await.unwrap();
    }
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        !ledger.problems.iter().any(|p| p.contains("40P01")),
        "a deadlock: {:#?}",
        ledger.problems
    );
    assert!(ledger.problems.is_empty(), "{:#?}", ledger.problems);
    assert!(drained, "runs left unfinished:\n{left}");
    for op in [
        "cancel",
        "resume",
        "retry_from",
        "restart",
        "fork",
        "fork_and_cancel",
        "delete",
    ] {
        assert!(
            done.get(op).copied().unwrap_or(0) > 0,
            "no {op} took effect: {done:?}"
        );
    }
    eprintln!(
        "operations that took effect: {done:?}; attempts claimed: {}",
        ledger.claims.len()
    );

    // tracked runs exist, deleted ones do not
    let existing: HashSet<Uuid> = admin
        .query(
            "SELECT id FROM baton.runs WHERE workflow = ANY ($1)",
            &[&workflows],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (run, _) in tracked.lock().unwrap().iter() {
        assert!(existing.contains(run), "run {run} vanished");
    }
    for run in deleted.lock().unwrap().iter() {
        assert!(!existing.contains(run), "deleted run {run} is still there");
    }
    let r = admin.query_one(CONSISTENT, &[&workflows]).await.unwrap();
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)),
        (0, 0, 0)
    );

    // the history holds exactly the claimed attempts, as they ended
    let rows = admin
        .query(
            "SELECT a.step_id, a.attempt, a.outcome FROM baton.step_attempts a
               JOIN baton.runs r ON r.id = a.workflow_id
              WHERE r.workflow = ANY ($1)
                AND NOT EXISTS (SELECT FROM baton.steps t
                                 WHERE t.step_id = a.step_id AND t.kind <> 'task')",
            &[&workflows],
        )
        .await
        .unwrap();
    let mut history: HashMap<(i64, i32), String> = HashMap::new();
    let mut numbers: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
    for r in &rows {
        let (id, attempt, outcome): (i64, i32, String) = (r.get(0), r.get(1), r.get(2));
        assert!(
            history.insert((id, attempt), outcome).is_none(),
            "step {id} attempt {attempt} is in the history twice"
        );
        numbers.entry(id).or_default().push(attempt);
    }
    let mut wrong = Vec::new();
    for (key, (run, outcome)) in &ledger.claims {
        if !existing.contains(run) {
            continue;
        }
        let outcome = outcome.expect("every claimed attempt was reported");
        match history.get(key) {
            Some(recorded) if recorded == outcome.recorded() => {}
            other => wrong.push(format!(
                "step {} attempt {} of {run}: the worker saw {outcome:?}, the history has {other:?}",
                key.0, key.1
            )),
        }
    }
    for key in history.keys() {
        let claimed = ledger
            .claims
            .get(key)
            .is_some_and(|(run, _)| existing.contains(run));
        if !claimed {
            wrong.push(format!(
                "step {} attempt {} was never claimed",
                key.0, key.1
            ));
        }
    }
    wrong.truncate(20);
    assert!(wrong.is_empty(), "{wrong:#?}");
    for (id, mut attempts) in numbers {
        attempts.sort();
        assert_eq!(
            attempts,
            (1..=attempts.len() as i32).collect::<Vec<_>>(),
            "attempts of step {id}"
        );
    }

    // deleted runs (and their child runs) leave nothing behind
    let gone: Vec<Uuid> = ledger
        .claims
        .values()
        .map(|(run, _)| *run)
        .chain(deleted.lock().unwrap().iter().copied())
        .filter(|run| !existing.contains(run))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let r = admin
        .query_one(
            "SELECT (SELECT count(*) FROM baton.steps WHERE run_id = ANY ($1)),
                    (SELECT count(*) FROM baton.attempts WHERE run_id = ANY ($1)),
                    (SELECT count(*) FROM baton.checkpoints WHERE run_id = ANY ($1)),
                    (SELECT count(*) FROM baton.run_log WHERE run_id = ANY ($1)),
                    (SELECT count(*) FROM baton.runs c WHERE c.workflow = $2 AND c.parent_id IS NOT NULL
                        AND NOT EXISTS (SELECT FROM baton.runs p WHERE p.id = c.parent_id))",
            &[&gone, &child],
        )
        .await
        .unwrap();
    assert_eq!(
        (0..5).map(|i| r.get::<_, i64>(i)).collect::<Vec<_>>(),
        [0, 0, 0, 0, 0],
        "rows of {} deleted runs, or orphaned child runs",
        gone.len()
    );
}

/// Purge while workers complete runs, new runs come in and a session
/// resumes old failed and cancelled runs: it deletes exactly the runs that
/// finished before the cutoff (and were not resumed first), with everything
/// of theirs, and nothing unfinished or younger: not the runs made to look
/// old by their creation, not the running ones, not those finished during
/// the purge. Two purges run at once, in small batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_while_workers_run() {
    let c = client().await;
    let admin = connect().await;
    let (wf, queue, hold) = (unique("purge_wf"), unique("purge_q"), unique("purge_hold"));
    c.define_workflow(
        &WorkflowDef::new(&wf)
            .queue(&queue)
            .step(Step::new("s").max_attempts(1)),
    )
    .await
    .unwrap();

    // 60 finished runs to age: 10 cancelled, 10 failed, 40 succeeded
    let mut cancelled = Vec::new();
    for i in 0..10 {
        let run = start(&c, &wf, json!({ "old": i })).await;
        assert!(c.cancel(run).await.unwrap());
        cancelled.push(run);
    }
    let mut old = cancelled.clone();
    for i in 0..50 {
        old.push(start(&c, &wf, json!({ "old": 10 + i })).await);
    }
    let mut failed = Vec::new();
    loop {
        let rows = admin
            .query(
                "SELECT step_id, lease_token, workflow_id FROM baton.claim_steps('purge-setup', ARRAY[$1], 50)",
                &[&queue],
            )
            .await
            .unwrap();
        if rows.is_empty() {
            break;
        }
        for r in rows {
            let (id, token, run): (i64, Uuid, Uuid) = (r.get(0), r.get(1), r.get(2));
            if failed.len() < 10 {
                admin
                    .execute(
                        "SELECT baton.fail_step($1, $2, 'old failure', false)",
                        &[&id, &token],
                    )
                    .await
                    .unwrap();
                failed.push(run);
            } else {
                admin
                    .execute("SELECT baton.complete_step($1, $2)", &[&id, &token])
                    .await
                    .unwrap();
            }
        }
    }
    // unfinished runs that are old by their creation: scheduled for later,
    // and running (held by a session that does not complete them)
    let mut unfinished = Vec::new();
    for i in 0..5 {
        let opts = EnqueueOptions::default().delay(Duration::from_secs(3600));
        unfinished.push(c.enqueue(&wf, &json!({ "later": i }), opts).await.unwrap());
        let opts = EnqueueOptions::default().queue(&hold);
        unfinished.push(c.enqueue(&wf, &json!({ "held": i }), opts).await.unwrap());
    }
    let held = admin
        .query(
            "SELECT step_id FROM baton.claim_steps('purge-holder', ARRAY[$1], 10, '10 minutes')",
            &[&hold],
        )
        .await
        .unwrap();
    assert_eq!(held.len(), 5);
    // runs someone else made look old before (a test that died): purged too
    let leftovers: Vec<Uuid> = admin
        .query(
            "SELECT id FROM baton.runs WHERE finished_at < now() - interval '1 day'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    admin
        .execute(
            "UPDATE baton.runs SET finished_at = now() - interval '2 days' WHERE id = ANY ($1)",
            &[&old],
        )
        .await
        .unwrap();
    admin
        .execute(
            "UPDATE baton.runs SET created_at = now() - interval '3 days' WHERE id = ANY ($1)",
            &[&unfinished],
        )
        .await
        .unwrap();
    let r = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),
                    count(*) FILTER (WHERE status = 'cancelled') FROM baton.runs WHERE id = ANY ($1)",
            &[&old],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)),
        (40, 10, 10)
    );

    // workers, a stream of new runs, and a session resuming old runs
    let ledger: Shared = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|n| {
            tokio::spawn(worker_session(
                format!("purge-worker-{n}"),
                queue.clone(),
                ledger.clone(),
                stop.clone(),
                false,
            ))
        })
        .collect();
    let stop_enqueuing = Arc::new(AtomicBool::new(false));
    let enqueuer = {
        let (c, wf, stop) = (c.clone(), wf.clone(), stop_enqueuing.clone());
        tokio::spawn(async move {
            let mut young = Vec::new();
            // until the purges are over, and at least 20
            while !stop.load(Ordering::Relaxed) || young.len() < 20 {
                young.push(start(&c, &wf, json!({ "young": young.len() })).await);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            young
        })
    };
    let resumer = {
        let c = c.clone();
        let mut targets: Vec<Uuid> = failed.iter().chain(&cancelled).copied().collect();
        targets.sort();
        tokio::spawn(async move {
            let mut resumed = HashSet::new();
            let mut missing = HashSet::new();
            for run in targets {
                match c.resume(run).await {
                    Ok(()) => {
                        resumed.insert(run);
                    }
                    Err(Error::NotFound(_)) => {
                        missing.insert(run);
                    }
                    Err(e) => panic!("resume {run}: {e:?}"),
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (resumed, missing)
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let day = Duration::from_secs(86400);
    let (a, b) = tokio::join!(c.purge(day, Some(7)), c.purge(day, Some(3)));
    let purged = a.unwrap() + b.unwrap();
    let (resumed, missing) = resumer.await.unwrap();
    stop_enqueuing.store(true, Ordering::Relaxed);
    let young = enqueuer.await.unwrap();
    let drained = eventually(WAIT, || async {
        admin
            .query_one(
                "SELECT count(*) FROM baton.runs WHERE workflow = $1 AND queue = $2 AND finished_at IS NULL
                    AND id <> ALL ($3)",
                &[&wf, &queue, &unfinished],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let problems = std::mem::take(&mut ledger.lock().unwrap().problems);
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(drained, "the workers did not finish the young runs");

    let exists = |ids: Vec<Uuid>| {
        let admin = &admin;
        async move {
            admin
                .query("SELECT id FROM baton.runs WHERE id = ANY ($1)", &[&ids])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect::<HashSet<Uuid>>()
        }
    };
    let old_left = exists(old.clone()).await;
    let leftovers_left = exists(leftovers.clone()).await;
    let gone: Vec<Uuid> = old
        .iter()
        .chain(&leftovers)
        .filter(|r| !old_left.contains(r) && !leftovers_left.contains(r))
        .copied()
        .collect();
    assert_eq!(
        purged,
        gone.len() as u64,
        "purge counts exactly the runs it deleted"
    );
    assert!(
        leftovers_left.is_empty(),
        "older runs left: {leftovers_left:?}"
    );
    // an old run is left exactly when it was resumed before the purge came to it
    assert_eq!(old_left, resumed, "old runs left vs runs resumed");
    for run in &missing {
        assert!(!old_left.contains(run));
    }
    assert_eq!(resumed.len() + missing.len(), 20);
    // nothing young or unfinished went
    let keep: Vec<Uuid> = young.iter().chain(&unfinished).copied().collect();
    assert_eq!(
        exists(keep.clone()).await.len(),
        keep.len(),
        "a young or unfinished run was purged"
    );
    let r = admin
        .query_one(
            "SELECT (SELECT count(*) FROM baton.runs WHERE finished_at < now() - interval '1 day'),
                    (SELECT count(*) FROM baton.steps WHERE run_id = ANY ($1)),
                    (SELECT count(*) FROM baton.attempts WHERE run_id = ANY ($1)),
                    (SELECT count(*) FROM baton.run_log WHERE run_id = ANY ($1)),
                    (SELECT count(*) FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
                      WHERE r.id = ANY ($2) AND s.status = 'running' AND s.lease_token IS NOT NULL)",
            &[&gone, &unfinished],
        )
        .await
        .unwrap();
    assert_eq!(
        (0..5).map(|i| r.get::<_, i64>(i)).collect::<Vec<_>>(),
        [0, 0, 0, 0, 5],
        "old runs left, rows of purged runs, held steps"
    );
    for run in unfinished {
        c.cancel(run).await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// A child run deleted while its parent's lock is held
// ---------------------------------------------------------------------------

/// A parent whose first step "call" starts a child run (one step "inner")
/// and whose second step "side" runs beside it, on a queue of their own;
/// one run of it, with the leases of both task steps (the parent's side and
/// the child's inner): (parent run, child run, side, inner).
async fn parent_with_a_child(c: &Client, db: &Db) -> (Uuid, Uuid, (i64, Uuid), (i64, Uuid)) {
    let (child, parent, queue) = (unique("del_kid"), unique("del_parent"), unique("del_q"));
    c.define_workflow(
        &WorkflowDef::new(&child)
            .queue(&queue)
            .step(Step::new("inner")),
    )
    .await
    .unwrap();
    c.define_workflow(
        &WorkflowDef::new(&parent)
            .queue(&queue)
            .step(Step::workflow("call", &child))
            .step(Step::new("side")),
    )
    .await
    .unwrap();
    let p = start(c, &parent, json!({})).await;
    let kid = child_of(c, p).await;
    let rows = db
        .query(
            "SELECT workflow_id, step_id, lease_token FROM baton.claim_steps('del-worker', ARRAY[$1], 10)",
            &[&queue],
        )
        .await
        .unwrap();
    let lease = |run: Uuid| {
        let r = rows
            .iter()
            .find(|r| r.get::<_, Uuid>(0) == run)
            .expect("a leased step of each run");
        (r.get::<_, i64>(1), r.get::<_, Uuid>(2))
    };
    (p, kid, lease(p), lease(kid))
}

/// Whether the parent's "call" step no longer waits for a child that is
/// gone: it finished, or it waits for a child run that exists (a retry).
async fn parent_not_stranded(c: &Client, p: Uuid) -> bool {
    let graph = c.workflow_graph(p).await.unwrap();
    let call = &graph.steps[0];
    graph.run.finished_at.is_some()
        || call.status != "waiting"
        || call.child_runs.as_ref().is_some_and(|kids| {
            kids.iter()
                .any(|k| k.status == "pending" || k.status == "running")
        })
}

/// A running child run deleted (force) while a worker's transaction holds
/// its parent's lock (completing the parent's other step): the parent must
/// hear of it, as it does of a cancelled child (its step's attempt fails,
/// and a retry starts a new child). `_child_finished` finds the parent's lock
/// taken and leaves a `child_finished` signal; the child is deleted before
/// the background worker does it, and `_child_done` then fails the attempt
/// of the step whose child is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_deleted_while_its_parent_is_locked_does_not_strand_the_parent() {
    let c = client().await;
    let db = connect().await;
    let (p, kid, side, _inner) = parent_with_a_child(&c, &db).await;
    let mut worker = connect().await;
    let tx = worker.transaction().await.unwrap();
    tx.query_one("SELECT baton.complete_step($1, $2)", &[&side.0, &side.1])
        .await
        .unwrap();
    // the delete does not wait for the parent's lock (it only tries it)
    let deleted = tokio::time::timeout(Duration::from_secs(10), c.delete(kid, true)).await;
    tx.commit().await.unwrap();
    deleted.expect("the delete waited for the parent").unwrap();
    refused!(c.run(kid).await, Error::NotFound(_));
    let heard = eventually(Duration::from_secs(10), || parent_not_stranded(&c, p)).await;
    let graph = c.workflow_graph(p).await.unwrap();
    c.cancel(p).await.unwrap();
    assert!(
        heard,
        "the parent's step still waits for deleted child {kid}: {:?}",
        graph.steps[0]
    );
}

/// A child that finished while its parent's lock was taken (so that the
/// parent hears of it by a signal, within milliseconds): deleting it before
/// the parent took its result is refused (`WrongState`: the parent's step
/// would lose the child's output), and works once the parent has it; the
/// parent's step then has the child's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_child_is_not_deleted_before_its_parent_took_its_result() {
    let c = client().await;
    let db = connect().await;
    let (p, kid, side, inner) = parent_with_a_child(&c, &db).await;
    let mut worker = connect().await;
    let tx = worker.transaction().await.unwrap();
    tx.query_one("SELECT baton.complete_step($1, $2)", &[&side.0, &side.1])
        .await
        .unwrap();
    db.query_one(
        "SELECT baton.complete_step($1, $2, '\"inner done\"')",
        &[&inner.0, &inner.1],
    )
    .await
    .unwrap();
    assert_eq!(status(&c, kid).await, "succeeded");
    let refused = c.delete(kid, false).await;
    assert!(
        matches!(refused, Err(Error::WrongState { .. })),
        "deleting a child whose parent has not taken its result: {refused:?}"
    );
    tx.commit().await.unwrap();
    let heard = eventually(Duration::from_secs(10), || async {
        status(&c, p).await == "succeeded"
    })
    .await;
    assert!(heard, "the parent took its child's result");
    c.delete(kid, false).await.unwrap();
    let graph = c.workflow_graph(p).await.unwrap();
    assert_eq!(graph.steps[0].status, "succeeded");
    let call_output: serde_json::Value = db
        .query_one(
            "SELECT output FROM baton.steps WHERE run_id = $1 AND name = 'call'",
            &[&p],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(call_output, serde_json::json!({"inner": "inner done"}));
}
