//! Events of a run, both ways:
//! - into a run: `send_event` delivers a named event to the step waiting for
//!   it (an event step, or a handler in `StepContext::wait_event`), or keeps
//!   it for the first one that will;
//! - out of a run: `set_event` publishes a value under a key (latest wins),
//!   which `get_event` reads and `wait_event_value` waits for.

use crate::client::Client;
use crate::error::{Error, Result};
use futures_util::future::poll_fn;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, GenericClient};
use tracing::debug;
use uuid::Uuid;

/// The channel `baton.set_event` notifies, with payload `<run id>:<key>`.
const EVENT_CHANNEL: &str = "baton_event";

/// How often `wait_event_value` looks again without a notification.
const EVENT_POLL: Duration = Duration::from_secs(1);

impl Client {
    /// Send event `name` with `payload` to run `run`. True when it completed
    /// a waiting step at once; false when it was kept for a step that will
    /// wait for it later (or the run has finished). Unknown run:
    /// `Error::NotFound`.
    pub async fn send_event<P: Serialize + ?Sized>(
        &self,
        run: Uuid,
        name: &str,
        payload: &P,
    ) -> Result<bool> {
        let conn = self.pool().get().await?;
        send_event_in(&**conn, run, name, payload).await
    }

    /// Publish `value` under `key` for run `run` (the latest value wins) and
    /// wake those waiting for it (`wait_event_value`).
    pub async fn set_event<V: Serialize + ?Sized>(
        &self,
        run: Uuid,
        key: &str,
        value: &V,
    ) -> Result<()> {
        let value = serde_json::to_value(value)?;
        let conn = self.pool().get().await?;
        conn.execute("SELECT baton.set_event($1, $2, $3)", &[&run, &key, &value])
            .await?;
        Ok(())
    }

    /// The value last published under `key` for run `run`, or None.
    pub async fn get_event<T: DeserializeOwned>(&self, run: Uuid, key: &str) -> Result<Option<T>> {
        let conn = self.pool().get().await?;
        get_event_on(&**conn, run, key).await
    }

    /// Wait until a value is published under `key` for run `run` and return
    /// it; `Error::EventTimeout` once `timeout` has passed. Listens on
    /// `baton_event` on a connection of its own, and looks every second too
    /// (without a listen config, or while that connection is down, it only
    /// looks every second).
    pub async fn wait_event_value<T: DeserializeOwned>(
        &self,
        run: Uuid,
        key: &str,
        timeout: Duration,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        // LISTEN first, then look: a value set in between is not missed.
        let mut listener = match self.listen_config() {
            Some(config) => match EventListener::start(config, self.tls()).await {
                Ok(l) => Some(l),
                Err(e) => {
                    debug!(error = %e, "cannot LISTEN on {EVENT_CHANNEL}; polling");
                    None
                }
            },
            None => None,
        };
        let wanted = format!("{run}:{key}");
        loop {
            if let Some(value) = self.look(&mut listener, run, key).await? {
                return Ok(value);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::EventTimeout {
                    run_id: run,
                    key: key.to_string(),
                });
            }
            // Until our notification, the poll interval, or the deadline
            // (then one last look).
            let wait_until = deadline.min(tokio::time::Instant::now() + EVENT_POLL);
            loop {
                let got = match listener.as_mut() {
                    Some(l) => tokio::time::timeout_at(wait_until, l.rx.recv()).await,
                    None => {
                        tokio::time::sleep_until(wait_until).await;
                        break;
                    }
                };
                match got {
                    Err(_elapsed) => break,
                    Ok(Some(payload)) if payload == wanted => break,
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        debug!("LISTEN connection lost; polling");
                        listener = None;
                    }
                }
            }
        }
    }

    /// `get_event` on the listening connection if there is one, else (or if
    /// it broke) on one of the pool.
    async fn look<T: DeserializeOwned>(
        &self,
        listener: &mut Option<EventListener>,
        run: Uuid,
        key: &str,
    ) -> Result<Option<T>> {
        if let Some(l) = listener.as_ref() {
            match get_event_on(&l.client, run, key).await {
                Err(Error::Connection(e)) => {
                    debug!(error = %e, "LISTEN connection lost; polling");
                    *listener = None;
                }
                result => return result,
            }
        }
        self.get_event(run, key).await
    }
}

/// `Client::send_event` on any connection or transaction: inside the caller's
/// own `tokio_postgres::Transaction`, the event is sent if and only if it
/// commits.
pub async fn send_event_in<C, P>(conn: &C, run: Uuid, name: &str, payload: &P) -> Result<bool>
where
    C: GenericClient + ?Sized,
    P: Serialize + ?Sized,
{
    let payload = serde_json::to_value(payload)?;
    let row = conn
        .query_one(
            "SELECT baton.send_event($1, $2, $3)",
            &[&run, &name, &payload],
        )
        .await?;
    Ok(row.get(0))
}

async fn get_event_on<C, T>(conn: &C, run: Uuid, key: &str) -> Result<Option<T>>
where
    C: GenericClient + ?Sized,
    T: DeserializeOwned,
{
    let row = conn
        .query_one("SELECT baton.get_event($1, $2)", &[&run, &key])
        .await?;
    match row.get::<_, Option<serde_json::Value>>(0) {
        None => Ok(None),
        Some(value) => Ok(Some(serde_json::from_value(value)?)),
    }
}

/// A dedicated connection LISTENing on `baton_event`; the notifications'
/// payloads arrive on `rx`, which closes when the connection does.
struct EventListener {
    rx: mpsc::UnboundedReceiver<String>,
    client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<()>,
}

impl EventListener {
    async fn start(
        config: &tokio_postgres::Config,
        tls: crate::tls::MakeRustlsConnect,
    ) -> Result<Self> {
        let (client, mut conn) = config.connect(tls).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            while let Some(msg) = poll_fn(|cx| conn.poll_message(cx)).await {
                match msg {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = tx.send(n.payload().to_string());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {EVENT_CHANNEL}"))
            .await?;
        Ok(EventListener { rx, client, driver })
    }
}

impl Drop for EventListener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}
