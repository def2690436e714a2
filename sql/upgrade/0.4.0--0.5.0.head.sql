-- pg_baton 0.4.0 -> 0.5.0.
--
-- ALTER EXTENSION pg_baton UPDATE carries a database with runs in flight.

-- Per-key claims count the keys they meet in one statement (sql/flow.sql):
-- the per-key helper is gone.
DROP FUNCTION _key_free(text, text, integer);
