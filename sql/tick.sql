-- The background worker's round (src/worker.rs calls it once per baton.interval).
-- Each task runs in its own subtransaction: one failing task is logged as a
-- WARNING and does not stop the others. Returns what it did, as JSON.

CREATE FUNCTION _tick(since timestamptz DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := clock_timestamp();
    reclaimed integer := 0;
    woken integer := 0;
    batch integer := coalesce(current_setting('baton.reclaim_batch', true)::integer, 500);
BEGIN
    -- 1. Expired leases back to ready (or failed, when attempts are used up).
    BEGIN
        reclaimed := baton._reclaim_expired(NULL, batch);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: reclaiming expired leases failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    -- 2. Delayed steps (run_at, retry backoff) that came due since the last
    --    round: tell idle workers of their queues.
    BEGIN
        SELECT count(*) INTO woken FROM (
            SELECT pg_notify('baton_ready', d.queue)
              FROM (SELECT DISTINCT s.queue FROM baton.steps s
                     WHERE s.status = 'ready'
                       AND s.run_at > coalesce(since, at - interval '1 minute')
                       AND s.run_at <= at) d) n;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: waking delayed steps failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    RETURN jsonb_build_object('at', at, 'reclaimed', reclaimed, 'woken', woken);
END $$;
