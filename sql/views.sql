-- Read-only views for people and dashboards.

CREATE VIEW workflow_runs AS
SELECT r.id, r.workflow, r.version, r.status, r.queue, r.priority, r.input, r.output, r.error,
       r.idempotency_key, r.created_at, r.started_at, r.finished_at
  FROM baton.runs r;

CREATE VIEW workflow_steps AS
SELECT s.run_id AS workflow_id, s.name AS step, s.status, s.attempt, s.max_attempts, s.queue, s.run_at,
       s.worker, s.lease_expires_at, s.output, s.error, s.started_at, s.finished_at,
       s.step_id,
       ARRAY(SELECT u.name FROM baton.steps u
              WHERE u.run_id = s.run_id AND u.step_no = ANY (s.upstream) ORDER BY u.step_no) AS after,
       s.priority
  FROM baton.steps s;

CREATE VIEW step_attempts AS
SELECT a.run_id AS workflow_id, a.step, a.step_id, a.attempt, a.worker, a.started_at, a.finished_at,
       a.outcome, a.error
  FROM baton.attempts a;
