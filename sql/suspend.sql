-- suspend_step: code-first sleep and wait. A worker gives its lease back
-- without using up the attempt; the step waits (status 'waiting') until
-- `until` passes, `timeout` passes, or `event` arrives, whichever is first,
-- and is then ready again for any worker, with its checkpoints (an event's
-- payload, or its timeout, in checkpoint "event:<name>": sql/event.sql).
CREATE FUNCTION suspend_step(step_id bigint, lease_token uuid, until timestamptz DEFAULT NULL,
                             event text DEFAULT NULL, timeout interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    run uuid;
    s baton.steps;
    taken record;
    wake timestamptz;
BEGIN
    PERFORM baton._require(suspend_step.step_id, 'step_id');
    PERFORM baton._require(suspend_step.lease_token, 'lease_token');
    IF suspend_step.until IS NULL AND suspend_step.event IS NULL THEN
        RAISE EXCEPTION 'suspend_step needs until or event (or both)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF suspend_step.event IS NOT NULL AND btrim(suspend_step.event) = '' THEN
        RAISE EXCEPTION 'event must be a non-empty event name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(suspend_step.event, 'event');
    IF suspend_step.timeout IS NOT NULL AND suspend_step.event IS NULL THEN
        RAISE EXCEPTION 'timeout is for waiting for an event: give event too (or until alone)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_interval(suspend_step.timeout, 'timeout');
    IF suspend_step.until IN ('infinity', '-infinity') THEN
        RAISE EXCEPTION 'until must be a finite time, got %', suspend_step.until USING ERRCODE = 'invalid_parameter_value';
    END IF;

    run := baton._run_of(suspend_step.step_id);
    IF run IS NULL THEN
        PERFORM baton._lease_lost(suspend_step.step_id);
    END IF;
    PERFORM baton._lock_run(run);
    SELECT * INTO s FROM baton.steps t
     WHERE t.run_id = run AND t.step_id = suspend_step.step_id AND t.lease_token = suspend_step.lease_token
       FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM baton._lease_lost(suspend_step.step_id);
    END IF;

    -- the lease ends; the attempt is given back, as by release_step
    UPDATE baton.steps t
       SET status = 'waiting', attempt = t.attempt - 1, worker = NULL, lease_token = NULL, lease_expires_at = NULL,
           run_at = 'infinity', wait_for = suspend_step.event
     WHERE t.run_id = s.run_id AND t.step_no = s.step_no
    RETURNING * INTO s;

    IF suspend_step.event IS NOT NULL THEN
        taken := baton._take_event(s.run_id, suspend_step.event, s.step_id);
        IF taken.taken THEN
            PERFORM baton._wake_suspended(s, suspend_step.event, taken.payload, false);
            RETURN;
        END IF;
    END IF;
    wake := least(suspend_step.until, now() + suspend_step.timeout);  -- NULLs aside
    IF wake IS NOT NULL THEN
        UPDATE baton.steps t SET run_at = wake WHERE t.run_id = s.run_id AND t.step_no = s.step_no;
        PERFORM baton._wake_scheduler(wake);
    END IF;
END $$;
