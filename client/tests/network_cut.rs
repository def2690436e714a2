//! A worker cut off the network (its packets dropped by iptables, both
//! ways, on every connection it has): nothing tells the server, whose
//! backends wait for input that never comes. `register_worker` shortened its
//! session's TCP keepalives (5 s idle, then 5 probes a second apart), so the
//! kernel gives up on the registered session in about ten seconds, its
//! backend ends, and the background worker hands the worker's lease back in
//! its next round: long before the lease (here 120 s) could expire.
//!
//! Needs root and iptables (scripts/test installs it); where iptables cannot
//! be used it says so and checks nothing.

mod common;

use baton::{EnqueueOptions, Worker};
use common::workers::client_named;
use common::{connect, define, unique};
use serde_json::json;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// iptables rules dropping a connection's packets; removed when dropped.
struct Cut(Vec<Vec<String>>);

fn iptables(args: &[String]) -> bool {
    Command::new("iptables")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Cut {
    fn ports(ports: &[i32]) -> Cut {
        let mut rules = Vec::new();
        for port in ports {
            for dir in ["--sport", "--dport"] {
                let rule: Vec<String> = [
                    "INPUT",
                    "-i",
                    "lo",
                    "-p",
                    "tcp",
                    dir,
                    &port.to_string(),
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let mut add = vec!["-I".to_string()];
                add.extend(rule.iter().cloned());
                assert!(iptables(&add), "iptables {add:?}");
                rules.push(rule);
            }
        }
        Cut(rules)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for rule in &self.0 {
            let mut del = vec!["-D".to_string()];
            del.extend(rule.iter().cloned());
            iptables(&del);
        }
    }
}

/// Steps running under `worker`.
async fn held(db: &tokio_postgres::Client, worker: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM baton.steps WHERE worker = $1 AND status = 'running'",
        &[&worker],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_the_network_loses_its_lease_in_seconds() {
    if !iptables(&["-L".into(), "INPUT".into(), "-n".into()]) {
        println!("SKIPPED: iptables cannot be used here (needs root and CAP_NET_ADMIN)");
        return;
    }
    let app = unique("netcut");
    let c = client_named(&app).await;
    let db = connect().await;
    let wf = unique("netcut");
    define(&db, &wf, &wf, json!([{"name": "s", "max_attempts": 3}])).await;
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let worker = Worker::builder(&c)
        .name(&app)
        .queues([wf.clone()])
        .lease(Duration::from_secs(120))
        .handler(&wf, "s", move |_ctx| {
            let g = g.clone();
            async move {
                g.acquire().await.unwrap().forget();
                Ok(json!({}))
            }
        })
        .build();
    let handle = tokio::spawn(worker.run());
    let run = c
        .enqueue(&wf, &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while held(&db, &app).await == 0 {
        assert!(Instant::now() < deadline, "the worker claims the step");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every connection of the worker, its registered session among them.
    let ports: Vec<i32> = db
        .query(
            "SELECT client_port FROM pg_stat_activity WHERE application_name = $1 AND client_port > 0",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let registered: i64 = db
        .query_one(
            "SELECT count(*) FROM baton.worker_sessions w JOIN pg_stat_activity a USING (pid)
              WHERE w.worker = $1 AND a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(registered, 1, "the worker's session is registered");
    // The worker's host is gone from the network: its packets are dropped
    // and it makes no new connection (its task stops; what it closes never
    // reaches the server either).
    let cut = Cut::ports(&ports);
    handle.abort();
    let cut_at = Instant::now();
    let deadline = cut_at + Duration::from_secs(60);
    while held(&db, &app).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the lease of a worker cut off for 60 s is still held (its lease lasts 120 s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = cut_at.elapsed();
    let (status, error): (String, String) = {
        let row = db
            .query_one(
                "SELECT s.status::text, a.error FROM baton.steps s
                   JOIN baton.attempts a ON a.run_id = s.run_id AND a.step_id = s.step_id
                  WHERE s.run_id = $1",
                &[&run],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(status, "ready", "the step is ready for another worker");
    assert_eq!(error, format!("the session of worker \"{app}\" is gone"));
    println!(
        "{} connections of a worker cut off: its lease (120 s) handed back {:.1} s after the cut",
        ports.len(),
        took.as_secs_f64()
    );
    drop(cut);
    gate.add_permits(1);
    db.execute("SELECT baton.cancel_workflow($1)", &[&run])
        .await
        .unwrap();
}
