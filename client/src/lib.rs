//! Rust client for pg_baton: durable workflows inside PostgreSQL.
//!
//! Everything here is a thin layer over the extension's SQL functions; every
//! fact lives in the database.
//!
//! ```no_run
//! use baton::{Client, EnqueueOptions, Step, WorkflowDef, Worker};
//! # async fn demo() -> baton::Result<()> {
//! let client = Client::connect("postgres://postgres@127.0.0.1:55439/baton_demo").await?;
//! client.define_workflow(&WorkflowDef::new("greet").step(Step::new("hello"))).await?;
//! let run = client.enqueue("greet", &serde_json::json!({"name": "Ada"}), EnqueueOptions::default()).await?;
//! let worker = Worker::builder(&client)
//!     .handler("greet", "hello", |ctx| async move {
//!         let input: serde_json::Value = ctx.input()?;
//!         Ok(format!("hello {}", input["name"]))
//!     })
//!     .build();
//! tokio::spawn(worker.run());
//! let output: serde_json::Value = client.wait_for(run, std::time::Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```

mod client;
mod context;
mod definition;
mod error;
mod event;
mod graph;
mod interval;
mod listen;
mod operation;
mod queue;
mod schedule;
mod tls;
mod worker;

pub use client::{enqueue_in, Client, EnqueueOptions, RunInfo};
pub use context::{StepContext, StepError};
pub use definition::{Backoff, Step, WorkflowDef};
pub use error::{Error, Result, LEASE_LOST};
pub use event::send_event_in;
pub use graph::{ChildRun, GraphEdge, GraphRun, GraphStep, MapCounts, WorkflowGraph};
pub use operation::{
    delete_in, fork_in, resume_in, retry_from_in, ForkOptions, ForkVersion, LogEntry,
    WorkflowDefinition,
};
pub use queue::{KeyConcurrency, QueueConfig, QueueStats, RateLimit};
pub use schedule::{Overlap, ScheduleInfo, ScheduleOptions};
pub use tls::{connect_config, MakeRustlsConnect};
pub use worker::{Worker, WorkerBuilder};
