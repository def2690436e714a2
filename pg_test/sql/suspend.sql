-- suspend_step: a worker gives its lease back without using up the attempt;
-- the step waits until `until`, or for `event` (at most `timeout`), then is
-- ready again for any worker, with its checkpoints; an event's arrival or
-- its timeout is in checkpoint "event:<name>".

SELECT baton.define_workflow('sp_flow', '{"queue": "sp_q", "steps": [{"name": "t", "max_attempts": 1}]}');
SELECT baton.enqueue_workflow('sp_flow') AS r \gset

-- until: waiting, the lease gone, the attempt given back.
SELECT step_id AS id, lease_token AS token, attempt FROM baton.claim_steps('w1', ARRAY['sp_q']) \gset
SELECT :attempt AS attempt;
SELECT baton.checkpoint(:id, :'token', 'done_pages', '3');
SELECT baton.suspend_step(:id, :'token', until => clock_timestamp() + interval '300 milliseconds');
SELECT status, attempt, worker, lease_expires_at, wait_for, wake_at > now() AS wakes_later
  FROM baton.workflow_steps WHERE workflow_id = :'r';
SELECT lease_token IS NULL AS no_token FROM baton.steps WHERE step_id = :id;
SELECT count(*) AS claimable FROM baton.claim_steps('w1', ARRAY['sp_q']);
-- The old lease is lost.
SELECT sqlstate_of(format('SELECT baton.complete_step(%s, %L)', :id, :'token')) AS complete,
       sqlstate_of(format('SELECT baton.heartbeat(%s, %L)', :id, :'token')) AS heartbeat,
       sqlstate_of(format('SELECT baton.suspend_step(%s, %L, until => now() + interval ''1 minute'')', :id, :'token')) AS suspend_again;
CALL wait_until(format('step_status(%L, ''t'') = ''ready''', :'r'));
SELECT status, wake_at, run_at <= now() AS due FROM baton.workflow_steps WHERE workflow_id = :'r';
-- Claimed again: the same attempt (max_attempts 1 is not used up), the checkpoints kept.
SELECT step_id AS id, lease_token AS token, attempt, checkpoints FROM baton.claim_steps('w1', ARRAY['sp_q']) \gset
SELECT :attempt AS attempt, :'checkpoints' AS checkpoints;

-- event: waits for it with no time limit; send_event wakes it (true).
SELECT baton.suspend_step(:id, :'token', event => 'approved');
SELECT status, attempt, wait_for, wake_at FROM baton.workflow_steps WHERE workflow_id = :'r';
SELECT baton.send_event(:'r', 'approved', '{"by": "ann"}') AS woke_a_step;
SELECT status, wait_for, run_at <= now() AS due FROM baton.workflow_steps WHERE workflow_id = :'r';
SELECT step_id AS id, lease_token AS token, attempt, checkpoints FROM baton.claim_steps('w1', ARRAY['sp_q']) \gset
SELECT :attempt AS attempt, :'checkpoints' AS checkpoints;

-- event with a timeout that passes: timed_out true, payload null.
SELECT baton.suspend_step(:id, :'token', event => 'late', timeout => '200 milliseconds');
SELECT status, wait_for, wake_at > now() AS wakes_later FROM baton.workflow_steps WHERE workflow_id = :'r';
CALL wait_until(format('step_status(%L, ''t'') = ''ready''', :'r'));
SELECT status, wait_for FROM baton.workflow_steps WHERE workflow_id = :'r';
SELECT step_id AS id, lease_token AS token, attempt, checkpoints -> 'event:late' AS late FROM baton.claim_steps('w1', ARRAY['sp_q']) \gset
SELECT :attempt AS attempt, :'late' AS late;
-- the event coming after the timeout is kept, not given to the running step
SELECT baton.send_event(:'r', 'late', '"too late"') AS woke_a_step;

-- An event sent before the step suspends is taken at once: ready at once.
SELECT baton.send_event(:'r', 'early', '[1, 2]') AS woke_a_step;
SELECT baton.suspend_step(:id, :'token', event => 'early', timeout => '1 hour');
SELECT status, wait_for, wake_at FROM baton.workflow_steps WHERE workflow_id = :'r';
SELECT step_id AS id, lease_token AS token, attempt, checkpoints -> 'event:early' AS early FROM baton.claim_steps('w1', ARRAY['sp_q']) \gset
SELECT :attempt AS attempt, :'early' AS early;
-- and the late one, kept, too
SELECT baton.suspend_step(:id, :'token', event => 'late');
SELECT step_id AS id, lease_token AS token, attempt, checkpoints FROM baton.claim_steps('w1', ARRAY['sp_q']) \gset
SELECT :attempt AS attempt, :'checkpoints' AS checkpoints;
SELECT name, payload, consumed_at IS NOT NULL AS consumed FROM baton.events WHERE run_id = :'r' ORDER BY seq;

-- The step still completes on its single attempt.
SELECT baton.complete_step(:id, :'token', '"done"');
SELECT status, attempt, output FROM baton.workflow_steps WHERE workflow_id = :'r';
SELECT attempt, outcome FROM baton.step_attempts WHERE workflow_id = :'r';

-- Argument errors (before the lease is looked at): 22023, 22004; a lease
-- not held: BT001.
SELECT baton.enqueue_workflow('sp_flow') AS r \gset
SELECT step_id AS id, lease_token AS token FROM baton.claim_steps('w1', ARRAY['sp_q']) \gset
SELECT sqlstate_of(format('SELECT baton.suspend_step(%s, %L)', :id, :'token')) AS neither;
SELECT sqlstate_of(format('SELECT baton.suspend_step(%s, %L, event => %L)', :id, :'token', ' ')) AS empty_event;
SELECT sqlstate_of(format('SELECT baton.suspend_step(%s, %L, event => %L)', :id, :'token', repeat('e', 201))) AS long_event;
SELECT sqlstate_of(format('SELECT baton.suspend_step(%s, %L, until => now(), timeout => ''1 minute'')', :id, :'token')) AS timeout_without_event;
SELECT sqlstate_of(format('SELECT baton.suspend_step(%s, %L, event => ''e'', timeout => ''-1 minute'')', :id, :'token')) AS negative_timeout;
SELECT sqlstate_of(format('SELECT baton.suspend_step(%s, %L, until => ''infinity'')', :id, :'token')) AS infinite_until;
SELECT sqlstate_of(format('SELECT baton.suspend_step(NULL, %L, until => now())', :'token')) AS null_step,
       sqlstate_of(format('SELECT baton.suspend_step(%s, NULL, until => now())', :id)) AS null_token;
SELECT sqlstate_of(format('SELECT baton.suspend_step(%s, %L, until => now())', :id, gen_random_uuid())) AS wrong_token,
       sqlstate_of(format('SELECT baton.suspend_step(%s, %L, until => now())', -1, :'token')) AS unknown_step;
-- nothing changed: still running under the lease
SELECT status, attempt, worker FROM baton.workflow_steps WHERE workflow_id = :'r';

-- A time already past: ready again within a round.
SELECT baton.suspend_step(:id, :'token', until => now() - interval '1 minute');
CALL wait_until(format('step_status(%L, ''t'') = ''ready''', :'r'));

-- Suspended in a run that is cancelled: cancelled, and an event then is kept.
SELECT step_id AS id, lease_token AS token FROM baton.claim_steps('w1', ARRAY['sp_q']) \gset
SELECT baton.suspend_step(:id, :'token', event => 'never');
SELECT baton.cancel_workflow(:'r');
SELECT status, wait_for FROM baton.workflow_steps WHERE workflow_id = :'r';
SELECT baton.send_event(:'r', 'never') AS woke_a_step;
SELECT status FROM baton.workflow_steps WHERE workflow_id = :'r';

SELECT cancel_unfinished_runs();
