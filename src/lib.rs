//! outbox_pg: the transactional outbox inside PostgreSQL.
//!
//! `outbox.emit()` writes an event in the caller's transaction; a background worker inside the
//! server publishes committed events to Kafka and records the outcome on each row.

use pgrx::pg_sys;
use pgrx::prelude::*;

mod admin;
mod api;
mod append;
mod error;
mod event;
mod guc;
mod kafka;
mod launcher;
mod ordering;
mod shared;
mod store;
mod validate;
mod wake;
mod worker;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../sql/api.sql", name = "api", requires = ["schema"]);
pgrx::extension_sql_file!("../sql/inbox.sql", name = "inbox", requires = ["schema"]);
pgrx::extension_sql_file!(
    "../sql/admin.sql",
    name = "admin",
    requires = ["schema", admin::worker_state, admin::wake]
);

/// Library load: settings and the commit hook everywhere; shared memory and the launcher only
/// when loaded through `shared_preload_libraries` (the postmaster, at startup).
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    wake::init();
    // SAFETY: reading a postmaster-startup flag.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shared::init();
        launcher::register();
    }
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
