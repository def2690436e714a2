-- Read-only views for people and dashboards. States are shown as text.

CREATE VIEW workflow_runs AS
SELECT r.id, r.workflow, r.version, r.status::text AS status, r.queue, r.priority, r.input, r.output, r.error,
       r.idempotency_key, r.created_at, r.started_at, r.finished_at
  FROM baton.runs r;

CREATE VIEW workflow_steps AS
SELECT s.run_id AS workflow_id, s.name AS step, s.status::text AS status, s.attempt, s.max_attempts, s.queue, s.run_at,
       s.worker, s.lease_expires_at, s.output, s.error, s.started_at, s.finished_at,
       s.step_id,
       ARRAY(SELECT u.name FROM baton.steps u
              WHERE u.run_id = s.run_id AND u.step_no = ANY (s.upstream) ORDER BY u.step_no) AS after,
       s.priority
  FROM baton.steps s;

-- Every attempt: those that did not succeed from the attempts table, and each
-- succeeded step's last attempt from the step itself (see schema.sql).
CREATE VIEW step_attempts AS
SELECT a.run_id AS workflow_id, a.step, a.step_id, a.attempt, a.worker, a.started_at, a.finished_at,
       a.outcome::text AS outcome, a.error
  FROM baton.attempts a
UNION ALL
SELECT s.run_id, s.name, s.step_id, s.attempt, s.worker, s.started_at, s.finished_at,
       'succeeded', NULL
  FROM baton.steps s
 WHERE s.status = 'succeeded';
