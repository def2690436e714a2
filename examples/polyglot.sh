#!/usr/bin/env bash
# "Any language is a worker": a Python worker and a psql worker run the two
# steps of the same workflow. py_step (queue polyglot_py) doubles the input,
# sh_step (queue polyglot_sh, after py_step) adds one; py_parts splits the
# input in three numbers and py_square, a map over them, squares each one in
# the Python worker (one claim per element).
#
#   examples/polyglot.sh [psql connection args...]   (default: the demo cluster)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -eq 0 ]; then set -- -h 127.0.0.1 -p 55439 -U postgres baton_demo; fi
q() { psql -X -q -At -v ON_ERROR_STOP=1 "$@"; }
# psql args -> a libpq DSN for psycopg
host=127.0.0.1 port=5432 user=postgres db=postgres args=("$@")
while [ $# -gt 0 ]; do
    case $1 in -h) host=$2; shift 2 ;; -p) port=$2; shift 2 ;; -U) user=$2; shift 2 ;; *) db=$1; shift ;; esac
done
set -- "${args[@]}"
dsn="host=$host port=$port user=$user dbname=$db"

q "$@" -c "SELECT baton.define_workflow('polyglot', '{\"steps\": [
    {\"name\": \"py_step\", \"queue\": \"polyglot_py\"},
    {\"name\": \"sh_step\", \"after\": [\"py_step\"], \"queue\": \"polyglot_sh\"},
    {\"name\": \"py_parts\", \"queue\": \"polyglot_py\"},
    {\"name\": \"py_square\", \"after\": [\"py_parts\"], \"map\": \"py_parts\", \"queue\": \"polyglot_py\"}]}')" >/dev/null
batch=$(date +%s%N)
for n in $(seq 1 20); do
    q "$@" -c "SELECT baton.enqueue_workflow('polyglot', '{\"n\": $n, \"batch\": \"$batch\"}')" >/dev/null
done

started=$(q "$@" -c "SELECT now()")
/usr/bin/python3 "$here/python_worker.py" "$dsn" polyglot_py --idle-exit 3 &
py=$!
"$here/psql_worker.sh" polyglot_sh --idle-exit 3 -- "$@" &
sh=$!
wait $py $sh

psql -X "$@" -c "SELECT r.input->>'n' AS n, r.status, r.output, string_agg(a.worker, ', ' ORDER BY a.step) AS workers
                   FROM baton.workflow_runs r JOIN baton.step_attempts a ON a.workflow_id = r.id
                  WHERE r.workflow = 'polyglot' AND r.input->>'batch' = '$batch'
                  GROUP BY r.id, r.input, r.status, r.output ORDER BY (r.input->>'n')::int LIMIT 5"
bad=$(q "$@" -c "SELECT count(*) FROM baton.workflow_runs r
                  WHERE r.workflow = 'polyglot' AND r.input->>'batch' = '$batch'
                    AND (r.status <> 'succeeded' OR (r.output #>> '{sh_step,value}')::int <> 2 * (r.input->>'n')::int + 1
                         OR r.output -> 'py_square' <> jsonb_build_array(power((r.input->>'n')::int, 2)::int,
                                                                     power((r.input->>'n')::int + 1, 2)::int,
                                                                     power((r.input->>'n')::int + 2, 2)::int))")
echo "polyglot: $((20 - bad)) passed, $bad failed"
# Both workers registered their sessions (baton.workers), and the database saw
# them go when they exited.
# (a session may take a moment to end after its process: up to 10 s)
for _ in $(seq 100); do
    registered=$(q "$@" -c "SELECT count(*) FROM baton.workers
                             WHERE name IN ('psql-worker', 'python-worker-0', 'python-worker-1', 'python-worker-2',
                                            'python-worker-3')
                               AND registered_at >= '$started' AND steps_held = 0 AND NOT alive")
    [ "$registered" = 5 ] && break
    sleep 0.1
done
echo "polyglot: $registered of 5 worker names registered, and gone after the workers exited"
[ "$bad" = 0 ] && [ "$registered" = 5 ]
