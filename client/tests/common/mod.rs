//! Shared by the integration tests: connections to the test cluster that
//! `scripts/test` starts (pg_baton preloaded, background worker serving it).
#![allow(dead_code)]

pub mod cluster;
pub mod ledger;
pub mod workers;

use futures_util::future::poll_fn;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

pub fn url() -> String {
    std::env::var("BATON_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55441/baton_test".to_string())
}

pub async fn connect() -> Client {
    connect_to(&url()).await
}

/// A connection whose NOTIFY messages arrive on the returned channel.
pub async fn connect_listening(
    channel: &str,
) -> (Client, mpsc::UnboundedReceiver<(String, String)>) {
    let (client, mut conn) = tokio_postgres::connect(&url(), NoTls)
        .await
        .expect("connect");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = poll_fn(|cx| conn.poll_message(cx)).await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("listen");
    (client, rx)
}

/// A name no other test uses (tests run in parallel against one database).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Define a workflow whose steps all run on `queue`.
pub async fn define(client: &Client, name: &str, queue: &str, steps: serde_json::Value) -> i32 {
    let def = serde_json::json!({ "queue": queue, "steps": steps });
    client
        .query_one("SELECT baton.define_workflow($1, $2)", &[&name, &def])
        .await
        .expect("define_workflow")
        .get(0)
}

pub async fn enqueue(client: &Client, workflow: &str, input: serde_json::Value) -> uuid::Uuid {
    client
        .query_one(
            "SELECT baton.enqueue_workflow($1, $2)",
            &[&workflow, &input],
        )
        .await
        .expect("enqueue_workflow")
        .get(0)
}

pub struct Claimed {
    pub step_id: i64,
    pub token: uuid::Uuid,
    pub run_id: uuid::Uuid,
    pub step: String,
    pub attempt: i32,
    pub upstream: serde_json::Value,
    pub checkpoints: serde_json::Value,
}

pub async fn claim(
    client: &Client,
    worker: &str,
    queue: &str,
    max: i32,
    lease: &str,
) -> Vec<Claimed> {
    client
        .query(
            "SELECT step_id, lease_token, workflow_id, step, attempt, upstream, checkpoints \
             FROM baton.claim_steps($1, ARRAY[$2], $3, $4::text::interval)",
            &[&worker, &queue, &max, &lease],
        )
        .await
        .expect("claim_steps")
        .iter()
        .map(|r| Claimed {
            step_id: r.get(0),
            token: r.get(1),
            run_id: r.get(2),
            step: r.get(3),
            attempt: r.get(4),
            upstream: r.get(5),
            checkpoints: r.get(6),
        })
        .collect()
}

/// One step of `queue`, claimed as soon as there is one (within 10 s). For a
/// step taken over after its lease expired: a claim comes back empty while the
/// background worker is reclaiming that lease at the same moment (it skips a run
/// another transition holds), and the step is ready again right after.
pub async fn claim_one(client: &Client, worker: &str, queue: &str, lease: &str) -> Claimed {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = claim(client, worker, queue, 1, lease).await.pop() {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no step of {queue} could be claimed within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run_status(client: &Client, run: uuid::Uuid) -> String {
    client
        .query_one(
            "SELECT status FROM baton.workflow_runs WHERE id = $1",
            &[&run],
        )
        .await
        .expect("run status")
        .get(0)
}

/// Poll `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The SQLSTATE of a failed statement, if it was a database error.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

/// Backends waiting for a lock that `holder` (a backend pid) holds.
pub async fn blocked_by(db: &Client, holder: i32) -> Vec<i32> {
    db.query(
        "SELECT pid FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid)) ORDER BY pid",
        &[&holder],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A connection to `url` (the test cluster's, or a private one's).
pub async fn connect_to(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url} (run scripts/test): {e:?}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Another session that runs `sql` (taking a lock) in a transaction it keeps
/// open until it is sent COMMIT: the session, and its backend's pid.
pub async fn hold_open(
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> (Client, i32) {
    let locker = connect().await;
    let holder: i32 = locker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    locker.batch_execute("BEGIN").await.unwrap();
    locker.execute(sql, params).await.unwrap();
    (locker, holder)
}

/// How many of `ids` do not have exactly one row in the ledger `table`
/// (a side effect written with its step's completion, no unique constraint).
pub async fn ledger_not_once(db: &Client, table: &str, ids: &[uuid::Uuid]) -> i64 {
    db.query_one(
        &format!(
            "SELECT count(*) FROM unnest($1::uuid[]) r(id)
              WHERE (SELECT count(*) FROM {table} l WHERE l.run_id = r.id) <> 1"
        ),
        &[&ids],
    )
    .await
    .unwrap()
    .get(0)
}
