#!/usr/bin/env bash
# The background worker outlives its database (README, "The background
# worker"), on a cluster of its own (127.0.0.1:55447, /tmp/pg_baton-bgworker;
# the extension must be installed). The server starts before the database
# named by baton.database exists:
#  (a) the database is created, then the extension: the scheduler connects to
#      it (pg_stat_activity) and does its job: the expired lease of a claimed
#      step (a short lease, a queue nobody claims from) is reclaimed, the step
#      ready again with its attempt counted;
#  (b) DROP DATABASE ... WITH (FORCE), CREATE DATABASE, CREATE EXTENSION:
#      the same checks again, with no server restart;
#  (c) each time, the server log says what the scheduler waits for: first
#      the database, then CREATE EXTENSION.
# Every check is made (a failed one does not skip the others); the script
# then exits non-zero naming each failed check.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"

PORT=55447
DB=baton_bgw
DIR=/tmp/pg_baton-bgworker
LOG=$DIR/server.log
WAIT_DB="pg_baton scheduler: waiting for database \"$DB\" to be created"
WAIT_EXT="pg_baton scheduler: extension not installed in \"$DB\"; waiting for CREATE EXTENSION pg_baton"
trap 'stop_cluster bgworker' EXIT
# start_cluster creates the database it is given: a scratch one here, while
# the scheduler is told (by the later, winning line) to serve one not yet there.
BATON_INTERVAL=200ms BATON_EXTRA_CONF="baton.database = '$DB'" \
    start_cluster bgworker $PORT baton_bgw_scratch
run_sql() { psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $PORT -U postgres "$@"; }

failures=()
fail() { echo "bgworker.sh: FAILED: $*" >&2; failures+=("$*"); }
# wait_for SECONDS COMMAND...: succeeds as soon as COMMAND does, fails after SECONDS
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}
logged() { grep -cF -- "$1" "$LOG" || true; }
logged_more_than() { [ "$(logged "$1")" -gt "$2" ]; }
scheduler_connected() {
    [ "$(run_sql postgres -c "SELECT count(*) FROM pg_stat_activity
                               WHERE backend_type = 'pg_baton scheduler' AND datname = '$DB'")" -ge 1 ]
}
reclaimed() {
    [ "$(run_sql $DB -c "SELECT s.status = 'ready' AND s.attempt = 1 AND a.outcome = 'lease_expired'
                           FROM baton.workflow_steps s
                           JOIN baton.step_attempts a ON a.step_id = s.step_id AND a.attempt = 1
                          WHERE s.step_id = $1")" = t ]
}

# create LABEL: the database, then the extension, each once the scheduler has
# said it waits for it (counts of those log lines before: $2 and $3)
create() {
    local label=$1 seen_db=$2 seen_ext=$3
    wait_for 30 logged_more_than "$WAIT_DB" "$seen_db" \
        || fail "$label: no log line '$WAIT_DB' within 30 s while the database did not exist"
    run_sql postgres -c "CREATE DATABASE $DB"
    wait_for 30 logged_more_than "$WAIT_EXT" "$seen_ext" \
        || fail "$label: no log line '$WAIT_EXT' within 30 s while the extension was not installed"
    run_sql $DB -c "CREATE EXTENSION pg_baton"
}

# serves LABEL: the scheduler is connected to the database and reclaims an
# expired lease there (nobody else claims from that queue)
serves() {
    local label=$1 step
    if ! wait_for 60 scheduler_connected; then
        fail "$label: no 'pg_baton scheduler' backend connected to \"$DB\" within 60 s"
        return
    fi
    step=$(run_sql $DB <<'SQL'
SELECT baton.define_workflow('bgw', '{"queue": "bgw", "steps": [{"name": "s", "max_attempts": 3}]}') \g /dev/null
SELECT baton.enqueue_workflow('bgw') \g /dev/null
SELECT step_id FROM baton.claim_steps('gone', ARRAY['bgw'], 1, '300 milliseconds');
SQL
)
    [ -n "$step" ] || { fail "$label: no step could be claimed"; return; }
    wait_for 60 reclaimed "$step" \
        || fail "$label: the expired lease of step $step was not reclaimed within 60 s (the scheduler is not serving \"$DB\")"
}

log "bgworker.sh (a): the server started before database \"$DB\" existed"
create "(a)" 0 0
serves "(a)"

log "bgworker.sh (b): DROP DATABASE $DB WITH (FORCE), then CREATE DATABASE and CREATE EXTENSION"
seen_db=$(logged "$WAIT_DB")
seen_ext=$(logged "$WAIT_EXT")
run_sql postgres -c "DROP DATABASE $DB WITH (FORCE)"
create "(b)" "$seen_db" "$seen_ext"
serves "(b)"

if [ ${#failures[@]} -gt 0 ]; then
    echo "bgworker.sh: ${#failures[@]} check(s) failed:" >&2
    printf '  - %s\n' "${failures[@]}" >&2
    echo "bgworker.sh: the scheduler's comings and goings in $LOG:" >&2
    grep -E 'pg_baton scheduler|background worker "pg_baton' "$LOG" | grep -v 'expired lease(s)$' | tail -n 30 >&2 || true
    exit 1
fi
echo "bgworker.sh: passed"
