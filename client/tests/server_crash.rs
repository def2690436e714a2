//! PostgreSQL killed under load (`pg_ctl -m immediate`: every server process
//! at once, nothing more written) and restarted, twice, on a cluster of its
//! own (127.0.0.1:55461, /tmp/pg_baton-srvcrash).
//!
//! A caller enqueues three-step workflows one at a time, each under an
//! idempotency key, and tries a failed enqueue again under the same key; two
//! Rust workers run the steps, the middle one transactional (a ledger row
//! written in its completion's transaction, no unique constraint). Checked:
//!  - every enqueue that returned to its caller exists afterwards, and
//!    finishes: every run succeeds;
//!  - every ledger row exists exactly once;
//!  - the workers and the background worker came back by themselves (the
//!    test never restarts them), and no lease was taken for a worker's lost
//!    session: the sessions ended with the server, not with their workers.
//!
//! `BATON_FAULTS=full` enqueues 2,000 workflows; the default is 400.

mod common;

use baton::{Client, EnqueueOptions, StepError, Worker};
use common::cluster::Cluster;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const LEDGER: &str = "crash_ledger";
const WF: &str = "srvcrash";

fn worker(client: &Client, name: &str) -> Worker {
    Worker::builder(client)
        .name(name)
        .queues([WF])
        .concurrency(8)
        .lease(Duration::from_secs(5))
        .poll_interval(Duration::from_millis(200))
        .handler(WF, "a", |_ctx| async { Ok(json!("a")) })
        .handler(WF, "b", |ctx| async move {
            let mut conn = ctx.client().pool().get().await?;
            let tx = conn.transaction().await?;
            tx.execute(
                &format!("INSERT INTO {LEDGER} VALUES ($1, $2)"),
                &[&ctx.run_id, &ctx.attempt],
            )
            .await?;
            ctx.complete_in(&*tx, &json!("b"))
                .await
                .map_err(|e| StepError::retryable(e.to_string()))?;
            tx.commit().await?;
            Ok(())
        })
        .handler(WF, "c", |_ctx| async { Ok(json!("c")) })
        .build()
}

async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_twice_loses_nothing_acknowledged() {
    let full = std::env::var("BATON_FAULTS").is_ok_and(|v| v == "full");
    let runs: usize = if full { 2000 } else { 400 };
    let cluster = Cluster::start("srvcrash", 55461, "baton_srvcrash", "");
    let url = cluster.url();
    let db = sql(&url).await;
    db.batch_execute(&format!(
        "CREATE TABLE {LEDGER} (run_id uuid NOT NULL, attempt int NOT NULL);
         SELECT baton.define_workflow('{WF}', '{{\"queue\": \"{WF}\", \"steps\": [
             {{\"name\": \"a\", \"max_attempts\": 20}},
             {{\"name\": \"b\", \"after\": [\"a\"], \"max_attempts\": 20}},
             {{\"name\": \"c\", \"after\": [\"b\"], \"max_attempts\": 20}}]}}')"
    ))
    .await
    .unwrap();
    drop(db);

    let client = Client::connect(&url).await.expect("connect");
    let mut stops = Vec::new();
    for name in ["srvcrash-1", "srvcrash-2"] {
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(worker(&client, name).run_until(async {
            let _ = rx.await;
        }));
        stops.push((tx, handle));
    }

    // The caller: one enqueue at a time; an enqueue that failed is tried
    // again under its key until it returns. What returned is acknowledged.
    let acked = Arc::new(AtomicUsize::new(0));
    let (c, a) = (client.clone(), acked.clone());
    let caller = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(runs);
        let mut failures = 0;
        for i in 0..runs {
            let key = format!("order-{i}");
            loop {
                let opts = EnqueueOptions::default().idempotency_key(key.as_str());
                match c.enqueue(WF, &json!({ "i": i }), opts).await {
                    Ok(id) => break ids.push((key.clone(), id)),
                    Err(_) => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            a.store(i + 1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ids, failures)
    });

    // Kill the server at a third and at two thirds of the enqueues.
    for (n, at) in [runs / 3, 2 * runs / 3].into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(120);
        while acked.load(Ordering::SeqCst) < at {
            assert!(
                Instant::now() < deadline,
                "enqueues stalled before crash {n}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cluster.crash();
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.start_again();
    }
    let (ids, failures) = tokio::time::timeout(Duration::from_secs(300), caller)
        .await
        .expect("the caller finishes")
        .unwrap();
    assert!(
        failures > 0,
        "no enqueue met a crash: the test tested nothing"
    );

    // Every acknowledged run exists and finishes.
    let db = sql(&url).await;
    let id_list: Vec<uuid::Uuid> = ids.iter().map(|(_, id)| *id).collect();
    let deadline = Instant::now() + Duration::from_secs(if full { 600 } else { 180 });
    loop {
        let row = db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE r.finished_at IS NULL)
                   FROM unnest($1::uuid[]) i(id) JOIN baton.runs r ON r.id = i.id",
                &[&id_list],
            )
            .await
            .unwrap();
        let (found, unfinished): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(
            found, runs as i64,
            "acknowledged runs missing after the crashes"
        );
        if unfinished == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{unfinished} runs unfinished after the crashes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (key, id) in &ids {
        let again = client
            .enqueue(
                WF,
                &json!({}),
                EnqueueOptions::default().idempotency_key(key.as_str()),
            )
            .await
            .unwrap();
        assert_eq!(again, *id, "the key {key} names its one run");
    }
    let row = db
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE r.status <> 'succeeded'),
                        count(*) FILTER (WHERE (SELECT count(*) FROM {LEDGER} l WHERE l.run_id = r.id) <> 1),
                        (SELECT count(*) FROM baton.runs) - $2::bigint
                   FROM baton.runs r WHERE r.id = ANY($1)"
            ),
            &[&id_list, &(runs as i64)],
        )
        .await
        .unwrap();
    let (not_succeeded, ledger_wrong, extra): (i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(not_succeeded, 0, "runs that did not succeed");
    assert_eq!(
        ledger_wrong, 0,
        "runs whose ledger row is missing or doubled"
    );
    assert_eq!(
        extra, 0,
        "runs nobody acknowledged (a retried enqueue made a second run)"
    );
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE error LIKE 'the session of worker%'),
                    count(*) FILTER (WHERE outcome = 'lease_expired'),
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_baton scheduler')
               FROM baton.attempts",
            &[],
        )
        .await
        .unwrap();
    let (for_session, expired, schedulers): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        for_session, 0,
        "a lease was taken for a session that ended with the server"
    );
    assert_eq!(schedulers, 1, "the background worker runs again");
    println!(
        "{runs} workflows, 2 server crashes: {failures} enqueue calls failed and were tried again, \
         {expired} leases expired, every acknowledged run succeeded, ledger exactly once"
    );
    for (stop, handle) in stops {
        stop.send(()).unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(60), handle).await;
    }
}
