-- Queue settings: concurrency limits and pausing.

CREATE FUNCTION configure_queue(queue text, concurrency integer DEFAULT NULL, paused boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    IF queue IS NULL OR btrim(queue) = '' THEN
        RAISE EXCEPTION 'queue must be a non-empty name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._check_length(queue, 'queue');
    IF concurrency < 0 THEN
        RAISE EXCEPTION 'concurrency must be NULL (unlimited) or at least 0, got %', concurrency
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO baton.queues AS q (name, concurrency, paused, updated_at)
    VALUES (queue, concurrency, coalesce(paused, false), now())
    ON CONFLICT (name) DO UPDATE
       SET concurrency = excluded.concurrency, paused = excluded.paused, updated_at = now();
    -- Unpausing or raising a limit may make waiting steps claimable.
    PERFORM pg_notify('baton_ready', queue);
END $$;
