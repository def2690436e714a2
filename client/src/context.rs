//! What a step handler gets: the step's input, its upstream outputs, code-first
//! checkpoints, and transactional completion.

use crate::client::Client;
use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// A handler's failure: retried after the step's backoff, or final. Or not a
/// failure: the step was suspended (`StepContext::sleep`, `wait_event`).
#[derive(Debug, Clone)]
pub struct StepError {
    pub message: String,
    pub retryable: bool,
    /// The step gave its lease back with `baton.suspend_step` and waits: the
    /// worker records nothing for it (no completion, no failure, no hand
    /// back) and stops renewing the lease. It runs again, from the start of
    /// its handler, when it is ready again.
    pub suspended: bool,
}

impl StepError {
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            retryable: true,
            suspended: false,
        }
    }
    /// Fails the step (and its run) without further attempts.
    pub fn fatal(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            retryable: false,
            suspended: false,
        }
    }
    /// What `StepContext::sleep` and `StepContext::wait_event` return after
    /// suspending the step: pass it on (`?`) to end the handler. A handler
    /// that suspends its step itself (`baton.suspend_step` on its own
    /// connection) returns it too; returned without a suspension, the step
    /// waits for its lease to expire (an attempt used).
    pub fn suspended() -> Self {
        StepError {
            message: "step suspended".to_string(),
            retryable: true,
            suspended: true,
        }
    }
    pub fn is_suspended(&self) -> bool {
        self.suspended
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Any error turns into a retryable failure, so `?` works in handlers.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for StepError {
    fn from(e: E) -> Self {
        StepError::retryable(e.to_string())
    }
}

pub struct StepContext {
    pub step_id: i64,
    pub lease_token: Uuid,
    pub run_id: Uuid,
    pub workflow: String,
    pub step: String,
    pub attempt: i32,
    input: serde_json::Value,
    upstream: serde_json::Value,
    map_index: Option<i32>,
    map_item: Option<serde_json::Value>,
    checkpoints: Mutex<HashMap<String, serde_json::Value>>,
    client: Client,
    completed: Arc<AtomicBool>,
    suspended: Arc<AtomicBool>,
    /// `sleep` calls so far in this execution of the handler.
    sleeps: AtomicU32,
}

impl StepContext {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        step_id: i64,
        lease_token: Uuid,
        run_id: Uuid,
        workflow: String,
        step: String,
        attempt: i32,
        input: serde_json::Value,
        upstream: serde_json::Value,
        checkpoints: serde_json::Value,
        map_index: Option<i32>,
        map_item: Option<serde_json::Value>,
        client: Client,
    ) -> Self {
        let checkpoints = match checkpoints {
            serde_json::Value::Object(m) => m.into_iter().collect(),
            _ => HashMap::new(),
        };
        StepContext {
            step_id,
            lease_token,
            run_id,
            workflow,
            step,
            attempt,
            input,
            upstream,
            map_index,
            map_item,
            checkpoints: Mutex::new(checkpoints),
            client,
            completed: Arc::new(AtomicBool::new(false)),
            suspended: Arc::new(AtomicBool::new(false)),
            sleeps: AtomicU32::new(0),
        }
    }

    /// The run's input as `T`. A mismatch is a fatal error: retrying won't fix it.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        serde_json::from_value(self.input.clone())
            .map_err(|e| StepError::fatal(format!("input of {}: {e}", self.workflow)))
    }

    /// The output of direct upstream step `step` as `T`.
    pub fn upstream<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        let value = self.upstream.get(step).cloned().ok_or_else(|| {
            StepError::fatal(format!(
                "\"{step}\" is not an upstream step of \"{}\"",
                self.step
            ))
        })?;
        serde_json::from_value(value)
            .map_err(|e| StepError::fatal(format!("output of \"{step}\": {e}")))
    }

    /// For an item of a map step: its position (0-based) in the source
    /// step's output array. None for any other step.
    pub fn map_index(&self) -> Option<i32> {
        self.map_index
    }

    /// For an item of a map step: its element of the source step's output,
    /// as `T`. Not a map item, or a mismatch: a fatal error.
    pub fn map_item<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        if self.map_index.is_none() {
            return Err(StepError::fatal(format!(
                "\"{}\" is not an item of a map step",
                self.step
            )));
        }
        let item = self.map_item.clone().unwrap_or_default();
        serde_json::from_value(item).map_err(|e| {
            StepError::fatal(format!(
                "item {} of \"{}\": {e}",
                self.map_index.unwrap_or_default(),
                self.step
            ))
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Run `f` once for this step: its result is saved under `key`, and a later
    /// attempt (after a crash or a failure) gets the saved result instead of
    /// running `f` again.
    pub async fn checkpoint<T, F, Fut>(&self, key: &str, f: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        let saved = self
            .checkpoints
            .lock()
            .expect("checkpoint map")
            .get(key)
            .cloned();
        if let Some(saved) = saved {
            return serde_json::from_value(saved).map_err(|e| {
                StepError::fatal(format!(
                    "checkpoint \"{key}\" no longer matches its type: {e}"
                ))
            });
        }
        let value = f().await?;
        let json = serde_json::to_value(&value).map_err(|e| StepError::fatal(e.to_string()))?;
        let conn = self
            .client
            .pool()
            .get()
            .await
            .map_err(|e| StepError::retryable(e.to_string()))?;
        conn.execute(
            "SELECT baton.checkpoint($1, $2, $3, $4)",
            &[&self.step_id, &self.lease_token, &key, &json],
        )
        .await
        .map_err(|e| StepError::retryable(Error::from(e).to_string()))?;
        self.checkpoints
            .lock()
            .expect("checkpoint map")
            .insert(key.to_string(), json);
        Ok(value)
    }

    /// Complete the step inside the caller's transaction, together with the
    /// step's own writes (exactly-once). If the lease was lost this returns
    /// `Error::LeaseLost` and the transaction must roll back. The worker then
    /// does not complete the step again.
    ///
    /// In a REPEATABLE READ or SERIALIZABLE transaction the database reports
    /// a step row that changed after the transaction's snapshot as a
    /// serialization failure (`40001`), not as a lost lease: the lease may
    /// have been reclaimed, or the worker's own heartbeat (on another
    /// connection) renewed it. Then this asks on another connection whether
    /// the lease is still held: if not, `Error::LeaseLost`; if it is, the
    /// serialization failure stays (`Error::Database` with code `40001`,
    /// `is_transient()`): roll back and run the transaction again. READ
    /// COMMITTED, PostgreSQL's default, never sees the heartbeat's change as
    /// a conflict.
    pub async fn complete_in<C, O>(&self, tx: &C, output: &O) -> Result<()>
    where
        C: GenericClient + ?Sized,
        O: Serialize + ?Sized,
    {
        let output = serde_json::to_value(output)?;
        let result = tx
            .query_one(
                "SELECT baton.complete_step($1, $2, $3)",
                &[&self.step_id, &self.lease_token, &output],
            )
            .await;
        match result {
            Ok(_) => {
                self.completed.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                let e = Error::from(e);
                if e.sqlstate() != Some("40001") {
                    return Err(e);
                }
                match self.lease_held().await {
                    Ok(false) => Err(Error::LeaseLost(format!(
                        "step {} changed after this transaction's snapshot and its lease is no longer held ({e})",
                        self.step_id
                    ))),
                    // held (a heartbeat changed the row), or unknown: the
                    // serialization failure stays, and a retry will tell
                    Ok(true) | Err(_) => Err(e),
                }
            }
        }
    }

    /// Whether this attempt's lease is still the step's, as committed now
    /// (asked on a connection of the pool, outside the caller's transaction).
    async fn lease_held(&self) -> Result<bool> {
        let conn = self.client.pool().get().await?;
        let row = conn
            .query_opt(
                "SELECT lease_token = $2 FROM baton.steps WHERE step_id = $1",
                &[&self.step_id, &self.lease_token],
            )
            .await?;
        Ok(row
            .and_then(|r| r.get::<_, Option<bool>>(0))
            .unwrap_or(false))
    }

    pub(crate) fn completed_flag(&self) -> Arc<AtomicBool> {
        self.completed.clone()
    }

    /// Set once the step has been suspended (`suspend`): its lease is no
    /// longer this attempt's.
    pub(crate) fn suspended_flag(&self) -> Arc<AtomicBool> {
        self.suspended.clone()
    }

    fn saved(&self, key: &str) -> Option<serde_json::Value> {
        self.checkpoints
            .lock()
            .expect("checkpoint map")
            .get(key)
            .cloned()
    }

    /// Sleep `duration` without holding a worker slot: the step is suspended
    /// until then (`baton.suspend_step`), and its handler runs again from
    /// the start, on any worker, when it is ready again; this call then
    /// returns `Ok(())`. Until that, it returns `StepError::suspended()`:
    /// pass it on with `?`. The code before it runs again too, so put what
    /// must not in `checkpoint`s.
    ///
    /// The n-th call (from 1) in an execution of the handler keeps its wake
    /// time (milliseconds since the epoch) in checkpoint `baton:sleep:<n>`:
    /// sleeps must come in the same order every time.
    pub async fn sleep(&self, duration: Duration) -> Result<(), StepError> {
        let n = self.sleeps.fetch_add(1, Ordering::SeqCst) + 1;
        let key = format!("baton:sleep:{n}");
        let now = epoch_ms(SystemTime::now());
        let (wake, save) = match self.saved(&key) {
            Some(saved) => {
                let wake = saved
                    .as_i64()
                    .or_else(|| saved.as_f64().map(|ms| ms as i64))
                    .ok_or_else(|| {
                        StepError::fatal(format!(
                            "checkpoint \"{key}\" is not a wake time: {saved}"
                        ))
                    })?;
                if wake <= now {
                    return Ok(());
                }
                (wake, None) // woken early: wait for the rest
            }
            None if duration.is_zero() => return Ok(()),
            None => {
                let ms = i64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX);
                let wake = now.saturating_add(ms);
                (wake, Some(serde_json::Value::from(wake)))
            }
        };
        let until = UNIX_EPOCH + Duration::from_millis(wake.max(0) as u64);
        self.suspend(save.map(|v| (key.as_str(), v)), Some(until), None, None)
            .await?;
        Err(StepError::suspended())
    }

    /// Wait for event `name` of this run (`Client::send_event`) without
    /// holding a worker slot: the step is suspended until it arrives or
    /// `timeout` passes, and its handler runs again from the start; this
    /// call then returns the event's payload, or None if the wait timed out.
    /// Until that, it returns `StepError::suspended()`: pass it on with `?`.
    /// An event sent before is kept and delivered at once.
    ///
    /// The outcome is kept in checkpoint `event:<name>`: one wait per event
    /// name in a step (a second call returns the same outcome).
    pub async fn wait_event<T: DeserializeOwned>(
        &self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<T>, StepError> {
        let key = format!("event:{name}");
        if let Some(saved) = self.saved(&key) {
            if saved.get("timed_out").and_then(|t| t.as_bool()) == Some(true) {
                return Ok(None);
            }
            let payload = saved.get("payload").cloned().unwrap_or_default();
            return serde_json::from_value(payload)
                .map(Some)
                .map_err(|e| StepError::fatal(format!("payload of event \"{name}\": {e}")));
        }
        self.suspend(None, None, Some(name), timeout).await?;
        Err(StepError::suspended())
    }

    /// Save `checkpoint` (if any) and suspend the step, in one transaction.
    async fn suspend(
        &self,
        checkpoint: Option<(&str, serde_json::Value)>,
        until: Option<SystemTime>,
        event: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<(), StepError> {
        let failed = |e: Error| StepError::retryable(format!("could not suspend the step: {e}"));
        let mut conn = self
            .client
            .pool()
            .get()
            .await
            .map_err(|e| failed(e.into()))?;
        let tx = conn.transaction().await.map_err(|e| failed(e.into()))?;
        if let Some((key, value)) = &checkpoint {
            tx.execute(
                "SELECT baton.checkpoint($1, $2, $3, $4)",
                &[&self.step_id, &self.lease_token, key, value],
            )
            .await
            .map_err(|e| failed(e.into()))?;
        }
        let timeout = timeout.map(|d| d.as_secs_f64());
        tx.execute(
            "SELECT baton.suspend_step($1, $2, until => $3, event => $4, \
             timeout => make_interval(secs => $5::float8))",
            &[&self.step_id, &self.lease_token, &until, &event, &timeout],
        )
        .await
        .map_err(|e| failed(e.into()))?;
        tx.commit().await.map_err(|e| failed(e.into()))?;
        self.suspended.store(true, Ordering::SeqCst);
        if let Some((key, value)) = checkpoint {
            self.checkpoints
                .lock()
                .expect("checkpoint map")
                .insert(key.to_string(), value);
        }
        Ok(())
    }
}

fn epoch_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suspension_is_neither_a_failure_nor_a_result() {
        let s = StepError::suspended();
        assert!(s.is_suspended());
        assert!(!StepError::retryable("x").is_suspended());
        assert!(!StepError::fatal("x").is_suspended());
        let from_io: StepError = std::io::Error::other("boom").into();
        assert!(from_io.retryable && !from_io.suspended);
    }

    #[test]
    fn wake_times_are_milliseconds_since_the_epoch() {
        assert_eq!(epoch_ms(UNIX_EPOCH + Duration::from_millis(1234)), 1234);
        assert_eq!(epoch_ms(UNIX_EPOCH - Duration::from_millis(5)), -5);
    }
}
