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
    pub steps: Vec<Step>,
}

impl WorkflowDef {
    pub fn new(name: impl Into<String>) -> Self {
        WorkflowDef {
            name: name.into(),
            queue: None,
            steps: Vec::new(),
        }
    }
    /// Default queue of the steps (else `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
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
}

impl Step {
    pub fn new(name: impl Into<String>) -> Self {
        Step {
            name: name.into(),
            after: Vec::new(),
            queue: None,
            max_attempts: None,
            backoff: None,
            timeout: None,
        }
    }
    pub fn after<I, S>(mut self, upstream: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.after.extend(upstream.into_iter().map(Into::into));
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
    /// The longest one attempt may run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
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
}
