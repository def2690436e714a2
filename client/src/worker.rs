//! `Worker`: claims steps of its queues, runs their handlers, heartbeats the
//! leases, reports back, and shuts down gracefully.
//!
//! One loop owns the worker's turns, of two kinds (see `Turn`), at most one
//! of each in flight: a report completes every step that finished since the
//! last one in a durable commit; a claim leases steps for the free slots in a
//! commit that does not wait for the WAL flush. Slots refill while reports
//! are flushed, so a flush carries as many completions as finished meanwhile.
//! When claims find the queues drained, reports take the free slots and the
//! steps they unblock are handed over in the same call (`complete_and_claim`):
//! a chain moves on in one round trip per step. Each claimed step runs in its
//! own task. The loop wakes on `NOTIFY baton_ready` for its queues (a
//! dedicated LISTEN connection), when a step finishes, and every
//! `poll_interval` as a fallback.
//!
//! A lease is renewed (`Lease`) from the claim until the step's outcome has
//! landed: while the handler runs, and after it, while its completion waits
//! for a report or a report is retried. A report does not give up on a step
//! while its lease may still be held (see `report`).
//!
//! A handler that suspended its step (`StepContext::sleep`, `wait_event`:
//! `baton.suspend_step` gave the lease back) ends with
//! `StepError::suspended()`: nothing is reported for it and its lease is no
//! longer renewed; the step is claimed again when it is ready again.

use crate::client::Client;
use crate::context::{StepContext, StepError};
use crate::error::{Error, Result};
use crate::listen::Listener;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info_span, warn, Instrument};
use uuid::Uuid;

type Handler = Arc<
    dyn Fn(StepContext) -> BoxFuture<'static, Result<serde_json::Value, StepError>> + Send + Sync,
>;

pub struct WorkerBuilder {
    client: Client,
    name: String,
    queues: Vec<String>,
    concurrency: usize,
    lease: Duration,
    poll_interval: Duration,
    shutdown_grace: Duration,
    durable_claims: bool,
    handlers: HashMap<(String, String), Handler>,
}

impl WorkerBuilder {
    /// Queues to claim from (default: `default`).
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }
    /// Most steps run at once (default 8).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
    /// Lease per claim (default 30 s); heartbeats renew it every third of it
    /// until the step's outcome is recorded.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(100));
        self
    }
    /// Fallback polling when no notification comes (default 5 s).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }
    /// How long shutdown waits for running steps before handing them back
    /// (default 30 s); a step that finishes meanwhile is reported at once.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }
    /// Claims wait for the WAL flush like every other commit (default: they
    /// do not; README, "Claims that skip the flush wait"). A claim lost in a
    /// server crash is not counted as an attempt and its step may briefly run
    /// twice: turn this on for handlers that must never overlap a previous
    /// attempt, or that might themselves crash the server.
    pub fn durable_claims(mut self, on: bool) -> Self {
        self.durable_claims = on;
        self
    }
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// Register the handler of step `step` of workflow `workflow`.
    pub fn handler<F, Fut, O>(mut self, workflow: &str, step: &str, f: F) -> Self
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
        O: Serialize + 'static,
    {
        let f = Arc::new(f);
        let handler: Handler = Arc::new(move |ctx| {
            let f = f.clone();
            async move {
                let out = f(ctx).await?;
                serde_json::to_value(out)
                    .map_err(|e| StepError::fatal(format!("output does not serialize: {e}")))
            }
            .boxed()
        });
        self.handlers
            .insert((workflow.to_string(), step.to_string()), handler);
        self
    }
    pub fn build(self) -> Worker {
        Worker {
            inner: Arc::new(self),
        }
    }
}

pub struct Worker {
    inner: Arc<WorkerBuilder>,
}

/// A step this worker holds: what shutdown hands back if its handler is cut off.
/// Keyed by lease token, not step id: after a lost claim the same step can be
/// claimed again while the old attempt still runs, and each holds its own lease.
type Leases = Arc<Mutex<HashMap<Uuid, i64>>>;

impl Worker {
    pub fn builder(client: &Client) -> WorkerBuilder {
        WorkerBuilder {
            client: client.clone(),
            name: format!("{}-{}", hostname(), std::process::id()),
            queues: vec!["default".to_string()],
            concurrency: 8,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            durable_claims: false,
            handlers: HashMap::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Run until SIGINT or SIGTERM.
    pub async fn run(self) -> Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Run until `shutdown` resolves. Then: stop claiming, let running steps
    /// finish for up to `shutdown_grace` (reporting each as it finishes), and
    /// hand back those still running so another worker can claim them at once.
    pub async fn run_until<F: Future<Output = ()>>(self, shutdown: F) -> Result<()> {
        let w = self.inner.clone();
        let wake = Arc::new(Notify::new());
        let listener = w.client.listen_config().map(|config| {
            Listener::start(
                config.clone(),
                w.client.tls(),
                w.name.clone(),
                w.queues.clone(),
                wake.clone(),
            )
        });
        // Claim once the worker's session is registered (or could not be):
        // see `Listener::first_try`. Bounded, in case the connection hangs.
        if let Some(l) = &listener {
            let _ = tokio::time::timeout(Duration::from_secs(10), l.first_try.notified()).await;
        }
        let permits = Arc::new(Semaphore::new(w.concurrency));
        let leases: Leases = Arc::new(Mutex::new(HashMap::new()));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Completion>();
        let mut pending: Vec<Completion> = Vec::new();
        let mut running = JoinSet::new();
        let mut turns: JoinSet<TurnResult> = JoinSet::new();
        // At most one turn of each kind in flight (see `Turn`).
        let (mut reporting, mut claiming) = (false, false);
        let mut want_claim = true;
        // The last claim came back short: nothing is ready beyond what the
        // running steps will unblock. Then reports take the free slots and
        // the steps their completions make ready are handed over at once
        // (a chain moves on in one round trip per step), instead of a claim
        // that would find nothing.
        let mut drained = false;
        tokio::pin!(shutdown);
        debug!(worker = %w.name, queues = ?w.queues, "worker started");

        loop {
            // Let steps that are about to finish report first, so that a turn
            // carries more of them: yield until a yield brings no new
            // completion. Yields, not a timer: no added latency when the
            // running steps are busy.
            if !running.is_empty() {
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                    let before = pending.len();
                    while let Ok(c) = done_rx.try_recv() {
                        pending.push(c);
                    }
                    if pending.len() == before {
                        break;
                    }
                }
            }
            while let Ok(c) = done_rx.try_recv() {
                pending.push(c);
            }
            // Report: everything that finished, in one durable commit.
            if !reporting && !pending.is_empty() {
                let reserved = if drained {
                    reserve(&permits, w.concurrency)
                } else {
                    None
                };
                let asked = reserved.as_ref().map_or(0, |p| p.num_permits());
                let done = next_report(&mut pending);
                let w = w.clone();
                turns.spawn(async move {
                    (
                        Turn::Report,
                        Ok(report(&w, done, asked).await),
                        reserved,
                        asked,
                    )
                });
                reporting = true;
                continue;
            }
            // Claim: the free slots, in a commit that does not wait for the
            // WAL flush, so that a slot freed by a finished step is filled
            // again while the reports' commits are still being flushed.
            if !claiming && want_claim {
                if let Some(reserved) = reserve(&permits, w.concurrency) {
                    let asked = reserved.num_permits();
                    let w = w.clone();
                    turns.spawn(async move {
                        (Turn::Claim, claim(&w, asked).await, Some(reserved), asked)
                    });
                    claiming = true;
                    want_claim = false;
                    continue;
                }
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = wake.notified() => want_claim = true,
                Some(c) = done_rx.recv() => {
                    pending.push(c);
                    // its slot is free: a claim fills it, or a report (drained)
                    want_claim |= !drained;
                }
                Some(_) = running.join_next(), if !running.is_empty() => want_claim |= !drained,
                Some(finished) = turns.join_next(), if !turns.is_empty() => {
                    let (kind, result, mut reserved, asked) = finished.expect("a turn does not panic");
                    match kind {
                        Turn::Report => reporting = false,
                        Turn::Claim => claiming = false,
                    }
                    match result {
                        Ok(claimed) => {
                            if claimed.len() < asked {
                                drained = true;
                            } else if asked > 1 {
                                // A full batch of several: there may be more.
                                // (One step is no sign of a backlog: a claim of
                                // one finds a chain's next step as soon as its
                                // report commits, and back in drained mode the
                                // report would have handed it over anyway.)
                                drained = false;
                                want_claim = true;
                            }
                            for ctx in claimed {
                                let permit = reserved.as_mut().and_then(|p| p.split(1)).expect("a permit per claimed step");
                                leases.lock().expect("leases").insert(ctx.lease_token, ctx.step_id);
                                let (w, leases, done_tx) = (w.clone(), leases.clone(), done_tx.clone());
                                running.spawn(async move {
                                    let token = ctx.lease_token;
                                    let completion = run_step(&w, ctx).await;
                                    leases.lock().expect("leases").remove(&token);
                                    // Free the slot before reporting: a claim can
                                    // fill it while the report's commit is flushed.
                                    drop(permit);
                                    if let Some(completion) = completion {
                                        let _ = done_tx.send(completion);
                                    }
                                });
                            }
                        }
                        Err(e) => warn!(worker = %w.name, error = %e, "claim failed; claiming resumes after the poll interval"),
                    }
                    drop(reserved); // slots not used go back
                }
                _ = tokio::time::sleep(w.poll_interval) => want_claim = true,
            }
        }
        // Graceful shutdown: no more claims. Steps that finish in the grace
        // period are reported as they finish (their leases renewed until
        // then); steps still running when it ends are cut off and handed back.
        // Turns in flight may lease steps (claimed, or handed over by a
        // completion): not to be run now, they are handed back as soon as the
        // turn returns, so that their leases cannot expire meanwhile (an
        // expired lease would use up an attempt). A database that does not
        // answer gets the grace period and one lease more, not forever.
        debug!(worker = %w.name, in_flight = running.len(), "worker stopping");
        let grace_ends = Instant::now() + w.shutdown_grace;
        let mut cut_off = false;
        loop {
            while let Ok(c) = done_rx.try_recv() {
                pending.push(c);
            }
            if !reporting && !pending.is_empty() {
                let done = next_report(&mut pending);
                let w = w.clone();
                turns.spawn(async move { (Turn::Report, Ok(report(&w, done, 0).await), None, 0) });
                reporting = true;
                continue;
            }
            if running.is_empty() && turns.is_empty() {
                break;
            }
            tokio::select! {
                Some(c) = done_rx.recv() => pending.push(c),
                Some(_) = running.join_next(), if !running.is_empty() => {}
                Some(finished) = turns.join_next(), if !turns.is_empty() => {
                    let (kind, result, _reserved, _) = finished.expect("a turn does not panic");
                    if kind == Turn::Report {
                        reporting = false;
                    }
                    match result {
                        Ok(claimed) => release(&w, claimed.into_iter().map(|ctx| (ctx.lease_token, ctx.step_id)).collect()).await,
                        Err(e) => warn!(worker = %w.name, error = %e, "claim failed"),
                    }
                }
                _ = tokio::time::sleep_until(grace_ends), if !cut_off => {
                    // handed back below: their leases are still in `leases`
                    running.abort_all();
                    cut_off = true;
                }
                _ = tokio::time::sleep_until(grace_ends + w.lease), if cut_off => {
                    turns.abort_all();
                    warn!(worker = %w.name, unreported = pending.len(), "turns in flight did not end within the grace period; their steps wait for their leases to expire");
                    break;
                }
            }
        }
        while running.join_next().await.is_some() {}
        let held: Vec<(Uuid, i64)> = leases.lock().expect("leases").drain().collect();
        release(&w, held).await;
        Ok(())
    }
}

/// Hand leased steps back (`release_step`) so that another worker claims them
/// at once, without using up an attempt.
async fn release(w: &WorkerBuilder, held: Vec<(Uuid, i64)>) {
    if held.is_empty() {
        return;
    }
    let conn = match w.client.pool().get().await {
        Ok(conn) => conn,
        Err(e) => {
            warn!(worker = %w.name, error = %Error::from(e), "could not hand back steps; they wait for their leases to expire");
            return;
        }
    };
    for (token, step_id) in held {
        match release_step(&conn, step_id, token, None).await {
            Ok(()) => debug!(step_id, "handed back on shutdown"),
            Err(e) => warn!(step_id, error = %e, "could not hand back step"),
        }
    }
}

/// Hand a leased step back without using up an attempt: claimable again
/// after `delay` (None: at once). `release_step`'s third parameter came with
/// pg_baton 0.2.0.
async fn release_step(
    conn: &deadpool_postgres::Object,
    step_id: i64,
    token: Uuid,
    delay: Option<Duration>,
) -> Result<()> {
    let delay = delay.map(|d| d.as_secs_f64());
    conn.execute(
        "SELECT baton.release_step($1, $2, make_interval(secs => $3::float8))",
        &[&step_id, &token, &delay],
    )
    .await?;
    Ok(())
}

/// How long a step this worker has no handler for is kept from every worker
/// when it is handed back: the worker with the handler takes it then, and
/// this one does not claim it again and again meanwhile.
const NO_HANDLER_DELAY: Duration = Duration::from_secs(5);

/// A step whose handler succeeded, waiting to be reported with the next turn.
/// Its lease is renewed until the completion has landed (or the lease is gone).
struct Completion {
    step_id: i64,
    token: Uuid,
    output: serde_json::Value,
    lease: Lease,
}

/// The renewal of a lease this worker holds: a task that heartbeats every
/// third of the lease until this is dropped, or until the lease is lost or
/// heartbeats failed until it must have expired (`gone`).
struct Lease {
    beat: Option<AbortHandle>,
    ended: watch::Receiver<bool>,
}

impl Lease {
    /// Renew the lease `token` of step `step_id`, which was granted (by a
    /// claim) just before now.
    fn start(w: &Arc<WorkerBuilder>, step_id: i64, token: Uuid) -> Lease {
        let (ended_tx, ended) = watch::channel(false);
        let w = w.clone();
        let beat = tokio::spawn(
            async move {
                keep_alive(&w, step_id, token).await;
                let _ = ended_tx.send(true);
            }
            .instrument(tracing::Span::current()),
        );
        Lease {
            beat: Some(beat.abort_handle()),
            ended,
        }
    }

    /// A lease nobody renews (tests of what does not reach the database).
    #[cfg(test)]
    fn detached() -> Lease {
        Lease {
            beat: None,
            ended: watch::channel(false).1,
        }
    }

    /// The lease is lost, or must have expired: the step is no longer ours.
    fn gone(&self) -> bool {
        *self.ended.borrow()
    }

    /// Wait until `gone`.
    async fn lost(&mut self) {
        let _ = self.ended.wait_for(|gone| *gone).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(beat) = &self.beat {
            beat.abort();
        }
    }
}

/// The worker's two kinds of turn. A report completes the finished steps in a
/// durable commit (and, when the queues are drained, takes over the free slots
/// for the steps it unblocks). A claim leases steps for the free slots in a
/// commit that does not wait for the WAL flush: a claim lost in a crash is a
/// lease that never was; the step is claimable again at once, and this
/// worker's late report of it changes nothing (`complete_and_claim` skips a
/// token it does not know, with a NOTICE). Any later durable commit flushes the
/// claim too (WAL is written in order). `durable_claims(true)` turns it off.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turn {
    Report,
    Claim,
}

/// Most completions one report carries (one transaction, its run locks).
const MAX_REPORT: usize = 500;

/// Most steps one call may lease (`max_steps` of `claim_steps` and
/// `complete_and_claim`): a worker with more slots fills them over several turns.
const MAX_BATCH: usize = 1000;

/// The completions of the next report: up to MAX_REPORT, each step once (a
/// batch must not name a step twice). A step can finish twice here when its
/// claim was lost in a crash and it was claimed again while the old attempt
/// ran: the later completion waits for the next report, whose server-side
/// check refuses whichever token is stale.
fn next_report(pending: &mut Vec<Completion>) -> Vec<Completion> {
    let mut seen = std::collections::HashSet::new();
    let mut report = Vec::new();
    let mut later = Vec::new();
    for c in pending.drain(..) {
        if report.len() < MAX_REPORT && seen.insert(c.step_id) {
            report.push(c);
        } else {
            later.push(c);
        }
    }
    *pending = later;
    report
}

/// What a turn hands back: its kind, the claimed steps, the slots reserved for
/// them, and how many it asked for.
type TurnResult = (
    Turn,
    Result<Vec<StepContext>>,
    Option<OwnedSemaphorePermit>,
    usize,
);

/// Reserve every free slot (at most `max`), or None if none is free.
fn reserve(permits: &Arc<Semaphore>, max: usize) -> Option<OwnedSemaphorePermit> {
    let free = permits.available_permits().min(max).min(MAX_BATCH);
    if free == 0 {
        return None;
    }
    permits.clone().try_acquire_many_owned(free as u32).ok()
}

const REPORT_SQL: &str = "SELECT step_id, lease_token, workflow_id, workflow, step, attempt, input, upstream, checkpoints, map_index, map_item \
     FROM baton.complete_and_claim($1, $2, $3, $4, $5, $6, make_interval(secs => $7))";

const DURABLE_CLAIM_SQL: &str = "SELECT step_id, lease_token, workflow_id, workflow, step, attempt, input, upstream, checkpoints, map_index, map_item \
     FROM baton.claim_steps($1, $2, $3, make_interval(secs => $4))";

/// `set_config(..., true)` lasts to the end of the statement's own transaction:
/// the pooled connection keeps its durable default for everything else.
const CLAIM_SQL: &str = "SELECT c.step_id, c.lease_token, c.workflow_id, c.workflow, c.step, c.attempt, c.input, c.upstream, c.checkpoints, \
     c.map_index, c.map_item \
     FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async, \
          baton.claim_steps($1, $2, $3, make_interval(secs => $4)) AS c";

/// First pause between tries of a call that failed for a transient reason;
/// it doubles up to `RETRY_MAX` (or a third of the lease, if shorter).
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

fn retry_max(w: &WorkerBuilder) -> Duration {
    RETRY_MAX.min(w.lease / 3)
}

/// A report: complete `done` and take up to `max` steps (those the
/// completions unblock first) with `baton.complete_and_claim`, a durable
/// commit. It does not give up on a completion while the step may still be
/// ours; the leases are renewed meanwhile (`Completion::lease`):
/// - a call that failed for a transient reason (`Error::is_transient`: the
///   connection broke, a serialization failure or deadlock, the server
///   shutting down) is tried again, on a connection the pool hands out anew,
///   after a pause that grows;
/// - a call the database refused otherwise, above all for a value it cannot
///   store (SQLSTATE class 22), is tried again without claiming, then split
///   in halves until the step at fault is alone, so that one step's output
///   cannot keep the others from landing; that step is then failed with the
///   database's message (not retried for a data error: its output would be
///   refused again);
/// - a step whose lease is lost, or whose heartbeats failed until it must
///   have expired, is given up with a warning: it runs again.
///
/// Outputs holding a NUL character never get here: `run_step` fails them.
async fn report(w: &WorkerBuilder, done: Vec<Completion>, max: usize) -> Vec<StepContext> {
    let mut claimed = Vec::new();
    let mut batches = vec![(done, max)];
    let mut pause = RETRY_FIRST;
    let mut split = false;
    while let Some((mut batch, max)) = batches.pop() {
        batch.retain(|c| {
            if c.lease.gone() {
                warn!(worker = %w.name, step_id = c.step_id, "lease lost or expired before the completion was recorded; the step will run again");
            }
            !c.lease.gone()
        });
        if batch.is_empty() {
            continue;
        }
        match report_once(w, &batch, max).await {
            Ok(steps) => {
                claimed.extend(steps);
                pause = RETRY_FIRST;
            }
            Err(e) if e.is_transient() => {
                warn!(worker = %w.name, error = %e, steps = batch.len(), "report failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(retry_max(w));
                batches.push((batch, max));
            }
            Err(e) if max > 0 => {
                // perhaps the claim's part of the call: complete only, first
                warn!(worker = %w.name, error = %e, steps = batch.len(), "report refused; trying again without claiming");
                batches.push((batch, 0));
            }
            Err(e) if batch.len() > 1 => {
                if !split {
                    warn!(worker = %w.name, error = %e, steps = batch.len(), "report refused; reporting its steps in smaller batches to find the one at fault");
                    split = true;
                }
                let second = batch.split_off(batch.len() / 2);
                batches.push((second, 0));
                batches.push((batch, 0));
            }
            Err(e) => {
                let c = batch.pop().expect("one completion");
                let message =
                    format!("the step succeeded but its output could not be recorded: {e}");
                let failure = if e.is_data_error() {
                    StepError::fatal(message)
                } else {
                    StepError::retryable(message)
                };
                warn!(worker = %w.name, step_id = c.step_id, error = %e, retryable = failure.retryable, "completion refused; failing the step");
                record_failure(w, &c.lease, c.step_id, c.token, &failure).await;
            }
        }
    }
    claimed
}

/// One try of a report: `baton.complete_and_claim` for `done`, leasing up to `max`.
async fn report_once(
    w: &WorkerBuilder,
    done: &[Completion],
    max: usize,
) -> Result<Vec<StepContext>> {
    let span = info_span!(
        "baton.report",
        worker = %w.name, completed = done.len(), max, claimed = tracing::field::Empty
    );
    async {
        let ids: Vec<i64> = done.iter().map(|c| c.step_id).collect();
        let tokens: Vec<Uuid> = done.iter().map(|c| c.token).collect();
        let outputs: Vec<&serde_json::Value> = done.iter().map(|c| &c.output).collect();
        let conn = w.client.pool().get().await?;
        let lease = w.lease.as_secs_f64();
        // prepared once per connection: a turn is one round trip
        let stmt = conn.prepare_cached(REPORT_SQL).await?;
        let rows = conn
            .query(
                &stmt,
                &[
                    &ids,
                    &tokens,
                    &outputs,
                    &w.name,
                    &w.queues,
                    &(max as i32),
                    &lease,
                ],
            )
            .await?;
        Ok(contexts(w, rows))
    }
    .instrument(span)
    .await
}

/// Run `op` until it succeeds, fails for a reason that is not transient, or
/// `lease` is gone; pauses between tries as `report` does.
async fn while_held<T, F, Fut>(w: &WorkerBuilder, lease: &Lease, what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut pause = RETRY_FIRST;
    loop {
        match op().await {
            Err(e) if e.is_transient() && !lease.gone() => {
                warn!(error = %e, "{what} failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(retry_max(w));
            }
            result => return result,
        }
    }
}

/// A claim: lease up to `max` steps with `baton.claim_steps`, in a transaction
/// of its own that commits without waiting for the WAL flush (see `Turn`).
async fn claim(w: &WorkerBuilder, max: usize) -> Result<Vec<StepContext>> {
    let span = info_span!("baton.claim", worker = %w.name, max, claimed = tracing::field::Empty);
    async {
        let conn = w.client.pool().get().await?;
        let lease = w.lease.as_secs_f64();
        let sql = if w.durable_claims {
            DURABLE_CLAIM_SQL
        } else {
            CLAIM_SQL
        };
        let stmt = conn.prepare_cached(sql).await?;
        let rows = conn
            .query(&stmt, &[&w.name, &w.queues, &(max as i32), &lease])
            .await?;
        Ok(contexts(w, rows))
    }
    .instrument(span)
    .await
}

fn contexts(w: &WorkerBuilder, rows: Vec<tokio_postgres::Row>) -> Vec<StepContext> {
    tracing::Span::current().record("claimed", rows.len());
    rows.into_iter()
        .map(|r| {
            StepContext::new(
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
                r.get(9),
                r.get(10),
                w.client.clone(),
            )
        })
        .collect()
}

enum Outcome {
    Done(Result<serde_json::Value, StepError>),
    LeaseLost,
}

/// One attempt: the handler races the lease's renewal, which only ends if the
/// lease is lost (then the handler is dropped: its work is no longer ours).
/// A success comes back to be reported with the worker's next turn, its lease
/// still renewed; a failure is recorded here, and so is a step that has no
/// handler here (handed back, see `NO_HANDLER_DELAY`).
async fn run_step(w: &Arc<WorkerBuilder>, ctx: StepContext) -> Option<Completion> {
    let span = info_span!(
        "baton.step",
        workflow = %ctx.workflow, step = %ctx.step, run_id = %ctx.run_id, attempt = ctx.attempt, step_id = ctx.step_id
    );
    async {
        let (step_id, token) = (ctx.step_id, ctx.lease_token);
        let completed = ctx.completed_flag();
        let suspended = ctx.suspended_flag();
        let mut lease = Lease::start(w, step_id, token);
        let Some(handler) = w.handlers.get(&(ctx.workflow.clone(), ctx.step.clone())).cloned() else {
            // Not a failure of the step: a worker with the handler (another
            // deployment, another version) takes it, and no attempt is used.
            warn!(worker = %w.name, delay = ?NO_HANDLER_DELAY, "no handler for {}.{} here; handing the step back", ctx.workflow, ctx.step);
            let released = while_held(w, &lease, "handing back the step", || async {
                let conn = w.client.pool().get().await?;
                release_step(&conn, step_id, token, Some(NO_HANDLER_DELAY)).await
            })
            .await;
            match released {
                Ok(()) => {}
                Err(e) if e.is_lease_lost() => {}
                Err(e) => warn!(error = %e, "could not hand back the step; it runs again when its lease expires"),
            }
            return None;
        };
        let work = AssertUnwindSafe(handler(ctx)).catch_unwind();
        let outcome = tokio::select! {
            result = work => Outcome::Done(result.unwrap_or_else(|panic| {
                Err(StepError::retryable(format!("handler panicked: {}", panic_message(&panic))))
            })),
            _ = lease.lost() => Outcome::LeaseLost,
        };
        match outcome {
            // The handler gave the lease back (`suspend_step`): nothing to
            // record, and the lease (dropped here) is no longer renewed.
            _ if suspended.load(Ordering::SeqCst) => {
                debug!("step suspended");
                None
            }
            Outcome::Done(Err(e)) if e.suspended => {
                debug!("step suspended by its handler");
                None
            }
            Outcome::LeaseLost => {
                warn!("lease lost while the step ran; its result is discarded");
                None
            }
            Outcome::Done(Ok(_)) if completed.load(Ordering::SeqCst) => None,
            Outcome::Done(Ok(output)) => match nul_at(&output) {
                None => Some(Completion { step_id, token, output, lease }),
                Some(path) => {
                    // jsonb refuses it (22P05): failing the step here, and
                    // only it, keeps it out of a report with others
                    let e = StepError::fatal(format!(
                        "the output holds a NUL character (\\u0000) at {path}, which jsonb cannot store"
                    ));
                    warn!(error = %e.message, "step failed");
                    record_failure(w, &lease, step_id, token, &e).await;
                    None
                }
            },
            Outcome::Done(Err(e)) => {
                debug!(error = %e.message, retryable = e.retryable, "step failed");
                record_failure(w, &lease, step_id, token, &e).await;
                None
            }
        }
    }
    .instrument(span)
    .await
}

/// Record a failure (`fail_step`), trying again while the lease is held.
async fn record_failure(
    w: &WorkerBuilder,
    lease: &Lease,
    step_id: i64,
    token: Uuid,
    e: &StepError,
) {
    match while_held(w, lease, "recording the failure", || {
        fail(w, step_id, token, e)
    })
    .await
    {
        Ok(()) => {}
        Err(e) if e.is_lease_lost() => warn!(step_id, "lease lost before the failure was recorded"),
        Err(e) => {
            warn!(step_id, error = %e, "could not record the failure; the lease will expire and the step run again")
        }
    }
}

/// Where `value` holds a NUL character (U+0000) in a string or an object
/// key, as a path (`$.a[2]`), or None. serde_json writes it as `\u0000`, and
/// PostgreSQL refuses that in jsonb (SQLSTATE 22P05) before any function
/// runs, failing the whole statement.
fn nul_at(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    fn holds(v: &Value) -> bool {
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            match v {
                Value::String(s) if s.contains('\0') => return true,
                Value::Array(items) => stack.extend(items),
                Value::Object(map) => {
                    for (k, v) in map {
                        if k.contains('\0') {
                            return true;
                        }
                        stack.push(v);
                    }
                }
                _ => {}
            }
        }
        false
    }
    if !holds(value) {
        return None; // the common case: no path built
    }
    let mut path = String::from("$");
    let mut v = value;
    loop {
        match v {
            Value::Array(items) => {
                let (i, item) = items.iter().enumerate().find(|(_, item)| holds(item))?;
                path.push_str(&format!("[{i}]"));
                v = item;
            }
            Value::Object(map) => {
                let (k, item) = map
                    .iter()
                    .find(|(k, item)| k.contains('\0') || holds(item))?;
                if !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    path.push_str(&format!(".{k}"));
                } else {
                    path.push_str(&format!("[{k:?}]"));
                }
                if k.contains('\0') {
                    path.push_str(" (the key)");
                    return Some(path);
                }
                v = item;
            }
            _ => return Some(path),
        }
    }
}

async fn fail(w: &WorkerBuilder, step_id: i64, token: Uuid, e: &StepError) -> Result<()> {
    let conn = w.client.pool().get().await?;
    let stmt = conn
        .prepare_cached("SELECT baton.fail_step($1, $2, $3, $4)")
        .await?;
    conn.query_one(&stmt, &[&step_id, &token, &e.message, &e.retryable])
        .await?;
    Ok(())
}

/// Renew the lease every third of it. Returns only when the lease is lost, or
/// when heartbeats kept failing until it must have expired.
async fn keep_alive(w: &WorkerBuilder, step_id: i64, token: Uuid) {
    let every = w.lease / 3;
    let lease = w.lease.as_secs_f64();
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let beat = async {
            let conn = w.client.pool().get().await?;
            let stmt = conn
                .prepare_cached("SELECT baton.heartbeat($1, $2, make_interval(secs => $3))")
                .await?;
            conn.query_one(&stmt, &[&step_id, &token, &lease]).await?;
            Ok::<_, Error>(())
        };
        match beat.await {
            Ok(()) => last_ok = tokio::time::Instant::now(),
            Err(e) if e.is_lease_lost() => return,
            Err(e) => {
                warn!(error = %e, "heartbeat failed");
                if last_ok.elapsed() >= w.lease {
                    return;
                }
            }
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".to_string())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    //! Against the test cluster that `scripts/test` starts (BATON_TEST_URL).
    use super::*;

    fn done(step_id: i64) -> Completion {
        Completion {
            step_id,
            token: Uuid::new_v4(),
            output: serde_json::Value::Null,
            lease: Lease::detached(),
        }
    }

    /// A report never names a step twice (the server would refuse the whole
    /// batch): a second completion of the same step waits for the next one.
    #[test]
    fn a_report_names_each_step_once() {
        let mut pending = vec![done(1), done(2), done(1), done(3), done(1)];
        let first = next_report(&mut pending);
        assert_eq!(
            first.iter().map(|c| c.step_id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(
            pending.iter().map(|c| c.step_id).collect::<Vec<_>>(),
            [1, 1]
        );
        let second = next_report(&mut pending);
        assert_eq!(second.iter().map(|c| c.step_id).collect::<Vec<_>>(), [1]);
        assert_eq!(next_report(&mut pending).len(), 1);
        assert!(pending.is_empty());

        let mut many: Vec<Completion> = (0..(MAX_REPORT as i64 + 7)).map(done).collect();
        assert_eq!(next_report(&mut many).len(), MAX_REPORT);
        assert_eq!(many.len(), 7);
    }

    /// A NUL character in a string or a key is found, with where it is.
    #[test]
    fn nul_characters_are_found_in_strings_and_keys() {
        use serde_json::json;
        assert_eq!(nul_at(&json!({"a": [1, "x", {"b": null}], "c": 2.5})), None);
        assert_eq!(
            nul_at(&json!({"text": "a\u{0}b"})).as_deref(),
            Some("$.text")
        );
        assert_eq!(
            nul_at(&json!({"ok": "fine", "a": [1, {"b c": ["\u{0}"]}]})).as_deref(),
            Some("$.a[1][\"b c\"][0]")
        );
        assert_eq!(
            nul_at(&json!({"k\u{0}": 1})).as_deref(),
            Some("$[\"k\\0\"] (the key)")
        );
        assert_eq!(nul_at(&json!("\u{0}")).as_deref(), Some("$"));
    }

    fn test_url() -> String {
        std::env::var("BATON_TEST_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55441/baton_test".to_string())
    }

    /// The net under the NUL check: a report that the database refuses for
    /// one step's data (22P05, before any function runs) is split until that
    /// step is alone; the others complete, and only it fails, saying why.
    #[tokio::test]
    async fn a_data_error_in_a_report_fails_only_the_offending_step() {
        let client = Client::connect(&test_url()).await.expect("connect");
        let db = client.pool().get().await.unwrap();
        let queue = format!("net-{}", Uuid::new_v4());
        let def = serde_json::json!({"queue": queue, "steps": [{"name": "s", "max_attempts": 1}]});
        db.execute("SELECT baton.define_workflow($1, $2)", &[&queue, &def])
            .await
            .unwrap();
        for _ in 0..5 {
            db.execute("SELECT baton.enqueue_workflow($1)", &[&queue])
                .await
                .unwrap();
        }
        let claimed = db
            .query(
                "SELECT step_id, lease_token FROM baton.claim_steps('net', ARRAY[$1], 5)",
                &[&queue],
            )
            .await
            .unwrap();
        assert_eq!(claimed.len(), 5);
        let w = Worker::builder(&client)
            .queues([queue.clone()])
            .build()
            .inner;
        let done = claimed
            .iter()
            .enumerate()
            .map(|(i, r)| Completion {
                step_id: r.get(0),
                token: r.get(1),
                output: if i == 3 {
                    serde_json::json!({ "text": "a\u{0}b" })
                } else {
                    serde_json::json!({ "i": i })
                },
                lease: Lease::start(&w, r.get(0), r.get(1)),
            })
            .collect();
        let _ = report(&w, done, 0).await;
        for (i, r) in claimed.iter().enumerate() {
            let row = db
                .query_one(
                    "SELECT status::text, error FROM baton.steps WHERE step_id = $1",
                    &[&r.get::<_, i64>(0)],
                )
                .await
                .unwrap();
            let (status, error): (String, Option<String>) = (row.get(0), row.get(1));
            if i == 3 {
                assert_eq!(status, "failed", "the offending step fails");
                let error = error.unwrap_or_default();
                assert!(error.contains("22P05"), "with the reason: {error}");
            } else {
                assert_eq!(status, "succeeded", "step {i} completes");
            }
        }
    }

    /// The claim turns off the flush wait for its own transaction, and only
    /// for it: what follows on the same connection commits durably again.
    #[tokio::test]
    async fn a_claim_commits_without_the_flush_wait_and_only_itself() {
        let url = std::env::var("BATON_TEST_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55441/baton_test".to_string());
        let (mut db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster (run scripts/test)");
        tokio::spawn(conn);
        let queue = format!("async-claim-{}", Uuid::new_v4());
        let def = serde_json::json!({"queue": queue, "steps": [{"name": "s"}]});
        db.execute("SELECT baton.define_workflow($1, $2)", &[&queue, &def])
            .await
            .unwrap();
        db.execute("SELECT baton.enqueue_workflow($1)", &[&queue])
            .await
            .unwrap();
        let setting = "SELECT current_setting('synchronous_commit')";

        let tx = db.transaction().await.unwrap();
        let claimed = tx
            .query(CLAIM_SQL, &[&"t", &vec![queue.clone()], &1i32, &30f64])
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "the step is claimed");
        let inside: String = tx.query_one(setting, &[]).await.unwrap().get(0);
        assert_eq!(
            inside, "off",
            "the claim's transaction commits asynchronously"
        );
        tx.commit().await.unwrap();

        let after: String = db.query_one(setting, &[]).await.unwrap().get(0);
        assert_eq!(after, "on", "the connection is durable again");
        // The lease holds: the report completes the step under its token.
        let (id, token): (i64, Uuid) = (claimed[0].get(0), claimed[0].get(1));
        let status: String = db
            .query_one("SELECT baton.complete_step($1, $2)", &[&id, &token])
            .await
            .unwrap()
            .get(0);
        assert_eq!(status, "succeeded");
    }
}
