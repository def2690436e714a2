-- define_workflow and the fields of the step kinds (sleep, sleep_until,
-- wait_event, on_timeout, workflow, map) and a definition's "timeout": each
-- problem is a 22023 whose message names the step and the field.

CREATE FUNCTION pg_temp.define(def text) RETURNS text
LANGUAGE sql AS $$ SELECT sqlstate_of(format('SELECT baton.define_workflow(%L, %L)', 'sk_flow', def)) $$;

SELECT baton.define_workflow('sk_child', '{"steps": [{"name": "c"}]}');

-- What is accepted, and the normalized form: kind, its field, on_timeout's
-- default, map's source (the position of the step it maps over), start
-- (the root steps that are not tasks).
SELECT baton.define_workflow('sk_ok', $${"timeout": "1 day", "steps": [
    {"name": "nap", "sleep": "3 days"},
    {"name": "until", "sleep_until": "$.input.at"},
    {"name": "approve", "wait_event": "approved", "timeout": "2 days"},
    {"name": "maybe", "wait_event": "maybe", "timeout": "1 hour", "on_timeout": "continue"},
    {"name": "pay", "after": ["nap"], "workflow": "sk_child", "timeout": "1 hour"},
    {"name": "split", "after": ["nap"]},
    {"name": "each", "after": ["split"], "map": "split"},
    {"name": "task", "after": ["each"]}]}$$);
SELECT definition -> 'timeout' AS timeout, definition -> 'start' AS start FROM baton.workflows WHERE name = 'sk_ok';
SELECT s ->> 'name' AS step, s ->> 'kind' AS kind, s - ARRAY['name', 'kind', 'after', 'queue', 'max_attempts', 'backoff',
       'upstream', 'downstream', 'timeout'] AS kind_fields, s -> 'timeout' AS timeout
  FROM baton.workflows w, jsonb_array_elements(w.definition -> 'steps') s WHERE w.name = 'sk_ok';

-- Two kinds in one step.
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep": "1 hour", "wait_event": "e"}]}') AS sleep_and_wait;
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep": "1 hour", "sleep_until": "$.input.at"}]}') AS sleep_and_until;
SELECT pg_temp.define('{"steps": [{"name": "a"}, {"name": "x", "after": ["a"], "map": "a", "workflow": "sk_child"}]}') AS workflow_and_map;
-- A bad sleep interval.
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep": "soon"}]}') AS not_an_interval;
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep": "-1 hour"}]}') AS negative;
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep": "0 seconds"}]}') AS zero;
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep": "11 years"}]}') AS too_long;
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep": 3600}]}') AS not_a_string;
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep": ""}]}') AS empty;
-- A bad JSON path.
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep_until": "$.input.["}]}') AS bad_path;
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep_until": 5}]}') AS path_not_a_string;
-- A child workflow that leads back to the workflow itself: every run would
-- start another without end (there are no conditions), so it is refused,
-- directly or through other workflows.
SELECT pg_temp.define('{"steps": [{"name": "x", "workflow": "sk_flow"}]}') AS starts_itself;
SELECT baton.define_workflow('sk_cycle_b', '{"steps": [{"name": "b"}]}');
SELECT baton.define_workflow('sk_cycle_a', '{"steps": [{"name": "a", "workflow": "sk_cycle_b"}]}');
SELECT sqlstate_of($$SELECT baton.define_workflow('sk_cycle_b', '{"steps": [{"name": "b", "workflow": "sk_cycle_a"}]}')$$) AS cycle_through_another;
-- An unknown workflow.
SELECT pg_temp.define('{"steps": [{"name": "x", "workflow": "sk_missing"}]}') AS unknown_workflow;
SELECT pg_temp.define('{"steps": [{"name": "x", "workflow": ""}]}') AS empty_workflow;
-- map not in after (not a step, a step not upstream, or none at all).
SELECT pg_temp.define('{"steps": [{"name": "a"}, {"name": "x", "map": "a"}]}') AS map_not_after;
SELECT pg_temp.define('{"steps": [{"name": "a"}, {"name": "b"}, {"name": "x", "after": ["b"], "map": "a"}]}') AS map_other_step;
SELECT pg_temp.define('{"steps": [{"name": "x", "after": [], "map": "nowhere"}]}') AS map_unknown;
-- wait_event empty, on_timeout without wait_event or with a bad value.
SELECT pg_temp.define('{"steps": [{"name": "x", "wait_event": ""}]}') AS empty_event;
SELECT pg_temp.define('{"steps": [{"name": "x", "wait_event": "  "}]}') AS blank_event;
SELECT pg_temp.define(format('{"steps": [{"name": "x", "wait_event": "%s"}]}', repeat('e', 201))) AS long_event;
SELECT pg_temp.define('{"steps": [{"name": "x", "on_timeout": "continue"}]}') AS on_timeout_on_task;
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep": "1 hour", "on_timeout": "fail"}]}') AS on_timeout_on_sleep;
SELECT pg_temp.define('{"steps": [{"name": "x", "wait_event": "e", "on_timeout": "retry"}]}') AS bad_on_timeout;
-- timeout on a sleep step, and a bad timeout on the others.
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep": "1 hour", "timeout": "2 hours"}]}') AS timeout_on_sleep;
SELECT pg_temp.define('{"steps": [{"name": "x", "sleep_until": "$.input.at", "timeout": "2 hours"}]}') AS timeout_on_sleep_until;
SELECT pg_temp.define('{"steps": [{"name": "x", "wait_event": "e", "timeout": "whenever"}]}') AS bad_wait_timeout;
SELECT pg_temp.define('{"steps": [{"name": "x", "workflow": "sk_child", "timeout": "-5 minutes"}]}') AS bad_child_timeout;
-- A bad top-level timeout.
SELECT pg_temp.define('{"timeout": "whenever", "steps": [{"name": "x"}]}') AS bad_top_timeout;
SELECT pg_temp.define('{"timeout": "-1 day", "steps": [{"name": "x"}]}') AS negative_top_timeout;
SELECT pg_temp.define('{"timeout": 60, "steps": [{"name": "x"}]}') AS top_timeout_not_a_string;

-- Nothing of these was stored.
SELECT count(*) AS stored FROM baton.workflows WHERE name = 'sk_flow';
