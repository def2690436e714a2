-- Leases: claim_steps, heartbeat, checkpoint, and reclaiming expired leases.

-- End the current attempt of a leased step: record it, then retry after the
-- backoff or, when attempts are used up or the error is final, fail the step
-- and its run. A lost lease (backoff => false) is retried at once: the worker
-- went away, the step did not fail. The caller holds the run lock and the step
-- row; nowait is for _finish_run. Returns 'retrying' or 'failed'.
CREATE FUNCTION _end_attempt(s baton.steps, outcome text, error text, retryable boolean, backoff boolean DEFAULT true,
                             nowait boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    policy jsonb;
    initial float8;
    cap float8;
    multiplier float8;
    delay float8;
BEGIN
    INSERT INTO baton.attempts (run_id, step_id, attempt, step, worker, started_at, outcome, error)
    VALUES (s.run_id, s.step_id, s.attempt, s.name, s.worker, s.started_at, outcome::baton.attempt_outcome, error);

    IF retryable AND s.attempt < s.max_attempts THEN
        -- the run's own version of the definition (sql/kinds.sql): a new
        -- version never changes the backoff of runs already going
        policy := baton._step_definition(s) -> 'backoff';
        initial := extract(epoch FROM (policy ->> 'initial')::interval);
        cap := extract(epoch FROM (policy ->> 'max')::interval);
        multiplier := (policy ->> 'multiplier')::float8;
        -- initial * multiplier^(n-1), capped, computed in logs so it cannot overflow
        IF NOT backoff THEN
            delay := 0;
        ELSIF multiplier > 1 AND (s.attempt - 1) * ln(multiplier) >= ln(cap / initial) THEN
            delay := cap;
        ELSE
            delay := least(initial * power(multiplier, s.attempt - 1), cap);
        END IF;
        -- up to 10% jitter (0 stays 0); never past 10 years, the longest
        -- interval a definition may name (a policy stored before that rule)
        delay := least(delay * (1 + random() * 0.1), 315360000);

        -- with a delay it waits, scheduled, and the background worker makes
        -- it ready (and tells workers) when it is due, or starts it again
        -- when no worker runs it (sql/kinds.sql)
        UPDATE baton.steps t
           SET status = CASE WHEN delay > 0 OR s.kind <> 'task' THEN 'scheduled' ELSE 'ready' END::baton.step_status,
               run_at = now() + make_interval(secs => delay),
               worker = NULL, lease_token = NULL, lease_expires_at = NULL, error = error, wait_for = NULL
         WHERE t.run_id = s.run_id AND t.step_no = s.step_no;
        IF delay = 0 AND s.kind = 'task' THEN
            PERFORM pg_notify('baton_ready', s.queue);
        ELSE
            PERFORM baton._wake_scheduler(now() + make_interval(secs => delay));
        END IF;
        RETURN 'retrying';
    END IF;

    UPDATE baton.steps t
       SET status = 'failed', finished_at = now(), lease_token = NULL, lease_expires_at = NULL, error = error,
           wait_for = NULL
     WHERE t.run_id = s.run_id AND t.step_no = s.step_no;
    PERFORM baton._finish_run(s.run_id, 'failed', format('step "%s" failed: %s', s.name, error), nowait);
    RETURN 'failed';
END $$;

-- Return expired leases (in the given queues, or all when NULL) to ready, each
-- counted as a lost attempt, soonest expired first. Runs busy with another
-- transition are skipped and left for the next call. Returns how many leases
-- were reclaimed. Both forms read only expired entries of steps_running (by
-- queue and expiry), never the healthy leases, however many there are.
--
-- may_fail => false (a claim's own reclaim) skips steps whose last attempt
-- this was: failing one fails its run and cancels the run's other steps, rows
-- the claiming transaction may have to wait for while it holds candidate rows
-- of its own, which two claims could do to each other (a deadlock). Only the
-- background worker, which holds nothing else, fails them: within an interval.
-- It never waits for a row another transaction holds (an open transaction
-- that heartbeats a sibling step, say): that run is skipped for this round.
-- And each of its steps is reclaimed in a subtransaction of its own, so that
-- one step that cannot be (whatever the reason) is logged and skipped, and
-- the others are reclaimed.
CREATE FUNCTION _reclaim_expired(queues text[], max_steps integer, may_fail boolean DEFAULT true) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    candidate record;
    reclaimed integer := 0;
BEGIN
    IF queues IS NOT NULL THEN
        FOR candidate IN
            SELECT e.run_id, e.step_no FROM baton.steps e
             WHERE e.status = 'running' AND e.queue = ANY (queues) AND e.lease_expires_at < now()
               AND e.attempt < e.max_attempts
             ORDER BY e.lease_expires_at
             LIMIT max_steps
        LOOP
            IF baton._reclaim_one(candidate.run_id, candidate.step_no, false) THEN
                reclaimed := reclaimed + 1;
            END IF;
        END LOOP;
        RETURN reclaimed;
    END IF;

    -- Every queue: the queues that have leases, found by skipping through
    -- steps_running (one probe per queue), then each queue's expired ones.
    FOR candidate IN
        WITH RECURSIVE q(name) AS (
            SELECT (SELECT min(r.queue) FROM baton.steps r WHERE r.status = 'running')
            UNION ALL
            SELECT (SELECT min(r.queue) FROM baton.steps r WHERE r.status = 'running' AND r.queue > q.name)
              FROM q WHERE q.name IS NOT NULL)
        SELECT e.run_id, e.step_no
          FROM q CROSS JOIN LATERAL (
                SELECT r.run_id, r.step_no, r.lease_expires_at FROM baton.steps r
                 WHERE r.status = 'running' AND r.queue = q.name AND r.lease_expires_at < now()
                 ORDER BY r.lease_expires_at
                 LIMIT max_steps) e
         WHERE q.name IS NOT NULL
         ORDER BY e.lease_expires_at
         LIMIT max_steps
    LOOP
        BEGIN
            IF baton._reclaim_one(candidate.run_id, candidate.step_no, true) THEN
                reclaimed := reclaimed + 1;
            END IF;
        EXCEPTION
            WHEN lock_not_available THEN
                NULL;  -- a step of the run is held by an open transaction: next round
            WHEN OTHERS THEN
                RAISE WARNING 'pg_baton: reclaiming the lease of step % of run % failed: % (SQLSTATE %)',
                    candidate.step_no, candidate.run_id, SQLERRM, SQLSTATE;
        END;
    END LOOP;
    RETURN reclaimed;
END $$;

-- Reclaim one expired lease, if it still is one and its run is free: true
-- when it did. may_fail as above; with may_fail the run's other steps are
-- never waited for (55P03 instead). With lost_worker, the lease held under
-- that name whether it expired or not: its worker's session is gone
-- (sql/worker.sql).
CREATE FUNCTION _reclaim_one(run_id uuid, step_no integer, may_fail boolean, lost_worker text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    s baton.steps;
BEGIN
    -- run lock first, then the row (the order every multi-row transition uses)
    IF NOT baton._try_lock_run(run_id) THEN
        RETURN false;
    END IF;
    -- by primary key, then checked: a status test in the query could send
    -- the planner through steps_running, a walk of every leased step
    SELECT * INTO s FROM baton.steps e
     WHERE e.run_id = run_id AND e.step_no = step_no
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND OR NOT coalesce(s.status = 'running' AND CASE WHEN lost_worker IS NULL THEN s.lease_expires_at < now()
                                                               ELSE s.worker = lost_worker END, false)
       OR NOT (may_fail OR s.attempt < s.max_attempts) THEN
        RETURN false;
    END IF;
    IF lost_worker IS NOT NULL THEN
        PERFORM baton._end_attempt(s, 'lease_expired', format('the session of worker "%s" is gone', s.worker),
                                   true, false, may_fail);
    ELSIF s.timeout IS NOT NULL AND s.started_at + s.timeout <= now() THEN
        PERFORM baton._end_attempt(s, 'timed_out', format('timed out after %s seconds', extract(epoch FROM s.timeout)::float8),
                                   true, false, may_fail);
    ELSE
        PERFORM baton._end_attempt(s, 'lease_expired', format('lease held by worker "%s" expired', s.worker),
                                   true, false, may_fail);
    END IF;
    RETURN true;
END $$;

-- The claim, for complete_and_claim (and so claim_steps): lease up to `want`
-- ready steps of the given queues, highest priority first, then oldest.
-- Returns their step ids. The caller checked the arguments and set the
-- planner settings (see the end of complete.sql). Queues with settings
-- (paused, limited, flow control) are claimed by _claim_flow (sql/flow.sql).
CREATE FUNCTION _claim(worker text, queues text[], want integer, lease interval) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    qnames text[];
    claimed_now bigint[];
    leased bigint[] := '{}';
BEGIN
    FOR pass IN 1 .. 2 LOOP
        IF EXISTS (SELECT 1 FROM baton.queues c
                    WHERE c.name = ANY (_claim.queues)
                      AND (c.paused OR c.concurrency IS NOT NULL OR c.rate_limit IS NOT NULL
                           OR c.per_key_concurrency IS NOT NULL)) THEN
            claimed_now := baton._claim_flow(_claim.worker, _claim.queues, want, _claim.lease);
        ELSIF cardinality(_claim.queues) = 1 THEN
            -- one queue, not limited or paused: the common case, no locks
            claimed_now := baton._claim_one(_claim.worker, _claim.queues[1], want, _claim.lease);
        ELSE
            qnames := ARRAY(SELECT DISTINCT q FROM unnest(_claim.queues) q WHERE q IS NOT NULL);
            claimed_now := baton._claim_many(_claim.worker, qnames, array_fill(want, ARRAY[cardinality(qnames)]),
                                             want, _claim.lease);
        END IF;
        leased := leased || claimed_now;
        want := want - coalesce(cardinality(claimed_now), 0);
        -- A full batch: done. A short one: take back the expired leases of
        -- these queues and try once more, so that a crashed worker's steps
        -- never wait for the background worker (and busy queues pay nothing
        -- for it). Last attempts are left to it (see _reclaim_expired).
        EXIT WHEN want = 0 OR pass = 2;
        EXIT WHEN baton._reclaim_expired(_claim.queues, 100, false) = 0;
    END LOOP;
    RETURN leased;
END $$;

-- Lease up to `want` ready steps of one queue: an ordered scan of
-- steps_ready that locks what it takes, skipping rows other claimers hold.
CREATE FUNCTION _claim_one(worker text, queue text, want integer, lease interval) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    claimed_now bigint[];
BEGIN
    WITH candidates AS MATERIALIZED (
        SELECT r.ctid
          FROM baton.steps r
         WHERE r.status = 'ready' AND r.queue = _claim_one.queue
         ORDER BY r.priority DESC, r.run_at, r.step_id
         LIMIT _claim_one.want
           FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE baton.steps s
           SET status = 'running',
               attempt = s.attempt + 1,
               worker = _claim_one.worker,
               lease_token = gen_random_uuid(),
               -- from the clock, not now(): a claim inside a long
               -- transaction still gets its whole lease
               lease_expires_at = clock_timestamp() + CASE WHEN s.timeout IS NULL THEN _claim_one.lease
                                                           ELSE least(_claim_one.lease, s.timeout) END,
               started_at = now()
         -- The plan must not depend on how many steps are ready (a generic
         -- plan cannot know): every lookup below is written as a probe by
         -- key, never a join the planner could turn into a scan. Here, the
         -- locked rows by ctid: a TID scan. No status test: a candidate
         -- was ready in this statement's snapshot and is locked by us, so
         -- nobody changed it since; a newer version that the lock found
         -- (changed after our snapshot) is invisible to the TID scan and
         -- skipped. A status test would let the planner walk steps_ready
         -- instead, which statistics taken before a backlog arrived make
         -- look empty.
         WHERE s.ctid = ANY (ARRAY(SELECT c.ctid FROM candidates c))
        RETURNING s.step_id, s.run_id
    ), started AS (
        UPDATE baton.runs r SET status = 'running', started_at = now()
         WHERE r.id = ANY (ARRAY(SELECT c.run_id FROM claimed c)) AND r.status = 'pending'
    )
    SELECT array_agg(c.step_id) INTO claimed_now FROM claimed c;
    RETURN claimed_now;
END $$;

-- A claim over several queues (qnames, with the slots each can give): the
-- best `want` ready steps over all of them. They are picked first without a
-- lock and then locked (SKIP LOCKED), so that the claim holds only the rows
-- it takes: locking each queue's best `want` would hold rows that another
-- claim could have had. Picked rows that another claim got first are passed
-- over and the pick goes on past them, until `want` are leased or no ready
-- step is left that it has not tried.
CREATE FUNCTION _claim_many(worker text, qnames text[], qslots integer[], want integer, lease interval) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    picked tid[];
    picked_ids bigint[];
    passed bigint[] := '{}';
    claimed_now bigint[];
    claimed_queues text[];
    leased bigint[] := '{}';
BEGIN
    LOOP
        SELECT array_agg(c.ctid ORDER BY c.priority DESC, c.run_at, c.step_id), array_agg(c.step_id)
          INTO picked, picked_ids
          FROM (SELECT c.ctid, c.step_id, c.priority, c.run_at
                  FROM unnest(qnames, qslots) AS q(name, slots)
                 CROSS JOIN LATERAL (
                       SELECT r.ctid, r.step_id, r.priority, r.run_at
                         FROM baton.steps r
                        WHERE r.status = 'ready' AND r.queue = q.name AND NOT (r.step_id = ANY (passed))
                        ORDER BY r.priority DESC, r.run_at, r.step_id
                        LIMIT greatest(q.slots, 0)) c
                 ORDER BY c.priority DESC, c.run_at, c.step_id
                 LIMIT want) c;
        EXIT WHEN picked IS NULL;
        passed := passed || picked_ids;
        SELECT l.step_ids, l.queues INTO claimed_now, claimed_queues FROM baton._lease_picked(picked, worker, lease) l;
        leased := leased || coalesce(claimed_now, '{}');
        want := want - coalesce(cardinality(claimed_now), 0);
        EXIT WHEN want <= 0;
        -- a limited queue gives what is left of its slots
        qslots := ARRAY(SELECT q.slots - (SELECT count(*) FROM unnest(claimed_queues) AS t(name) WHERE t.name = q.name)
                          FROM unnest(qnames, qslots) WITH ORDINALITY AS q(name, slots, n) ORDER BY q.n);
    END LOOP;
    RETURN leased;
END $$;

-- Lease the picked steps (by ctid) that are still ready and that no other
-- claim holds (SKIP LOCKED), for _claim_many and _claim_keyed: they pick
-- without a lock, so that a claim holds only the rows it takes. A keyed
-- claim passes its queue's key path: a step made while configure_queue gave
-- the queue its key gets its key here. Returns the steps leased and their
-- queues.
CREATE FUNCTION _lease_picked(picked tid[], worker text, lease interval, key_path jsonpath DEFAULT NULL,
                              OUT step_ids bigint[], OUT queues text[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    WITH locked AS MATERIALIZED (
        -- by ctid (a TID scan); the status test is a filter, which the
        -- lock re-checks on a version changed since the pick (TID scans
        -- do not re-check their ctid). Written as text so that it can
        -- never make steps_ready the planner's path instead.
        SELECT l.ctid FROM baton.steps l
         WHERE l.ctid = ANY (picked) AND l.status::text = 'ready'
           FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE baton.steps s
           SET status = 'running',
               attempt = s.attempt + 1,
               worker = _lease_picked.worker,
               lease_token = gen_random_uuid(),
               -- from the clock, not now() (see _claim_one)
               lease_expires_at = clock_timestamp() + CASE WHEN s.timeout IS NULL THEN _lease_picked.lease
                                                           ELSE least(_lease_picked.lease, s.timeout) END,
               started_at = now(),
               flow_key = CASE WHEN _lease_picked.key_path IS NULL OR s.flow_key IS NOT NULL THEN s.flow_key
                               ELSE baton._flow_key((SELECT u.input FROM baton.runs u WHERE u.id = s.run_id),
                                                    _lease_picked.key_path) END
         WHERE s.ctid = ANY (ARRAY(SELECT l.ctid FROM locked l))
        RETURNING s.step_id, s.run_id, s.queue
    ), started AS (
        UPDATE baton.runs r SET status = 'running', started_at = now()
         WHERE r.id = ANY (ARRAY(SELECT c.run_id FROM claimed c)) AND r.status = 'pending'
    )
    SELECT array_agg(c.step_id), array_agg(c.queue) INTO step_ids, queues FROM claimed c;
END $$;

-- Lease up to max_steps ready steps: complete_and_claim with nothing to complete.
CREATE FUNCTION claim_steps(
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
BEGIN
    IF max_steps IS NULL OR max_steps NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'max_steps must be from 1 to 1000, got %', max_steps
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY SELECT * FROM baton.complete_and_claim('{}', '{}', '{}', worker, queues, max_steps, lease);
END $$;

-- Extend a lease: it expires `lease` from now, by the clock (not the
-- transaction's start: a heartbeat inside a long transaction must not return
-- a time already past). An attempt's lease never runs past its step's timeout.
CREATE FUNCTION heartbeat(step_id bigint, lease_token uuid, lease interval DEFAULT '30 seconds')
RETURNS timestamptz
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    expires timestamptz;
BEGIN
    -- simple expressions first: a PERFORM is a query of its own
    IF heartbeat.step_id IS NULL OR heartbeat.lease_token IS NULL OR heartbeat.lease IS NULL
       OR NOT baton._interval_ok(heartbeat.lease) THEN
        PERFORM baton._require(heartbeat.step_id, 'step_id');
        PERFORM baton._require(heartbeat.lease_token, 'lease_token');
        PERFORM baton._require(heartbeat.lease, 'lease');
        PERFORM baton._check_interval(heartbeat.lease, 'lease');
    END IF;
    UPDATE baton.steps s
       SET lease_expires_at = CASE WHEN s.timeout IS NULL THEN clock_timestamp() + heartbeat.lease
                                   ELSE least(clock_timestamp() + heartbeat.lease, s.started_at + s.timeout) END
     WHERE s.step_id = heartbeat.step_id AND s.lease_token = heartbeat.lease_token
    RETURNING s.lease_expires_at INTO expires;
    IF NOT FOUND THEN
        PERFORM baton._lease_lost(heartbeat.step_id);
    END IF;
    RETURN expires;
END $$;

-- Save partial progress; later attempts of the step get it in claim_steps.checkpoints.
CREATE FUNCTION checkpoint(step_id bigint, lease_token uuid, key text, value jsonb)
RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s record;
BEGIN
    IF checkpoint.step_id IS NULL OR checkpoint.lease_token IS NULL OR checkpoint.key IS NULL THEN
        PERFORM baton._require(checkpoint.step_id, 'step_id');
        PERFORM baton._require(checkpoint.lease_token, 'lease_token');
        PERFORM baton._require(checkpoint.key, 'key');
    END IF;
    IF checkpoint.key = '' THEN
        RAISE EXCEPTION 'key must be a non-empty text' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(checkpoint.key) > 1000 THEN
        PERFORM baton._check_length(checkpoint.key, 'key', 1000);
    END IF;
    -- FOR SHARE: a concurrent reclaim waits until this checkpoint is committed
    SELECT t.run_id, t.attempt INTO s FROM baton.steps t
     WHERE t.step_id = checkpoint.step_id AND t.lease_token = checkpoint.lease_token
       FOR SHARE;
    IF NOT FOUND THEN
        PERFORM baton._lease_lost(checkpoint.step_id);
    END IF;
    INSERT INTO baton.checkpoints AS k (run_id, step_id, key, value, attempt)
    VALUES (s.run_id, checkpoint.step_id, checkpoint.key, checkpoint.value, s.attempt)
    ON CONFLICT (run_id, step_id, key)
    DO UPDATE SET value = excluded.value, attempt = excluded.attempt, saved_at = now();
END $$;

-- Hand a leased step back without counting the attempt (a worker shutting
-- down, or one without a handler for it): it is ready again at once for any
-- worker, or after `delay` (scheduled until then).
CREATE FUNCTION release_step(step_id bigint, lease_token uuid, delay interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    ready_on text;
BEGIN
    IF release_step.step_id IS NULL OR release_step.lease_token IS NULL
       OR NOT baton._interval_ok(release_step.delay) THEN
        PERFORM baton._require(release_step.step_id, 'step_id');
        PERFORM baton._require(release_step.lease_token, 'lease_token');
        PERFORM baton._check_interval(release_step.delay, 'delay');
    END IF;
    UPDATE baton.steps s
       SET status = CASE WHEN release_step.delay IS NULL THEN 'ready' ELSE 'scheduled' END::baton.step_status,
           attempt = s.attempt - 1, run_at = now() + coalesce(release_step.delay, interval '0'),
           worker = NULL, lease_token = NULL, lease_expires_at = NULL
     WHERE s.step_id = release_step.step_id AND s.lease_token = release_step.lease_token
    RETURNING s.queue INTO ready_on;
    IF NOT FOUND THEN
        PERFORM baton._lease_lost(release_step.step_id);
    END IF;
    IF release_step.delay IS NULL THEN
        PERFORM pg_notify('baton_ready', ready_on);
    ELSE
        PERFORM baton._wake_scheduler(now() + release_step.delay);
    END IF;
END $$;
