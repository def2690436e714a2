//! The workload of the tests that crash or fail over the server: three-step
//! workflows (`a`, `b`, `c`) whose middle step is transactional (a ledger
//! row, with no unique constraint to hide a duplicate, written in its
//! completion's transaction), enqueued one at a time under idempotency keys
//! by a caller that tries a failed enqueue again under the same key.

use baton::{Client, EnqueueOptions, StepError, Worker};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const WF: &str = "ledger";
const LEDGER: &str = "ledger_rows";

/// The workflow and the ledger table.
pub async fn install(db: &tokio_postgres::Client) {
    db.batch_execute(&format!(
        "CREATE TABLE {LEDGER} (run_id uuid NOT NULL, attempt int NOT NULL);
         SELECT baton.define_workflow('{WF}', '{{\"queue\": \"{WF}\", \"steps\": [
             {{\"name\": \"a\", \"max_attempts\": 20}},
             {{\"name\": \"b\", \"after\": [\"a\"], \"max_attempts\": 20}},
             {{\"name\": \"c\", \"after\": [\"b\"], \"max_attempts\": 20}}]}}')"
    ))
    .await
    .unwrap();
}

pub fn worker(client: &Client, name: &str) -> Worker {
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

/// Workers running in this process until `stop` is called.
pub struct Fleet(Vec<super::workers::Running>);

impl Fleet {
    pub fn start(client: &Client, names: &[&str]) -> Fleet {
        Fleet(
            names
                .iter()
                .map(|name| super::workers::spawn(worker(client, name)))
                .collect(),
        )
    }

    pub async fn stop(self) {
        for (stop, handle) in self.0 {
            super::workers::shut(stop, handle).await;
        }
    }
}

/// The caller: `runs` enqueues, one at a time, keys `order-0`...; `acked`
/// counts those that returned. Ends with the acknowledged (key, run id)s and
/// how many calls failed.
pub fn caller(
    client: &Client,
    runs: usize,
    acked: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<(Vec<(String, uuid::Uuid)>, usize)> {
    let c = client.clone();
    tokio::spawn(async move {
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
            acked.store(i + 1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ids, failures)
    })
}

/// Wait until `acked` reaches `n`.
pub async fn wait_acked(acked: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "enqueues stalled at {}",
            acked.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many of `ids` are missing, once the others have all finished.
pub async fn settle(db: &tokio_postgres::Client, ids: &[uuid::Uuid], within: Duration) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE r.id IS NULL), count(*) FILTER (WHERE r.finished_at IS NULL AND r.id IS NOT NULL)
                   FROM unnest($1::uuid[]) i(id) LEFT JOIN baton.runs r ON r.id = i.id",
                &[&ids],
            )
            .await
            .unwrap();
        let (missing, unfinished): (i64, i64) = (row.get(0), row.get(1));
        if unfinished == 0 {
            return missing;
        }
        assert!(
            Instant::now() < deadline,
            "{unfinished} runs never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every run of `ids` succeeded with its ledger row exactly once, and the
/// database holds no other run: (not succeeded, ledger wrong, extra runs).
pub async fn outcome(db: &tokio_postgres::Client, ids: &[uuid::Uuid]) -> (i64, i64, i64) {
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE r.status <> 'succeeded'),
                    (SELECT count(*) FROM baton.runs) - cardinality($1::uuid[])
               FROM baton.runs r WHERE r.id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    (
        row.get(0),
        super::ledger_not_once(db, LEDGER, ids).await,
        row.get(1),
    )
}
