#!/usr/bin/env bash
# Time and events across a PostgreSQL restart, on a cluster of its own
# (127.0.0.1:55448, /tmp/pg_baton-restart; the extension must be installed).
# Nothing but the database keeps them: no worker process takes part.
#
# Before the restart (-m immediate: every process killed at once, as in a
# crash), a run sleeps (a "sleep" step of 3 s), another waits for an event,
# a third waits on a code-first suspend_step until a time, and a fourth has a
# deadline 3 s away. After recovery, checked by polling (never by timing):
#  - the sleep step succeeds by itself, and not before its time;
#  - the event sent after the restart completes the waiting step;
#  - the suspended step is ready again after its time, its attempt not used;
#  - the run past its deadline is failed by the background worker.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"

PORT=55448
DB=baton_restart
trap 'stop_cluster restart' EXIT
BATON_INTERVAL=1s start_cluster restart $PORT $DB
run_sql() { psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $PORT -U postgres "$@" $DB; }
fail() { echo "restart test FAILED: $*" >&2; exit 1; }

run_sql -c "CREATE EXTENSION pg_baton"
run_sql >/dev/null <<'SQL'
SELECT baton.define_workflow('nap', '{"steps": [{"name": "zz", "sleep": "3 seconds"}, {"name": "after", "after": ["zz"]}]}');
SELECT baton.define_workflow('approval', '{"steps": [{"name": "ok", "wait_event": "approved"}]}');
SELECT baton.define_workflow('code', '{"queue": "code", "steps": [{"name": "s"}]}');
SELECT baton.define_workflow('slow', '{"queue": "slow", "steps": [{"name": "s"}]}');
SELECT baton.enqueue_workflow('nap', '{}', 'nap');
SELECT baton.enqueue_workflow('approval', '{}', 'approval');
SELECT baton.enqueue_workflow('code', '{}', 'code');
SELECT baton.suspend_step(step_id, lease_token, until => clock_timestamp() + interval '3 seconds')
  FROM baton.claim_steps('before-restart', ARRAY['code']);
SELECT baton.enqueue_workflow('slow', '{}', 'slow', deadline => clock_timestamp() + interval '3 seconds');
SQL
[ "$(run_sql -c "SELECT string_agg(status, ',' ORDER BY step_id) FROM baton.workflow_steps")" = "waiting,blocked,waiting,waiting,ready" ] \
    || fail "unexpected states before the restart: $(run_sql -c "SELECT string_agg(step || ':' || status, ', ' ORDER BY step_id) FROM baton.workflow_steps")"

as_postgres "$PG_BIN/pg_ctl" -D /tmp/pg_baton-restart/data -m immediate -w stop >/dev/null
as_postgres "$PG_BIN/pg_ctl" -D /tmp/pg_baton-restart/data -l /tmp/pg_baton-restart/server.log -w start >/dev/null

[ "$(run_sql -c "SELECT baton.send_event(id, 'approved', '{\"by\": \"ops\"}') FROM baton.runs WHERE idempotency_key = 'approval'")" = t ] \
    || fail "the event sent after the restart did not complete the waiting step"

# poll until the timers have fired (the sleep and the suspension end 3 s
# after they began, the deadline passes then), at most 60 s
for _ in $(seq 1 600); do
    state=$(run_sql -c "SELECT string_agg(idempotency_key || ':' || status, ',' ORDER BY idempotency_key) FROM baton.runs")
    ready=$(run_sql -c "SELECT count(*) FROM baton.workflow_steps s JOIN baton.runs r ON r.id = s.workflow_id WHERE r.idempotency_key = 'code' AND s.status = 'ready'")
    [ "$state" = "approval:succeeded,code:running,nap:running,slow:failed" ] && [ "$ready" = 1 ] \
        && [ "$(run_sql -c "SELECT status FROM baton.workflow_steps WHERE step = 'after'")" = ready ] && break
    sleep 0.1
done
[ "$state" = "approval:succeeded,code:running,nap:running,slow:failed" ] || fail "runs after the restart: $state"
[ "$ready" = 1 ] || fail "the suspended step is not ready again"
[ "$(run_sql -c "SELECT status FROM baton.workflow_steps WHERE step = 'after'")" = ready ] \
    || fail "the step after the sleep is not ready"
[ "$(run_sql -c "SELECT finished_at >= started_at + interval '3 seconds' FROM baton.workflow_steps WHERE step = 'zz'")" = t ] \
    || fail "the sleep step ended before its time"
[ "$(run_sql -c "SELECT attempt FROM baton.workflow_steps s JOIN baton.runs r ON r.id = s.workflow_id WHERE r.idempotency_key = 'code'")" = 0 ] \
    || fail "the suspension used up an attempt"
[ "$(run_sql -c "SELECT error LIKE 'deadline % passed' FROM baton.runs WHERE idempotency_key = 'slow'")" = t ] \
    || fail "the run past its deadline has error $(run_sql -c "SELECT error FROM baton.runs WHERE idempotency_key = 'slow'")"
echo "restart test passed: a sleep, an event wait, a suspension and a deadline kept across a crash restart"
