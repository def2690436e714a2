-- pg_baton 0.2.0 -> 0.3.0: time and events.
--
-- ALTER EXTENSION pg_baton UPDATE carries a database with runs in flight:
-- leases, tokens, attempts and checkpoints are kept as they are; every step
-- stored before is a task ('task' is the new kind column's default) and
-- every definition stored before has only tasks. It takes an exclusive lock
-- on baton.steps while the status column is rewritten (seconds per million
-- steps), so workers wait for it, then go on. claim_steps and
-- complete_and_claim return two more columns at the end (map_index,
-- map_item); workers that name the columns they read (the Rust and Python
-- workers do) are unaffected, and their prepared statements are planned
-- again on first use.

-- The waiting state (sql/kinds.sql, sql/suspend.sql). The type is replaced,
-- not altered: ALTER TYPE ... ADD VALUE could not be used in this same
-- transaction (the index predicates below need it).
DROP VIEW workflow_steps;
DROP VIEW step_attempts;
DROP INDEX steps_ready;
DROP INDEX steps_running;
DROP INDEX steps_scheduled;
ALTER TYPE step_status RENAME TO step_status_0_2;
CREATE TYPE step_status AS ENUM ('blocked', 'scheduled', 'ready', 'running', 'waiting', 'succeeded', 'failed', 'cancelled');
ALTER TABLE steps ALTER COLUMN status TYPE step_status USING status::text::step_status;
DROP TYPE step_status_0_2;
CREATE INDEX steps_ready ON steps (queue, priority DESC, run_at, step_id) WHERE status = 'ready';
CREATE INDEX steps_running ON steps (queue, lease_expires_at) WHERE status = 'running';
CREATE INDEX steps_scheduled ON steps (run_at) WHERE status = 'scheduled';

-- Step kinds, map items and waits.
CREATE TYPE step_kind AS ENUM ('task', 'sleep', 'event', 'workflow', 'map');
ALTER TABLE steps ADD COLUMN kind step_kind NOT NULL DEFAULT 'task',
                  ADD COLUMN map_index integer,
                  ADD COLUMN map_item jsonb,
                  ADD COLUMN wait_for text;
CREATE INDEX steps_waiting ON steps (run_at) WHERE status = 'waiting';
CREATE INDEX steps_waiting_for ON steps (run_id, wait_for) WHERE status = 'waiting' AND wait_for IS NOT NULL;

-- Child runs and deadlines.
ALTER TABLE runs ADD COLUMN parent_id uuid,
                 ADD COLUMN parent_step_no integer,
                 ADD COLUMN deadline timestamptz;
CREATE INDEX runs_parent ON runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_deadline ON runs (deadline) WHERE deadline IS NOT NULL AND finished_at IS NULL;

-- sql/event.sql
CREATE TABLE events (
    run_id       uuid        NOT NULL,
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    name         text        NOT NULL,
    payload      jsonb,
    sent_at      timestamptz NOT NULL DEFAULT now(),
    consumed_at  timestamptz,
    consumed_by  bigint,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX events_pending ON events (run_id, name, seq) WHERE consumed_at IS NULL;
CREATE TABLE event_values (
    run_id  uuid        NOT NULL,
    key     text        NOT NULL,
    value   jsonb,
    set_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, key)
);

-- sql/child.sql
CREATE TABLE run_signals (
    run_id      uuid        NOT NULL,
    seq         bigint      GENERATED ALWAYS AS IDENTITY,
    signal      text        NOT NULL,
    from_run    uuid        NOT NULL,
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);

-- sql/schedule.sql
CREATE TABLE schedule_entries (
    name         text        PRIMARY KEY,
    cron         text        NOT NULL,
    timezone     text        NOT NULL DEFAULT 'UTC',
    workflow     text        NOT NULL,
    input        jsonb       NOT NULL DEFAULT '{}',
    overlap      text        NOT NULL DEFAULT 'allow',
    paused       boolean     NOT NULL DEFAULT false,
    next_run_at  timestamptz NOT NULL,
    last_run_at  timestamptz,
    last_run_id  uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedule_entries_next_run_at ON schedule_entries (next_run_at) WHERE NOT paused;

-- The functions written in Rust (src/cron.rs, src/latch.rs).
CREATE FUNCTION "_cron_next_epoch"("cron" TEXT, "timezone" TEXT, "after" double precision) RETURNS double precision
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'cron_next_wrapper';
CREATE FUNCTION "_cron_prev_epoch"("cron" TEXT, "timezone" TEXT, "at_epoch" double precision) RETURNS double precision
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'cron_prev_wrapper';
CREATE FUNCTION "_wake_scheduler"("at" timestamp with time zone) RETURNS void
VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'wake_scheduler_wrapper';

-- Functions whose arguments or results changed (a new last argument with a
-- default, new last result columns).
DROP FUNCTION enqueue_workflow(text, jsonb, text, text, integer, timestamptz);
DROP FUNCTION enqueue_workflows(text, jsonb[], text[], text, integer, timestamptz);
DROP FUNCTION claim_steps(text, text[], integer, interval);
DROP FUNCTION complete_and_claim(bigint[], uuid[], jsonb[], text, text[], integer, interval);

-- Every function of the SQL protocol, as in a fresh install of 0.3.0
-- (generated by scripts/upgrade-script from sql/*.sql), then the planner
-- settings and the views.
