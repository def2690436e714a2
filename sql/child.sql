-- Child workflows: a "workflow" step starts one run of another workflow per
-- attempt and ends with it; a run that ends early (failed, cancelled, past
-- its deadline) takes its unfinished children with it.
--
-- Lock order across runs: a transition holds its own run's lock and only
-- ever *tries* another run's (pg_try_advisory_xact_lock), so that a parent
-- and a child, each finishing at once, can never wait on each other. When
-- the try fails, the work is left as a signal that the background worker
-- does within milliseconds (it is woken at commit).

-- Work one run left for another (see above): 'child_finished' (run_id is the
-- parent, from_run the child) or 'cancel' (run_id is the child).
CREATE TABLE run_signals (
    run_id      uuid        NOT NULL,
    seq         bigint      GENERATED ALWAYS AS IDENTITY,
    signal      text        NOT NULL,
    from_run    uuid        NOT NULL,
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);

-- The idempotency key of the child run of a step's attempt: exactly one
-- child per attempt, also when the step is started twice.
CREATE FUNCTION _child_key(parent uuid, step text, attempt integer) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN format('baton:child:%s:%s:%s', parent, step, attempt);
END $$;

-- A workflow step is reached: start its child run, with input
-- {"input": parent's input, "upstream": {step: output}}, and wait for it.
-- The step's "timeout" is the child's deadline.
CREATE FUNCTION _start_child(s baton.steps, def jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    wf baton.workflows;
    child uuid;
BEGIN
    s := baton._begin_attempt(s, 'infinity');
    SELECT * INTO wf FROM baton.workflows w WHERE w.name = def ->> 'workflow' ORDER BY w.version DESC LIMIT 1;
    IF NOT FOUND THEN
        PERFORM baton._end_attempt(s, 'failed', format('child workflow "%s" is not defined', def ->> 'workflow'), false);
        RETURN;
    END IF;
    child := baton._enqueue(wf, baton._step_document(s), baton._child_key(s.run_id, s.name, s.attempt), NULL, s.priority,
                            now(), now() + (def ->> 'timeout')::interval, s.run_id, s.step_no);
    -- a child that finished while it started (it had nothing to wait for)
    -- has told this step already, under this run's lock (held)
END $$;

-- A run with a parent finished: its parent's step ends with it, now if the
-- parent's lock is free, else by a signal.
CREATE FUNCTION _child_finished(child uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c baton.runs;
BEGIN
    SELECT * INTO c FROM baton.runs r WHERE r.id = child;
    IF c.parent_id IS NULL THEN
        RETURN;
    END IF;
    IF baton._try_lock_run(c.parent_id) THEN
        PERFORM baton._child_done(c.parent_id, child);
    ELSE
        INSERT INTO baton.run_signals (run_id, signal, from_run) VALUES (c.parent_id, 'child_finished', child);
        PERFORM baton._wake_scheduler(now());
    END IF;
END $$;

-- The parent's side (its lock held): the step that started `child`, if it
-- still waits for that child (the same attempt), succeeds with the child's
-- output, or fails and follows its retry rules (a retry starts a new child).
CREATE FUNCTION _child_done(parent uuid, child uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c baton.runs;
    s baton.steps;
BEGIN
    SELECT * INTO c FROM baton.runs r WHERE r.id = child;
    IF NOT FOUND THEN
        -- Deleted (delete_workflow with force) before its parent heard of
        -- it: a step still waiting for a child that no longer exists fails
        -- this attempt, and follows its retry rules (a retry starts a new
        -- child), instead of waiting for ever.
        FOR s IN SELECT * FROM baton.steps t
                  WHERE t.run_id = parent AND t.status = 'waiting' AND t.kind = 'workflow'
                  ORDER BY t.step_no FOR UPDATE LOOP
            IF NOT EXISTS (SELECT FROM baton.runs x
                            WHERE x.parent_id = parent AND x.parent_step_no = s.step_no
                              AND x.idempotency_key = baton._child_key(parent, s.name, s.attempt)) THEN
                PERFORM baton._end_attempt(s, 'failed', format('child run %s was deleted', child), true);
            END IF;
        END LOOP;
        RETURN;
    END IF;
    SELECT * INTO s FROM baton.steps t WHERE t.run_id = parent AND t.step_no = c.parent_step_no FOR UPDATE;
    IF NOT FOUND OR s.status <> 'waiting' OR s.kind <> 'workflow'
       OR c.idempotency_key IS DISTINCT FROM baton._child_key(parent, s.name, s.attempt)
       OR c.status NOT IN ('succeeded', 'failed', 'cancelled') THEN
        RETURN;
    END IF;
    IF c.status = 'succeeded' THEN
        PERFORM baton._succeed_step(parent, s.step_no, c.output);
    ELSE
        -- (a child cancelled by cancel_workflow has no error to add)
        PERFORM baton._end_attempt(s, 'failed', format('child run %s %s', child, c.status) || coalesce(': ' || c.error, ''),
                                   true);
    END IF;
END $$;

-- A run ended early: its unfinished child runs are cancelled, now for those
-- whose lock is free, by a signal for the others. The caller holds the
-- run's lock; nowait as for _finish_run.
CREATE FUNCTION _cancel_children(run_id uuid, status text, nowait boolean) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    child uuid;
BEGIN
    FOR child IN SELECT r.id FROM baton.runs r WHERE r.parent_id = run_id AND r.finished_at IS NULL ORDER BY r.id LOOP
        IF baton._try_lock_run(child) THEN
            PERFORM baton._finish_run(child, 'cancelled', format('parent run %s %s', run_id, status), nowait);
        ELSE
            INSERT INTO baton.run_signals (run_id, signal, from_run, reason)
            VALUES (child, 'cancel', run_id, format('parent run %s %s', run_id, status));
            PERFORM baton._wake_scheduler(now());
        END IF;
    END LOOP;
END $$;

-- The background worker does the signals that could not be done at once,
-- oldest first; one whose run is busy waits for a later round.
CREATE FUNCTION _do_signals(batch integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    g baton.run_signals;
    done integer := 0;
BEGIN
    FOR g IN SELECT * FROM baton.run_signals ORDER BY created_at, seq LIMIT batch FOR UPDATE SKIP LOCKED LOOP
        BEGIN
            CONTINUE WHEN NOT baton._try_lock_run(g.run_id);
            IF g.signal = 'child_finished' THEN
                PERFORM baton._child_done(g.run_id, g.from_run);
            ELSIF EXISTS (SELECT FROM baton.runs r WHERE r.id = g.run_id AND r.finished_at IS NULL) THEN
                PERFORM baton._finish_run(g.run_id, 'cancelled', g.reason, true);
            END IF;
            DELETE FROM baton.run_signals x WHERE x.run_id = g.run_id AND x.seq = g.seq;
            done := done + 1;
        EXCEPTION
            WHEN lock_not_available THEN
                NULL;  -- a step of the run is held by an open transaction: next round
        END;
    END LOOP;
    RETURN done;
END $$;
