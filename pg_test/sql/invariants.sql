-- Invariants over everything the tests before this one left behind: every
-- transition above kept them, including the races in concurrency.sql.
SELECT count(*) > 100 AS enough_steps_to_check FROM baton.steps;

-- The fencing invariant (schema.sql): a lease token exists exactly while a
-- step runs. The protocol's lookups by step id and token rely on it.
SELECT count(*) AS token_not_running FROM baton.steps
 WHERE (status = 'running') <> (lease_token IS NOT NULL);

-- A run succeeded exactly when all its steps did: not before, and none was
-- left unfinished with every step done (two last steps finishing at once).
SELECT count(*) FILTER (WHERE r.status = 'succeeded' AND steps_left(r.id) > 0) AS succeeded_early,
       count(*) FILTER (WHERE r.status IN ('pending', 'running') AND steps_left(r.id) = 0) AS never_finished
  FROM baton.runs r;

-- A blocked step waits on exactly its upstream steps that have not succeeded;
-- a ready or running one on none.
SELECT count(*) AS miscounted_waits FROM baton.steps s
 WHERE s.status IN ('blocked', 'ready', 'running')
   AND s.waiting_on <> (SELECT count(*) FROM baton.steps u
                         WHERE u.run_id = s.run_id AND u.step_no = ANY (s.upstream) AND u.status <> 'succeeded');

-- A finished run has no step left to do.
SELECT count(*) AS unfinished_steps_of_finished_runs
  FROM baton.steps s JOIN baton.runs r ON r.id = s.run_id
 WHERE r.status IN ('succeeded', 'failed', 'cancelled') AND s.status IN ('blocked', 'ready', 'running');
