//! A worker's connections terminated under it (`pg_terminate_backend`): in
//! the middle of a claim, of a heartbeat, and at random while transactional
//! steps run. No step is lost, none is done twice, and a worker that lost
//! only pooled connections keeps its leases. (A report killed mid-call is in
//! `worker_faults.rs`.)
//!
//! Each test catches its call mid-flight by holding a lock the call needs in
//! another session, and waits on states, never on the clock.

mod common;

use baton::{EnqueueOptions, Worker};
use common::workers::{client_named, shut, spawn};
use common::{blocked_by, connect, define, eventually, hold_open, ledger_not_once, unique};
use rand::Rng;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Semaphore};

/// (attempt, lost attempts) of run `run`'s one step.
async fn attempts(db: &tokio_postgres::Client, run: uuid::Uuid) -> (i32, i64) {
    let row = db
        .query_one(
            "SELECT s.attempt, (SELECT count(*) FROM baton.attempts a
                                 WHERE a.run_id = s.run_id AND a.outcome = 'lease_expired')
               FROM baton.steps s WHERE s.run_id = $1",
            &[&run],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Wait until a backend other than those in `not` waits for `holder`'s lock;
/// its pid.
async fn next_blocked(db: &tokio_postgres::Client, holder: i32, not: &[i32], what: &str) -> i32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(pid) = blocked_by(db, holder)
            .await
            .into_iter()
            .find(|p| !not.contains(p))
        {
            return pid;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A claim killed while it waits for its run's row: its transaction rolls
/// back, the step is ready again with no attempt used, and the worker's next
/// claim takes it. One attempt allowed, so a lost one would fail the run.
#[tokio::test]
async fn a_claim_whose_connection_is_killed_loses_nothing() {
    let app = unique("claimkill");
    let c = client_named(&app).await;
    let db = connect().await;
    let wf = unique("claimkill");
    define(&db, &wf, &wf, json!([{"name": "s", "max_attempts": 1}])).await;
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    // A claim sets its run running: it waits for this lock on the run row.
    let (locker, holder) =
        hold_open("SELECT FROM baton.runs WHERE id = $1 FOR UPDATE", &[&run]).await;
    let worker = Worker::builder(&c)
        .queues([wf.clone()])
        .poll_interval(Duration::from_millis(200))
        .handler(&wf, "s", |_ctx| async { Ok(json!({"done": true})) })
        .build();
    let (stop, handle) = spawn(worker);
    let first = next_blocked(&db, holder, &[], "the claim waits for the run row").await;
    db.execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    next_blocked(
        &db,
        holder,
        &[first],
        "the worker claims again on another connection",
    )
    .await;
    locker.batch_execute("COMMIT").await.unwrap();
    let out: serde_json::Value = c.wait_for(run, Duration::from_secs(15)).await.unwrap();
    assert_eq!(out, json!({"s": {"done": true}}));
    assert_eq!(attempts(&db, run).await, (1, 0), "one attempt, none lost");
    shut(stop, handle).await;
}

/// A heartbeat killed while it waits for its step's row: the worker tries it
/// again on another connection, keeps the lease, and the step completes once.
#[tokio::test]
async fn a_heartbeat_whose_connection_is_killed_is_retried() {
    let app = unique("beatkill");
    let c = client_named(&app).await;
    let db = connect().await;
    let wf = unique("beatkill");
    define(&db, &wf, &wf, json!([{"name": "s", "max_attempts": 1}])).await;
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, started) = oneshot::channel::<()>();
    let started_tx = Arc::new(std::sync::Mutex::new(Some(started_tx)));
    let g = gate.clone();
    let worker = Worker::builder(&c)
        .queues([wf.clone()])
        .lease(Duration::from_secs(6)) // a heartbeat every 2 s
        .handler(&wf, "s", move |_ctx| {
            let (g, started_tx) = (g.clone(), started_tx.clone());
            async move {
                if let Some(tx) = started_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                g.acquire().await.unwrap().forget();
                Ok(json!({"done": true}))
            }
        })
        .build();
    let (stop, handle) = spawn(worker);
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    started.await.unwrap();
    // The next heartbeat renews the step's row: it waits for this lock.
    let (locker, holder) = hold_open(
        "SELECT FROM baton.steps WHERE run_id = $1 FOR UPDATE",
        &[&run],
    )
    .await;
    let first = next_blocked(&db, holder, &[], "the heartbeat waits for the step row").await;
    db.execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    next_blocked(
        &db,
        holder,
        &[first],
        "the heartbeat is tried again on another connection",
    )
    .await;
    locker.batch_execute("COMMIT").await.unwrap();
    gate.add_permits(1);
    let out: serde_json::Value = c.wait_for(run, Duration::from_secs(15)).await.unwrap();
    assert_eq!(out, json!({"s": {"done": true}}));
    assert_eq!(attempts(&db, run).await, (1, 0), "one attempt, none lost");
    shut(stop, handle).await;
}

/// Pooled connections of a worker terminated at random, every 20 to 100 ms,
/// while 300 workflows of a plain and a transactional step run. Its
/// registered session (the LISTEN connection) is spared: the worker lives,
/// so it keeps its leases. Every run succeeds and the transactional step's
/// ledger row (written in its completion's transaction, no unique
/// constraint) exists exactly once per run. A claim whose reply was lost
/// with its connection leaves a lease nobody works on: it expires (the
/// lease is 3 s here) and counts as a lost attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_killed_at_random_lose_nothing() {
    let app = unique("chaos");
    let c = client_named(&app).await;
    let db = connect().await;
    let wf = unique("chaos");
    let ledger = format!("{wf}_ledger");
    db.batch_execute(&format!(
        "CREATE TABLE {ledger} (run_id uuid NOT NULL, attempt int NOT NULL)"
    ))
    .await
    .unwrap();
    define(
        &db,
        &wf,
        &wf,
        json!([
            {"name": "a", "max_attempts": 50},
            {"name": "b", "after": ["a"], "max_attempts": 50}
        ]),
    )
    .await;
    let l = ledger.clone();
    let worker = Worker::builder(&c)
        .name(&app)
        .queues([wf.clone()])
        .concurrency(8)
        .lease(Duration::from_secs(3))
        .poll_interval(Duration::from_millis(200))
        .handler(&wf, "a", |_ctx| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(json!(1))
        })
        .handler(&wf, "b", move |ctx| {
            let l = l.clone();
            async move {
                let mut conn = ctx.client().pool().get().await?;
                let tx = conn.transaction().await?;
                tx.execute(
                    &format!("INSERT INTO {l} VALUES ($1, $2)"),
                    &[&ctx.run_id, &ctx.attempt],
                )
                .await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
                ctx.complete_in(&*tx, &json!(2))
                    .await
                    .map_err(|e| baton::StepError::retryable(e.to_string()))?;
                tx.commit().await?;
                Ok(())
            }
        })
        .build();
    let (stop, handle) = spawn(worker);
    let ids: Vec<uuid::Uuid> = db
        .query_one(
            "SELECT baton.enqueue_workflows($1, array_fill('{}'::jsonb, ARRAY[300]))",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);

    let done = Arc::new(AtomicBool::new(false));
    let (d, killer_app) = (done.clone(), app.clone());
    let killer = tokio::spawn(async move {
        let db = connect().await;
        let mut kills = 0u32;
        while !d.load(Ordering::SeqCst) {
            let ms = rand::thread_rng().gen_range(20..100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let killed: i64 = db
                .query_one(
                    "SELECT count(pg_terminate_backend(a.pid)) FROM (
                         SELECT pid FROM pg_stat_activity
                          WHERE application_name = $1
                            AND pid NOT IN (SELECT w.pid FROM baton.worker_sessions w WHERE w.worker = $1)
                          ORDER BY random() LIMIT 1) a",
                    &[&killer_app],
                )
                .await
                .unwrap()
                .get(0);
            kills += killed as u32;
        }
        kills
    });
    let finished = eventually(Duration::from_secs(120), || async {
        db.query_one(
            "SELECT count(*) = 0 FROM baton.runs WHERE id = ANY($1) AND finished_at IS NULL",
            &[&ids],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    })
    .await;
    done.store(true, Ordering::SeqCst);
    let kills = killer.await.unwrap();
    assert!(finished, "every run finishes");
    assert!(kills > 0, "no connection was killed");

    let failed: i64 = db
        .query_one(
            "SELECT count(*) FROM baton.runs WHERE id = ANY($1) AND status <> 'succeeded'",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed, 0, "every run succeeded");
    assert_eq!(
        ledger_not_once(&db, &ledger, &ids).await,
        0,
        "runs whose ledger row is missing or doubled"
    );
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE a.error LIKE 'the session of worker%'),
                    count(*) FILTER (WHERE a.outcome = 'lease_expired')
               FROM baton.attempts a WHERE a.run_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    let (taken_for_session, expired): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        taken_for_session, 0,
        "the worker lives: no lease was taken for a lost session"
    );
    println!("300 workflows, {kills} pooled connections killed, {expired} leases expired (claims whose reply was lost)");
    shut(stop, handle).await;
    db.batch_execute(&format!("DROP TABLE {ledger}"))
        .await
        .unwrap();
}
