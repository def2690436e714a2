//! pg_baton client (see the client issue).
