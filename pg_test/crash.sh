#!/usr/bin/env bash
# A server crash right after claims that skipped the flush wait (README,
# "Claims that skip the flush wait"), on a cluster of its own
# (127.0.0.1:55446, /tmp/pg_baton-crash; the extension must be installed).
#
# Ten claims commit durably, then twenty commit with synchronous_commit off,
# each in its own transaction, with a heartbeat (a durable commit) after the
# tenth of those. The server is then stopped with -m immediate
# (every process killed at once, nothing more written) and restarted. The WAL
# writer runs every 10 s here and the background worker as rarely, so the
# last asynchronous claims are normally still in the WAL buffers and lost.
# Checked after recovery:
#  - every durable claim is still held, and so is every asynchronous claim made
#    before the heartbeat: a durable commit flushes the claims before it;
#  - the asynchronous claims that survived are a prefix of them (WAL order):
#    none was lost before one that was kept;
#  - a lost claim left nothing behind: its step is ready again with no token
#    and no attempt used, and its run is pending;
#  - completing under a lost token is refused with BT001 and changes nothing;
#    under a kept token it succeeds;
#  - the lost steps are claimed again, and every run finishes.
# If a rare timing flushed every claim (nothing lost), the scenario runs again.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"

PORT=55446
DB=baton_crash
DIR=/tmp/pg_baton-crash
trap 'stop_cluster crash' EXIT
BATON_INTERVAL=10s BATON_EXTRA_CONF="wal_writer_delay = 10s" start_cluster crash $PORT $DB
run_sql() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $PORT -U postgres "$@" $DB; }

# claim I [async]: the SQL of claim number I, one step in a transaction of
# its own; prints "I step_id token"
claim() {
    local prefix=""
    [ "${2:-}" = async ] && prefix="(SELECT set_config('synchronous_commit', 'off', true)) s, "
    echo "SELECT $1, c.step_id, c.lease_token FROM ${prefix}baton.claim_steps('crash-test', ARRAY['crash'], 1) c;"
}

for try in 1 2 3; do
    run_sql <<'SQL'
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS pg_baton CASCADE;
CREATE EXTENSION pg_baton;
SELECT baton.define_workflow('crash', '{"queue": "crash", "steps": [{"name": "s"}]}') \g /dev/null
SELECT baton.enqueue_workflows('crash', array_fill('{}'::jsonb, ARRAY[40])) \g /dev/null
SQL
    for i in $(seq 10); do claim "$i"; done | run_sql -At -F ' ' > "$DIR/durable.txt"
    {
        for i in $(seq 10); do claim "$i" async; done
        # a heartbeat of the tenth: a durable commit that saw the claims
        echo "SELECT baton.heartbeat(s.step_id, s.lease_token) FROM baton.steps s
               WHERE s.worker = 'crash-test' AND s.status = 'running' ORDER BY s.step_id DESC LIMIT 1 \\g /dev/null"
        for i in $(seq 11 20); do claim "$i" async; done
    } | run_sql -At -F ' ' > "$DIR/async.txt"
    as_postgres "$PG_BIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null
    as_postgres "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
    [ "$(wc -l < "$DIR/durable.txt")" = 10 ] && [ "$(wc -l < "$DIR/async.txt")" = 20 ] \
        || { echo "crash.sh: the claims did not all return a step" >&2; exit 1; }

    lost=$(run_sql -At <<SQL
CREATE TEMP TABLE durable (i int, step_id bigint, token uuid);
CREATE TEMP TABLE async (i int, step_id bigint, token uuid);
\copy durable FROM '$DIR/durable.txt' WITH (DELIMITER ' ')
\copy async FROM '$DIR/async.txt' WITH (DELIMITER ' ')
SELECT count(*) FROM async a
 WHERE NOT EXISTS (SELECT FROM baton.steps s WHERE s.step_id = a.step_id AND s.lease_token = a.token);
SQL
)
    if [ "$lost" -gt 0 ]; then break; fi
    echo "crash.sh: every asynchronous claim was flushed before the crash (try $try); again"
    if [ "$try" = 3 ]; then echo "crash.sh: no claim was lost in 3 tries" >&2; exit 1; fi
done

run_sql <<SQL
\set ON_ERROR_STOP 1
CREATE TEMP TABLE durable (i int, step_id bigint, token uuid);
CREATE TEMP TABLE async (i int, step_id bigint, token uuid);
\copy durable FROM '$DIR/durable.txt' WITH (DELIMITER ' ')
\copy async FROM '$DIR/async.txt' WITH (DELIMITER ' ')
CREATE TEMP TABLE kept AS
SELECT a.*, EXISTS (SELECT FROM baton.steps s WHERE s.step_id = a.step_id AND s.lease_token = a.token
                       AND s.status = 'running') AS held
  FROM async a;

DO \$\$
DECLARE
    n integer;
    t record;
    refused integer := 0;
BEGIN
    SELECT count(*) INTO n FROM durable d
     WHERE NOT EXISTS (SELECT FROM baton.steps s WHERE s.step_id = d.step_id AND s.lease_token = d.token
                          AND s.status = 'running');
    IF n > 0 THEN RAISE EXCEPTION 'crash.sh: % durable claims were lost', n; END IF;

    SELECT count(*) INTO n FROM kept k WHERE k.i <= 10 AND NOT k.held;
    IF n > 0 THEN RAISE EXCEPTION 'crash.sh: % claims made before the heartbeat were lost', n; END IF;

    SELECT count(*) INTO n FROM kept k WHERE k.held
       AND EXISTS (SELECT FROM kept l WHERE NOT l.held AND l.i < k.i);
    IF n > 0 THEN RAISE EXCEPTION 'crash.sh: % claims survived a claim made before them that was lost', n; END IF;

    SELECT count(*) INTO n FROM kept k JOIN baton.steps s ON s.step_id = k.step_id
      JOIN baton.runs r ON r.id = s.run_id
     WHERE NOT k.held AND NOT (s.status = 'ready' AND s.lease_token IS NULL AND s.worker IS NULL
                               AND s.attempt = 0 AND r.status = 'pending');
    IF n > 0 THEN RAISE EXCEPTION 'crash.sh: % lost claims left something behind', n; END IF;

    FOR t IN SELECT * FROM kept WHERE NOT held LOOP
        BEGIN
            PERFORM baton.complete_step(t.step_id, t.token, '{"late": true}');
            RAISE EXCEPTION 'crash.sh: step % completed under a lost claim', t.step_id;
        EXCEPTION WHEN SQLSTATE 'BT001' THEN
            refused := refused + 1;
        END;
    END LOOP;
    FOR t IN SELECT step_id, token FROM durable UNION ALL SELECT step_id, token FROM kept WHERE held LOOP
        IF baton.complete_step(t.step_id, t.token, '{}') <> 'succeeded' THEN
            RAISE EXCEPTION 'crash.sh: step % did not finish its run', t.step_id;
        END IF;
    END LOOP;
    RAISE NOTICE 'crash.sh: % of 20 asynchronous claims were lost, % late completions refused with BT001',
        (SELECT count(*) FROM kept WHERE NOT held), refused;
END \$\$;
SQL

# The lost steps and the rest are claimed again, and every run finishes.
run_sql -At <<'SQL'
\set ON_ERROR_STOP 1
SELECT count(baton.complete_step(c.step_id, c.lease_token, '{}'))
  FROM baton.claim_steps('crash-test-2', ARRAY['crash'], 100) c \g /dev/null
DO $$
BEGIN
    IF (SELECT count(*) FILTER (WHERE status = 'succeeded') FROM baton.runs) <> 40
       OR EXISTS (SELECT FROM baton.steps WHERE (lease_token IS NOT NULL) <> (status = 'running')) THEN
        RAISE EXCEPTION 'crash.sh: not every run finished after the crash';
    END IF;
END $$;
SQL
echo "crash.sh: passed"
