-- configure_queue: pausing and concurrency limits; and claim order within and
-- across queues (priority first, then oldest).

-- Argument checks: 22023.
SELECT sqlstate_of($$SELECT baton.configure_queue('qu_a', -1)$$) AS negative_concurrency;
SELECT sqlstate_of($$SELECT baton.configure_queue('', 1)$$) AS empty_name;
SELECT sqlstate_of($$SELECT baton.configure_queue(NULL, 1)$$) AS null_name;
SELECT count(*) AS stored FROM baton.queues;

SELECT baton.define_workflow('qu_one', '{"queue": "qu_a", "steps": [{"name": "s"}]}');

-- A paused queue hands out nothing; unpausing opens it again.
SELECT count(baton.enqueue_workflow('qu_one', queue => 'qu_paused')) FROM generate_series(1, 2);
SELECT baton.configure_queue('qu_paused', paused => true);
SELECT name, concurrency, paused FROM baton.queues ORDER BY name;
SELECT count(*) AS while_paused FROM baton.claim_steps('w1', ARRAY['qu_paused'], 10);
-- Other queues in the same claim are not affected.
SELECT baton.enqueue_workflow('qu_one', queue => 'qu_open') IS NOT NULL AS enqueued;
SELECT step, input FROM baton.claim_steps('w1', ARRAY['qu_paused', 'qu_open'], 10);
SELECT baton.configure_queue('qu_paused', paused => false);
SELECT count(*) AS after_unpause FROM baton.claim_steps('w1', ARRAY['qu_paused'], 10);

-- Concurrency 1: one leased step at a time, whatever max_steps asks for.
SELECT count(baton.enqueue_workflow('qu_one', queue => 'qu_one_at_a_time')) FROM generate_series(1, 3);
SELECT baton.configure_queue('qu_one_at_a_time', 1);
CREATE TEMP TABLE claimed AS SELECT * FROM baton.claim_steps('w1', ARRAY['qu_one_at_a_time'], 10);
SELECT count(*) AS first_claim FROM claimed;
SELECT count(*) AS while_one_runs FROM baton.claim_steps('w2', ARRAY['qu_one_at_a_time'], 10);
-- Finishing it frees the slot.
SELECT baton.complete_step(step_id, lease_token) FROM claimed;
TRUNCATE claimed;
INSERT INTO claimed SELECT * FROM baton.claim_steps('w2', ARRAY['qu_one_at_a_time'], 10);
SELECT count(*) AS after_complete FROM claimed;
-- So does failing it (the retry waits for its backoff; the third run is next).
SELECT baton.fail_step(step_id, lease_token, 'x') FROM claimed;
SELECT count(*) AS after_fail FROM baton.claim_steps('w2', ARRAY['qu_one_at_a_time'], 10);
SELECT count(*) AS full_again FROM baton.claim_steps('w2', ARRAY['qu_one_at_a_time'], 10);
-- Raising the limit lets more through; NULL means unlimited.
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE queue = 'qu_one_at_a_time' AND status = 'scheduled';
SELECT make_due();
SELECT count(baton.enqueue_workflow('qu_one', queue => 'qu_one_at_a_time')) FROM generate_series(1, 2);
-- 3 ready, 1 running: a limit of 2 leaves one slot.
SELECT baton.configure_queue('qu_one_at_a_time', 2);
SELECT count(*) AS with_limit_2 FROM baton.claim_steps('w2', ARRAY['qu_one_at_a_time'], 10);
SELECT baton.configure_queue('qu_one_at_a_time', NULL);
SELECT count(*) AS unlimited FROM baton.claim_steps('w2', ARRAY['qu_one_at_a_time'], 10);

-- Concurrency 0 stops a queue like pausing does.
SELECT baton.enqueue_workflow('qu_one', queue => 'qu_zero') IS NOT NULL AS enqueued;
SELECT baton.configure_queue('qu_zero', 0);
SELECT count(*) AS with_limit_0 FROM baton.claim_steps('w1', ARRAY['qu_zero'], 10);
SELECT name, concurrency, paused FROM baton.queues ORDER BY name;

-- Claim order: higher priority first, then the oldest.
SELECT baton.enqueue_workflow('qu_one', '{"tag": "p0-first"}', queue => 'qu_order') IS NOT NULL AS enqueued;
SELECT baton.enqueue_workflow('qu_one', '{"tag": "p5-first"}', queue => 'qu_order', priority => 5) IS NOT NULL AS enqueued;
SELECT baton.enqueue_workflow('qu_one', '{"tag": "p0-second"}', queue => 'qu_order') IS NOT NULL AS enqueued;
SELECT baton.enqueue_workflow('qu_one', '{"tag": "p5-second"}', queue => 'qu_order', priority => 5) IS NOT NULL AS enqueued;
SELECT baton.enqueue_workflow('qu_one', '{"tag": "p9"}', queue => 'qu_order', priority => 9) IS NOT NULL AS enqueued;
SELECT baton.enqueue_workflow('qu_one', '{"tag": "p-1"}', queue => 'qu_order', priority => -1) IS NOT NULL AS enqueued;
-- An older run_at counts as older.
SELECT baton.enqueue_workflow('qu_one', '{"tag": "p0-backdated"}', queue => 'qu_order',
                              run_at => now() - interval '1 hour') IS NOT NULL AS enqueued;
-- One at a time ...
SELECT input ->> 'tag' AS first FROM baton.claim_steps('w1', ARRAY['qu_order']);
SELECT input ->> 'tag' AS second FROM baton.claim_steps('w1', ARRAY['qu_order']);
-- ... or in a batch, which comes back in the same order.
SELECT input ->> 'tag' AS rest FROM baton.claim_steps('w1', ARRAY['qu_order'], 10);

-- Across queues, priority wins over the order the queues are named in.
SELECT baton.enqueue_workflow('qu_one', '{"tag": "x-low"}', queue => 'qu_x') IS NOT NULL AS enqueued;
SELECT baton.enqueue_workflow('qu_one', '{"tag": "y-high"}', queue => 'qu_y', priority => 3) IS NOT NULL AS enqueued;
SELECT baton.enqueue_workflow('qu_one', '{"tag": "x-high"}', queue => 'qu_x', priority => 3) IS NOT NULL AS enqueued;
SELECT input ->> 'tag' AS tag FROM baton.claim_steps('w1', ARRAY['qu_x', 'qu_y'], 2);
SELECT input ->> 'tag' AS tag FROM baton.claim_steps('w1', ARRAY['qu_x', 'qu_y'], 2);

-- A delayed step is not claimable before its time, then it is.
SELECT baton.enqueue_workflow('qu_one', queue => 'qu_later', run_at => now() + interval '1 hour') AS later \gset
SELECT count(*) AS too_early FROM baton.claim_steps('w1', ARRAY['qu_later']);
UPDATE baton.steps SET run_at = now() - interval '1 second' WHERE run_id = :'later';
SELECT make_due();
SELECT count(*) AS due FROM baton.claim_steps('w1', ARRAY['qu_later']);
SELECT status FROM baton.runs WHERE id = :'later';

SELECT cancel_unfinished_runs();
