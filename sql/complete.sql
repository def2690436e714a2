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

-- Completing steps, for complete_steps and complete_and_claim: each step
-- succeeds (the step row is its attempt's record); downstream steps whose
-- upstreams have all succeeded become ready; the last step of a run makes it
-- succeed with output {leaf step: output}. A step whose
-- lease is not held is reported as 'lease_lost' and nothing changes for it.
-- Returns one row per input, in input order: the run's status after it, or
-- 'lease_lost'.
--
-- Hand-off: up to `handoff` of the steps made ready here that `worker` serves
-- (queues) are leased to it at once, as complete_and_claim would have claimed
-- them next anyway: a chain moves on with one write per step instead of two
-- (ready, then claimed), without a trip through the ready index. Not for a
-- queue with a limit or paused (those are counted by claims), nor while a
-- step of higher priority waits in the queue. They follow the input rows as
-- (step_id, 'handed').
--
-- Every lookup is a probe by key: the planner must not pick a scan, whatever
-- the statistics say (a generic plan is made once per session), hence the
-- SET clauses. They also hold for the functions called from here.
CREATE FUNCTION _complete(step_ids bigint[], lease_tokens uuid[], outputs jsonb[],
                          worker text, queues text[], handoff integer, lease interval)
RETURNS TABLE(step_id bigint, status text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
#variable_conflict use_column
BEGIN
    IF _complete.step_ids IS NULL OR _complete.lease_tokens IS NULL THEN
        RAISE EXCEPTION '% must not be null', CASE WHEN _complete.step_ids IS NULL THEN 'step_ids' ELSE 'lease_tokens' END
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cardinality(_complete.step_ids) IS DISTINCT FROM cardinality(_complete.lease_tokens)
       OR cardinality(_complete.outputs) <> cardinality(_complete.step_ids) THEN
        RAISE EXCEPTION 'step_ids, lease_tokens and outputs must have the same length'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The runs' locks, in one global order, so that two batches never wait on
    -- each other in a cycle (see the lock order at the top of this file).
    PERFORM pg_advisory_xact_lock(1651797601, uuid_hash(r.run_id))
       FROM (SELECT DISTINCT s.run_id FROM baton.steps s
              WHERE s.step_id = ANY (_complete.step_ids) ORDER BY s.run_id) r;

    RETURN QUERY
    WITH done AS (
        -- A token is set exactly while the step runs (see schema.sql), so the
        -- token alone says "running". Each step's token and output are at its
        -- position in the arrays.
        UPDATE baton.steps t
           SET status = 'succeeded', output = _complete.outputs[array_position(_complete.step_ids, t.step_id)],
               finished_at = now(), lease_token = NULL, lease_expires_at = NULL, error = NULL
         WHERE t.step_id = ANY (_complete.step_ids)
           AND t.lease_token = _complete.lease_tokens[array_position(_complete.step_ids, t.step_id)]
        RETURNING t.run_id, t.step_id, t.name, t.downstream, t.output
    ), next AS MATERIALIZED (
        -- Downstream steps of the finished ones and how many of their upstream
        -- steps finished here. Read before they change: the run locks keep
        -- other transitions away from them.
        SELECT n.run_id, n.step_no, n.step_id, n.queue, n.priority, n.run_at, n.timeout,
               x.finished, n.waiting_on = x.finished AS ready
          FROM (SELECT d.run_id, e.step_no, count(*) AS finished
                  FROM done d, unnest(d.downstream) AS e(step_no)
                 GROUP BY d.run_id, e.step_no) x
          JOIN baton.steps n ON n.run_id = x.run_id AND n.step_no = x.step_no
         WHERE n.status = 'blocked'
    ), handed AS (
        SELECT h.run_id, h.step_no
          FROM next h
         WHERE h.ready AND h.queue = ANY (_complete.queues) AND h.run_at <= now()
           AND NOT EXISTS (SELECT FROM baton.queues c
                            WHERE c.name = h.queue AND (c.paused OR c.concurrency IS NOT NULL))
           AND NOT EXISTS (SELECT FROM baton.steps r
                            WHERE r.status = 'ready' AND r.queue = h.queue AND r.priority > h.priority
                              AND r.run_at <= now())
         ORDER BY h.priority DESC, h.run_at, h.step_id
         LIMIT greatest(_complete.handoff, 0)
    ), unblocked AS (
        UPDATE baton.steps n
           SET waiting_on = n.waiting_on - x.finished,
               status = CASE WHEN NOT x.ready THEN 'blocked'
                             WHEN h.step_no IS NULL THEN 'ready'
                             ELSE 'running' END::baton.step_status,
               -- the lease of a handed-off step, as claim_steps gives it
               attempt = n.attempt + (h.step_no IS NOT NULL)::integer,
               worker = CASE WHEN h.step_no IS NOT NULL THEN _complete.worker END,
               lease_token = CASE WHEN h.step_no IS NOT NULL THEN gen_random_uuid() END,
               lease_expires_at = CASE WHEN h.step_no IS NOT NULL THEN
                                  now() + least(_complete.lease, coalesce(x.timeout, _complete.lease)) END,
               started_at = CASE WHEN h.step_no IS NOT NULL THEN now() END
          FROM next x
          LEFT JOIN handed h ON h.run_id = x.run_id AND h.step_no = x.step_no
         WHERE n.run_id = x.run_id AND n.step_no = x.step_no
        -- Workers serving the queue of a step that became ready hear of it
        -- (once per queue: PostgreSQL folds equal notifications of a
        -- transaction). RETURNING runs for every row, read or not.
        RETURNING n.step_id, n.status,
                  CASE WHEN n.status = 'ready' THEN pg_notify('baton_ready', n.queue) END
    ), finished AS (
        -- Runs whose last steps finished here: a leaf finished, and none of
        -- the run's other steps is left. The run lock (taken above, before
        -- this statement's snapshot) makes this exact when two leaves finish
        -- at once: the second transaction sees the first one's step. A
        -- statement does not see its own updates: the steps finished here are
        -- left out explicitly, and their outputs join the other leaves'.
        UPDATE baton.runs r
           SET status = 'succeeded', finished_at = now(),
               output = coalesce((SELECT jsonb_object_agg(l.name, l.output) FROM baton.steps l
                                   WHERE l.run_id = r.id AND l.downstream = '{}'
                                     AND l.step_id <> ALL (c.step_ids)), '{}') || c.leaves
          FROM (SELECT d.run_id, array_agg(d.step_id) AS step_ids,
                       coalesce(jsonb_object_agg(d.name, d.output) FILTER (WHERE d.downstream = '{}'), '{}') AS leaves
                  FROM done d GROUP BY d.run_id HAVING bool_or(d.downstream = '{}')) c
         WHERE r.id = c.run_id
           AND NOT EXISTS (SELECT FROM baton.steps o
                            WHERE o.run_id = c.run_id AND o.status <> 'succeeded' AND o.step_id <> ALL (c.step_ids))
        RETURNING r.id
    )
    SELECT o.step_id, o.status
      FROM (SELECT q.step_id, CASE WHEN d.step_id IS NULL THEN 'lease_lost'
                                   WHEN k.id IS NULL THEN 'running' ELSE 'succeeded' END AS status, q.n
              FROM unnest(_complete.step_ids) WITH ORDINALITY AS q(step_id, n)
              LEFT JOIN done d ON d.step_id = q.step_id
              LEFT JOIN finished k ON k.id = d.run_id
            UNION ALL
            SELECT u.step_id, 'handed', NULL FROM unblocked u WHERE u.status = 'running') o
     ORDER BY o.n NULLS LAST;
END $$;

-- Complete many leased steps in one statement (and one commit); see _complete.
CREATE FUNCTION complete_steps(step_ids bigint[], lease_tokens uuid[], outputs jsonb[] DEFAULT NULL)
RETURNS TABLE(step_id bigint, status text)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM baton._complete(step_ids, lease_tokens, outputs, NULL, NULL, 0, NULL);
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
-- it finished, then lease up to max_steps more: first the steps these
-- completions made ready (the hand-off in _complete), then as claim_steps.
-- Completions whose lease was lost change nothing and are skipped (a NOTICE
-- names them).
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
    handed bigint[];
BEGIN
    IF max_steps IS NULL OR max_steps NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'max_steps must be from 0 to 1000, got %', max_steps
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(c.step_id) FILTER (WHERE c.status = 'lease_lost'),
           array_agg(c.step_id) FILTER (WHERE c.status = 'handed')
      INTO lost, handed
      FROM baton._complete(step_ids, lease_tokens, outputs, worker, queues, max_steps, lease) c;
    IF lost IS NOT NULL THEN
        RAISE NOTICE 'pg_baton: lease lost, not completed: steps %', lost;
    END IF;
    IF max_steps > 0 THEN
        RETURN QUERY SELECT * FROM baton._claim(worker, queues, max_steps, lease, handed);
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
