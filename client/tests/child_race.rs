//! Parent and child runs finishing at once, on several real sessions: a
//! transition holds its own run's lock and only tries another run's, so that
//! a child completing its last step while its parent is cancelled (or failed
//! by a sibling step) never deadlocks, and whichever way the race goes the
//! runs end consistent: a cancelled parent leaves no unfinished child, and a
//! succeeded child's parent step took its output or was cancelled with its run.

mod common;

use common::connect;
use std::time::Duration;
use tokio_postgres::types::ToSql;

/// A child workflow of one step "work" and a parent whose step "call" starts
/// it, with a second step `second` after it ("after") or beside it
/// ("side"), all on one queue: (parent, child, queue).
async fn define(db: &tokio_postgres::Client, tag: &str, second: &str) -> (String, String, String) {
    let child = format!("race_child_{tag}");
    let parent = format!("race_parent_{tag}");
    let queue = format!("race_q_{tag}");
    db.execute(
        "SELECT baton.define_workflow($1, jsonb_build_object('queue', $2::text, 'steps', '[{\"name\": \"work\"}]'::jsonb))",
        &[&child, &queue],
    )
    .await
    .unwrap();
    db.execute(
        "SELECT baton.define_workflow($1, jsonb_build_object('queue', $3::text, 'steps', jsonb_build_array(
             jsonb_build_object('name', 'call', 'workflow', $2::text),
             CASE WHEN $4 = 'after' THEN jsonb_build_object('name', 'after', 'after', jsonb_build_array('call'))
                  ELSE jsonb_build_object('name', 'side') END)))",
        &[&parent, &child, &queue, &second],
    )
    .await
    .unwrap();
    (parent, child, queue)
}

/// Twenty times: the child's only step is completed on one session while the
/// parent is cancelled on another, both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_child_finishing_while_its_parent_is_cancelled() {
    let admin = connect().await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (parent_wf, _, queue) = define(&admin, &tag, "after").await;
    let (a, b) = (connect().await, connect().await);
    let mut outcomes = std::collections::BTreeMap::new();
    for i in 0..20 {
        let parent: uuid::Uuid = admin
            .query_one(
                "SELECT baton.enqueue_workflow($1, jsonb_build_object('i', $2::int))",
                &[&parent_wf, &i],
            )
            .await
            .unwrap()
            .get(0);
        let claim = admin
            .query_one(
                "SELECT step_id, lease_token FROM baton.claim_steps('race', ARRAY[$1])",
                &[&queue],
            )
            .await
            .unwrap();
        let (step_id, token): (i64, uuid::Uuid) = (claim.get(0), claim.get(1));
        let complete_args: [&(dyn ToSql + Sync); 2] = [&step_id, &token];
        let cancel_args: [&(dyn ToSql + Sync); 1] = [&parent];
        let (completed, cancelled) = tokio::join!(
            a.query_one(
                "SELECT baton.complete_step($1, $2, '{\"done\": true}')",
                &complete_args,
            ),
            b.query_one("SELECT baton.cancel_workflow($1)", &cancel_args)
        );
        let completed = completed.map(|r| r.get::<_, String>(0));
        let cancelled = cancelled
            .expect("cancel never fails (no deadlock)")
            .get::<_, bool>(0);
        assert!(
            cancelled,
            "the parent was unfinished, so the cancel took it"
        );
        // the completion either landed first, or found the child cancelled
        // with its parent (its lease revoked: BT001)
        let completed = match completed {
            Ok(status) => status,
            Err(e) => {
                assert_eq!(e.code().map(|c| c.code()), Some("BT001"), "{e:?}");
                "lease_lost".to_string()
            }
        };
        *outcomes.entry(completed).or_insert(0) += 1;
    }
    // whatever the order, once the signals (if any) are done: every parent
    // cancelled, no child unfinished, no step of a parent waiting
    let mut settled = false;
    for _ in 0..200 {
        let row = admin
            .query_one(
                "SELECT (SELECT count(*) FROM baton.runs WHERE workflow = $1 AND status <> 'cancelled'),
                        (SELECT count(*) FROM baton.runs c JOIN baton.runs p ON p.id = c.parent_id
                          WHERE p.workflow = $1 AND c.finished_at IS NULL),
                        (SELECT count(*) FROM baton.steps s JOIN baton.runs p ON p.id = s.run_id
                          WHERE p.workflow = $1 AND s.status IN ('waiting', 'ready', 'running', 'blocked'))",
                &[&parent_wf],
            )
            .await
            .unwrap();
        let (parents, children, steps): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if parents == 0 && children == 0 && steps == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        settled,
        "runs left unfinished after the races ({outcomes:?})"
    );
}

/// A batch that completes a step of a parent and, in the same call, the last
/// step of its child (the locks of two related runs in one transaction),
/// raced against a cancel of the parent: no deadlock either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_batch_over_a_parent_and_its_child_beside_a_cancel() {
    let admin = connect().await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (parent, _, queue) = define(&admin, &format!("b{tag}"), "side").await;
    let (a, b) = (connect().await, connect().await);
    for i in 0..20 {
        let run: uuid::Uuid = admin
            .query_one(
                "SELECT baton.enqueue_workflow($1, jsonb_build_object('i', $2::int))",
                &[&parent, &i],
            )
            .await
            .unwrap()
            .get(0);
        // the parent's "side" step and the child's "work" step
        let rows = admin
            .query(
                "SELECT step_id, lease_token FROM baton.claim_steps('race', ARRAY[$1], 10)",
                &[&queue],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let tokens: Vec<uuid::Uuid> = rows.iter().map(|r| r.get(1)).collect();
        let outputs = vec![serde_json::json!(1), serde_json::json!(2)];
        let complete_args: [&(dyn ToSql + Sync); 3] = [&ids, &tokens, &outputs];
        let cancel_args: [&(dyn ToSql + Sync); 1] = [&run];
        let (completed, cancelled) = tokio::join!(
            a.query(
                "SELECT * FROM baton.complete_steps($1, $2, $3)",
                &complete_args
            ),
            b.query_one("SELECT baton.cancel_workflow($1)", &cancel_args)
        );
        completed.expect("the batch never deadlocks");
        cancelled.expect("the cancel never deadlocks");
    }
    let mut settled = false;
    for _ in 0..200 {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM baton.runs r LEFT JOIN baton.runs p ON p.id = r.parent_id
                  WHERE (r.workflow = $1 OR p.workflow = $1) AND r.finished_at IS NULL",
                &[&parent],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(settled, "runs left unfinished");
}
