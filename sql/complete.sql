-- Finishing an attempt: complete_step and fail_step.
--
-- Lock order, everywhere a transition touches more than one row of a run: the
-- run's advisory lock, then step rows, then the run row. Claims only take step
-- rows then the run row, so no two transitions can wait on each other in a cycle.

-- The run that a step belongs to, or NULL. A plain index probe, no lock.
CREATE FUNCTION _run_of(step_id bigint) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT s.run_id FROM baton.steps s WHERE s.step_id = _run_of.step_id);
END $$;

-- Complete one leased step; NULL when the lease is not held (nothing changes).
-- Otherwise returns the run's status after it. After one index probe to find
-- the run (for its lock), it is one statement: the step succeeds, its attempt
-- is recorded, downstream steps whose upstreams have all succeeded become
-- ready (primary-key probes by step_no), and the run is counted down; the
-- last step makes it succeed with output {leaf step: output}.
CREATE FUNCTION _complete(step_id bigint, lease_token uuid, output jsonb)
RETURNS text
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    run uuid;
    run_status text;
    notified integer;
BEGIN
    SELECT s.run_id INTO run FROM baton.steps s WHERE s.step_id = _complete.step_id;
    IF run IS NULL OR _complete.lease_token IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM baton._lock_run(run);

    WITH done AS (
        UPDATE baton.steps t
           SET status = 'succeeded', output = _complete.output, finished_at = now(),
               lease_token = NULL, lease_expires_at = NULL, error = NULL
         WHERE t.run_id = run AND t.step_id = _complete.step_id
           AND t.lease_token = _complete.lease_token AND t.status = 'running'
        RETURNING t.run_id, t.step_id, t.attempt, t.name, t.worker, t.started_at, t.downstream
    ), history AS (
        INSERT INTO baton.attempts (run_id, step_id, attempt, step, worker, started_at, outcome)
        SELECT d.run_id, d.step_id, d.attempt, d.name, d.worker, d.started_at, 'succeeded' FROM done d
    ), unblocked AS (
        UPDATE baton.steps n
           SET waiting_on = n.waiting_on - 1,
               status = CASE WHEN n.waiting_on = 1 THEN 'ready' ELSE 'blocked' END,
               run_at = greatest(n.run_at, now())
          FROM done d
         WHERE n.run_id = d.run_id AND n.step_no = ANY (d.downstream) AND n.status = 'blocked'
        RETURNING n.queue, n.status
    ), counted AS (
        -- The statement does not see its own step update, so the completing
        -- step's output joins the other leaves' explicitly.
        UPDATE baton.runs r
           SET steps_left = r.steps_left - 1,
               status = CASE WHEN r.steps_left = 1 THEN 'succeeded' ELSE r.status END,
               finished_at = CASE WHEN r.steps_left = 1 THEN now() END,
               output = CASE WHEN r.steps_left = 1 THEN
                            coalesce((SELECT jsonb_object_agg(l.name, l.output) FROM baton.steps l
                                       WHERE l.run_id = r.id AND l.downstream = '{}' AND l.step_id <> d.step_id), '{}')
                            || CASE WHEN d.downstream = '{}' THEN jsonb_build_object(d.name, _complete.output)
                                    ELSE '{}' END
                        END
          FROM done d
         WHERE r.id = d.run_id
        RETURNING r.status
    )
    SELECT c.status,
           (SELECT count(*) FROM (SELECT pg_notify('baton_ready', q.queue)
                                    FROM (SELECT DISTINCT u.queue FROM unblocked u WHERE u.status = 'ready') q) x)
      INTO run_status, notified
      FROM counted c;
    RETURN run_status;  -- NULL when the lease was not held
END $$;

CREATE FUNCTION complete_step(step_id bigint, lease_token uuid, output jsonb DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    run_status text := baton._complete(step_id, lease_token, output);
BEGIN
    IF run_status IS NULL THEN
        PERFORM baton._lease_lost(step_id);
    END IF;
    RETURN run_status;
END $$;

-- Complete many steps in one transaction (one commit for all). A step whose
-- lease is not held is reported as 'lease_lost' and left unchanged; the others
-- complete. Returns each step's outcome: the run's status, or 'lease_lost'.
CREATE FUNCTION complete_steps(step_ids bigint[], lease_tokens uuid[], outputs jsonb[] DEFAULT NULL)
RETURNS TABLE(step_id bigint, status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    i integer;
BEGIN
    IF cardinality(step_ids) IS DISTINCT FROM cardinality(lease_tokens)
       OR (outputs IS NOT NULL AND cardinality(outputs) <> cardinality(step_ids)) THEN
        RAISE EXCEPTION 'step_ids, lease_tokens and outputs must have the same length'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(step_ids), 0) LOOP
        step_id := step_ids[i];
        status := coalesce(baton._complete(step_ids[i], lease_tokens[i], outputs[i]), 'lease_lost');
        RETURN NEXT;
    END LOOP;
END $$;

-- A worker's whole turn in one round trip and one commit: complete the steps
-- it finished, then claim up to max_steps more (as claim_steps). Completions
-- whose lease was lost change nothing and are skipped (a NOTICE names them).
CREATE FUNCTION complete_and_claim(
    step_ids bigint[],
    lease_tokens uuid[],
    outputs jsonb[],
    worker text,
    queues text[] DEFAULT ARRAY['default'],
    max_steps integer DEFAULT 1,
    lease interval DEFAULT '30 seconds'
) RETURNS TABLE(
    step_id bigint, lease_token uuid, workflow_id uuid, workflow text, step text, attempt integer,
    input jsonb, upstream jsonb, checkpoints jsonb, lease_expires_at timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    lost bigint[];
BEGIN
    SELECT array_agg(c.step_id) INTO lost
      FROM baton.complete_steps(step_ids, lease_tokens, outputs) c WHERE c.status = 'lease_lost';
    IF lost IS NOT NULL THEN
        RAISE NOTICE 'pg_baton: lease lost, not completed: steps %', lost;
    END IF;
    IF max_steps > 0 THEN
        RETURN QUERY SELECT * FROM baton.claim_steps(worker, queues, max_steps, lease);
    END IF;
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
