//! The step kinds a definition may name besides tasks (see `sql/kinds.sql`):
//! `sleep`, `sleep_until`, `wait_event` (with `on_timeout`), `workflow` and
//! `map`. At most one per step. Texts that PostgreSQL parses (intervals,
//! JSON paths) and the workflow a `workflow` step names are checked in
//! `sql/define.sql`; this checks the shape.

use serde_json::{json, Map, Value};

/// The kind fields a step may have; `timeout` is shared with tasks.
pub const KIND_KEYS: &[&str] = &[
    "sleep",
    "sleep_until",
    "wait_event",
    "on_timeout",
    "workflow",
    "map",
];

/// Reads a step's kind fields into the normalized step: `kind` and the
/// field of that kind (for `map`, `source` is filled in later, once the
/// positions of all steps are known).
pub fn normalize_kind(
    whose: &str,
    s: &Map<String, Value>,
    after: &[String],
    step: &mut Value,
) -> Result<(), String> {
    let named: Vec<&str> = ["sleep", "sleep_until", "wait_event", "workflow", "map"]
        .into_iter()
        .filter(|k| s.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    if named.len() > 1 {
        return Err(format!(
            "{whose}: fields \"{}\" and \"{}\" cannot be combined: a step is of one kind",
            named[0], named[1]
        ));
    }
    let text = |field: &str| -> Result<String, String> {
        match s.get(field) {
            Some(Value::String(t)) if !t.trim().is_empty() => Ok(t.clone()),
            Some(Value::String(_)) => Err(format!("{whose}: field \"{field}\" must not be empty")),
            _ => Err(format!("{whose}: field \"{field}\" must be a string")),
        }
    };
    let kind = match named.first().copied() {
        None => "task",
        Some("sleep") => {
            step["sleep"] = json!(text("sleep")?);
            "sleep"
        }
        Some("sleep_until") => {
            step["sleep_until"] = json!(text("sleep_until")?);
            "sleep"
        }
        Some("wait_event") => {
            let event = text("wait_event")?;
            if event.len() > 200 {
                return Err(format!(
                    "{whose}: field \"wait_event\" is longer than 200 bytes"
                ));
            }
            step["wait_event"] = json!(event);
            "event"
        }
        Some("workflow") => {
            step["workflow"] = json!(text("workflow")?);
            "workflow"
        }
        Some(_) => {
            let source = text("map")?;
            if !after.iter().any(|a| *a == source) {
                return Err(format!(
                    "{whose}: field \"map\" names \"{source}\", which is not in its \"after\" (a map runs over the output of a direct upstream step)"
                ));
            }
            step["map"] = json!(source);
            "map"
        }
    };
    match s.get("on_timeout") {
        None | Some(Value::Null) => {
            if kind == "event" {
                step["on_timeout"] = json!("fail");
            }
        }
        Some(v) => {
            if kind != "event" {
                return Err(format!(
                    "{whose}: field \"on_timeout\" is only for a \"wait_event\" step"
                ));
            }
            match v.as_str() {
                Some(o @ ("fail" | "continue")) => step["on_timeout"] = json!(o),
                _ => {
                    return Err(format!(
                        "{whose}: field \"on_timeout\" must be \"fail\" or \"continue\""
                    ))
                }
            }
        }
    }
    if kind == "sleep" && s.get("timeout").is_some_and(|v| !v.is_null()) {
        return Err(format!(
            "{whose}: field \"timeout\" has no meaning for a sleep step"
        ));
    }
    step["kind"] = json!(kind);
    Ok(())
}
