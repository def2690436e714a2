//! Hardening of the SQL core and the background round, with several real
//! sessions against the test cluster (pg_baton preloaded, background worker
//! every 200 ms): a claim over several queues locks only what it takes, racing
//! bulk enqueues with the same keys wait for each other instead of
//! deadlocking, and one open transaction cannot stall the background round.

mod common;

use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

/// Lease up to `max` steps of `queues` (step id, token), in `client`'s
/// current transaction. A claim never waits on other claimers (SKIP LOCKED):
/// one that does not return within 30 s is reported as having waited.
async fn claim_queues(
    client: &tokio_postgres::Client,
    worker: &str,
    queues: &[String],
    max: i32,
) -> Vec<(i64, uuid::Uuid)> {
    let rows = tokio::time::timeout(
        Duration::from_secs(30),
        client.query(
            "SELECT step_id, lease_token FROM baton.claim_steps($1, $2, $3, '30 seconds')",
            &[&worker, &queues, &max],
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("claim_steps by {worker} waited 30 s on another transaction"))
    .expect("claim_steps");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// `per_queue` ready one-step runs on each of `n` new queues; returns the queues.
async fn ready_steps_on_queues(
    client: &tokio_postgres::Client,
    n: usize,
    per_queue: i32,
) -> Vec<String> {
    let wf = unique("multi");
    let queues: Vec<String> = (0..n).map(|_| unique("q")).collect();
    define(client, &wf, &queues[0], json!([{"name": "s"}])).await;
    for q in &queues {
        client
            .query_one(
                "SELECT baton.enqueue_workflows($1, array_fill('{}'::jsonb, ARRAY[$2::integer]), queue => $3)",
                &[&wf, &per_queue, q],
            )
            .await
            .expect("enqueue_workflows");
    }
    queues
}

/// Three queues with 7 ready steps each. Session A claims 10 of them over
/// all three queues and keeps its transaction open; session B's claim of 10
/// on the same queues gets 10, because 11 are free: A's claim holds only the
/// rows it took. Then all 21 are leased, none twice.
#[tokio::test]
async fn claim_over_several_queues_locks_only_what_it_takes() {
    let setup = connect().await;
    let a = connect().await;
    let b = connect().await;
    let queues = ready_steps_on_queues(&setup, 3, 7).await;

    a.batch_execute("BEGIN").await.unwrap();
    let took_a = claim_queues(&a, "a", &queues, 10).await;
    assert_eq!(took_a.len(), 10, "A's claim of 10 out of 21 ready steps");

    let took_b = claim_queues(&b, "b", &queues, 10).await;
    assert_eq!(
        took_b.len(),
        10,
        "B's claim of 10 while A's claim is open: 11 ready steps were not taken by A, \
         so B must get 10 (a claim must not keep rows locked that it did not take)"
    );
    a.batch_execute("COMMIT").await.unwrap();

    let rest = claim_queues(&setup, "c", &queues, 1000).await;
    let all: Vec<i64> = took_a
        .iter()
        .chain(&took_b)
        .chain(&rest)
        .map(|s| s.0)
        .collect();
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 21, "every step leased (A, B, then the rest)");
    assert_eq!(distinct.len(), 21, "no step leased twice");
    let running: i64 = setup
        .query_one(
            "SELECT count(*) FROM baton.steps WHERE queue = ANY ($1) AND status = 'running' AND attempt = 1",
            &[&queues],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(running, 21);
}

/// Twenty queues with 10 ready steps each. Inside A's open transaction after
/// a claim of 5 over all twenty, exactly those 5 rows are locked: another
/// session's `FOR UPDATE SKIP LOCKED` over the ready steps skips only them.
#[tokio::test]
async fn claim_over_twenty_queues_locks_only_its_five_rows() {
    let setup = connect().await;
    let a = connect().await;
    let b = connect().await;
    let queues = ready_steps_on_queues(&setup, 20, 10).await;

    a.batch_execute("BEGIN").await.unwrap();
    let took = claim_queues(&a, "a", &queues, 5).await;
    assert_eq!(took.len(), 5);

    // B's snapshot does not see A's uncommitted claim: all 200 look ready.
    let ready: i64 = b
        .query_one(
            "SELECT count(*) FROM baton.steps WHERE status = 'ready' AND queue = ANY ($1)",
            &[&queues],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ready, 200);
    let unlocked: i64 = tokio::time::timeout(
        Duration::from_secs(30),
        b.query_one(
            "SELECT count(*) FROM (SELECT 1 FROM baton.steps \
              WHERE status = 'ready' AND queue = ANY ($1) FOR UPDATE SKIP LOCKED) x",
            &[&queues],
        ),
    )
    .await
    .expect("SKIP LOCKED waited")
    .unwrap()
    .get(0);
    assert_eq!(
        ready - unlocked,
        5,
        "rows of baton.steps locked by A's open claim of 5 over 20 queues \
         (must be exactly the 5 it took)"
    );
    a.batch_execute("COMMIT").await.unwrap();
    let running: i64 = setup
        .query_one(
            "SELECT count(*) FROM baton.steps WHERE queue = ANY ($1) AND status = 'running'",
            &[&queues],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(running, 5);
}

/// Two `enqueue_workflows` calls with the same 200 idempotency keys, in
/// opposite order, started together (ten times): no deadlock or other error,
/// they wait for each other as single enqueues do; 200 runs, and both calls
/// return the same run id for each key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_batches_with_the_same_keys_wait_for_each_other() {
    const KEYS: usize = 200;
    let setup = connect().await;
    let wf = unique("batch_keys");
    define(&setup, &wf, &unique("q"), json!([{"name": "s"}])).await;
    let sql = "SELECT baton.enqueue_workflows($1, array_fill('{}'::jsonb, ARRAY[cardinality($2::text[])]), $2::text[])";
    let sessions = [Arc::new(connect().await), Arc::new(connect().await)];

    for race in 0..10 {
        let keys: Vec<String> = (0..KEYS).map(|i| format!("race{race}-key{i}")).collect();
        let reversed: Vec<String> = keys.iter().rev().cloned().collect();
        let barrier = Arc::new(Barrier::new(2));
        let mut tasks = Vec::new();
        for (session, keys) in sessions.iter().zip([keys.clone(), reversed]) {
            let (session, barrier, wf) = (session.clone(), barrier.clone(), wf.clone());
            tasks.push(tokio::spawn(async move {
                let stmt = session.prepare(sql).await.expect("prepare");
                barrier.wait().await;
                session
                    .query_one(&stmt, &[&wf, &keys])
                    .await
                    .map(|r| r.get::<_, Vec<uuid::Uuid>>(0))
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap().unwrap_or_else(|e| {
                panic!(
                    "race {race}: enqueue_workflows failed with SQLSTATE {:?}: {e:?}",
                    sqlstate(&e)
                )
            }));
        }
        let (forward, backward) = (&results[0], &results[1]);
        assert_eq!((forward.len(), backward.len()), (KEYS, KEYS));
        for i in 0..KEYS {
            assert_eq!(
                forward[i],
                backward[KEYS - 1 - i],
                "race {race}: key {} got two different runs",
                keys[i]
            );
        }
        let distinct: HashSet<_> = forward.iter().collect();
        assert_eq!(distinct.len(), KEYS, "race {race}: one run per key");
        let runs: i64 = setup
            .query_one(
                "SELECT count(*) FROM baton.runs WHERE workflow = $1 AND idempotency_key = ANY ($2)",
                &[&wf, &keys],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(runs, KEYS as i64, "race {race}: runs created");
        let steps: i64 = setup
            .query_one(
                "SELECT count(*) FROM baton.steps WHERE run_id = ANY ($1)",
                &[forward],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(steps, KEYS as i64, "race {race}: one step per run");
    }
}

/// What session A holds open on step b of run R: a heartbeat or a checkpoint.
#[derive(Clone, Copy)]
enum Hold {
    Heartbeat,
    Checkpoint,
}

/// Session A keeps a transaction open after `hold` on step b of run R; step
/// a of R (its last attempt) lets its lease expire, so failing R must wait
/// for A (its run's other steps are cancelled). The background round must
/// not wait on that: it skips R and comes back to it. Checked: with A open,
/// an unrelated run's expired lease is reclaimed by the background worker,
/// and `_tick()` in another session returns (a 10 s statement_timeout detects
/// a wait); once A ends with `end`, R fails within a bounded wait.
async fn open_transaction_does_not_stall_the_round(hold: Hold, end: &str) {
    let c = connect().await;
    let a = connect().await;
    let wf = unique("stall");
    let queue = unique("q");
    define(
        &c,
        &wf,
        &queue,
        json!([{"name": "a", "max_attempts": 1}, {"name": "b"}]),
    )
    .await;
    let run = enqueue(&c, &wf, json!({})).await;
    let claimed = claim(&c, "w", &queue, 2, "1 hour").await;
    assert_eq!(claimed.len(), 2);
    let step_a = claimed.iter().find(|s| s.step == "a").unwrap();
    let step_b = claimed.iter().find(|s| s.step == "b").unwrap();

    // An unrelated run on a workflow and queue of its own, leased for now.
    let other_wf = unique("bystander");
    let other_queue = unique("q");
    define(
        &c,
        &other_wf,
        &other_queue,
        json!([{"name": "s", "max_attempts": 3}]),
    )
    .await;
    let other_run = enqueue(&c, &other_wf, json!({})).await;
    let other = claim(&c, "w2", &other_queue, 1, "1 hour").await.remove(0);

    // A holds step b's row in an open transaction.
    a.batch_execute("BEGIN").await.unwrap();
    match hold {
        Hold::Heartbeat => {
            a.query_one(
                "SELECT baton.heartbeat($1, $2, '1 hour')",
                &[&step_b.step_id, &step_b.token],
            )
            .await
            .expect("heartbeat of b");
        }
        Hold::Checkpoint => {
            a.execute(
                "SELECT baton.checkpoint($1, $2, 'k', '1')",
                &[&step_b.step_id, &step_b.token],
            )
            .await
            .expect("checkpoint of b");
        }
    }

    // Step a's lease (its last attempt) expires: failing R needs b's row.
    c.query_one(
        "SELECT baton.heartbeat($1, $2, '50 milliseconds')",
        &[&step_a.step_id, &step_a.token],
    )
    .await
    .unwrap();
    let expired = eventually(Duration::from_secs(10), || async {
        c.query_one(
            "SELECT coalesce(lease_expires_at < now(), true) FROM baton.steps WHERE step_id = $1",
            &[&step_a.step_id],
        )
        .await
        .unwrap()
        .get(0)
    })
    .await;
    assert!(expired, "step a's 50 ms lease did not expire");

    // Only then does the unrelated lease expire: a round that gets to it also
    // meets step a. Nobody claims its queue: only a background round can
    // reclaim it.
    c.query_one(
        "SELECT baton.heartbeat($1, $2, '50 milliseconds')",
        &[&other.step_id, &other.token],
    )
    .await
    .unwrap();
    let reclaimed = eventually(Duration::from_secs(20), || async {
        c.query_one(
            "SELECT status = 'ready' AND attempt = 1 FROM baton.steps WHERE step_id = $1",
            &[&other.step_id],
        )
        .await
        .unwrap()
        .get(0)
    })
    .await;
    assert!(
        reclaimed,
        "an unrelated run's expired lease was not reclaimed within 20 s while A's transaction \
         was open: the background round waits on A (finishing run {run} needs step b's row)"
    );
    let outcome: String = c
        .query_one(
            "SELECT outcome FROM baton.step_attempts WHERE step_id = $1 AND attempt = 1",
            &[&other.step_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "lease_expired");
    assert_eq!(run_status(&c, other_run).await, "running");

    // A round of our own, whether or not the background worker races it:
    // it must not wait on A either.
    let t = connect().await;
    t.batch_execute("SET statement_timeout = '10s'")
        .await
        .unwrap();
    let tick = t.query_one("SELECT baton._tick()", &[]).await;
    if let Err(e) = &tick {
        panic!(
            "baton._tick() with A's transaction open failed (57014: it waited 10 s on A): \
             SQLSTATE {:?}: {e:?}",
            sqlstate(e)
        );
    }
    // Step a is expired and waiting to be reclaimed, or reclaimed: R is not
    // finished while A holds b (its cancellation needs b's row).
    let a_status: String = c
        .query_one(
            "SELECT status FROM baton.workflow_steps WHERE step_id = $1",
            &[&step_a.step_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        ["running", "failed"].contains(&a_status.as_str()),
        "step a is {a_status}"
    );

    // A ends: the round comes back to R, which fails.
    a.batch_execute(end).await.unwrap();
    let failed = eventually(Duration::from_secs(20), || async {
        run_status(&c, run).await == "failed"
    })
    .await;
    assert!(
        failed,
        "run {run} did not fail within 20 s after A's {end}: it is {}",
        run_status(&c, run).await
    );
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
            ("a".to_string(), "failed".to_string()),
            ("b".to_string(), "cancelled".to_string())
        ]
    );
    let late = c
        .query_one(
            "SELECT baton.heartbeat($1, $2)",
            &[&step_b.step_id, &step_b.token],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&late).as_deref(), Some("BT001"));
}

#[tokio::test]
async fn open_heartbeat_transaction_does_not_stall_the_round() {
    open_transaction_does_not_stall_the_round(Hold::Heartbeat, "COMMIT").await;
}

#[tokio::test]
async fn open_checkpoint_transaction_does_not_stall_the_round() {
    open_transaction_does_not_stall_the_round(Hold::Checkpoint, "ROLLBACK").await;
}
