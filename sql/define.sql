-- define_workflow: store a new version of a workflow definition.

-- Parse an interval text from a definition; a bad one is a 22023 naming the field.
CREATE FUNCTION _definition_interval(txt text, whose text, field text) RETURNS interval
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    result interval;
BEGIN
    IF txt IS NULL THEN
        RETURN NULL;
    END IF;
    BEGIN
        result := txt::interval;
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION '%: field "%" is not a valid interval: "%"', whose, field, txt
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF NOT baton._interval_ok(result) THEN
        RAISE EXCEPTION '%: field "%" must be a positive interval of at most 10 years with no negative part, got "%"',
            whose, field, txt USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN result;
END $$;

CREATE FUNCTION define_workflow(name text, definition jsonb) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    normalized jsonb;
    step jsonb;
    whose text;
    initial interval;
    max interval;
    new_version integer;
    cycle text;
BEGIN
    PERFORM baton._require(name, 'name');
    PERFORM baton._require(definition, 'definition');
    normalized := baton._normalize_definition(name, definition::text);

    -- Interval texts are PostgreSQL's to parse.
    FOR step IN SELECT jsonb_array_elements(normalized -> 'steps') LOOP
        whose := format('step "%s"', step ->> 'name');
        PERFORM baton._definition_interval(step ->> 'timeout', whose, 'timeout');
        initial := baton._definition_interval(step #>> '{backoff,initial}', whose, 'backoff.initial');
        max := baton._definition_interval(step #>> '{backoff,max}', whose, 'backoff.max');
        IF initial > max THEN
            RAISE EXCEPTION '%: field "backoff.initial" (%) is larger than "backoff.max" (%)',
                whose, initial, max USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- the fields of the step kinds (sql/kinds.sql)
        PERFORM baton._definition_interval(step ->> 'sleep', whose, 'sleep');
        IF step ? 'sleep_until' THEN
            BEGIN
                PERFORM (step ->> 'sleep_until')::jsonpath;
            EXCEPTION WHEN OTHERS THEN
                RAISE EXCEPTION '%: field "sleep_until" is not a valid JSON path: "%" (for example "$.input.send_at")',
                    whose, step ->> 'sleep_until' USING ERRCODE = 'invalid_parameter_value';
            END;
        END IF;
        IF step ->> 'workflow' IS NOT NULL AND step ->> 'workflow' <> name  -- itself: the cycle below
           AND NOT EXISTS (SELECT FROM baton.workflows w WHERE w.name = step ->> 'workflow') THEN
            RAISE EXCEPTION '%: field "workflow" names unknown workflow "%"', whose, step ->> 'workflow'
                USING ERRCODE = 'invalid_parameter_value', HINT = 'Define the child workflow first.';
        END IF;
    END LOOP;

    -- Child workflows must not lead back to this one: every run of a
    -- workflow starts every child step (there are no conditions), so a cycle
    -- would start runs without end. Followed through the latest versions,
    -- which new child runs use; each definition is checked, so they stay
    -- acyclic.
    WITH RECURSIVE reach(child, path) AS (
        SELECT DISTINCT s ->> 'workflow', ARRAY[name]
          FROM jsonb_array_elements(normalized -> 'steps') s WHERE s ? 'workflow'
        UNION ALL
        SELECT c ->> 'workflow', r.path || r.child
          FROM reach r
         CROSS JOIN LATERAL (SELECT w.definition FROM baton.workflows w WHERE w.name = r.child
                              ORDER BY w.version DESC LIMIT 1) d
         CROSS JOIN jsonb_array_elements(d.definition -> 'steps') c
         WHERE c ? 'workflow' AND r.child <> name AND NOT r.child = ANY (r.path))
    SELECT array_to_string(r.path || r.child, ' -> ') INTO cycle FROM reach r WHERE r.child = name LIMIT 1;
    IF cycle IS NOT NULL THEN
        RAISE EXCEPTION 'definition: field "workflow" makes a cycle of child workflows: % (each run would start another, without end)',
            cycle USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM baton._definition_interval(normalized ->> 'timeout', 'definition', 'timeout');

    -- Versions are numbered per workflow; the lock makes concurrent definitions
    -- of one workflow take turns instead of failing on the primary key.
    PERFORM pg_advisory_xact_lock(1651797603, hashtext(name));
    SELECT coalesce(max(w.version), 0) + 1 INTO new_version
      FROM baton.workflows w WHERE w.name = define_workflow.name;
    INSERT INTO baton.workflows (name, version, definition)
    VALUES (define_workflow.name, new_version, normalized);
    RETURN new_version;
END $$;
