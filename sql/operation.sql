-- Operating runs: resume, retry from a step, fork, delete and purge, and the
-- run log that records what each did.
--
-- Each is one transition under the run's lock, like every other one (lock
-- order: the run's advisory lock, then its step rows, then its run row), in
-- the caller's transaction. A refusal is an ERROR: 42704 for an unknown run
-- or step, 55000 for a run in the wrong state, 22023 for a bad argument.
-- Versions: a run stays on the version it started with, also when it is
-- resumed or retried; a fork may take another one.

-- What operations did to a run, oldest first (the workflow_log view).
CREATE TABLE run_log (
    run_id  uuid        NOT NULL,
    seq     bigint      GENERATED ALWAYS AS IDENTITY,
    at      timestamptz NOT NULL DEFAULT now(),
    action  text        NOT NULL,
    step    text,
    detail  jsonb,
    -- the calling role (inside the protocol's functions current_user is their owner)
    actor   text        NOT NULL DEFAULT baton._invoker()::regrole::text,
    PRIMARY KEY (run_id, seq)
);

CREATE FUNCTION _log(run_id uuid, action text, step text, detail jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO baton.run_log (run_id, action, step, detail) VALUES (run_id, action, step, detail);
END $$;

-- A run by id; 42704 when there is none.
CREATE FUNCTION _existing_run(id uuid) RETURNS baton.runs
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    r baton.runs;
BEGIN
    PERFORM baton._require(id, 'id');
    SELECT * INTO r FROM baton.runs x WHERE x.id = id;
    -- a client's view of another role's run is none (sql/role.sql)
    IF NOT FOUND OR NOT baton._visible(r.enqueued_by) THEN
        RAISE EXCEPTION 'workflow run % does not exist', id USING ERRCODE = 'undefined_object';
    END IF;
    RETURN r;
END $$;

-- The run an operation is on, under its lock (taken before it is read).
-- A finished run's row is locked too: purge deletes finished runs by their
-- row lock alone (SKIP LOCKED), so that it never takes a lock per run, and
-- only operations touch a finished run, so locking its row before its steps
-- cannot meet a claim (which locks steps, then the run row).
CREATE FUNCTION _operated_run(id uuid) RETURNS baton.runs
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    r baton.runs;
BEGIN
    PERFORM baton._require(id, 'id');
    PERFORM baton._lock_run(id);
    r := baton._existing_run(id);
    IF r.finished_at IS NOT NULL THEN
        PERFORM 1 FROM baton.runs x WHERE x.id = id FOR UPDATE;
        IF NOT FOUND THEN  -- purged meanwhile
            r := baton._existing_run(id);
        END IF;
    END IF;
    RETURN r;
END $$;

CREATE FUNCTION _wrong_state(r baton.runs, operation text, allowed text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cannot %: workflow run % is %', operation, r.id, r.status
        USING ERRCODE = 'object_not_in_prerequisite_state', HINT = format('%s works on runs that are %s.', operation, allowed);
END $$;

-- A step of the run by name (not a map item); 42704 when there is none.
CREATE FUNCTION _step_no_of(r baton.runs, step text) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    n integer;
BEGIN
    PERFORM baton._require(step, 'step');
    SELECT s.step_no INTO n FROM baton.steps s WHERE s.run_id = r.id AND s.name = step AND s.map_index IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'workflow run % has no step "%"', r.id, step USING ERRCODE = 'undefined_object';
    END IF;
    RETURN n;
END $$;

-- A step and every step downstream of it, as step numbers of a definition.
CREATE FUNCTION _downstream_closure(definition jsonb, step_no integer) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN ARRAY(
        WITH RECURSIVE d(n) AS (
            SELECT step_no
            UNION
            SELECT e::integer FROM d, jsonb_array_elements_text(definition -> 'steps' -> d.n -> 'downstream') e)
        SELECT n FROM d ORDER BY n);
END $$;

-- Run a finished run's steps again: those in `again` (succeeded or not) and
-- every one that did not succeed, each with a fresh attempt budget (its
-- attempts go on from the number they reached, so the history keeps every
-- one). Succeeded steps outside `again` keep their outputs. A map step run
-- again fans out anew; one that is resumed keeps its succeeded items and
-- runs the others. The caller holds the run's lock. Returns how many steps
-- run again.
CREATE FUNCTION _rerun(r baton.runs, again integer[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    def jsonb := (SELECT w.definition FROM baton.workflows w WHERE w.name = r.workflow AND w.version = r.version);
    n integer;
    m baton.steps;
    step_no integer;
BEGIN
    -- every step row, before the run row
    PERFORM 1 FROM baton.steps s WHERE s.run_id = r.id ORDER BY s.step_no FOR UPDATE;

    -- the successes that are run again stay in the history
    INSERT INTO baton.attempts (run_id, step_id, attempt, step, worker, started_at, finished_at, outcome, error)
    SELECT s.run_id, s.step_id, s.attempt, s.name, s.worker, s.started_at, s.finished_at, 'succeeded', NULL
      FROM baton.steps s
     WHERE s.run_id = r.id AND s.status = 'succeeded' AND s.attempt > 0
       AND (s.step_no = ANY (again) OR (s.map_index IS NOT NULL AND s.downstream[1] = ANY (again)));
    DELETE FROM baton.steps s WHERE s.run_id = r.id AND s.map_index IS NOT NULL AND s.downstream[1] = ANY (again);

    UPDATE baton.steps s
       SET status = 'blocked', output = NULL, error = NULL, worker = NULL, lease_token = NULL, lease_expires_at = NULL,
           wait_for = NULL, started_at = NULL, finished_at = NULL, run_at = now(),
           max_attempts = s.attempt + (def -> 'steps' -> CASE WHEN s.map_index IS NULL THEN s.step_no
                                                              ELSE s.downstream[1] END ->> 'max_attempts')::integer
     WHERE s.run_id = r.id AND (s.step_no = ANY (again) OR s.status <> 'succeeded');
    GET DIAGNOSTICS n = ROW_COUNT;

    -- Each waits for what has not succeeded: its upstream steps, or a map
    -- step that kept items for those items. Then it is runnable, or not.
    UPDATE baton.steps s
       SET waiting_on = w.n,
           status = CASE WHEN w.n = 0 AND s.kind = 'task' THEN 'ready'
                         WHEN w.n = 0 OR w.items THEN 'waiting'
                         ELSE 'blocked' END::baton.step_status
      FROM (SELECT t.step_no, x.items,
                   CASE WHEN x.items
                        THEN (SELECT count(*) FROM baton.steps i
                               WHERE i.run_id = r.id AND i.map_index IS NOT NULL AND i.downstream = ARRAY[t.step_no]
                                 AND i.status <> 'succeeded')
                        ELSE (SELECT count(*) FROM baton.steps u
                               WHERE u.run_id = r.id AND u.step_no = ANY (t.upstream) AND u.status <> 'succeeded')
                   END::integer AS n
              FROM baton.steps t
             CROSS JOIN LATERAL (
                   SELECT t.kind = 'map' AND EXISTS (SELECT FROM baton.steps i
                                                      WHERE i.run_id = r.id AND i.map_index IS NOT NULL
                                                        AND i.downstream = ARRAY[t.step_no]) AS items) x
             WHERE t.run_id = r.id AND t.status = 'blocked') w
     WHERE s.run_id = r.id AND s.step_no = w.step_no;

    -- the run goes on (a deadline already past would fail it at once: dropped)
    UPDATE baton.runs x
       SET status = CASE WHEN x.started_at IS NULL THEN 'pending' ELSE 'running' END::baton.run_status,
           finished_at = NULL, error = NULL, output = NULL,
           deadline = CASE WHEN x.deadline > now() THEN x.deadline END
     WHERE x.id = r.id
    RETURNING x.deadline INTO r.deadline;
    IF r.deadline IS NOT NULL THEN
        PERFORM baton._wake_scheduler(r.deadline);
    END IF;

    -- a map step counting its remaining items is in a new attempt
    FOR m IN SELECT * FROM baton.steps s
              WHERE s.run_id = r.id AND s.kind = 'map' AND s.status = 'waiting' AND s.waiting_on > 0 LOOP
        PERFORM baton._begin_attempt(m, 'infinity');
    END LOOP;
    -- steps that no worker runs start; workers hear of the others
    FOR step_no IN SELECT s.step_no FROM baton.steps s
                    WHERE s.run_id = r.id AND s.status = 'waiting' AND s.kind <> 'task' AND s.waiting_on = 0
                    ORDER BY s.step_no LOOP
        PERFORM baton._activate(r.id, step_no);
    END LOOP;
    PERFORM pg_notify('baton_ready', q.queue)
       FROM (SELECT DISTINCT s.queue FROM baton.steps s WHERE s.run_id = r.id AND s.status = 'ready') q;
    RETURN n;
END $$;

-- A failed or cancelled run continues: its failed and cancelled steps run
-- again with a fresh attempt budget; succeeded steps keep their outputs.
CREATE FUNCTION resume_workflow(id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    r baton.runs := baton._operated_run(id);
    n integer;
BEGIN
    IF r.status NOT IN ('failed', 'cancelled') THEN
        PERFORM baton._wrong_state(r, 'resume_workflow', 'failed or cancelled');
    END IF;
    n := baton._rerun(r, '{}');
    PERFORM baton._log(id, 'resumed', NULL, jsonb_build_object('was', r.status, 'error', r.error, 'steps', n));
    RETURN true;
END $$;

-- "Re-run this step and what follows": the step and every step downstream
-- of it run again (with the steps that did not succeed), upstream outputs
-- are reused, earlier attempts stay in the history. On finished runs only.
CREATE FUNCTION retry_from(id uuid, step text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    r baton.runs := baton._operated_run(id);
    def jsonb;
    n integer;
BEGIN
    IF r.status NOT IN ('succeeded', 'failed', 'cancelled') THEN
        PERFORM baton._wrong_state(r, 'retry_from', 'succeeded, failed or cancelled');
    END IF;
    SELECT w.definition INTO def FROM baton.workflows w WHERE w.name = r.workflow AND w.version = r.version;
    n := baton._rerun(r, baton._downstream_closure(def, baton._step_no_of(r, step)));
    PERFORM baton._log(id, 'retried_from', step, jsonb_build_object('was', r.status, 'error', r.error, 'steps', n));
    RETURN true;
END $$;

-- A new run of the same workflow (the same version, or `version`: 'latest'
-- or a number) that copies the output of every step not downstream of
-- `from_step` that succeeded in the run forked from, and runs the others,
-- with the same input or `input`. It records where it came from
-- (forked_from). From a run in any state; the run forked from is not changed.
CREATE FUNCTION fork_workflow(id uuid, from_step text, input jsonb DEFAULT NULL, version text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    src baton.runs := baton._operated_run(id);
    wf baton.workflows;
    from_no integer;
    rerun integer[];
    copied integer[];
    fewer integer[];
    new_id uuid := baton._run_id();
    due timestamptz;
    step_no integer;
BEGIN
    PERFORM baton._require(from_step, 'from_step');
    IF version IS NULL THEN
        SELECT * INTO wf FROM baton.workflows w WHERE w.name = src.workflow AND w.version = src.version;
    ELSIF version = 'latest' THEN
        SELECT * INTO wf FROM baton.workflows w WHERE w.name = src.workflow ORDER BY w.version DESC LIMIT 1;
    ELSIF version ~ '^\s*[0-9]{1,9}\s*$' THEN
        SELECT * INTO wf FROM baton.workflows w WHERE w.name = src.workflow AND w.version = version::integer;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'workflow "%" has no version %', src.workflow, btrim(version)
                USING ERRCODE = 'undefined_object';
        END IF;
    ELSE
        RAISE EXCEPTION 'version must be ''latest'' or a version number, got "%"', version
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT e.n - 1 INTO from_no
      FROM jsonb_array_elements(wf.definition -> 'steps') WITH ORDINALITY AS e(s, n)
     WHERE e.s ->> 'name' = from_step;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'workflow "%" version % has no step "%"', wf.name, wf.version, from_step
            USING ERRCODE = 'undefined_object';
    END IF;
    rerun := baton._downstream_closure(wf.definition, from_no);

    -- The steps copied: not run again, succeeded in the run forked from (by
    -- name, which also matches steps across versions), and all of whose
    -- upstream steps are copied too.
    copied := ARRAY(SELECT e.n - 1
                      FROM jsonb_array_elements(wf.definition -> 'steps') WITH ORDINALITY AS e(s, n)
                      JOIN baton.steps o ON o.run_id = src.id AND o.name = e.s ->> 'name' AND o.map_index IS NULL
                     WHERE o.status = 'succeeded' AND NOT (e.n - 1 = ANY (rerun)));
    LOOP
        fewer := ARRAY(SELECT c FROM unnest(copied) c
                        WHERE NOT EXISTS (SELECT FROM jsonb_array_elements_text(wf.definition -> 'steps' -> c -> 'upstream') u
                                           WHERE NOT (u::integer = ANY (copied))));
        EXIT WHEN cardinality(fewer) = cardinality(copied);
        copied := fewer;
    END LOOP;

    due := baton._run_deadline(wf.definition, now(), NULL);
    INSERT INTO baton.runs (id, workflow, version, queue, priority, input, forked_from, deadline, enqueued_by)
    VALUES (new_id, wf.name, wf.version, src.queue, src.priority, coalesce(input, src.input), src.id, due,
            src.enqueued_by);
    PERFORM baton._lock_run(new_id);
    -- the run's queue was chosen when it was enqueued: the same one
    PERFORM baton._create_steps(ARRAY[new_id], wf.definition,
                                CASE WHEN src.queue IS DISTINCT FROM wf.definition ->> 'queue' THEN src.queue END,
                                src.priority, now());
    -- (no finished_at: the fork did not run them, and queue_stats does not
    -- count them as completed)
    UPDATE baton.steps t
       SET status = 'succeeded', output = o.output, waiting_on = 0
      FROM baton.steps o
     WHERE t.run_id = new_id AND t.step_no = ANY (copied)
       AND o.run_id = src.id AND o.name = t.name AND o.map_index IS NULL;
    UPDATE baton.steps t
       SET waiting_on = w.n,
           status = CASE WHEN w.n > 0 THEN 'blocked' WHEN t.kind = 'task' THEN 'ready' ELSE 'waiting' END::baton.step_status
      FROM (SELECT s.step_no, (SELECT count(*) FROM unnest(s.upstream) u WHERE NOT (u = ANY (copied)))::integer AS n
              FROM baton.steps s WHERE s.run_id = new_id AND NOT (s.step_no = ANY (copied))) w
     WHERE t.run_id = new_id AND t.step_no = w.step_no;

    IF due IS NOT NULL THEN
        PERFORM baton._wake_scheduler(due);
    END IF;
    FOR step_no IN SELECT s.step_no FROM baton.steps s
                    WHERE s.run_id = new_id AND s.status = 'waiting' ORDER BY s.step_no LOOP
        PERFORM baton._activate(new_id, step_no);
    END LOOP;
    PERFORM pg_notify('baton_ready', q.queue)
       FROM (SELECT DISTINCT s.queue FROM baton.steps s WHERE s.run_id = new_id AND s.status = 'ready') q;

    PERFORM baton._log(src.id, 'forked', from_step, jsonb_build_object('run', new_id, 'version', wf.version));
    PERFORM baton._log(new_id, 'forked_from', from_step, jsonb_build_object(
        'run', src.id, 'version', src.version, 'input_replaced', input IS NOT NULL,
        'copied', ARRAY(SELECT wf.definition -> 'steps' -> c ->> 'name' FROM unnest(copied) c ORDER BY c)));
    RETURN new_id;
END $$;

-- Delete runs with everything that belongs to them: steps (and map items),
-- attempts, checkpoints, events, signals and their log. The caller holds
-- their locks. Returns how many runs it deleted.
CREATE FUNCTION _delete_runs(ids uuid[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    -- signals first: the background worker holds a signal's row while it
    -- does it (sql/child.sql), and then the run's steps
    DELETE FROM baton.run_signals x WHERE x.run_id = ANY (ids);
    DELETE FROM baton.attempts x WHERE x.run_id = ANY (ids);
    DELETE FROM baton.checkpoints x WHERE x.run_id = ANY (ids);
    DELETE FROM baton.events x WHERE x.run_id = ANY (ids);
    DELETE FROM baton.event_values x WHERE x.run_id = ANY (ids);
    DELETE FROM baton.run_log x WHERE x.run_id = ANY (ids);
    DELETE FROM baton.steps x WHERE x.run_id = ANY (ids);
    DELETE FROM baton.runs x WHERE x.id = ANY (ids);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Delete a finished run, with its child runs. An unfinished one is refused
-- (55000) unless `force`, which cancels it (and its children) first.
CREATE FUNCTION delete_workflow(id uuid, force boolean DEFAULT false) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    r baton.runs := baton._operated_run(id);
    family uuid[];
    member uuid;
BEGIN
    IF r.finished_at IS NULL AND NOT coalesce(force, false) THEN
        RAISE EXCEPTION 'cannot delete_workflow: workflow run % is %', id, r.status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Cancel it first, or pass force => true to cancel and delete it.';
    END IF;
    -- a child run whose end its parent has not taken yet (a signal, done
    -- within milliseconds): its parent's step would lose its result
    IF NOT coalesce(force, false) AND EXISTS (SELECT FROM baton.run_signals g WHERE g.from_run = id) THEN
        RAISE EXCEPTION 'cannot delete_workflow: the parent of workflow run % has not taken its result yet', id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Try again in a moment, or pass force => true (the parent''s step then runs its child again).';
    END IF;
    -- its descendants, whose locks come after its own (a transition only
    -- ever tries a parent's lock, never waits for it: sql/child.sql)
    family := ARRAY(WITH RECURSIVE d(id) AS (
                        SELECT c.id FROM baton.runs c WHERE c.parent_id = r.id
                        UNION
                        SELECT c.id FROM d JOIN baton.runs c ON c.parent_id = d.id)
                    SELECT d.id FROM d ORDER BY d.id);
    IF r.finished_at IS NULL THEN
        PERFORM baton._finish_run(id, 'cancelled', 'deleted');
    END IF;
    FOREACH member IN ARRAY family LOOP
        PERFORM baton._lock_run(member);
        IF EXISTS (SELECT FROM baton.runs c WHERE c.id = member AND c.finished_at IS NULL) THEN
            PERFORM baton._finish_run(member, 'cancelled', format('parent run %s deleted', id));
        END IF;
    END LOOP;
    PERFORM baton._delete_runs(id || family);
    RAISE LOG 'pg_baton: workflow run % (%) deleted by %, with % child runs', id, r.workflow, baton._invoker()::regrole,
        cardinality(family);
    RETURN true;
END $$;

-- One batch of purging: up to `batch` runs that finished before `cutoff`,
-- oldest first, leaving out those whose row another transaction holds (an
-- operation on it) and child runs whose end their parent has not taken yet
-- (a signal, sql/child.sql): it never waits, and it takes no lock per run but the
-- rows it deletes. Returns how many it deleted.
CREATE FUNCTION _purge_batch(cutoff timestamptz, batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    RETURN baton._delete_runs(ARRAY(SELECT r.id FROM baton.runs r
                                      WHERE r.finished_at < cutoff
                                        -- (a child whose parent has not taken its end yet: next time)
                                        AND NOT EXISTS (SELECT FROM baton.run_signals g WHERE g.from_run = r.id)
                                      ORDER BY r.finished_at
                                      LIMIT batch
                                        FOR UPDATE SKIP LOCKED));
END $$;

-- Delete the runs that finished more than `older_than` ago, `batch_size` at
-- a time; returns how many. Claims never wait for it (finished runs have no
-- step to claim); a run that another transaction holds is left for the next
-- purge.
CREATE FUNCTION purge(older_than interval, batch_size integer DEFAULT 1000) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz;
    deleted bigint;
    total bigint := 0;
BEGIN
    PERFORM baton._require(older_than, 'older_than');
    IF older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must not be negative, got %', older_than USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF batch_size IS NULL OR batch_size NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'batch_size must be from 1 to 100000, got %', batch_size USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        cutoff := now() - older_than;
    EXCEPTION WHEN datetime_field_overflow THEN
        RETURN 0;  -- longer ago than any timestamp: nothing is that old
    END;
    LOOP
        deleted := baton._purge_batch(cutoff, batch_size);
        total := total + deleted;
        EXIT WHEN deleted < batch_size;
    END LOOP;
    RETURN total;
END $$;
