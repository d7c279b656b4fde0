//! Appending one event row to `outbox.events`: the write half of emit().
//!
//! The extension owns the table, so emit() writes the row the way Postgres writes catalog rows:
//! form the tuple, `heap_insert` it, insert its index entries. That skips what a one-row INSERT
//! costs through SPI and the executor (plan revalidation, a fresh snapshot, executor start and
//! end), which was most of emit()'s own time.
//!
//! The direct path is taken only while the table is exactly what our SQL scripts created: a plain
//! heap table with the columns below (types, typmods, NOT NULL and defaults as shipped), no rules,
//! row security, CHECK constraints or generated columns, and no trigger but our own `stamp`
//! (whose work the direct path does itself). Each index must be a plain, immediate btree on
//! columns with their default operator classes; any other index (an expression, a predicate,
//! another access method) is maintained by the executor's general routine. Anything else falls
//! back to a prepared INSERT through SPI, which honours all of it. So does a session with an
//! audit hook loaded (pgaudit, sepgsql), unless `outbox.direct_insert = on`.
//!
//! Wherever user code can run (the executor's index maintenance, the SPI INSERT and whatever it
//! fires), the search path is pinned to `pg_catalog, pg_temp`: emit() runs with its owner's
//! rights, and the caller controls their own search path.

use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::Refusal;
use crate::guc::{self, DirectInsert};

/// One event row as emit() writes it; every other column takes its default.
/// Text columns are datums in the database's encoding, as the caller passed them.
pub struct EventRow {
    pub id: uuid::Uuid,
    pub event_type: pg_sys::Datum,
    pub aggregate_id: pg_sys::Datum,
    /// The caller's jsonb datum, stored as given (no re-serialisation).
    pub payload: pg_sys::Datum,
    pub headers: Option<pg_sys::Datum>,
    pub topic: Option<pg_sys::Datum>,
    /// The writing transaction (top level); None: arrived by replication, not published here.
    pub xid: Option<u64>,
    pub message_bytes: i32,
}

/// Writes `row` into `outbox.events` in the current transaction.
pub fn append(row: &EventRow) {
    let table = EventsTable::current();
    let direct = match guc::direct_insert() {
        DirectInsert::On => true,
        DirectInsert::Off => false,
        // SAFETY: reading a hook pointer; audit extensions set it in _PG_init.
        DirectInsert::Auto => {
            unsafe { std::ptr::addr_of!(pg_sys::ExecutorCheckPerms_hook).read() }.is_none()
        }
    };
    match table.layout {
        Some(ref layout) if direct && table.is_plain(layout) => unsafe {
            // SAFETY: called from emit() inside a transaction; `table` was just looked up and
            // locked, and `layout` was read from this relation's current descriptor and indexes.
            insert_directly(&table, layout, row)
        },
        _ => {
            table.close();
            with_pinned_search_path(|| insert_through_spi(row));
        }
    }
}

/// The columns emit() fills or defaults, by name. A table with a column not listed here, or
/// without one of these, goes through the SPI path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Column {
    Id,
    EventType,
    AggregateId,
    Payload,
    CreatedAt,
    Seq,
    Topic,
    Headers,
    Xid,
    MessageBytes,
    /// A column dropped by an upgrade script; its slot in the tuple stays NULL.
    Dropped,
}

/// Every column the shipped table has.
const SHIPPED: [Column; 10] = [
    Column::Id,
    Column::EventType,
    Column::AggregateId,
    Column::Payload,
    Column::CreatedAt,
    Column::Seq,
    Column::Topic,
    Column::Headers,
    Column::Xid,
    Column::MessageBytes,
];

impl Column {
    fn named(name: &str) -> Option<Column> {
        Some(match name {
            "id" => Column::Id,
            "event_type" => Column::EventType,
            "aggregate_id" => Column::AggregateId,
            "payload" => Column::Payload,
            "created_at" => Column::CreatedAt,
            "seq" => Column::Seq,
            "topic" => Column::Topic,
            "headers" => Column::Headers,
            "xid" => Column::Xid,
            "message_bytes" => Column::MessageBytes,
            _ => return None,
        })
    }

    /// The type, NOT NULL and default the shipped table gives this column.
    fn shipped(self) -> (pg_sys::Oid, bool, Default) {
        match self {
            Column::Id => (pg_sys::UUIDOID, true, Default::None),
            Column::EventType | Column::AggregateId => (pg_sys::TEXTOID, true, Default::None),
            Column::Payload => (pg_sys::JSONBOID, true, Default::None),
            Column::CreatedAt => (pg_sys::TIMESTAMPTZOID, true, Default::Now),
            Column::Seq => (pg_sys::INT8OID, true, Default::Identity),
            Column::Topic => (pg_sys::TEXTOID, false, Default::None),
            Column::Headers => (pg_sys::JSONBOID, false, Default::None),
            Column::Xid => (pg_sys::XID8OID, false, Default::None),
            Column::MessageBytes => (pg_sys::INT4OID, false, Default::None),
            Column::Dropped => (pg_sys::InvalidOid, false, Default::None),
        }
    }
}

/// A column's default as the direct path reproduces it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Default {
    None,
    /// `now()`: the transaction's start.
    Now,
    /// `GENERATED ALWAYS AS IDENTITY`: the identity sequence's next value.
    Identity,
}

/// True if the attribute is exactly what the shipped table has for `column`.
///
/// SAFETY: `rel` is open and locked and `attribute` is one of its attributes.
unsafe fn as_shipped(
    rel: pg_sys::Relation,
    attribute: &pg_sys::FormData_pg_attribute,
    column: Column,
) -> bool {
    if column == Column::Dropped {
        return true;
    }
    let (type_oid, not_null, default) = column.shipped();
    let shape = attribute.atttypid == type_oid
        && attribute.atttypmod == -1
        && attribute.attnotnull == not_null
        && attribute.attgenerated == 0;
    let identity = attribute.attidentity == pg_sys::ATTRIBUTE_IDENTITY_ALWAYS as std::ffi::c_char;
    shape
        && match default {
            Default::None => !attribute.atthasdef && attribute.attidentity == 0,
            Default::Identity => identity && !attribute.atthasdef,
            // SAFETY: per the contract; the default expression is read from the relation.
            Default::Now => attribute.attidentity == 0 && unsafe { default_is_now(rel, attribute) },
        }
}

/// True if the column's default expression is a plain `now()` call.
///
/// SAFETY: `rel` is open and locked and `attribute` is one of its attributes.
unsafe fn default_is_now(rel: pg_sys::Relation, attribute: &pg_sys::FormData_pg_attribute) -> bool {
    if !attribute.atthasdef {
        return false;
    }
    // SAFETY: build_column_default returns the column's default expression tree (or NULL).
    unsafe {
        let node = pg_sys::build_column_default(rel, attribute.attnum as i32);
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_FuncExpr {
            return false;
        }
        let call = node.cast::<pg_sys::FuncExpr>();
        (*call).funcid == pg_sys::Oid::from(pg_sys::F_NOW) && (*call).args.is_null()
    }
}

/// What the direct path needs to know about the table, read once per backend and forgotten
/// whenever Postgres invalidates the table's or one of its indexes' relcache entries (DDL,
/// CREATE INDEX CONCURRENTLY's phases, DROP EXTENSION, upgrades).
struct Layout {
    relid: pg_sys::Oid,
    /// The identity sequence behind `seq`.
    seq_relid: pg_sys::Oid,
    columns: Vec<Column>,
    /// Every index of the table, ready or not: an invalidation of any of them forgets the layout.
    index_oids: Vec<pg_sys::Oid>,
    indexing: Indexing,
    /// The table's only trigger is our `stamp`, enabled ALWAYS (or it has none).
    stamp_only: bool,
}

/// How a new row's index entries are made.
enum Indexing {
    /// Every index is a plain btree every row enters.
    Direct(Vec<DirectIndex>),
    /// Some index is not: the executor's routine opens all of them and checks each one.
    Executor,
}

/// A plain btree on columns with their default operator classes.
struct DirectIndex {
    oid: pg_sys::Oid,
    unique: bool,
    nulls_not_distinct: bool,
    key_count: i32,
    /// Positions in the row of the index's columns (key columns first, then INCLUDE ones).
    columns: Vec<usize>,
}

thread_local! {
    static LAYOUT: RefCell<Option<Rc<Layout>>> = const { RefCell::new(None) };
    static INVALIDATION_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Relcache invalidations this backend has processed, of any relation. A layout read while
    /// this moved may predate the invalidation that would have cleared it, so it is not kept.
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
    /// The events table whose extension version was checked against this library.
    static VERSION_CHECKED: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// Relcache invalidation callback: forgets the layout when the events table or one of its
/// indexes changes (InvalidOid: everything changed). Runs in this backend only, while it
/// processes invalidation messages; it must not touch the catalogs, so it only clears caches.
#[pg_guard]
unsafe extern "C-unwind" fn forget_layout(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATIONS.set(INVALIDATIONS.get().wrapping_add(1));
    LAYOUT.with(|layout| {
        let mut layout = layout.borrow_mut();
        let affected = layout
            .as_ref()
            .is_some_and(|l| l.relid == relid || l.index_oids.contains(&relid));
        if relid == pg_sys::InvalidOid || affected {
            *layout = None;
        }
    });
    if relid == pg_sys::InvalidOid || VERSION_CHECKED.get() == relid {
        VERSION_CHECKED.set(pg_sys::InvalidOid);
    }
}

/// `outbox.events`, opened with RowExclusiveLock for this transaction.
struct EventsTable {
    rel: pg_sys::Relation,
    /// None when the table is not as shipped (a column added, missing or changed).
    layout: Option<Rc<Layout>>,
}

impl EventsTable {
    fn current() -> EventsTable {
        if !INVALIDATION_REGISTERED.get() {
            // SAFETY: registering a backend-local callback; done once per backend, as Postgres
            // has a fixed number of callback slots.
            unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget_layout), 0.into()) };
            INVALIDATION_REGISTERED.set(true);
        }
        // Looked up by name every time (a syscache hit): after DROP and CREATE EXTENSION the
        // cached oid would name a table that is gone.
        let relid = events_relid();
        // SAFETY: inside a transaction; the lock is held until it ends (closed with NoLock).
        // Locking processes pending invalidations, so a stale cached layout is forgotten here.
        let rel = unsafe { pg_sys::table_open(relid, pg_sys::RowExclusiveLock as i32) };
        if VERSION_CHECKED.get() != relid {
            check_extension_version();
            VERSION_CHECKED.set(relid);
        }
        let cached = LAYOUT
            .with(|layout| layout.borrow().clone())
            .filter(|layout| layout.relid == relid);
        let layout = cached.or_else(|| {
            let before = INVALIDATIONS.get();
            // SAFETY: `rel` is open and locked, so its descriptor and index list are valid.
            let layout = unsafe { read_layout(rel) }.map(Rc::new);
            // Opening the indexes may have processed invalidations (an index becoming ready
            // for inserts, say) after parts of the layout were read: use it for this insert,
            // which the table lock keeps consistent, but read it again next time.
            if INVALIDATIONS.get() == before {
                LAYOUT.with(|cell| *cell.borrow_mut() = layout.clone());
            }
            layout
        });
        EventsTable { rel, layout }
    }

    /// True while the table is a plain heap table with nothing the direct path would bypass.
    fn is_plain(&self, layout: &Layout) -> bool {
        // SAFETY: `rel` is open and locked; these fields are read-only relcache data.
        unsafe {
            let class = &*(*self.rel).rd_rel;
            let constraints = (*(*self.rel).rd_att).constr;
            class.relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char
                && class.relam == pg_sys::HEAP_TABLE_AM_OID
                && !class.relispartition
                && !class.relhasrules
                && !class.relrowsecurity
                && layout.stamp_only
                && (constraints.is_null()
                    || ((*constraints).num_check == 0 && !(*constraints).has_generated_stored))
        }
    }

    /// Releases the relation; the lock stays until the transaction ends, as for any INSERT.
    fn close(self) {
        // SAFETY: `rel` was opened by `current()` and is closed once.
        unsafe { pg_sys::table_close(self.rel, pg_sys::NoLock as i32) };
    }
}

/// The oid of `outbox.events`, looked up by schema and name (never through the search path).
fn events_relid() -> pg_sys::Oid {
    // SAFETY: catalog lookups inside a transaction; both raise a clear error when missing.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"outbox".as_ptr(), false);
        let relid = pg_sys::get_relname_relid(c"events".as_ptr(), namespace);
        if relid == pg_sys::InvalidOid {
            pgrx::error!("outbox.emit: relation outbox.events does not exist");
        }
        relid
    }
}

/// Refuses to write when the extension's SQL objects are of another version than this library:
/// the columns and functions emit() writes for may not be there.
fn check_extension_version() {
    let library = env!("CARGO_PKG_VERSION");
    let installed = with_pinned_search_path(|| {
        Spi::get_one::<String>(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'outbox_pg'",
        )
        .ok()
        .flatten()
    });
    if installed.as_deref() != Some(library) {
        Refusal::new(
            pgrx::pg_sys::errcodes::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "outbox.emit: the outbox_pg library is version {library} but the extension in this database is version {}",
                installed.as_deref().unwrap_or("(none)")
            ),
        )
        .hint("Run ALTER EXTENSION outbox_pg UPDATE, or restart the server if the library was upgraded and the old one is still loaded.")
        .raise();
    }
}

/// Reads which column is where and how index entries are made; None if the table is not as
/// shipped.
///
/// SAFETY: `rel` is open and locked.
unsafe fn read_layout(rel: pg_sys::Relation) -> Option<Layout> {
    // SAFETY: per the contract, the relation and its tuple descriptor are valid.
    let relid = unsafe { (*rel).rd_id };
    let attributes = unsafe { attributes_of(rel) };
    let mut columns = Vec::with_capacity(attributes.len());
    let mut seq_attnum = None;
    for attribute in attributes {
        let column = if attribute.attisdropped {
            Column::Dropped
        } else {
            Column::named(pgrx::name_data_to_str(&attribute.attname))?
        };
        // SAFETY: `attribute` belongs to `rel`.
        if !unsafe { as_shipped(rel, attribute, column) }
            || columns.contains(&column) && column != Column::Dropped
        {
            return None;
        }
        if column == Column::Seq {
            seq_attnum = Some(attribute.attnum);
        }
        columns.push(column);
    }
    if !SHIPPED.iter().all(|c| columns.contains(c)) {
        return None;
    }
    // SAFETY: a catalog lookup inside a transaction; missing_ok returns InvalidOid. Before 17
    // it takes the relation's OID, from 17 the open relation.
    #[cfg(any(feature = "pg14", feature = "pg15", feature = "pg16"))]
    let seq_relid = unsafe { pg_sys::getIdentitySequence(relid, seq_attnum?, true) };
    #[cfg(not(any(feature = "pg14", feature = "pg15", feature = "pg16")))]
    let seq_relid = unsafe { pg_sys::getIdentitySequence(rel, seq_attnum?, true) };
    if seq_relid == pg_sys::InvalidOid {
        return None;
    }
    // SAFETY: `rel` is open and locked.
    let (index_oids, indexing) = unsafe { read_indexing(rel) };
    Some(Layout {
        relid,
        seq_relid,
        columns,
        index_oids,
        indexing,
        // SAFETY: `rel` is open and locked.
        stamp_only: unsafe { only_our_stamp_trigger(rel) },
    })
}

/// The relation's attributes, dropped ones included, in column order.
///
/// SAFETY: `rel` is open; the slice lives as long as its tuple descriptor.
unsafe fn attributes_of<'a>(rel: pg_sys::Relation) -> &'a [pg_sys::FormData_pg_attribute] {
    // SAFETY: per the contract, the tuple descriptor is valid and holds `natts` attributes.
    unsafe {
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        // Up to 17 the attributes are the descriptor's trailing array; from 18 they follow its
        // compact attributes, still contiguous, reached through TupleDescAttr.
        #[cfg(not(feature = "pg18"))]
        return (*desc).attrs.as_slice(natts);
        #[cfg(feature = "pg18")]
        return if natts == 0 {
            &[]
        } else {
            std::slice::from_raw_parts(pg_sys::TupleDescAttr(desc, 0), natts)
        };
    }
}

/// True if the table has no trigger, or only `stamp`: BEFORE INSERT FOR EACH ROW, enabled
/// ALWAYS, calling outbox.stamp_event() (which the direct path stands in for).
///
/// SAFETY: `rel` is open and locked.
unsafe fn only_our_stamp_trigger(rel: pg_sys::Relation) -> bool {
    // SAFETY: the relation's trigger descriptor is valid while it is open.
    unsafe {
        let triggers = (*rel).trigdesc;
        if triggers.is_null() {
            return true;
        }
        if (*triggers).numtriggers != 1 {
            return false;
        }
        let trigger = &*(*triggers).triggers;
        let before_insert_row = (pg_sys::TRIGGER_TYPE_ROW
            | pg_sys::TRIGGER_TYPE_BEFORE
            | pg_sys::TRIGGER_TYPE_INSERT) as i16;
        let function = pg_sys::get_func_name(trigger.tgfoid);
        trigger.tgtype == before_insert_row
            && trigger.tgenabled == pg_sys::TRIGGER_FIRES_ALWAYS as std::ffi::c_char
            && !function.is_null()
            && CStr::from_ptr(function) == c"stamp_event"
            && pg_sys::get_func_namespace(trigger.tgfoid)
                == pg_sys::get_namespace_oid(c"outbox".as_ptr(), false)
    }
}

/// Lists the table's indexes and decides how their entries are made.
///
/// SAFETY: `rel` is open and locked.
unsafe fn read_indexing(rel: pg_sys::Relation) -> (Vec<pg_sys::Oid>, Indexing) {
    // SAFETY: the index list of an open relation is a valid List of oids.
    let index_oids: Vec<pg_sys::Oid> = unsafe {
        let list = pg_sys::RelationGetIndexList(rel);
        (0..pg_sys::list_length(list))
            .map(|i| pg_sys::list_nth_oid(list, i))
            .collect()
    };
    let mut direct = Vec::new();
    for &oid in &index_oids {
        // SAFETY: the table's lock keeps its indexes from being dropped; same lock as INSERT.
        let index = unsafe { pg_sys::index_open(oid, pg_sys::RowExclusiveLock as i32) };
        // SAFETY: `index` is open; `rel` is its open, locked table.
        let fit = unsafe { direct_fit(index, rel) };
        // SAFETY: opened above; the lock is kept, as the executor does.
        unsafe { pg_sys::index_close(index, pg_sys::NoLock as i32) };
        match fit {
            IndexFit::Direct(index) => direct.push(index),
            IndexFit::NotReady => {}
            IndexFit::Executor => return (index_oids, Indexing::Executor),
        }
    }
    (index_oids, Indexing::Direct(direct))
}

enum IndexFit {
    Direct(DirectIndex),
    /// Being built concurrently: not ready for entries yet. Its relcache invalidation when it
    /// becomes ready forgets the layout.
    NotReady,
    /// Not a plain btree on columns with default operator classes.
    Executor,
}

/// Whether the direct path can maintain `index`.
///
/// SAFETY: `index` is an open index of `rel`, which is open and locked.
unsafe fn direct_fit(index: pg_sys::Relation, rel: pg_sys::Relation) -> IndexFit {
    // SAFETY: an open index's pg_index row and relcache fields are valid while it is open.
    unsafe {
        let form = &*(*index).rd_index;
        if !form.indisready {
            return IndexFit::NotReady;
        }
        let plain_btree = (*(*index).rd_rel).relam == pg_sys::BTREE_AM_OID
            && !form.indisexclusion
            && (form.indimmediate || !form.indisunique)
            && pg_sys::RelationGetIndexExpressions(index).is_null()
            && pg_sys::RelationGetIndexPredicate(index).is_null();
        if !plain_btree {
            return IndexFit::Executor;
        }
        let attnums = form.indkey.values.as_slice(form.indnatts as usize);
        let attributes = attributes_of(rel);
        let mut positions = Vec::with_capacity(attnums.len());
        for (i, &attnum) in attnums.iter().enumerate() {
            let Some(position) = usize::try_from(attnum - 1).ok() else {
                return IndexFit::Executor;
            };
            // Key columns must use their type's default btree operator family: a user-defined
            // one could run SQL under the caller's search path.
            if i < form.indnkeyatts as usize {
                let Some(attribute) = attributes.get(position) else {
                    return IndexFit::Executor;
                };
                let default = pg_sys::GetDefaultOpClass(attribute.atttypid, pg_sys::BTREE_AM_OID);
                if default == pg_sys::InvalidOid
                    || *(*index).rd_opfamily.add(i) != pg_sys::get_opclass_family(default)
                    || *(*index).rd_opcintype.add(i) != pg_sys::get_opclass_input_type(default)
                {
                    return IndexFit::Executor;
                }
            }
            positions.push(position);
        }
        IndexFit::Direct(DirectIndex {
            oid: (*index).rd_id,
            unique: form.indisunique,
            nulls_not_distinct: nulls_not_distinct(form),
            key_count: form.indnkeyatts as i32,
            columns: positions,
        })
    }
}

#[cfg(not(feature = "pg14"))]
fn nulls_not_distinct(form: &pg_sys::FormData_pg_index) -> bool {
    form.indnullsnotdistinct
}

#[cfg(feature = "pg14")]
fn nulls_not_distinct(_form: &pg_sys::FormData_pg_index) -> bool {
    false
}

/// Forms the tuple and inserts it into the heap (which toasts large payloads as usual), then
/// makes its index entries.
///
/// SAFETY: inside a transaction; `table` is open and locked and `layout` describes it.
unsafe fn insert_directly(table: &EventsTable, layout: &Layout, row: &EventRow) {
    let mut values = vec![pg_sys::Datum::from(0); layout.columns.len()];
    let mut nulls = vec![true; layout.columns.len()];
    for (i, column) in layout.columns.iter().enumerate() {
        let value = match column {
            Column::Id => Some(uuid_datum(row.id)),
            Column::EventType => Some(row.event_type),
            Column::AggregateId => Some(row.aggregate_id),
            Column::Payload => Some(row.payload),
            // The default of created_at is now(): the transaction's start.
            // SAFETY: inside a transaction.
            Column::CreatedAt => {
                unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }.into_datum()
            }
            Column::Seq => Some(next_seq(layout.seq_relid)),
            Column::Topic => row.topic,
            Column::Headers => row.headers,
            Column::Xid => row.xid.map(pg_sys::Datum::from),
            Column::MessageBytes => Some(pg_sys::Datum::from(row.message_bytes)),
            Column::Dropped => None,
        };
        if let Some(value) = value {
            values[i] = value;
            nulls[i] = false;
        }
    }
    // SAFETY: per the contract; values and nulls have one entry per attribute of the table.
    unsafe {
        match &layout.indexing {
            Indexing::Direct(indexes) => {
                let tuple = pg_sys::heap_form_tuple(
                    (*table.rel).rd_att,
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                );
                pg_sys::simple_heap_insert(table.rel, tuple);
                for index in indexes {
                    insert_index_entry(table.rel, index, &mut (*tuple).t_self, &values, &nulls);
                }
                pg_sys::heap_freetuple(tuple);
            }
            Indexing::Executor => {
                with_pinned_search_path(|| insert_with_executor(table.rel, &values, &nulls))
            }
        }
        pg_sys::table_close(table.rel, pg_sys::NoLock as i32);
    }
}

/// Inserts the entry for the heap tuple at `tid` into one plain btree, with the uniqueness
/// check a unique index asks for.
///
/// SAFETY: inside a transaction; `rel` is open and locked; `tid` is the new tuple's location and
/// `values`/`nulls` its columns.
unsafe fn insert_index_entry(
    rel: pg_sys::Relation,
    index: &DirectIndex,
    tid: &mut pg_sys::ItemPointerData,
    values: &[pg_sys::Datum],
    nulls: &[bool],
) {
    let mut key_values: Vec<pg_sys::Datum> = index.columns.iter().map(|&i| values[i]).collect();
    let mut key_nulls: Vec<bool> = index.columns.iter().map(|&i| nulls[i]).collect();
    let check = if index.unique {
        pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
    } else {
        pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
    };
    // SAFETY: the table's lock keeps the index from being dropped; it is closed with NoLock,
    // keeping its lock until the transaction ends, as the executor does.
    unsafe {
        let index_rel = pg_sys::index_open(index.oid, pg_sys::RowExclusiveLock as i32);
        let info = index_info(index);
        pg_sys::index_insert(
            index_rel,
            key_values.as_mut_ptr(),
            key_nulls.as_mut_ptr(),
            tid,
            rel,
            check,
            false,
            info,
        );
        pg_sys::index_close(index_rel, pg_sys::NoLock as i32);
    }
}

/// The IndexInfo a plain btree insert needs (makeIndexInfo grew parameters over the majors).
///
/// SAFETY: inside a transaction (palloc in the current context).
unsafe fn index_info(index: &DirectIndex) -> *mut pg_sys::IndexInfo {
    let attributes = index.columns.len() as i32;
    // SAFETY: per the contract.
    unsafe {
        #[cfg(feature = "pg14")]
        {
            let _ = index.nulls_not_distinct;
            pg_sys::makeIndexInfo(
                attributes,
                index.key_count,
                pg_sys::BTREE_AM_OID,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                index.unique,
                true,
                false,
            )
        }
        #[cfg(feature = "pg15")]
        {
            pg_sys::makeIndexInfo(
                attributes,
                index.key_count,
                pg_sys::BTREE_AM_OID,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                index.unique,
                index.nulls_not_distinct,
                true,
                false,
            )
        }
        #[cfg(any(feature = "pg16", feature = "pg17"))]
        {
            pg_sys::makeIndexInfo(
                attributes,
                index.key_count,
                pg_sys::BTREE_AM_OID,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                index.unique,
                index.nulls_not_distinct,
                true,
                false,
                false,
            )
        }
        #[cfg(feature = "pg18")]
        {
            pg_sys::makeIndexInfo(
                attributes,
                index.key_count,
                pg_sys::BTREE_AM_OID,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                index.unique,
                index.nulls_not_distinct,
                true,
                false,
                false,
                false,
            )
        }
    }
}

/// The general route for index maintenance: the executor opens every index, evaluates
/// expressions and predicates for this row, and inserts the entries.
///
/// SAFETY: inside a transaction; `rel` is open and locked; `values`/`nulls` are its columns.
unsafe fn insert_with_executor(rel: pg_sys::Relation, values: &[pg_sys::Datum], nulls: &[bool]) {
    // SAFETY: the executor state lives only for this insert and is freed below; the slot, the
    // result relation and the index state are allocated in its memory context. An error in
    // between aborts the transaction, which releases the indexes and the memory.
    unsafe {
        let estate = pg_sys::CreateExecutorState();
        let previous = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
        let result =
            PgBox::<pg_sys::ResultRelInfo>::alloc_node(pg_sys::NodeTag::T_ResultRelInfo).into_pg();
        pg_sys::InitResultRelInfo(result, rel, 1, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(result, false);
        let slot = pg_sys::MakeSingleTupleTableSlot((*rel).rd_att, &pg_sys::TTSOpsVirtual);
        pg_sys::MemoryContextSwitchTo(previous);

        std::ptr::copy_nonoverlapping(values.as_ptr(), (*slot).tts_values, values.len());
        std::ptr::copy_nonoverlapping(nulls.as_ptr(), (*slot).tts_isnull, nulls.len());
        pg_sys::ExecStoreVirtualTuple(slot);
        pg_sys::simple_table_tuple_insert(rel, slot);
        #[cfg(any(feature = "pg14", feature = "pg15"))]
        pg_sys::ExecInsertIndexTuples(
            result,
            slot,
            estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        #[cfg(not(any(feature = "pg14", feature = "pg15")))]
        pg_sys::ExecInsertIndexTuples(
            result,
            slot,
            estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            false,
        );

        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::ExecCloseIndices(result);
        pg_sys::FreeExecutorState(estate);
    }
}

/// Runs `f` with `search_path = pg_catalog, pg_temp`, restored afterwards (or by transaction
/// abort if `f` raises an error), the way a function's `SET search_path` clause applies.
pub fn with_pinned_search_path<R>(f: impl FnOnce() -> R) -> R {
    let (name, value) = (c"search_path", c"pg_catalog, pg_temp");
    // SAFETY: inside a transaction; the nest level is closed below with the same number, or by
    // AtEOXact_GUC at abort.
    let level = unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        level
    };
    let result = f();
    // SAFETY: closes the nest level opened above.
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    result
}

fn uuid_datum(id: uuid::Uuid) -> pg_sys::Datum {
    pgrx::Uuid::from_bytes(*id.as_bytes())
        .into_datum()
        .expect("a uuid is never NULL")
}

/// `nextval()` of the identity sequence, as the column default would call it.
fn next_seq(seq_relid: pg_sys::Oid) -> pg_sys::Datum {
    // SAFETY: nextval_oid takes a regclass oid and returns an int8 datum; it raises on error.
    unsafe {
        pgrx::direct_function_call_as_datum(pg_sys::nextval_oid, &[seq_relid.into_datum()])
            .expect("nextval returns a value")
    }
}

const INSERT_EVENT: &CStr = c"INSERT INTO outbox.events \
    (id, event_type, aggregate_id, payload, headers, topic, xid, message_bytes) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

thread_local! {
    /// This backend's saved plan for INSERT_EVENT; plancache revalidates it after DDL.
    static INSERT_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

/// The general path: a prepared INSERT through SPI, which fires triggers, checks constraints
/// and applies every column default. The caller pins the search path.
fn insert_through_spi(row: &EventRow) {
    let absent = pg_sys::Datum::from(0);
    let mut values = [
        uuid_datum(row.id),
        row.event_type,
        row.aggregate_id,
        row.payload,
        row.headers.unwrap_or(absent),
        row.topic.unwrap_or(absent),
        row.xid.map(pg_sys::Datum::from).unwrap_or(absent),
        pg_sys::Datum::from(row.message_bytes),
    ];
    let null = |absent: bool| if absent { b'n' } else { b' ' } as std::ffi::c_char;
    let nulls = [
        null(false),
        null(false),
        null(false),
        null(false),
        null(row.headers.is_none()),
        null(row.topic.is_none()),
        null(row.xid.is_none()),
        null(false),
    ];
    // SAFETY: called from a SQL function inside a transaction, the only place SPI may connect;
    // values and nulls have exactly the entries the plan declares.
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            pgrx::error!("outbox.emit: SPI_connect failed");
        }
        let plan = INSERT_PLAN.with(|cell| {
            if cell.get().is_null() {
                let mut types = [
                    pg_sys::UUIDOID,
                    pg_sys::TEXTOID,
                    pg_sys::TEXTOID,
                    pg_sys::JSONBOID,
                    pg_sys::JSONBOID,
                    pg_sys::TEXTOID,
                    pg_sys::XID8OID,
                    pg_sys::INT4OID,
                ];
                let plan = pg_sys::SPI_prepare(
                    INSERT_EVENT.as_ptr(),
                    types.len() as i32,
                    types.as_mut_ptr(),
                );
                if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                    pgrx::error!("outbox.emit: could not prepare the outbox insert");
                }
                cell.set(plan);
            }
            cell.get()
        });
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 1);
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            pgrx::error!("outbox.emit: insert into outbox.events failed (SPI code {rc})");
        }
        pg_sys::SPI_finish();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn emit(aggregate_id: &str) -> String {
        Spi::get_one::<String>(&format!(
            "SELECT outbox.emit('order.created', '{aggregate_id}', '{{\"n\": 1}}')::text"
        ))
        .unwrap()
        .unwrap()
    }

    fn holds(sql: &str) -> bool {
        Spi::get_one::<bool>(sql).unwrap().unwrap()
    }

    /// amcheck with heapallindexed on every btree index of the table: each holds exactly the
    /// rows it should, no more, no fewer.
    fn indexes_are_consistent() -> bool {
        Spi::run("CREATE EXTENSION IF NOT EXISTS amcheck").unwrap();
        holds(
            "SELECT count(*) > 0 AND bool_and(checked IS NOT NULL) FROM (
               SELECT bt_index_check(c.oid, true)::text IS NULL AS checked
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
               WHERE i.indrelid = 'outbox.events'::regclass AND am.amname = 'btree') each_index",
        )
    }

    fn direct_indexes() -> Option<usize> {
        let table = super::EventsTable::current();
        let direct = match table.layout.as_deref() {
            Some(layout) if table.is_plain(layout) => match &layout.indexing {
                super::Indexing::Direct(indexes) => Some(indexes.len()),
                super::Indexing::Executor => Some(0),
            },
            _ => None,
        };
        table.close();
        direct
    }

    #[pg_test]
    fn the_shipped_table_takes_the_direct_path() {
        // The primary key, (seq, id) and (xid); the stamp trigger does not count.
        assert_eq!(direct_indexes(), Some(3));
        let id = emit("a");
        assert!(holds(&format!(
            "SELECT xid = pg_current_xact_id() AND message_bytes > 0 FROM outbox.events WHERE id = '{id}'"
        )));
    }

    #[pg_test]
    fn direct_insert_maintains_every_index() {
        Spi::run("SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 300) g").unwrap();
        let id = emit("after");
        assert!(indexes_are_consistent());
        Spi::run("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off").unwrap();
        assert!(holds(&format!(
            "SELECT count(*) = 1 FROM outbox.events WHERE id = '{id}'"
        )));
        assert!(holds(
            "SELECT count(*) = 301 FROM outbox.events WHERE xid = pg_current_xact_id()"
        ));
    }

    #[pg_test]
    fn large_payloads_are_toasted_and_read_back_whole() {
        Spi::run(
            "SELECT outbox.emit('big', 'a', jsonb_build_object('blob', string_agg(md5(g::text), '')))
             FROM generate_series(1, 20000) g",
        )
        .unwrap();
        assert!(holds(
            "SELECT length(payload->>'blob') = 640000 FROM outbox.events WHERE event_type = 'big'"
        ));
        assert!(holds(
            "SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class WHERE oid = 'outbox.events'::regclass"
        ));
        assert!(indexes_are_consistent());
    }

    #[pg_test]
    fn a_trigger_on_the_table_still_fires() {
        Spi::run(
            "CREATE TABLE public.seen (id uuid);
             CREATE FUNCTION public.remember() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO public.seen VALUES (NEW.id); RETURN NEW; END $$;
             CREATE TRIGGER remember AFTER INSERT ON outbox.events
               FOR EACH ROW EXECUTE FUNCTION public.remember();",
        )
        .unwrap();
        assert_eq!(direct_indexes(), None, "another trigger: the SQL path");
        let with_trigger = emit("a");
        Spi::run("DROP TRIGGER remember ON outbox.events").unwrap();
        let without_trigger = emit("a");
        assert!(holds(&format!(
            "SELECT array_agg(id) = ARRAY['{with_trigger}'::uuid] FROM public.seen"
        )));
        assert!(holds(&format!(
            "SELECT count(*) = 2 AND bool_and(xid = pg_current_xact_id())
             FROM outbox.events WHERE id IN ('{with_trigger}', '{without_trigger}')"
        )));
    }

    #[pg_test]
    fn a_column_emit_does_not_know_gets_its_default() {
        let before = emit("a");
        Spi::run(
            "ALTER TABLE outbox.events ADD COLUMN note text NOT NULL DEFAULT 'from the default'",
        )
        .unwrap();
        let after = emit("a");
        assert!(holds(&format!(
            "SELECT bool_and(note = 'from the default') AND count(*) = 2
             FROM outbox.events WHERE id IN ('{before}', '{after}')"
        )));
        Spi::run("ALTER TABLE outbox.events DROP COLUMN note").unwrap();
        assert_eq!(direct_indexes(), Some(3), "a dropped column is fine");
        let dropped = emit("a");
        assert!(holds(&format!(
            "SELECT seq > (SELECT seq FROM outbox.events WHERE id = '{after}') AND created_at = now()
             FROM outbox.events WHERE id = '{dropped}'"
        )));
        assert!(indexes_are_consistent());
    }

    #[pg_test]
    fn changed_defaults_and_typmods_are_written_through_sql() {
        Spi::run("ALTER TABLE outbox.events ALTER COLUMN created_at SET DEFAULT clock_timestamp()")
            .unwrap();
        assert_eq!(direct_indexes(), None);
        Spi::run("SELECT pg_sleep(0.01)").unwrap();
        let id = emit("a");
        assert!(
            holds(&format!(
                "SELECT created_at > now() FROM outbox.events WHERE id = '{id}'"
            )),
            "the changed default applies"
        );
        Spi::run(
            "ALTER TABLE outbox.events ALTER COLUMN created_at SET DEFAULT now();
             ALTER EXTENSION outbox_pg DROP VIEW outbox.status;
             ALTER EXTENSION outbox_pg DROP VIEW outbox.pending;
             ALTER EXTENSION outbox_pg DROP FUNCTION outbox.backlog();
             ALTER EXTENSION outbox_pg DROP FUNCTION outbox.queued();
             ALTER EXTENSION outbox_pg DROP VIEW outbox.dead_letters;
             DROP VIEW outbox.status; DROP FUNCTION outbox.backlog(); DROP VIEW outbox.pending, outbox.dead_letters;
             DROP FUNCTION outbox.queued();
             ALTER TABLE outbox.events ALTER COLUMN created_at TYPE timestamptz(0);",
        )
        .unwrap();
        assert_eq!(direct_indexes(), None, "a typmod: the SQL path");
        let id = emit("a");
        assert!(holds(&format!(
            "SELECT created_at = date_trunc('second', created_at) FROM outbox.events WHERE id = '{id}'"
        )), "the typmod applies");
        Spi::run(
            "DELETE FROM outbox.events; ALTER TABLE outbox.events ALTER COLUMN topic SET NOT NULL",
        )
        .unwrap();
        Spi::run(
            "CREATE FUNCTION pg_temp.refused() RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN PERFORM outbox.emit('t', 'a', '{}'); RETURN false;
             EXCEPTION WHEN not_null_violation THEN RETURN true; END $$",
        )
        .unwrap();
        assert!(
            holds("SELECT pg_temp.refused()"),
            "NOT NULL on topic is enforced"
        );
    }

    #[pg_test]
    fn a_table_missing_a_column_refuses_emit_instead_of_dropping_an_argument() {
        Spi::run(
            "ALTER EXTENSION outbox_pg DROP VIEW outbox.status;
             ALTER EXTENSION outbox_pg DROP VIEW outbox.pending;
             ALTER EXTENSION outbox_pg DROP FUNCTION outbox.backlog();
             ALTER EXTENSION outbox_pg DROP FUNCTION outbox.queued();
             ALTER EXTENSION outbox_pg DROP VIEW outbox.dead_letters;
             DROP VIEW outbox.status; DROP FUNCTION outbox.backlog(); DROP VIEW outbox.pending, outbox.dead_letters;
             DROP FUNCTION outbox.queued();
             ALTER TABLE outbox.events DROP COLUMN headers;",
        )
        .unwrap();
        assert_eq!(direct_indexes(), None);
        Spi::run(
            "CREATE FUNCTION pg_temp.refused() RETURNS text LANGUAGE plpgsql AS $$
             BEGIN PERFORM outbox.emit('t', 'a', '{}', '{\"h\": \"v\"}'); RETURN 'accepted';
             EXCEPTION WHEN undefined_column THEN RETURN SQLERRM; END $$",
        )
        .unwrap();
        let outcome = Spi::get_one::<String>("SELECT pg_temp.refused()")
            .unwrap()
            .unwrap();
        assert!(outcome.contains("headers"), "{outcome}");
    }

    #[pg_test]
    fn indexes_someone_adds_are_maintained() {
        Spi::run(
            "CREATE INDEX by_type ON outbox.events (event_type) INCLUDE (created_at);
             CREATE UNIQUE INDEX by_id_again ON outbox.events (id);",
        )
        .unwrap();
        assert_eq!(direct_indexes(), Some(5));
        let plain = emit("plain");
        // A predicate, an expression, and a non-btree index: the executor's route.
        Spi::run(
            "CREATE INDEX only_a ON outbox.events (seq) WHERE aggregate_id = 'a';
             CREATE INDEX by_payload ON outbox.events USING gin (payload);",
        )
        .unwrap();
        assert_eq!(direct_indexes(), Some(0));
        let general = emit("a");
        let other = emit("b");
        assert!(indexes_are_consistent());
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        assert!(holds(&format!(
            "SELECT array_agg(id ORDER BY seq) = ARRAY['{plain}', '{general}', '{other}']::uuid[]
             FROM outbox.events WHERE event_type = 'order.created'"
        )));
        assert!(holds(
            "SELECT count(*) = 3 FROM outbox.events WHERE payload @> '{\"n\": 1}'"
        ));
        assert!(holds(&format!(
            "SELECT array_agg(id) = ARRAY['{general}']::uuid[] FROM outbox.events WHERE aggregate_id = 'a'"
        )));
    }

    #[pg_test]
    fn an_index_function_runs_with_the_pinned_search_path_not_the_callers() {
        // A superuser indexes payloads with a SQL function that names lower() unqualified. A
        // role with its own schema first in its search_path plants a look-alike lower().
        Spi::run(
            "CREATE TABLE public.canary (what text);
             CREATE FUNCTION public.tenant(p jsonb) RETURNS text IMMUTABLE LANGUAGE sql
                 AS $$ SELECT lower(p->>'tenant') $$;
             CREATE INDEX by_tenant ON outbox.events (public.tenant(payload));
             CREATE ROLE mallory_index;
             CREATE SCHEMA mallory AUTHORIZATION mallory_index;
             GRANT INSERT ON public.canary TO mallory_index;
             SET ROLE mallory_index;
             CREATE FUNCTION mallory.lower(text) RETURNS text LANGUAGE sql
                 AS $$ INSERT INTO public.canary VALUES ('lower ran as ' || current_user) RETURNING 'x' $$;
             SET search_path = mallory, pg_catalog, public;
             SELECT outbox.emit('t', 'a', '{\"tenant\": \"ACME\"}');
             RESET search_path;
             RESET ROLE;",
        )
        .unwrap();
        assert!(
            holds("SELECT count(*) = 0 FROM public.canary"),
            "no look-alike ran"
        );
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        assert!(holds(
            "SELECT count(*) = 1 FROM outbox.events WHERE public.tenant(payload) = 'acme'"
        ));
    }

    /// Within one transaction, so the emit path's cached view of the table must be forgotten
    /// mid-transaction. (make pgtest runs the tests one at a time: DROP EXTENSION beside another
    /// test's transaction deadlocks.)
    #[pg_test]
    fn emit_works_after_the_extension_is_dropped_and_created_again() {
        emit("before");
        Spi::run("DROP EXTENSION outbox_pg CASCADE; CREATE EXTENSION outbox_pg;").unwrap();
        let id = emit("after");
        assert!(holds(&format!(
            "SELECT count(*) = 1 FROM outbox.events WHERE id = '{id}'"
        )));
    }
}
