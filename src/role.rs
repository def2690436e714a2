//! Who is calling (sql/role.sql).

use pgrx::prelude::*;

/// The role the session acts as: its login role, or the one SET ROLE chose.
/// The protocol's functions are SECURITY DEFINER, and inside them
/// current_user is the extension's owner; this is the role that called them,
/// whose runs a client may see (runs.enqueued_by).
#[pg_extern(stable, parallel_safe, name = "_invoker")]
fn invoker() -> pg_sys::Oid {
    // SAFETY: reads a backend global; no allocation, cannot fail
    unsafe { pg_sys::GetOuterUserId() }
}
