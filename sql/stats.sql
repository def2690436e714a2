-- Live statistics per queue (the queue_stats view). Cheap however long the
-- history: the backlog is counted from the partial indexes of ready,
-- scheduled, waiting and running steps (their size is the live work, never
-- the history), and the recent outcomes by a range of steps_finished per
-- queue (the last minute's or hour's entries only).
--
-- The queues shown: every configured queue, every queue with live work, and
-- every queue with a step that finished in the last hour.
CREATE FUNCTION _queue_stats() RETURNS TABLE(
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
