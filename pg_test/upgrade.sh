#!/usr/bin/env bash
# ALTER EXTENSION pg_baton UPDATE from every released version (sql/released/),
# with runs in flight.
#
#   pg_test/upgrade.sh HOST PORT
#
# For each released version OLD, in two fresh databases of a running server
# (pg_baton installed, with sql/released/ copied to the extension directory
# by scripts/lib.sh):
#   baton_upgrade_old: CREATE EXTENSION pg_baton VERSION 'OLD', runs left in
#       every state a step can be in (running under a lease, delayed, blocked,
#       ready, retrying after a failure), then ALTER EXTENSION pg_baton UPDATE;
#   baton_upgrade_new: CREATE EXTENSION pg_baton (the current version).
# Checks that both have the same catalog (every function's definition and
# settings, column, index, constraint, view, type and privilege of schema baton), that
# the lease taken under OLD is still held (its token completes the step, a
# stale one is refused with BT001), and that every run then finishes.
set -euo pipefail
HOST=$1 PORT=$2
PSQL=(psql -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PORT" -U postgres)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
fail() { echo "upgrade test FAILED (from $from): $*" >&2; exit 1; }

upgrade_from() {
from=$1

for db in baton_upgrade_old baton_upgrade_new; do
    PGOPTIONS="-c client_min_messages=warning" "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
done
"${PSQL[@]}" -d baton_upgrade_new -c "CREATE EXTENSION pg_baton"
current=$("${PSQL[@]}" -At -d baton_upgrade_new -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_baton'")

old=("${PSQL[@]}" -d baton_upgrade_old)
"${old[@]}" -c "CREATE EXTENSION pg_baton VERSION '$from'"
# Runs in flight under the old version.
"${old[@]}" >/dev/null <<'SQL'
SELECT baton.define_workflow('chain', '{"steps": [{"name": "a"}, {"name": "b", "after": ["a"]}]}');
SELECT baton.define_workflow('flaky', '{"queue": "flaky", "steps": [{"name": "x", "max_attempts": 3,
    "backoff": {"initial": "1 second", "max": "1 second", "multiplier": 1}}]}');
SELECT baton.enqueue_workflow('chain', '{"n": 1}', 'leased');          -- a running, b blocked
SELECT baton.enqueue_workflow('chain', '{"n": 2}', 'waiting');         -- a ready
SELECT baton.enqueue_workflow('chain', '{"n": 3}', 'delayed', run_at => now() + interval '1 second');
SELECT baton.enqueue_workflow('flaky', '{}', 'retrying');              -- x failed once, backoff
CREATE TABLE lease AS
SELECT c.step_id, c.lease_token FROM baton.claim_steps('old-worker', max_steps => 1) c;
CREATE TABLE failed AS
SELECT c.step_id, c.lease_token, baton.fail_step(c.step_id, c.lease_token, 'boom') AS result
  FROM baton.claim_steps('old-worker', ARRAY['flaky']) c;
SQL
[ "$("${old[@]}" -At -c "SELECT result FROM failed")" = retrying ] || fail "the flaky step did not go to retrying under $from"

"${old[@]}" -c "ALTER EXTENSION pg_baton UPDATE"
[ "$("${old[@]}" -At -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_baton'")" = "$current" ] \
    || fail "ALTER EXTENSION UPDATE did not reach $current"

# The catalog of schema baton, one line per object, in a stable order.
catalog() {
    "${PSQL[@]}" -At -d "$1" <<'SQL'
SELECT line FROM (
    SELECT 'function ' || p.oid::regprocedure::text || E'\n' || pg_get_functiondef(p.oid) AS line
      FROM pg_proc p WHERE p.pronamespace = 'baton'::regnamespace
    UNION ALL
    SELECT format('column %s.%s #%s %s not null %s default %s', c.relname, a.attname, a.attnum,
                  format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE c.relnamespace = 'baton'::regnamespace AND c.relkind IN ('r', 'v') AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT format('relation %s kind %s options %s', c.relname, c.relkind, c.reloptions)
      FROM pg_class c WHERE c.relnamespace = 'baton'::regnamespace AND c.relkind IN ('r', 'v', 'S')
    UNION ALL
    -- who may call and read what (sql/privileges.sql)
    SELECT format('acl of function %s: %s', p.oid::regprocedure, p.proacl)
      FROM pg_proc p WHERE p.pronamespace = 'baton'::regnamespace
    UNION ALL
    SELECT format('acl of relation %s: %s', c.relname, c.relacl)
      FROM pg_class c WHERE c.relnamespace = 'baton'::regnamespace AND c.relkind IN ('r', 'v', 'S')
    UNION ALL
    SELECT format('acl of schema baton: %s', n.nspacl) FROM pg_namespace n WHERE n.nspname = 'baton'
    UNION ALL
    SELECT 'index ' || pg_get_indexdef(i.indexrelid)
      FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'baton'::regnamespace
    UNION ALL
    SELECT format('constraint %s on %s: %s', o.conname, o.conrelid::regclass, pg_get_constraintdef(o.oid))
      FROM pg_constraint o WHERE o.connamespace = 'baton'::regnamespace
    UNION ALL
    SELECT format('view %s: %s', c.relname, pg_get_viewdef(c.oid))
      FROM pg_class c WHERE c.relnamespace = 'baton'::regnamespace AND c.relkind = 'v'
    UNION ALL
    SELECT format('type %s: %s', t.typname, (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                                               FROM pg_enum e WHERE e.enumtypid = t.oid))
      FROM pg_type t WHERE t.typnamespace = 'baton'::regnamespace AND t.typtype = 'e'
    UNION ALL
    SELECT 'extension member ' || pg_describe_object(d.classid, d.objid, 0)
      FROM pg_depend d JOIN pg_extension x ON x.oid = d.refobjid
     WHERE x.extname = 'pg_baton' AND d.deptype = 'e') l
ORDER BY line;
SQL
}
catalog baton_upgrade_old > "$OUT/upgraded"
catalog baton_upgrade_new > "$OUT/fresh"
if ! diff -u "$OUT/fresh" "$OUT/upgraded" > "$OUT/diff"; then
    cat "$OUT/diff" >&2
    fail "the upgraded catalog differs from a fresh install of $current (- fresh, + upgraded)"
fi

# The runs go on under the current version.
"${old[@]}" >/dev/null <<'SQL'
-- the delayed root and the backoff became scheduled steps
DO $$ BEGIN
    IF (SELECT count(*) FROM baton.workflow_steps WHERE status = 'scheduled') <> 2 THEN
        RAISE EXCEPTION 'expected 2 scheduled steps after the upgrade, got %',
            (SELECT string_agg(step || ':' || status, ', ') FROM baton.workflow_steps);
    END IF;
END $$;
-- a stale token is refused, the lease taken under 0.1.0 is still held
DO $$ BEGIN
    PERFORM baton.complete_step((SELECT step_id FROM lease), gen_random_uuid());
    RAISE EXCEPTION 'a wrong token was accepted';
EXCEPTION WHEN SQLSTATE 'BT001' THEN NULL;
END $$;
SELECT baton.complete_step(step_id, lease_token, '{"done": 1}') FROM lease;
SQL
# Claim and complete until every run has finished (the scheduled steps come
# due within a few seconds; _tick makes them ready, as the background worker
# would in its database).
for _ in $(seq 1 100); do
    left=$("${old[@]}" -At <<'SQL'
SELECT baton._tick() IS NOT NULL;
SELECT count(baton.complete_step(c.step_id, c.lease_token, '{}'))
  FROM baton.claim_steps('new-worker', ARRAY['default', 'flaky'], max_steps => 10) c;
SELECT count(*) FROM baton.runs WHERE status NOT IN ('succeeded', 'failed', 'cancelled');
SQL
)
    left=$(echo "$left" | tail -1)
    [ "$left" = 0 ] && break
    sleep 0.1
done
[ "$left" = 0 ] || fail "$left run(s) did not finish after the upgrade"
[ "$("${old[@]}" -At -c "SELECT string_agg(status, ',' ORDER BY status) FROM baton.workflow_runs")" = "succeeded,succeeded,succeeded,succeeded" ] \
    || fail "not every run succeeded: $("${old[@]}" -At -c "SELECT string_agg(idempotency_key || ':' || status, ', ') FROM baton.workflow_runs")"

for db in baton_upgrade_old baton_upgrade_new; do
    "${PSQL[@]}" -d postgres -c "DROP DATABASE $db WITH (FORCE)"
done
echo "upgrade from $from to $current passed"
}

for released in "$(dirname "$0")"/../sql/released/pg_baton--*.sql; do
    version=${released##*--}
    upgrade_from "${version%.sql}"
done
