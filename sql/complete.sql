-- Finishing an attempt: complete_step and fail_step.
--
-- Lock order, everywhere a transition touches more than one row of a run: the
-- run's advisory lock, then step rows, then the run row. Claims only take step
-- rows then the run row, so no two transitions can wait on each other in a cycle.

-- The run that a step belongs to, or NULL. A plain index probe, no lock.
CREATE FUNCTION _run_of(step_id bigint) RETURNS uuid
LANGUAGE sql STABLE AS $$
    SELECT s.run_id FROM baton.steps s WHERE s.step_id = _run_of.step_id
$$;

CREATE FUNCTION complete_step(step_id bigint, lease_token uuid, output jsonb DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    run uuid := baton._run_of(complete_step.step_id);
    s baton.steps;
    run_status text;
    notified integer;
BEGIN
    IF run IS NULL OR complete_step.lease_token IS NULL THEN
        PERFORM baton._lease_lost(complete_step.step_id);
    END IF;
    PERFORM baton._lock_run(run);

    UPDATE baton.steps t
       SET status = 'succeeded', output = complete_step.output, finished_at = now(),
           lease_token = NULL, lease_expires_at = NULL, error = NULL
     WHERE t.run_id = run AND t.step_id = complete_step.step_id
       AND t.lease_token = complete_step.lease_token AND t.status = 'running'
    RETURNING t.* INTO s;
    IF NOT FOUND THEN
        PERFORM baton._lease_lost(complete_step.step_id);
    END IF;

    INSERT INTO baton.attempts (run_id, step_id, attempt, step, worker, started_at, outcome)
    VALUES (s.run_id, s.step_id, s.attempt, s.name, s.worker, s.started_at, 'succeeded');

    -- Downstream steps whose last unfinished upstream this was become ready.
    WITH unblocked AS (
        UPDATE baton.steps d
           SET waiting_on = d.waiting_on - 1,
               status = CASE WHEN d.waiting_on = 1 THEN 'ready' ELSE 'blocked' END,
               run_at = greatest(d.run_at, now())
         WHERE d.run_id = s.run_id AND d.status = 'blocked' AND s.name = ANY (d.after)
        RETURNING d.queue, d.status)
    SELECT count(*) INTO notified
      FROM (SELECT pg_notify('baton_ready', q.queue)
              FROM (SELECT DISTINCT u.queue FROM unblocked u WHERE u.status = 'ready') q) n;

    -- The run succeeds with its last step; its output is {leaf step: output}.
    UPDATE baton.runs r
       SET steps_left = r.steps_left - 1,
           status = CASE WHEN r.steps_left = 1 THEN 'succeeded' ELSE r.status END,
           finished_at = CASE WHEN r.steps_left = 1 THEN now() END,
           output = CASE WHEN r.steps_left = 1 THEN (
                       SELECT jsonb_object_agg(l.name, l.output) FROM baton.steps l
                        WHERE l.run_id = r.id
                          AND NOT EXISTS (SELECT 1 FROM baton.steps d
                                           WHERE d.run_id = r.id AND l.name = ANY (d.after)))
                    END
     WHERE r.id = s.run_id
    RETURNING r.status INTO run_status;
    RETURN run_status;
END $$;

CREATE FUNCTION fail_step(step_id bigint, lease_token uuid, error text, retryable boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    run uuid := baton._run_of(fail_step.step_id);
    s baton.steps;
    result text;
BEGIN
    PERFORM baton._require(fail_step.error, 'error');
    IF run IS NULL OR fail_step.lease_token IS NULL THEN
        PERFORM baton._lease_lost(fail_step.step_id);
    END IF;
    PERFORM baton._lock_run(run);

    SELECT * INTO s FROM baton.steps t
     WHERE t.run_id = run AND t.step_id = fail_step.step_id
       AND t.lease_token = fail_step.lease_token AND t.status = 'running'
       FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM baton._lease_lost(fail_step.step_id);
    END IF;

    result := baton._end_attempt(s, 'failed', fail_step.error, coalesce(fail_step.retryable, true));
    IF result = 'retrying' THEN
        PERFORM baton._notify_ready(s.run_id);
    END IF;
    RETURN result;
END $$;
