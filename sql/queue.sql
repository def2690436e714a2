-- Queue settings: concurrency limits, pausing, and flow control (sql/flow.sql).
-- Each call sets every setting of the queue: one left out is NULL (none), or
-- false for paused.

CREATE FUNCTION configure_queue(
    queue text,
    concurrency integer DEFAULT NULL,
    paused boolean DEFAULT false,
    rate_limit integer DEFAULT NULL,
    rate_period interval DEFAULT NULL,
    concurrency_key text DEFAULT NULL,
    per_key_concurrency integer DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    key_path jsonpath;
    old_path jsonpath;
BEGIN
    IF queue IS NULL OR btrim(queue) = '' THEN
        RAISE EXCEPTION 'queue must be a non-empty name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(queue, 'queue');
    IF concurrency < 0 THEN
        RAISE EXCEPTION 'concurrency must be NULL (unlimited) or at least 0, got %', concurrency
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (rate_limit IS NULL) <> (rate_period IS NULL) THEN
        RAISE EXCEPTION 'rate_limit and rate_period must be given together'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rate_limit < 1 THEN
        RAISE EXCEPTION 'rate_limit must be at least 1, got % (pause the queue to stop claims)', rate_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_interval(rate_period, 'rate_period');
    IF rate_period < interval '1 millisecond' THEN
        RAISE EXCEPTION 'rate_period must be at least 1 millisecond, got %', rate_period
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (concurrency_key IS NULL) <> (per_key_concurrency IS NULL) THEN
        RAISE EXCEPTION 'concurrency_key and per_key_concurrency must be given together'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF per_key_concurrency < 1 THEN
        RAISE EXCEPTION 'per_key_concurrency must be at least 1, got %', per_key_concurrency
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(concurrency_key, 'concurrency_key', 1000);
    BEGIN
        key_path := concurrency_key::jsonpath;
    EXCEPTION WHEN syntax_error OR invalid_text_representation THEN
        RAISE EXCEPTION 'concurrency_key must be a JSON path into the run''s input (such as ''$.customer_id''), got %',
            concurrency_key USING ERRCODE = 'invalid_parameter_value';
    END;
    SELECT c.concurrency_key INTO old_path FROM baton.queues c WHERE c.name = queue;
    INSERT INTO baton.queues AS q (name, concurrency, paused, updated_at, rate_limit, rate_period, concurrency_key,
                                   per_key_concurrency)
    VALUES (queue, concurrency, coalesce(paused, false), now(), rate_limit, rate_period, key_path, per_key_concurrency)
    ON CONFLICT (name) DO UPDATE
       SET concurrency = excluded.concurrency, paused = excluded.paused, updated_at = now(),
           rate_limit = excluded.rate_limit, rate_period = excluded.rate_period,
           concurrency_key = excluded.concurrency_key, per_key_concurrency = excluded.per_key_concurrency;
    -- A new key: the queue's waiting steps are keyed again (a pass over
    -- steps; running steps keep the key they were claimed under).
    IF key_path::text IS DISTINCT FROM old_path::text THEN
        PERFORM baton._rekey_queue(queue);
    END IF;
    -- Unpausing or raising a limit may make waiting steps claimable.
    PERFORM pg_notify('baton_ready', queue);
END $$;
