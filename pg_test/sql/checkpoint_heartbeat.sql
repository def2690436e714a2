-- checkpoint: saves {key: value} for the step; later attempts get them in
-- claim_steps.checkpoints; the same key overwrites.
-- heartbeat: extends the lease, never past the step's timeout.

SELECT baton.define_workflow('ch_flow', $${"queue": "ch_q", "steps": [
    {"name": "long", "backoff": {"initial": "1 hour"}}, {"name": "capped", "timeout": "1 minute"}]}$$);
SELECT baton.enqueue_workflow('ch_flow') AS run \gset
CREATE TEMP TABLE claimed AS SELECT * FROM baton.claim_steps('w1', ARRAY['ch_q'], 10, lease => '10 seconds');
SELECT step, attempt, checkpoints FROM claimed ORDER BY step_id;
SELECT step_id AS s, lease_token AS t, lease_expires_at AS first_expiry FROM claimed WHERE step = 'long' \gset

-- Checkpoints: argument checks, then saving and overwriting.
SELECT sqlstate_of(format('SELECT baton.checkpoint(%s, %L, %L, %L)', :s, :'t', '', '1')) AS empty_key;
SELECT sqlstate_of(format('SELECT baton.checkpoint(%s, %L, NULL, %L)', :s, :'t', '1')) AS null_key;
SELECT sqlstate_of(format('SELECT baton.checkpoint(%s, gen_random_uuid(), %L, %L)', :s, 'k', '1')) AS wrong_token;
SELECT sqlstate_of($$SELECT baton.checkpoint(999999999, gen_random_uuid(), 'k', '1')$$) AS unknown_step;
SELECT baton.checkpoint(:s, :'t', 'cursor', '10');
SELECT baton.checkpoint(:s, :'t', 'seen', '["a"]');
SELECT baton.checkpoint(:s, :'t', 'cursor', '20');
SELECT key, value, attempt FROM baton.checkpoints WHERE step_id = :s ORDER BY key;

-- heartbeat extends the lease (here by an hour) and returns the new expiry.
SELECT baton.heartbeat(:s, :'t', '1 hour') AS second_expiry \gset
SELECT :'second_expiry'::timestamptz > :'first_expiry'::timestamptz AS later,
       :'second_expiry'::timestamptz > now() + interval '59 minutes' AS about_an_hour,
       (SELECT lease_expires_at FROM baton.steps WHERE step_id = :s) = :'second_expiry'::timestamptz AS stored;
-- Argument checks: bad lease 22023, wrong token / unknown step BT001.
SELECT sqlstate_of(format('SELECT baton.heartbeat(%s, %L, %L)', :s, :'t', '0')) AS zero_lease;
SELECT sqlstate_of(format('SELECT baton.heartbeat(%s, %L, %L)', :s, :'t', '-1 minute')) AS negative_lease;
SELECT sqlstate_of(format('SELECT baton.heartbeat(%s, %L, NULL)', :s, :'t')) AS null_lease;
SELECT sqlstate_of(format('SELECT baton.heartbeat(%s, gen_random_uuid())', :s)) AS wrong_token;
SELECT sqlstate_of(format('SELECT baton.heartbeat(%s, NULL)', :s)) AS null_token;
SELECT sqlstate_of($$SELECT baton.heartbeat(999999999, gen_random_uuid())$$) AS unknown_step;

-- The attempt fails; the next attempt starts with the saved checkpoints.
SELECT baton.fail_step(:s, :'t', 'interrupted');
SELECT count(*) AS backing_off FROM baton.claim_steps('w2', ARRAY['ch_q']);
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE step_id = :s;
SELECT make_due();
SELECT step_id AS s, lease_token AS t2, attempt, checkpoints FROM baton.claim_steps('w2', ARRAY['ch_q']) \gset
SELECT :attempt AS attempt, :'checkpoints'::jsonb AS checkpoints;
-- The dead attempt cannot write checkpoints any more; the new one can, and
-- overwrites (the row records the attempt that wrote it).
SELECT sqlstate_of(format('SELECT baton.checkpoint(%s, %L, %L, %L)', :s, :'t', 'cursor', '99')) AS old_attempt;
SELECT baton.checkpoint(:s, :'t2', 'cursor', '30');
SELECT key, value, attempt FROM baton.checkpoints WHERE step_id = :s ORDER BY key;
SELECT baton.complete_step(:s, :'t2', '"long done"');

-- Checkpoints belong to their step: the other step of the run has none.
SELECT step, checkpoints FROM claimed WHERE step = 'capped';
SELECT count(*) AS other_step_checkpoints FROM baton.checkpoints
 WHERE run_id = :'run' AND step_id <> :s;

-- The lease never runs past the step's timeout (1 minute), at claim or heartbeat.
SELECT step_id AS c, lease_token AS ct FROM claimed WHERE step = 'capped' \gset
SELECT baton.heartbeat(:c, :'ct', '1 hour') = started_at + interval '1 minute' AS heartbeat_capped
  FROM baton.steps WHERE step_id = :c;
-- (a lease runs from the clock, not from the transaction's start)
SELECT baton.heartbeat(:c, :'ct', '5 seconds') BETWEEN now() + interval '5 seconds' AND clock_timestamp() + interval '5 seconds'
       AS short_heartbeat_kept;
SELECT baton.complete_step(:c, :'ct');
SELECT baton.enqueue_workflow('ch_flow') AS run2 \gset
SELECT step, lease_expires_at BETWEEN now() + interval '1 minute' AND clock_timestamp() + interval '1 minute' AS claim_capped
  FROM baton.claim_steps('w3', ARRAY['ch_q'], 10, lease => '1 hour') WHERE step = 'capped';

SELECT cancel_unfinished_runs();
