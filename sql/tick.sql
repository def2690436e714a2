-- The background worker's full round (src/worker.rs calls it once per
-- baton.interval, and _fire_timers alone when a timer comes due between).
-- Each task runs in its own subtransaction: one failing task is logged as a
-- WARNING and does not stop the others. Returns what it did, as JSON.

CREATE FUNCTION _tick() RETURNS jsonb
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
