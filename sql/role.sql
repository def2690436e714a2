-- Roles (docs/roles.md). Three kinds of role use pg_baton, and each is
-- granted what its part needs and nothing else:
--   client  defines workflows, enqueues runs, sends events, reads and
--           cancels the runs it enqueued;
--   worker  claims steps and reports on them (complete, fail, heartbeat,
--           checkpoint, suspend, release), publishes event values;
--   admin   everything a client may do, on every run, and the operations
--           (resume, retry_from, fork, delete, purge), queues and schedules.
-- The tables are never granted: every call goes through the protocol's
-- functions, which are SECURITY DEFINER with a pinned search_path
-- (sql/privileges.sql), and the views, which show a client only its own runs.

-- Who holds which kind. The grants themselves are in the catalog; this is
-- what they are re-made from when an upgrade adds a function to a kind.
CREATE TABLE role_grants (
    role       oid         NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('client', 'worker', 'admin')),
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role, kind)
);
-- pg_dump keeps it (the grants in the catalog are dumped anyway)
SELECT pg_catalog.pg_extension_config_dump('baton.role_grants', '');

-- What a kind may use: 'EXECUTE ON FUNCTION ...' and 'SELECT ON TABLE ...',
-- every overload of each function named. _invoker and _sees_all are what the
-- views call; _queue_stats and _session_alive are what the admin's views call.
CREATE FUNCTION _role_objects(kind text) RETURNS SETOF text
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_variable
DECLARE
    functions text[];
    views text[];
BEGIN
    CASE kind
    WHEN 'client' THEN
        functions := ARRAY['define_workflow', 'enqueue_workflow', 'enqueue_workflows', 'cancel_workflow',
                           'send_event', 'get_event', 'workflow_graph', '_invoker', '_sees_all'];
        views := ARRAY['workflow_runs', 'workflow_steps', 'step_attempts', 'workflow_log', 'workflow_definitions'];
    WHEN 'worker' THEN
        functions := ARRAY['claim_steps', 'complete_and_claim', 'complete_step', 'complete_steps', 'fail_step',
                           'heartbeat', 'checkpoint', 'suspend_step', 'release_step', 'register_worker',
                           'set_event', 'send_event', 'get_event'];
        views := ARRAY[]::text[];
    WHEN 'admin' THEN
        functions := ARRAY['resume_workflow', 'retry_from', 'fork_workflow', 'delete_workflow', 'purge',
                           'configure_queue', 'schedule', 'unschedule', '_queue_stats', '_session_alive'];
        views := ARRAY['queue_stats', 'schedules', 'workers', 'grants'];
        -- and a client's part, on every run
        RETURN QUERY SELECT baton._role_objects('client');
    ELSE
        RAISE EXCEPTION 'kind must be client, worker or admin, not %', kind USING ERRCODE = 'invalid_parameter_value';
    END CASE;
    RETURN QUERY
        SELECT format('EXECUTE ON FUNCTION baton.%I(%s)', p.proname, pg_get_function_identity_arguments(p.oid))
          FROM pg_proc p
         WHERE p.pronamespace = 'baton'::regnamespace AND p.proname = ANY (functions)
         ORDER BY 1;
    RETURN QUERY
        SELECT format('SELECT ON TABLE baton.%I', c.relname)
          FROM pg_class c
         WHERE c.relnamespace = 'baton'::regnamespace AND c.relname = ANY (views)
         ORDER BY 1;
END $$;

-- Makes a role's privileges on schema baton what its kinds in role_grants
-- say: everything any kind grants is revoked, then its kinds' part granted.
CREATE FUNCTION _apply_grants(role oid) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    o text;
BEGIN
    FOR o IN SELECT DISTINCT baton._role_objects(k) FROM unnest(ARRAY['client', 'worker', 'admin']) k LOOP
        EXECUTE format('REVOKE %s FROM %s', o, role::regrole);
    END LOOP;
    FOR o IN SELECT DISTINCT baton._role_objects(g.kind) FROM baton.role_grants g WHERE g.role = role LOOP
        EXECUTE format('GRANT %s TO %s', o, role::regrole);
    END LOOP;
    IF EXISTS (SELECT FROM baton.role_grants g WHERE g.role = role) THEN
        EXECUTE format('GRANT USAGE ON SCHEMA baton TO %s', role::regrole);
    ELSE
        EXECUTE format('REVOKE USAGE ON SCHEMA baton FROM %s', role::regrole);
    END IF;
END $$;

-- grant_client, grant_worker, grant_admin and their revoke_*: only a
-- superuser (or the extension's owner) may call them (sql/privileges.sql).
CREATE FUNCTION _set_grant(role regrole, kind text, granted boolean) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    PERFORM baton._require(role, 'role');
    IF granted THEN
        INSERT INTO baton.role_grants (role, kind) VALUES (role, kind) ON CONFLICT DO NOTHING;
    ELSE
        DELETE FROM baton.role_grants g WHERE g.role = role AND g.kind = kind;
    END IF;
    PERFORM baton._apply_grants(role);
END $$;

CREATE FUNCTION grant_client(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'client', true);
END $$;

CREATE FUNCTION grant_worker(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'worker', true);
END $$;

CREATE FUNCTION grant_admin(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'admin', true);
END $$;

CREATE FUNCTION revoke_client(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'client', false);
END $$;

CREATE FUNCTION revoke_worker(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'worker', false);
END $$;

CREATE FUNCTION revoke_admin(role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM baton._set_grant(role, 'admin', false);
END $$;

-- Whether the calling role holds a kind, itself or through a role it is a
-- member of (and inherits from). A superuser holds every kind. SECURITY
-- DEFINER (sql/privileges.sql): a client's views call it.
CREATE FUNCTION _holds(kind text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_variable
DECLARE
    me oid := baton._invoker();
BEGIN
    RETURN (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = me)
        OR EXISTS (SELECT FROM baton.role_grants g JOIN pg_catalog.pg_roles r ON r.oid = g.role
                    WHERE g.kind = kind AND pg_catalog.pg_has_role(me, g.role, 'USAGE'));
END $$;

-- Whether the caller sees every run (an admin, or a superuser) or only the
-- runs it enqueued.
CREATE FUNCTION _sees_all() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN baton._holds('admin');
END $$;

-- Whether the caller may see a run enqueued by `owner`: its own, or any if
-- it sees all. A run it may not see is reported as one that does not exist.
-- (Runs from before 0.7.0 have no owner: admins see them.)
CREATE FUNCTION _visible(owner oid) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce(owner = baton._invoker(), false) OR baton._sees_all();
END $$;
