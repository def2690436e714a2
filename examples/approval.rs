//! Time and events with the Rust client: an order is charged, then waits
//! (without holding a worker) for the event "approved", for at most a
//! minute, then ships. The example sends the approval itself after a moment,
//! as a back office would. Then a nightly schedule (02:00 in Paris) of a
//! report workflow is created, shown and removed.
//!
//!   BATON_URL=postgres://postgres@127.0.0.1:55439/baton_demo cargo run -p baton --example approval

use baton::{Client, EnqueueOptions, Overlap, ScheduleOptions, Step, Worker, WorkflowDef};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let url = std::env::var("BATON_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55439/baton_demo".into());
    let client = Client::connect(&url).await?;

    let version = client
        .define_workflow(
            &WorkflowDef::new("approval_order")
                .queue("approvals")
                .timeout(Duration::from_secs(3600))
                .step(Step::new("charge"))
                .step(
                    Step::wait_event("approval", "approved")
                        .after(["charge"])
                        .timeout(Duration::from_secs(60)),
                )
                .step(Step::new("ship").after(["approval"])),
        )
        .await?;
    println!("defined approval_order version {version}");

    let worker = Worker::builder(&client)
        .name("approval-example")
        .queues(["approvals"])
        .poll_interval(Duration::from_millis(200))
        .handler("approval_order", "charge", |ctx| async move {
            let order: Value = ctx.input()?;
            println!(
                "  charge: {} EUR for order {}",
                order["amount"], order["order_id"]
            );
            Ok(json!({ "charged": order["amount"] }))
        })
        .handler("approval_order", "ship", |ctx| async move {
            let approval: Value = ctx.upstream("approval")?;
            println!("  ship: approved by {}", approval["by"]);
            Ok(json!({ "tracking": "BTN-0042" }))
        })
        .build();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));

    let run = client
        .enqueue(
            "approval_order",
            &json!({ "order_id": 42, "amount": 99 }),
            EnqueueOptions::default()
                .idempotency_key(format!("approval-{}", uuid::Uuid::new_v4()))
                .deadline(SystemTime::now() + Duration::from_secs(600)),
        )
        .await?;
    println!("enqueued run {run}");

    // The back office approves a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let woke = client
        .send_event(run, "approved", &json!({ "by": "ada" }))
        .await?;
    println!(
        "sent \"approved\": {}",
        if woke {
            "the waiting step took it"
        } else {
            "kept until the step waits for it"
        }
    );
    let output: Value = client.wait_for(run, Duration::from_secs(8)).await?;
    println!("run succeeded with output {output}");
    assert_eq!(output["ship"]["tracking"], "BTN-0042");

    let conn = client.pool().get().await?;
    println!("{:<10} {:<10} output", "step", "status");
    for row in conn
        .query(
            "SELECT step, status, output::text FROM baton.workflow_steps WHERE workflow_id = $1 ORDER BY step_id",
            &[&run],
        )
        .await?
    {
        let (step, status, out): (String, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
        println!("{step:<10} {status:<10} {}", out.unwrap_or_default());
    }
    stop.send(()).ok();
    running.await??;

    // A nightly report at 02:00, Paris time; a tick while the last report
    // still runs is skipped.
    client
        .define_workflow(
            &WorkflowDef::new("approval_nightly_report")
                .queue("reports")
                .step(Step::new("report")),
        )
        .await?;
    client
        .schedule(
            "approval_nightly",
            "0 2 * * *",
            "approval_nightly_report",
            ScheduleOptions::default()
                .input(json!({ "kind": "approvals" }))
                .timezone("Europe/Paris")
                .overlap(Overlap::Skip),
        )
        .await?;
    for s in client.schedules().await? {
        if s.name == "approval_nightly" {
            let next = s
                .next_run_at
                .and_then(|t| t.duration_since(SystemTime::now()).ok())
                .map(|d| format!("in {:.1} h", d.as_secs_f64() / 3600.0))
                .unwrap_or_else(|| "not planned".into());
            println!(
                "schedule {}: \"{}\" ({}) -> {}, overlap {}, next run {next}",
                s.name, s.cron, s.timezone, s.workflow, s.overlap
            );
        }
    }
    let removed = client.unschedule("approval_nightly").await?;
    println!("schedule removed: {removed}");
    assert!(removed);
    Ok(())
}
