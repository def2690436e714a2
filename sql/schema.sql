-- pg_baton schema: definitions, runs, steps, attempts, checkpoints, queues.
--
-- Layout rules (see README "Design"):
--  * every per-run table has the run id first in its primary key, so the schema
--    can later be distributed by run id;
--  * claiming only ever reads the partial index of ready steps, so finished
--    history never slows it down;
--  * columns that change on every heartbeat (lease_expires_at) are in no index,
--    so heartbeats are HOT updates; tables updated in place keep free space;
--  * states are enums, not text with CHECK constraints: PostgreSQL re-reads and
--    compiles a table's CHECK expressions in every statement that writes it,
--    which was a fifth of a worker's turn. An enum costs nothing to check.

CREATE TYPE run_status AS ENUM ('pending', 'running', 'succeeded', 'failed', 'cancelled');
-- scheduled: runnable once run_at passes (a delayed start, a retry's backoff,
-- a delayed release); the background worker makes it ready then. Kept apart
-- from ready so that claims never walk past steps that are not due yet.
-- waiting: a step no worker holds that waits for time, an event, a child run
-- or its map items (sql/kinds.sql), or a task step a worker suspended
-- (suspend_step); run_at is when it fires by time ('infinity': never).
CREATE TYPE step_status AS ENUM ('blocked', 'scheduled', 'ready', 'running', 'waiting', 'succeeded', 'failed', 'cancelled');
-- What a step is (sql/kinds.sql): a task a worker runs (map items are tasks
-- too), or one the database runs by itself.
CREATE TYPE step_kind AS ENUM ('task', 'sleep', 'event', 'workflow', 'map');
CREATE TYPE attempt_outcome AS ENUM ('succeeded', 'failed', 'lease_expired', 'timed_out', 'cancelled');

-- Versions of a workflow definition (normalized JSON, see src/definition.rs).
CREATE TABLE workflows (
    name        text        NOT NULL,
    version     integer     NOT NULL,
    definition  jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- Queue settings. A queue with no row here is open and unlimited. Flow
-- control (sql/flow.sql): at most rate_limit claims per rate_period, and at
-- most per_key_concurrency running steps per value of concurrency_key (a
-- JSON path into the run's input).
CREATE TABLE queues (
    name                 text        PRIMARY KEY,
    concurrency          integer     CHECK (concurrency IS NULL OR concurrency >= 0),
    paused               boolean     NOT NULL DEFAULT false,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    rate_limit           integer     CHECK (rate_limit IS NULL OR rate_limit >= 1),
    rate_period          interval,
    concurrency_key      jsonpath,
    per_key_concurrency  integer     CHECK (per_key_concurrency IS NULL OR per_key_concurrency >= 1)
);

CREATE TABLE runs (
    -- time-ordered (src/ids.rs): new runs sit together in every index by run id
    id               uuid        NOT NULL DEFAULT baton._run_id() PRIMARY KEY,
    workflow         text        NOT NULL,
    version          integer     NOT NULL,
    status           run_status  NOT NULL DEFAULT 'pending',
    queue            text        NOT NULL,
    priority         integer     NOT NULL DEFAULT 0,
    input            jsonb       NOT NULL DEFAULT '{}',
    output           jsonb,
    error            text,
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    -- a child run (sql/child.sql): the run and step (step_no) that started it
    parent_id        uuid,
    parent_step_no   integer,
    -- failed by the background worker when it passes (sql/timer.sql)
    deadline         timestamptz,
    -- a fork (sql/operation.sql): the run it was forked from
    forked_from      uuid,
    -- the role that enqueued it (sql/role.sql): a client sees only its own
    -- runs; a child run is its parent's, a fork its source's
    enqueued_by      oid,
    FOREIGN KEY (workflow, version) REFERENCES workflows (name, version)
) WITH (fillfactor = 80);

-- Idempotent enqueue: one run per (workflow, key), also under racing inserts.
CREATE UNIQUE INDEX runs_idempotency_key ON runs (workflow, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Retention: finished runs, oldest first.
CREATE INDEX runs_finished_at ON runs (finished_at) WHERE finished_at IS NOT NULL;
-- Child runs of a run (cancelling a run cancels them).
CREATE INDEX runs_parent ON runs (parent_id) WHERE parent_id IS NOT NULL;
-- Unfinished runs with a deadline, soonest first (the background worker's timer).
CREATE INDEX runs_deadline ON runs (deadline) WHERE deadline IS NOT NULL AND finished_at IS NULL;
-- Unfinished runs per workflow version (the workflow_definitions view).
CREATE INDEX runs_unfinished ON runs (workflow, version) WHERE finished_at IS NULL;

CREATE TABLE steps (
    run_id            uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    -- the step's position in its definition: neighbours are found by key
    step_no           integer     NOT NULL,
    -- the protocol's handle for the step (claim_steps, complete_step, ...)
    step_id           bigint      GENERATED ALWAYS AS IDENTITY,
    name              text        NOT NULL,
    status            step_status NOT NULL,
    upstream          integer[]   NOT NULL DEFAULT '{}',   -- step_no of direct upstream steps
    downstream        integer[]   NOT NULL DEFAULT '{}',   -- step_no of direct downstream steps
    -- upstream steps not yet succeeded; the step becomes ready at 0
    waiting_on        integer     NOT NULL DEFAULT 0,
    queue             text        NOT NULL,
    priority          integer     NOT NULL DEFAULT 0,
    -- when a scheduled step comes due (delayed start, backoff); claims take
    -- older run_at first. A step keeps its run's start when its upstream
    -- steps finish, so older runs are finished first.
    run_at            timestamptz NOT NULL DEFAULT now(),
    attempt           integer     NOT NULL DEFAULT 0,
    max_attempts      integer     NOT NULL,
    timeout           interval,
    worker            text,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    output            jsonb,
    error             text,
    started_at        timestamptz,
    finished_at       timestamptz,
    kind              step_kind   NOT NULL DEFAULT 'task',
    -- a map item (sql/map.sql): its element's position (0-based) and the
    -- element. Its step_no comes after the definition's steps, and its only
    -- downstream step is its map step.
    map_index         integer,
    map_item          jsonb,
    -- the event a waiting step waits for (wait_event, suspend_step)
    wait_for          text,
    -- its run's value of its queue's concurrency_key (sql/flow.sql), set
    -- when the step is made, '' for a run without one; NULL when its queue
    -- has no per-key limit
    flow_key          text,
    PRIMARY KEY (run_id, step_no)
    -- The fencing invariant: a lease token exists exactly while the step runs.
    -- The protocol's lookups rely on it (step_id and token, no status test), so
    -- that their plans stay on steps_step_id whatever the statistics say. Every
    -- statement that sets or clears a lease sets both; not a CHECK constraint
    -- for the cost given above. pg_test/sql/concurrency.sql checks it holds.
) WITH (fillfactor = 70);

-- Lookups by step id (the protocol's handle). Not unique on purpose: the
-- identity already guarantees it, and a unique index without run_id would have
-- to go when the table is distributed by run id.
CREATE INDEX steps_step_id ON steps (step_id);
-- The claim path: runnable steps per queue, highest priority first, then oldest.
CREATE INDEX steps_ready ON steps (queue, priority DESC, run_at, step_id) WHERE status = 'ready';
-- Leased steps per queue, soonest expiry first: concurrency limits count a
-- queue's entries, and reclaim reads only the expired ones, however many
-- healthy leases there are. A heartbeat therefore updates an index entry (not
-- HOT); it comes once per third of a lease, a scan of every lease would come
-- with every short claim.
CREATE INDEX steps_running ON steps (queue, lease_expires_at) WHERE status = 'running';
-- Steps waiting for their time, soonest first: the background worker makes
-- them ready when due.
CREATE INDEX steps_scheduled ON steps (run_at) WHERE status = 'scheduled';
-- Waiting steps: by the time they fire (sleeps, event timeouts, suspended
-- steps), and by the event they wait for (send_event finds its step by probe,
-- also in a run with 100,000 map items).
CREATE INDEX steps_waiting ON steps (run_at) WHERE status = 'waiting';
CREATE INDEX steps_waiting_for ON steps (run_id, wait_for) WHERE status = 'waiting' AND wait_for IS NOT NULL;
-- Running steps per key of a queue's concurrency_key (sql/flow.sql): a
-- per-key limit is a probe, not a count of the queue's leases.
CREATE INDEX steps_flow ON steps (queue, flow_key) WHERE status = 'running' AND flow_key IS NOT NULL;
-- Ready steps of keyed queues per key, in the claim's order: a claim that
-- meets a deep backlog of keys at their limit goes key by key instead.
CREATE INDEX steps_ready_keyed ON steps (queue, flow_key, priority DESC, run_at, step_id)
    WHERE status = 'ready' AND flow_key IS NOT NULL;
-- Finished steps per queue, newest last: queue_stats counts the last
-- minute's and hour's by a range of this index, never the whole history.
CREATE INDEX steps_finished ON steps (queue, status, finished_at) WHERE finished_at IS NOT NULL;

ALTER TABLE steps SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE runs SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);

-- Append-only history: one row per attempt that did not succeed, written once.
-- A step's successful attempt is its own row in steps (attempt, worker,
-- started_at, finished_at): not written twice. The step_attempts view shows both.
CREATE TABLE attempts (
    run_id       uuid        NOT NULL,
    step_id      bigint      NOT NULL,
    attempt      integer     NOT NULL,
    step         text        NOT NULL,
    worker       text,
    started_at   timestamptz,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    outcome      attempt_outcome NOT NULL,
    error        text,
    PRIMARY KEY (run_id, step_id, attempt)
);
-- No foreign key to runs on purpose: its check would lock the run row on every
-- insert. Retention deletes a run's attempts and checkpoints with the run.

-- Partial progress of a step, handed to its later attempts.
CREATE TABLE checkpoints (
    run_id    uuid        NOT NULL,
    step_id   bigint      NOT NULL,
    key       text        NOT NULL,
    value     jsonb,
    attempt   integer     NOT NULL,
    saved_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step_id, key)
);

-- Lock classes for pg_advisory_xact_lock(class, key): per run (serializes the
-- transitions that touch several rows of one run) and per limited queue.
-- Helpers on the hot path are PL/pgSQL, not SQL functions: PL/pgSQL caches
-- its plans per session, PostgreSQL 15 re-plans a SQL function on every call.
CREATE FUNCTION _lock_run(run_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1651797601, uuid_hash(run_id));
END $$;

CREATE FUNCTION _try_lock_run(run_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RETURN pg_try_advisory_xact_lock(1651797601, uuid_hash(run_id));
END $$;

-- Raised when a lease is no longer held: expired and reclaimed, finished, or a
-- wrong token. SQLSTATE BT001 ("lease lost"); see README.
CREATE FUNCTION _lease_lost(step_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'lease lost: step % is not running under this lease_token', step_id
        USING ERRCODE = 'BT001',
              HINT = 'The lease expired and was reclaimed, the step already finished, or the token is wrong. Roll back this step''s work.';
END $$;

-- Argument checks shared by the protocol functions: NULLs get 22004, naming the field.
CREATE FUNCTION _require(value anyelement, field text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION '% must not be null', field USING ERRCODE = 'null_value_not_allowed';
    END IF;
END $$;

-- Names (queues, workflows, steps, workers) are at most 200 bytes and keys
-- (idempotency, checkpoint) at most 1000: a name travels in NOTIFY payloads
-- (8000 bytes at most) and in index keys. NULL passes: callers check it.
CREATE FUNCTION _check_length(value text, field text, max_bytes integer DEFAULT 200) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF octet_length(value) > max_bytes THEN
        RAISE EXCEPTION '% must be at most % bytes, got %', field, max_bytes, octet_length(value)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

-- Intervals that bound leases, timeouts and delays: positive, no negative
-- part ('1 month -29 days' is a day in some months and less than none in
-- others), and at most 10 years, so that now() plus any of them, or two of
-- them, is a valid timestamp.
CREATE FUNCTION _interval_ok(value interval) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN value > interval '0' AND value <= interval '10 years'
       AND extract(year FROM value) >= 0 AND extract(month FROM value) >= 0
       AND extract(day FROM value) >= 0
       AND value - date_trunc('day', value) >= interval '0';   -- the time part
END $$;

-- The same as an argument check (22023 naming the field). NULL passes:
-- callers check it.
CREATE FUNCTION _check_interval(value interval, field text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF NOT baton._interval_ok(value) THEN
        RAISE EXCEPTION '% must be a positive interval of at most 10 years with no negative part, got %', field, value
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

-- Arrays the protocol takes are one-dimensional and indexed from 1 (an
-- empty array passes): anything else would be read past or misaligned.
CREATE FUNCTION _check_array(value anyarray, field text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF array_ndims(value) > 1 OR array_lower(value, 1) <> 1 THEN
        RAISE EXCEPTION '% must be a one-dimensional array indexed from 1, got %', field,
            CASE WHEN array_ndims(value) > 1 THEN array_ndims(value) || ' dimensions'
                 ELSE 'lower bound ' || array_lower(value, 1) END
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;
