-- pg_baton 0.6.0 -> 0.7.0.
--
-- ALTER EXTENSION pg_baton UPDATE carries a database with runs in flight.
--
-- Roles (sql/role.sql, docs/roles.md): from 0.7.0 the protocol's functions
-- are SECURITY DEFINER and nothing in schema baton is granted to PUBLIC, so
-- a role other than a superuser needs baton.grant_client, grant_worker or
-- grant_admin after the upgrade. The runs from before it have no owner
-- (enqueued_by is NULL): admins see them.

-- The function written in Rust (src/role.rs): the calling role.
CREATE FUNCTION "_invoker"() RETURNS oid
STABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'invoker_wrapper';

-- The role that enqueued each run.
ALTER TABLE runs ADD COLUMN enqueued_by oid;

-- The calling role, not the functions' owner.
ALTER TABLE run_log ALTER COLUMN actor SET DEFAULT baton._invoker()::regrole::text;

-- Who holds which kind.
CREATE TABLE role_grants (
    role       oid         NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('client', 'worker', 'admin')),
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role, kind)
);
SELECT pg_catalog.pg_extension_config_dump('baton.role_grants', '');
