//! Queue settings and live statistics: concurrency, pausing and flow control
//! (rate limits, per-key concurrency; pg_baton 0.4.0), and the backlog and
//! recent outcomes of every queue (`baton.queue_stats`).

use crate::client::Client;
use crate::error::Result;
use crate::interval;
use std::time::Duration;
use tokio_postgres::types::ToSql;

/// Every setting of one queue, as `Client::configure_queue_with` sets them
/// (each call sets all of them: one left out is none, or not paused).
/// `Default` is an open, unlimited queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// At most this many running steps in the queue (None: unlimited; 0
    /// stops claims, like `paused`).
    pub concurrency: Option<i32>,
    /// No claims at all while paused.
    pub paused: bool,
    /// At most `limit` claims in any window of `period`, over every worker.
    pub rate_limit: Option<RateLimit>,
    /// At most `limit` running steps per value of a key of the run's input.
    pub per_key: Option<KeyConcurrency>,
}

/// At most `limit` claims in any window of `period` (at least 1 ms, at most
/// 10 years), counted over every worker and connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: i32,
    pub period: Duration,
}

/// At most `limit` running steps per value of `key`, a JSON path into the
/// run's input such as `$.customer_id`. A run whose input has no value there
/// is not limited. Read back (`QueueStats`), the path is as PostgreSQL
/// normalizes it: `$."customer_id"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConcurrency {
    pub key: String,
    pub limit: i32,
}

impl QueueConfig {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn concurrency(mut self, concurrency: i32) -> Self {
        self.concurrency = Some(concurrency);
        self
    }
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }
    /// At most `limit` claims per `period` (e.g. 100 per second).
    pub fn rate_limit(mut self, limit: i32, period: Duration) -> Self {
        self.rate_limit = Some(RateLimit { limit, period });
        self
    }
    /// At most `limit` running steps per value of the JSON path `key` into
    /// the run's input.
    pub fn per_key_concurrency(mut self, key: impl Into<String>, limit: i32) -> Self {
        self.per_key = Some(KeyConcurrency {
            key: key.into(),
            limit,
        });
        self
    }
}

/// One row of `baton.queue_stats`: every configured queue, every queue with
/// live work, and every queue with a step finished in the last hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    pub queue: String,
    /// Steps that can be claimed now.
    pub ready: u64,
    /// Steps waiting for their time: a delayed start, a retry's backoff.
    pub delayed: u64,
    pub running: u64,
    /// Steps no worker holds that wait for time, an event, a child run or
    /// map items.
    pub waiting: u64,
    pub failed_last_hour: u64,
    pub completed_last_minute: u64,
    /// How long the oldest ready step has been runnable (zero when none is).
    pub oldest_ready_age: Duration,
    /// The queue's settings (`Default` for a queue never configured).
    pub config: QueueConfig,
    /// Claims in the current rate window, for a rate-limited queue.
    pub rate_used: Option<u64>,
}

impl Client {
    /// Set every setting of `queue`, flow control included (pg_baton
    /// 0.4.0). Bad settings (a rate limit below 1, a period under 1 ms, a key
    /// that is not a JSON path, ...): `Error::InvalidInput`.
    pub async fn configure_queue_with(&self, queue: &str, config: &QueueConfig) -> Result<()> {
        let mut sql = String::from("SELECT baton.configure_queue($1, $2, $3");
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&queue, &config.concurrency, &config.paused];
        // Named only when set, so that a database before 0.4.0 (three
        // parameters) takes the settings it has.
        let rate = config
            .rate_limit
            .map(|r| (r.limit, interval::to_sql(r.period)));
        if let Some((limit, period)) = &rate {
            params.push(limit);
            params.push(period);
            sql += &format!(
                ", rate_limit => ${}, rate_period => ${}::text::interval",
                params.len() - 1,
                params.len()
            );
        }
        if let Some(k) = &config.per_key {
            params.push(&k.key);
            params.push(&k.limit);
            sql += &format!(
                ", concurrency_key => ${}, per_key_concurrency => ${}",
                params.len() - 1,
                params.len()
            );
        }
        sql.push(')');
        let conn = self.pool().get().await?;
        conn.execute(&sql, &params).await?;
        Ok(())
    }

    /// Every queue's backlog, recent outcomes and settings, by name.
    pub async fn queue_stats(&self) -> Result<Vec<QueueStats>> {
        let conn = self.pool().get().await?;
        let sql = format!(
            "SELECT queue, ready, delayed, running, waiting, failed_last_hour, completed_last_minute, \
             {}, concurrency, paused, rate_limit, {}, concurrency_key, per_key_concurrency, rate_used \
             FROM baton.queue_stats ORDER BY queue",
            interval::micros_sql("oldest_ready_age"),
            interval::micros_sql("rate_period"),
        );
        let rows = conn.query(&sql, &[]).await?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(rows
            .into_iter()
            .map(|r| {
                let rate_limit: Option<i32> = r.get(10);
                let rate_period: Option<i64> = r.get(11);
                let key: Option<String> = r.get(12);
                let per_key: Option<i32> = r.get(13);
                QueueStats {
                    queue: r.get(0),
                    ready: count(r.get(1)),
                    delayed: count(r.get(2)),
                    running: count(r.get(3)),
                    waiting: count(r.get(4)),
                    failed_last_hour: count(r.get(5)),
                    completed_last_minute: count(r.get(6)),
                    oldest_ready_age: interval::from_micros(
                        r.get::<_, Option<i64>>(7).unwrap_or(0),
                    ),
                    config: QueueConfig {
                        concurrency: r.get(8),
                        paused: r.get(9),
                        rate_limit: rate_limit
                            .zip(rate_period)
                            .map(|(limit, period)| RateLimit {
                                limit,
                                period: interval::from_micros(period),
                            }),
                        per_key: key
                            .zip(per_key)
                            .map(|(key, limit)| KeyConcurrency { key, limit }),
                    },
                    rate_used: r.get::<_, Option<i64>>(14).map(count),
                }
            })
            .collect())
    }
}
