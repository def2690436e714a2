-- Flow control: the claims of queues with settings (configure_queue):
--
--   paused               no claims at all
--   concurrency          at most this many running steps in the queue
--   rate_limit per       at most rate_limit claims in any window of
--     rate_period        rate_period, over every worker and connection
--   concurrency_key,     at most per_key_concurrency running steps per value
--     per_key_concurrency  of the key (a JSON path into the run's input)
--
-- No hot row: a rate limit's window is kept in shared memory (src/rate.rs)
-- and taken from under a lock held for microseconds, never to the end of a
-- transaction; a per-key limit locks only its key (a claim that finds a key
-- being admitted by another claim passes over it to the next key); the
-- running steps of a key are a probe of steps_flow. Only `concurrency`
-- counts a whole queue, under its advisory lock, as before.
--
-- Steps of such queues are not handed off by _complete (every one is
-- claimed here, and counted), except in a queue with only a per-key limit:
-- a step that finished hands its slot to the next step of its run (the same
-- key), one for one, so that a chain moves on without a claim.

-- The key of a run's input for a queue's concurrency_key: its value at the
-- path as text, '' when there is none (or JSON null): such a run is not
-- limited.
CREATE FUNCTION _flow_key(input jsonb, key_path jsonpath) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    -- (silent: a path that errs on this input, a strict path that finds
    -- nothing or arithmetic on a string, finds no key instead of failing
    -- every enqueue and claim of the queue)
    RETURN coalesce(jsonb_path_query_first(input, key_path, silent => true) #>> '{}', '');
END $$;

-- The keys of new steps (of the runs `run_ids`) in queues with a per-key
-- limit, from their runs' input.
CREATE FUNCTION _set_flow_keys(run_ids uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE baton.steps s
       SET flow_key = baton._flow_key(r.input, c.concurrency_key)
      FROM baton.runs r, baton.queues c
     WHERE s.run_id = ANY (run_ids) AND r.id = s.run_id AND c.name = s.queue AND c.concurrency_key IS NOT NULL;
END $$;

-- A queue's concurrency_key changed: its steps that no worker holds get the
-- new key (or none). A running step keeps the key it was claimed under, and
-- counts under it, until it ends.
CREATE FUNCTION _rekey_queue(queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE baton.steps s
       SET flow_key = (SELECT CASE WHEN c.concurrency_key IS NOT NULL THEN baton._flow_key(r.input, c.concurrency_key) END
                         FROM baton.runs r LEFT JOIN baton.queues c ON c.name = s.queue
                        WHERE r.id = s.run_id)
     WHERE s.queue = _rekey_queue.queue AND s.status IN ('blocked', 'scheduled', 'ready', 'waiting');
END $$;

-- Lease up to `want` ready steps of `queues`, at least one of which has
-- settings. Queues without a per-key limit are claimed together in the
-- claim's order (_claim_one, _claim_many); those with one after, each in turn.
CREATE FUNCTION _claim_flow(worker text, queues text[], want integer, lease interval) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    at timestamptz := clock_timestamp();
    q record;
    slots integer;
    plain_names text[] := '{}';
    plain_slots integer[] := '{}';
    keyed_names text[] := '{}';
    keyed_paths jsonpath[] := '{}';
    keyed_limits integer[] := '{}';
    keyed_slots integer[] := '{}';
    rated_names text[] := '{}';
    rated_periods bigint[] := '{}';
    rated_taken integer[] := '{}';
    leased bigint[] := '{}';
BEGIN
    FOR q IN
        SELECT n.name, c.concurrency, coalesce(c.paused, false) AS paused, c.rate_limit, c.rate_period,
               c.concurrency_key, c.per_key_concurrency
          FROM (SELECT DISTINCT unnest(queues) AS name) n
          LEFT JOIN baton.queues c ON c.name = n.name
         WHERE n.name IS NOT NULL
         ORDER BY n.name  -- the queues' advisory locks, in one order
    LOOP
        CONTINUE WHEN q.paused;
        slots := want;
        IF q.concurrency IS NOT NULL THEN
            -- counted under the queue's lock, held to the end of the
            -- transaction, so that two claims cannot both take its last slot
            PERFORM pg_advisory_xact_lock(1651797602, hashtext(q.name));
            slots := least(slots, q.concurrency - (SELECT count(*) FROM baton.steps s
                                                    WHERE s.status = 'running' AND s.queue = q.name));
        END IF;
        IF slots > 0 AND q.rate_limit IS NOT NULL THEN
            rated_names := rated_names || q.name;
            rated_periods := rated_periods || (extract(epoch FROM q.rate_period) * 1000000)::bigint;
            rated_taken := rated_taken || baton._rate_take(q.name, q.rate_limit, rated_periods[cardinality(rated_periods)],
                                                           slots, at);
            IF rated_taken[cardinality(rated_taken)] < slots THEN
                -- held back by the limit: its workers hear when claims are
                -- free again (the background worker, src/rate.rs)
                PERFORM baton._wake_scheduler(baton._rate_wake_at(q.name, rated_periods[cardinality(rated_periods)], at));
            END IF;
            slots := rated_taken[cardinality(rated_taken)];
        END IF;
        CONTINUE WHEN slots <= 0;
        IF q.per_key_concurrency IS NOT NULL THEN
            keyed_names := keyed_names || q.name;
            keyed_paths := keyed_paths || q.concurrency_key;
            keyed_limits := keyed_limits || q.per_key_concurrency;
            keyed_slots := keyed_slots || slots;
        ELSE
            plain_names := plain_names || q.name;
            plain_slots := plain_slots || slots;
        END IF;
    END LOOP;

    IF cardinality(plain_names) = 1 THEN
        leased := coalesce(baton._claim_one(worker, plain_names[1], least(plain_slots[1], want), lease), '{}');
    ELSIF cardinality(plain_names) > 1 THEN
        leased := coalesce(baton._claim_many(worker, plain_names, plain_slots, want, lease), '{}');
    END IF;
    FOR i IN 1 .. cardinality(keyed_names) LOOP
        EXIT WHEN cardinality(leased) >= want;
        leased := leased || baton._claim_keyed(worker, keyed_names[i], least(keyed_slots[i], want - cardinality(leased)),
                                               lease, keyed_paths[i], keyed_limits[i]);
    END LOOP;

    -- What a rate-limited queue did not claim (fewer steps were ready) goes
    -- back to its window.
    IF cardinality(rated_names) = 1 AND cardinality(queues) = 1 THEN
        -- (one queue: what it claimed is what was leased)
        IF rated_taken[1] > cardinality(leased) THEN
            PERFORM baton._rate_give_back(rated_names[1], rated_periods[1], rated_taken[1] - cardinality(leased), at);
        END IF;
    ELSIF cardinality(rated_names) > 0 THEN
        PERFORM baton._rate_give_back(r.name, r.period, r.taken - coalesce(c.n, 0)::integer, at)
           FROM unnest(rated_names, rated_periods, rated_taken) AS r(name, period, taken)
           LEFT JOIN (SELECT s.queue, count(*) AS n FROM baton.steps s
                       WHERE s.step_id = ANY (leased) GROUP BY s.queue) c ON c.queue = r.name
          WHERE r.taken > coalesce(c.n, 0);
    END IF;
    RETURN leased;
END $$;

-- Lease up to `want` ready steps of a queue with a per-key limit, in the
-- claim's order, passing over the steps of keys at their limit. A key is
-- counted once per claim, under its own advisory lock (tried, never waited
-- for: a key that another claim is admitting right now is passed over), so
-- two claims can never both admit the last step of one key. A run without a
-- key ('') is not limited.
--
-- The walk in the claim's order passes over the steps of keys at their limit
-- (known from the queue's leases before it starts), reading at most 1,000 of
-- them; past them (one tenant's deep backlog at the head), it goes on key by
-- key (steps_ready_keyed: one probe per key with ready steps), in key order.
CREATE FUNCTION _claim_keyed(worker text, queue text, want integer, lease interval, key_path jsonpath,
                             per_key integer) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c record;
    key text;
    chosen tid[] := '{}';
    seen text[] := '{}';
    allowed integer[] := '{}';
    k integer;
    read integer := 0;
    at_limit text[];
    claimed_now bigint[];
BEGIN
    -- The keys at their limit now, from the queue's leases (steps_flow):
    -- the walk passes over their steps without a look. (Not under the keys'
    -- locks: a key that frees meanwhile waits for the next claim; the keys
    -- this claim admits are counted under their locks below.)
    at_limit := ARRAY(SELECT s.flow_key FROM baton.steps s
                   WHERE s.status = 'running' AND s.queue = _claim_keyed.queue AND s.flow_key IS NOT NULL
                   GROUP BY s.flow_key HAVING count(*) >= per_key);
    FOR c IN
        SELECT r.ctid, r.run_id, r.flow_key AS key
          FROM baton.steps r
         WHERE r.status = 'ready' AND r.queue = _claim_keyed.queue
         ORDER BY r.priority DESC, r.run_at, r.step_id
         -- (at most `want` chosen and 1,000 passed over; the limit also
         -- makes the plan the ordered scan of steps_ready)
         LIMIT want + 1000
    LOOP
        read := read + 1;
        -- (simple expressions where it can: this loop runs per step)
        key := c.key;
        IF key IS NULL THEN  -- made while configure_queue gave the queue its key
            key := baton._flow_key((SELECT u.input FROM baton.runs u WHERE u.id = c.run_id), key_path);
        END IF;
        IF key <> '' AND key = ANY (at_limit) THEN
            CONTINUE;
        ELSIF key <> '' THEN
            k := array_position(seen, key);
            IF k IS NULL THEN  -- a key new to this claim: counted now
                seen := seen || key;
                allowed := allowed || baton._key_free(_claim_keyed.queue, key, per_key);
                k := cardinality(seen);
            END IF;
            CONTINUE WHEN allowed[k] <= 0;
            allowed[k] := allowed[k] - 1;
        END IF;
        chosen := chosen || c.ctid;
        EXIT WHEN cardinality(chosen) >= want;
    END LOOP;

    -- Short, and the walk did not reach the end of the ready steps: key by key.
    IF cardinality(chosen) < want AND read >= want + 1000 THEN
        FOR key IN
            WITH RECURSIVE keys(key) AS (
                SELECT (SELECT min(r.flow_key) FROM baton.steps r
                         WHERE r.status = 'ready' AND r.queue = _claim_keyed.queue AND r.flow_key IS NOT NULL)
                UNION ALL
                SELECT (SELECT min(r.flow_key) FROM baton.steps r
                         WHERE r.status = 'ready' AND r.queue = _claim_keyed.queue AND r.flow_key > keys.key)
                  FROM keys WHERE keys.key IS NOT NULL)
            SELECT keys.key FROM keys WHERE keys.key IS NOT NULL AND NOT (keys.key = ANY (at_limit))
        LOOP
            IF key = '' THEN
                k := NULL;
            ELSE
                k := array_position(seen, key);
                IF k IS NULL THEN
                    seen := seen || key;
                    allowed := allowed || baton._key_free(_claim_keyed.queue, key, per_key);
                    k := cardinality(seen);
                END IF;
                CONTINUE WHEN allowed[k] <= 0;
            END IF;
            chosen := chosen || ARRAY(
                SELECT r.ctid FROM baton.steps r
                 WHERE r.status = 'ready' AND r.queue = _claim_keyed.queue AND r.flow_key = key
                   AND NOT (r.ctid = ANY (chosen))
                 ORDER BY r.priority DESC, r.run_at, r.step_id
                 LIMIT least(coalesce(allowed[k], want), want - cardinality(chosen)));
            IF k IS NOT NULL THEN
                allowed[k] := 0;  -- (its head was taken up to its allowance)
            END IF;
            EXIT WHEN cardinality(chosen) >= want;
        END LOOP;
    END IF;
    IF cardinality(chosen) = 0 THEN
        RETURN '{}';
    END IF;

    claimed_now := (baton._lease_picked(chosen, worker, lease, key_path)).step_ids;
    RETURN coalesce(claimed_now, '{}');
END $$;

-- How many more steps of `key` may run now: 0 when another claim is
-- admitting it at this moment (its lock is held). A statement of its own
-- after the lock, so that its snapshot sees the leases of the claim that
-- held it.
CREATE FUNCTION _key_free(queue text, key text, per_key integer) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(1651797603, hashtext(queue || E'\n' || key)) THEN
        RETURN 0;
    END IF;
    RETURN per_key - (SELECT count(*) FROM baton.steps s
                       WHERE s.status = 'running' AND s.queue = _key_free.queue AND s.flow_key = _key_free.key);
END $$;
