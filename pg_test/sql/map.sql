-- Map steps: "map": "split" runs once per element of split's output (a JSON
-- array). Each element is a map item: a task of the map step's name, queue
-- and retry rules, claimed with map_index (0-based) and map_item; its
-- upstream is the map step's other upstream steps. The map step succeeds
-- with the items' outputs in element order.

SELECT baton.define_workflow('mp_flow', $${"queue": "mp_q", "steps": [
    {"name": "config"},
    {"name": "split"},
    {"name": "each", "after": ["split", "config"], "map": "split", "timeout": "1 hour", "max_attempts": 2,
     "backoff": {"initial": "1 hour", "max": "1 hour", "multiplier": 1}},
    {"name": "total", "after": ["each"]}]}$$);

-- 1,000 elements.
SELECT baton.enqueue_workflow('mp_flow', '{"n": 1000}') AS r \gset
SELECT baton.complete_step(step_id, lease_token, CASE step WHEN 'config' THEN '{"factor": 3}'::jsonb
           ELSE (SELECT jsonb_agg(jsonb_build_object('n', i) ORDER BY i) FROM generate_series(1, 1000) i) END)
  FROM baton.claim_steps('w1', ARRAY['mp_q'], 2) ORDER BY step;
SELECT ws.step, ws.status, ws.kind, ws.attempt, s.waiting_on, ws.wake_at
  FROM baton.workflow_steps ws JOIN baton.steps s USING (step_id) WHERE ws.workflow_id = :'r' AND ws.map_index IS NULL
 ORDER BY step_id;
SELECT count(*) AS items, min(map_index) AS first, max(map_index) AS last, count(DISTINCT map_index) AS distinct_indexes,
       bool_and(status = 'ready') AS all_ready, bool_and(kind = 'task') AS tasks, bool_and(step = 'each') AS named_each,
       bool_and(queue = 'mp_q') AS queue_ok, bool_and(max_attempts = 2) AS attempts_ok
  FROM baton.workflow_steps WHERE workflow_id = :'r' AND map_index IS NOT NULL;
SELECT bool_and(timeout = interval '1 hour') AS timeout_ok FROM baton.steps WHERE run_id = :'r' AND map_index IS NOT NULL;
-- Claimed like any step, in element order, with the element.
CREATE TEMP TABLE items AS SELECT * FROM baton.claim_steps('w1', ARRAY['mp_q'], 1000);
SELECT count(*) AS claimed, bool_and(step = 'each') AS named_each, bool_and(attempt = 1) AS first_attempt,
       bool_and(map_item = jsonb_build_object('n', map_index + 1)) AS item_is_element,
       bool_and(upstream = '{"config": {"factor": 3}}') AS upstream_without_source,
       bool_and(input = '{"n": 1000}') AS input_ok,
       count(DISTINCT map_index) AS distinct_indexes
  FROM items;
SELECT bool_and(map_index = n - 1) AS claimed_in_element_order
  FROM (SELECT map_index, row_number() OVER (ORDER BY step_id) AS n FROM items) o;
-- Completed in reverse order, in two batches: the map step waits for all.
SELECT count(*), status FROM baton.complete_steps(
    ARRAY(SELECT step_id FROM items WHERE map_index >= 500 ORDER BY map_index DESC),
    ARRAY(SELECT lease_token FROM items WHERE map_index >= 500 ORDER BY map_index DESC),
    ARRAY(SELECT jsonb_build_object('sq', (map_item ->> 'n')::int ^ 2) FROM items WHERE map_index >= 500 ORDER BY map_index DESC))
 GROUP BY status;
SELECT status, waiting_on FROM baton.steps WHERE run_id = :'r' AND name = 'each' AND map_index IS NULL;
SELECT count(*), status FROM baton.complete_steps(
    ARRAY(SELECT step_id FROM items WHERE map_index < 500 ORDER BY map_index DESC),
    ARRAY(SELECT lease_token FROM items WHERE map_index < 500 ORDER BY map_index DESC),
    ARRAY(SELECT jsonb_build_object('sq', (map_item ->> 'n')::int ^ 2) FROM items WHERE map_index < 500 ORDER BY map_index DESC))
 GROUP BY status;
SELECT status, jsonb_array_length(output) AS outputs,
       output = (SELECT jsonb_agg(jsonb_build_object('sq', i * i) ORDER BY i) FROM generate_series(1, 1000) i) AS in_element_order,
       started_at <= finished_at AS kept_its_start  -- (counting down did not clear it)
  FROM baton.steps WHERE run_id = :'r' AND name = 'each' AND map_index IS NULL;
-- What follows gets the array.
SELECT step, jsonb_array_length(upstream -> 'each') AS outputs, upstream -> 'each' -> 0 AS first, upstream -> 'each' -> 999 AS last,
       map_index, map_item
  FROM baton.claim_steps('w1', ARRAY['mp_q']);
SELECT cancel_unfinished_runs();

-- An empty array: the map step succeeds at once with [].
SELECT baton.enqueue_workflow('mp_flow') AS r \gset
SELECT baton.complete_step(step_id, lease_token, CASE step WHEN 'config' THEN '{}'::jsonb ELSE '[]' END)
  FROM baton.claim_steps('w1', ARRAY['mp_q'], 2) ORDER BY step;
SELECT step, status, output FROM baton.workflow_steps WHERE workflow_id = :'r' ORDER BY step_id;
SELECT cancel_unfinished_runs();

-- An output that is not an array fails the map step (not retried) and the run.
CREATE TEMP TABLE bad AS
SELECT v.output, baton.enqueue_workflow('mp_flow') AS id
  FROM (VALUES ('{"a": 1}'::jsonb), ('"text"'), ('null')) v(output);
SELECT baton.complete_step(c.step_id, c.lease_token, CASE c.step WHEN 'config' THEN '{}'::jsonb ELSE b.output END)
  FROM baton.claim_steps('w1', ARRAY['mp_q'], 6) c JOIN bad b ON b.id = c.workflow_id ORDER BY c.step_id;
SELECT b.output, r.status, s.status AS map_status, s.attempt, r.error
  FROM bad b JOIN baton.runs r ON r.id = b.id JOIN baton.steps s ON s.run_id = r.id AND s.name = 'each'
 ORDER BY r.id;
SELECT count(*) AS items FROM baton.steps WHERE run_id IN (SELECT id FROM bad) AND map_index IS NOT NULL;

-- An item that fails retries with the map step's backoff (1 hour here) and
-- max_attempts; when its attempts are used up the run fails and the other
-- items are cancelled.
SELECT baton.enqueue_workflow('mp_flow') AS r \gset
SELECT baton.complete_step(step_id, lease_token, CASE step WHEN 'config' THEN '{}'::jsonb ELSE '["x", "y", "z"]' END)
  FROM baton.claim_steps('w1', ARRAY['mp_q'], 2) ORDER BY step;
SELECT baton.fail_step(step_id, lease_token, 'bad item ' || (map_item #>> '{}'))
  FROM baton.claim_steps('w1', ARRAY['mp_q'], 1);
SELECT map_index, status, attempt, run_at > now() + interval '59 minutes' AS backs_off_an_hour, error
  FROM baton.workflow_steps WHERE workflow_id = :'r' AND map_index IS NOT NULL ORDER BY map_index;
SELECT baton.complete_step(step_id, lease_token, to_jsonb(map_index)) FROM baton.claim_steps('w1', ARRAY['mp_q'], 1);
UPDATE baton.steps SET run_at = now() WHERE run_id = :'r' AND map_index = 0;
SELECT make_due();
CREATE TEMP TABLE retry AS SELECT * FROM baton.claim_steps('w1', ARRAY['mp_q'], 2);
SELECT map_index, attempt, map_item FROM retry ORDER BY map_index;
SELECT baton.fail_step(step_id, lease_token, 'bad item again') FROM retry WHERE map_index = 0;
SELECT map_index, status, attempt FROM baton.workflow_steps WHERE workflow_id = :'r' AND map_index IS NOT NULL ORDER BY map_index;
SELECT step, status FROM baton.workflow_steps WHERE workflow_id = :'r' AND map_index IS NULL ORDER BY step_id;
SELECT status, error FROM baton.runs WHERE id = :'r';
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', step_id, lease_token)) AS other_item_completes
  FROM retry WHERE map_index = 2;

-- Ordinary steps are claimed with map_index and map_item NULL.
SELECT baton.enqueue_workflow('mp_flow') AS r \gset
SELECT step, map_index, map_item FROM baton.claim_steps('w1', ARRAY['mp_q'], 2) ORDER BY step;

SELECT cancel_unfinished_runs();
