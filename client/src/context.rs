//! What a step handler gets: the step's input, its upstream outputs, code-first
//! checkpoints, and transactional completion.

use crate::client::Client;
use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// A handler's failure: retried after the step's backoff, or final.
#[derive(Debug, Clone)]
pub struct StepError {
    pub message: String,
    pub retryable: bool,
}

impl StepError {
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            retryable: true,
        }
    }
    /// Fails the step (and its run) without further attempts.
    pub fn fatal(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            retryable: false,
        }
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
    checkpoints: Mutex<HashMap<String, serde_json::Value>>,
    client: Client,
    completed: Arc<AtomicBool>,
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
            checkpoints: Mutex::new(checkpoints),
            client,
            completed: Arc::new(AtomicBool::new(false)),
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
}
