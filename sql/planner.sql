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
