-- Events: send_event into a run (a wait_event step or a suspended step takes
-- it), and set_event / get_event for what a run publishes while it goes on.

-- Events sent to a run, kept until a step takes them (then marked, as
-- history), so that an event sent before its step is reached is not lost.
CREATE TABLE events (
    run_id       uuid        NOT NULL,
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    name         text        NOT NULL,
    payload      jsonb,
    sent_at      timestamptz NOT NULL DEFAULT now(),
    consumed_at  timestamptz,
    consumed_by  bigint,     -- the step_id that took it
    PRIMARY KEY (run_id, seq)
);
-- The events of a run not taken yet, oldest first per name.
CREATE INDEX events_pending ON events (run_id, name, seq) WHERE consumed_at IS NULL;

-- What a run publishes (set_event): one value per key, the latest wins.
CREATE TABLE event_values (
    run_id  uuid        NOT NULL,
    key     text        NOT NULL,
    value   jsonb,
    set_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, key)
);

-- Take the oldest event of that name not taken yet, for step `step_id`:
-- its payload, or taken => false. The caller holds the run lock.
CREATE FUNCTION _take_event(run_id uuid, name text, step_id bigint, OUT taken boolean, OUT payload jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    UPDATE baton.events e SET consumed_at = now(), consumed_by = step_id
     WHERE e.run_id = run_id
       AND e.seq = (SELECT p.seq FROM baton.events p
                     WHERE p.run_id = run_id AND p.name = name AND p.consumed_at IS NULL
                     ORDER BY p.seq LIMIT 1)
    RETURNING e.payload INTO payload;
    taken := FOUND;
END $$;

-- A wait_event step is reached: an event already sent completes it now;
-- else it waits, until its timeout when it has one.
CREATE FUNCTION _start_wait(s baton.steps, def jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    taken record;
BEGIN
    taken := baton._take_event(s.run_id, def ->> 'wait_event', s.step_id);
    IF taken.taken THEN
        PERFORM baton._begin_attempt(s, 'infinity');
        PERFORM baton._succeed_step(s.run_id, s.step_no, taken.payload);
    ELSE
        PERFORM baton._begin_attempt(s, coalesce(now() + (def ->> 'timeout')::interval, 'infinity'),
                                     def ->> 'wait_event');
    END IF;
END $$;

-- A suspended task step gets its event (or its timeout: payload null,
-- timed_out): the checkpoint "event:<name>" says which, and the step is
-- ready again. The caller holds the run lock and the step row.
CREATE FUNCTION _wake_suspended(s baton.steps, name text, payload jsonb, timed_out boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF name IS NOT NULL THEN
        INSERT INTO baton.checkpoints AS k (run_id, step_id, key, value, attempt)
        VALUES (s.run_id, s.step_id, 'event:' || name,
                jsonb_build_object('event', name, 'payload', payload, 'timed_out', timed_out), s.attempt)
        ON CONFLICT (run_id, step_id, key)
        DO UPDATE SET value = excluded.value, attempt = excluded.attempt, saved_at = now();
    END IF;
    UPDATE baton.steps t SET status = 'ready', run_at = now(), wait_for = NULL
     WHERE t.run_id = s.run_id AND t.step_no = s.step_no;
    PERFORM pg_notify('baton_ready', s.queue);
END $$;

CREATE FUNCTION send_event(workflow_id uuid, name text, payload jsonb DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    s baton.steps;
BEGIN
    PERFORM baton._require(workflow_id, 'workflow_id');
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'name must be a non-empty event name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(name, 'name');
    PERFORM baton._lock_run(workflow_id);
    -- a client signals its own runs; a worker any (it sees every run it claims)
    IF NOT EXISTS (SELECT FROM baton.runs r
                    WHERE r.id = workflow_id AND (baton._visible(r.enqueued_by) OR baton._holds('worker'))) THEN
        RAISE EXCEPTION 'workflow run % does not exist', workflow_id USING ERRCODE = 'undefined_object';
    END IF;

    -- A step waiting for it takes it now; else it is kept for the step
    -- that will (oldest waiting step first, by its position).
    SELECT * INTO s FROM baton.steps t
     WHERE t.run_id = workflow_id AND t.status = 'waiting' AND t.wait_for = name
     ORDER BY t.step_no LIMIT 1
       FOR UPDATE;
    INSERT INTO baton.events (run_id, name, payload, consumed_at, consumed_by)
    VALUES (workflow_id, name, payload, CASE WHEN s.step_id IS NOT NULL THEN now() END, s.step_id);
    IF s.step_id IS NULL THEN
        RETURN false;
    END IF;
    IF s.kind = 'event' THEN
        PERFORM baton._succeed_step(s.run_id, s.step_no, payload);
    ELSE
        PERFORM baton._wake_suspended(s, name, payload, false);
    END IF;
    RETURN true;
END $$;

CREATE FUNCTION set_event(workflow_id uuid, key text, value jsonb) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    PERFORM baton._require(workflow_id, 'workflow_id');
    IF key IS NULL OR key = '' THEN
        RAISE EXCEPTION 'key must be a non-empty text' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(key, 'key', 1000);
    IF NOT EXISTS (SELECT FROM baton.runs r WHERE r.id = workflow_id) THEN
        RAISE EXCEPTION 'workflow run % does not exist', workflow_id USING ERRCODE = 'undefined_object';
    END IF;
    INSERT INTO baton.event_values AS v (run_id, key, value) VALUES (workflow_id, key, value)
    ON CONFLICT ON CONSTRAINT event_values_pkey DO UPDATE SET value = excluded.value, set_at = now();
    -- waiters (client.wait_event_value) hear of it at commit
    PERFORM pg_notify('baton_event', workflow_id::text || ':' || key);
END $$;

CREATE FUNCTION get_event(workflow_id uuid, key text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_variable
BEGIN
    PERFORM baton._require(workflow_id, 'workflow_id');
    PERFORM baton._require(key, 'key');
    -- another role's run has no values, for a client (sql/role.sql)
    RETURN (SELECT v.value FROM baton.event_values v JOIN baton.runs r ON r.id = v.run_id
             WHERE v.run_id = workflow_id AND v.key = key
               AND (baton._visible(r.enqueued_by) OR baton._holds('worker')));
END $$;
