-- Setup for the pg_baton regression suite. run.sh creates a fresh database for
-- every run, so the extension is created here and every later test relies on it.
CREATE EXTENSION pg_baton;

-- The extension lives in its own schema, with the objects the protocol promises.
SELECT extname, extnamespace::regnamespace AS schema, extrelocatable
  FROM pg_extension WHERE extname = 'pg_baton';

-- The protocol's functions and what they return (other functions may exist).
SELECT f.name, p.proname IS NOT NULL AS exists,
       pg_get_function_result(p.oid) = f.returns AS returns_ok
  FROM (VALUES ('define_workflow', 'integer'),
               ('enqueue_workflow', 'uuid'),
               ('claim_steps', 'TABLE(step_id bigint, lease_token uuid, workflow_id uuid, workflow text, step text, attempt integer, input jsonb, upstream jsonb, checkpoints jsonb, lease_expires_at timestamp with time zone, map_index integer, map_item jsonb)'),
               ('complete_step', 'text'),
               ('fail_step', 'text'),
               ('heartbeat', 'timestamp with time zone'),
               ('checkpoint', 'void'),
               ('cancel_workflow', 'boolean'),
               ('configure_queue', 'void'),
               ('send_event', 'boolean'),
               ('set_event', 'void'),
               ('get_event', 'jsonb'),
               ('suspend_step', 'void'),
               ('schedule', 'void'),
               ('unschedule', 'boolean'),
               ('_tick', 'jsonb')) AS f(name, returns)
  LEFT JOIN pg_proc p ON p.proname = f.name AND p.pronamespace = 'baton'::regnamespace
 ORDER BY f.name;

SELECT c.relname, c.relkind
  FROM pg_class c
 WHERE c.relnamespace = 'baton'::regnamespace AND c.relkind IN ('r', 'v')
 ORDER BY c.relname;

-- Helpers shared by the following tests (they live in public, so every test
-- session of this database sees them).
--
-- steps_left(run): how many steps of the run have not succeeded.
CREATE FUNCTION public.steps_left(run uuid) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM baton.steps s WHERE s.run_id = run AND s.status <> 'succeeded'
$$;

-- sqlstate_of(sql): run one statement and report how it ended: 'ok', or
-- "SQLSTATE: message". The statement runs in a subtransaction, so a failing one
-- leaves nothing behind. Uuids in messages are masked, and so are the step ids
-- in "lease lost" (BT001) messages, so that expected output does not depend on
-- how many steps earlier tests created.
CREATE FUNCTION public.sqlstate_of(sql text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    msg text;
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    msg := regexp_replace(SQLERRM,
        '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<uuid>', 'g');
    IF SQLSTATE = 'BT001' THEN
        msg := regexp_replace(msg, 'step \d+', 'step N', 'g');
    END IF;
    RETURN SQLSTATE || ': ' || msg;
END $$;

SELECT sqlstate_of('SELECT 1');
SELECT sqlstate_of('SELECT 1/0');

-- buffers_of(sql): the shared buffers one statement reads (hits and reads),
-- by EXPLAIN (ANALYZE, BUFFERS): it runs the statement. A scan of steps reads
-- hundreds or thousands; a claim or a turn by key reads a few dozen.
CREATE FUNCTION public.buffers_of(sql text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    plan jsonb;
BEGIN
    EXECUTE 'EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ' || sql INTO plan;
    RETURN (plan -> 0 -> 'Plan' ->> 'Shared Hit Blocks')::integer
         + (plan -> 0 -> 'Plan' ->> 'Shared Read Blocks')::integer;
END $$;

-- make_due(): scheduled steps whose run_at has passed become ready, as the
-- background worker's round makes them (the worker serves another database;
-- tick.sql and hardening.sql test the round itself). Returns how many.
CREATE FUNCTION public.make_due() RETURNS bigint
LANGUAGE sql AS $$
    WITH due AS (UPDATE baton.steps SET status = 'ready'
                  WHERE status = 'scheduled' AND run_at <= now() RETURNING 1)
    SELECT count(*) FROM due
$$;

-- cancel_unfinished_runs(): cancel every pending or running run; tests call
-- it at their end so that nothing they leave leased can expire under a later
-- test. Returns true (the count of cancelled runs depends on the test).
CREATE FUNCTION public.cancel_unfinished_runs() RETURNS boolean
LANGUAGE sql AS $$
    SELECT count(baton.cancel_workflow(r.id)) >= 0
      FROM baton.runs r WHERE r.status IN ('pending', 'running')
$$;
SELECT cancel_unfinished_runs();

-- CALL wait_until(condition): evaluate a boolean SQL expression every 50 ms
-- until it holds (ok: true) or `seconds` pass (ok: false), for the tests of
-- time (sleeps, timeouts, deadlines). A procedure, so that each poll is a
-- transaction of its own: it sees what the background worker commits
-- meanwhile, and what it fires itself gets the time it fired (now()). When
-- the worker serves another database (baton.database), the helper fires the
-- due timers itself between polls, as the worker's round would
-- (baton._fire_timers), so that the tests pass either way. (A timer fires
-- when the clock passes its time, and what it does is stamped with now(),
-- the start of its transaction, a little earlier: tests of elapsed times
-- allow 20 ms.)
CREATE PROCEDURE public.wait_until(condition text, seconds float8 DEFAULT 10, INOUT ok boolean DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    stop timestamptz := clock_timestamp() + make_interval(secs => seconds);
    served boolean := current_setting('baton.database', true) IS NOT DISTINCT FROM current_database();
BEGIN
    LOOP
        EXECUTE 'SELECT (' || condition || ')' INTO ok;
        IF ok THEN
            RETURN;
        ELSIF clock_timestamp() > stop THEN
            ok := false;
            RETURN;
        END IF;
        PERFORM pg_sleep(0.05);
        COMMIT;  -- now() is from here
        IF NOT served THEN
            PERFORM baton._fire_timers();
        END IF;
    END LOOP;
END $$;

-- run_status(run): the run's status, for wait_until conditions.
CREATE FUNCTION public.run_status(run uuid) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT status::text FROM baton.runs WHERE id = run
$$;

-- step_status(run, step): the status of the run's step of that name (the
-- step itself, not a map item).
CREATE FUNCTION public.step_status(run uuid, step text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT status::text FROM baton.steps WHERE run_id = run AND name = step AND map_index IS NULL
$$;

CALL wait_until('true');
CALL wait_until('false', 0.2);
