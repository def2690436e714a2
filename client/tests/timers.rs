//! The background worker's timers beside a transaction that holds a run: a
//! due timer whose run another transaction holds is skipped, not waited for,
//! so the other runs' timers fire meanwhile; it fires once the transaction
//! ends. (The worker backs off while it keeps skipping, instead of spinning.)

mod common;

use common::connect;
use std::time::{Duration, Instant};

async fn status(db: &tokio_postgres::Client, run: uuid::Uuid) -> String {
    db.query_one(
        "SELECT status FROM baton.workflow_runs WHERE id = $1",
        &[&run],
    )
    .await
    .unwrap()
    .get(0)
}

async fn until_succeeded(db: &tokio_postgres::Client, run: uuid::Uuid) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(db, run).await != "succeeded" {
        assert!(Instant::now() < deadline, "run {run} did not succeed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_held_run_is_skipped_and_the_others_fire() {
    let db = connect().await;
    let wf = format!("timers_{}", uuid::Uuid::new_v4().simple());
    db.execute(
        "SELECT baton.define_workflow($1, '{\"steps\": [{\"name\": \"nap\", \"sleep\": \"100 milliseconds\"}]}')",
        &[&wf],
    )
    .await
    .unwrap();
    let enqueue = || async {
        db.query_one("SELECT baton.enqueue_workflow($1)", &[&wf])
            .await
            .unwrap()
            .get::<_, uuid::Uuid>(0)
    };
    let (held, free) = (enqueue().await, enqueue().await);
    // another session takes the held run's lock, as a transition in progress would
    let mut other = connect().await;
    let tx = other.transaction().await.unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock(1651797601, uuid_hash($1))",
        &[&held],
    )
    .await
    .unwrap();
    until_succeeded(&db, free).await;
    // well past its time, the held one waits for the transaction
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&db, held).await, "running");
    tx.commit().await.unwrap();
    until_succeeded(&db, held).await;
}
