//! The worker's wake-up line: a dedicated connection that LISTENs on
//! `baton_ready` and wakes the claim loop when one of its queues has work.
//! It reconnects on failure; meanwhile the worker's polling covers. It is
//! also the session the database watches (`baton.register_worker`): when it
//! is gone, the background worker hands back the worker's leases at once.

use futures_util::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;
use tracing::{debug, warn};

pub(crate) struct Listener {
    task: JoinHandle<()>,
    /// Notified once the first connection registered the worker, or failed
    /// to: the worker claims only then, so that no lease of its name is taken
    /// while no live session of the name exists (the background worker would
    /// hand it back when an earlier session of the name ended).
    pub(crate) first_try: Arc<Notify>,
}

impl Listener {
    pub(crate) fn start(
        config: tokio_postgres::Config,
        tls: crate::tls::MakeRustlsConnect,
        worker: String,
        queues: Vec<String>,
        wake: Arc<Notify>,
    ) -> Self {
        let first_try = Arc::new(Notify::new());
        let tried = first_try.clone();
        let task = tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                match listen(&config, tls.clone(), &worker, &queues, &wake, &tried).await {
                    Ok(()) => pause = Duration::from_millis(100),
                    Err(e) => {
                        tried.notify_one();
                        warn!(error = %e, "LISTEN connection failed; polling until it is back")
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
        Listener { task, first_try }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn listen(
    config: &tokio_postgres::Config,
    tls: crate::tls::MakeRustlsConnect,
    worker: &str,
    queues: &[String],
    wake: &Notify,
    registered: &Notify,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut conn) = config.connect(tls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(msg) = poll_fn(|cx| conn.poll_message(cx)).await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.payload().to_string());
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client.batch_execute("LISTEN baton_ready").await?;
    debug!("listening on baton_ready");
    // A database without register_worker (before 0.6.0) still wakes the
    // worker; its leases then wait for their expiry.
    if let Err(e) = client
        .execute("SELECT baton.register_worker($1, $2)", &[&worker, &queues])
        .await
    {
        warn!(error = %e, worker, "cannot register the worker's session; its leases fall back to their expiry");
    }
    registered.notify_one();
    // Anything may have become ready while we were not listening.
    wake.notify_one();
    while let Some(queue) = rx.recv().await {
        if queues.contains(&queue) {
            wake.notify_one();
        }
    }
    drop(client);
    driver.await.unwrap_or(Ok(()))
}
