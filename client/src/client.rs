//! `Client`: define, enqueue, inspect, cancel and wait for workflow runs.

use crate::definition::WorkflowDef;
use crate::error::{Error, Result};
use crate::queue::QueueConfig;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::{Duration, SystemTime};
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;
use tracing::{info_span, Instrument};
use uuid::Uuid;

/// A handle to a database with pg_baton installed. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    pool: Pool,
    /// Where a worker opens its LISTEN connection (a pooled connection cannot
    /// receive notifications). None: workers poll.
    listen_config: Option<tokio_postgres::Config>,
    /// The TLS connector of every connection (crate::tls).
    tls: crate::tls::MakeRustlsConnect,
}

/// Options of one enqueue; `Default` is: no key, the definition's queues,
/// priority 0, start now, no deadline (but the definition's `timeout`).
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    pub idempotency_key: Option<String>,
    pub queue: Option<String>,
    pub priority: i32,
    pub delay: Option<Duration>,
    pub deadline: Option<SystemTime>,
}

impl EnqueueOptions {
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
    /// The run must finish by `deadline`: past it the background worker fails
    /// it (`deadline ... passed`) and cancels its unfinished steps.
    pub fn deadline(mut self, deadline: SystemTime) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

/// A run as `baton.workflow_runs` shows it.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub id: Uuid,
    pub workflow: String,
    pub version: i32,
    pub status: String,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
}

impl Client {
    /// Connect with a URL such as `postgres://user@host:5432/db` (pool of
    /// 16). TLS follows its `sslmode` and `sslrootcert` as in libpq
    /// (`require`, `verify-ca`, `verify-full`; see `connect_config`).
    pub async fn connect(url: &str) -> Result<Self> {
        let (config, tls) = crate::tls::connect_config(url)?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            // The most recently used connection first: its backend is hot in
            // the CPU caches and has the worker's statements planned; idle
            // ones stay idle. (First in, first out rotated every turn through
            // every connection: 0.3 ms more per turn on 2 cores.)
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .build()
            .map_err(|e| Error::PoolSetup(e.to_string()))?;
        // Fail now, not at first use, if the database is unreachable.
        drop(pool.get().await?);
        Ok(Client {
            pool,
            listen_config: Some(config),
            tls,
        })
    }

    /// Use an existing pool. Pass the connection config too if workers should
    /// LISTEN for wake-ups (else they poll); its connections use TLS as its
    /// `sslmode` says, without verifying the certificate (`from_pool_tls`
    /// takes a connector from `connect_config`).
    pub fn from_pool(pool: Pool, listen_config: Option<tokio_postgres::Config>) -> Self {
        Self::from_pool_tls(pool, listen_config, crate::tls::unverified())
    }

    /// `from_pool`, with the TLS connector of the LISTEN connections.
    pub fn from_pool_tls(
        pool: Pool,
        listen_config: Option<tokio_postgres::Config>,
        tls: crate::tls::MakeRustlsConnect,
    ) -> Self {
        Client {
            pool,
            listen_config,
            tls,
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(crate) fn listen_config(&self) -> Option<&tokio_postgres::Config> {
        self.listen_config.as_ref()
    }

    pub(crate) fn tls(&self) -> crate::tls::MakeRustlsConnect {
        self.tls.clone()
    }

    /// Store a new version of a workflow; returns its version number.
    pub async fn define_workflow(&self, def: &WorkflowDef) -> Result<i32> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_one(
                "SELECT baton.define_workflow($1, $2)",
                &[&def.name, &def.to_json()],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Start a run of the latest version of `workflow`.
    pub async fn enqueue<I: Serialize + ?Sized>(
        &self,
        workflow: &str,
        input: &I,
        opts: EnqueueOptions,
    ) -> Result<Uuid> {
        let conn = self.pool.get().await?;
        enqueue_in(&**conn, workflow, input, opts).await
    }

    pub async fn cancel(&self, run_id: Uuid) -> Result<bool> {
        let conn = self.pool.get().await?;
        Ok(conn
            .query_one("SELECT baton.cancel_workflow($1)", &[&run_id])
            .await?
            .get(0))
    }

    /// Set `queue`'s concurrency limit (None: unlimited) and whether it is
    /// paused. Every call sets every setting of the queue, so this one also
    /// clears the flow control that pg_baton 0.4.0 added (a rate limit,
    /// per-key concurrency): `configure_queue_with` sets those too.
    pub async fn configure_queue(
        &self,
        queue: &str,
        concurrency: Option<i32>,
        paused: bool,
    ) -> Result<()> {
        let config = QueueConfig {
            concurrency,
            paused,
            ..QueueConfig::default()
        };
        self.configure_queue_with(queue, &config).await
    }

    pub async fn run(&self, run_id: Uuid) -> Result<RunInfo> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                "SELECT id, workflow, version, status, output, error FROM baton.workflow_runs WHERE id = $1",
                &[&run_id],
            )
            .await?
            .ok_or_else(|| Error::NotFound(format!("workflow run {run_id} does not exist")))?;
        Ok(RunInfo {
            id: row.get(0),
            workflow: row.get(1),
            version: row.get(2),
            status: row.get(3),
            output: row.get(4),
            error: row.get(5),
        })
    }

    /// Wait until the run finishes and return its output as `T`; a failed or
    /// cancelled run is an error. Polls, starting at 10 ms and backing off to 500 ms.
    pub async fn wait_for<T: DeserializeOwned>(
        &self,
        run_id: Uuid,
        timeout: Duration,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            let run = self.run(run_id).await?;
            match run.status.as_str() {
                "succeeded" => return Ok(serde_json::from_value(run.output.unwrap_or_default())?),
                "failed" => {
                    return Err(Error::RunFailed {
                        run_id,
                        error: run.error.unwrap_or_default(),
                    })
                }
                "cancelled" => return Err(Error::RunCancelled { run_id }),
                _ => {}
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(Error::Timeout { run_id });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

/// The call without its closing parenthesis (a deadline may follow).
const ENQUEUE_SQL: &str =
    "SELECT baton.enqueue_workflow($1, $2, idempotency_key => $3, queue => $4, priority => $5, \
     run_at => now() + make_interval(secs => $6::float8)";

/// Enqueue on any connection or transaction: inside the caller's own
/// `tokio_postgres::Transaction`, the run starts if and only if it commits.
pub async fn enqueue_in<C, I>(
    conn: &C,
    workflow: &str,
    input: &I,
    opts: EnqueueOptions,
) -> Result<Uuid>
where
    C: GenericClient + ?Sized,
    I: Serialize + ?Sized,
{
    let input = serde_json::to_value(input)?;
    let delay = opts.delay.map(|d| d.as_secs_f64());
    let span = info_span!("baton.enqueue", workflow, run_id = tracing::field::Empty);
    async {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &workflow,
            &input,
            &opts.idempotency_key,
            &opts.queue,
            &opts.priority,
            &delay,
        ];
        // `deadline` came with pg_baton 0.3.0: named only when set.
        let sql = match &opts.deadline {
            None => format!("{ENQUEUE_SQL})"),
            Some(deadline) => {
                params.push(deadline);
                format!("{ENQUEUE_SQL}, deadline => $7)")
            }
        };
        let row = conn.query_one(&sql, &params).await?;
        let id: Uuid = row.get(0);
        tracing::Span::current().record("run_id", tracing::field::display(id));
        Ok(id)
    }
    .instrument(span)
    .await
}
