//! Races, at random: eight real sessions call claim_steps, complete_step,
//! complete_steps, complete_and_claim, fail_step, heartbeat, release_step,
//! cancel_workflow, resume_workflow and retry_from on the same runs (twenty
//! to begin with), each session one
//! call per round, all eight at once, with tokens that may be current or
//! long stale; five more runs join every 25 rounds. After every round:
//!  - every token that was stale when the round began was refused (BT001)
//!    whenever it was used, and a probe with each stale token is refused;
//!  - a running step accepts its current token (it has one live lease);
//!  - no token ended its lease twice (complete, fail, release);
//!  - no step's attempt count went backwards, but by release_step, which
//!    hands back the attempt it did not use (by one per release);
//!  - every call that failed did so with an expected SQLSTATE: never a
//!    deadlock, a serialization failure or an internal error.
//!
//! Then the runs are driven to the end: every one reaches a final state.
//! 150 rounds; `BATON_FAULTS=full` runs 2,000. `BATON_RACE_SEED` replays one.

mod common;

use common::{connect, define, unique};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio_postgres::Client;

/// What the sessions learnt: every lease token ever issued, per step.
#[derive(Default)]
struct Seen {
    tokens: Vec<(i64, uuid::Uuid)>,
    /// calls made with a token, this round: (step, token, what, accepted)
    used: Vec<(i64, uuid::Uuid, &'static str, bool)>,
    /// tokens whose lease a call ended (complete, fail, release)
    ended: HashMap<uuid::Uuid, u32>,
    unexpected: Vec<String>,
}

/// SQLSTATEs a call may legitimately fail with here.
const EXPECTED: &[&str] = &[
    "BT001", // lease lost
    "55000", // an operation on a run in the wrong state
    "22023", // e.g. retry_from of a step that cannot be retried now
];

fn check_error(seen: &Mutex<Seen>, what: &str, e: tokio_postgres::Error) -> Option<String> {
    let code = e.code().map(|c| c.code().to_string());
    match code.as_deref() {
        Some(c) if EXPECTED.contains(&c) => code,
        _ => {
            seen.lock()
                .unwrap()
                .unexpected
                .push(format!("{what}: {e:?}"));
            code
        }
    }
}

async fn one_call(
    db: &Client,
    rng: &mut StdRng,
    seen: &Mutex<Seen>,
    who: &str,
    queue: &str,
    runs: &[uuid::Uuid],
) {
    let pick_token = |rng: &mut StdRng| seen.lock().unwrap().tokens.choose(rng).copied();
    let lease = format!("{} milliseconds", rng.gen_range(50..3000));
    match rng.gen_range(0..100) {
        0..=24 => {
            let max = rng.gen_range(1..5);
            match db
                .query(
                    "SELECT step_id, lease_token FROM baton.claim_steps($1, ARRAY[$2], $3, $4::text::interval)",
                    &[&who, &queue, &max, &lease],
                )
                .await
            {
                Ok(rows) => seen
                    .lock()
                    .unwrap()
                    .tokens
                    .extend(rows.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, uuid::Uuid>(1)))),
                Err(e) => {
                    check_error(seen, "claim_steps", e);
                }
            }
        }
        25..=39 | 40..=49 | 50..=59 | 60..=69 => {
            let Some((step, token)) = pick_token(rng) else {
                return;
            };
            let (what, sql): (&'static str, &str) = match rng.gen_range(0..4) {
                0 => (
                    "complete",
                    "SELECT baton.complete_step($1, $2, '{\"ok\": true}')::text",
                ),
                1 => (
                    "fail",
                    "SELECT baton.fail_step($1, $2, 'raced', true)::text",
                ),
                2 => (
                    "heartbeat",
                    "SELECT baton.heartbeat($1, $2, '500 milliseconds')::text",
                ),
                _ => ("release", "SELECT baton.release_step($1, $2)::text"),
            };
            let accepted = match db.query(sql, &[&step, &token]).await {
                Ok(_) => true,
                Err(e) => {
                    check_error(seen, what, e);
                    false
                }
            };
            let mut s = seen.lock().unwrap();
            s.used.push((step, token, what, accepted));
            if accepted && what != "heartbeat" {
                *s.ended.entry(token).or_default() += 1;
            }
        }
        70..=79 => {
            // report up to three steps (complete_steps says which it took),
            // or report and claim more in one call (complete_and_claim skips
            // lost leases without saying which: its reports are not counted)
            let picked: Vec<(i64, uuid::Uuid)> = (0..rng.gen_range(1..4))
                .filter_map(|_| pick_token(rng))
                .collect::<HashMap<_, _>>()
                .into_iter()
                .collect();
            let ids: Vec<i64> = picked.iter().map(|p| p.0).collect();
            let tokens: Vec<uuid::Uuid> = picked.iter().map(|p| p.1).collect();
            let outputs: Vec<serde_json::Value> = picked.iter().map(|_| json!({"ok": 2})).collect();
            if rng.gen_bool(0.5) {
                match db
                    .query(
                        "SELECT step_id, status FROM baton.complete_steps($1, $2, $3)",
                        &[&ids, &tokens, &outputs],
                    )
                    .await
                {
                    Ok(rows) => {
                        let mut s = seen.lock().unwrap();
                        for r in &rows {
                            let (step, status): (i64, String) = (r.get(0), r.get(1));
                            let token = picked.iter().find(|p| p.0 == step).unwrap().1;
                            let accepted = status != "lease_lost";
                            s.used.push((step, token, "complete_steps", accepted));
                            if accepted {
                                *s.ended.entry(token).or_default() += 1;
                            }
                        }
                    }
                    Err(e) => {
                        check_error(seen, "complete_steps", e);
                    }
                }
            } else {
                match db
                    .query(
                        "SELECT step_id, lease_token FROM baton.complete_and_claim($1, $2, $3, $4, ARRAY[$5], 2, $6::text::interval)",
                        &[&ids, &tokens, &outputs, &who, &queue, &lease],
                    )
                    .await
                {
                    Ok(rows) => seen
                        .lock()
                        .unwrap()
                        .tokens
                        .extend(rows.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, uuid::Uuid>(1)))),
                    Err(e) => {
                        check_error(seen, "complete_and_claim", e);
                    }
                }
            }
        }
        80..=86 => {
            let run = runs.choose(rng).unwrap();
            if let Err(e) = db
                .query("SELECT baton.cancel_workflow($1)::text", &[run])
                .await
            {
                check_error(seen, "cancel_workflow", e);
            }
        }
        87..=93 => {
            let run = runs.choose(rng).unwrap();
            if let Err(e) = db
                .query("SELECT baton.resume_workflow($1)::text", &[run])
                .await
            {
                check_error(seen, "resume_workflow", e);
            }
        }
        _ => {
            let run = runs.choose(rng).unwrap();
            let step = *["a", "b", "c"].choose(rng).unwrap();
            if let Err(e) = db
                .query("SELECT baton.retry_from($1, $2)::text", &[run, &step])
                .await
            {
                check_error(seen, "retry_from", e);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_sessions_keep_every_lease_single() {
    let full = std::env::var("BATON_FAULTS").is_ok_and(|v| v == "full");
    let rounds = if full { 2000 } else { 150 };
    let seed: u64 = std::env::var("BATON_RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("race seed {seed} (BATON_RACE_SEED={seed} replays its choices)");

    let db = connect().await;
    let wf = unique("races");
    define(
        &db,
        &wf,
        &wf,
        json!([
            {"name": "a", "max_attempts": 4, "backoff": {"initial": "10 milliseconds", "max": "50 milliseconds"}},
            {"name": "b", "after": ["a"], "max_attempts": 4, "backoff": {"initial": "10 milliseconds", "max": "50 milliseconds"}},
            {"name": "c", "after": ["b"], "max_attempts": 4, "backoff": {"initial": "10 milliseconds", "max": "50 milliseconds"}}
        ]),
    )
    .await;
    let mut runs: Vec<uuid::Uuid> = db
        .query_one(
            "SELECT baton.enqueue_workflows($1, array_fill('{}'::jsonb, ARRAY[20]))",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(Arc::new(connect().await));
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut attempts_before: HashMap<i64, i32> = HashMap::new();
    let mut calls = 0usize;
    let mut refused_stale = 0usize;
    let mut master = StdRng::seed_from_u64(seed);

    for round in 0..rounds {
        // fresh runs now and then: the others end (completed, cancelled)
        if round > 0 && round % 25 == 0 {
            let more: Vec<uuid::Uuid> = db
                .query_one(
                    "SELECT baton.enqueue_workflows($1, array_fill('{}'::jsonb, ARRAY[5]))",
                    &[&wf],
                )
                .await
                .unwrap()
                .get(0);
            runs.extend(more);
        }
        let round_runs = Arc::new(runs.clone());
        // the tokens stale as the round begins: issued, and no longer current
        let current: HashSet<uuid::Uuid> = db
            .query(
                "SELECT lease_token FROM baton.steps WHERE run_id = ANY($1) AND lease_token IS NOT NULL",
                &[&runs],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let stale: HashSet<uuid::Uuid> = seen
            .lock()
            .unwrap()
            .tokens
            .iter()
            .map(|t| t.1)
            .filter(|t| !current.contains(t))
            .collect();
        seen.lock().unwrap().used.clear();

        let mut tasks = Vec::new();
        for (i, s) in sessions.iter().enumerate() {
            let (s, seen, runs, wf) = (s.clone(), seen.clone(), round_runs.clone(), wf.clone());
            let mut rng = StdRng::seed_from_u64(master.gen());
            tasks.push(tokio::spawn(async move {
                one_call(&s, &mut rng, &seen, &format!("racer-{i}"), &wf, &runs).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        calls += sessions.len();

        let s = seen.lock().unwrap();
        assert!(
            s.unexpected.is_empty(),
            "round {round} (seed {seed}): unexpected errors: {:?}",
            s.unexpected
        );
        for (step, token, what, accepted) in &s.used {
            if stale.contains(token) {
                assert!(
                    !accepted,
                    "round {round} (seed {seed}): {what} of step {step} accepted a stale token"
                );
                refused_stale += 1;
            }
        }
        let mut released: HashMap<i64, i32> = HashMap::new();
        for (step, _, what, accepted) in &s.used {
            if *accepted && *what == "release" {
                *released.entry(*step).or_default() += 1;
            }
        }
        if let Some((token, n)) = s.ended.iter().find(|(_, n)| **n > 1) {
            panic!("round {round} (seed {seed}): the lease of token {token} ended {n} times");
        }
        drop(s);

        // probes: a stale token is refused; a running step takes its own
        for token in stale.iter().take(5) {
            let step = seen
                .lock()
                .unwrap()
                .tokens
                .iter()
                .find(|t| t.1 == *token)
                .unwrap()
                .0;
            let e = db
                .query(
                    "SELECT baton.heartbeat($1, $2, '500 milliseconds')",
                    &[&step, token],
                )
                .await
                .expect_err("a stale token is refused");
            assert_eq!(e.code().map(|c| c.code()), Some("BT001"), "{e:?}");
        }
        let rows = db
            .query(
                "SELECT step_id, lease_token, attempt, status::text FROM baton.steps WHERE run_id = ANY($1)",
                &[&runs],
            )
            .await
            .unwrap();
        for r in &rows {
            let (step, token, attempt, status): (i64, Option<uuid::Uuid>, i32, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            // release_step hands back the attempt it did not use (its one
            // way down, by one per release); nothing else lowers it
            if let Some(before) = attempts_before.insert(step, attempt) {
                let released = released.get(&step).copied().unwrap_or(0);
                assert!(
                    attempt >= before - released,
                    "round {round} (seed {seed}): step {step}'s attempt count went from {before} to {attempt} \
                     with {released} releases"
                );
            }
            if status == "running" {
                let token = token.expect("a running step has a lease token");
                if let Err(e) = db
                    .query(
                        "SELECT baton.heartbeat($1, $2, '500 milliseconds')",
                        &[&step, &token],
                    )
                    .await
                {
                    // another session may have ended it since the read
                    assert_eq!(e.code().map(|c| c.code()), Some("BT001"), "{e:?}");
                }
            }
        }
    }

    // Drive every run to a final state: claim and complete until none is left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let open: i64 = db
            .query_one(
                "SELECT count(*) FROM baton.runs WHERE id = ANY($1) AND finished_at IS NULL",
                &[&runs],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} runs never reached a final state (seed {seed})"
        );
        let claimed = db
            .query(
                "SELECT step_id, lease_token FROM baton.claim_steps('drain', ARRAY[$1], 10)",
                &[&wf],
            )
            .await
            .unwrap();
        for r in &claimed {
            let (step, token): (i64, uuid::Uuid) = (r.get(0), r.get(1));
            db.query("SELECT baton.complete_step($1, $2, '{}')", &[&step, &token])
                .await
                .unwrap();
        }
        if claimed.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let finals = db
        .query(
            "SELECT status::text, count(*) FROM baton.runs WHERE id = ANY($1) GROUP BY 1 ORDER BY 1",
            &[&runs],
        )
        .await
        .unwrap();
    let finals: Vec<(String, i64)> = finals.iter().map(|r| (r.get(0), r.get(1))).collect();
    println!(
        "{rounds} rounds of 8 racing calls ({calls} calls, {} tokens issued, {refused_stale} uses of stale tokens, all refused); runs ended {finals:?}",
        seen.lock().unwrap().tokens.len()
    );
}
