-- Timers: what the background worker fires when its time comes. It sleeps
-- until the soonest of them (_next_due), and a backend that adds a sooner one
-- wakes it at commit (_wake_scheduler, src/latch.rs), so that a sleep, a
-- timeout, a deadline or a schedule tick fires within milliseconds of its
-- time, not a whole baton.interval late. Each fires in a subtransaction of
-- the worker's short round, under its run's lock, with the transition it
-- causes; a run busy with another transition is skipped (never waited for)
-- and fired a moment later.

-- A waiting step's time came: a sleep ends, a wait for an event times out, a
-- suspended step is ready again. The caller holds the run lock and the row.
CREATE FUNCTION _fire(s baton.steps) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    def jsonb;
BEGIN
    CASE s.kind
        WHEN 'sleep' THEN
            PERFORM baton._succeed_step(s.run_id, s.step_no, NULL);
        WHEN 'event' THEN
            def := baton._step_definition(s);
            IF def ->> 'on_timeout' = 'continue' THEN
                PERFORM baton._succeed_step(s.run_id, s.step_no, NULL);
            ELSE
                PERFORM baton._end_attempt(s, 'timed_out',
                    format('no event "%s" arrived within %s', s.wait_for, def ->> 'timeout'), true, true, true);
            END IF;
        WHEN 'task' THEN
            PERFORM baton._wake_suspended(s, s.wait_for, NULL, true);
        ELSE
            -- a child run or map items end these, not time
            UPDATE baton.steps t SET run_at = 'infinity' WHERE t.run_id = s.run_id AND t.step_no = s.step_no;
    END CASE;
END $$;

-- The soonest time something is due: a scheduled or waiting step, a
-- deadline, a schedule's tick, a signal (now). NULL: nothing at all.
CREATE FUNCTION _next_due() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN least((SELECT min(s.run_at) FROM baton.steps s WHERE s.status = 'scheduled'),
                 (SELECT min(s.run_at) FROM baton.steps s WHERE s.status = 'waiting'),
                 (SELECT min(r.deadline) FROM baton.runs r WHERE r.deadline IS NOT NULL AND r.finished_at IS NULL),
                 (SELECT min(c.next_run_at) FROM baton.schedule_entries c WHERE NOT c.paused),
                 (SELECT min(g.created_at) FROM baton.run_signals g),
                 baton._rate_next_wake());
END $$;

-- Fire what is due, a bounded batch of each kind. Returns what it did and
-- `next_due_ms`: how long until the next timer (NULL: none), for the
-- background worker's sleep.
CREATE FUNCTION _fire_timers() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    -- the transaction's start, which the timers fired here record as their
    -- time: a timer is never recorded as fired before it was due
    at timestamptz := now();
    batch integer := coalesce(current_setting('baton.reclaim_batch', true)::integer, 500);
    w record;
    st baton.steps;
    fired integer := 0;
    woken integer := 0;
    expired integer := 0;
    signals integer := 0;
    ticks integer := 0;
    skipped integer := 0;
    next timestamptz;
BEGIN
    -- 1. Scheduled tasks that came due (a delayed start, a retry's backoff,
    --    a delayed release) become ready, soonest first; idle workers of
    --    their queues are told. A step another transaction holds is skipped,
    --    not waited for.
    BEGIN
        WITH due AS MATERIALIZED (
            SELECT d.ctid FROM baton.steps d
             WHERE d.status = 'scheduled' AND d.run_at <= at AND d.kind = 'task'
             ORDER BY d.run_at
             LIMIT batch
               FOR UPDATE SKIP LOCKED
        ), ready AS (
            UPDATE baton.steps s SET status = 'ready'
             WHERE s.ctid = ANY (ARRAY(SELECT d.ctid FROM due d))
            RETURNING s.queue)
        -- (a queue name too long for a NOTIFY payload, stored before names
        -- were limited, would fail the whole statement: its workers poll)
        SELECT count(*) INTO woken FROM (
            SELECT pg_notify('baton_ready', r.queue)
              FROM (SELECT DISTINCT queue FROM ready) r WHERE octet_length(r.queue) < 8000) n;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: making scheduled steps ready failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    -- 2. Waiting steps whose time came, and steps that no worker runs whose
    --    retry came due (they start again).
    FOR w IN SELECT * FROM ((SELECT t.run_id, t.step_no FROM baton.steps t
                              WHERE t.status = 'waiting' AND t.run_at <= at ORDER BY t.run_at LIMIT batch)
                            UNION ALL
                            (SELECT t.run_id, t.step_no FROM baton.steps t
                              WHERE t.status = 'scheduled' AND t.run_at <= at AND t.kind <> 'task'
                              ORDER BY t.run_at LIMIT batch)) due
    LOOP
        BEGIN
            IF NOT baton._try_lock_run(w.run_id) THEN
                skipped := skipped + 1;
                CONTINUE;
            END IF;
            SELECT * INTO st FROM baton.steps t WHERE t.run_id = w.run_id AND t.step_no = w.step_no FOR UPDATE NOWAIT;
            CONTINUE WHEN st.run_at > at OR st.status NOT IN ('waiting', 'scheduled');
            IF st.status = 'waiting' THEN
                PERFORM baton._fire(st);
            ELSE
                UPDATE baton.steps t SET status = 'waiting' WHERE t.run_id = st.run_id AND t.step_no = st.step_no;
                PERFORM baton._activate(st.run_id, st.step_no);
            END IF;
            fired := fired + 1;
        EXCEPTION
            WHEN lock_not_available THEN
                skipped := skipped + 1;
            WHEN OTHERS THEN
                RAISE WARNING 'pg_baton: firing step % of run % failed: % (SQLSTATE %); trying again in a minute',
                    w.step_no, w.run_id, SQLERRM, SQLSTATE;
                UPDATE baton.steps t SET run_at = at + interval '1 minute'
                 WHERE t.run_id = w.run_id AND t.step_no = w.step_no;
        END;
    END LOOP;

    -- 3. Runs past their deadline fail: unfinished steps cancelled, leases
    --    revoked, child runs cancelled.
    FOR w IN SELECT r.id, r.deadline FROM baton.runs r
              WHERE r.deadline <= at AND r.finished_at IS NULL ORDER BY r.deadline LIMIT batch
    LOOP
        BEGIN
            IF NOT baton._try_lock_run(w.id) THEN
                skipped := skipped + 1;
                CONTINUE;
            END IF;
            CONTINUE WHEN NOT EXISTS (SELECT FROM baton.runs r WHERE r.id = w.id AND r.finished_at IS NULL);
            -- the time in UTC: the same text whichever session fails the run
            -- (the background worker, or any caller, in its own TimeZone)
            PERFORM baton._finish_run(w.id, 'failed',
                format('deadline %s passed', to_char(w.deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')), true);
            expired := expired + 1;
        EXCEPTION
            WHEN lock_not_available THEN
                skipped := skipped + 1;
            WHEN OTHERS THEN
                RAISE WARNING 'pg_baton: failing run % at its deadline failed: % (SQLSTATE %)', w.id, SQLERRM, SQLSTATE;
        END;
    END LOOP;

    -- 4. Work that runs left for each other (sql/child.sql), and 5. schedule
    --    ticks (sql/schedule.sql).
    BEGIN
        signals := baton._do_signals(batch);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: doing run signals failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;
    BEGIN
        ticks := baton._fire_schedules(at, batch);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: firing schedules failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    -- 6. Rate-limited queues whose claims are free again (src/rate.rs):
    --    their workers are told.
    BEGIN
        SELECT woken + count(*) INTO woken FROM (SELECT pg_notify('baton_ready', q) FROM baton._rate_due(clock_timestamp()) q) n;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_baton: waking rate-limited queues failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;

    next := baton._next_due();
    RETURN jsonb_build_object('woken', woken, 'fired', fired, 'expired', expired, 'signals', signals,
                              'ticks', ticks, 'skipped', skipped,
                              'next_due_ms', CASE WHEN next < 'infinity' THEN
                                                 extract(epoch FROM next - clock_timestamp()) * 1000 END);
END $$;
