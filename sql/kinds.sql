-- Steps that no worker runs: how each kind starts when it becomes runnable.
--
--   sleep     waits until its time (sleep, sleep_until), then succeeds (null)
--   event     waits for send_event (sql/event.sql); its payload is the output
--   workflow  starts a child run and ends with it (sql/child.sql)
--   map       makes one task per element of its source's output, and ends
--             with the array of their outputs (sql/map.sql)
--
-- Such a step is 'waiting' while it waits; run_at is when it fires by time
-- ('infinity': never), which the background worker keeps (sql/timer.sql).
-- Every transition here runs under the run's lock, like all others.

-- A step's entry in its run's own version of the definition (a new version
-- never changes runs already going). A map item's is its map step's, its
-- only downstream step (sql/map.sql).
CREATE FUNCTION _step_definition(s baton.steps) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT w.definition -> 'steps' -> CASE WHEN s.map_index IS NULL THEN s.step_no ELSE s.downstream[1] END
              FROM baton.runs r JOIN baton.workflows w ON w.name = r.workflow AND w.version = r.version
             WHERE r.id = s.run_id);
END $$;

-- Start a step that became runnable (status 'waiting', set by the caller:
-- _complete, _start_roots, the background worker after a retry's backoff).
-- The caller holds the run lock.
CREATE FUNCTION _activate(run_id uuid, step_no integer) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    s baton.steps;
    def jsonb;
BEGIN
    SELECT * INTO s FROM baton.steps t WHERE t.run_id = run_id AND t.step_no = step_no FOR UPDATE;
    IF NOT FOUND OR s.status <> 'waiting' OR s.kind = 'task' THEN
        RETURN;
    END IF;
    def := baton._step_definition(s);
    CASE s.kind
        WHEN 'sleep' THEN PERFORM baton._start_sleep(s, def);
        WHEN 'event' THEN PERFORM baton._start_wait(s, def);
        WHEN 'workflow' THEN PERFORM baton._start_child(s, def);
        WHEN 'map' THEN
            -- (items come after the definition's steps: the probe is short)
            IF EXISTS (SELECT FROM baton.steps i WHERE i.run_id = s.run_id AND i.map_index IS NOT NULL
                                                   AND i.downstream = ARRAY[s.step_no]) THEN
                PERFORM baton._finish_map(s);  -- its items are done
            ELSE
                PERFORM baton._start_map(s, def);
            END IF;
    END CASE;
END $$;

-- A waiting step succeeds with `output`, as complete_step would: what
-- follows it becomes runnable and its run may finish. It gets a lease of
-- its own for the moment, so that _complete can finish it like any other.
CREATE FUNCTION _succeed_step(run_id uuid, step_no integer, output jsonb) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    id bigint;
    token uuid;
BEGIN
    UPDATE baton.steps t SET lease_token = gen_random_uuid(), wait_for = NULL
     WHERE t.run_id = run_id AND t.step_no = step_no
    RETURNING t.step_id, t.lease_token INTO id, token;
    PERFORM baton._complete(ARRAY[id], ARRAY[token], ARRAY[output], NULL, NULL, 0, NULL);
END $$;

-- The document that a step's JSON paths and a child run's input are made
-- of: {"input": run input, "upstream": {direct upstream step: output}}.
CREATE FUNCTION _step_document(s baton.steps) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN jsonb_build_object(
        'input', (SELECT r.input FROM baton.runs r WHERE r.id = s.run_id),
        'upstream', coalesce((SELECT jsonb_object_agg(u.name, u.output) FROM baton.steps u
                               WHERE u.run_id = s.run_id AND u.step_no = ANY (s.upstream)), '{}'));
END $$;

-- An attempt of a step that no worker runs begins (and so its run, if it
-- had not). Returns the step as it is now.
CREATE FUNCTION _begin_attempt(s baton.steps, wake_at timestamptz, wait_for text DEFAULT NULL) RETURNS baton.steps
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE baton.steps t
       SET attempt = t.attempt + 1, started_at = now(), run_at = wake_at, wait_for = _begin_attempt.wait_for,
           worker = NULL, error = NULL
     WHERE t.run_id = s.run_id AND t.step_no = s.step_no
    RETURNING * INTO s;
    -- the run is under way, as when a worker claims its first step
    UPDATE baton.runs r SET status = 'running', started_at = now() WHERE r.id = s.run_id AND r.status = 'pending';
    IF wake_at < 'infinity' THEN
        PERFORM baton._wake_scheduler(wake_at);
    END IF;
    RETURN s;
END $$;

-- A sleep: "sleep" (an interval from now) or "sleep_until" (a JSON path to
-- a timestamp in the step's document). A time already past succeeds now.
CREATE FUNCTION _start_sleep(s baton.steps, def jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    wake timestamptz;
    found jsonb;
BEGIN
    IF def ? 'sleep' THEN
        wake := now() + (def ->> 'sleep')::interval;
    ELSE
        found := jsonb_path_query_first(baton._step_document(s), (def ->> 'sleep_until')::jsonpath);
        -- only a JSON string is a timestamp text: the text of an object or
        -- an array can parse too ('{"at": "2000-01-01"}' is 2000-01-01)
        IF jsonb_typeof(found) = 'string' THEN
            BEGIN
                wake := (found #>> '{}')::timestamptz;
            EXCEPTION WHEN OTHERS THEN
                wake := NULL;
            END;
        END IF;
        IF wake IS NULL OR wake = 'infinity' OR wake = '-infinity' THEN
            PERFORM baton._end_attempt(baton._begin_attempt(s, 'infinity'), 'failed',
                format('sleep_until: %s is %s, not a timestamp', def ->> 'sleep_until',
                       coalesce(found::text, 'missing')), false);
            RETURN;
        END IF;
    END IF;
    IF wake <= now() THEN
        PERFORM baton._begin_attempt(s, 'infinity');
        PERFORM baton._succeed_step(s.run_id, s.step_no, NULL);
    ELSE
        PERFORM baton._begin_attempt(s, wake);
    END IF;
END $$;
