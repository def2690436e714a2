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
-- succeed with output {leaf step: output}. A step whose lease is not held
-- changes nothing.
--
-- Hand-off: up to `handoff` of the steps made ready here that `worker` serves
-- (queues) are leased to it at once, as complete_and_claim would have claimed
-- them next anyway: a chain moves on with one write per step instead of two
-- (ready, then claimed), without a trip through the ready index. Only when no
-- ready step of the worker's queues comes before it in the claim's order, and
-- not for a queue with a limit, a rate limit or paused (those are counted by
-- claims, sql/flow.sql); in a queue with a per-key limit, only as many as
-- steps of the same run finished there (they hand over their slots).
--
-- Returns, in input order, each step's run (NULL: its lease was not held);
-- the runs that finished; and the steps handed to the worker.
CREATE FUNCTION _complete(step_ids bigint[], lease_tokens uuid[], outputs jsonb[],
                          worker text, queues text[], handoff integer, lease interval,
                          OUT runs uuid[], OUT finished uuid[], OUT handed bigint[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    leaf_runs uuid[];
    repeated boolean;
    to_start bigint[];
    children uuid[];
    id bigint;
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
    -- one-dimensional and indexed from 1, or positions would not match (one
    -- expression: this is every turn's path)
    IF array_ndims(_complete.step_ids) > 1 OR array_lower(_complete.step_ids, 1) <> 1
       OR array_ndims(_complete.lease_tokens) > 1 OR array_lower(_complete.lease_tokens, 1) <> 1
       OR array_ndims(_complete.outputs) > 1 OR array_lower(_complete.outputs, 1) <> 1 THEN
        PERFORM baton._check_array(_complete.step_ids, 'step_ids');
        PERFORM baton._check_array(_complete.lease_tokens, 'lease_tokens');
        PERFORM baton._check_array(_complete.outputs, 'outputs');
    END IF;
    IF cardinality(_complete.step_ids) = 0 THEN
        RETURN;
    END IF;
    -- The runs' locks, in one global order, so that two batches never wait on
    -- each other in a cycle (see the lock order at the top of this file).
    -- (Ordered by the lock's key itself: two runs may share a key.)
    PERFORM pg_advisory_xact_lock(1651797601, k.key)
       FROM (SELECT DISTINCT uuid_hash(s.run_id) AS key FROM baton.steps s
              WHERE s.step_id = ANY (_complete.step_ids) ORDER BY 1) k;

    WITH done AS (
        -- A token is set exactly while the step runs (see schema.sql), so the
        -- token alone says "running". Each step's token and output are at its
        -- position in the arrays.
        UPDATE baton.steps t
           SET status = 'succeeded', output = _complete.outputs[array_position(_complete.step_ids, t.step_id)],
               finished_at = now(), lease_token = NULL, lease_expires_at = NULL, error = NULL
         WHERE t.step_id = ANY (_complete.step_ids)
           AND t.lease_token = _complete.lease_tokens[array_position(_complete.step_ids, t.step_id)]
        RETURNING t.run_id, t.step_id, t.downstream, t.queue
    ), next AS MATERIALIZED (
        -- Downstream steps of the finished ones and how many of their upstream
        -- steps finished here. Read before they change: the run locks keep
        -- other transitions away from them.
        -- (A map step waits for its items while 'waiting': sql/map.sql.)
        SELECT n.run_id, n.step_no, n.step_id, n.queue, n.priority, n.run_at, n.timeout, n.kind,
               x.finished, n.waiting_on = x.finished AS ready
          FROM (SELECT d.run_id, e.step_no, count(*) AS finished
                  FROM done d, unnest(d.downstream) AS e(step_no)
                 GROUP BY d.run_id, e.step_no) x
          JOIN baton.steps n ON n.run_id = x.run_id AND n.step_no = x.step_no
         WHERE n.status IN ('blocked', 'waiting')
    ), handoff AS (
        SELECT h.run_id, h.step_no
          FROM next h
         WHERE h.ready AND h.kind = 'task' AND h.queue = ANY (_complete.queues)
           -- a queue with settings: none, except that a step of a per-key
           -- limited queue takes over the slot of a step of its run (the
           -- same key) that finished here in that queue, one for one
           AND coalesce((SELECT CASE WHEN c.paused OR c.concurrency IS NOT NULL OR c.rate_limit IS NOT NULL THEN false
                                     WHEN c.per_key_concurrency IS NOT NULL THEN
                                          (SELECT count(*) FROM next n WHERE n.run_id = h.run_id AND n.queue = h.queue AND n.ready)
                                          <= (SELECT count(*) FROM done d WHERE d.run_id = h.run_id AND d.queue = h.queue)
                                     ELSE true END
                           FROM baton.queues c WHERE c.name = h.queue), true)
           -- exactly the claim's order: no ready step of the worker's queues
           -- comes before it (priority, then run_at, then step id). One probe
           -- of steps_ready per queue, as a correlated subquery so that no
           -- plan can scan a queue instead.
           AND NOT coalesce((SELECT t.priority > h.priority
                                    OR (t.priority = h.priority AND (t.run_at, t.step_id) < (h.run_at, h.step_id))
                               FROM unnest(_complete.queues) AS w(queue)
                              CROSS JOIN LATERAL (
                                    SELECT r.priority, r.run_at, r.step_id FROM baton.steps r
                                     WHERE r.status = 'ready' AND r.queue = w.queue
                                     ORDER BY r.priority DESC, r.run_at, r.step_id LIMIT 1) t
                              ORDER BY t.priority DESC, t.run_at, t.step_id LIMIT 1), false)
         ORDER BY h.priority DESC, h.run_at, h.step_id
         LIMIT greatest(_complete.handoff, 0)
    ), unblocked AS (
        UPDATE baton.steps n
           SET waiting_on = n.waiting_on - x.finished,
               -- a step that no worker runs waits, and is started below
               status = CASE WHEN NOT x.ready THEN n.status
                             WHEN x.kind <> 'task' THEN 'waiting'
                             WHEN h.step_no IS NULL THEN 'ready'
                             ELSE 'running' END::baton.step_status,
               -- the lease of a handed-off step, as a claim gives it
               attempt = n.attempt + (h.step_no IS NOT NULL)::integer,
               worker = CASE WHEN h.step_no IS NOT NULL THEN _complete.worker END,
               lease_token = CASE WHEN h.step_no IS NOT NULL THEN gen_random_uuid() END,
               lease_expires_at = CASE WHEN h.step_no IS NOT NULL THEN
                                  clock_timestamp() + least(_complete.lease, coalesce(x.timeout, _complete.lease)) END,
               -- (a map step counting down its items keeps its start)
               started_at = CASE WHEN h.step_no IS NOT NULL THEN now() ELSE n.started_at END
          FROM next x
          LEFT JOIN handoff h ON h.run_id = x.run_id AND h.step_no = x.step_no
         WHERE n.run_id = x.run_id AND n.step_no = x.step_no
        -- Workers serving the queue of a step that became ready hear of it
        -- (once per queue: PostgreSQL folds equal notifications of a
        -- transaction). RETURNING runs for every row, read or not.
        RETURNING n.step_id, n.status, x.ready AND x.kind <> 'task' AS to_start,
                  CASE WHEN n.status = 'ready' THEN pg_notify('baton_ready', n.queue) END
    )
    SELECT array_agg(d.run_id ORDER BY q.n),
           array_agg(DISTINCT d.run_id) FILTER (WHERE d.downstream = '{}'),
           (SELECT array_agg(u.step_id) FROM unblocked u WHERE u.status = 'running'),
           (SELECT array_agg(u.step_id ORDER BY u.step_id) FROM unblocked u WHERE u.to_start),
           count(DISTINCT q.step_id) <> count(q.step_id)
      INTO runs, leaf_runs, handed, to_start, repeated
      FROM unnest(_complete.step_ids) WITH ORDINALITY AS q(step_id, n)
      LEFT JOIN done d ON d.step_id = q.step_id;
    -- Checked here, in the same pass over the input, not by a statement of
    -- its own; the error undoes what the statement above did.
    IF repeated THEN
        RAISE EXCEPTION 'step_ids must not name a step twice' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF leaf_runs IS NOT NULL THEN
        -- Runs whose last steps finished: a leaf finished, and no step of the
        -- run is left. A statement of its own, so that it sees the steps
        -- finished above. The run locks, taken before either statement's
        -- snapshot, make it exact when two last leaves finish at once: the
        -- second transaction waits for the first and then sees its step.
        -- The row is written for every finished leaf, finished run or not:
        -- in a REPEATABLE READ transaction (a caller's own, around
        -- complete_step) the second of two such transactions then fails
        -- with a serialization error instead of missing the first's step.
        WITH f AS (
            UPDATE baton.runs r
               SET status = CASE WHEN u.all_done THEN 'succeeded' ELSE r.status END,
                   finished_at = CASE WHEN u.all_done THEN now() ELSE r.finished_at END,
                   output = CASE WHEN u.all_done THEN
                                coalesce((SELECT jsonb_object_agg(l.name, l.output) FROM baton.steps l
                                           WHERE l.run_id = r.id AND l.downstream = '{}'), '{}')
                            ELSE r.output END
              -- OFFSET 0: all_done is computed once per run, not once per use
              FROM (SELECT x.id, NOT EXISTS (SELECT FROM baton.steps o
                                              WHERE o.run_id = x.id AND o.status <> 'succeeded') AS all_done
                      FROM unnest(leaf_runs) AS x(id) OFFSET 0) u
             WHERE r.id = u.id
            RETURNING r.id, u.all_done, r.parent_id)
        SELECT array_agg(f.id) FILTER (WHERE f.all_done),
               array_agg(f.id) FILTER (WHERE f.all_done AND f.parent_id IS NOT NULL)
          INTO finished, children FROM f;
        -- a child run that succeeded completes its parent's step (sql/child.sql)
        IF children IS NOT NULL THEN
            PERFORM baton._child_finished(c) FROM unnest(children) AS c;
        END IF;
    END IF;

    -- Steps that no worker runs and that became runnable here start now
    -- (sql/kinds.sql), after the runs above were settled: starting one may
    -- complete it, and what follows it, at once.
    IF to_start IS NOT NULL THEN
        FOREACH id IN ARRAY to_start LOOP
            PERFORM baton._activate(s.run_id, s.step_no) FROM baton.steps s WHERE s.step_id = id;
        END LOOP;
    END IF;
END $$;

-- Complete many leased steps in one call (and one commit). Returns one row per
-- input, in input order: the run's status after it, or 'lease_lost' for a step
-- whose lease is not held (nothing changes for it; the others complete).
CREATE FUNCTION complete_steps(step_ids bigint[], lease_tokens uuid[], outputs jsonb[] DEFAULT NULL)
RETURNS TABLE(step_id bigint, status text)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    c := baton._complete(step_ids, lease_tokens, outputs, NULL, NULL, 0, NULL);
    RETURN QUERY
    SELECT q.step_id, CASE WHEN q.run IS NULL THEN 'lease_lost'
                           WHEN q.run = ANY (c.finished) THEN 'succeeded'
                           ELSE 'running' END
      FROM unnest(complete_steps.step_ids, c.runs) WITH ORDINALITY AS q(step_id, run, n)
     ORDER BY q.n;
END $$;

CREATE FUNCTION complete_step(step_id bigint, lease_token uuid, output jsonb DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    run_status text;
BEGIN
    IF complete_step.step_id IS NULL OR complete_step.lease_token IS NULL THEN
        PERFORM baton._require(complete_step.step_id, 'step_id');
        PERFORM baton._require(complete_step.lease_token, 'lease_token');
    END IF;
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
-- completions made ready (the hand-off in _complete), then as claim_steps
-- (_claim); and return what the worker needs to run them. Completions whose
-- lease was lost change nothing and are skipped (a NOTICE names them).
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
    input jsonb, upstream jsonb, checkpoints jsonb, lease_expires_at timestamptz,
    map_index integer, map_item jsonb
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c record;
    leased bigint[];
BEGIN
    IF complete_and_claim.max_steps IS NULL OR complete_and_claim.max_steps NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'max_steps must be from 0 to 1000, got %', complete_and_claim.max_steps
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF complete_and_claim.max_steps > 0 THEN
        IF complete_and_claim.worker IS NULL OR btrim(complete_and_claim.worker) = '' THEN
            RAISE EXCEPTION 'worker must be a non-empty name' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF complete_and_claim.queues IS NULL OR cardinality(complete_and_claim.queues) = 0 THEN
            RAISE EXCEPTION 'queues must name at least one queue' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- _interval_ok written out: this is every turn's path
        IF complete_and_claim.lease IS NULL OR NOT (complete_and_claim.lease > interval '0'
               AND complete_and_claim.lease <= interval '10 years' AND extract(day FROM complete_and_claim.lease) >= 0
               AND extract(month FROM complete_and_claim.lease) >= 0 AND extract(year FROM complete_and_claim.lease) >= 0
               AND complete_and_claim.lease - date_trunc('day', complete_and_claim.lease) >= interval '0') THEN
            PERFORM baton._require(complete_and_claim.lease, 'lease');
            PERFORM baton._check_interval(complete_and_claim.lease, 'lease');
        END IF;
        -- names travel in NOTIFY payloads and index keys (see _check_length);
        -- a simple expression first (no query on every turn): queue names
        -- that are 200 bytes together are each at most that
        IF octet_length(complete_and_claim.worker) > 200
           OR array_ndims(complete_and_claim.queues) > 1 OR array_lower(complete_and_claim.queues, 1) <> 1
           OR octet_length(array_to_string(complete_and_claim.queues, '')) > 200 THEN
            PERFORM baton._check_length(complete_and_claim.worker, 'worker');
            PERFORM baton._check_array(complete_and_claim.queues, 'queues');
            IF EXISTS (SELECT FROM unnest(complete_and_claim.queues) q WHERE octet_length(q) > 200) THEN
                RAISE EXCEPTION 'queues must be names of at most 200 bytes each' USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END IF;
    END IF;

    -- Function calls as plain expressions: no statement to plan or start.
    c := baton._complete(complete_and_claim.step_ids, complete_and_claim.lease_tokens, complete_and_claim.outputs,
                         complete_and_claim.worker, complete_and_claim.queues, complete_and_claim.max_steps,
                         complete_and_claim.lease);
    IF array_position(c.runs, NULL) IS NOT NULL THEN
        RAISE NOTICE 'pg_baton: lease lost, not completed: steps %',
            ARRAY(SELECT q.id FROM unnest(complete_and_claim.step_ids, c.runs) AS q(id, run) WHERE q.run IS NULL);
    END IF;
    leased := coalesce(c.handed, '{}');
    IF complete_and_claim.max_steps > cardinality(leased) THEN
        leased := leased || baton._claim(complete_and_claim.worker, complete_and_claim.queues,
                                         complete_and_claim.max_steps - cardinality(leased), complete_and_claim.lease);
    END IF;
    IF cardinality(leased) = 0 THEN
        RETURN;
    END IF;

    -- What the worker needs to run its steps, found by step id: those leased
    -- by the statements above in this transaction, so visible here.
    RETURN QUERY
    SELECT s.step_id, s.lease_token, s.run_id, r.workflow, s.name, s.attempt, r.input,
           -- upstream outputs by primary key, one probe each: a step_no = ANY
           -- test would read all the run's steps, and a run may have hundreds
           coalesce((SELECT jsonb_object_agg(u.name, u.output)
                       FROM unnest(s.upstream) AS a(step_no)
                       CROSS JOIN LATERAL (SELECT u.name, u.output FROM baton.steps u
                                            WHERE u.run_id = s.run_id AND u.step_no = a.step_no OFFSET 0) u), '{}'::jsonb),
           coalesce((SELECT jsonb_object_agg(k.key, k.value) FROM baton.checkpoints k
                      WHERE k.run_id = s.run_id AND k.step_id = s.step_id), '{}'::jsonb),
           s.lease_expires_at, s.map_index, s.map_item
      FROM baton.steps s
      -- OFFSET 0 keeps this a probe of runs_pkey per leased step
      CROSS JOIN LATERAL (SELECT r.workflow, r.input FROM baton.runs r WHERE r.id = s.run_id OFFSET 0) r
     WHERE s.step_id = ANY (leased)
     ORDER BY s.priority DESC, s.run_at, s.step_id;
END $$;

CREATE FUNCTION fail_step(step_id bigint, lease_token uuid, error text, retryable boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    run uuid := baton._run_of(fail_step.step_id);
    s baton.steps;
BEGIN
    IF fail_step.step_id IS NULL OR fail_step.lease_token IS NULL OR fail_step.error IS NULL THEN
        PERFORM baton._require(fail_step.step_id, 'step_id');
        PERFORM baton._require(fail_step.lease_token, 'lease_token');
        PERFORM baton._require(fail_step.error, 'error');
    END IF;
    IF run IS NULL THEN
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
