-- Read-only views for people and dashboards. States are shown as text.
--
-- A client sees only the runs it enqueued (sql/role.sql), an admin or a
-- superuser every run: the views of runs filter by the calling role, and are
-- security barriers, so that no function in a caller's WHERE clause sees the
-- rows before the filter does. _sees_all() and _invoker() are evaluated once
-- per query (each is an uncorrelated subquery).

CREATE VIEW workflow_runs WITH (security_barrier) AS
SELECT r.id, r.workflow, r.version, r.status::text AS status, r.queue, r.priority, r.input, r.output, r.error,
       r.idempotency_key, r.created_at, r.started_at, r.finished_at,
       r.parent_id,
       (SELECT p.name FROM baton.steps p WHERE p.run_id = r.parent_id AND p.step_no = r.parent_step_no) AS parent_step,
       r.deadline,
       r.forked_from,
       r.enqueued_by::regrole AS enqueued_by
  FROM baton.runs r
 WHERE (SELECT baton._sees_all()) OR r.enqueued_by = (SELECT baton._invoker());

CREATE VIEW workflow_steps WITH (security_barrier) AS
SELECT s.run_id AS workflow_id, s.name AS step, s.status::text AS status, s.attempt, s.max_attempts, s.queue, s.run_at,
       s.worker, s.lease_expires_at, s.output, s.error, s.started_at, s.finished_at,
       s.step_id,
       ARRAY(SELECT u.name FROM baton.steps u
              WHERE u.run_id = s.run_id AND u.step_no = ANY (s.upstream) ORDER BY u.step_no) AS after,
       s.priority,
       s.kind::text AS kind, s.map_index, s.wait_for,
       CASE WHEN s.status = 'waiting' AND s.run_at < 'infinity' THEN s.run_at END AS wake_at
  FROM baton.steps s
 WHERE (SELECT baton._sees_all())
    OR EXISTS (SELECT FROM baton.runs r WHERE r.id = s.run_id AND r.enqueued_by = (SELECT baton._invoker()));

-- Every attempt: those that did not succeed from the attempts table, and each
-- succeeded step's last attempt from the step itself (see schema.sql). A
-- step a fork copied (attempt 0) made no attempt in its run. The successes
-- of steps run again (retry_from) are in the attempts table.
CREATE VIEW step_attempts WITH (security_barrier) AS
SELECT a.run_id AS workflow_id, a.step, a.step_id, a.attempt, a.worker, a.started_at, a.finished_at,
       a.outcome::text AS outcome, a.error
  FROM baton.attempts a
 WHERE (SELECT baton._sees_all())
    OR EXISTS (SELECT FROM baton.runs r WHERE r.id = a.run_id AND r.enqueued_by = (SELECT baton._invoker()))
UNION ALL
SELECT s.run_id, s.name, s.step_id, s.attempt, s.worker, s.started_at, s.finished_at,
       'succeeded', NULL
  FROM baton.steps s
 WHERE s.status = 'succeeded' AND s.attempt > 0
   AND ((SELECT baton._sees_all())
        OR EXISTS (SELECT FROM baton.runs r WHERE r.id = s.run_id AND r.enqueued_by = (SELECT baton._invoker())));

-- Schedules (sql/schedule.sql): as schedule() took them, with their next
-- tick and the last run they made.
CREATE VIEW schedules AS
SELECT c.name, c.cron, c.timezone, c.workflow, c.input, c.overlap, c.paused, c.next_run_at, c.last_run_at, c.last_run_id
  FROM baton.schedule_entries c;

-- Every version of every workflow, with how many of its runs are not
-- finished: a run finishes on the version it started with (sql/operation.sql).
CREATE VIEW workflow_definitions AS
SELECT w.name, w.version, w.definition, w.created_at,
       (SELECT count(*) FROM baton.runs r
         WHERE r.workflow = w.name AND r.version = w.version AND r.finished_at IS NULL) AS unfinished_runs,
       w.version = max(w.version) OVER (PARTITION BY w.name) AS latest
  FROM baton.workflows w;

-- What operations did to runs (sql/operation.sql), oldest first per run.
CREATE VIEW workflow_log WITH (security_barrier) AS
SELECT l.run_id AS workflow_id, l.seq, l.at, l.action, l.step, l.detail, l.actor
  FROM baton.run_log l
 WHERE (SELECT baton._sees_all())
    OR EXISTS (SELECT FROM baton.runs r WHERE r.id = l.run_id AND r.enqueued_by = (SELECT baton._invoker()));

-- Per queue: its backlog, recent outcomes and settings (sql/stats.sql).
CREATE VIEW queue_stats AS
SELECT * FROM baton._queue_stats();

-- Registered workers (sql/worker.sql), one row per name, from its newest
-- session: alive while one of its sessions runs; last_seen is now for a live
-- one, else when its last session was found gone.
CREATE VIEW workers AS
SELECT n.worker AS name, n.queues, n.registered_at,
       CASE WHEN s.alive THEN now() ELSE coalesce(s.gone_at, n.registered_at) END AS last_seen,
       (SELECT count(*) FROM baton.steps e WHERE e.status = 'running' AND e.worker = n.worker) AS steps_held,
       s.alive
  FROM (SELECT DISTINCT ON (w.worker) w.worker, w.queues, w.registered_at
          FROM baton.worker_sessions w ORDER BY w.worker, w.registered_at DESC) n
 CROSS JOIN LATERAL (
       SELECT coalesce(bool_or(w.gone_at IS NULL AND baton._session_alive(w.pid, w.backend_start)), false) AS alive,
              max(w.gone_at) AS gone_at
         FROM baton.worker_sessions w WHERE w.worker = n.worker) s;

-- Which roles hold which kind (sql/role.sql), for admins.
CREATE VIEW grants AS
SELECT g.role::regrole AS role, g.kind, g.granted_at
  FROM baton.role_grants g;
