//! A typed builder for workflow definitions; it serializes to the JSON that
//! `baton.define_workflow` takes (the database validates it).

use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Clone, Serialize)]
pub struct WorkflowDef {
    #[serde(skip)]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The run's deadline, from its start (`run_at` or now): past it the run
    /// fails.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "interval_opt"
    )]
    pub timeout: Option<Duration>,
    pub steps: Vec<Step>,
}

impl WorkflowDef {
    pub fn new(name: impl Into<String>) -> Self {
        WorkflowDef {
            name: name.into(),
            queue: None,
            timeout: None,
            steps: Vec::new(),
        }
    }
    /// Default queue of the steps (else `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    /// Every run must finish within `timeout` of its start (run_at or now),
    /// else it fails (`deadline ... passed`) and its unfinished steps are
    /// cancelled.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }
    /// The definition JSON, as `define_workflow` receives it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a definition always serializes")
    }
}

/// One step of a definition. `Step::new` is a task step, run by a worker's
/// handler; `sleep`, `sleep_until`, `wait_event`, `workflow` and `map` are
/// steps the database runs itself (a map's items are task steps again).
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "interval_opt"
    )]
    pub timeout: Option<Duration>,
    /// A sleep step: succeeds (output null) this long after it became runnable.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "interval_opt"
    )]
    pub sleep: Option<Duration>,
    /// A sleep step until the timestamp at this jsonpath of
    /// `{"input": ..., "upstream": {...}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sleep_until: Option<String>,
    /// An event step: succeeds with the payload of the event of this name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_event: Option<String>,
    /// What an event step's timeout does: `"fail"` (the default) or `"continue"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<String>,
    /// A child-workflow step: starts one run of this workflow and succeeds
    /// with its output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// A map step: one item per element of this upstream step's output array.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map: Option<String>,
}

impl Step {
    /// A task step: a worker's handler runs it.
    pub fn new(name: impl Into<String>) -> Self {
        Step {
            name: name.into(),
            after: Vec::new(),
            queue: None,
            max_attempts: None,
            backoff: None,
            timeout: None,
            sleep: None,
            sleep_until: None,
            wait_event: None,
            on_timeout: None,
            workflow: None,
            map: None,
        }
    }
    /// A step that waits `duration` from when it becomes runnable, then
    /// succeeds with output null. No worker is involved.
    pub fn sleep(name: impl Into<String>, duration: Duration) -> Self {
        Step {
            sleep: Some(duration),
            ..Step::new(name)
        }
    }
    /// A step that waits until the timestamp found at jsonpath `path` of
    /// `{"input": <run input>, "upstream": {<step>: <output>}}` (e.g.
    /// `$.input.send_at`); a time in the past succeeds at once.
    pub fn sleep_until(name: impl Into<String>, path: impl Into<String>) -> Self {
        Step {
            sleep_until: Some(path.into()),
            ..Step::new(name)
        }
    }
    /// A step that waits for the event `event` of its run
    /// (`Client::send_event`) and succeeds with its payload. With `timeout`,
    /// it fails (and follows its retries) when none arrives in time, or
    /// succeeds with output null after `on_timeout_continue`.
    pub fn wait_event(name: impl Into<String>, event: impl Into<String>) -> Self {
        Step {
            wait_event: Some(event.into()),
            ..Step::new(name)
        }
    }
    /// A step that starts one run of the latest version of `workflow` (input:
    /// `{"input": ..., "upstream": {...}}`) and succeeds with its output.
    /// `timeout` is then the child run's deadline.
    pub fn workflow(name: impl Into<String>, workflow: impl Into<String>) -> Self {
        Step {
            workflow: Some(workflow.into()),
            ..Step::new(name)
        }
    }
    /// A step that runs once per element of upstream step `source`'s output
    /// (a JSON array), each item a task step of this name (see
    /// `StepContext::map_item`); it succeeds with the array of the items'
    /// outputs, in order. `source` is added to `after`.
    pub fn map(name: impl Into<String>, source: impl Into<String>) -> Self {
        let source = source.into();
        Step {
            after: vec![source.clone()],
            map: Some(source),
            ..Step::new(name)
        }
    }
    /// Upstream steps (each named once, however often given).
    pub fn after<I, S>(mut self, upstream: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        for step in upstream {
            let step = step.into();
            if !self.after.contains(&step) {
                self.after.push(step);
            }
        }
        self
    }
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
    /// The longest one attempt may run; for an event step, how long it waits
    /// for its event; for a child-workflow step, the child run's deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// An event step that times out succeeds with output null instead of failing.
    pub fn on_timeout_continue(mut self) -> Self {
        self.on_timeout = Some("continue".to_string());
        self
    }
}

/// Wait before retry n: `initial * multiplier^(n-1)`, capped at `max`, plus up to 10% jitter.
#[derive(Debug, Clone, Serialize)]
pub struct Backoff {
    #[serde(serialize_with = "interval")]
    pub initial: Duration,
    #[serde(serialize_with = "interval")]
    pub max: Duration,
    pub multiplier: f64,
}

fn interval<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{} microseconds", d.as_micros()))
}

fn interval_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => interval(d, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_to_the_definition_json() {
        let def = WorkflowDef::new("order")
            .queue("orders")
            .step(Step::new("a"))
            .step(
                Step::new("b")
                    .after(["a"])
                    .max_attempts(5)
                    .timeout(Duration::from_secs(2))
                    .backoff(Backoff {
                        initial: Duration::from_millis(100),
                        max: Duration::from_secs(60),
                        multiplier: 2.0,
                    }),
            );
        assert_eq!(
            def.to_json(),
            serde_json::json!({"queue": "orders", "steps": [
                {"name": "a"},
                {"name": "b", "after": ["a"], "max_attempts": 5, "timeout": "2000000 microseconds",
                 "backoff": {"initial": "100000 microseconds", "max": "60000000 microseconds", "multiplier": 2.0}}
            ]})
        );
    }

    #[test]
    fn serializes_the_steps_the_database_runs() {
        let def = WorkflowDef::new("time")
            .timeout(Duration::from_secs(3600))
            .step(Step::new("split"))
            .step(Step::sleep("nap", Duration::from_millis(1500)).after(["split"]))
            .step(Step::sleep_until("later", "$.input.send_at"))
            .step(
                Step::wait_event("approval", "approved")
                    .timeout(Duration::from_secs(2 * 86400))
                    .on_timeout_continue(),
            )
            .step(Step::wait_event("strict", "ok"))
            .step(Step::workflow("pay", "payment").timeout(Duration::from_secs(60)))
            .step(Step::map("each", "split").max_attempts(3).queue("items"))
            .step(Step::map("again", "split").after(["nap", "split"]));
        assert_eq!(
            def.to_json(),
            serde_json::json!({"timeout": "3600000000 microseconds", "steps": [
                {"name": "split"},
                {"name": "nap", "after": ["split"], "sleep": "1500000 microseconds"},
                {"name": "later", "sleep_until": "$.input.send_at"},
                {"name": "approval", "wait_event": "approved", "timeout": "172800000000 microseconds",
                 "on_timeout": "continue"},
                {"name": "strict", "wait_event": "ok"},
                {"name": "pay", "workflow": "payment", "timeout": "60000000 microseconds"},
                {"name": "each", "map": "split", "after": ["split"], "max_attempts": 3, "queue": "items"},
                {"name": "again", "map": "split", "after": ["split", "nap"]}
            ]})
        );
    }
}
