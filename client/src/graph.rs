//! A run's shape (`baton.workflow_graph`), for tools that draw it: the run,
//! its steps in definition order with their state, and the edges between
//! them. A map step's items are counted by status, not listed; a workflow
//! step lists the child run of each of its attempts.

use crate::client::Client;
use crate::error::Result;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::time::SystemTime;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WorkflowGraph {
    pub run: GraphRun,
    pub steps: Vec<GraphStep>,
    pub edges: Vec<GraphEdge>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GraphRun {
    pub id: Uuid,
    pub workflow: String,
    pub version: i32,
    /// `pending`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(deserialize_with = "timestamp")]
    pub created_at: SystemTime,
    #[serde(default, deserialize_with = "timestamp_opt")]
    pub started_at: Option<SystemTime>,
    #[serde(default, deserialize_with = "timestamp_opt")]
    pub finished_at: Option<SystemTime>,
    /// The run whose workflow step started this one.
    #[serde(default)]
    pub parent_id: Option<Uuid>,
    /// The run this one was forked from.
    #[serde(default)]
    pub forked_from: Option<Uuid>,
}

/// One step of the definition (not a map item). Fields the step has no
/// value for are None.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GraphStep {
    pub name: String,
    /// `task`, `sleep`, `event`, `workflow` or `map`.
    pub kind: String,
    /// As `baton.workflow_steps` spells it: `blocked`, `scheduled`, `ready`,
    /// `running`, `waiting`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub queue: String,
    #[serde(default)]
    pub worker: Option<String>,
    #[serde(default, deserialize_with = "timestamp_opt")]
    pub started_at: Option<SystemTime>,
    #[serde(default, deserialize_with = "timestamp_opt")]
    pub finished_at: Option<SystemTime>,
    #[serde(default)]
    pub error: Option<String>,
    /// The event a waiting step waits for.
    #[serde(default)]
    pub wait_for: Option<String>,
    /// Its upstream steps, in definition order.
    #[serde(default)]
    pub after: Vec<String>,
    /// A map step: its items by status.
    #[serde(default)]
    pub map: Option<MapCounts>,
    /// A workflow step: the child run of each attempt, oldest first.
    #[serde(default)]
    pub child_runs: Option<Vec<ChildRun>>,
}

/// A map step's items: how many, and how many in each status that any has.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MapCounts {
    pub items: u64,
    #[serde(flatten)]
    pub by_status: BTreeMap<String, u64>,
}

impl MapCounts {
    /// How many items have `status` (`ready`, `succeeded`, ...).
    pub fn count(&self, status: &str) -> u64 {
        self.by_status.get(status).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChildRun {
    pub id: Uuid,
    pub status: String,
}

/// An edge of the graph: `to` runs after `from`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GraphEdge {
    pub from: String,
    pub to: String,
}

impl Client {
    /// The shape and state of run `run_id`; unknown run: `Error::NotFound`.
    pub async fn workflow_graph(&self, run_id: Uuid) -> Result<WorkflowGraph> {
        let conn = self.pool().get().await?;
        let graph: serde_json::Value = conn
            .query_one("SELECT baton.workflow_graph($1)", &[&run_id])
            .await?
            .get(0);
        Ok(serde_json::from_value(graph)?)
    }
}

fn timestamp<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<SystemTime, D::Error> {
    let text = String::deserialize(d)?;
    parse_timestamp(&text)
        .ok_or_else(|| serde::de::Error::custom(format!("not a timestamp: {text:?}")))
}

fn timestamp_opt<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<SystemTime>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(text) => parse_timestamp(&text)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("not a timestamp: {text:?}"))),
    }
}

/// A timestamptz as jsonb writes it, in the session's time zone:
/// `2026-12-02T08:35:25.900628+05:30` (RFC 3339), or with an offset in
/// seconds for a local mean time (`+00:19:32`, years before time zones).
/// `infinity` is not read: pg_baton's timestamps are times of its runs.
fn parse_timestamp(text: &str) -> Option<SystemTime> {
    use chrono::DateTime;
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.into());
    }
    // an offset with seconds (`+HH:MM:SS`): RFC 3339 without them, then them
    let (head, secs) = text.rsplit_once(':')?;
    let secs: i64 = secs.parse().ok().filter(|s| (0..60).contains(s))?;
    let sign = match head.get(head.len().checked_sub(6)?..)?.as_bytes()[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let t = DateTime::parse_from_rfc3339(head).ok()?;
    Some((t - chrono::Duration::seconds(sign * secs)).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, micros: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    #[test]
    fn reads_timestamps_as_jsonb_writes_them() {
        // 2026-12-02T03:05:25.833805Z
        let utc = at(1_796_180_725, 833_805);
        assert_eq!(
            parse_timestamp("2026-12-02T03:05:25.833805+00:00"),
            Some(utc)
        );
        assert_eq!(
            parse_timestamp("2026-12-02T08:35:25.833805+05:30"),
            Some(utc)
        );
        assert_eq!(
            parse_timestamp("2026-12-01T22:05:25.833805-05:00"),
            Some(utc)
        );
        assert_eq!(parse_timestamp("2026-12-02T03:05:25.833805Z"), Some(utc));
        assert_eq!(
            parse_timestamp("2026-12-02T03:05:25+00:00"),
            Some(at(1_796_180_725, 0))
        );
        assert_eq!(
            parse_timestamp("1970-01-01T00:00:00.5+00:00"),
            Some(at(0, 500_000))
        );
        // a local mean time offset, with seconds
        assert_eq!(
            parse_timestamp("1900-01-01T00:19:32+00:19:32"),
            Some(SystemTime::UNIX_EPOCH - Duration::from_secs(2_208_988_800))
        );
        assert_eq!(
            parse_timestamp("2000-02-29T00:00:00+00:00"),
            Some(at(951_782_400, 0))
        );
        for bad in [
            "",
            "infinity",
            "2026-12-02 03:05:25+00",
            "2026-13-02T03:05:25+00:00",
            "2026-12-02T03:05:25.x+00:00",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_the_graph_json() {
        let graph: WorkflowGraph = serde_json::from_value(serde_json::json!({
            "run": {"id": "0190c1b2-0000-7000-8000-000000000001", "workflow": "w", "version": 2,
                    "status": "running", "error": null, "created_at": "2026-12-02T03:05:25.833805+00:00",
                    "started_at": "2026-12-02T03:05:26+00:00", "finished_at": null,
                    "parent_id": null, "forked_from": null},
            "steps": [
                {"name": "list", "kind": "task", "status": "succeeded", "attempt": 1, "max_attempts": 3,
                 "queue": "q", "worker": "w1", "started_at": "2026-12-02T03:05:26+00:00",
                 "finished_at": "2026-12-02T03:05:27+00:00", "after": []},
                {"name": "each", "kind": "map", "status": "waiting", "attempt": 1, "max_attempts": 3,
                 "queue": "q", "after": ["list"], "map": {"items": 3, "ready": 1, "succeeded": 2}},
                {"name": "call", "kind": "workflow", "status": "blocked", "attempt": 0, "max_attempts": 1,
                 "queue": "q", "after": ["each"], "child_runs": []}
            ],
            "edges": [{"from": "list", "to": "each"}, {"from": "each", "to": "call"}]
        }))
        .unwrap();
        assert_eq!(graph.run.version, 2);
        assert_eq!(graph.run.finished_at, None);
        assert_eq!(graph.steps[0].worker.as_deref(), Some("w1"));
        let map = graph.steps[1].map.as_ref().unwrap();
        assert_eq!(
            (
                map.items,
                map.count("ready"),
                map.count("succeeded"),
                map.count("failed")
            ),
            (3, 1, 2, 0)
        );
        assert_eq!(graph.steps[2].child_runs, Some(vec![]));
        assert_eq!(graph.steps[2].map, None);
        assert_eq!(
            graph.edges[1],
            GraphEdge {
                from: "each".into(),
                to: "call".into()
            }
        );
    }
}
