-- Runs: enqueue_workflow, cancel_workflow, and finishing a run.

-- The steps of new runs, from the run's definition: root steps ready, or
-- scheduled for start_at when it is later, the others blocked on their
-- upstream steps. A root step that is not a task is left waiting, for the
-- caller to start (_start_roots).
CREATE FUNCTION _create_steps(run_ids uuid[], definition jsonb, queue text, priority integer, start_at timestamptz)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO baton.steps (run_id, step_no, name, status, upstream, downstream, waiting_on,
                             queue, priority, run_at, max_attempts, timeout, kind)
    SELECT r.id,
           d.n - 1,
           d.s ->> 'name',
           CASE WHEN jsonb_array_length(d.s -> 'upstream') > 0 THEN 'blocked'
                WHEN _create_steps.start_at > now() THEN 'scheduled'
                WHEN d.kind <> 'task' THEN 'waiting'
                ELSE 'ready' END::baton.step_status,
           d.upstream,
           d.downstream,
           cardinality(d.upstream),
           coalesce(_create_steps.queue, d.s ->> 'queue'),
           coalesce(_create_steps.priority, 0),
           _create_steps.start_at,
           (d.s ->> 'max_attempts')::integer,
           (d.s ->> 'timeout')::interval,
           d.kind::baton.step_kind
      FROM (SELECT s, n, coalesce(s ->> 'kind', 'task') AS kind,
                   ARRAY(SELECT jsonb_array_elements_text(s -> 'upstream')::integer) AS upstream,
                   ARRAY(SELECT jsonb_array_elements_text(s -> 'downstream')::integer) AS downstream
              FROM jsonb_array_elements(_create_steps.definition -> 'steps') WITH ORDINALITY AS e(s, n)) d
     CROSS JOIN unnest(_create_steps.run_ids) WITH ORDINALITY AS r(id, k)
     ORDER BY r.k, d.n;  -- step ids in enqueue order: equal-priority runs are claimed oldest first
    -- the keys of queues with a per-key limit (one probe when there are none)
    IF EXISTS (SELECT FROM baton.queues c WHERE c.concurrency_key IS NOT NULL) THEN
        PERFORM baton._set_flow_keys(_create_steps.run_ids);
    END IF;
END $$;

-- Start the root steps of new runs that are not tasks (a sleep, a wait, a
-- child run: the definition's "start" list), each under its run's lock.
CREATE FUNCTION _start_roots(run_ids uuid[], definition jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    run uuid;
    step_no integer;
BEGIN
    FOREACH run IN ARRAY run_ids LOOP
        PERFORM baton._lock_run(run);
        FOR step_no IN SELECT jsonb_array_elements_text(definition -> 'start')::integer LOOP
            PERFORM baton._activate(run, step_no);
        END LOOP;
    END LOOP;
END $$;

-- A run's deadline: the one asked for, or its start plus the definition's
-- "timeout", whichever is sooner.
CREATE FUNCTION _run_deadline(definition jsonb, start_at timestamptz, deadline timestamptz) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN least(deadline, start_at + (definition ->> 'timeout')::interval);
END $$;

-- The latest version of a workflow, for new runs (after checking the queue
-- override): unknown workflow is 42704.
CREATE FUNCTION _latest_version(workflow text, queue text) RETURNS baton.workflows
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    wf baton.workflows;
BEGIN
    PERFORM baton._require(workflow, 'workflow');
    IF queue IS NOT NULL AND btrim(queue) = '' THEN
        RAISE EXCEPTION 'queue must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(queue, 'queue');
    SELECT * INTO wf FROM baton.workflows w
     WHERE w.name = workflow ORDER BY w.version DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown workflow "%"', workflow
            USING ERRCODE = 'undefined_object', HINT = 'Define it first with baton.define_workflow.';
    END IF;
    RETURN wf;
END $$;

CREATE FUNCTION enqueue_workflow(
    workflow text,
    input jsonb DEFAULT '{}',
    idempotency_key text DEFAULT NULL,
    queue text DEFAULT NULL,
    priority integer DEFAULT 0,
    run_at timestamptz DEFAULT NULL,
    deadline timestamptz DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    IF idempotency_key = '' THEN
        RAISE EXCEPTION 'idempotency_key must not be empty (use NULL for none)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(idempotency_key, 'idempotency_key', 1000);
    RETURN baton._enqueue(baton._latest_version(workflow, queue), input, idempotency_key, queue, priority,
                          coalesce(run_at, now()), deadline, NULL, NULL);
END $$;

-- One run of a workflow version (enqueue_workflow, and a child run started
-- by its parent's step: parent_id, parent_step_no).
CREATE FUNCTION _enqueue(wf baton.workflows, input jsonb, idempotency_key text, queue text, priority integer,
                         start_at timestamptz, deadline timestamptz, parent_id uuid, parent_step_no integer)
RETURNS uuid
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    new_id uuid;
    due timestamptz := baton._run_deadline(wf.definition, start_at, deadline);
BEGIN
    -- ON CONFLICT waits for a racing insert of the same key to commit or roll
    -- back, so two concurrent enqueues with one key create exactly one run.
    INSERT INTO baton.runs (workflow, version, queue, priority, input, idempotency_key, parent_id, parent_step_no, deadline,
                            enqueued_by)
    VALUES (wf.name, wf.version, coalesce(queue, wf.definition ->> 'queue'), coalesce(priority, 0),
            coalesce(input, '{}'), idempotency_key, parent_id, parent_step_no, due,
            CASE WHEN parent_id IS NULL THEN baton._invoker()
                 ELSE (SELECT p.enqueued_by FROM baton.runs p WHERE p.id = parent_id) END)
    ON CONFLICT DO NOTHING
    RETURNING id INTO new_id;

    IF new_id IS NULL THEN
        SELECT r.id INTO new_id FROM baton.runs r
         WHERE r.workflow = wf.name AND r.idempotency_key = idempotency_key;
        RETURN new_id;
    END IF;

    PERFORM baton._create_steps(ARRAY[new_id], wf.definition, queue, priority, start_at);
    PERFORM baton._announce_roots(wf.definition, queue, start_at);
    IF due IS NOT NULL THEN
        PERFORM baton._wake_scheduler(due);
    END IF;
    IF wf.definition -> 'start' <> '[]' AND start_at <= now() THEN
        PERFORM baton._start_roots(ARRAY[new_id], wf.definition);
    END IF;
    RETURN new_id;
END $$;

-- Many runs of one workflow in one statement: inputs[i] (and
-- idempotency_keys[i], when given) for run i. Returns the run ids in input
-- order; a key that already has a run returns that run's id. Keys are inserted
-- in sorted order, so that two batches racing on the same keys wait for each
-- other (as two single enqueues do) instead of deadlocking.
CREATE FUNCTION enqueue_workflows(
    workflow text,
    inputs jsonb[],
    idempotency_keys text[] DEFAULT NULL,
    queue text DEFAULT NULL,
    priority integer DEFAULT 0,
    run_at timestamptz DEFAULT NULL,
    deadline timestamptz DEFAULT NULL
) RETURNS uuid[]
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    wf baton.workflows;
    n integer := coalesce(cardinality(inputs), 0);
    ids uuid[];
    inserted uuid[];
    start_at timestamptz := coalesce(run_at, now());
    due timestamptz;
BEGIN
    PERFORM baton._check_array(inputs, 'inputs');
    PERFORM baton._check_array(idempotency_keys, 'idempotency_keys');
    IF idempotency_keys IS NOT NULL AND cardinality(idempotency_keys) <> n THEN
        RAISE EXCEPTION 'idempotency_keys must have one key (or NULL) per input' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF '' = ANY (idempotency_keys) THEN
        RAISE EXCEPTION 'idempotency_keys must not contain empty keys (use NULL for none)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM unnest(idempotency_keys) k WHERE octet_length(k) > 1000) THEN
        RAISE EXCEPTION 'idempotency_keys must be at most 1000 bytes each' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    wf := baton._latest_version(workflow, queue);
    IF n = 0 THEN
        RETURN '{}';
    END IF;

    ids := ARRAY(SELECT baton._run_id() FROM generate_series(1, n));
    due := baton._run_deadline(wf.definition, start_at, deadline);
    WITH ins AS (
        INSERT INTO baton.runs (id, workflow, version, queue, priority, input, idempotency_key, deadline, enqueued_by)
        SELECT ids[i], workflow, wf.version, coalesce(queue, wf.definition ->> 'queue'), coalesce(priority, 0),
               coalesce(inputs[i], '{}'), idempotency_keys[i], due, baton._invoker()
          FROM generate_series(1, n) AS i
         ORDER BY idempotency_keys[i], i
        ON CONFLICT DO NOTHING
        RETURNING id)
    -- back in input order: step ids follow it (see _create_steps)
    SELECT array_agg(g.id ORDER BY g.i) INTO inserted
      FROM unnest(ids) WITH ORDINALITY AS g(id, i)
     WHERE g.id IN (SELECT ins.id FROM ins);

    PERFORM baton._create_steps(inserted, wf.definition, queue, priority, start_at);

    IF coalesce(cardinality(inserted), 0) < n THEN
        -- some keys already had runs: return those
        SELECT array_agg(coalesce(x.id, r.id) ORDER BY g.i) INTO ids
          FROM generate_series(1, n) AS g(i)
          LEFT JOIN unnest(inserted) AS x(id) ON x.id = ids[g.i]
          LEFT JOIN baton.runs r ON x.id IS NULL AND r.workflow = workflow
                                AND r.idempotency_key = idempotency_keys[g.i];
    END IF;
    IF inserted IS NOT NULL THEN
        PERFORM baton._announce_roots(wf.definition, queue, start_at);
        IF due IS NOT NULL THEN
            PERFORM baton._wake_scheduler(due);
        END IF;
        IF wf.definition -> 'start' <> '[]' AND start_at <= now() THEN
            PERFORM baton._start_roots(inserted, wf.definition);
        END IF;
    END IF;
    RETURN ids;
END $$;

-- Tell workers about the root steps of new runs: NOTIFY their queues (a
-- delayed start is announced by the background worker when it comes due,
-- and the background worker is told when that is).
-- Read from the definition, not from the steps table: enqueueing must not
-- look at the ready backlog, however large.
CREATE FUNCTION _announce_roots(definition jsonb, queue text, start_at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF start_at > now() THEN
        PERFORM baton._wake_scheduler(start_at);
        RETURN;
    END IF;
    PERFORM pg_notify('baton_ready', q.queue)
       FROM (SELECT DISTINCT coalesce(_announce_roots.queue, s ->> 'queue') AS queue
               FROM jsonb_array_elements(definition -> 'steps') s
              WHERE jsonb_array_length(s -> 'upstream') = 0) q;
END $$;

-- End a run as failed or cancelled: every unfinished step is cancelled (a
-- running one loses its lease, recorded as a cancelled attempt), and so are
-- its unfinished child runs.
-- The caller holds the run lock (baton._lock_run). nowait => true (the
-- background worker) raises 55P03 instead of waiting for a step row another
-- transaction holds: the caller skips the run and comes back to it.
CREATE FUNCTION _finish_run(run_id uuid, status text, error text, nowait boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    parent uuid;
BEGIN
    -- Lock the unfinished steps first: a claim in flight commits before we go
    -- on, and the statements below (fresh snapshots) see its lease.
    -- Waiting steps are unfinished too: left waiting, a sleep or an event
    -- timeout would still fire in the finished run (and succeed, and start
    -- what follows it), an event would still complete it, and a child step
    -- would fail and retry (a new child) when its child is cancelled.
    IF nowait THEN
        PERFORM 1 FROM baton.steps s
         WHERE s.run_id = run_id AND s.status IN ('blocked', 'scheduled', 'ready', 'running', 'waiting')
           FOR UPDATE NOWAIT;
    ELSE
        PERFORM 1 FROM baton.steps s
         WHERE s.run_id = run_id AND s.status IN ('blocked', 'scheduled', 'ready', 'running', 'waiting')
           FOR UPDATE;
    END IF;

    INSERT INTO baton.attempts (run_id, step_id, attempt, step, worker, started_at, outcome, error)
    SELECT s.run_id, s.step_id, s.attempt, s.name, s.worker, s.started_at, 'cancelled',
           'run ' || status
      -- running (the fencing invariant), or waiting in an attempt of a step
      -- that no worker runs (a sleep, an event wait, a child run), by primary key
      FROM baton.steps s WHERE s.run_id = run_id
                           AND (s.lease_token IS NOT NULL OR (s.status = 'waiting' AND s.kind <> 'task'));

    UPDATE baton.steps s
       SET status = 'cancelled', finished_at = now(), lease_token = NULL, lease_expires_at = NULL, wait_for = NULL
     WHERE s.run_id = run_id AND s.status IN ('blocked', 'scheduled', 'ready', 'running', 'waiting');

    UPDATE baton.runs r
       SET status = status::baton.run_status, error = error, finished_at = now()
     WHERE r.id = run_id
    RETURNING r.parent_id INTO parent;

    -- Its child runs end with it; its parent's step hears of it (sql/child.sql).
    PERFORM baton._cancel_children(run_id, status, nowait);
    IF parent IS NOT NULL THEN
        PERFORM baton._child_finished(run_id);
    END IF;
END $$;

CREATE FUNCTION cancel_workflow(id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    current text;
BEGIN
    PERFORM baton._require(id, 'id');
    PERFORM baton._lock_run(id);
    SELECT r.status INTO current FROM baton.runs r WHERE r.id = id AND baton._visible(r.enqueued_by);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'workflow run % does not exist', id USING ERRCODE = 'undefined_object';
    END IF;
    IF current NOT IN ('pending', 'running') THEN
        RETURN false;  -- already finished: nothing to cancel
    END IF;
    PERFORM baton._finish_run(id, 'cancelled', NULL);
    PERFORM baton._log(id, 'cancelled', NULL, jsonb_build_object('was', current));
    RETURN true;
END $$;
