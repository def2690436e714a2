//! Failover: a primary with a streaming standby (two local clusters), the
//! primary killed mid-load (`pg_ctl -m immediate`) and the standby promoted.
//! The workload of `common/ledger.rs` (a caller enqueueing under idempotency
//! keys, two Rust workers, a transactional middle step) reaches the servers
//! through one multi-host URL with `target_session_attrs=read-write`, so it
//! finds the new primary by itself.
//!
//! - With synchronous replication (`synchronous_standby_names = '*'`):
//!   nothing acknowledged is lost, every run succeeds, the ledger row exists
//!   exactly once per run, and the workers carry on against the new primary.
//! - With asynchronous replication, the last commits of the old primary may
//!   be lost. The standby's connection is cut (and refused from then on)
//!   while twenty more enqueues are acknowledged, then the primary dies:
//!   those are lost. The test counts the acknowledged
//!   enqueues that are missing,
//!   enqueues them again under their keys (as a caller that keeps its keys
//!   would), and checks that then every run succeeds with its ledger row
//!   exactly once. It prints what was lost.
//!
//! 300 workflows each (1,000 with `BATON_FAULTS=full`); ports 55471 to 55474.

mod common;

use baton::{Client, EnqueueOptions};
use common::cluster::Cluster;
use common::ledger;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Failover {
    lost: i64,
    /// acknowledged when the asynchronous standby's connection was cut
    cut_at: Option<usize>,
    acked_at_kill: usize,
    back_after: Duration,
    failures: usize,
}

async fn fail_over(name: &str, port: u16, synchronous: bool) -> Failover {
    let full = std::env::var("BATON_FAULTS").is_ok_and(|v| v == "full");
    let runs: usize = if full { 1000 } else { 300 };
    let primary = Cluster::start(&format!("{name}p"), port, "baton_failover", "");
    let db = common::connect_to(&primary.url()).await;
    ledger::install(&db).await;
    let standby = primary.standby(&format!("{name}s"), port + 1, "");
    if synchronous {
        db.batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            .await
            .unwrap();
        db.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        assert!(
            common::eventually(Duration::from_secs(30), || async {
                db.query_one(
                    "SELECT count(*) = 1 FROM pg_stat_replication WHERE sync_state = 'sync'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
            })
            .await,
            "the standby is synchronous"
        );
    }
    drop(db);

    let url = format!(
        "postgres://postgres@127.0.0.1:{port},127.0.0.1:{}/baton_failover?target_session_attrs=read-write",
        port + 1
    );
    let client = Client::connect(&url).await.expect("connect");
    let fleet = ledger::Fleet::start(&client, &[&format!("{name}-1"), &format!("{name}-2")]);
    let acked = Arc::new(AtomicUsize::new(0));
    let caller = ledger::caller(&client, runs, acked.clone());
    ledger::wait_acked(&acked, runs / 2).await;
    let mut cut_at = None;
    if !synchronous {
        // An asynchronous standby that fell behind: its connection to the
        // primary is cut (and cannot be made again), twenty more enqueues
        // are acknowledged by the primary alone, and then the primary dies.
        primary.refuse_replication();
        let db = common::connect_to(&primary.url()).await;
        db.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
            .await
            .unwrap();
        cut_at = Some(acked.load(Ordering::SeqCst));
        ledger::wait_acked(&acked, cut_at.unwrap() + 20).await;
    }
    primary.crash();
    let killed = Instant::now();
    let acked_at_kill = acked.load(Ordering::SeqCst);
    standby.promote();
    // (+2: the enqueue in flight at the kill may have been acknowledged)
    ledger::wait_acked(&acked, acked_at_kill + 2).await;
    let back_after = killed.elapsed();
    let (mut ids, failures) = tokio::time::timeout(Duration::from_secs(300), caller)
        .await
        .expect("the caller finishes")
        .unwrap();

    let db = common::connect_to(&standby.url()).await;
    let id_list: Vec<uuid::Uuid> = ids.iter().map(|(_, id)| *id).collect();
    let lost = ledger::settle(&db, &id_list, Duration::from_secs(180)).await;
    if lost > 0 {
        // enqueued again under their keys: each is made once
        let missing: Vec<String> = db
            .query(
                "SELECT k FROM unnest($1::text[], $2::uuid[]) i(k, id)
                  WHERE NOT EXISTS (SELECT FROM baton.runs r WHERE r.id = i.id)",
                &[
                    &ids.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
                    &id_list,
                ],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (key, id) in ids.iter_mut().filter(|(k, _)| missing.contains(k)) {
            *id = client
                .enqueue(
                    ledger::WF,
                    &json!({}),
                    EnqueueOptions::default().idempotency_key(key.as_str()),
                )
                .await
                .unwrap();
        }
    }
    let id_list: Vec<uuid::Uuid> = ids.iter().map(|(_, id)| *id).collect();
    assert_eq!(
        ledger::settle(&db, &id_list, Duration::from_secs(180)).await,
        0
    );
    let (not_succeeded, ledger_wrong, extra) = ledger::outcome(&db, &id_list).await;
    assert_eq!(not_succeeded, 0, "runs that did not succeed");
    assert_eq!(
        ledger_wrong, 0,
        "runs whose ledger row is missing or doubled"
    );
    assert_eq!(extra, 0, "runs nobody acknowledged");
    let schedulers: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_baton scheduler'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        schedulers, 1,
        "the background worker runs on the new primary"
    );
    fleet.stop().await;
    Failover {
        lost,
        cut_at,
        acked_at_kill,
        back_after,
        failures,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_failover_loses_nothing_acknowledged() {
    let f = fail_over("fosync", 55471, true).await;
    assert_eq!(
        f.lost, 0,
        "acknowledged enqueues lost with synchronous replication"
    );
    println!(
        "synchronous failover: 0 of {} acknowledged enqueues lost; enqueues succeeded again {:.2} s after the kill \
         ({} calls failed meanwhile); every run succeeded, ledger exactly once",
        f.acked_at_kill,
        f.back_after.as_secs_f64(),
        f.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_failover_is_made_whole_by_idempotency_keys() {
    let f = fail_over("foasync", 55473, false).await;
    let behind = f.acked_at_kill - f.cut_at.unwrap();
    assert!(
        f.lost > 0 && f.lost as usize <= behind + 1,
        "the standby {behind} enqueues behind lost {}",
        f.lost
    );
    println!(
        "asynchronous failover, the standby {behind} enqueues behind: {} of {} acknowledged enqueues lost and enqueued again under their keys; \
         enqueues succeeded again {:.2} s after the kill ({} calls failed meanwhile); every run succeeded, \
         ledger exactly once",
        f.lost,
        f.acked_at_kill,
        f.back_after.as_secs_f64(),
        f.failures
    );
}
