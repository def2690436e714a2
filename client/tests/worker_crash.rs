//! Workers killed at random (issue: nothing lost when things break).
//!
//! Three-step workflows run on worker processes (this test binary, started
//! again as a worker) that a driver SIGKILLs one at a time and replaces. The
//! middle step is transactional: its side effect, a ledger row with no unique
//! constraint to hide a duplicate, commits with its completion. At the end:
//!  - every run succeeded and nothing is left running or ready;
//!  - every ledger row exists exactly once;
//!  - every step ran at most once more per lease it lost;
//!  - every lost lease was taken over because its worker's session was gone
//!    (`baton.register_worker`), not because it expired: the lease is 30 s.
//!
//! It prints how long the takeover took after each kill (the figure, not an
//! assertion). `BATON_FAULTS=full` runs the full version: 2,000 workflows,
//! a kill every 3 s; the default is 400 workflows and a kill every second.

mod common;

use baton::{Client, StepError, Worker};
use common::{connect, define, unique, url};
use rand::Rng;
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The worker process: started by the test below with the names it needs in
/// its environment; does nothing when run by hand.
#[tokio::test]
#[ignore = "started by workers_killed_at_random_lose_nothing"]
async fn crash_worker_process() {
    let (Ok(name), Ok(wf), Ok(ledger), Ok(execs)) = (
        std::env::var("CRASH_WORKER_NAME"),
        std::env::var("CRASH_WORKFLOW"),
        std::env::var("CRASH_LEDGER"),
        std::env::var("CRASH_EXECS"),
    ) else {
        return;
    };
    let client = Client::connect(&url()).await.expect("connect");
    let plain = |step: &'static str, execs: String| {
        move |ctx: baton::StepContext| {
            let execs = execs.clone();
            async move {
                record(&ctx, &execs, step).await?;
                pause().await;
                Ok(json!({ step: ctx.attempt }))
            }
        }
    };
    let (l, e) = (ledger.clone(), execs.clone());
    Worker::builder(&client)
        .name(name)
        .queues([wf.clone()])
        .concurrency(8)
        .lease(Duration::from_secs(30))
        .poll_interval(Duration::from_millis(500))
        .handler(&wf, "a", plain("a", execs.clone()))
        .handler(&wf, "b", move |ctx| {
            let (l, e) = (l.clone(), e.clone());
            async move {
                record(&ctx, &e, "b").await?;
                let mut conn = ctx.client().pool().get().await?;
                let tx = conn.transaction().await?;
                tx.execute(
                    &format!("INSERT INTO {l} (run_id, attempt) VALUES ($1, $2)"),
                    &[&ctx.run_id, &ctx.attempt],
                )
                .await?;
                pause().await;
                ctx.complete_in(&*tx, &json!({ "b": ctx.attempt }))
                    .await
                    .map_err(|e| StepError::retryable(e.to_string()))?;
                tx.commit().await?;
                Ok(())
            }
        })
        .handler(&wf, "c", plain("c", execs))
        .build()
        .run()
        .await
        .expect("worker");
}

/// An execution of `step` began (committed at once, outside the step).
async fn record(ctx: &baton::StepContext, execs: &str, step: &str) -> Result<(), StepError> {
    let conn = ctx.client().pool().get().await?;
    conn.execute(
        &format!("INSERT INTO {execs} (run_id, step, attempt) VALUES ($1, $2, $3)"),
        &[&ctx.run_id, &step, &ctx.attempt],
    )
    .await?;
    Ok(())
}

/// A step's work: 50 to 250 ms.
async fn pause() {
    let ms = rand::thread_rng().gen_range(50..250);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

struct Fleet {
    wf: String,
    ledger: String,
    execs: String,
    started: usize,
    live: Vec<(String, Child)>,
}

impl Fleet {
    fn start(&mut self) {
        self.started += 1;
        let name = format!("{}-w{}", self.wf, self.started);
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["crash_worker_process", "--exact", "--ignored", "--quiet"])
            .env("CRASH_WORKER_NAME", &name)
            .env("CRASH_WORKFLOW", &self.wf)
            .env("CRASH_LEDGER", &self.ledger)
            .env("CRASH_EXECS", &self.execs)
            .env("BATON_TEST_URL", url())
            .stdout(Stdio::null())
            .spawn()
            .expect("start a worker process");
        self.live.push((name, child));
    }

    /// SIGKILL one worker at random; its name.
    fn kill_one(&mut self) -> String {
        let i = rand::thread_rng().gen_range(0..self.live.len());
        let (name, mut child) = self.live.swap_remove(i);
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        name
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, child) in &mut self.live {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_at_random_lose_nothing() {
    let full = std::env::var("BATON_FAULTS").is_ok_and(|v| v == "full");
    let (runs, every) = if full {
        (2000, Duration::from_secs(3))
    } else {
        (400, Duration::from_secs(1))
    };
    let db = connect().await;
    let wf = unique("crash");
    let (ledger, execs) = (format!("{wf}_ledger"), format!("{wf}_execs"));
    db.batch_execute(&format!(
        "CREATE TABLE {ledger} (run_id uuid NOT NULL, attempt int NOT NULL);
         CREATE TABLE {execs} (run_id uuid NOT NULL, step text NOT NULL, attempt int NOT NULL)"
    ))
    .await
    .unwrap();
    define(
        &db,
        &wf,
        &wf,
        json!([
            {"name": "a", "max_attempts": 20},
            {"name": "b", "after": ["a"], "max_attempts": 20},
            {"name": "c", "after": ["b"], "max_attempts": 20}
        ]),
    )
    .await;
    let ids: Vec<uuid::Uuid> = db
        .query_one(
            "SELECT baton.enqueue_workflows($1, array_fill('{}'::jsonb, ARRAY[$2::int]))",
            &[&wf, &(runs as i32)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ids.len(), runs);

    let mut fleet = Fleet {
        wf: wf.clone(),
        ledger: ledger.clone(),
        execs: execs.clone(),
        started: 0,
        live: Vec::new(),
    };
    for _ in 0..4 {
        fleet.start();
    }
    let deadline = Instant::now() + Duration::from_secs(if full { 900 } else { 240 });
    let mut kills: Vec<String> = Vec::new();
    let mut takeovers: Vec<f64> = Vec::new(); // seconds from a kill to its leases handed back
    loop {
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM baton.runs WHERE workflow = $1 AND finished_at IS NULL",
                &[&wf],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} runs still unfinished after {} kills",
            kills.len()
        );
        // at a random moment: a fixed pause would keep each kill at the same
        // point of the background worker's round
        let jitter = rand::thread_rng().gen_range(0.5..1.5);
        tokio::time::sleep(every.mul_f64(jitter)).await;
        let name = fleet.kill_one();
        let killed = Instant::now();
        fleet.start();
        // How long its leases stay held after the kill (polled every 10 ms).
        let mut held_at_kill = None;
        loop {
            let held: i64 = db
                .query_one(
                    "SELECT count(*) FROM baton.steps WHERE worker = $1 AND status = 'running'",
                    &[&name],
                )
                .await
                .unwrap()
                .get(0);
            held_at_kill.get_or_insert(held);
            if held == 0 {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(25),
                "{name}'s {held} leases were not handed back before they could expire"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if held_at_kill > Some(0) {
            takeovers.push(killed.elapsed().as_secs_f64());
        }
        kills.push(name);
    }
    drop(fleet);

    // Every run succeeded; no step is left anywhere but done.
    let by_status = db
        .query(
            "SELECT status::text, count(*) FROM baton.runs WHERE workflow = $1 GROUP BY 1",
            &[&wf],
        )
        .await
        .unwrap();
    let statuses: Vec<(String, i64)> = by_status.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(statuses, vec![("succeeded".to_string(), runs as i64)]);
    let not_done: i64 = db
        .query_one(
            "SELECT count(*) FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
              WHERE r.workflow = $1 AND s.status <> 'succeeded'",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(not_done, 0, "steps not succeeded");

    // The transactional step's side effect exists exactly once per run.
    let ledger_wrong = common::ledger_not_once(&db, &ledger, &ids).await;
    assert_eq!(
        ledger_wrong, 0,
        "runs whose ledger row is missing or doubled"
    );

    // Every step ran at most once more per lease it lost, and every lost
    // lease was taken over for its gone session.
    let too_many = db
        .query(
            &format!(
                "SELECT x.run_id::text, x.step, x.n, coalesce(l.lost, 0)
                   FROM (SELECT run_id, step, count(*) n FROM {execs} GROUP BY 1, 2) x
                   LEFT JOIN (SELECT a.run_id, a.step, count(*) lost FROM baton.attempts a
                               WHERE a.run_id = ANY($1) AND a.outcome = 'lease_expired' GROUP BY 1, 2) l
                     USING (run_id, step)
                  WHERE x.n > 1 + coalesce(l.lost, 0)"
            ),
            &[&ids],
        )
        .await
        .unwrap();
    assert!(
        too_many.is_empty(),
        "steps that ran more often than their lost leases allow: {:?}",
        too_many
            .iter()
            .map(|r| (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, i64>(2)
            ))
            .collect::<Vec<_>>()
    );
    let lost = db
        .query(
            "SELECT a.worker, a.error FROM baton.attempts a
              WHERE a.run_id = ANY($1) AND a.outcome = 'lease_expired'",
            &[&ids],
        )
        .await
        .unwrap();
    for row in &lost {
        let (worker, error): (String, String) = (row.get(0), row.get(1));
        assert_eq!(
            error,
            format!("the session of worker \"{worker}\" is gone"),
            "a lease was lost otherwise than by its worker's death"
        );
        assert!(
            kills.contains(&worker),
            "a lease of {worker}, which was never killed, was lost"
        );
    }
    assert!(!takeovers.is_empty(), "no kill hit a worker holding a step");
    takeovers.sort_by(f64::total_cmp);
    let (median, max) = (
        takeovers[takeovers.len() / 2],
        takeovers[takeovers.len() - 1],
    );
    let over: i64 = db
        .query_one(
            &format!("SELECT (SELECT count(*) FROM {execs}) - 3 * $1::bigint",),
            &[&(runs as i64)],
        )
        .await
        .unwrap()
        .get(0);
    println!(
        "{runs} workflows, {} kills, {} leases lost, {over} executions more than once; \
         leases handed back {median:.2} s after a kill (median of {}; max {max:.2} s), with a 30 s lease",
        kills.len(),
        lost.len(),
        takeovers.len()
    );
    db.batch_execute(&format!("DROP TABLE {ledger}, {execs}"))
        .await
        .unwrap();
}
