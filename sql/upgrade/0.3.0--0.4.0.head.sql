-- pg_baton 0.3.0 -> 0.4.0: operating runs (resume, retry_from, fork, delete,
-- purge, the run log), flow control (rate limits, per-key concurrency) and
-- statistics (queue_stats, workflow_graph, workflow_definitions).
--
-- ALTER EXTENSION pg_baton UPDATE carries a database with runs in flight:
-- nothing stored is rewritten (the new columns are NULL). Building the
-- index of finished steps (steps_finished) reads the whole steps table and
-- blocks writes to it meanwhile: seconds per million steps, during which
-- workers wait, then go on. Rate limits need the new library preloaded:
-- restart PostgreSQL after installing it (as for any pg_baton upgrade).

-- Flow control (sql/flow.sql).
ALTER TABLE queues ADD COLUMN rate_limit integer CHECK (rate_limit IS NULL OR rate_limit >= 1),
                   ADD COLUMN rate_period interval,
                   ADD COLUMN concurrency_key jsonpath,
                   ADD COLUMN per_key_concurrency integer CHECK (per_key_concurrency IS NULL OR per_key_concurrency >= 1);
ALTER TABLE steps ADD COLUMN flow_key text;
CREATE INDEX steps_flow ON steps (queue, flow_key) WHERE status = 'running' AND flow_key IS NOT NULL;
CREATE INDEX steps_ready_keyed ON steps (queue, flow_key, priority DESC, run_at, step_id)
    WHERE status = 'ready' AND flow_key IS NOT NULL;

-- Statistics (sql/stats.sql) and versions (the workflow_definitions view).
CREATE INDEX steps_finished ON steps (queue, status, finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX runs_unfinished ON runs (workflow, version) WHERE finished_at IS NULL;

-- Operations (sql/operation.sql).
ALTER TABLE runs ADD COLUMN forked_from uuid;
CREATE TABLE run_log (
    run_id  uuid        NOT NULL,
    seq     bigint      GENERATED ALWAYS AS IDENTITY,
    at      timestamptz NOT NULL DEFAULT now(),
    action  text        NOT NULL,
    step    text,
    detail  jsonb,
    actor   text        NOT NULL DEFAULT current_user,
    PRIMARY KEY (run_id, seq)
);

-- The functions written in Rust (src/rate.rs).
CREATE FUNCTION "_rate_take"("queue" TEXT, "rate_limit" INT, "period_us" bigint, "want" INT, "at" timestamp with time zone) RETURNS INT
STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'rate_take_wrapper';
CREATE FUNCTION "_rate_give_back"("queue" TEXT, "period_us" bigint, "n" INT, "at" timestamp with time zone) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'rate_give_back_wrapper';
CREATE FUNCTION "_rate_used"("queue" TEXT, "period_us" bigint, "at" timestamp with time zone) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'rate_used_wrapper';
CREATE FUNCTION "_rate_wake_at"("queue" TEXT, "period_us" bigint, "at" timestamp with time zone) RETURNS timestamp with time zone
STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'rate_wake_at_wrapper';
CREATE FUNCTION "_rate_due"("at" timestamp with time zone) RETURNS SETOF TEXT
STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'rate_due_wrapper';
CREATE FUNCTION "_rate_next_wake"() RETURNS timestamp with time zone
STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'rate_next_wake_wrapper';

-- Functions whose arguments changed (new last arguments with defaults) or
-- that are gone (made again below, or replaced by _claim_flow).
DROP FUNCTION configure_queue(text, integer, boolean);
DROP FUNCTION _queue_slots(text[], integer);
