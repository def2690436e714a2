-- pg_baton 0.6.0 -> 0.7.0.
--
-- ALTER EXTENSION pg_baton UPDATE carries a database with runs in flight.
--
-- Roles (sql/role.sql, docs/roles.md): from 0.7.0 the protocol's functions
-- are SECURITY DEFINER and nothing in schema baton is granted to PUBLIC, so
-- a role other than a superuser needs baton.grant_client, grant_worker or
-- grant_admin after the upgrade. The runs from before it have no owner
-- (enqueued_by is NULL): admins see them.

-- The function written in Rust (src/role.rs): the calling role.
CREATE FUNCTION "_invoker"() RETURNS oid
STABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'invoker_wrapper';

-- The role that enqueued each run.
ALTER TABLE runs ADD COLUMN enqueued_by oid;

-- The calling role, not the functions' owner.
ALTER TABLE run_log ALTER COLUMN actor SET DEFAULT baton._invoker()::regrole::text;

-- Who holds which kind.
CREATE TABLE role_grants (
    role       oid         NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('client', 'worker', 'admin')),
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role, kind)
);
SELECT pg_catalog.pg_extension_config_dump('baton.role_grants', '');

-- sql/schema.sql
CREATE OR REPLACE FUNCTION _lock_run(run_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1651797601, uuid_hash(run_id));
END $$;

-- sql/schema.sql
CREATE OR REPLACE FUNCTION _try_lock_run(run_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RETURN pg_try_advisory_xact_lock(1651797601, uuid_hash(run_id));
END $$;

-- sql/schema.sql
CREATE OR REPLACE FUNCTION _lease_lost(step_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'lease lost: step % is not running under this lease_token', step_id
        USING ERRCODE = 'BT001',
              HINT = 'The lease expired and was reclaimed, the step already finished, or the token is wrong. Roll back this step''s work.';
END $$;

-- sql/schema.sql
CREATE OR REPLACE FUNCTION _require(value anyelement, field text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION '% must not be null', field USING ERRCODE = 'null_value_not_allowed';
    END IF;
END $$;

-- sql/schema.sql
CREATE OR REPLACE FUNCTION _check_length(value text, field text, max_bytes integer DEFAULT 200) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF octet_length(value) > max_bytes THEN
        RAISE EXCEPTION '% must be at most % bytes, got %', field, max_bytes, octet_length(value)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

-- sql/schema.sql
CREATE OR REPLACE FUNCTION _interval_ok(value interval) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN value > interval '0' AND value <= interval '10 years'
       AND extract(year FROM value) >= 0 AND extract(month FROM value) >= 0
       AND extract(day FROM value) >= 0
       AND value - date_trunc('day', value) >= interval '0';   -- the time part
END $$;

-- sql/schema.sql
CREATE OR REPLACE FUNCTION _check_interval(value interval, field text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF NOT baton._interval_ok(value) THEN
        RAISE EXCEPTION '% must be a positive interval of at most 10 years with no negative part, got %', field, value
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

-- sql/schema.sql
CREATE OR REPLACE FUNCTION _check_array(value anyarray, field text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF array_ndims(value) > 1 OR array_lower(value, 1) <> 1 THEN
        RAISE EXCEPTION '% must be a one-dimensional array indexed from 1, got %', field,
            CASE WHEN array_ndims(value) > 1 THEN array_ndims(value) || ' dimensions'
                 ELSE 'lower bound ' || array_lower(value, 1) END
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

-- sql/define.sql
CREATE OR REPLACE FUNCTION _definition_interval(txt text, whose text, field text) RETURNS interval
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    result interval;
BEGIN
    IF txt IS NULL THEN
        RETURN NULL;
    END IF;
    BEGIN
        result := txt::interval;
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION '%: field "%" is not a valid interval: "%"', whose, field, txt
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF NOT baton._interval_ok(result) THEN
        RAISE EXCEPTION '%: field "%" must be a positive interval of at most 10 years with no negative part, got "%"',
            whose, field, txt USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN result;
END $$;

-- sql/define.sql
CREATE OR REPLACE FUNCTION define_workflow(name text, definition jsonb) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    normalized jsonb;
    step jsonb;
    whose text;
    initial interval;
    max interval;
    new_version integer;
    cycle text;
BEGIN
    PERFORM baton._require(name, 'name');
    PERFORM baton._require(definition, 'definition');
    normalized := baton._normalize_definition(name, definition::text);

    -- Interval texts are PostgreSQL's to parse.
    FOR step IN SELECT jsonb_array_elements(normalized -> 'steps') LOOP
        whose := format('step "%s"', step ->> 'name');
        PERFORM baton._definition_interval(step ->> 'timeout', whose, 'timeout');
        initial := baton._definition_interval(step #>> '{backoff,initial}', whose, 'backoff.initial');
        max := baton._definition_interval(step #>> '{backoff,max}', whose, 'backoff.max');
        IF initial > max THEN
            RAISE EXCEPTION '%: field "backoff.initial" (%) is larger than "backoff.max" (%)',
                whose, initial, max USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- the fields of the step kinds (sql/kinds.sql)
        PERFORM baton._definition_interval(step ->> 'sleep', whose, 'sleep');
        IF step ? 'sleep_until' THEN
            BEGIN
                PERFORM (step ->> 'sleep_until')::jsonpath;
            EXCEPTION WHEN OTHERS THEN
                RAISE EXCEPTION '%: field "sleep_until" is not a valid JSON path: "%" (for example "$.input.send_at")',
                    whose, step ->> 'sleep_until' USING ERRCODE = 'invalid_parameter_value';
            END;
        END IF;
        IF step ->> 'workflow' IS NOT NULL AND step ->> 'workflow' <> name  -- itself: the cycle below
           AND NOT EXISTS (SELECT FROM baton.workflows w WHERE w.name = step ->> 'workflow') THEN
            RAISE EXCEPTION '%: field "workflow" names unknown workflow "%"', whose, step ->> 'workflow'
                USING ERRCODE = 'invalid_parameter_value', HINT = 'Define the child workflow first.';
        END IF;
    END LOOP;

    -- Child workflows must not lead back to this one: every run of a
    -- workflow starts every child step (there are no conditions), so a cycle
    -- would start runs without end. Followed through the latest versions,
    -- which new child runs use; each definition is checked, so they stay
    -- acyclic.
    WITH RECURSIVE reach(child, path) AS (
        SELECT DISTINCT s ->> 'workflow', ARRAY[name]
          FROM jsonb_array_elements(normalized -> 'steps') s WHERE s ? 'workflow'
        UNION ALL
        SELECT c ->> 'workflow', r.path || r.child
          FROM reach r
         CROSS JOIN LATERAL (SELECT w.definition FROM baton.workflows w WHERE w.name = r.child
                              ORDER BY w.version DESC LIMIT 1) d
         CROSS JOIN jsonb_array_elements(d.definition -> 'steps') c
         WHERE c ? 'workflow' AND r.child <> name AND NOT r.child = ANY (r.path))
    SELECT array_to_string(r.path || r.child, ' -> ') INTO cycle FROM reach r WHERE r.child = name LIMIT 1;
    IF cycle IS NOT NULL THEN
        RAISE EXCEPTION 'definition: field "workflow" makes a cycle of child workflows: % (each run would start another, without end)',
            cycle USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._definition_interval(normalized ->> 'timeout', 'definition', 'timeout');

    -- Versions are numbered per workflow; the lock makes concurrent definitions
    -- of one workflow take turns instead of failing on the primary key.
    PERFORM pg_advisory_xact_lock(1651797603, hashtext(name));
    SELECT coalesce(max(w.version), 0) + 1 INTO new_version
      FROM baton.workflows w WHERE w.name = define_workflow.name;
    INSERT INTO baton.workflows (name, version, definition)
    VALUES (define_workflow.name, new_version, normalized);
    RETURN new_version;
END $$;

-- sql/run.sql
CREATE OR REPLACE FUNCTION _create_steps(run_ids uuid[], definition jsonb, queue text, priority integer, start_at timestamptz)
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

-- sql/run.sql
CREATE OR REPLACE FUNCTION _start_roots(run_ids uuid[], definition jsonb) RETURNS void
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

-- sql/run.sql
CREATE OR REPLACE FUNCTION _run_deadline(definition jsonb, start_at timestamptz, deadline timestamptz) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN least(deadline, start_at + (definition ->> 'timeout')::interval);
END $$;

-- sql/run.sql
CREATE OR REPLACE FUNCTION _latest_version(workflow text, queue text) RETURNS baton.workflows
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

-- sql/run.sql
CREATE OR REPLACE FUNCTION enqueue_workflow(
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

-- sql/run.sql
CREATE OR REPLACE FUNCTION _enqueue(wf baton.workflows, input jsonb, idempotency_key text, queue text, priority integer,
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

-- sql/run.sql
CREATE OR REPLACE FUNCTION enqueue_workflows(
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

-- sql/run.sql
CREATE OR REPLACE FUNCTION _announce_roots(definition jsonb, queue text, start_at timestamptz) RETURNS void
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

-- sql/run.sql
CREATE OR REPLACE FUNCTION _finish_run(run_id uuid, status text, error text, nowait boolean DEFAULT false) RETURNS void
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

-- sql/run.sql
CREATE OR REPLACE FUNCTION cancel_workflow(id uuid) RETURNS boolean
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION _end_attempt(s baton.steps, outcome text, error text, retryable boolean, backoff boolean DEFAULT true,
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION _reclaim_expired(queues text[], max_steps integer, may_fail boolean DEFAULT true) RETURNS integer
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION _reclaim_one(run_id uuid, step_no integer, may_fail boolean, lost_worker text DEFAULT NULL)
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION _claim(worker text, queues text[], want integer, lease interval) RETURNS bigint[]
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION _claim_one(worker text, queue text, want integer, lease interval) RETURNS bigint[]
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION _claim_many(worker text, qnames text[], qslots integer[], want integer, lease interval) RETURNS bigint[]
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION _lease_picked(picked tid[], worker text, lease interval, key_path jsonpath DEFAULT NULL,
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION claim_steps(
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION heartbeat(step_id bigint, lease_token uuid, lease interval DEFAULT '30 seconds')
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION checkpoint(step_id bigint, lease_token uuid, key text, value jsonb)
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

-- sql/lease.sql
CREATE OR REPLACE FUNCTION release_step(step_id bigint, lease_token uuid, delay interval DEFAULT NULL)
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

-- sql/complete.sql
CREATE OR REPLACE FUNCTION _run_of(step_id bigint) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT s.run_id FROM baton.steps s WHERE s.step_id = _run_of.step_id);
END $$;

-- sql/complete.sql
CREATE OR REPLACE FUNCTION _complete(step_ids bigint[], lease_tokens uuid[], outputs jsonb[],
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

-- sql/complete.sql
CREATE OR REPLACE FUNCTION complete_steps(step_ids bigint[], lease_tokens uuid[], outputs jsonb[] DEFAULT NULL)
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

-- sql/complete.sql
CREATE OR REPLACE FUNCTION complete_step(step_id bigint, lease_token uuid, output jsonb DEFAULT NULL)
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

-- sql/complete.sql
CREATE OR REPLACE FUNCTION complete_and_claim(
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

-- sql/complete.sql
CREATE OR REPLACE FUNCTION fail_step(step_id bigint, lease_token uuid, error text, retryable boolean DEFAULT true)
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

-- sql/queue.sql
CREATE OR REPLACE FUNCTION configure_queue(
    queue text,
    concurrency integer DEFAULT NULL,
    paused boolean DEFAULT false,
    rate_limit integer DEFAULT NULL,
    rate_period interval DEFAULT NULL,
    concurrency_key text DEFAULT NULL,
    per_key_concurrency integer DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    key_path jsonpath;
    old_path jsonpath;
BEGIN
    IF queue IS NULL OR btrim(queue) = '' THEN
        RAISE EXCEPTION 'queue must be a non-empty name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(queue, 'queue');
    IF concurrency < 0 THEN
        RAISE EXCEPTION 'concurrency must be NULL (unlimited) or at least 0, got %', concurrency
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (rate_limit IS NULL) <> (rate_period IS NULL) THEN
        RAISE EXCEPTION 'rate_limit and rate_period must be given together'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rate_limit < 1 THEN
        RAISE EXCEPTION 'rate_limit must be at least 1, got % (pause the queue to stop claims)', rate_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_interval(rate_period, 'rate_period');
    IF rate_period < interval '1 millisecond' THEN
        RAISE EXCEPTION 'rate_period must be at least 1 millisecond, got %', rate_period
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (concurrency_key IS NULL) <> (per_key_concurrency IS NULL) THEN
        RAISE EXCEPTION 'concurrency_key and per_key_concurrency must be given together'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF per_key_concurrency < 1 THEN
        RAISE EXCEPTION 'per_key_concurrency must be at least 1, got %', per_key_concurrency
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(concurrency_key, 'concurrency_key', 1000);
    BEGIN
        key_path := concurrency_key::jsonpath;
    EXCEPTION WHEN syntax_error OR invalid_text_representation THEN
        RAISE EXCEPTION 'concurrency_key must be a JSON path into the run''s input (such as ''$.customer_id''), got %',
            concurrency_key USING ERRCODE = 'invalid_parameter_value';
    END;
    SELECT c.concurrency_key INTO old_path FROM baton.queues c WHERE c.name = queue;
    INSERT INTO baton.queues AS q (name, concurrency, paused, updated_at, rate_limit, rate_period, concurrency_key,
                                   per_key_concurrency)
    VALUES (queue, concurrency, coalesce(paused, false), now(), rate_limit, rate_period, key_path, per_key_concurrency)
    ON CONFLICT (name) DO UPDATE
       SET concurrency = excluded.concurrency, paused = excluded.paused, updated_at = now(),
           rate_limit = excluded.rate_limit, rate_period = excluded.rate_period,
           concurrency_key = excluded.concurrency_key, per_key_concurrency = excluded.per_key_concurrency;
    -- A new key: the queue's waiting steps are keyed again (a pass over
    -- steps; running steps keep the key they were claimed under).
    IF key_path::text IS DISTINCT FROM old_path::text THEN
        PERFORM baton._rekey_queue(queue);
    END IF;
    -- Unpausing or raising a limit may make waiting steps claimable.
    PERFORM pg_notify('baton_ready', queue);
END $$;

-- sql/kinds.sql
CREATE OR REPLACE FUNCTION _step_definition(s baton.steps) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT w.definition -> 'steps' -> CASE WHEN s.map_index IS NULL THEN s.step_no ELSE s.downstream[1] END
              FROM baton.runs r JOIN baton.workflows w ON w.name = r.workflow AND w.version = r.version
             WHERE r.id = s.run_id);
END $$;

-- sql/kinds.sql
CREATE OR REPLACE FUNCTION _activate(run_id uuid, step_no integer) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    s baton.steps;
    def jsonb;
BEGIN
    SELECT * INTO s FROM baton.steps t WHERE t.run_id = run_id AND t.step_no = step_no FOR UPDATE;
    IF NOT FOUND OR s.status <> 'waiting' OR s.kind = 'task' THEN
        RETURN;
    END IF;
    def := baton._step_definition(s);
    CASE s.kind
        WHEN 'sleep' THEN PERFORM baton._start_sleep(s, def);
        WHEN 'event' THEN PERFORM baton._start_wait(s, def);
        WHEN 'workflow' THEN PERFORM baton._start_child(s, def);
        WHEN 'map' THEN
            -- (items come after the definition's steps: the probe is short)
            IF EXISTS (SELECT FROM baton.steps i WHERE i.run_id = s.run_id AND i.map_index IS NOT NULL
                                                   AND i.downstream = ARRAY[s.step_no]) THEN
                PERFORM baton._finish_map(s);  -- its items are done
            ELSE
                PERFORM baton._start_map(s, def);
            END IF;
    END CASE;
END $$;

-- sql/kinds.sql
CREATE OR REPLACE FUNCTION _succeed_step(run_id uuid, step_no integer, output jsonb) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    id bigint;
    token uuid;
BEGIN
    UPDATE baton.steps t SET lease_token = gen_random_uuid(), wait_for = NULL
     WHERE t.run_id = run_id AND t.step_no = step_no
    RETURNING t.step_id, t.lease_token INTO id, token;
    PERFORM baton._complete(ARRAY[id], ARRAY[token], ARRAY[output], NULL, NULL, 0, NULL);
END $$;

-- sql/kinds.sql
CREATE OR REPLACE FUNCTION _step_document(s baton.steps) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN jsonb_build_object(
        'input', (SELECT r.input FROM baton.runs r WHERE r.id = s.run_id),
        'upstream', coalesce((SELECT jsonb_object_agg(u.name, u.output) FROM baton.steps u
                               WHERE u.run_id = s.run_id AND u.step_no = ANY (s.upstream)), '{}'));
END $$;

-- sql/kinds.sql
CREATE OR REPLACE FUNCTION _begin_attempt(s baton.steps, wake_at timestamptz, wait_for text DEFAULT NULL) RETURNS baton.steps
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE baton.steps t
       SET attempt = t.attempt + 1, started_at = now(), run_at = wake_at, wait_for = _begin_attempt.wait_for,
           worker = NULL, error = NULL
     WHERE t.run_id = s.run_id AND t.step_no = s.step_no
    RETURNING * INTO s;
    -- the run is under way, as when a worker claims its first step
    UPDATE baton.runs r SET status = 'running', started_at = now() WHERE r.id = s.run_id AND r.status = 'pending';
    IF wake_at < 'infinity' THEN
        PERFORM baton._wake_scheduler(wake_at);
    END IF;
    RETURN s;
END $$;

-- sql/kinds.sql
CREATE OR REPLACE FUNCTION _start_sleep(s baton.steps, def jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    wake timestamptz;
    found jsonb;
BEGIN
    IF def ? 'sleep' THEN
        wake := now() + (def ->> 'sleep')::interval;
    ELSE
        found := jsonb_path_query_first(baton._step_document(s), (def ->> 'sleep_until')::jsonpath);
        -- only a JSON string is a timestamp text: the text of an object or
        -- an array can parse too ('{"at": "2000-01-01"}' is 2000-01-01)
        IF jsonb_typeof(found) = 'string' THEN
            BEGIN
                wake := (found #>> '{}')::timestamptz;
            EXCEPTION WHEN OTHERS THEN
                wake := NULL;
            END;
        END IF;
        IF wake IS NULL OR wake = 'infinity' OR wake = '-infinity' THEN
            PERFORM baton._end_attempt(baton._begin_attempt(s, 'infinity'), 'failed',
                format('sleep_until: %s is %s, not a timestamp', def ->> 'sleep_until',
                       coalesce(found::text, 'missing')), false);
            RETURN;
        END IF;
    END IF;
    IF wake <= now() THEN
        PERFORM baton._begin_attempt(s, 'infinity');
        PERFORM baton._succeed_step(s.run_id, s.step_no, NULL);
    ELSE
        PERFORM baton._begin_attempt(s, wake);
    END IF;
END $$;

-- sql/event.sql
CREATE OR REPLACE FUNCTION _take_event(run_id uuid, name text, step_id bigint, OUT taken boolean, OUT payload jsonb)
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

-- sql/event.sql
CREATE OR REPLACE FUNCTION _start_wait(s baton.steps, def jsonb) RETURNS void
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

-- sql/event.sql
CREATE OR REPLACE FUNCTION _wake_suspended(s baton.steps, name text, payload jsonb, timed_out boolean) RETURNS void
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

-- sql/event.sql
CREATE OR REPLACE FUNCTION send_event(workflow_id uuid, name text, payload jsonb DEFAULT NULL) RETURNS boolean
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

-- sql/event.sql
CREATE OR REPLACE FUNCTION set_event(workflow_id uuid, key text, value jsonb) RETURNS void
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

-- sql/event.sql
CREATE OR REPLACE FUNCTION get_event(workflow_id uuid, key text) RETURNS jsonb
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

-- sql/suspend.sql
CREATE OR REPLACE FUNCTION suspend_step(step_id bigint, lease_token uuid, until timestamptz DEFAULT NULL,
                             event text DEFAULT NULL, timeout interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    run uuid;
    s baton.steps;
    taken record;
    wake timestamptz;
BEGIN
    PERFORM baton._require(suspend_step.step_id, 'step_id');
    PERFORM baton._require(suspend_step.lease_token, 'lease_token');
    IF suspend_step.until IS NULL AND suspend_step.event IS NULL THEN
        RAISE EXCEPTION 'suspend_step needs until or event (or both)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF suspend_step.event IS NOT NULL AND btrim(suspend_step.event) = '' THEN
        RAISE EXCEPTION 'event must be a non-empty event name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(suspend_step.event, 'event');
    IF suspend_step.timeout IS NOT NULL AND suspend_step.event IS NULL THEN
        RAISE EXCEPTION 'timeout is for waiting for an event: give event too (or until alone)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_interval(suspend_step.timeout, 'timeout');
    IF suspend_step.until IN ('infinity', '-infinity') THEN
        RAISE EXCEPTION 'until must be a finite time, got %', suspend_step.until USING ERRCODE = 'invalid_parameter_value';
    END IF;

    run := baton._run_of(suspend_step.step_id);
    IF run IS NULL THEN
        PERFORM baton._lease_lost(suspend_step.step_id);
    END IF;
    PERFORM baton._lock_run(run);
    SELECT * INTO s FROM baton.steps t
     WHERE t.run_id = run AND t.step_id = suspend_step.step_id AND t.lease_token = suspend_step.lease_token
       FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM baton._lease_lost(suspend_step.step_id);
    END IF;

    -- the lease ends; the attempt is given back, as by release_step
    UPDATE baton.steps t
       SET status = 'waiting', attempt = t.attempt - 1, worker = NULL, lease_token = NULL, lease_expires_at = NULL,
           run_at = 'infinity', wait_for = suspend_step.event
     WHERE t.run_id = s.run_id AND t.step_no = s.step_no
    RETURNING * INTO s;

    IF suspend_step.event IS NOT NULL THEN
        taken := baton._take_event(s.run_id, suspend_step.event, s.step_id);
        IF taken.taken THEN
            PERFORM baton._wake_suspended(s, suspend_step.event, taken.payload, false);
            RETURN;
        END IF;
    END IF;
    wake := least(suspend_step.until, now() + suspend_step.timeout);  -- NULLs aside
    IF wake IS NOT NULL THEN
        UPDATE baton.steps t SET run_at = wake WHERE t.run_id = s.run_id AND t.step_no = s.step_no;
        PERFORM baton._wake_scheduler(wake);
    END IF;
END $$;

-- sql/child.sql
CREATE OR REPLACE FUNCTION _child_key(parent uuid, step text, attempt integer) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN format('baton:child:%s:%s:%s', parent, step, attempt);
END $$;

-- sql/child.sql
CREATE OR REPLACE FUNCTION _start_child(s baton.steps, def jsonb) RETURNS void
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

-- sql/child.sql
CREATE OR REPLACE FUNCTION _child_finished(child uuid) RETURNS void
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

-- sql/child.sql
CREATE OR REPLACE FUNCTION _child_done(parent uuid, child uuid) RETURNS void
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

-- sql/child.sql
CREATE OR REPLACE FUNCTION _cancel_children(run_id uuid, status text, nowait boolean) RETURNS void
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

-- sql/child.sql
CREATE OR REPLACE FUNCTION _do_signals(batch integer) RETURNS integer
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

-- sql/map.sql
CREATE OR REPLACE FUNCTION _start_map(s baton.steps, def jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    source integer := (def ->> 'source')::integer;
    elements jsonb;
    n integer;
    base integer;
BEGIN
    SELECT u.output INTO elements FROM baton.steps u WHERE u.run_id = s.run_id AND u.step_no = source;
    IF jsonb_typeof(elements) IS DISTINCT FROM 'array' THEN
        PERFORM baton._end_attempt(baton._begin_attempt(s, 'infinity'), 'failed',
            format('map: the output of "%s" is %s, not a JSON array', def ->> 'map', coalesce(jsonb_typeof(elements), 'null')),
            false);
        RETURN;
    END IF;
    -- (s keeps the step's run_at, the run's start, which the items take)
    PERFORM baton._begin_attempt(s, 'infinity');
    n := jsonb_array_length(elements);
    IF n = 0 THEN
        PERFORM baton._succeed_step(s.run_id, s.step_no, '[]');
        RETURN;
    END IF;
    SELECT max(t.step_no) INTO base FROM baton.steps t WHERE t.run_id = s.run_id;
    INSERT INTO baton.steps (run_id, step_no, name, status, upstream, downstream, waiting_on, queue, priority, run_at,
                             max_attempts, timeout, kind, map_index, map_item, flow_key)
    SELECT s.run_id, base + e.i::integer, s.name, 'ready', array_remove(s.upstream, source), ARRAY[s.step_no], 0,
           s.queue, s.priority, s.run_at, s.max_attempts, s.timeout, 'task', e.i::integer - 1, e.v, s.flow_key
      FROM jsonb_array_elements(elements) WITH ORDINALITY AS e(v, i)
     ORDER BY e.i;  -- step ids in element order: claimed in that order
    UPDATE baton.steps t SET waiting_on = n WHERE t.run_id = s.run_id AND t.step_no = s.step_no;
    PERFORM pg_notify('baton_ready', s.queue);
END $$;

-- sql/map.sql
CREATE OR REPLACE FUNCTION _finish_map(s baton.steps) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._succeed_step(s.run_id, s.step_no,
        (SELECT coalesce(jsonb_agg(i.output ORDER BY i.map_index), '[]') FROM baton.steps i
          WHERE i.run_id = s.run_id AND i.map_index IS NOT NULL AND i.downstream = ARRAY[s.step_no]));
END $$;

-- sql/schedule.sql
CREATE OR REPLACE FUNCTION _cron_next(cron text, timezone text, after timestamptz) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN to_timestamp(baton._cron_next_epoch(cron, timezone, extract(epoch FROM after)::float8));
END $$;

-- sql/schedule.sql
CREATE OR REPLACE FUNCTION _cron_prev(cron text, timezone text, at timestamptz) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN to_timestamp(baton._cron_prev_epoch(cron, timezone, extract(epoch FROM at)::float8));
END $$;

-- sql/schedule.sql
CREATE OR REPLACE FUNCTION schedule(name text, cron text, workflow text, input jsonb DEFAULT '{}', timezone text DEFAULT 'UTC',
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

-- sql/schedule.sql
CREATE OR REPLACE FUNCTION unschedule(name text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    DELETE FROM baton.schedule_entries c WHERE c.name = name;
    RETURN FOUND;
END $$;

-- sql/schedule.sql
CREATE OR REPLACE FUNCTION _fire_schedules(at timestamptz, batch integer) RETURNS integer
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

-- sql/timer.sql
CREATE OR REPLACE FUNCTION _fire(s baton.steps) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    def jsonb;
BEGIN
    CASE s.kind
        WHEN 'sleep' THEN
            PERFORM baton._succeed_step(s.run_id, s.step_no, NULL);
        WHEN 'event' THEN
            def := baton._step_definition(s);
            IF def ->> 'on_timeout' = 'continue' THEN
                PERFORM baton._succeed_step(s.run_id, s.step_no, NULL);
            ELSE
                PERFORM baton._end_attempt(s, 'timed_out',
                    format('no event "%s" arrived within %s', s.wait_for, def ->> 'timeout'), true, true, true);
            END IF;
        WHEN 'task' THEN
            PERFORM baton._wake_suspended(s, s.wait_for, NULL, true);
        ELSE
            -- a child run or map items end these, not time
            UPDATE baton.steps t SET run_at = 'infinity' WHERE t.run_id = s.run_id AND t.step_no = s.step_no;
    END CASE;
END $$;

-- sql/timer.sql
CREATE OR REPLACE FUNCTION _next_due() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN least((SELECT min(s.run_at) FROM baton.steps s WHERE s.status = 'scheduled'),
                 (SELECT min(s.run_at) FROM baton.steps s WHERE s.status = 'waiting'),
                 (SELECT min(r.deadline) FROM baton.runs r WHERE r.deadline IS NOT NULL AND r.finished_at IS NULL),
                 (SELECT min(c.next_run_at) FROM baton.schedule_entries c WHERE NOT c.paused),
                 (SELECT min(g.created_at) FROM baton.run_signals g),
                 baton._rate_next_wake());
END $$;

-- sql/timer.sql
CREATE OR REPLACE FUNCTION _fire_timers() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    -- the transaction's start, which the timers fired here record as their
    -- time: a timer is never recorded as fired before it was due
    at timestamptz := now();
    batch integer := coalesce(current_setting('baton.reclaim_batch', true)::integer, 500);
    w record;
    st baton.steps;
    fired integer := 0;
    woken integer := 0;
    expired integer := 0;
    signals integer := 0;
    ticks integer := 0;
    skipped integer := 0;
    next timestamptz;
BEGIN
    -- 1. Scheduled tasks that came due (a delayed start, a retry's backoff,
    --    a delayed release) become ready, soonest first; idle workers of
    --    their queues are told. A step another transaction holds is skipped,
    --    not waited for.
    BEGIN
        WITH due AS MATERIALIZED (
            SELECT d.ctid FROM baton.steps d
             WHERE d.status = 'scheduled' AND d.run_at <= at AND d.kind = 'task'
             ORDER BY d.run_at
             LIMIT batch
               FOR UPDATE SKIP LOCKED
        ), ready AS (
            UPDATE baton.steps s SET status = 'ready'
             WHERE s.ctid = ANY (ARRAY(SELECT d.ctid FROM due d))
            RETURNING s.queue)
        -- (a queue name too long for a NOTIFY payload, stored before names
        -- were limited, would fail the whole statement: its workers poll)
        SELECT count(*) INTO woken FROM (
            SELECT pg_notify('baton_ready', r.queue)
              FROM (SELECT DISTINCT queue FROM ready) r WHERE octet_length(r.queue) < 8000) n;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: making scheduled steps ready failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    -- 2. Waiting steps whose time came, and steps that no worker runs whose
    --    retry came due (they start again).
    FOR w IN SELECT * FROM ((SELECT t.run_id, t.step_no FROM baton.steps t
                              WHERE t.status = 'waiting' AND t.run_at <= at ORDER BY t.run_at LIMIT batch)
                            UNION ALL
                            (SELECT t.run_id, t.step_no FROM baton.steps t
                              WHERE t.status = 'scheduled' AND t.run_at <= at AND t.kind <> 'task'
                              ORDER BY t.run_at LIMIT batch)) due
    LOOP
        BEGIN
            IF NOT baton._try_lock_run(w.run_id) THEN
                skipped := skipped + 1;
                CONTINUE;
            END IF;
            SELECT * INTO st FROM baton.steps t WHERE t.run_id = w.run_id AND t.step_no = w.step_no FOR UPDATE NOWAIT;
            CONTINUE WHEN st.run_at > at OR st.status NOT IN ('waiting', 'scheduled');
            IF st.status = 'waiting' THEN
                PERFORM baton._fire(st);
            ELSE
                UPDATE baton.steps t SET status = 'waiting' WHERE t.run_id = st.run_id AND t.step_no = st.step_no;
                PERFORM baton._activate(st.run_id, st.step_no);
            END IF;
            fired := fired + 1;
        EXCEPTION
            WHEN lock_not_available THEN
                skipped := skipped + 1;
            WHEN OTHERS THEN
                RAISE WARNING 'pg_baton: firing step % of run % failed: % (SQLSTATE %); trying again in a minute',
                    w.step_no, w.run_id, SQLERRM, SQLSTATE;
                UPDATE baton.steps t SET run_at = at + interval '1 minute'
                 WHERE t.run_id = w.run_id AND t.step_no = w.step_no;
        END;
    END LOOP;

    -- 3. Runs past their deadline fail: unfinished steps cancelled, leases
    --    revoked, child runs cancelled.
    FOR w IN SELECT r.id, r.deadline FROM baton.runs r
              WHERE r.deadline <= at AND r.finished_at IS NULL ORDER BY r.deadline LIMIT batch
    LOOP
        BEGIN
            IF NOT baton._try_lock_run(w.id) THEN
                skipped := skipped + 1;
                CONTINUE;
            END IF;
            CONTINUE WHEN NOT EXISTS (SELECT FROM baton.runs r WHERE r.id = w.id AND r.finished_at IS NULL);
            -- the time in UTC: the same text whichever session fails the run
            -- (the background worker, or any caller, in its own TimeZone)
            PERFORM baton._finish_run(w.id, 'failed',
                format('deadline %s passed', to_char(w.deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')), true);
            expired := expired + 1;
        EXCEPTION
            WHEN lock_not_available THEN
                skipped := skipped + 1;
            WHEN OTHERS THEN
                RAISE WARNING 'pg_baton: failing run % at its deadline failed: % (SQLSTATE %)', w.id, SQLERRM, SQLSTATE;
        END;
    END LOOP;

    -- 4. Work that runs left for each other (sql/child.sql), and 5. schedule
    --    ticks (sql/schedule.sql).
    BEGIN
        signals := baton._do_signals(batch);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: doing run signals failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;
    BEGIN
        ticks := baton._fire_schedules(at, batch);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: firing schedules failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    -- 6. Rate-limited queues whose claims are free again (src/rate.rs):
    --    their workers are told.
    BEGIN
        SELECT woken + count(*) INTO woken FROM (SELECT pg_notify('baton_ready', q) FROM baton._rate_due(clock_timestamp()) q) n;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: waking rate-limited queues failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    next := baton._next_due();
    RETURN jsonb_build_object('woken', woken, 'fired', fired, 'expired', expired, 'signals', signals,
                              'ticks', ticks, 'skipped', skipped,
                              'next_due_ms', CASE WHEN next < 'infinity' THEN
                                                 extract(epoch FROM next - clock_timestamp()) * 1000 END);
END $$;

-- sql/tick.sql
CREATE OR REPLACE FUNCTION _tick() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := clock_timestamp();
    reclaimed integer := 0;
    lost integer := 0;
    timers jsonb := '{}';
    pruned integer := 0;
    retention interval;
    batch integer := coalesce(current_setting('baton.reclaim_batch', true)::integer, 500);
    warn_after interval;
    horizon jsonb;
BEGIN
    -- 1. Expired leases back to ready (or failed, when attempts are used up).
    BEGIN
        reclaimed := baton._reclaim_expired(NULL, batch);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: reclaiming expired leases failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    -- 1b. The leases of registered workers whose sessions are gone
    --     (sql/worker.sql), lost attempts retried at once.
    BEGIN
        lost := baton._workers_gone();
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: taking over the leases of gone workers failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    -- 2. Timers (sql/timer.sql): scheduled steps that came due, sleeps,
    --    event timeouts, suspended steps, deadlines, signals, schedule ticks.
    BEGIN
        timers := baton._fire_timers();
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: firing timers failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    -- 3. Retention: delete finished runs older than baton.retention (with their
    --    steps, attempts, checkpoints, events, signals and log), a bounded
    --    batch per round.
    BEGIN
        retention := nullif(current_setting('baton.retention', true), '')::interval;
        IF retention IS NOT NULL THEN
            -- (sql/operation.sql: never waits for a run another transaction holds)
            pruned := baton._purge_batch(at - retention,
                                         coalesce(current_setting('baton.prune_batch', true)::integer, 1000));
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: pruning old runs failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    -- 4. The vacuum horizon: the oldest transaction of this database that has
    --    held a snapshot or a transaction id for longer than
    --    baton.horizon_warning. Vacuum cannot remove the step versions that
    --    die after it began, and claims then walk past them: reported (the
    --    background worker logs it), not acted on.
    BEGIN
        warn_after := nullif(current_setting('baton.horizon_warning', true), '')::interval;
        IF warn_after > interval '0' THEN
            SELECT jsonb_build_object('pid', a.pid, 'state', a.state, 'application_name', a.application_name,
                                      'seconds', floor(extract(epoch FROM at - a.xact_start))::bigint)
              INTO horizon
              FROM pg_stat_activity a
             WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
               AND a.backend_type <> 'autovacuum worker'
               AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
               AND a.xact_start < at - warn_after
             ORDER BY a.xact_start
             LIMIT 1;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: checking the vacuum horizon failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    RETURN timers || jsonb_build_object('at', at, 'reclaimed', reclaimed, 'workers_lost_leases', lost, 'pruned', pruned)
        || CASE WHEN horizon IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('horizon', horizon) END;
END $$;

-- sql/flow.sql
CREATE OR REPLACE FUNCTION _flow_key(input jsonb, key_path jsonpath) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    -- (silent: a path that errs on this input, a strict path that finds
    -- nothing or arithmetic on a string, finds no key instead of failing
    -- every enqueue and claim of the queue)
    RETURN coalesce(jsonb_path_query_first(input, key_path, silent => true) #>> '{}', '');
END $$;

-- sql/flow.sql
CREATE OR REPLACE FUNCTION _set_flow_keys(run_ids uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE baton.steps s
       SET flow_key = baton._flow_key(r.input, c.concurrency_key)
      FROM baton.runs r, baton.queues c
     WHERE s.run_id = ANY (run_ids) AND r.id = s.run_id AND c.name = s.queue AND c.concurrency_key IS NOT NULL;
END $$;

-- sql/flow.sql
CREATE OR REPLACE FUNCTION _rekey_queue(queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE baton.steps s
       SET flow_key = (SELECT CASE WHEN c.concurrency_key IS NOT NULL THEN baton._flow_key(r.input, c.concurrency_key) END
                         FROM baton.runs r LEFT JOIN baton.queues c ON c.name = s.queue
                        WHERE r.id = s.run_id)
     WHERE s.queue = _rekey_queue.queue AND s.status IN ('blocked', 'scheduled', 'ready', 'waiting');
END $$;

-- sql/flow.sql
CREATE OR REPLACE FUNCTION _claim_flow(worker text, queues text[], want integer, lease interval) RETURNS bigint[]
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

-- sql/flow.sql
CREATE OR REPLACE FUNCTION _claim_keyed(worker text, queue text, want integer, lease interval, key_path jsonpath,
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

-- sql/flow.sql
CREATE OR REPLACE FUNCTION _key_room(queue text, key text, per_key integer, patience integer) RETURNS integer
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

-- sql/flow.sql
CREATE OR REPLACE FUNCTION _claim_by_key(worker text, queue text, want integer, lease interval, per_key integer,
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION _log(run_id uuid, action text, step text, detail jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO baton.run_log (run_id, action, step, detail) VALUES (run_id, action, step, detail);
END $$;

-- sql/operation.sql
CREATE OR REPLACE FUNCTION _existing_run(id uuid) RETURNS baton.runs
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION _operated_run(id uuid) RETURNS baton.runs
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION _wrong_state(r baton.runs, operation text, allowed text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cannot %: workflow run % is %', operation, r.id, r.status
        USING ERRCODE = 'object_not_in_prerequisite_state', HINT = format('%s works on runs that are %s.', operation, allowed);
END $$;

-- sql/operation.sql
CREATE OR REPLACE FUNCTION _step_no_of(r baton.runs, step text) RETURNS integer
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION _downstream_closure(definition jsonb, step_no integer) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN ARRAY(
        WITH RECURSIVE d(n) AS (
            SELECT step_no
            UNION
            SELECT e::integer FROM d, jsonb_array_elements_text(definition -> 'steps' -> d.n -> 'downstream') e)
        SELECT n FROM d ORDER BY n);
END $$;

-- sql/operation.sql
CREATE OR REPLACE FUNCTION _rerun(r baton.runs, again integer[]) RETURNS integer
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION resume_workflow(id uuid) RETURNS boolean
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION retry_from(id uuid, step text) RETURNS boolean
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION fork_workflow(id uuid, from_step text, input jsonb DEFAULT NULL, version text DEFAULT NULL)
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION _delete_runs(ids uuid[]) RETURNS bigint
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION delete_workflow(id uuid, force boolean DEFAULT false) RETURNS boolean
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION _purge_batch(cutoff timestamptz, batch integer) RETURNS bigint
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

-- sql/operation.sql
CREATE OR REPLACE FUNCTION purge(older_than interval, batch_size integer DEFAULT 1000) RETURNS bigint
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

-- sql/stats.sql
CREATE OR REPLACE FUNCTION _queue_stats() RETURNS TABLE(
    queue text, ready bigint, delayed bigint, running bigint, waiting bigint,
    failed_last_hour bigint, completed_last_minute bigint, oldest_ready_age interval,
    concurrency integer, paused boolean, rate_limit integer, rate_period interval,
    concurrency_key text, per_key_concurrency integer, rate_used bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    at timestamptz := clock_timestamp();
BEGIN
    RETURN QUERY
    WITH live AS (
        -- one partial index each (an IN list would match none of them)
        SELECT s.queue, 'ready' AS status, count(*) AS n, min(s.run_at) AS oldest
          FROM baton.steps s WHERE s.status = 'ready' GROUP BY s.queue
        UNION ALL
        SELECT s.queue, 'scheduled', count(*), NULL FROM baton.steps s WHERE s.status = 'scheduled' GROUP BY s.queue
        UNION ALL
        SELECT s.queue, 'running', count(*), NULL FROM baton.steps s WHERE s.status = 'running' GROUP BY s.queue
        UNION ALL
        SELECT s.queue, 'waiting', count(*), NULL FROM baton.steps s WHERE s.status = 'waiting' GROUP BY s.queue
    ), finished_queues AS (
        -- the queues of steps_finished, one probe each (a skip scan)
        WITH RECURSIVE f(name) AS (
            SELECT (SELECT min(s.queue) FROM baton.steps s WHERE s.finished_at IS NOT NULL)
            UNION ALL
            SELECT (SELECT min(s.queue) FROM baton.steps s WHERE s.finished_at IS NOT NULL AND s.queue > f.name)
              FROM f WHERE f.name IS NOT NULL)
        SELECT f.name FROM f WHERE f.name IS NOT NULL
    ), recent AS (
        SELECT q.name,
               (SELECT count(*) FROM baton.steps s
                 WHERE s.queue = q.name AND s.status = 'failed' AND s.finished_at IS NOT NULL
                   AND s.finished_at > at - interval '1 hour') AS failed,
               (SELECT count(*) FROM baton.steps s
                 WHERE s.queue = q.name AND s.status = 'succeeded' AND s.finished_at IS NOT NULL
                   AND s.finished_at > at - interval '1 minute') AS completed
          FROM finished_queues q
    ), names AS (
        SELECT c.name FROM baton.queues c
        UNION SELECT l.queue FROM live l
        UNION SELECT r.name FROM recent r WHERE r.failed > 0 OR r.completed > 0
    )
    SELECT n.name,
           coalesce((SELECT l.n FROM live l WHERE l.queue = n.name AND l.status = 'ready'), 0),
           coalesce((SELECT l.n FROM live l WHERE l.queue = n.name AND l.status = 'scheduled'), 0),
           coalesce((SELECT l.n FROM live l WHERE l.queue = n.name AND l.status = 'running'), 0),
           coalesce((SELECT l.n FROM live l WHERE l.queue = n.name AND l.status = 'waiting'), 0),
           coalesce(r.failed, 0),
           coalesce(r.completed, 0),
           greatest(at - (SELECT l.oldest FROM live l WHERE l.queue = n.name AND l.status = 'ready'), interval '0'),
           c.concurrency, coalesce(c.paused, false), c.rate_limit, c.rate_period,
           c.concurrency_key::text, c.per_key_concurrency,
           CASE WHEN c.rate_limit IS NOT NULL
                THEN baton._rate_used(n.name, (extract(epoch FROM c.rate_period) * 1000000)::bigint, at) END
      FROM names n
      LEFT JOIN baton.queues c ON c.name = n.name
      LEFT JOIN recent r ON r.name = n.name
     ORDER BY n.name;
END $$;

-- sql/graph.sql
CREATE OR REPLACE FUNCTION workflow_graph(id uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    r baton.runs := baton._existing_run(id);
BEGIN
    RETURN jsonb_build_object(
        'run', jsonb_build_object('id', r.id, 'workflow', r.workflow, 'version', r.version, 'status', r.status,
                                  'error', r.error, 'created_at', r.created_at, 'started_at', r.started_at,
                                  'finished_at', r.finished_at, 'parent_id', r.parent_id,
                                  'forked_from', r.forked_from),
        'steps', coalesce((
            SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                       'name', s.name, 'kind', s.kind, 'status', s.status, 'attempt', s.attempt,
                       'max_attempts', s.max_attempts, 'queue', s.queue, 'worker', s.worker,
                       'started_at', s.started_at, 'finished_at', s.finished_at, 'error', s.error,
                       'wait_for', s.wait_for,
                       'after', ARRAY(SELECT u.name FROM baton.steps u
                                       WHERE u.run_id = s.run_id AND u.step_no = ANY (s.upstream) ORDER BY u.step_no),
                       'map', CASE WHEN s.kind = 'map' THEN (
                                  SELECT jsonb_build_object('items', coalesce(sum(c.n), 0)) || coalesce(jsonb_object_agg(c.status, c.n), '{}')
                                    FROM (SELECT i.status::text AS status, count(*) AS n FROM baton.steps i
                                           WHERE i.run_id = s.run_id AND i.map_index IS NOT NULL
                                             AND i.downstream = ARRAY[s.step_no]
                                           GROUP BY i.status) c) END,
                       'child_runs', CASE WHEN s.kind = 'workflow' THEN (
                                  SELECT coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'status', c.status)
                                                            ORDER BY c.created_at), '[]')
                                    FROM baton.runs c WHERE c.parent_id = s.run_id AND c.parent_step_no = s.step_no) END))
                   ORDER BY s.step_no)
              FROM baton.steps s WHERE s.run_id = r.id AND s.map_index IS NULL), '[]'),
        'edges', coalesce((
            SELECT jsonb_agg(jsonb_build_object('from', u.name, 'to', s.name) ORDER BY s.step_no, u.step_no)
              FROM baton.steps s
              JOIN baton.steps u ON u.run_id = s.run_id AND u.step_no = ANY (s.upstream)
             WHERE s.run_id = r.id AND s.map_index IS NULL), '[]'));
END $$;

-- sql/worker.sql
CREATE OR REPLACE FUNCTION _session_alive(pid integer, backend_start timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT FROM pg_stat_get_activity(_session_alive.pid) a
                    WHERE a.backend_start = _session_alive.backend_start);
END $$;

-- sql/worker.sql
CREATE OR REPLACE FUNCTION register_worker(worker text, queues text[] DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    started timestamptz := (SELECT a.backend_start FROM pg_stat_get_activity(pg_backend_pid()) a);
BEGIN
    IF register_worker.worker IS NULL OR btrim(register_worker.worker) = '' THEN
        RAISE EXCEPTION 'worker must be a non-empty name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(register_worker.worker, 'worker');
    IF register_worker.queues IS NOT NULL THEN
        PERFORM baton._check_array(register_worker.queues, 'queues');
    END IF;
    -- one name's sessions change one at a time (here and in _worker_gone)
    PERFORM pg_advisory_xact_lock(1651797604, hashtext(register_worker.worker));
    PERFORM baton._worker_gone(register_worker.worker, false);
    -- the name's record is its live session again
    DELETE FROM baton.worker_sessions w WHERE w.worker = register_worker.worker AND w.gone_at IS NOT NULL;
    INSERT INTO baton.worker_sessions AS w (worker, pid, backend_start, server_start, queues, registered_at)
    VALUES (register_worker.worker, pg_backend_pid(), started, pg_postmaster_start_time(), register_worker.queues, now())
    ON CONFLICT (worker, pid) DO UPDATE
       SET backend_start = excluded.backend_start, server_start = excluded.server_start, queues = excluded.queues,
           registered_at = excluded.registered_at, gone_at = NULL;
    -- (session settings: ignored on a Unix socket) Keepalives find a dead
    -- peer of an idle connection; the user timeout one of a connection
    -- with data in flight, which keepalives never probe: a listener nearly
    -- always has some, since every NOTIFY baton_ready reaches it.
    PERFORM set_config('tcp_keepalives_idle', '5', false);
    PERFORM set_config('tcp_keepalives_interval', '1', false);
    PERFORM set_config('tcp_keepalives_count', '5', false);
    PERFORM set_config('tcp_user_timeout', '10000', false);
END $$;

-- sql/worker.sql
CREATE OR REPLACE FUNCTION _worker_gone(worker text, try boolean DEFAULT true) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    c record;
    ended integer := 0;
    newest timestamptz;
BEGIN
    IF try AND NOT pg_try_advisory_xact_lock(1651797604, hashtext(worker)) THEN
        RETURN 0;
    END IF;
    -- Sessions of another server run (it restarted since, or this is a
    -- standby promoted after a failover) tell nothing of their worker, which
    -- is most likely reconnecting: they are forgotten, and their leases fall
    -- back to their expiry.
    DELETE FROM baton.worker_sessions w
     WHERE w.worker = worker AND w.gone_at IS NULL AND w.server_start <> pg_postmaster_start_time();
    IF EXISTS (SELECT FROM baton.worker_sessions w
                WHERE w.worker = worker AND w.gone_at IS NULL AND baton._session_alive(w.pid, w.backend_start)) THEN
        DELETE FROM baton.worker_sessions w
         WHERE w.worker = worker AND w.gone_at IS NULL AND NOT baton._session_alive(w.pid, w.backend_start);
        RETURN 0;
    END IF;
    IF NOT EXISTS (SELECT FROM baton.worker_sessions w WHERE w.worker = worker AND w.gone_at IS NULL) THEN
        RETURN 0;  -- handled already
    END IF;
    FOR c IN
        SELECT e.run_id, e.step_no FROM baton.steps e
         WHERE e.status = 'running' AND e.worker = worker
    LOOP
        BEGIN
            IF baton._reclaim_one(c.run_id, c.step_no, true, worker) THEN
                ended := ended + 1;
            END IF;
        EXCEPTION
            WHEN lock_not_available THEN
                NULL;  -- a step of the run is held by an open transaction: next round
        END;
    END LOOP;
    IF NOT EXISTS (SELECT FROM baton.steps e WHERE e.status = 'running' AND e.worker = worker) THEN
        SELECT max(w.registered_at) INTO newest FROM baton.worker_sessions w WHERE w.worker = worker;
        DELETE FROM baton.worker_sessions w WHERE w.worker = worker AND w.registered_at < newest;
        UPDATE baton.worker_sessions w SET gone_at = coalesce(w.gone_at, clock_timestamp()) WHERE w.worker = worker;
    END IF;
    RETURN ended;
END $$;

-- sql/worker.sql
CREATE OR REPLACE FUNCTION _workers_gone() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    name text;
    ended integer := 0;
BEGIN
    FOR name IN
        SELECT DISTINCT w.worker FROM baton.worker_sessions w
         WHERE w.gone_at IS NULL AND NOT baton._session_alive(w.pid, w.backend_start)
    LOOP
        ended := ended + baton._worker_gone(name);
    END LOOP;
    DELETE FROM baton.worker_sessions w WHERE w.gone_at < now() - interval '7 days';
    RETURN ended;
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION _role_objects(kind text) RETURNS SETOF text
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_variable
DECLARE
    functions text[];
    views text[];
BEGIN
    CASE kind
    WHEN 'client' THEN
        functions := ARRAY['define_workflow', 'enqueue_workflow', 'enqueue_workflows', 'cancel_workflow',
                           'send_event', 'get_event', 'workflow_graph', '_invoker', '_sees_all'];
        views := ARRAY['workflow_runs', 'workflow_steps', 'step_attempts', 'workflow_log', 'workflow_definitions'];
    WHEN 'worker' THEN
        functions := ARRAY['claim_steps', 'complete_and_claim', 'complete_step', 'complete_steps', 'fail_step',
                           'heartbeat', 'checkpoint', 'suspend_step', 'release_step', 'register_worker',
                           'set_event', 'send_event', 'get_event'];
        views := ARRAY[]::text[];
    WHEN 'admin' THEN
        functions := ARRAY['resume_workflow', 'retry_from', 'fork_workflow', 'delete_workflow', 'purge',
                           'configure_queue', 'schedule', 'unschedule', '_queue_stats', '_session_alive'];
        views := ARRAY['queue_stats', 'schedules', 'workers', 'grants'];
        -- and a client's part, on every run
        RETURN QUERY SELECT baton._role_objects('client');
    ELSE
        RAISE EXCEPTION 'kind must be client, worker or admin, not %', kind USING ERRCODE = 'invalid_parameter_value';
    END CASE;
    RETURN QUERY
        SELECT format('EXECUTE ON FUNCTION baton.%I(%s)', p.proname, pg_get_function_identity_arguments(p.oid))
          FROM pg_proc p
         WHERE p.pronamespace = 'baton'::regnamespace AND p.proname = ANY (functions)
         ORDER BY 1;
    RETURN QUERY
        SELECT format('SELECT ON TABLE baton.%I', c.relname)
          FROM pg_class c
         WHERE c.relnamespace = 'baton'::regnamespace AND c.relname = ANY (views)
         ORDER BY 1;
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION _apply_grants(role oid) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    o text;
BEGIN
    FOR o IN SELECT DISTINCT baton._role_objects(k) FROM unnest(ARRAY['client', 'worker', 'admin']) k LOOP
        EXECUTE format('REVOKE %s FROM %s', o, role::regrole);
    END LOOP;
    FOR o IN SELECT DISTINCT baton._role_objects(g.kind) FROM baton.role_grants g WHERE g.role = role LOOP
        EXECUTE format('GRANT %s TO %s', o, role::regrole);
    END LOOP;
    IF EXISTS (SELECT FROM baton.role_grants g WHERE g.role = role) THEN
        EXECUTE format('GRANT USAGE ON SCHEMA baton TO %s', role::regrole);
    ELSE
        EXECUTE format('REVOKE USAGE ON SCHEMA baton FROM %s', role::regrole);
    END IF;
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION _set_grant(role regrole, kind text, granted boolean) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    PERFORM baton._require(role, 'role');
    IF granted THEN
        INSERT INTO baton.role_grants (role, kind) VALUES (role, kind) ON CONFLICT DO NOTHING;
    ELSE
        DELETE FROM baton.role_grants g WHERE g.role = role AND g.kind = kind;
    END IF;
    PERFORM baton._apply_grants(role);
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION grant_client(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'client', true);
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION grant_worker(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'worker', true);
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION grant_admin(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'admin', true);
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION revoke_client(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'client', false);
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION revoke_worker(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'worker', false);
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION revoke_admin(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'admin', false);
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION _holds(kind text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_variable
DECLARE
    me oid := baton._invoker();
BEGIN
    RETURN (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = me)
        OR EXISTS (SELECT FROM baton.role_grants g JOIN pg_catalog.pg_roles r ON r.oid = g.role
                    WHERE g.kind = kind AND pg_catalog.pg_has_role(me, g.role, 'USAGE'));
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION _sees_all() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN baton._holds('admin');
END $$;

-- sql/role.sql
CREATE OR REPLACE FUNCTION _visible(owner oid) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce(owner = baton._invoker(), false) OR baton._sees_all();
END $$;

-- sql/planner.sql
-- Planner and lock settings of the protocol's entry points, set on the
-- functions so that they hold whatever the server's or the session's
-- settings are, and inherited by the functions they call.

-- The hot path (claim_steps calls complete_and_claim). Every lookup there is
-- a probe by key: the planner must not pick a scan or a hash join, whatever
-- the statistics say. A generic plan is made once per session, maybe while
-- the tables were small or no step was ready.
ALTER FUNCTION complete_steps(bigint[], uuid[], jsonb[]) SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off;
ALTER FUNCTION complete_and_claim(bigint[], uuid[], jsonb[], text, text[], integer, interval) SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off;

-- No plan of the protocol is JIT-compiled or run in parallel: cost estimates
-- can cross those thresholds (a table not yet analyzed, a big backlog), and
-- either costs milliseconds on a statement that takes a fraction of one.
ALTER FUNCTION complete_steps(bigint[], uuid[], jsonb[]) SET jit = off SET max_parallel_workers_per_gather = 0;
ALTER FUNCTION complete_and_claim(bigint[], uuid[], jsonb[], text, text[], integer, interval)
    SET jit = off SET max_parallel_workers_per_gather = 0;
ALTER FUNCTION claim_steps(text, text[], integer, interval) SET jit = off SET max_parallel_workers_per_gather = 0;
ALTER FUNCTION fail_step(bigint, uuid, text, boolean) SET jit = off SET max_parallel_workers_per_gather = 0;
ALTER FUNCTION enqueue_workflow(text, jsonb, text, text, integer, timestamptz, timestamptz)
    SET jit = off SET max_parallel_workers_per_gather = 0;
ALTER FUNCTION enqueue_workflows(text, jsonb[], text[], text, integer, timestamptz, timestamptz)
    SET jit = off SET max_parallel_workers_per_gather = 0;
ALTER FUNCTION cancel_workflow(uuid) SET jit = off SET max_parallel_workers_per_gather = 0;
ALTER FUNCTION send_event(uuid, text, jsonb) SET jit = off SET max_parallel_workers_per_gather = 0;
ALTER FUNCTION suspend_step(bigint, uuid, timestamptz, text, interval) SET jit = off SET max_parallel_workers_per_gather = 0;

-- The background worker's round: the same, and it never waits long for a
-- lock (its reclaim does not wait at all, see _reclaim_expired): a task that
-- would is logged and skipped, and the next round tries again.
ALTER FUNCTION _tick() SET jit = off SET max_parallel_workers_per_gather = 0 SET lock_timeout = '1s';
ALTER FUNCTION _fire_timers() SET jit = off SET max_parallel_workers_per_gather = 0 SET lock_timeout = '1s';

-- Statistics read only the live part of steps and a recent range of
-- steps_finished (sql/stats.sql), whatever the statistics say.
ALTER FUNCTION _queue_stats() SET enable_seqscan = off SET jit = off SET max_parallel_workers_per_gather = 0
    SET plan_cache_mode = force_generic_plan;

-- sql/views.sql
-- Read-only views for people and dashboards. States are shown as text.
--
-- A client sees only the runs it enqueued (sql/role.sql), an admin or a
-- superuser every run: the views of runs filter by the calling role, and are
-- security barriers, so that no function in a caller's WHERE clause sees the
-- rows before the filter does. _sees_all() and _invoker() are evaluated once
-- per query (each is an uncorrelated subquery).

CREATE OR REPLACE VIEW workflow_runs WITH (security_barrier) AS
SELECT r.id, r.workflow, r.version, r.status::text AS status, r.queue, r.priority, r.input, r.output, r.error,
       r.idempotency_key, r.created_at, r.started_at, r.finished_at,
       r.parent_id,
       (SELECT p.name FROM baton.steps p WHERE p.run_id = r.parent_id AND p.step_no = r.parent_step_no) AS parent_step,
       r.deadline,
       r.forked_from,
       r.enqueued_by::regrole AS enqueued_by
  FROM baton.runs r
 WHERE (SELECT baton._sees_all()) OR r.enqueued_by = (SELECT baton._invoker());

CREATE OR REPLACE VIEW workflow_steps WITH (security_barrier) AS
SELECT s.run_id AS workflow_id, s.name AS step, s.status::text AS status, s.attempt, s.max_attempts, s.queue, s.run_at,
       s.worker, s.lease_expires_at, s.output, s.error, s.started_at, s.finished_at,
       s.step_id,
       ARRAY(SELECT u.name FROM baton.steps u
              WHERE u.run_id = s.run_id AND u.step_no = ANY (s.upstream) ORDER BY u.step_no) AS after,
       s.priority,
       s.kind::text AS kind, s.map_index, s.wait_for,
       CASE WHEN s.status = 'waiting' AND s.run_at < 'infinity' THEN s.run_at END AS wake_at
  FROM baton.steps s
 WHERE (SELECT baton._sees_all())
    OR EXISTS (SELECT FROM baton.runs r WHERE r.id = s.run_id AND r.enqueued_by = (SELECT baton._invoker()));

-- Every attempt: those that did not succeed from the attempts table, and each
-- succeeded step's last attempt from the step itself (see schema.sql). A
-- step a fork copied (attempt 0) made no attempt in its run. The successes
-- of steps run again (retry_from) are in the attempts table.
CREATE OR REPLACE VIEW step_attempts WITH (security_barrier) AS
SELECT a.run_id AS workflow_id, a.step, a.step_id, a.attempt, a.worker, a.started_at, a.finished_at,
       a.outcome::text AS outcome, a.error
  FROM baton.attempts a
 WHERE (SELECT baton._sees_all())
    OR EXISTS (SELECT FROM baton.runs r WHERE r.id = a.run_id AND r.enqueued_by = (SELECT baton._invoker()))
UNION ALL
SELECT s.run_id, s.name, s.step_id, s.attempt, s.worker, s.started_at, s.finished_at,
       'succeeded', NULL
  FROM baton.steps s
 WHERE s.status = 'succeeded' AND s.attempt > 0
   AND ((SELECT baton._sees_all())
        OR EXISTS (SELECT FROM baton.runs r WHERE r.id = s.run_id AND r.enqueued_by = (SELECT baton._invoker())));

-- Schedules (sql/schedule.sql): as schedule() took them, with their next
-- tick and the last run they made.
CREATE OR REPLACE VIEW schedules AS
SELECT c.name, c.cron, c.timezone, c.workflow, c.input, c.overlap, c.paused, c.next_run_at, c.last_run_at, c.last_run_id
  FROM baton.schedule_entries c;

-- Every version of every workflow, with how many of its runs are not
-- finished: a run finishes on the version it started with (sql/operation.sql).
CREATE OR REPLACE VIEW workflow_definitions AS
SELECT w.name, w.version, w.definition, w.created_at,
       (SELECT count(*) FROM baton.runs r
         WHERE r.workflow = w.name AND r.version = w.version AND r.finished_at IS NULL) AS unfinished_runs,
       w.version = max(w.version) OVER (PARTITION BY w.name) AS latest
  FROM baton.workflows w;

-- What operations did to runs (sql/operation.sql), oldest first per run.
CREATE OR REPLACE VIEW workflow_log WITH (security_barrier) AS
SELECT l.run_id AS workflow_id, l.seq, l.at, l.action, l.step, l.detail, l.actor
  FROM baton.run_log l
 WHERE (SELECT baton._sees_all())
    OR EXISTS (SELECT FROM baton.runs r WHERE r.id = l.run_id AND r.enqueued_by = (SELECT baton._invoker()));

-- Per queue: its backlog, recent outcomes and settings (sql/stats.sql).
CREATE OR REPLACE VIEW queue_stats AS
SELECT * FROM baton._queue_stats();

-- Registered workers (sql/worker.sql), one row per name, from its newest
-- session: alive while one of its sessions runs; last_seen is now for a live
-- one, else when its last session was found gone.
CREATE OR REPLACE VIEW workers AS
SELECT n.worker AS name, n.queues, n.registered_at,
       CASE WHEN s.alive THEN now() ELSE coalesce(s.gone_at, n.registered_at) END AS last_seen,
       (SELECT count(*) FROM baton.steps e WHERE e.status = 'running' AND e.worker = n.worker) AS steps_held,
       s.alive
  FROM (SELECT DISTINCT ON (w.worker) w.worker, w.queues, w.registered_at
          FROM baton.worker_sessions w ORDER BY w.worker, w.registered_at DESC) n
 CROSS JOIN LATERAL (
       SELECT coalesce(bool_or(w.gone_at IS NULL AND baton._session_alive(w.pid, w.backend_start)), false) AS alive,
              max(w.gone_at) AS gone_at
         FROM baton.worker_sessions w WHERE w.worker = n.worker) s;

-- Which roles hold which kind (sql/role.sql), for admins.
CREATE OR REPLACE VIEW grants AS
SELECT g.role::regrole AS role, g.kind, g.granted_at
  FROM baton.role_grants g;

-- sql/privileges.sql
-- Who may call what (sql/role.sql, docs/roles.md). Run last, when every
-- function and view exists, by CREATE EXTENSION and by every upgrade.

-- Every entry point runs with a fixed search_path, so that a caller's (or
-- the database's) search_path cannot put its own functions, operators or
-- tables in place of the ones the protocol means: the public functions, the
-- background worker's rounds and what the views call. pg_temp comes last
-- (unlisted, it would be searched first for tables). The internal helpers
-- inherit the path from the entry point they run under, and stay inlinable
-- (a SET clause would stop that).
--
-- The functions a role may be granted run as the extension's owner
-- (SECURITY DEFINER): the roles are never granted the tables, and reach them
-- only through the protocol. The internal helpers run under those, as the
-- owner already.
DO $$
DECLARE
    f regprocedure;
    definer boolean;
BEGIN
    FOR f, definer IN
        SELECT p.oid, p.proname !~ '^_' OR p.proname IN ('_queue_stats', '_session_alive', '_sees_all')
          FROM pg_proc p
         WHERE p.pronamespace = 'baton'::regnamespace
           AND (p.proname !~ '^_' OR p.proname IN ('_tick', '_fire_timers', '_queue_stats', '_session_alive', '_sees_all'))
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, baton, pg_temp', f);
        IF definer THEN
            EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', f);
        END IF;
    END LOOP;
END $$;

-- Nothing for PUBLIC (PostgreSQL lets every role execute a new function):
-- only superusers, the owner, and the roles granted a kind.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA baton FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA baton FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA baton FROM PUBLIC;
REVOKE ALL ON SCHEMA baton FROM PUBLIC;

-- An upgrade may add functions to a kind: the roles that hold it get them.
-- (A role dropped since it was granted is forgotten.)
DELETE FROM role_grants g WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.oid = g.role);
SELECT _apply_grants(role) FROM (SELECT DISTINCT role FROM role_grants) g;
