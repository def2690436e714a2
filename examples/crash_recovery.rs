//! Crash recovery: a worker process is killed with SIGKILL in the middle of a
//! step, after the step saved a code-first checkpoint. Its lease expires, a
//! second worker takes the step over, gets the checkpoint back instead of
//! redoing that part, and the run completes. The attempt history shows both.
//!
//!   BATON_URL=postgres://postgres@127.0.0.1:55439/baton_demo cargo run -p baton --example crash_recovery

use baton::{Client, EnqueueOptions, Step, Worker, WorkflowDef};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

const WORKFLOW: &str = "crash_demo";
const QUEUE: &str = "crash_demo";
const LEASE: Duration = Duration::from_secs(2);

fn worker(client: &Client, name: &str, crashing: bool) -> Worker {
    Worker::builder(client)
        .name(name)
        .queues([QUEUE])
        .lease(LEASE)
        .poll_interval(Duration::from_millis(250))
        .handler(WORKFLOW, "prepare", |_ctx| async {
            Ok(json!({"prepared": true}))
        })
        .handler(WORKFLOW, "long_step", move |ctx| async move {
            let who = if crashing { "doomed" } else { "rescuer" };
            println!("  [{who}] long_step attempt {} started", ctx.attempt);
            // Runs once: a later attempt gets the saved value back.
            let attempt = ctx.attempt;
            let reservation: String = ctx
                .checkpoint("reservation", || async move {
                    Ok(format!("reserved by attempt {attempt}"))
                })
                .await?;
            println!("  [{who}] reservation: {reservation}");
            if crashing {
                tokio::time::sleep(Duration::from_secs(3600)).await; // killed before this ends
            }
            Ok(json!({"finished_by_attempt": ctx.attempt, "reservation": reservation}))
        })
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("BATON_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55439/baton_demo".into());
    let client = Client::connect(&url).await?;

    // The child process: a worker that will be killed mid-step.
    if std::env::args().any(|a| a == "--doomed-worker") {
        worker(&client, "doomed-worker", true).run().await?;
        return Ok(());
    }

    client
        .define_workflow(
            &WorkflowDef::new(WORKFLOW)
                .queue(QUEUE)
                .step(Step::new("prepare"))
                .step(Step::new("long_step").after(["prepare"])),
        )
        .await?;
    let run = client
        .enqueue(WORKFLOW, &json!({}), EnqueueOptions::default())
        .await?;
    println!("enqueued run {run}");

    let mut child = Command::new(std::env::current_exe()?)
        .arg("--doomed-worker")
        .env("BATON_URL", &url)
        .spawn()?;
    let conn = client.pool().get().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: bool = conn
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM baton.checkpoints WHERE run_id = $1 AND key = 'reservation')",
                &[&run],
            )
            .await?
            .get(0);
        if running {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the doomed worker never saved its checkpoint"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill()?; // SIGKILL: no cleanup, no release, the lease just stops being renewed
    child.wait()?;
    let killed_at = Instant::now();
    println!(
        "killed the worker (pid {}) with SIGKILL in the middle of long_step, after its checkpoint",
        child.id()
    );

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let rescuer = tokio::spawn(worker(&client, "rescuer", false).run_until(async {
        let _ = stopped.await;
    }));
    let output: serde_json::Value = client.wait_for(run, Duration::from_secs(60)).await?;
    println!(
        "run succeeded {:.1} s after the kill (lease {} s): {output}",
        killed_at.elapsed().as_secs_f64(),
        LEASE.as_secs()
    );
    for row in conn
        .query(
            "SELECT step, attempt, worker, outcome, coalesce(error, '') FROM baton.step_attempts WHERE workflow_id = $1 ORDER BY finished_at",
            &[&run],
        )
        .await?
    {
        let (step, attempt, worker, outcome, error): (String, i32, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        println!("  {step:<10} attempt {attempt}  {worker:<14} {outcome:<14} {error}");
    }
    stop.send(()).ok();
    rescuer.await??;
    assert_eq!(
        output,
        json!({"long_step": {"finished_by_attempt": 2, "reservation": "reserved by attempt 1"}})
    );
    Ok(())
}
