-- Map fan-out: a "map" step runs once per element of its source step's
-- output (a JSON array). Each element is a map item: a task step of its own
-- (same name, queue and retry rules as the map step), claimed by workers like
-- any step, with map_index and map_item in its claim. The map step waits on
-- a counter (waiting_on), not on an edge per item: each item's only
-- downstream step is the map step, so completing an item counts down by the
-- same statement that unblocks any step (sql/complete.sql).

-- The map step is reached: one item per element, inserted in one statement
-- (keyed by the run and a step_no after the definition's steps), or success
-- at once with [] for an empty array.
CREATE FUNCTION _start_map(s baton.steps, def jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    source integer := (def ->> 'source')::integer;
    elements jsonb;
    n integer;
    base integer;
BEGIN
    SELECT u.output INTO elements FROM baton.steps u WHERE u.run_id = s.run_id AND u.step_no = source;
    IF jsonb_typeof(elements) IS DISTINCT FROM 'array' THEN
        PERFORM baton._end_attempt(baton._begin_attempt(s, 'infinity'), 'failed',
            format('map: the output of "%s" is %s, not a JSON array', def ->> 'map', coalesce(jsonb_typeof(elements), 'null')),
            false);
        RETURN;
    END IF;
    -- (s keeps the step's run_at, the run's start, which the items take)
    PERFORM baton._begin_attempt(s, 'infinity');
    n := jsonb_array_length(elements);
    IF n = 0 THEN
        PERFORM baton._succeed_step(s.run_id, s.step_no, '[]');
        RETURN;
    END IF;
    SELECT max(t.step_no) INTO base FROM baton.steps t WHERE t.run_id = s.run_id;
    INSERT INTO baton.steps (run_id, step_no, name, status, upstream, downstream, waiting_on, queue, priority, run_at,
                             max_attempts, timeout, kind, map_index, map_item, flow_key)
    SELECT s.run_id, base + e.i::integer, s.name, 'ready', array_remove(s.upstream, source), ARRAY[s.step_no], 0,
           s.queue, s.priority, s.run_at, s.max_attempts, s.timeout, 'task', e.i::integer - 1, e.v, s.flow_key
      FROM jsonb_array_elements(elements) WITH ORDINALITY AS e(v, i)
     ORDER BY e.i;  -- step ids in element order: claimed in that order
    UPDATE baton.steps t SET waiting_on = n WHERE t.run_id = s.run_id AND t.step_no = s.step_no;
    PERFORM pg_notify('baton_ready', s.queue);
END $$;

-- Every item succeeded: the map step succeeds with their outputs, in
-- element order.
CREATE FUNCTION _finish_map(s baton.steps) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._succeed_step(s.run_id, s.step_no,
        (SELECT coalesce(jsonb_agg(i.output ORDER BY i.map_index), '[]') FROM baton.steps i
          WHERE i.run_id = s.run_id AND i.map_index IS NOT NULL AND i.downstream = ARRAY[s.step_no]));
END $$;
