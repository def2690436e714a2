//! The order workflow with the Rust client: validate payment and check
//! inventory in parallel, then ship (which fails once with a transient error
//! and succeeds on its retry), then notify the customer. Prints the run and
//! its steps.
//!
//!   BATON_URL=postgres://postgres@127.0.0.1:55439/baton_demo cargo run -p baton --example order

use baton::{Backoff, Client, EnqueueOptions, Step, StepError, Worker, WorkflowDef};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;

#[derive(Serialize, Deserialize)]
struct Order {
    order_id: u64,
    items: Vec<String>,
}

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
            &WorkflowDef::new("rust_order")
                .queue("orders")
                .step(Step::new("validate_payment"))
                .step(Step::new("check_inventory"))
                .step(
                    Step::new("ship_order")
                        .after(["validate_payment", "check_inventory"])
                        .max_attempts(5)
                        .backoff(Backoff {
                            initial: Duration::from_millis(200),
                            max: Duration::from_secs(10),
                            multiplier: 2.0,
                        }),
                )
                .step(
                    Step::new("notify_customer")
                        .after(["ship_order"])
                        .queue("emails"),
                ),
        )
        .await?;
    println!("defined rust_order version {version}");

    let worker = Worker::builder(&client)
        .name("order-example")
        .queues(["orders", "emails"])
        .concurrency(4)
        .handler("rust_order", "validate_payment", |ctx| async move {
            let order: Order = ctx.input()?;
            Ok(json!({ "authorized": true, "order_id": order.order_id }))
        })
        .handler("rust_order", "check_inventory", |ctx| async move {
            let order: Order = ctx.input()?;
            Ok(json!({ "in_stock": order.items.len() }))
        })
        .handler("rust_order", "ship_order", |ctx| async move {
            if ctx.attempt == 1 {
                println!("  ship_order attempt 1: carrier timed out (transient)");
                return Err(StepError::retryable("carrier timed out"));
            }
            let stock: serde_json::Value = ctx.upstream("check_inventory")?;
            println!("  ship_order attempt {}: shipping {} item(s)", ctx.attempt, stock["in_stock"]);
            Ok(json!({ "tracking": "BTN-0042" }))
        })
        .handler("rust_order", "notify_customer", |ctx| async move {
            let shipped: serde_json::Value = ctx.upstream("ship_order")?;
            Ok(json!({ "email": format!("your parcel {} is on its way", shipped["tracking"].as_str().unwrap_or("?")) }))
        })
        .build();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));

    let order = Order {
        order_id: 42,
        items: vec!["book".into(), "lamp".into()],
    };
    let key = format!("rust-order-{}", uuid::Uuid::new_v4());
    let run = client
        .enqueue(
            "rust_order",
            &order,
            EnqueueOptions::default().idempotency_key(key),
        )
        .await?;
    println!("enqueued run {run}");
    let output: serde_json::Value = client.wait_for(run, Duration::from_secs(60)).await?;
    println!("run succeeded with output {output}");

    let conn = client.pool().get().await?;
    println!("{:<18} {:<10} {:>7}  output", "step", "status", "attempt");
    for row in conn
        .query(
            "SELECT step, status, attempt, output::text FROM baton.workflow_steps WHERE workflow_id = $1 ORDER BY step_id",
            &[&run],
        )
        .await?
    {
        let (step, status, attempt, out): (String, String, i32, Option<String>) = (row.get(0), row.get(1), row.get(2), row.get(3));
        println!("{step:<18} {status:<10} {attempt:>7}  {}", out.unwrap_or_default());
    }
    stop.send(()).ok();
    running.await??;
    assert_eq!(
        output["notify_customer"]["email"],
        "your parcel BTN-0042 is on its way"
    );
    Ok(())
}
