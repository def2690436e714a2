-- The background worker's round (src/worker.rs calls it once per baton.interval).
-- Each task runs in its own subtransaction: one failing task is logged as a
-- WARNING and does not stop the others. Returns what it did, as JSON.

CREATE FUNCTION _tick() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := clock_timestamp();
    reclaimed integer := 0;
    woken integer := 0;
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

    -- 2. Scheduled steps (a delayed start, a retry's backoff, a delayed
    --    release) that came due become ready, soonest first, a bounded batch
    --    a round; idle workers of their queues are told. A step another
    --    transaction holds is skipped, not waited for: the next round takes it.
    BEGIN
        WITH due AS MATERIALIZED (
            SELECT d.ctid FROM baton.steps d
             WHERE d.status = 'scheduled' AND d.run_at <= at
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

    -- 3. Retention: delete finished runs older than baton.retention (with their
    --    steps, attempts and checkpoints), a bounded batch per round.
    BEGIN
        retention := nullif(current_setting('baton.retention', true), '')::interval;
        IF retention IS NOT NULL THEN
            WITH old AS MATERIALIZED (
                SELECT r.id FROM baton.runs r
                 WHERE r.finished_at < at - retention
                 ORDER BY r.finished_at
                 LIMIT coalesce(current_setting('baton.prune_batch', true)::integer, 1000)
                   FOR UPDATE SKIP LOCKED),
            a AS (DELETE FROM baton.attempts x USING old WHERE x.run_id = old.id),
            c AS (DELETE FROM baton.checkpoints x USING old WHERE x.run_id = old.id)
            DELETE FROM baton.runs r USING old WHERE r.id = old.id;  -- steps cascade
            GET DIAGNOSTICS pruned = ROW_COUNT;
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

    RETURN jsonb_build_object('at', at, 'reclaimed', reclaimed, 'woken', woken, 'pruned', pruned)
        || CASE WHEN horizon IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('horizon', horizon) END;
END $$;
