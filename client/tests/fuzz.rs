//! Hostile and malformed input: every public SQL function of pg_baton
//! (schema `baton`, names without a leading `_`), found in the catalog so
//! that a new one is fuzzed without being listed here, called with random
//! arguments: NULLs in every position, deep and huge JSON, definitions
//! mutated from a valid one, wrong-looking and out-of-range numbers,
//! `infinity` and invalid timestamps and intervals, invalid cron strings and
//! time zones, empty, multidimensional and mismatched arrays, names with
//! quotes, unicode and SQL-injection shapes, and the ids and lease tokens of
//! real runs and steps, so that calls get past validation too.
//!
//! After every case: the server still answers on the same connection (no
//! backend crashed), a failure is an ERROR with a SQLSTATE and a message,
//! never an internal error (class XX, what a panic becomes) nor a statement
//! that ran into the timeout, and the tables' invariants hold (nothing partly
//! written). At the end the server has not restarted.
//!
//! In a database of its own (`baton_fuzz_…`, dropped at the end) on the test
//! cluster, since a random `purge` may delete any finished run. 2,000 cases;
//! `BATON_FAULTS=full` runs 10,000. `BATON_FUZZ_SEED` replays a run (the
//! seed is printed).

mod common;

use common::{unique, url};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use tokio_postgres::{Client, NoTls};

struct Func {
    name: String,
    types: Vec<String>,
    defaults: usize,
}

/// What the database already holds, for arguments that get past validation.
#[derive(Default)]
struct Known {
    runs: Vec<String>,
    steps: Vec<(String, String)>, // (step_id, lease_token)
}

const NAMES: &[&str] = &["fz", "fz_q", "a", "b", "wait", "e", "default", "fz-worker"];

const HOSTILE: &[&str] = &[
    "",
    " ",
    "O'Brien",
    "\"quoted\"",
    "a\"b'c\\d",
    "x'); DROP TABLE baton.runs; --",
    "\"; SELECT pg_sleep(10); --",
    "$$; DROP SCHEMA baton CASCADE; $$",
    "fz' OR '1'='1",
    "%s%n%x",
    "\\x00",
    "Robert'); DELETE FROM baton.steps;--",
    "名前",
    "שלום",
    "e\u{301}\u{301}\u{301}",
    "🦀🔥",
    "\u{FEFF}bom",
    "\u{202E}reversed",
    "tab\tnew\nline",
    "NULL",
    "null",
    "{}",
    "[1,2",
];

const CRONS: &[&str] = &[
    "* * * * *",
    "0 9 * * 1-5",
    "*/15 * * * *",
    "61 * * * *",
    "*/0 * * * *",
    "* * * *",
    "* * * * * * *",
    "@daily",
    "@yearly",
    "@reboot",
    "0 0 31 2 *",
    "5-1 * * * *",
    "a b c d e",
    "0 0 * * 8",
];

const ZONES: &[&str] = &[
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "Asia/Kathmandu",
    "Mars/Olympus",
    "+25:00",
    "EST5EDT",
    "",
];

const TIMESTAMPS: &[&str] = &[
    "infinity",
    "-infinity",
    "epoch",
    "now",
    "today",
    "allballs",
    "294276-12-31 23:59:59+00",
    "4714-11-24 00:00:00+00 BC",
    "2026-13-45 00:00:00",
    "2026-02-29 12:00:00",
    "1999-12-31 23:59:60",
    "not a time",
];

const INTERVALS: &[&str] = &[
    "0",
    "1 second",
    "-1 second",
    "30 seconds",
    "1 millisecond",
    "1 microsecond",
    "1 mon",
    "P1Y2M3DT4H5M6S",
    "178000000 years",
    "-178000000 years",
    "10 years 1 second",
    "infinity",
    "-infinity",
    "1e300 seconds",
    "@ 1 day ago",
    "banana",
];

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from.choose(rng).copied().unwrap()
}

fn random_text(rng: &mut StdRng) -> String {
    match rng.gen_range(0..10) {
        0..=2 => pick(rng, NAMES).to_string(),
        3..=5 => pick(rng, HOSTILE).to_string(),
        6 => pick(rng, CRONS).to_string(),
        7 => {
            // random unicode, never NUL (a Rust string cannot hold a lone
            // surrogate; PostgreSQL text cannot hold NUL)
            let n = rng.gen_range(1..40);
            (0..n)
                .map(|_| loop {
                    if let Some(c) = char::from_u32(rng.gen_range(1..0x10FFFF)) {
                        break c;
                    }
                })
                .collect()
        }
        8 => "w".repeat(*[199, 200, 201, 1000, 100_000].choose(rng).unwrap()),
        _ => (0..rng.gen_range(0..12))
            .map(|_| rng.gen_range(b' '..=b'~') as char)
            .collect(),
    }
}

fn random_json(rng: &mut StdRng, depth: u32) -> Value {
    let leaf = depth == 0 || rng.gen_bool(0.3);
    if leaf {
        return match rng.gen_range(0..9) {
            0 => Value::Null,
            1 => json!(rng.gen_bool(0.5)),
            2 => json!(rng.gen::<i64>()),
            3 => json!(*[0.0, -0.0, 1e308, -1e308, 5e-324].choose(rng).unwrap()),
            4 => json!(random_text(rng)),
            5 => json!(pick(rng, INTERVALS)),
            6 => json!(pick(rng, TIMESTAMPS)),
            7 => json!(pick(rng, NAMES)),
            _ => json!(rng.gen_range(-3..100)),
        };
    }
    if rng.gen_bool(0.5) {
        Value::Array(
            (0..rng.gen_range(0..5))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        )
    } else {
        let keys = [
            "name",
            "after",
            "queue",
            "steps",
            "max_attempts",
            "backoff",
            "timeout",
            "kind",
            "sleep",
            "event",
            "map",
            "workflow",
            "input",
            "initial",
            "max",
            "multiplier",
            "priority",
            "items",
            "key",
            "x",
        ];
        Value::Object(
            (0..rng.gen_range(0..6))
                .map(|_| {
                    let k = if rng.gen_bool(0.8) {
                        keys.choose(rng).unwrap().to_string()
                    } else {
                        random_text(rng)
                    };
                    (k, random_json(rng, depth - 1))
                })
                .collect(),
        )
    }
}

/// A workflow definition that is valid, then changed at random places.
fn mutated_definition(rng: &mut StdRng) -> Value {
    let mut def = json!({
        "queue": "fz_q",
        "steps": [
            {"name": "a", "max_attempts": 3, "backoff": {"initial": "1 second", "max": "1 minute", "multiplier": 2}},
            {"name": "b", "after": ["a"], "timeout": "30 seconds"},
            {"name": "wait", "after": ["a"], "sleep": "1 second"},
            {"name": "e", "after": ["b"], "wait_event": "go", "timeout": "1 hour", "on_timeout": "fail"},
            {"name": "m", "after": ["a"], "map": "a"}
        ]
    });
    for _ in 0..rng.gen_range(0..4) {
        let i = rng.gen_range(0..5);
        let step = &mut def["steps"][i];
        let field = *[
            "name",
            "after",
            "max_attempts",
            "backoff",
            "timeout",
            "kind",
            "sleep",
            "event",
            "items",
            "priority",
        ]
        .choose(rng)
        .unwrap();
        step[field] = random_json(rng, 2);
    }
    if rng.gen_bool(0.1) {
        def["steps"] = random_json(rng, 3);
    }
    if rng.gen_bool(0.1) {
        def["queue"] = random_json(rng, 1);
    }
    def
}

fn huge_json(rng: &mut StdRng) -> String {
    match rng.gen_range(0..4) {
        // deeper than any stack: PostgreSQL must refuse, not crash
        0 => {
            let d = *[100, 1000, 10_000, 100_000].choose(rng).unwrap();
            format!("{}1{}", "[".repeat(d), "]".repeat(d))
        }
        1 => format!("[{}]", vec!["1"; rng.gen_range(1000..200_000)].join(",")),
        2 => json!({"s": "x".repeat(rng.gen_range(1000..2_000_000))}).to_string(),
        _ => "{\"nul\": \"a\\u0000b\"}".to_string(),
    }
}

/// An array literal of `elems` (None: NULL), quoted for any element type.
fn array_literal(elems: &[Option<String>]) -> String {
    let inner: Vec<String> = elems
        .iter()
        .map(|e| match e {
            None => "NULL".into(),
            Some(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// A value of SQL type `ty` as text (cast by the call), or None for NULL.
fn value(rng: &mut StdRng, ty: &str, known: &Known) -> Option<String> {
    if rng.gen_bool(0.12) {
        return None;
    }
    if let Some(elem) = ty.strip_suffix("[]") {
        return Some(match rng.gen_range(0..10) {
            0 => "{}".into(),
            1 => {
                let a = value(rng, elem, known).unwrap_or_default();
                array_literal(&[Some(a.clone()), Some(a)])
                    .replacen('{', "{{", 1)
                    .replacen('}', "}}", 1)
            }
            2 => "[0:1]={1,2}".into(),
            // many small elements (a huge one repeated would pass the
            // protocol's 1 GB message limit, which ends the connection)
            3 => {
                let small = match elem {
                    "jsonb" => Some(random_json(rng, 1).to_string()),
                    _ => value(rng, elem, known),
                }
                .filter(|v| v.len() < 200);
                array_literal(&vec![small; rng.gen_range(1000..20_000)])
            }
            4 => "not an array".into(),
            _ => {
                let n = rng.gen_range(1..6);
                array_literal(&(0..n).map(|_| value(rng, elem, known)).collect::<Vec<_>>())
            }
        });
    }
    Some(match ty {
        "text" => match rng.gen_range(0..10) {
            0 => pick(rng, ZONES).into(),
            1 => pick(rng, &["skip", "allow", "queue", "cancel", "SKIP"]).into(),
            _ => random_text(rng),
        },
        "jsonb" => match rng.gen_range(0..10) {
            0..=2 => mutated_definition(rng).to_string(),
            3 => huge_json(rng),
            4 => "{not json".into(),
            _ => random_json(rng, 4).to_string(),
        },
        "integer" => match rng.gen_range(0..6) {
            0 => pick(rng, &["0", "1", "-1", "2147483647", "-2147483648", "10"]).into(),
            1 => pick(rng, &["2147483648", "1e10", "abc", "1.5"]).into(),
            _ => rng.gen_range(-5..50).to_string(),
        },
        "bigint" => match rng.gen_range(0..6) {
            0..=2 if !known.steps.is_empty() => known.steps.choose(rng).unwrap().0.clone(),
            3 => pick(
                rng,
                &["0", "-1", "9223372036854775807", "-9223372036854775808"],
            )
            .into(),
            4 => "9223372036854775808".into(),
            _ => rng.gen_range(-5..1_000_000i64).to_string(),
        },
        "uuid" => match rng.gen_range(0..6) {
            0..=1 if !known.runs.is_empty() => known.runs.choose(rng).unwrap().clone(),
            2 if !known.steps.is_empty() => known.steps.choose(rng).unwrap().1.clone(),
            3 => "00000000-0000-0000-0000-000000000000".into(),
            4 => "zzz".into(),
            _ => uuid::Uuid::new_v4().to_string(),
        },
        "timestamp with time zone" => match rng.gen_range(0..3) {
            0 => pick(rng, TIMESTAMPS).into(),
            // around now, within about a year either way
            _ => chrono::DateTime::from_timestamp(
                1_796_000_000 + rng.gen_range(-30_000_000..30_000_000),
                0,
            )
            .unwrap()
            .to_rfc3339(),
        },
        "interval" => pick(rng, INTERVALS).into(),
        "boolean" => pick(rng, &["true", "false", "t", "maybe"]).into(),
        // grant_* and revoke_*: roles that exist, that do not, and names
        // that are not names
        "regrole" => pick(
            rng,
            &[
                "postgres",
                "pg_monitor",
                "no_such_role",
                "\"Odd Name\"",
                "",
                "a b",
                "public",
            ],
        )
        .into(),
        other => panic!("no generator for type {other}: add one"),
    })
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Runs and claimed steps to aim at.
async fn refresh(db: &Client, known: &mut Known) {
    db.batch_execute(
        "SELECT baton.define_workflow('fz', '{\"queue\": \"fz_q\", \"steps\": [
             {\"name\": \"a\"}, {\"name\": \"b\", \"after\": [\"a\"]},
             {\"name\": \"e\", \"after\": [\"a\"], \"wait_event\": \"go\"}]}');
         SELECT baton.configure_queue('fz_q', paused => false);
         SELECT baton.enqueue_workflows('fz', array_fill('{}'::jsonb, ARRAY[20]))",
    )
    .await
    .expect("seed runs");
    known.runs = db
        .query(
            "SELECT id::text FROM baton.runs ORDER BY created_at DESC LIMIT 200",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let claimed = db
        .query(
            "SELECT step_id::text, lease_token::text FROM baton.claim_steps('fz-worker', ARRAY['fz_q'], 10)",
            &[],
        )
        .await
        .unwrap();
    known
        .steps
        .extend(claimed.iter().map(|r| (r.get(0), r.get(1))));
    if known.steps.len() > 200 {
        known.steps.drain(..known.steps.len() - 200);
    }
}

const INVARIANTS: &str = "SELECT array_remove(ARRAY[
    CASE WHEN EXISTS (SELECT FROM baton.steps WHERE status = 'running'
                       AND (lease_token IS NULL OR lease_expires_at IS NULL OR worker IS NULL))
         THEN 'a running step without a lease' END,
    CASE WHEN EXISTS (SELECT FROM baton.runs WHERE (finished_at IS NULL) <> (status IN ('pending', 'running')))
         THEN 'a run whose finished_at disagrees with its status' END,
    CASE WHEN EXISTS (SELECT FROM baton.runs r JOIN baton.steps s ON s.run_id = r.id
                       WHERE r.finished_at IS NOT NULL AND s.status IN ('running', 'ready'))
         THEN 'a finished run with a ready or running step' END,
    CASE WHEN EXISTS (SELECT FROM baton.steps s WHERE NOT EXISTS (SELECT FROM baton.runs r WHERE r.id = s.run_id))
         THEN 'a step without its run' END,
    CASE WHEN EXISTS (SELECT FROM baton.runs r WHERE NOT EXISTS (SELECT FROM baton.steps s WHERE s.run_id = r.id))
         THEN 'a run without steps' END,
    CASE WHEN EXISTS (SELECT FROM baton.steps WHERE attempt < 0)
         THEN 'a negative attempt count' END,
    CASE WHEN EXISTS (SELECT FROM baton.runs r WHERE r.status = 'succeeded'
                       AND EXISTS (SELECT FROM baton.steps s WHERE s.run_id = r.id AND s.status <> 'succeeded'))
         THEN 'a succeeded run with a step not succeeded' END
], NULL)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_refuses_garbage_cleanly() {
    let full = std::env::var("BATON_FAULTS").is_ok_and(|v| v == "full");
    let cases: usize = if full { 10_000 } else { 2_000 };
    let seed: u64 = std::env::var("BATON_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("fuzz seed {seed} (BATON_FUZZ_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);

    let admin = connect(&url()).await;
    let dbname = unique("baton_fuzz");
    admin
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .await
        .unwrap();
    let base = url();
    let fuzz_url = format!("{}/{dbname}", &base[..base.rfind('/').unwrap()]);
    let db = connect(&fuzz_url).await;
    db.batch_execute(
        "SET client_min_messages = error; CREATE EXTENSION pg_baton; SET statement_timeout = '20s'",
    )
    .await
    .unwrap();
    let started: String = db
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    let funcs: Vec<Func> = db
        .query(
            "SELECT p.proname::text, array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t),
                    p.pronargdefaults::int
               FROM pg_proc p
              WHERE p.pronamespace = 'baton'::regnamespace AND p.proname !~ '^_' AND p.prokind = 'f'
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Func {
            name: r.get(0),
            types: r.get(1),
            defaults: r.get::<_, i32>(2) as usize,
        })
        .collect();
    assert!(funcs.len() >= 20, "the catalog lists the API");

    let mut known = Known::default();
    refresh(&db, &mut known).await;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_function: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for case in 0..cases {
        if case % 250 == 0 {
            refresh(&db, &mut known).await;
        }
        let f = funcs.choose(&mut rng).unwrap();
        // sometimes leave out trailing parameters that have defaults
        let n = f.types.len() - rng.gen_range(0..=f.defaults);
        let args: Vec<Option<String>> = f.types[..n]
            .iter()
            .map(|t| value(&mut rng, t, &known))
            .collect();
        let placeholders: Vec<String> = f.types[..n]
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::text::{t}", i + 1))
            .collect();
        let sql = format!("SELECT baton.{}({})::text", f.name, placeholders.join(", "));
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
            .iter()
            .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let shown = || {
            let args: Vec<String> = args
                .iter()
                .map(|a| match a {
                    None => "NULL".into(),
                    Some(s) if s.len() > 200 => {
                        format!("{}… ({} bytes)", &s[..s.floor_char_boundary(200)], s.len())
                    }
                    Some(s) => format!("{s:?}"),
                })
                .collect();
            format!(
                "case {case} (seed {seed}): baton.{}({})",
                f.name,
                args.join(", ")
            )
        };
        let entry = per_function.entry(f.name.clone()).or_default();
        entry.0 += 1;
        match db.query(&sql, &params).await {
            Ok(_) => {
                *outcomes.entry("ok".into()).or_default() += 1;
                entry.1 += 1;
            }
            Err(e) => {
                let Some(err) = e.as_db_error() else {
                    panic!(
                        "{}: no ERROR from the server but {e:?}: did the backend crash?",
                        shown()
                    );
                };
                let code = err.code().code().to_string();
                assert!(
                    !err.message().is_empty(),
                    "{}: an ERROR without a message",
                    shown()
                );
                assert!(
                    !code.starts_with("XX"),
                    "{}: internal error {code}: {}",
                    shown(),
                    err.message()
                );
                assert_ne!(code, "57014", "{}: ran into the statement timeout", shown());
                *outcomes.entry(code).or_default() += 1;
            }
        }
        let broken: Vec<String> = db
            .query_one(INVARIANTS, &[])
            .await
            .unwrap_or_else(|e| panic!("{}: the session is gone: {e:?}", shown()))
            .get(0);
        assert!(broken.is_empty(), "{}: left {broken:?}", shown());
    }
    let now_started: String = admin
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        now_started, started,
        "the server restarted during the fuzz run"
    );
    let reached: Vec<&String> = per_function
        .iter()
        .filter(|(_, (_, ok))| *ok > 0)
        .map(|(name, _)| name)
        .collect();
    println!(
        "{cases} cases over {} functions, server never restarted; {} of them also succeeded at least once; outcomes by SQLSTATE: {outcomes:?}",
        funcs.len(),
        reached.len()
    );
    drop(db);
    admin
        .batch_execute(&format!("DROP DATABASE {dbname} WITH (FORCE)"))
        .await
        .unwrap();
}
