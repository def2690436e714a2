-- Schedules: a workflow run per cron tick, kept by the background worker.
-- Unlike a cron job, each tick is a durable run (retries, history, views).
-- A tick enqueues through the idempotent enqueue with the key
-- schedule:<name>:<tick in UTC>, so that it makes exactly one run, however
-- many backends fire it and across restarts. After downtime only the most
-- recent missed tick fires.

CREATE TABLE schedule_entries (
    name         text        PRIMARY KEY,
    cron         text        NOT NULL,
    timezone     text        NOT NULL DEFAULT 'UTC',
    workflow     text        NOT NULL,
    input        jsonb       NOT NULL DEFAULT '{}',
    overlap      text        NOT NULL DEFAULT 'allow',   -- 'allow' or 'skip'
    paused       boolean     NOT NULL DEFAULT false,
    next_run_at  timestamptz NOT NULL,
    last_run_at  timestamptz,                            -- the tick of the last run
    last_run_id  uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
-- The background worker's probe for the next tick.
CREATE INDEX schedule_entries_next_run_at ON schedule_entries (next_run_at) WHERE NOT paused;

-- Cron arithmetic in timestamptz (src/cron.rs works in epoch seconds, and
-- ticks are whole seconds: see there for how daylight-saving days are met).
CREATE FUNCTION _cron_next(cron text, timezone text, after timestamptz) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN to_timestamp(baton._cron_next_epoch(cron, timezone, extract(epoch FROM after)::float8));
END $$;

CREATE FUNCTION _cron_prev(cron text, timezone text, at timestamptz) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN to_timestamp(baton._cron_prev_epoch(cron, timezone, extract(epoch FROM at)::float8));
END $$;

CREATE FUNCTION schedule(name text, cron text, workflow text, input jsonb DEFAULT '{}', timezone text DEFAULT 'UTC',
                         overlap text DEFAULT 'allow', paused boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    next timestamptz;
BEGIN
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'name must be a non-empty schedule name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(name, 'name');
    PERFORM baton._require(cron, 'cron');
    PERFORM baton._require(workflow, 'workflow');
    PERFORM baton._require(timezone, 'timezone');
    IF overlap IS NULL OR overlap NOT IN ('allow', 'skip') THEN
        RAISE EXCEPTION 'overlap must be ''allow'' or ''skip'', got %', coalesce(quote_literal(overlap), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT FROM baton.workflows w WHERE w.name = workflow) THEN
        RAISE EXCEPTION 'unknown workflow "%"', workflow
            USING ERRCODE = 'undefined_object', HINT = 'Define it first with baton.define_workflow.';
    END IF;
    next := baton._cron_next(cron, timezone, now());   -- checks cron and timezone (22023)
    INSERT INTO baton.schedule_entries AS c (name, cron, timezone, workflow, input, overlap, paused, next_run_at)
    VALUES (name, cron, timezone, workflow, coalesce(input, '{}'), overlap, coalesce(paused, false), next)
    ON CONFLICT ON CONSTRAINT schedule_entries_pkey DO UPDATE
       SET cron = excluded.cron, timezone = excluded.timezone, workflow = excluded.workflow, input = excluded.input,
           overlap = excluded.overlap, paused = excluded.paused, next_run_at = excluded.next_run_at, updated_at = now();
    PERFORM baton._wake_scheduler(next);
END $$;

CREATE FUNCTION unschedule(name text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    DELETE FROM baton.schedule_entries c WHERE c.name = name;
    RETURN FOUND;
END $$;

-- Fire the schedules whose tick came (the background worker's round, or any
-- session: racing callers skip each other's rows, and the idempotency key
-- makes one run per tick whatever happens).
CREATE FUNCTION _fire_schedules(at timestamptz, batch integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    c baton.schedule_entries;
    tick timestamptz;
    run uuid;
    fired integer := 0;
BEGIN
    FOR c IN SELECT * FROM baton.schedule_entries d WHERE NOT d.paused AND d.next_run_at <= at
              ORDER BY d.next_run_at LIMIT batch FOR UPDATE SKIP LOCKED
    LOOP
        BEGIN
            -- the most recent tick that came: after downtime, the missed
            -- ones before it are not made up
            tick := greatest(c.next_run_at, baton._cron_prev(c.cron, c.timezone, at));
            IF c.overlap = 'skip' AND c.last_run_id IS NOT NULL
               AND EXISTS (SELECT FROM baton.runs r WHERE r.id = c.last_run_id AND r.finished_at IS NULL) THEN
                RAISE DEBUG 'pg_baton: schedule "%" skips its tick % (run % is unfinished)', c.name, tick, c.last_run_id;
            ELSE
                run := baton.enqueue_workflow(c.workflow, c.input,
                           idempotency_key => format('schedule:%s:%s', c.name,
                                                     to_char(tick AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')));
                UPDATE baton.schedule_entries d SET last_run_at = tick, last_run_id = run WHERE d.name = c.name;
                fired := fired + 1;
            END IF;
            UPDATE baton.schedule_entries d SET next_run_at = baton._cron_next(c.cron, c.timezone, greatest(at, tick))
             WHERE d.name = c.name;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pg_baton: schedule "%" could not fire its tick: % (SQLSTATE %); trying again in a minute',
                c.name, SQLERRM, SQLSTATE;
            UPDATE baton.schedule_entries d SET next_run_at = at + interval '1 minute' WHERE d.name = c.name;
        END;
    END LOOP;
    RETURN fired;
END $$;
