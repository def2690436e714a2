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

-- Complete many leased steps in one statement (and one commit): each step
-- succeeds and its attempt is recorded; downstream steps whose upstreams have
-- all succeeded become ready (primary-key probes by step_no); each run is
-- counted down, and the last step makes it succeed with output
-- {leaf step: output}. A step whose lease is not held is reported as
-- 'lease_lost' and nothing changes for it; the others complete. Returns one
-- row per input, in input order: the run's status after it, or 'lease_lost'.
CREATE FUNCTION complete_steps(step_ids bigint[], lease_tokens uuid[], outputs jsonb[] DEFAULT NULL)
RETURNS TABLE(step_id bigint, status text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    PERFORM baton._require(complete_steps.step_ids, 'step_ids');
    PERFORM baton._require(complete_steps.lease_tokens, 'lease_tokens');
    IF cardinality(complete_steps.step_ids) IS DISTINCT FROM cardinality(complete_steps.lease_tokens)
       OR cardinality(complete_steps.outputs) <> cardinality(complete_steps.step_ids) THEN
        RAISE EXCEPTION 'step_ids, lease_tokens and outputs must have the same length'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The runs' locks, in one global order, so that two batches never wait on
    -- each other in a cycle (see the lock order at the top of this file).
    PERFORM baton._lock_run(r.run_id)
       FROM (SELECT DISTINCT s.run_id FROM baton.steps s
              WHERE s.step_id = ANY (complete_steps.step_ids) ORDER BY s.run_id) r;

    RETURN QUERY
    WITH req AS (
        SELECT q.step_id, q.token, q.output, q.n
          FROM unnest(complete_steps.step_ids, complete_steps.lease_tokens,
                      coalesce(complete_steps.outputs, array_fill(NULL::jsonb, ARRAY[cardinality(complete_steps.step_ids)])))
               WITH ORDINALITY AS q(step_id, token, output, n)
    ), done AS (
        UPDATE baton.steps t
           SET status = 'succeeded', output = q.output, finished_at = now(),
               lease_token = NULL, lease_expires_at = NULL, error = NULL
          FROM req q
         -- A token is set exactly while the step runs (steps_lease_token_running),
         -- so the token alone says "running". "= ANY (step_ids)" keeps the
         -- lookup on steps_step_id even before the table has statistics.
         WHERE t.step_id = ANY (complete_steps.step_ids)
           AND t.step_id = q.step_id AND t.lease_token = q.token
        RETURNING t.run_id, t.step_id, t.attempt, t.name, t.worker, t.started_at, t.downstream, t.output
    ), history AS (
        INSERT INTO baton.attempts (run_id, step_id, attempt, step, worker, started_at, outcome)
        SELECT d.run_id, d.step_id, d.attempt, d.name, d.worker, d.started_at, 'succeeded' FROM done d
    ), unblocked AS (
        UPDATE baton.steps n
           SET waiting_on = n.waiting_on - x.finished,
               status = CASE WHEN n.waiting_on = x.finished THEN 'ready' ELSE 'blocked' END,
               run_at = greatest(n.run_at, now())
          FROM (SELECT d.run_id, e.step_no, count(*) AS finished
                  FROM done d, unnest(d.downstream) AS e(step_no)
                 GROUP BY d.run_id, e.step_no) x
         WHERE n.run_id = x.run_id AND n.step_no = x.step_no AND n.status = 'blocked'
        RETURNING n.queue, n.status
    ), counted AS (
        -- A statement does not see its own updates: the leaves finished here
        -- join the run's other leaves explicitly.
        UPDATE baton.runs r
           SET steps_left = r.steps_left - c.finished,
               status = CASE WHEN r.steps_left = c.finished THEN 'succeeded' ELSE r.status END,
               finished_at = CASE WHEN r.steps_left = c.finished THEN now() END,
               output = CASE WHEN r.steps_left = c.finished THEN
                            coalesce((SELECT jsonb_object_agg(l.name, l.output) FROM baton.steps l
                                       WHERE l.run_id = r.id AND l.downstream = '{}'
                                         AND l.step_id <> ALL (c.step_ids)), '{}') || c.leaves
                        END
          FROM (SELECT d.run_id, count(*) AS finished, array_agg(d.step_id) AS step_ids,
                       coalesce(jsonb_object_agg(d.name, d.output) FILTER (WHERE d.downstream = '{}'), '{}') AS leaves
                  FROM done d GROUP BY d.run_id) c
         WHERE r.id = c.run_id
        RETURNING r.id, r.status
    )
    SELECT q.step_id, coalesce(k.status, 'lease_lost')
      FROM req q
      LEFT JOIN done d ON d.step_id = q.step_id
      LEFT JOIN counted k ON k.id = d.run_id
     WHERE (SELECT count(*) FROM (SELECT pg_notify('baton_ready', w.queue)
                                    FROM (SELECT DISTINCT u.queue FROM unblocked u WHERE u.status = 'ready') w) x) >= 0
     ORDER BY q.n;
END $$;

CREATE FUNCTION complete_step(step_id bigint, lease_token uuid, output jsonb DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    run_status text;
BEGIN
    SELECT c.status INTO run_status
      FROM baton.complete_steps(ARRAY[complete_step.step_id], ARRAY[complete_step.lease_token],
                                ARRAY[complete_step.output]) c;
    IF run_status IS NULL OR run_status = 'lease_lost' THEN
        PERFORM baton._lease_lost(complete_step.step_id);
    END IF;
    RETURN run_status;
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
    IF max_steps IS NULL OR max_steps NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'max_steps must be from 0 to 1000, got %', max_steps
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
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
BEGIN
    PERFORM baton._require(fail_step.error, 'error');
    IF run IS NULL OR fail_step.lease_token IS NULL THEN
        PERFORM baton._lease_lost(fail_step.step_id);
    END IF;
    PERFORM baton._lock_run(run);

    SELECT * INTO s FROM baton.steps t
     WHERE t.run_id = run AND t.step_id = fail_step.step_id
       AND t.lease_token = fail_step.lease_token
       FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM baton._lease_lost(fail_step.step_id);
    END IF;

    RETURN baton._end_attempt(s, 'failed', fail_step.error, coalesce(fail_step.retryable, true));
END $$;
