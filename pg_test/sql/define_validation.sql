-- baton.define_workflow: versioning, normalized defaults, and rejection of bad
-- definitions. Every rejection is SQLSTATE 22023 with a message naming the step
-- (when there is one) and the field; NULL arguments are 22004.

-- Versions are numbered per workflow name: 1, 2, ...
SELECT baton.define_workflow('dv_versions', '{"steps": [{"name": "a"}]}');
SELECT baton.define_workflow('dv_versions', '{"steps": [{"name": "a"}, {"name": "b", "after": ["a"]}]}');
SELECT baton.define_workflow('dv_versions', '{"steps": [{"name": "a"}]}');
SELECT baton.define_workflow('dv_other', '{"steps": [{"name": "a"}]}');
SELECT name, version, jsonb_array_length(definition -> 'steps') AS steps
  FROM baton.workflows WHERE name LIKE 'dv\_%' ORDER BY name, version;

-- Defaults: queue 'default', after [], max_attempts 3, the default backoff, no timeout.
SELECT baton.define_workflow('dv_defaults', '{"steps": [{"name": "only"}]}');
SELECT w.definition ->> 'queue' AS workflow_queue, s ->> 'name' AS step, s -> 'after' AS after,
       s ->> 'queue' AS queue, s -> 'max_attempts' AS max_attempts, s -> 'timeout' AS timeout,
       s -> 'backoff' AS backoff
  FROM baton.workflows w, jsonb_array_elements(w.definition -> 'steps') s
 WHERE w.name = 'dv_defaults';

-- A definition-level queue is every step's default; a step's own queue wins.
-- Explicit settings are kept.
SELECT baton.define_workflow('dv_explicit', $${
    "queue": "dv_q",
    "description": "explicit settings",
    "steps": [
        {"name": "fetch", "description": "first"},
        {"name": "parse", "after": ["fetch"], "queue": "dv_cpu", "max_attempts": 7,
         "timeout": "5 minutes",
         "backoff": {"initial": "2 seconds", "max": "1 minute", "multiplier": 3}},
        {"name": "store", "after": ["fetch", "parse"], "max_attempts": 1000,
         "backoff": {"multiplier": 1}}
    ]}$$);
SELECT s ->> 'name' AS step, s -> 'after' AS after, s ->> 'queue' AS queue,
       s -> 'max_attempts' AS max_attempts, s -> 'timeout' AS timeout, s -> 'backoff' AS backoff
  FROM baton.workflows w, jsonb_array_elements(w.definition -> 'steps') s
 WHERE w.name = 'dv_explicit';
SELECT definition ->> 'queue' AS queue FROM baton.workflows WHERE name = 'dv_explicit';

-- NULL arguments: 22004.
SELECT sqlstate_of($$SELECT baton.define_workflow(NULL, '{"steps": [{"name": "a"}]}')$$);
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', NULL)$$);

-- The shape of the definition.
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '[]')$$) AS non_object;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '"steps"')$$) AS non_object_string;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{}')$$) AS missing_steps;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": []}')$$) AS empty_steps;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": {"name": "a"}}')$$) AS steps_not_array;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a"}], "retries": 3}')$$) AS unknown_top_level_key;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a"}], "queue": 5}')$$) AS queue_not_string;
SELECT sqlstate_of($$SELECT baton.define_workflow('', '{"steps": [{"name": "a"}]}')$$) AS empty_workflow_name;

SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', 'null')$$) AS json_null;
SELECT sqlstate_of(format('SELECT baton.define_workflow(%L, %L)', repeat('w', 201), '{"steps": [{"name": "a"}]}')) AS long_workflow_name;
-- At most 1000 steps.
SELECT sqlstate_of(format('SELECT baton.define_workflow(%L, %L)', 'dv_bad',
       jsonb_build_object('steps', (SELECT jsonb_agg(jsonb_build_object('name', 's' || i)) FROM generate_series(1, 1001) i))))
       AS too_many_steps;
SELECT baton.define_workflow('dv_big',
       jsonb_build_object('steps', (SELECT jsonb_agg(jsonb_build_object('name', 's' || i)) FROM generate_series(1, 1000) i)))
       AS thousand_steps_ok;

-- Step names: required, strings, unique.
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": ["a"]}')$$) AS step_not_object;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"after": []}]}')$$) AS missing_name;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": 5}]}')$$) AS non_string_name;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": ""}]}')$$) AS empty_name;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": " a"}]}')$$) AS padded_name;
SELECT sqlstate_of(format('SELECT baton.define_workflow(%L, %L)', 'dv_bad', jsonb_build_object('steps', jsonb_build_array(jsonb_build_object('name', repeat('s', 201)))))) AS long_name;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a"}, {"name": "b"}, {"name": "a"}]}')$$) AS duplicate_name;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a", "retries": 2}]}')$$) AS unknown_step_key;

-- Edges: after must name existing steps and must not make a cycle.
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a"}, {"name": "b", "after": ["nope"]}]}')$$) AS unknown_after;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a", "after": "b"}, {"name": "b"}]}')$$) AS after_not_array;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a"}, {"name": "b", "after": ["a", "a"]}]}')$$) AS after_twice;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a", "after": ["a"]}]}')$$) AS self_cycle;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a", "after": ["b"]}, {"name": "b", "after": ["a"]}]}')$$) AS two_cycle;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "root"}, {"name": "a", "after": ["root", "c"]}, {"name": "b", "after": ["a"]}, {"name": "c", "after": ["b"]}]}')$$) AS three_cycle;
-- The step the message names is one on the cycle, not merely downstream of it.
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "root"}, {"name": "down", "after": ["a"]}, {"name": "a", "after": ["b"]}, {"name": "b", "after": ["a"]}]}')$$)
       ~ '^22023: step "(a|b)"' AS names_a_step_on_the_cycle;

-- max_attempts: an integer from 1 to 1000.
SELECT v AS max_attempts,
       sqlstate_of(format($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a", "max_attempts": %s}]}')$$, v)) AS result
  FROM unnest(ARRAY['0', '-1', '1.5', '"3"', '1001', 'true']) AS v;

-- backoff.multiplier: a number from 1 to 1000.
SELECT v AS multiplier,
       sqlstate_of(format($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a", "backoff": {"multiplier": %s}}]}')$$, v)) AS result
  FROM unnest(ARRAY['0.5', '"x"', '0', '1001']) AS v;

-- Intervals (timeout, backoff.initial, backoff.max): positive interval texts.
SELECT v AS timeout,
       sqlstate_of(format($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a", "timeout": %s}]}')$$, v)) AS result
  FROM unnest(ARRAY['"soon"', '"-1 second"', '"0"', '30']) AS v;
SELECT v AS backoff,
       sqlstate_of(format($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a", "backoff": %s}]}')$$, v)) AS result
  FROM unnest(ARRAY['{"initial": "soon"}', '{"max": "-1 second"}', '{"initial": "0"}',
                    '{"initial": 1}', '{"initial": "2 hours"}',
                    '{"initial": "10 seconds", "max": "5 seconds"}',
                    '{"initial": "1 second", "jitter": 0.1}', '"fast"']) AS v;

-- The error names the offending step, not just the first one.
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "ok"}, {"name": "slow", "after": ["ok"], "timeout": "soon"}]}')$$) AS second_step;

-- JSON that PostgreSQL accepts but the validator cannot represent (nesting
-- past 128 levels, a number beyond double precision) is a clean 22023 too.
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', ('{"steps":' || repeat('[', 300) || repeat(']', 300) || '}')::jsonb)$$) AS too_deep;
SELECT sqlstate_of($$SELECT baton.define_workflow('dv_bad', '{"steps": [{"name": "a", "max_attempts": 1e400}]}')$$) AS too_big;

-- Nothing was stored for any rejected definition.
SELECT count(*) AS stored_bad FROM baton.workflows WHERE name = 'dv_bad' OR name = '';
