//! Schedules under racing sessions: every tick makes exactly one run, however
//! many sessions fire the schedule at once, and after downtime only the most
//! recent missed tick fires. The ticks are yearly (1 January, 00:00 UTC) so
//! that the background worker, which fires with the real clock, never fires
//! one during the test; the sessions fire with `_fire_schedules(at, ...)` at
//! chosen times, as the worker's round would when its clock reached them.

mod common;

use common::connect;

/// Four sessions fire one schedule at the same moments after each of six
/// ticks (each session as its own transaction, all four at once): one run per
/// tick, keyed `schedule:<name>:<tick>`, in tick order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_tick_makes_one_run_with_four_sessions_racing() {
    let admin = connect().await;
    let name = format!("race-{}", uuid::Uuid::new_v4());
    let wf = format!("race_wf_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(
            "SELECT baton.define_workflow($1, '{\"queue\": \"schedule_race\", \"steps\": [{\"name\": \"s\"}]}')",
            &[&wf],
        )
        .await
        .unwrap();
    admin
        .execute(
            "SELECT baton.schedule($1, '0 0 1 1 *', $2, '{\"from\": \"race\"}')",
            &[&name, &wf],
        )
        .await
        .unwrap();
    // as if the schedule had been created just before the tick of 2030
    admin
        .execute(
            "UPDATE baton.schedule_entries SET next_run_at = '2030-01-01 00:00:00+00' WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap();
    let sessions = futures_util::future::join_all((0..4).map(|_| connect())).await;
    let sessions: Vec<_> = sessions.into_iter().map(std::sync::Arc::new).collect();
    for year in 2030..2036 {
        let at = format!("{year}-01-01 00:00:01+00");
        let fired = futures_util::future::join_all(sessions.iter().map(|s| {
            let (s, at) = (s.clone(), at.clone());
            async move {
                let row = s
                    .query_one(
                        "SELECT baton._fire_schedules($1::text::timestamptz, 100)",
                        &[&at],
                    )
                    .await
                    .unwrap();
                row.get::<_, i32>(0)
            }
        }))
        .await;
        // one session fired the tick, the others skipped the row it held
        // or found it fired (the idempotency key would also keep a second
        // enqueue from making a run, but it is not needed)
        assert_eq!(
            fired.iter().sum::<i32>(),
            1,
            "exactly one session fires the tick of {year}: {fired:?}"
        );
    }
    let rows = admin
        .query(
            "SELECT idempotency_key, input FROM baton.runs WHERE workflow = $1 ORDER BY idempotency_key",
            &[&wf],
        )
        .await
        .unwrap();
    let keys: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let expected: Vec<String> = (2030..2036)
        .map(|y| format!("schedule:{name}:{y}-01-01T00:00:00Z"))
        .collect();
    assert_eq!(keys, expected, "one run per tick, keyed by the tick");
    assert!(rows
        .iter()
        .all(|r| r.get::<_, serde_json::Value>(1) == serde_json::json!({"from": "race"})));
    let (next, last): (String, String) = {
        let r = admin
            .query_one(
                "SELECT next_run_at AT TIME ZONE 'UTC' || '', last_run_at AT TIME ZONE 'UTC' || '' FROM baton.schedules WHERE name = $1",
                &[&name],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(next, "2036-01-01 00:00:00");
    assert_eq!(last, "2035-01-01 00:00:00");

    // Downtime: nothing fired from 2036 to 2040; the next round fires the
    // tick of 2040 once, not the four it missed.
    let fired: i32 = admin
        .query_one(
            "SELECT baton._fire_schedules('2040-06-01 00:00:00+00', 100)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fired, 1);
    let after: Vec<String> = admin
        .query(
            "SELECT idempotency_key FROM baton.runs WHERE workflow = $1 AND idempotency_key > $2 ORDER BY 1",
            &[&wf, &format!("schedule:{name}:2035")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        after,
        vec![
            format!("schedule:{name}:2035-01-01T00:00:00Z"),
            format!("schedule:{name}:2040-01-01T00:00:00Z")
        ]
    );
    admin
        .execute(
            "SELECT baton.cancel_workflow(id) FROM baton.runs WHERE workflow = $1",
            &[&wf],
        )
        .await
        .unwrap();
    admin
        .execute("SELECT baton.unschedule($1)", &[&name])
        .await
        .unwrap();
}
