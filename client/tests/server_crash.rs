//! PostgreSQL killed under load (`pg_ctl -m immediate`: every server process
//! at once, nothing more written) and restarted, twice, on a cluster of its
//! own (127.0.0.1:55461, /tmp/pg_baton-srvcrash).
//!
//! The workload of `common/ledger.rs`: a caller enqueues three-step
//! workflows one at a time under idempotency keys, trying a failed enqueue
//! again under its key; four Rust workers run them, the middle step
//! transactional. Checked:
//!  - every enqueue that returned to its caller exists afterwards, and
//!    finishes: every run succeeds, and no run was made twice;
//!  - every ledger row exists exactly once;
//!  - the workers and the background worker came back by themselves (the
//!    test never restarts them), and no lease was taken for a worker's lost
//!    session: the sessions ended with the server, not with their workers.
//!
//! `BATON_FAULTS=full` enqueues 2,000 workflows; the default is 400.

mod common;

use baton::Client;
use common::cluster::Cluster;
use common::ledger;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_twice_loses_nothing_acknowledged() {
    let full = std::env::var("BATON_FAULTS").is_ok_and(|v| v == "full");
    let runs: usize = if full { 2000 } else { 400 };
    let cluster = Cluster::start("srvcrash", 55461, "baton_srvcrash", "");
    let db = common::connect_to(&cluster.url()).await;
    ledger::install(&db).await;
    drop(db);

    let client = Client::connect(&cluster.url()).await.expect("connect");
    let fleet = ledger::Fleet::start(
        &client,
        &["srvcrash-1", "srvcrash-2", "srvcrash-3", "srvcrash-4"],
    );
    let acked = Arc::new(AtomicUsize::new(0));
    let caller = ledger::caller(&client, runs, acked.clone());
    for at in [runs / 3, 2 * runs / 3] {
        ledger::wait_acked(&acked, at).await;
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

    let db = common::connect_to(&cluster.url()).await;
    let id_list: Vec<uuid::Uuid> = ids.iter().map(|(_, id)| *id).collect();
    let missing = ledger::settle(
        &db,
        &id_list,
        Duration::from_secs(if full { 600 } else { 180 }),
    )
    .await;
    assert_eq!(missing, 0, "acknowledged runs missing after the crashes");
    let (not_succeeded, ledger_wrong, extra) = ledger::outcome(&db, &id_list).await;
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
    fleet.stop().await;
}
