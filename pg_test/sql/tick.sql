-- baton._tick: the background worker's round. It reclaims expired leases in
-- every queue and reports what it did as {at, reclaimed, woken, ...}. (The
-- background worker serves another database, so only this test calls it here.)

-- Earlier tests left nothing running; a round with nothing to do.
SELECT count(*) AS running FROM baton.steps WHERE status = 'running';
SELECT t ?& ARRAY['at', 'reclaimed', 'woken'] AS has_keys, t -> 'reclaimed' AS reclaimed,
       jsonb_typeof(t -> 'woken') AS woken_type, (t ->> 'at')::timestamptz <= clock_timestamp() AS at_ok
  FROM baton._tick() t;

-- Two expired leases in different queues, one that is still valid, and one
-- expired step that has no attempts left.
SELECT baton.define_workflow('tk_flow', '{"queue": "tk_a", "steps": [{"name": "s"}]}');
SELECT baton.define_workflow('tk_once', '{"queue": "tk_a", "steps": [{"name": "s", "max_attempts": 1}]}');
SELECT baton.enqueue_workflow('tk_flow') AS r1 \gset
SELECT baton.enqueue_workflow('tk_flow', queue => 'tk_b') AS r2 \gset
SELECT baton.enqueue_workflow('tk_flow', queue => 'tk_c') AS r3 \gset
SELECT count(*) FROM baton.claim_steps('w1', ARRAY['tk_a', 'tk_b', 'tk_c'], 10);
SELECT baton.enqueue_workflow('tk_once') AS r4 \gset
SELECT count(*) FROM baton.claim_steps('w1', ARRAY['tk_a'], 10);
UPDATE baton.steps SET lease_expires_at = now() - interval '1 second'
 WHERE run_id IN (:'r1', :'r2', :'r4');

SELECT t ?& ARRAY['at', 'reclaimed', 'woken'] AS has_keys, t -> 'reclaimed' AS reclaimed
  FROM baton._tick() t;
-- The two retryable ones are ready again at once, attempt 1 recorded as lost;
-- the one without attempts left failed its run; the valid lease is untouched.
SELECT r.workflow, s.queue, s.status, s.attempt, s.worker, s.run_at <= now() AS due, r.status AS run_status
  FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE r.id IN (:'r1', :'r2', :'r3', :'r4') ORDER BY s.step_id;
SELECT a.step, a.attempt, a.outcome, a.error FROM baton.attempts a
 WHERE a.run_id IN (:'r1', :'r2', :'r3', :'r4') ORDER BY a.step_id;
SELECT error FROM baton.runs WHERE id = :'r4';

-- Nothing left to reclaim.
SELECT t -> 'reclaimed' AS reclaimed FROM baton._tick() t;

SELECT cancel_unfinished_runs();

-- A delayed step is scheduled; the round that finds it due makes it ready
-- and counts its queue as woken (its workers get the NOTIFY).
SELECT baton.define_workflow('tk_timer', '{"queue": "tk_timer_q", "steps": [{"name": "later"}]}') AS v \gset
SELECT baton.enqueue_workflow('tk_timer', run_at => now() + interval '1 hour') IS NOT NULL AS enqueued;
SELECT status, run_at > now() AS in_future FROM baton.steps WHERE queue = 'tk_timer_q';
SELECT (t -> 'woken')::int AS woken_too_early FROM baton._tick() t;
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE queue = 'tk_timer_q';
SELECT (t -> 'woken')::int >= 1 AS woke FROM baton._tick() t;
SELECT status FROM baton.steps WHERE queue = 'tk_timer_q';
SELECT cancel_unfinished_runs();
