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
-- claim's order, passing over the steps of keys at their limit. A run without
-- a key ('') is not limited.
--
-- A round is one statement. Its walk is a claim like _claim_one's: the next
-- ready steps that no other claim holds (SKIP LOCKED), so that concurrent
-- claims take different steps instead of racing for the same head. Each key
-- it met is then counted under the key's advisory lock (_key_room), so that
-- two claims never both admit a key's last slot; the steps each key may
-- still run are leased. Steps turned away (their key is at its limit) stay
-- locked by this claim to its end, as other claims would turn them away too;
-- the next round's walk passes over their keys without a lock, a few rounds
-- at most.
--
-- A deep backlog of keys at their limit (1,000 ready steps or more) would
-- make every walk pass over all of it: then the claim goes key by key
-- (_claim_by_key).
CREATE FUNCTION _claim_keyed(worker text, queue text, want integer, lease interval, key_path jsonpath,
                             per_key integer) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    skip text[] := '{}';        -- keys the walk passes over: seen at their limit
    held tid[] := '{}';         -- every step this claim locked
    leased bigint[] := '{}';
    asked integer;
    walked tid[];
    now_leased bigint[];
    full_keys text[];
    patience integer := 5;
BEGIN
    FOR turn IN 1 .. 4 LOOP
        asked := want - cardinality(leased);
        WITH p AS MATERIALIZED (
            SELECT r.ctid, r.priority, r.run_at, r.step_id,
                   -- (NULL: made while configure_queue gave the queue its key)
                   coalesce(r.flow_key, baton._flow_key((SELECT u.input FROM baton.runs u WHERE u.id = r.run_id),
                                                        key_path)) AS key
              FROM baton.steps r
             WHERE r.status = 'ready' AND r.queue = _claim_keyed.queue
               AND NOT coalesce(r.flow_key = ANY (skip), false) AND NOT (r.ctid = ANY (held))
             ORDER BY r.priority DESC, r.run_at, r.step_id
             LIMIT asked
               FOR UPDATE SKIP LOCKED
        ), room AS MATERIALIZED (
            -- (in the order of the locks' keys)
            SELECT x.key, baton._key_room(_claim_keyed.queue, x.key, per_key, patience) AS free
              FROM (SELECT k.key FROM (SELECT DISTINCT p.key FROM p WHERE p.key <> '') k
                     ORDER BY hashtext(_claim_keyed.queue || E'\n' || k.key)) x
        ), judged AS MATERIALIZED (
            SELECT r.ctid, r.key, r.key = '' OR r.rank <= coalesce(f.free, 0) AS ok
              FROM (SELECT p.ctid, p.key,
                           row_number() OVER (PARTITION BY p.key ORDER BY p.priority DESC, p.run_at, p.step_id) AS rank
                      FROM p) r
              LEFT JOIN room f ON f.key = r.key
        ), claimed AS (
            -- the steps are locked by the walk: by ctid, as in _claim_one
            UPDATE baton.steps s
               SET status = 'running',
                   attempt = s.attempt + 1,
                   worker = _claim_keyed.worker,
                   lease_token = gen_random_uuid(),
                   -- from the clock, not now() (see _claim_one)
                   lease_expires_at = clock_timestamp() + CASE WHEN s.timeout IS NULL THEN _claim_keyed.lease
                                                               ELSE least(_claim_keyed.lease, s.timeout) END,
                   started_at = now(),
                   flow_key = (SELECT j.key FROM judged j WHERE j.ctid = s.ctid)
             WHERE s.ctid = ANY (ARRAY(SELECT j.ctid FROM judged j WHERE j.ok))
            RETURNING s.step_id, s.run_id
        ), started AS (
            UPDATE baton.runs r SET status = 'running', started_at = now()
             WHERE r.id = ANY (ARRAY(SELECT c.run_id FROM claimed c)) AND r.status = 'pending'
        )
        SELECT (SELECT array_agg(p.ctid) FROM p),
               (SELECT array_agg(c.step_id) FROM claimed c),
               (SELECT array_agg(DISTINCT j.key) FROM judged j WHERE NOT j.ok)
          INTO walked, now_leased, full_keys;
        -- (the first round waits a little for a key that another claim is
        -- admitting: passing over its steps would make this claim walk on)
        patience := 0;
        EXIT WHEN walked IS NULL;
        held := held || walked;
        leased := leased || coalesce(now_leased, '{}');
        -- done, or no ready step is left that no other claim holds
        EXIT WHEN cardinality(leased) >= want OR cardinality(walked) < asked;
        skip := skip || full_keys;
        -- The keys at their limit with a deep backlog of ready steps: the
        -- next walk would pass over all of it.
        IF (SELECT count(*) FROM (SELECT FROM unnest(skip) AS x(key)
                                   CROSS JOIN LATERAL (SELECT FROM baton.steps r
                                                        WHERE r.status = 'ready' AND r.queue = _claim_keyed.queue
                                                          AND r.flow_key = x.key LIMIT 1000) r
                                   LIMIT 1000) d) >= 1000 THEN
            RETURN leased || baton._claim_by_key(worker, queue, want - cardinality(leased), lease, per_key, skip);
        END IF;
    END LOOP;
    RETURN leased;
END $$;

-- How many more steps of `key` may run now, counted under the key's advisory
-- lock, held to the end of the transaction. The lock is tried, and tried
-- again after a millisecond up to `patience` times, never waited for: a
-- claim admitting the key holds it only to its commit, but a transaction
-- that claimed and stays open holds it to its end, and no claim may hang
-- behind that (nor wait in a cycle with another claim); 0 when it is still
-- held. VOLATILE, so that its count, a statement after the lock, has a
-- snapshot of its own that sees the leases of every claim that held the
-- lock before, also when it is called from a statement that began earlier.
CREATE FUNCTION _key_room(queue text, key text, per_key integer, patience integer) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    FOR i IN 0 .. patience LOOP
        EXIT WHEN pg_try_advisory_xact_lock(1651797603, hashtext(queue || E'\n' || key));
        IF i = patience THEN
            RETURN 0;
        END IF;
        PERFORM pg_sleep(0.001);
    END LOOP;
    RETURN per_key - (SELECT count(*) FROM baton.steps s
                       WHERE s.status = 'running' AND s.queue = _key_room.queue AND s.flow_key = _key_room.key);
END $$;

-- _claim_keyed over a deep backlog of keys at their limit: every other key
-- with ready steps (one probe of steps_ready_keyed per key, at most 1,000
-- keys, in key order), counted as in _claim_keyed (tried, not waited for);
-- the head of each key up to what it may run; the best `want` of those heads
-- in the claim's order, leased if no other claim took them meanwhile (SKIP
-- LOCKED).
CREATE FUNCTION _claim_by_key(worker text, queue text, want integer, lease interval, per_key integer,
                              skip text[]) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    chosen tid[];
BEGIN
    WITH RECURSIVE k(key) AS (
        SELECT (SELECT min(r.flow_key) FROM baton.steps r
                 WHERE r.status = 'ready' AND r.queue = _claim_by_key.queue AND r.flow_key IS NOT NULL)
        UNION ALL
        SELECT (SELECT min(r.flow_key) FROM baton.steps r
                 WHERE r.status = 'ready' AND r.queue = _claim_by_key.queue AND r.flow_key > k.key)
          FROM k WHERE k.key IS NOT NULL
    ), room AS MATERIALIZED (
        SELECT x.key, CASE WHEN x.key = '' THEN want ELSE baton._key_room(_claim_by_key.queue, x.key, per_key, 0) END AS free
          FROM (SELECT k.key FROM k WHERE k.key IS NOT NULL AND NOT (k.key = ANY (skip)) LIMIT 1000) x
    )
    SELECT array_agg(h.ctid ORDER BY h.priority DESC, h.run_at, h.step_id) INTO chosen
      FROM (SELECT h.* FROM room f
             CROSS JOIN LATERAL (
                   SELECT r.ctid, r.priority, r.run_at, r.step_id FROM baton.steps r
                    WHERE r.status = 'ready' AND r.queue = _claim_by_key.queue AND r.flow_key = f.key
                    ORDER BY r.priority DESC, r.run_at, r.step_id
                    LIMIT greatest(least(f.free, want), 0)) h
             ORDER BY h.priority DESC, h.run_at, h.step_id
             LIMIT want) h;
    IF chosen IS NULL THEN
        RETURN '{}';
    END IF;
    RETURN coalesce((baton._lease_picked(chosen, worker, lease)).step_ids, '{}');
END $$;
