//! Operating runs (pg_baton 0.4.0): resume a failed or cancelled run, run a
//! finished one again from a step, fork a run into a new one, delete runs
//! and purge old ones; the log of what these did to a run; and the stored
//! versions of each workflow, with how many runs are still on each.
//!
//! Each operation is one transition under the run's lock, like a worker's,
//! so it waits for a worker's transaction on the same run (and the worker
//! for it), and leases stay fenced: a step that was running when its run
//! was deleted or ran again completes with `Error::LeaseLost`. A refusal is
//! typed: `Error::NotFound` (unknown run, step or version),
//! `Error::WrongState` (e.g. resuming a run that has not failed) or
//! `Error::InvalidInput`; nothing changed then. The `_in` functions run in
//! the caller's transaction: the operation happens if and only if it commits.

use crate::client::Client;
use crate::error::{Error, Result};
use crate::interval;
use serde::Serialize;
use std::time::{Duration, SystemTime};
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// Which version of its workflow a fork runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkVersion {
    /// The newest version. Steps are matched to the source's by name: those
    /// a new version renamed or added run.
    Latest,
    /// This version (unknown: `Error::NotFound`).
    Number(i32),
}

impl ForkVersion {
    fn to_sql(self) -> String {
        match self {
            ForkVersion::Latest => "latest".to_string(),
            ForkVersion::Number(n) => n.to_string(),
        }
    }
}

/// Options of a fork; `Default` is: the source's input and version.
#[derive(Debug, Clone, Default)]
pub struct ForkOptions {
    /// The input as JSON, or why it did not serialize (reported by the fork,
    /// so that the builder does not return a `Result`).
    input: Option<std::result::Result<serde_json::Value, String>>,
    version: Option<ForkVersion>,
}

impl ForkOptions {
    /// Run the fork with this input instead of the source's.
    pub fn input<I: Serialize + ?Sized>(mut self, input: &I) -> Self {
        self.input = Some(serde_json::to_value(input).map_err(|e| e.to_string()));
        self
    }
    /// Run the fork on another version of the workflow.
    pub fn version(mut self, version: ForkVersion) -> Self {
        self.version = Some(version);
        self
    }
}

/// One entry of `baton.workflow_log`: what an operation (or a cancel) did to
/// a run.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub run_id: Uuid,
    /// Increasing over every run's entries: orders a run's entries.
    pub seq: i64,
    pub at: SystemTime,
    /// `resumed`, `retried_from`, `forked` (on the source), `forked_from` (on
    /// the fork) or `cancelled`.
    pub action: String,
    /// The step named: `retry_from`'s, or the fork's `from_step`.
    pub step: Option<String>,
    /// What the action found and did, e.g. `{"was": "failed", "error": ...,
    /// "steps": 2}`, or the other run of a fork.
    pub detail: Option<serde_json::Value>,
    /// The database role that did it.
    pub actor: String,
}

/// One stored version of a workflow, as `baton.workflow_definitions` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowDefinition {
    pub name: String,
    pub version: i32,
    /// The normalized definition JSON.
    pub definition: serde_json::Value,
    pub created_at: SystemTime,
    /// Runs on this version that have not finished: a run finishes on the
    /// version it started with, also when resumed or retried.
    pub unfinished_runs: u64,
    /// Whether this is the workflow's newest version (what new runs get).
    pub latest: bool,
}

impl Client {
    /// Continue a failed or cancelled run: its failed and cancelled steps
    /// run again with a fresh attempt budget; succeeded steps keep their
    /// outputs. A run in another state: `Error::WrongState`.
    pub async fn resume(&self, run_id: Uuid) -> Result<()> {
        let conn = self.pool().get().await?;
        resume_in(&**conn, run_id).await
    }

    /// Run `step` of a finished run (succeeded, failed or cancelled) again,
    /// with every step downstream of it and every step that did not succeed;
    /// upstream outputs are reused, and earlier attempts stay in the history.
    /// An unfinished run: `Error::WrongState`; an unknown step:
    /// `Error::NotFound`.
    pub async fn retry_from(&self, run_id: Uuid, step: &str) -> Result<()> {
        let conn = self.pool().get().await?;
        retry_from_in(&**conn, run_id, step).await
    }

    /// Start a new run from run `run_id` (in any state, left unchanged): it
    /// copies the output of every step that succeeded there and is not
    /// downstream of `from_step`, and runs the others. Returns the new run's
    /// id; it records where it came from (`forked_from`).
    pub async fn fork(&self, run_id: Uuid, from_step: &str, opts: ForkOptions) -> Result<Uuid> {
        let conn = self.pool().get().await?;
        fork_in(&**conn, run_id, from_step, opts).await
    }

    /// Delete a run with everything that belongs to it (steps, attempts,
    /// checkpoints, events, log) and its child runs. An unfinished run is
    /// refused (`Error::WrongState`) unless `force`, which cancels it first.
    pub async fn delete(&self, run_id: Uuid, force: bool) -> Result<()> {
        let conn = self.pool().get().await?;
        delete_in(&**conn, run_id, force).await
    }

    /// Delete the runs that finished more than `older_than` ago,
    /// `batch_size` at a time (default 1000, at most 100,000); returns how
    /// many. Unfinished runs are never deleted, and a run another
    /// transaction holds right now is left for the next purge.
    pub async fn purge(&self, older_than: Duration, batch_size: Option<i32>) -> Result<u64> {
        let conn = self.pool().get().await?;
        let older_than = interval::to_sql(older_than);
        let row = match batch_size {
            None => {
                conn.query_one("SELECT baton.purge($1::text::interval)", &[&older_than])
                    .await?
            }
            Some(n) => {
                conn.query_one(
                    "SELECT baton.purge($1::text::interval, $2)",
                    &[&older_than, &n],
                )
                .await?
            }
        };
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// The log of run `run_id`, oldest first (empty for a run without
    /// entries, or one that does not exist).
    pub async fn workflow_log(&self, run_id: Uuid) -> Result<Vec<LogEntry>> {
        let conn = self.pool().get().await?;
        let rows = conn
            .query(
                "SELECT workflow_id, seq, at, action, step, detail, actor FROM baton.workflow_log \
                 WHERE workflow_id = $1 ORDER BY seq",
                &[&run_id],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| LogEntry {
                run_id: r.get(0),
                seq: r.get(1),
                at: r.get(2),
                action: r.get(3),
                step: r.get(4),
                detail: r.get(5),
                actor: r.get(6),
            })
            .collect())
    }

    /// Every version of every workflow, by name and version.
    pub async fn workflow_definitions(&self) -> Result<Vec<WorkflowDefinition>> {
        let conn = self.pool().get().await?;
        let rows = conn
            .query(
                "SELECT name, version, definition, created_at, unfinished_runs, latest \
                 FROM baton.workflow_definitions ORDER BY name, version",
                &[],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| WorkflowDefinition {
                name: r.get(0),
                version: r.get(1),
                definition: r.get(2),
                created_at: r.get(3),
                unfinished_runs: u64::try_from(r.get::<_, i64>(4)).unwrap_or(0),
                latest: r.get(5),
            })
            .collect())
    }
}

/// `Client::resume` on any connection or transaction.
pub async fn resume_in<C>(conn: &C, run_id: Uuid) -> Result<()>
where
    C: GenericClient + ?Sized,
{
    conn.query_one("SELECT baton.resume_workflow($1)", &[&run_id])
        .await?;
    Ok(())
}

/// `Client::retry_from` on any connection or transaction.
pub async fn retry_from_in<C>(conn: &C, run_id: Uuid, step: &str) -> Result<()>
where
    C: GenericClient + ?Sized,
{
    conn.query_one("SELECT baton.retry_from($1, $2)", &[&run_id, &step])
        .await?;
    Ok(())
}

/// `Client::fork` on any connection or transaction: inside the caller's own
/// transaction, the fork exists if and only if it commits.
pub async fn fork_in<C>(conn: &C, run_id: Uuid, from_step: &str, opts: ForkOptions) -> Result<Uuid>
where
    C: GenericClient + ?Sized,
{
    let input = match opts.input {
        None => None,
        Some(Ok(input)) => Some(input),
        Some(Err(message)) => return Err(Error::Json(serde::ser::Error::custom(message))),
    };
    let version = opts.version.map(ForkVersion::to_sql);
    let row = conn
        .query_one(
            "SELECT baton.fork_workflow($1, $2, input => $3, version => $4)",
            &[&run_id, &from_step, &input, &version],
        )
        .await?;
    Ok(row.get(0))
}

/// `Client::delete` on any connection or transaction.
pub async fn delete_in<C>(conn: &C, run_id: Uuid, force: bool) -> Result<()>
where
    C: GenericClient + ?Sized,
{
    conn.query_one(
        "SELECT baton.delete_workflow($1, force => $2)",
        &[&run_id, &force],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_versions_as_the_database_reads_them() {
        assert_eq!(ForkVersion::Latest.to_sql(), "latest");
        assert_eq!(ForkVersion::Number(3).to_sql(), "3");
    }

    #[test]
    fn a_fork_input_that_does_not_serialize_is_reported() {
        let mut bad = std::collections::HashMap::new();
        bad.insert((1, 2), "a tuple key is no JSON object key");
        let opts = ForkOptions::default().input(&bad);
        assert!(matches!(opts.input, Some(Err(_))));
    }
}
