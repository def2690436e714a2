//! An upgrade with runs in flight, finished by the current Rust worker: in a
//! database of its own on the test cluster, pg_baton 0.1.0 is installed from
//! its released script, runs are left in every state a step can be in (one
//! running under a lease of an old worker, delayed, blocked, ready, retrying
//! after a failure), `ALTER EXTENSION pg_baton UPDATE` carries them to the
//! current version, and a Worker of this crate finishes every one of them
//! (the old worker's lease expires and is taken over). `pg_test/upgrade.sh`
//! checks the catalog against a fresh install, from every released version.

mod common;

use baton::{Client, Worker};
use common::{connect_to, unique, url};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_started_on_0_1_0_finish_on_the_current_worker() {
    let admin = connect_to(&url()).await;
    let db_name = unique("baton_upgrade_worker");
    admin
        .batch_execute(&format!("CREATE DATABASE {db_name}"))
        .await
        .unwrap();
    let base = url();
    let db_url = format!("{}/{db_name}", &base[..base.rfind('/').unwrap()]);
    let db = connect_to(&db_url).await;
    db.batch_execute(
        "SET client_min_messages = warning;
         CREATE EXTENSION pg_baton VERSION '0.1.0';
         SELECT baton.define_workflow('chain', '{\"steps\": [{\"name\": \"a\"}, {\"name\": \"b\", \"after\": [\"a\"]}]}');
         SELECT baton.define_workflow('flaky', '{\"queue\": \"flaky\", \"steps\": [{\"name\": \"x\", \"max_attempts\": 3,
             \"backoff\": {\"initial\": \"1 second\", \"max\": \"1 second\", \"multiplier\": 1}}]}');
         SELECT baton.enqueue_workflow('chain', '{\"n\": 1}', 'leased');
         SELECT baton.enqueue_workflow('chain', '{\"n\": 2}', 'waiting');
         SELECT baton.enqueue_workflow('chain', '{\"n\": 3}', 'delayed', run_at => now() + interval '1 second');
         SELECT baton.enqueue_workflow('flaky', '{}', 'retrying');
         SELECT count(*) FROM baton.claim_steps('old-worker', max_steps => 1, lease => '1 second');
         SELECT count(baton.fail_step(c.step_id, c.lease_token, 'boom'))
           FROM baton.claim_steps('old-worker', ARRAY['flaky']) c;",
    )
    .await
    .unwrap();
    let before: Vec<(String, i64)> = db
        .query(
            "SELECT status::text, count(*) FROM baton.steps GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        before.iter().any(|(s, _)| s == "running"),
        "a step is leased under 0.1.0: {before:?}"
    );
    db.batch_execute("ALTER EXTENSION pg_baton UPDATE")
        .await
        .unwrap();
    let version: String = db
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_baton'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        version,
        extension_version(),
        "ALTER EXTENSION UPDATE reaches the current version"
    );

    // The current worker finishes them; this database has no background
    // worker, so its round (_tick) is run here, as the scheduler would.
    let client = Client::connect(&db_url).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::builder(&client)
        .queues(["default", "flaky"])
        .poll_interval(Duration::from_millis(200))
        .handler("chain", "a", |ctx| async move {
            let input: serde_json::Value = ctx.input()?;
            Ok(json!({"a": input["n"]}))
        })
        .handler("chain", "b", |_ctx| async { Ok(json!("b")) })
        .handler("flaky", "x", |_ctx| async { Ok(json!("x")) })
        .build();
    let handle = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        db.batch_execute("SELECT baton._tick()").await.unwrap();
        let open: i64 = db
            .query_one(
                "SELECT count(*) FROM baton.runs WHERE finished_at IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} runs never finished after the upgrade"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
    let runs: Vec<(String, String, Option<serde_json::Value>)> = db
        .query(
            "SELECT idempotency_key, status::text, output FROM baton.runs ORDER BY idempotency_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        runs,
        vec![
            (
                "delayed".into(),
                "succeeded".into(),
                Some(json!({"b": "b"}))
            ),
            ("leased".into(), "succeeded".into(), Some(json!({"b": "b"}))),
            (
                "retrying".into(),
                "succeeded".into(),
                Some(json!({"x": "x"}))
            ),
            (
                "waiting".into(),
                "succeeded".into(),
                Some(json!({"b": "b"}))
            ),
        ]
    );
    let lost: i64 = db
        .query_one(
            "SELECT count(*) FROM baton.attempts WHERE worker = 'old-worker' AND outcome = 'lease_expired'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(lost, 1, "the old worker's lease expired and was taken over");
    drop(client);
    drop(db);
    admin
        .batch_execute(&format!("DROP DATABASE {db_name} WITH (FORCE)"))
        .await
        .unwrap();
}

/// The extension's version: the workspace's pg_baton crate.
fn extension_version() -> String {
    include_str!("../../Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("the extension's version in Cargo.toml")
        .to_string()
}
