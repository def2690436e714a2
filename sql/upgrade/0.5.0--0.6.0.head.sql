-- pg_baton 0.5.0 -> 0.6.0.
--
-- ALTER EXTENSION pg_baton UPDATE carries a database with runs in flight.

-- Registered workers (sql/worker.sql): the sessions the background worker
-- watches, so that a dead worker's leases go back at once.
CREATE TABLE worker_sessions (
    worker        text        NOT NULL,
    pid           integer     NOT NULL,
    backend_start timestamptz NOT NULL,
    server_start  timestamptz NOT NULL,  -- of the server it ran on (pg_postmaster_start_time)
    queues        text[],
    registered_at timestamptz NOT NULL,
    gone_at       timestamptz,
    PRIMARY KEY (worker, pid)
);
-- A lease can be reclaimed for its worker's lost session (a fourth parameter).
DROP FUNCTION _reclaim_one(uuid, integer, boolean);
