//! Rust workers in the background of a test, and clients whose connections
//! can be found in pg_stat_activity.

use baton::{Client, Worker};
use std::time::Duration;
use tokio::sync::oneshot;

pub type Running = (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<baton::Result<()>>,
);

/// A client whose connections carry `application_name`.
pub async fn client_named(app: &str) -> Client {
    let base = super::url();
    let sep = if base.contains('?') { '&' } else { '?' };
    Client::connect(&format!("{base}{sep}application_name={app}"))
        .await
        .expect("connect")
}

/// Start `worker` in the background; the returned sender stops it.
pub fn spawn(worker: Worker) -> Running {
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(worker.run_until(async {
        let _ = rx.await;
    }));
    (tx, handle)
}

/// Stop a worker started by `spawn`; it must stop cleanly within a minute.
pub async fn shut(stop: oneshot::Sender<()>, handle: tokio::task::JoinHandle<baton::Result<()>>) {
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("the worker stops")
        .expect("no panic")
        .expect("no error");
}
