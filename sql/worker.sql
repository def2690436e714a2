-- Workers the database can watch (register_worker), so that a dead worker's
-- leases go back at once instead of when they expire.
--
-- A worker registers on a session connection it keeps open (the Rust
-- worker's LISTEN connection; any language can do the same). Every lease
-- claimed under its name, on any connection, is then tied to that session:
-- when the name has no live session left (the process was killed, the
-- network cut, the connection terminated), the background worker ends those
-- leases as lost attempts in its next round (_tick), and the steps are ready
-- again at once. A worker that lost only a pooled connection keeps its
-- leases. Connections through a transaction pooler have no session of their
-- own: their leases fall back to their expiry.
--
-- Several sessions may carry one name (the Workers of one process share its
-- default name): the name lives while any of them does. Sessions that ended
-- because PostgreSQL itself restarted or failed over hand nothing back: their
-- workers are most likely alive and reconnecting, so those leases wait for
-- their expiry (or for the worker's heartbeat on its new connection).

-- The registered sessions: a backend's pid with its start (a pid is reused).
CREATE TABLE worker_sessions (
    worker        text        NOT NULL,
    pid           integer     NOT NULL,
    backend_start timestamptz NOT NULL,
    server_start  timestamptz NOT NULL,  -- of the server it ran on (pg_postmaster_start_time)
    queues        text[],
    registered_at timestamptz NOT NULL,
    gone_at       timestamptz,   -- set once the session's loss was handled
    PRIMARY KEY (worker, pid)
);

-- Whether a registered session's backend still runs.
CREATE FUNCTION _session_alive(pid integer, backend_start timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT FROM pg_stat_get_activity(_session_alive.pid) a
                    WHERE a.backend_start = _session_alive.backend_start);
END $$;

-- Register the calling session as one of `worker`'s. When the name had no
-- live session left (the worker came back after a crash), the leases of the
-- sessions that are gone are handed back first: the new process does not
-- hold them. The session's TCP keepalives and user timeout are shortened,
-- so that a cut network ends the backend (and so the leases) within about
-- ten seconds instead of the system's two hours (or, with unacknowledged
-- data, its quarter of an hour of retransmissions).
CREATE FUNCTION register_worker(worker text, queues text[] DEFAULT NULL) RETURNS void
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

-- Look at `worker`'s sessions. Those that are gone are forgotten while
-- another lives; when none lives, the leases held under the name are ended
-- as lost attempts (retried at once), each under its run's lock, tried,
-- never waited for: what cannot be reclaimed now is in the next round. Once
-- none is left, the newest gone session stays as the name's record (the
-- workers view) and the others are deleted. try: give up when another
-- transaction is changing the name's sessions (the background worker's
-- round). Returns how many leases it ended.
CREATE FUNCTION _worker_gone(worker text, try boolean DEFAULT true) RETURNS integer
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

-- One round of the background worker (_tick): every name whose sessions
-- include one that is gone, and the records of names gone for a week.
CREATE FUNCTION _workers_gone() RETURNS integer
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
