//! The core engine's guarantees, tested with several real sessions against the
//! test cluster (pg_baton preloaded, background worker every 200 ms).
//! Single-session behaviour of each SQL function is covered by pg_test/.

mod common;

use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

/// Session A enqueues with a key inside an open transaction; session B
/// enqueues with the same key and must wait; then A ends its transaction with
/// `end` (COMMIT or ROLLBACK). Returns A's connection, the workflow, and the run
/// ids A and B got.
async fn race_keyed_enqueue(end: &str) -> (tokio_postgres::Client, String, uuid::Uuid, uuid::Uuid) {
    let a = connect().await;
    let b = connect().await;
    let wf = unique("idem");
    define(&a, &wf, &unique("q"), json!([{"name": "only"}])).await;
    let sql = "SELECT baton.enqueue_workflow($1, '{}', idempotency_key => 'k1')";

    a.batch_execute("BEGIN").await.unwrap();
    let first: uuid::Uuid = a.query_one(sql, &[&wf]).await.unwrap().get(0);
    // b's insert waits on a's uncommitted row
    let wf_b = wf.clone();
    let racer = tokio::spawn(async move {
        b.query_one(sql, &[&wf_b])
            .await
            .map(|r| r.get::<_, uuid::Uuid>(0))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !racer.is_finished(),
        "the second enqueue must wait for the first transaction"
    );
    a.batch_execute(end).await.unwrap();
    let second = racer.await.unwrap().expect("second enqueue");
    (a, wf, first, second)
}

/// Two transactions enqueue with one idempotency key at the same time: one run.
#[tokio::test]
async fn idempotent_enqueue_under_a_race() {
    let (a, wf, first, second) = race_keyed_enqueue("COMMIT").await;
    assert_eq!(first, second);
    let runs: i64 = a
        .query_one(
            "SELECT count(*) FROM baton.workflow_runs WHERE workflow = $1",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    let steps: i64 = a
        .query_one(
            "SELECT count(*) FROM baton.workflow_steps s JOIN baton.workflow_runs r ON r.id = s.workflow_id WHERE r.workflow = $1",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!((runs, steps), (1, 1));
}

/// If the first transaction rolls back, the racing one creates the run.
#[tokio::test]
async fn idempotent_enqueue_after_a_rollback() {
    let (a, _wf, first, second) = race_keyed_enqueue("ROLLBACK").await;
    assert_ne!(first, second);
    assert_eq!(run_status(&a, second).await, "pending");
}

/// Four workers drain one queue concurrently: every step exactly once.
#[tokio::test]
async fn concurrent_workers_never_share_a_step() {
    let setup = connect().await;
    let wf = unique("race");
    let queue = unique("q");
    define(&setup, &wf, &queue, json!([{"name": "a"}, {"name": "b"}])).await;
    for i in 0..150 {
        enqueue(&setup, &wf, json!({ "i": i })).await;
    }

    let mut workers = Vec::new();
    for w in 0..4 {
        let queue = queue.clone();
        workers.push(tokio::spawn(async move {
            let c = connect().await;
            let name = format!("w{w}");
            let mut seen = Vec::new();
            loop {
                let batch = claim(&c, &name, &queue, 7, "30 seconds").await;
                if batch.is_empty() {
                    break;
                }
                for s in batch {
                    c.query_one(
                        "SELECT baton.complete_step($1, $2, '{}')",
                        &[&s.step_id, &s.token],
                    )
                    .await
                    .expect("complete own lease");
                    seen.push(s.step_id);
                }
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 300, "every step claimed once");
    assert_eq!(distinct.len(), 300, "no step claimed twice");
    let done: i64 = setup
        .query_one(
            "SELECT count(*) FROM baton.workflow_runs WHERE workflow = $1 AND status = 'succeeded'",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(done, 150);
}

/// The background worker alone returns an expired lease; the late worker's
/// completion is refused with BT001.
#[tokio::test]
async fn background_worker_reclaims_expired_leases() {
    let c = connect().await;
    let wf = unique("reclaim");
    let queue = unique("q");
    define(
        &c,
        &wf,
        &queue,
        json!([{"name": "slow", "max_attempts": 3}]),
    )
    .await;
    let run = enqueue(&c, &wf, json!({})).await;
    let s = claim(&c, "doomed", &queue, 1, "300 milliseconds")
        .await
        .remove(0);

    // Nobody calls claim_steps on this queue: only the background worker can do it.
    let reclaimed = eventually(Duration::from_secs(10), || async {
        c.query_one(
            "SELECT status = 'ready' AND attempt = 1 FROM baton.workflow_steps WHERE step_id = $1",
            &[&s.step_id],
        )
        .await
        .unwrap()
        .get(0)
    })
    .await;
    assert!(reclaimed, "background worker did not reclaim the lease");
    let outcome: String = c
        .query_one(
            "SELECT outcome FROM baton.step_attempts WHERE step_id = $1 AND attempt = 1",
            &[&s.step_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "lease_expired");

    let late = c
        .query_one(
            "SELECT baton.complete_step($1, $2, '{}')",
            &[&s.step_id, &s.token],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&late).as_deref(), Some("BT001"));

    // The step runs again, as attempt 2, and the run completes.
    let again = claim(&c, "rescuer", &queue, 1, "30 seconds")
        .await
        .remove(0);
    assert_eq!((again.step_id, again.attempt), (s.step_id, 2));
    let status: String = c
        .query_one(
            "SELECT baton.complete_step($1, $2, '{}')",
            &[&again.step_id, &again.token],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "succeeded");
    assert_eq!(run_status(&c, run).await, "succeeded");
}

/// Exactly-once: a worker writes its side effect and completes in one
/// transaction; its lease is lost meanwhile, so everything rolls back and only
/// the worker that took over leaves its write.
#[tokio::test]
async fn lost_lease_rolls_back_the_workers_transaction() {
    let c = connect().await;
    let slow = connect().await;
    let table = unique("side_effects");
    c.batch_execute(&format!("CREATE TABLE {table} (worker text)"))
        .await
        .unwrap();
    let wf = unique("exactly_once");
    let queue = unique("q");
    define(&c, &wf, &queue, json!([{"name": "charge"}])).await;
    let run = enqueue(&c, &wf, json!({})).await;
    let first = claim(&slow, "slow", &queue, 1, "200 milliseconds")
        .await
        .remove(0);

    slow.batch_execute("BEGIN").await.unwrap();
    slow.execute(&format!("INSERT INTO {table} VALUES ('slow')"), &[])
        .await
        .unwrap();

    // The lease expires; another worker takes the step over and finishes it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = claim_one(&c, "fast", &queue, "30 seconds").await;
    assert_eq!((second.step_id, second.attempt), (first.step_id, 2));
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(&format!("INSERT INTO {table} VALUES ('fast')"), &[])
        .await
        .unwrap();
    c.query_one(
        "SELECT baton.complete_step($1, $2, '{}')",
        &[&second.step_id, &second.token],
    )
    .await
    .unwrap();
    c.batch_execute("COMMIT").await.unwrap();

    let err = slow
        .query_one(
            "SELECT baton.complete_step($1, $2, '{}')",
            &[&first.step_id, &first.token],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("BT001"));
    slow.batch_execute("ROLLBACK").await.unwrap();

    let writers: Vec<String> = c
        .query(&format!("SELECT worker FROM {table}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(writers, vec!["fast".to_string()]);
    assert_eq!(run_status(&c, run).await, "succeeded");
}

/// Backoff: the wait before retry n is initial * multiplier^(n-1) (+ up to
/// 10% jitter), capped at max; the last failure fails the step and the run.
#[tokio::test]
async fn retries_back_off_then_fail_the_run() {
    let c = connect().await;
    let wf = unique("backoff");
    let queue = unique("q");
    define(
        &c,
        &wf,
        &queue,
        json!([
            {"name": "flaky", "max_attempts": 4,
             "backoff": {"initial": "100 milliseconds", "max": "300 milliseconds", "multiplier": 2}},
            {"name": "after", "after": ["flaky"]}
        ]),
    )
    .await;
    let run = enqueue(&c, &wf, json!({})).await;

    // expected waits for retries 1..3: 0.1, 0.2, 0.3 (capped) seconds
    for (n, expected) in [(1, 0.1), (2, 0.2), (3, 0.3)] {
        let s = loop {
            if let Some(s) = claim(&c, "w", &queue, 1, "30 seconds").await.pop() {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(s.attempt, n);
        let row = c
            .query_one(
                "SELECT baton.fail_step($1, $2, 'transient')",
                &[&s.step_id, &s.token],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "retrying");
        // the attempt ended at the failing transaction's now(); run_at is the retry
        let wait: f64 = c
            .query_one(
                "SELECT extract(epoch FROM s.run_at - a.finished_at)::float8 \
                   FROM baton.steps s JOIN baton.attempts a USING (run_id, step_id) \
                  WHERE s.step_id = $1 AND a.attempt = $2",
                &[&s.step_id, &n],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            wait >= expected * 0.99 && wait <= expected * 1.11,
            "retry {n}: waited {wait}s, expected {expected}s + up to 10%"
        );
    }
    let last = loop {
        if let Some(s) = claim(&c, "w", &queue, 1, "30 seconds").await.pop() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(last.attempt, 4);
    let outcome: String = c
        .query_one(
            "SELECT baton.fail_step($1, $2, 'still broken')",
            &[&last.step_id, &last.token],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "failed");
    let row = c
        .query_one(
            "SELECT status, error FROM baton.workflow_runs WHERE id = $1",
            &[&run],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    assert!(row.get::<_, String>(1).contains("flaky"));
    let statuses: Vec<(String, String)> = c
        .query(
            "SELECT step, status FROM baton.workflow_steps WHERE workflow_id = $1 ORDER BY step",
            &[&run],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("after".into(), "cancelled".into()),
            ("flaky".into(), "failed".into())
        ]
    );
    let attempts: i64 = c
        .query_one("SELECT count(*) FROM baton.step_attempts WHERE workflow_id = $1 AND outcome = 'failed'", &[&run])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 4);
}

/// A queue limited to 2: ten sessions claiming at once get 2 steps in all.
#[tokio::test]
async fn queue_concurrency_limit_holds_across_sessions() {
    let c = connect().await;
    let wf = unique("limited");
    let queue = unique("q");
    define(&c, &wf, &queue, json!([{"name": "s"}])).await;
    c.execute(
        "SELECT baton.configure_queue($1, concurrency => 2)",
        &[&queue],
    )
    .await
    .unwrap();
    for _ in 0..20 {
        enqueue(&c, &wf, json!({})).await;
    }
    let mut claimers = Vec::new();
    for w in 0..10 {
        let queue = queue.clone();
        claimers.push(tokio::spawn(async move {
            let c = connect().await;
            claim(&c, &format!("w{w}"), &queue, 5, "30 seconds").await
        }));
    }
    let mut claimed = Vec::new();
    for h in claimers {
        claimed.extend(h.await.unwrap());
    }
    assert_eq!(
        claimed.len(),
        2,
        "limit 2 must hold across concurrent claims"
    );

    // Finishing one frees one slot.
    let s = &claimed[0];
    c.query_one(
        "SELECT baton.complete_step($1, $2)",
        &[&s.step_id, &s.token],
    )
    .await
    .unwrap();
    assert_eq!(claim(&c, "x", &queue, 5, "30 seconds").await.len(), 1);
    assert_eq!(claim(&c, "x", &queue, 5, "30 seconds").await.len(), 0);
}

/// Enqueue and downstream readiness NOTIFY `baton_ready` with the queue name.
#[tokio::test]
async fn notify_wakes_listeners() {
    let c = connect().await;
    let (_listener, mut rx) = connect_listening("baton_ready").await;
    let wf = unique("notify");
    let queue = unique("q");
    define(
        &c,
        &wf,
        &queue,
        json!([{"name": "a"}, {"name": "b", "after": ["a"]}]),
    )
    .await;

    enqueue(&c, &wf, json!({})).await;
    let got = wait_for_payload(&mut rx, &queue, Duration::from_secs(5)).await;
    assert!(got, "no NOTIFY for enqueue");

    let s = claim(&c, "w", &queue, 1, "30 seconds").await.remove(0);
    c.query_one(
        "SELECT baton.complete_step($1, $2)",
        &[&s.step_id, &s.token],
    )
    .await
    .unwrap();
    assert!(
        wait_for_payload(&mut rx, &queue, Duration::from_secs(5)).await,
        "no NOTIFY for downstream step"
    );

    // A step handed back is ready again at once, and said so.
    let s = claim(&c, "w", &queue, 1, "30 seconds").await.remove(0);
    c.execute("SELECT baton.release_step($1, $2)", &[&s.step_id, &s.token])
        .await
        .unwrap();
    assert!(
        wait_for_payload(&mut rx, &queue, Duration::from_secs(5)).await,
        "no NOTIFY for a released step"
    );

    // So is a step whose lease expired, retried at once by the background worker.
    claim(&c, "w", &queue, 1, "200 milliseconds").await;
    assert!(
        wait_for_payload(&mut rx, &queue, Duration::from_secs(10)).await,
        "no NOTIFY for a reclaimed step"
    );
}

/// A step delayed by run_at is announced by the background worker when due.
#[tokio::test]
async fn background_worker_wakes_delayed_steps() {
    let c = connect().await;
    let (_listener, mut rx) = connect_listening("baton_ready").await;
    let wf = unique("delayed");
    let queue = unique("q");
    define(&c, &wf, &queue, json!([{"name": "later"}])).await;
    c.query_one(
        "SELECT baton.enqueue_workflow($1, run_at => now() + interval '700 milliseconds')",
        &[&wf],
    )
    .await
    .unwrap();
    assert!(
        claim(&c, "w", &queue, 1, "30 seconds").await.is_empty(),
        "claimable before run_at"
    );
    assert!(
        wait_for_payload(&mut rx, &queue, Duration::from_secs(5)).await,
        "no wake-up NOTIFY"
    );
    assert_eq!(claim(&c, "w", &queue, 1, "30 seconds").await.len(), 1);
}

async fn wait_for_payload(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    payload: &str,
    timeout: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((_, p))) if p == payload => return true,
            Ok(Some(_)) => continue,
            _ => return false,
        }
    }
}

/// Completions, failures and cancels racing on the steps of the same runs
/// never deadlock and leave every run finished and consistent.
#[tokio::test]
async fn racing_transitions_on_one_run_do_not_deadlock() {
    let c = connect().await;
    let wf = unique("fanin");
    let queue = unique("q");
    let mut steps: Vec<serde_json::Value> = (0..6)
        .map(|i| json!({"name": format!("p{i}"), "max_attempts": 1}))
        .collect();
    steps.push(
        json!({"name": "join", "after": (0..6).map(|i| format!("p{i}")).collect::<Vec<_>>()}),
    );
    define(&c, &wf, &queue, serde_json::Value::Array(steps)).await;
    let mut runs = Vec::new();
    for _ in 0..20 {
        runs.push(enqueue(&c, &wf, json!({})).await);
    }
    let claimed = claim(&c, "w", &queue, 1000, "30 seconds").await;
    assert_eq!(claimed.len(), 120);

    // The parallel steps are completed or failed from twelve sessions at once
    // (the six steps of a run each in a different one), and every fourth run is
    // cancelled in the middle of it. Twelve, not one per step: the suite's other
    // tests share the cluster's 100 connections.
    const SESSIONS: usize = 12;
    let mut shares: Vec<Vec<(usize, Claimed)>> = (0..SESSIONS).map(|_| Vec::new()).collect();
    for (i, s) in claimed.into_iter().enumerate() {
        shares[i % SESSIONS].push((i, s));
    }
    let mut tasks = Vec::new();
    for share in shares {
        tasks.push(tokio::spawn(async move {
            let c = connect().await;
            let mut results = Vec::new();
            for (i, s) in share {
                let sql = if i % 5 == 0 {
                    "SELECT baton.fail_step($1, $2, 'no')"
                } else {
                    "SELECT baton.complete_step($1, $2)"
                };
                results.push(c.query_one(sql, &[&s.step_id, &s.token]).await.map(|_| ()));
            }
            results
        }));
    }
    for (i, run) in runs.iter().enumerate().filter(|(i, _)| i % 4 == 0) {
        let run = *run;
        tasks.push(tokio::spawn(async move {
            let c = connect().await;
            tokio::time::sleep(Duration::from_millis(i as u64)).await;
            vec![c
                .query_one("SELECT baton.cancel_workflow($1)", &[&run])
                .await
                .map(|_| ())]
        }));
    }
    for t in tasks {
        for e in t.await.unwrap().into_iter().filter_map(Result::err) {
            // A step whose run was failed or cancelled first has lost its lease;
            // anything else (a deadlock above all) is a bug.
            assert_eq!(
                sqlstate(&e).as_deref(),
                Some("BT001"),
                "unexpected error: {e:?}"
            );
        }
    }
    // Every run is consistent: a finished run has no step left unfinished, and a
    // run still going is waiting only on its join step.
    let bad: i64 = c
        .query_one(
            "SELECT count(*) FROM baton.workflow_runs r WHERE r.workflow = $1 AND (
               (r.status IN ('failed', 'cancelled') AND EXISTS (SELECT 1 FROM baton.workflow_steps s
                   WHERE s.workflow_id = r.id AND s.status IN ('blocked', 'ready', 'running')))
            OR (r.status = 'running' AND EXISTS (SELECT 1 FROM baton.workflow_steps s
                   WHERE s.workflow_id = r.id AND s.step <> 'join' AND s.status <> 'succeeded')))",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad, 0);
}
