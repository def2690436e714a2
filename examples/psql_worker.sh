#!/usr/bin/env bash
# A pg_baton worker in bash and psql: claim, run, complete. Each step's output
# and completion go in one transaction, so a lost lease (BT001) changes nothing.
#
#   examples/psql_worker.sh QUEUE [--idle-exit SECONDS] -- [psql connection args...]
#
# Its one handler, polyglot.sh_step, adds 1 to the Python step's value.
#
# It polls (every 0.2 s when idle) instead of LISTENing, since psql cannot
# wait for a notification; each idle poll is an empty claim. A worker with
# several claimers listens on one connection per process and wakes one
# claimer per notification instead (python_worker.py; README, "Workers in
# other languages").
set -euo pipefail
queue=$1; shift
idle_exit=
if [ "${1:-}" = --idle-exit ]; then idle_exit=$2; shift 2; fi
[ "${1:-}" = -- ] && shift
q() { psql -X -q -At -F '|' -v ON_ERROR_STOP=1 "$@"; }

# The session the database watches (baton.register_worker): a psql kept open
# beside the loop. When this script dies, even by SIGKILL, its stdin closes,
# the session ends, and the background worker hands back the worker's leases
# within about a second instead of when they expire.
coproc SESSION { psql -X -q -v ON_ERROR_STOP=1 "$@" >/dev/null; }
echo "SELECT baton.register_worker('psql-worker', ARRAY['$queue']);" >&"${SESSION[1]}"

idle_since=$(date +%s)
while :; do
    claimed=$(q "$@" -c "SELECT step_id, lease_token, workflow, step, upstream
                           FROM baton.claim_steps('psql-worker', ARRAY['$queue'], 10, '30 seconds')")
    if [ -z "$claimed" ]; then
        if [ -n "$idle_exit" ] && [ $(( $(date +%s) - idle_since )) -ge "$idle_exit" ]; then exit 0; fi
        sleep 0.2
        continue
    fi
    idle_since=$(date +%s)
    while IFS='|' read -r step_id token workflow step upstream; do
        if [ "$workflow.$step" = polyglot.sh_step ]; then
            # the handler: plain SQL on the upstream output, completed in the same transaction
            q "$@" -1 -c "SELECT baton.complete_step($step_id, '$token',
                              jsonb_build_object('value', ('$upstream'::jsonb #>> '{py_step,value}')::int + 1))" >/dev/null \
                || echo "psql-worker: step $step_id not completed (lease lost?)" >&2
        else
            q "$@" -c "SELECT baton.fail_step($step_id, '$token', 'psql-worker has no handler for $workflow.$step')" >/dev/null
        fi
    done <<< "$claimed"
done
