//! Validation of workflow definitions.
//!
//! `baton.define_workflow` calls `baton._normalize_definition` to check a
//! definition's shape (names, `after` edges, cycles, numbers, unknown keys) and
//! to fill in defaults, so that everything downstream reads one normalized form:
//!
//! ```json
//! {"queue": "default", "timeout": null, "start": [], "steps": [{"name": "a", "after": [],
//!   "queue": "default", "max_attempts": 3, "timeout": null, "kind": "task",
//!   "backoff": {"initial": "1 second", "max": "1 hour", "multiplier": 2.0},
//!   "upstream": [], "downstream": [1]}, ...]}
//! ```
//!
//! `upstream` and `downstream` are the positions (0-based) of the step's direct
//! neighbours in `steps`; a run's steps are keyed by that position. `kind` and
//! its fields are read by `kinds`; a map step also gets `source`, the position
//! of the step it maps over. `start` lists the root steps that are not tasks:
//! a new run starts them at once (`sql/kinds.sql`). Definitions stored before
//! 0.3.0 have no `kind` and no `start`: all their steps are tasks.
//!
//! Interval texts are parsed by PostgreSQL itself in `sql/define.sql`; this
//! module only checks they are strings. Every problem is an ERROR with SQLSTATE
//! 22023 whose message names the step and the field.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, VecDeque};

mod kinds;

const MAX_NAME_LEN: usize = 200;
const MAX_STEPS: usize = 1000;
const MAX_ATTEMPTS: i64 = 1000;
const MAX_MULTIPLIER: f64 = 1000.0;

const WORKFLOW_KEYS: &[&str] = &["steps", "queue", "timeout", "description"];
const STEP_KEYS: &[&str] = &[
    "name",
    "after",
    "queue",
    "max_attempts",
    "backoff",
    "timeout",
    "description",
];
const BACKOFF_KEYS: &[&str] = &["initial", "max", "multiplier"];

/// Takes the definition as text (`jsonb::text`) and parses it here, so that
/// JSON that PostgreSQL accepts but serde cannot represent (nesting deeper than
/// 128, numbers beyond f64) is a clean 22023 rather than a conversion panic.
#[pg_extern(immutable, parallel_safe, name = "_normalize_definition")]
fn normalize_definition(workflow: &str, definition: &str) -> JsonB {
    let parsed = serde_json::from_str::<Value>(definition)
        .map_err(|e| format!("definition cannot be read: {e}"))
        .and_then(|def| normalize(workflow, &def));
    match parsed {
        Ok(v) => JsonB(v),
        Err(msg) => {
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, msg);
        }
    }
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("{what} is longer than {MAX_NAME_LEN} bytes"));
    }
    if name.trim() != name || name.chars().any(char::is_control) {
        return Err(format!(
            "{what} \"{name}\" must not have surrounding spaces or control characters"
        ));
    }
    Ok(())
}

fn unknown_keys(obj: &Map<String, Value>, allowed: &[&str], whose: &str) -> Result<(), String> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "{whose}: unknown field \"{k}\" (allowed: {})",
            allowed.join(", ")
        )),
        None => Ok(()),
    }
}

fn normalize(workflow: &str, def: &Value) -> Result<Value, String> {
    check_name("workflow name", workflow)?;
    let obj = def
        .as_object()
        .ok_or("definition must be a JSON object with a \"steps\" array")?;
    unknown_keys(obj, WORKFLOW_KEYS, "definition")?;
    let default_queue = match obj.get("queue") {
        None | Some(Value::Null) => "default".to_string(),
        Some(Value::String(q)) => {
            check_name("definition: field \"queue\"", q)?;
            q.clone()
        }
        Some(_) => return Err("definition: field \"queue\" must be a string".into()),
    };
    let steps = match obj.get("steps") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err("definition: field \"steps\" must not be empty".into()),
        Some(_) => return Err("definition: field \"steps\" must be an array".into()),
        None => return Err("definition: field \"steps\" is required".into()),
    };
    if steps.len() > MAX_STEPS {
        return Err(format!(
            "definition: field \"steps\" has more than {MAX_STEPS} steps"
        ));
    }

    let mut out = Vec::with_capacity(steps.len());
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        let s = step
            .as_object()
            .ok_or_else(|| format!("step #{}: must be a JSON object", i + 1))?;
        let name = match s.get("name") {
            Some(Value::String(n)) => n.clone(),
            Some(_) => return Err(format!("step #{}: field \"name\" must be a string", i + 1)),
            None => return Err(format!("step #{}: field \"name\" is required", i + 1)),
        };
        check_name(&format!("step #{}: field \"name\"", i + 1), &name)?;
        let whose = format!("step \"{name}\"");
        if index.insert(name.clone(), i).is_some() {
            return Err(format!("{whose}: field \"name\" is a duplicate"));
        }
        if let Some(k) = s
            .keys()
            .find(|k| !STEP_KEYS.contains(&k.as_str()) && !kinds::KIND_KEYS.contains(&k.as_str()))
        {
            return Err(format!(
                "{whose}: unknown field \"{k}\" (allowed: {}, {})",
                STEP_KEYS.join(", "),
                kinds::KIND_KEYS.join(", ")
            ));
        }
        out.push(normalize_step(&whose, &name, s, &default_queue)?);
    }

    // Edges: every `after` name must exist, and the graph must be acyclic.
    let mut indegree = vec![0usize; out.len()];
    let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); out.len()];
    for (i, step) in out.iter().enumerate() {
        for up in step["after"].as_array().into_iter().flatten() {
            let up = up.as_str().unwrap_or_default();
            let j = *index.get(up).ok_or_else(|| {
                format!(
                    "step \"{}\": field \"after\" names unknown step \"{up}\"",
                    step["name"].as_str().unwrap_or_default()
                )
            })?;
            if i == j {
                return Err(format!(
                    "step \"{up}\": field \"after\" names the step itself (cycle)"
                ));
            }
            indegree[i] += 1;
            downstream[j].push(i);
        }
    }
    let mut queue: VecDeque<usize> = (0..out.len()).filter(|&i| indegree[i] == 0).collect();
    let mut seen = 0;
    while let Some(i) = queue.pop_front() {
        seen += 1;
        for &d in &downstream[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                queue.push_back(d);
            }
        }
    }
    if seen < out.len() {
        // What is left is cycles and steps downstream of them. Walk upstream
        // among those until a step repeats: that step is on a cycle.
        let mut upstream_left: Vec<Option<usize>> = vec![None; out.len()];
        for (j, ds) in downstream.iter().enumerate() {
            for &d in ds {
                if indegree[j] > 0 && indegree[d] > 0 {
                    upstream_left[d] = Some(j);
                }
            }
        }
        let mut stuck = (0..out.len()).find(|&i| indegree[i] > 0).unwrap_or(0);
        let mut visited = vec![false; out.len()];
        while !visited[stuck] {
            visited[stuck] = true;
            match upstream_left[stuck] {
                Some(up) => stuck = up,
                None => break,
            }
        }
        return Err(format!(
            "step \"{}\": field \"after\" makes a cycle",
            out[stuck]["name"].as_str().unwrap_or_default()
        ));
    }

    // Edges by position, so that the engine can find a step's neighbours
    // through the primary key (run_id, step_no) instead of by name.
    for (i, step) in out.iter_mut().enumerate() {
        let upstream: Vec<usize> = step["after"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().and_then(|n| index.get(n).copied()))
            .collect();
        step["upstream"] = json!(upstream);
        step["downstream"] = json!(downstream[i]);
        if let Some(source) = step.get("map").and_then(|m| m.as_str()) {
            step["source"] = json!(index.get(source).copied());
        }
    }
    let start: Vec<usize> = out
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            s["kind"] != "task" && s["upstream"].as_array().is_some_and(|u| u.is_empty())
        })
        .map(|(i, _)| i)
        .collect();
    let timeout = match obj.get("timeout") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(t)) => Value::String(t.clone()),
        Some(_) => {
            return Err(
                "definition: field \"timeout\" must be an interval text such as \"1 hour\"".into(),
            )
        }
    };
    Ok(json!({ "queue": default_queue, "timeout": timeout, "start": start, "steps": out }))
}

fn normalize_step(
    whose: &str,
    name: &str,
    s: &Map<String, Value>,
    default_queue: &str,
) -> Result<Value, String> {
    let after: Vec<String> = match s.get("after") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => {
            let mut names = Vec::with_capacity(a.len());
            for v in a {
                let up = v.as_str().ok_or_else(|| {
                    format!("{whose}: field \"after\" must be an array of step names")
                })?;
                if names.iter().any(|n| n == up) {
                    return Err(format!("{whose}: field \"after\" names \"{up}\" twice"));
                }
                names.push(up.to_string());
            }
            names
        }
        Some(_) => {
            return Err(format!(
                "{whose}: field \"after\" must be an array of step names"
            ))
        }
    };
    let queue = match s.get("queue") {
        None | Some(Value::Null) => default_queue.to_string(),
        Some(Value::String(q)) => {
            check_name(&format!("{whose}: field \"queue\""), q)?;
            q.clone()
        }
        Some(_) => return Err(format!("{whose}: field \"queue\" must be a string")),
    };
    let max_attempts = match s.get("max_attempts") {
        None | Some(Value::Null) => 3,
        Some(v) => match v.as_i64() {
            Some(n) if (1..=MAX_ATTEMPTS).contains(&n) => n,
            _ => {
                return Err(format!(
                    "{whose}: field \"max_attempts\" must be an integer from 1 to {MAX_ATTEMPTS}"
                ))
            }
        },
    };
    let timeout = match s.get("timeout") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(t)) => Value::String(t.clone()),
        Some(_) => {
            return Err(format!(
                "{whose}: field \"timeout\" must be an interval text such as \"5 minutes\""
            ))
        }
    };
    let backoff = normalize_backoff(whose, s.get("backoff"))?;
    let mut step = json!({
        "name": name,
        "after": after,
        "queue": queue,
        "max_attempts": max_attempts,
        "backoff": backoff,
        "timeout": timeout,
    });
    if let Some(Value::String(d)) = s.get("description") {
        step["description"] = Value::String(d.clone());
    }
    kinds::normalize_kind(whose, s, &after, &mut step)?;
    Ok(step)
}

fn normalize_backoff(whose: &str, backoff: Option<&Value>) -> Result<Value, String> {
    let mut initial = Value::from("1 second");
    let mut max = Value::from("1 hour");
    let mut multiplier = 2.0;
    match backoff {
        None | Some(Value::Null) => {}
        Some(Value::Object(b)) => {
            unknown_keys(b, BACKOFF_KEYS, &format!("{whose}: field \"backoff\""))?;
            for (field, slot) in [("initial", &mut initial), ("max", &mut max)] {
                match b.get(field) {
                    None | Some(Value::Null) => {}
                    Some(Value::String(t)) => *slot = Value::String(t.clone()),
                    Some(_) => {
                        return Err(format!("{whose}: field \"backoff.{field}\" must be an interval text such as \"1 second\""))
                    }
                }
            }
            match b.get("multiplier") {
                None | Some(Value::Null) => {}
                Some(v) => match v.as_f64() {
                    Some(m) if m.is_finite() && (1.0..=MAX_MULTIPLIER).contains(&m) => multiplier = m,
                    _ => {
                        return Err(format!(
                            "{whose}: field \"backoff.multiplier\" must be a number from 1 to {MAX_MULTIPLIER}"
                        ))
                    }
                },
            }
        }
        Some(_) => {
            return Err(format!(
                "{whose}: field \"backoff\" must be an object with initial, max, multiplier"
            ))
        }
    }
    Ok(json!({ "initial": initial, "max": max, "multiplier": multiplier }))
}
