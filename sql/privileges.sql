-- Who may call what (sql/role.sql, docs/roles.md). Run last, when every
-- function and view exists, by CREATE EXTENSION and by every upgrade.

-- Every entry point runs with a fixed search_path, so that a caller's (or
-- the database's) search_path cannot put its own functions, operators or
-- tables in place of the ones the protocol means: the public functions, the
-- background worker's rounds and what the views call. pg_temp comes last
-- (unlisted, it would be searched first for tables). The internal helpers
-- inherit the path from the entry point they run under, and stay inlinable
-- (a SET clause would stop that).
--
-- The functions a role may be granted run as the extension's owner
-- (SECURITY DEFINER): the roles are never granted the tables, and reach them
-- only through the protocol. The internal helpers run under those, as the
-- owner already.
DO $$
DECLARE
    f regprocedure;
    definer boolean;
BEGIN
    FOR f, definer IN
        SELECT p.oid, p.proname !~ '^_' OR p.proname IN ('_queue_stats', '_session_alive', '_sees_all')
          FROM pg_proc p
         WHERE p.pronamespace = 'baton'::regnamespace
           AND (p.proname !~ '^_' OR p.proname IN ('_tick', '_fire_timers', '_queue_stats', '_session_alive', '_sees_all'))
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, baton, pg_temp', f);
        IF definer THEN
            EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', f);
        END IF;
    END LOOP;
END $$;

-- Nothing for PUBLIC (PostgreSQL lets every role execute a new function):
-- only superusers, the owner, and the roles granted a kind.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA baton FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA baton FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA baton FROM PUBLIC;
REVOKE ALL ON SCHEMA baton FROM PUBLIC;

-- An upgrade may add functions to a kind: the roles that hold it get them.
-- (A role dropped since it was granted is forgotten.)
DELETE FROM role_grants g WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.oid = g.role);
SELECT _apply_grants(role) FROM (SELECT DISTINCT role FROM role_grants) g;
