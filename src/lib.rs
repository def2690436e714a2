//! pg_baton: durable workflows that live inside PostgreSQL.
//!
//! The SQL protocol (tables, claim/complete, retries) lives in `sql/*.sql` and is
//! installed by `CREATE EXTENSION pg_baton`. Rust does what reads better in Rust:
//! validating workflow definitions (`definition`), cron arithmetic (`cron`), and
//! the background worker that keeps time (`worker`, configured by `settings`,
//! woken by backends through `latch`), and the rate limits' windows in shared
//! memory (`rate`), and who is calling (`role`).

use pgrx::prelude::*;

mod cron;
mod definition;
mod ids;
mod latch;
mod rate;
mod role;
mod settings;
mod worker;

::pgrx::pg_module_magic!();

// The SQL files, in dependency order. Each one is a single concern; see README.
// schema.sql comes first; it needs only the run id generator.
extension_sql_file!(
    "../sql/schema.sql",
    name = "schema",
    requires = [ids::run_id]
);
extension_sql_file!(
    "../sql/define.sql",
    name = "define",
    requires = ["schema", definition::normalize_definition]
);
extension_sql_file!("../sql/run.sql", name = "run", requires = ["define"]);
extension_sql_file!("../sql/lease.sql", name = "lease", requires = ["run"]);
extension_sql_file!(
    "../sql/complete.sql",
    name = "complete",
    requires = ["lease"]
);
extension_sql_file!("../sql/queue.sql", name = "queue", requires = ["complete"]);
// Steps that no worker runs, events, child runs, map fan-out, timers, schedules.
extension_sql_file!("../sql/kinds.sql", name = "kinds", requires = ["queue"]);
extension_sql_file!("../sql/event.sql", name = "event", requires = ["kinds"]);
extension_sql_file!("../sql/suspend.sql", name = "suspend", requires = ["event"]);
extension_sql_file!("../sql/child.sql", name = "child", requires = ["suspend"]);
extension_sql_file!("../sql/map.sql", name = "map", requires = ["child"]);
extension_sql_file!(
    "../sql/schedule.sql",
    name = "schedule",
    requires = ["map", cron::cron_next, cron::cron_prev]
);
extension_sql_file!(
    "../sql/timer.sql",
    name = "timer",
    requires = ["schedule", latch::wake_scheduler]
);
extension_sql_file!("../sql/tick.sql", name = "tick", requires = ["timer"]);
// Operating runs: flow control, run operations, statistics and the run's graph.
extension_sql_file!(
    "../sql/flow.sql",
    name = "flow",
    requires = [
        "tick",
        rate::rate_take,
        rate::rate_give_back,
        rate::rate_used,
        rate::rate_wake_at,
        rate::rate_due,
        rate::rate_next_wake
    ]
);
extension_sql_file!(
    "../sql/operation.sql",
    name = "operation",
    requires = ["flow"]
);
extension_sql_file!("../sql/stats.sql", name = "stats", requires = ["operation"]);
extension_sql_file!("../sql/graph.sql", name = "graph", requires = ["stats"]);
extension_sql_file!("../sql/worker.sql", name = "worker", requires = ["graph"]);
extension_sql_file!(
    "../sql/role.sql",
    name = "role",
    requires = ["worker", role::invoker]
);
extension_sql_file!("../sql/planner.sql", name = "planner", requires = ["role"]);
extension_sql_file!("../sql/views.sql", name = "views", requires = ["planner"]);
// last: who may call what, once every function and view exists
extension_sql_file!("../sql/privileges.sql", name = "privileges", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::register();
    worker::register();
}
