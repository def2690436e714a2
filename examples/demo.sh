#!/usr/bin/env bash
# The order workflow, end to end, with nothing but psql: define it, enqueue a
# run, then act as a worker that claims steps, "runs" them and reports back.
# ship_order fails once with a transient error and succeeds on its retry.
#
#   examples/demo.sh [psql connection args...]     (default: the setup's demo cluster)
set -euo pipefail
if [ $# -eq 0 ]; then set -- -h 127.0.0.1 -p 55439 -U postgres baton_demo; fi
sql() { psql -X -q -v ON_ERROR_STOP=1 -At -F '|' "$@"; }
q() { sql "${conn[@]}" -c "$1"; }
conn=("$@")

q "SELECT baton.define_workflow('order', '{
  \"steps\": [
    {\"name\": \"validate_payment\"},
    {\"name\": \"check_inventory\"},
    {\"name\": \"ship_order\", \"after\": [\"validate_payment\", \"check_inventory\"],
     \"max_attempts\": 5, \"backoff\": {\"initial\": \"1 second\", \"max\": \"10 minutes\", \"multiplier\": 2}},
    {\"name\": \"notify_customer\", \"after\": [\"ship_order\"], \"queue\": \"email\"}
  ]}')" >/dev/null
key="order-$(date +%s%N)"
run=$(q "SELECT baton.enqueue_workflow('order', '{\"order_id\": 42}', idempotency_key => '$key')")
echo "enqueued run $run"

# The worker: claim from both queues; finish when the run has finished.
shipped_once=no
while :; do
    status=$(q "SELECT status FROM baton.workflow_runs WHERE id = '$run'")
    case $status in succeeded|failed|cancelled) break ;; esac
    claimed=$(q "SELECT step_id, lease_token, step, attempt
                   FROM baton.claim_steps('demo-worker', ARRAY['default', 'email'], 10, '30 seconds')")
    if [ -z "$claimed" ]; then sleep 0.2; continue; fi
    while IFS='|' read -r step_id token step attempt; do
        if [ "$step" = ship_order ] && [ $shipped_once = no ]; then
            shipped_once=yes
            echo "  $step (attempt $attempt): carrier timed out -> $(q "SELECT baton.fail_step($step_id, '$token', 'carrier timed out')")"
            continue
        fi
        echo "  $step (attempt $attempt): done -> run $(q "SELECT baton.complete_step($step_id, '$token', '{\"$step\": \"ok\"}')")"
    done <<< "$claimed"
done

psql -X "${conn[@]}" -c "SELECT id, workflow, status, output FROM baton.workflow_runs WHERE id = '$run'" \
    -c "SELECT step, status, attempt, queue, worker, output FROM baton.workflow_steps WHERE workflow_id = '$run' ORDER BY step_id" \
    -c "SELECT step, attempt, outcome, error FROM baton.step_attempts WHERE workflow_id = '$run' ORDER BY finished_at"
[ "$status" = succeeded ]
