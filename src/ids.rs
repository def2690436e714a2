//! Run ids.

use pgrx::prelude::*;

/// A new run id: a time-ordered UUID (version 7). Every per-run table is keyed
/// by run id first, so with random ids each new step, attempt and run would
/// land on a random page of those indexes, and as history grows every
/// transition would read (and after each checkpoint rewrite in full) pages of
/// old history. Time-ordered ids keep the pages that new runs touch together.
#[pg_extern(volatile, parallel_safe, name = "_run_id")]
fn run_id() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*uuid::Uuid::now_v7().as_bytes())
}
