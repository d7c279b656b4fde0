//! outbox_pg: the transactional outbox inside PostgreSQL.
//!
//! `outbox.emit()` writes an event in the caller's transaction; a background worker inside the
//! server publishes committed events to Kafka and records the outcome. Module wiring and
//! `_PG_init` only; see docs/architecture.md for the rooms and their rules.

use pgrx::pg_sys;
use pgrx::prelude::*;

mod admin;
mod api;
mod append;
mod durability;
mod encoding;
mod error;
mod guc;
mod launcher;
mod message_size;
mod process;
mod shmem;
mod stamp;
mod wake;
mod worker;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
// Each file requires the one before it: the generated script then has one possible order, so
// the same commit always generates the same script (packages are reproducible).
pgrx::extension_sql_file!("../sql/api.sql", name = "api", requires = ["schema"]);
pgrx::extension_sql_file!("../sql/inbox.sql", name = "inbox", requires = ["api"]);
pgrx::extension_sql_file!(
    "../sql/admin.sql",
    name = "admin",
    requires = ["schema", admin::worker_state, admin::wake]
);

/// Library load: settings and the commit hook everywhere; shared memory and the launcher only
/// when loaded through `shared_preload_libraries` (the postmaster, at startup).
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    refuse_a_second_library();
    guc::init();
    wake::init();
    // SAFETY: reading a postmaster-startup flag.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        launcher::register();
    }
}

/// A server that preloaded one version of the library and is then asked (by CREATE or ALTER
/// EXTENSION, after a package upgrade) to load another from a new file would otherwise define
/// every setting twice and run two commit hooks: refuse clearly instead.
fn refuse_a_second_library() {
    // SAFETY: a lookup of a setting's flags; missing_ok returns 0 for an unknown setting.
    let flags = unsafe { pg_sys::GetConfigOptionFlags(c"outbox.brokers".as_ptr(), true) } as u32;
    // SAFETY: the same lookup: does the setting exist at all (defined, or a placeholder)?
    let exists =
        unsafe { !pg_sys::GetConfigOption(c"outbox.brokers".as_ptr(), true, false).is_null() };
    if exists && flags & pg_sys::GUC_CUSTOM_PLACEHOLDER == 0 {
        pgrx::ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "outbox_pg: another version of the outbox_pg library is already loaded in this server; this file is version {}",
                env!("CARGO_PKG_VERSION")
            ),
            "Restart the server to load the new library (it is in shared_preload_libraries), then run ALTER EXTENSION outbox_pg UPDATE."
        );
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
