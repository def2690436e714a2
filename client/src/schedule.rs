//! Cron schedules: the database's background worker enqueues a run of the
//! schedule's workflow at each tick (idempotency key
//! `schedule:<name>:<tick>`; after downtime only the most recent missed tick).

use crate::client::Client;
use crate::error::Result;
use std::time::SystemTime;
use uuid::Uuid;

/// What a tick does while the run of the previous one is unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Start another run anyway.
    #[default]
    Allow,
    /// Skip the tick.
    Skip,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Allow => "allow",
            Overlap::Skip => "skip",
        }
    }
}

/// Options of `Client::schedule`; `Default` is: input `{}`, UTC, overlap
/// allowed, not paused.
#[derive(Debug, Clone)]
pub struct ScheduleOptions {
    /// The input of every run the schedule starts.
    pub input: serde_json::Value,
    /// The time zone the cron expression is read in (e.g. `Europe/Paris`).
    pub timezone: String,
    pub overlap: Overlap,
    pub paused: bool,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions {
            input: serde_json::json!({}),
            timezone: "UTC".to_string(),
            overlap: Overlap::Allow,
            paused: false,
        }
    }
}

impl ScheduleOptions {
    pub fn input(mut self, input: serde_json::Value) -> Self {
        self.input = input;
        self
    }
    pub fn timezone(mut self, timezone: impl Into<String>) -> Self {
        self.timezone = timezone.into();
        self
    }
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }
}

/// A schedule as `baton.schedules` shows it.
#[derive(Debug, Clone)]
pub struct ScheduleInfo {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub workflow: String,
    pub input: serde_json::Value,
    /// As the database spells it: `allow` or `skip`.
    pub overlap: String,
    pub paused: bool,
    pub next_run_at: Option<SystemTime>,
    pub last_run_at: Option<SystemTime>,
    pub last_run_id: Option<Uuid>,
}

impl ScheduleInfo {
    /// `overlap` as an `Overlap` (None for a value this client does not know).
    pub fn overlap(&self) -> Option<Overlap> {
        match self.overlap.as_str() {
            "allow" => Some(Overlap::Allow),
            "skip" => Some(Overlap::Skip),
            _ => None,
        }
    }
}

impl Client {
    /// Create or replace schedule `name`: a run of `workflow` at each tick of
    /// `cron` (five fields, e.g. `0 2 * * *`) in `opts.timezone`. A bad cron,
    /// time zone or overlap: `Error::InvalidInput`; an unknown workflow:
    /// `Error::NotFound`.
    pub async fn schedule(
        &self,
        name: &str,
        cron: &str,
        workflow: &str,
        opts: ScheduleOptions,
    ) -> Result<()> {
        let conn = self.pool().get().await?;
        conn.execute(
            "SELECT baton.schedule($1, $2, $3, input => $4, timezone => $5, overlap => $6, paused => $7)",
            &[
                &name,
                &cron,
                &workflow,
                &opts.input,
                &opts.timezone,
                &opts.overlap.as_str(),
                &opts.paused,
            ],
        )
        .await?;
        Ok(())
    }

    /// Remove schedule `name`; false if there was none.
    pub async fn unschedule(&self, name: &str) -> Result<bool> {
        let conn = self.pool().get().await?;
        Ok(conn
            .query_one("SELECT baton.unschedule($1)", &[&name])
            .await?
            .get(0))
    }

    /// Every schedule, by name.
    pub async fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        let conn = self.pool().get().await?;
        let rows = conn
            .query(
                "SELECT name::text, cron::text, timezone::text, workflow::text, input, overlap::text, paused, \
                 next_run_at, last_run_at, last_run_id FROM baton.schedules ORDER BY name",
                &[],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| ScheduleInfo {
                name: r.get(0),
                cron: r.get(1),
                timezone: r.get(2),
                workflow: r.get(3),
                input: r.get::<_, Option<serde_json::Value>>(4).unwrap_or_default(),
                overlap: r.get(5),
                paused: r.get(6),
                next_run_at: r.get(7),
                last_run_at: r.get(8),
                last_run_id: r.get(9),
            })
            .collect())
    }
}
