//! Appending one event row to `outbox.events`: the write half of emit().
//!
//! The extension owns the table, so emit() writes the row the way Postgres writes catalog rows:
//! form the tuple, `heap_insert` it, insert its index entries. That skips what a one-row INSERT
//! costs through SPI and the executor (plan revalidation, a fresh snapshot, executor start and
//! end, every index opened and every partial-index predicate compiled on each call), which was
//! most of emit()'s own time.
//!
//! The direct path is taken only while the table is exactly what our SQL scripts created: a plain
//! table with the columns below and no triggers, rules, CHECK constraints or generated columns.
//! Anything else (a trigger someone added, a column from a newer script this library does not
//! know) falls back to a prepared INSERT through SPI, which honours all of it.
//!
//! A fresh row always starts with the same values in the columns the worker changes later
//! (`published_at`, `publish_attempts`, `next_attempt_at`, ...), and the partial indexes select
//! rows by those columns. So which indexes a fresh row enters is decided once per table layout,
//! by evaluating each predicate on a fresh row; each emit() then opens and inserts into just
//! those (the primary key and `events_pending`). An index that does not fit that model (not a
//! btree, an expression, a predicate on the row's own values, a deferrable or exclusion
//! constraint) sends index maintenance through the executor's general routine instead.

use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// One event row as emit() writes it; every other column takes its default.
pub struct EventRow<'a> {
    pub id: uuid::Uuid,
    pub event_type: &'a str,
    pub aggregate_id: &'a str,
    /// The caller's jsonb datum, stored as given (no detoast, no re-serialisation).
    pub payload: pg_sys::Datum,
    pub headers: Option<pg_sys::Datum>,
    pub topic: Option<&'a str>,
}

/// Writes `row` into `outbox.events` in the current transaction.
pub fn append(row: &EventRow) {
    let table = EventsTable::current();
    match table.layout {
        Some(ref layout) if table.is_plain() => unsafe {
            // SAFETY: called from emit() inside a transaction; `table` was just looked up and
            // locked, and `layout` was read from this relation's current descriptor and indexes.
            insert_directly(&table, layout, row)
        },
        _ => {
            table.close();
            insert_through_spi(row);
        }
    }
}

/// The columns emit() fills or defaults, by name. A column not listed here sends emit() to the
/// SPI path, whose INSERT applies that column's default.
#[derive(Clone, Copy, PartialEq)]
enum Column {
    Id,
    EventType,
    AggregateId,
    Payload,
    CreatedAt,
    /// Starts at 0 in every fresh row.
    PublishAttempts,
    Seq,
    Topic,
    Headers,
    /// Columns that start NULL: published_at, error, next_attempt_at, kafka_partition, kafka_offset.
    StartsNull,
    /// A column dropped by an upgrade script; its slot in the tuple stays NULL.
    Dropped,
}

impl Column {
    fn named(name: &str) -> Option<Column> {
        Some(match name {
            "id" => Column::Id,
            "event_type" => Column::EventType,
            "aggregate_id" => Column::AggregateId,
            "payload" => Column::Payload,
            "created_at" => Column::CreatedAt,
            "publish_attempts" => Column::PublishAttempts,
            "seq" => Column::Seq,
            "topic" => Column::Topic,
            "headers" => Column::Headers,
            "published_at" | "error" | "next_attempt_at" | "kafka_partition" | "kafka_offset" => {
                Column::StartsNull
            }
            _ => return None,
        })
    }

    /// True for the columns whose value is the same in every fresh row.
    fn same_in_every_fresh_row(self) -> bool {
        matches!(self, Column::PublishAttempts | Column::StartsNull)
    }

    /// True if the attribute is what the direct path writes into this column: the type of the
    /// datum it forms, and for a column it may leave NULL, no NOT NULL and no default that the
    /// SQL INSERT would have applied.
    fn fits(self, attribute: &pg_sys::FormData_pg_attribute) -> bool {
        let may_be_null = !attribute.attnotnull && !attribute.atthasdef;
        match self {
            Column::Id => attribute.atttypid == pg_sys::UUIDOID,
            Column::EventType | Column::AggregateId => attribute.atttypid == pg_sys::TEXTOID,
            Column::Payload => attribute.atttypid == pg_sys::JSONBOID,
            Column::CreatedAt => attribute.atttypid == pg_sys::TIMESTAMPTZOID,
            Column::PublishAttempts => attribute.atttypid == pg_sys::INT4OID,
            Column::Seq => attribute.atttypid == pg_sys::INT8OID,
            Column::Topic => attribute.atttypid == pg_sys::TEXTOID && may_be_null,
            Column::Headers => attribute.atttypid == pg_sys::JSONBOID && may_be_null,
            Column::StartsNull => may_be_null,
            Column::Dropped => true,
        }
    }
}

/// What the direct path needs to know about the table, read once per backend and forgotten
/// whenever Postgres invalidates the table's or one of its indexes' relcache entries (DDL,
/// CREATE INDEX CONCURRENTLY's phases, DROP EXTENSION, upgrades).
#[derive(Clone)]
struct Layout {
    relid: pg_sys::Oid,
    /// The identity sequence behind `seq`.
    seq_relid: pg_sys::Oid,
    columns: Vec<Column>,
    /// Every index of the table, ready or not: an invalidation of any of them forgets the layout.
    index_oids: Vec<pg_sys::Oid>,
    indexing: Indexing,
}

/// How a fresh row's index entries are made.
#[derive(Clone)]
enum Indexing {
    /// Every index fits the fresh-row model; these are the ones a fresh row enters.
    Entered(Vec<EnteredIndex>),
    /// Some index does not: the executor's routine opens all of them and checks each predicate.
    Executor,
}

/// A plain-column btree index that every fresh row enters.
#[derive(Clone)]
struct EnteredIndex {
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
}

/// Relcache invalidation callback: forgets the layout when the events table or one of its
/// indexes changes (InvalidOid: everything changed). Runs in this backend only, while it
/// processes invalidation messages; it must not touch the catalogs, so it only clears a cache.
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
}

/// `outbox.events`, opened with RowExclusiveLock for this transaction.
struct EventsTable {
    rel: pg_sys::Relation,
    /// None when the table has a column emit() does not know, or no identity sequence.
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
        let cached = LAYOUT.with(|layout| layout.borrow().clone());
        let relid = match &cached {
            Some(layout) => layout.relid,
            None => events_relid(),
        };
        // SAFETY: inside a transaction; the lock is held until it ends (closed with NoLock).
        // Locking processes pending invalidations, so a stale cached layout is forgotten here.
        let rel = unsafe { pg_sys::table_open(relid, pg_sys::RowExclusiveLock as i32) };
        let layout = LAYOUT.with(|layout| layout.borrow().clone()).or_else(|| {
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
    fn is_plain(&self) -> bool {
        // SAFETY: `rel` is open and locked; these fields are read-only relcache data.
        unsafe {
            let class = &*(*self.rel).rd_rel;
            let constraints = (*(*self.rel).rd_att).constr;
            class.relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char
                && class.relam == pg_sys::HEAP_TABLE_AM_OID
                && !class.relispartition
                && !class.relhasrules
                && !class.relrowsecurity
                && (*self.rel).trigdesc.is_null()
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

/// Reads which column is where and which indexes a fresh row enters; None if the table has a
/// column emit() does not know.
///
/// SAFETY: `rel` is open and locked.
unsafe fn read_layout(rel: pg_sys::Relation) -> Option<Layout> {
    // SAFETY: per the contract, the relation and its tuple descriptor are valid.
    let (relid, desc) = unsafe { ((*rel).rd_id, &*(*rel).rd_att) };
    let attributes = unsafe { desc.attrs.as_slice(desc.natts as usize) };
    let mut columns = Vec::with_capacity(attributes.len());
    let mut seq_attnum = None;
    for attribute in attributes {
        let column = if attribute.attisdropped {
            Column::Dropped
        } else {
            Column::named(pgrx::name_data_to_str(&attribute.attname))?
        };
        if !column.fits(attribute) {
            return None;
        }
        if column == Column::Seq {
            seq_attnum = Some(attribute.attnum);
        }
        columns.push(column);
    }
    // SAFETY: a catalog lookup inside a transaction; missing_ok returns InvalidOid.
    let seq_relid = unsafe { pg_sys::getIdentitySequence(relid, seq_attnum?, true) };
    if seq_relid == pg_sys::InvalidOid {
        return None;
    }
    // SAFETY: `rel` is open and locked.
    let (index_oids, indexing) = unsafe { read_indexing(rel, &columns) };
    Some(Layout {
        relid,
        seq_relid,
        columns,
        index_oids,
        indexing,
    })
}

/// Lists the table's indexes and decides which of them a fresh row enters.
///
/// SAFETY: `rel` is open and locked; `columns` describes its attributes.
unsafe fn read_indexing(rel: pg_sys::Relation, columns: &[Column]) -> (Vec<pg_sys::Oid>, Indexing) {
    // SAFETY: the index list of an open relation is a valid List of oids.
    let index_oids: Vec<pg_sys::Oid> = unsafe {
        let list = pg_sys::RelationGetIndexList(rel);
        (0..pg_sys::list_length(list))
            .map(|i| pg_sys::list_nth_oid(list, i))
            .collect()
    };
    let mut entered = Vec::new();
    for &oid in &index_oids {
        // SAFETY: the table's lock keeps its indexes from being dropped; same lock as INSERT.
        let index = unsafe { pg_sys::index_open(oid, pg_sys::RowExclusiveLock as i32) };
        // SAFETY: `index` is open; `rel` is its open, locked table.
        let fit = unsafe { fresh_row_fit(index, rel, columns) };
        // SAFETY: opened above; the lock is kept, as the executor does.
        unsafe { pg_sys::index_close(index, pg_sys::NoLock as i32) };
        match fit {
            FreshRowFit::Enters(index) => entered.push(index),
            FreshRowFit::Skips => {}
            FreshRowFit::Unknown => return (index_oids, Indexing::Executor),
        }
    }
    (index_oids, Indexing::Entered(entered))
}

enum FreshRowFit {
    Enters(EnteredIndex),
    Skips,
    /// The index does not fit the fresh-row model.
    Unknown,
}

/// Decides whether every fresh row enters `index`, by evaluating its predicate on a fresh row.
///
/// SAFETY: `index` is an open index of `rel`, which is open and locked.
unsafe fn fresh_row_fit(
    index: pg_sys::Relation,
    rel: pg_sys::Relation,
    columns: &[Column],
) -> FreshRowFit {
    // SAFETY: an open index's pg_index row and relcache fields are valid while it is open.
    unsafe {
        let form = &*(*index).rd_index;
        if !form.indisready {
            // Being built concurrently: not ready for entries yet. Its relcache invalidation
            // when it becomes ready forgets this layout.
            return FreshRowFit::Skips;
        }
        let plain_btree = (*(*index).rd_rel).relam == pg_sys::BTREE_AM_OID
            && !form.indisexclusion
            && (form.indimmediate || !form.indisunique)
            && pg_sys::RelationGetIndexExpressions(index).is_null();
        if !plain_btree {
            return FreshRowFit::Unknown;
        }
        let attnums = form.indkey.values.as_slice(form.indnatts as usize);
        let Some(positions) = attnums
            .iter()
            .map(|&attnum| usize::try_from(attnum - 1).ok())
            .collect::<Option<Vec<usize>>>()
        else {
            return FreshRowFit::Unknown;
        };
        let predicate = pg_sys::RelationGetIndexPredicate(index);
        let enters = if predicate.is_null() {
            true
        } else {
            match fresh_row_satisfies(predicate, rel, columns) {
                Some(enters) => enters,
                None => return FreshRowFit::Unknown,
            }
        };
        if !enters {
            return FreshRowFit::Skips;
        }
        FreshRowFit::Enters(EnteredIndex {
            oid: (*index).rd_id,
            unique: form.indisunique,
            nulls_not_distinct: form.indnullsnotdistinct,
            key_count: form.indnkeyatts as i32,
            columns: positions,
        })
    }
}

/// Evaluates an index predicate on a fresh row; None if it reads a column whose value differs
/// between fresh rows (then only the executor can decide, row by row).
///
/// SAFETY: `predicate` is an index predicate (implicit-AND list) of an index of `rel`, which
/// is open and locked.
unsafe fn fresh_row_satisfies(
    predicate: *mut pg_sys::List,
    rel: pg_sys::Relation,
    columns: &[Column],
) -> Option<bool> {
    // SAFETY: pull_varattnos walks a valid expression tree; the predicate's Vars are varno 1.
    let reads_only_fresh_constants = unsafe {
        let mut attnos: *mut pg_sys::Bitmapset = std::ptr::null_mut();
        pg_sys::pull_varattnos(predicate.cast(), 1, &mut attnos);
        let mut member = -1;
        let mut fits = true;
        loop {
            member = pg_sys::bms_next_member(attnos, member);
            if member < 0 {
                break;
            }
            let attnum = member + pg_sys::FirstLowInvalidHeapAttributeNumber;
            let column = usize::try_from(attnum - 1)
                .ok()
                .and_then(|i| columns.get(i));
            fits &= column.is_some_and(|c| c.same_in_every_fresh_row());
        }
        fits
    };
    if !reads_only_fresh_constants {
        return None;
    }
    // SAFETY: a throwaway executor state for one evaluation, freed before returning; the slot
    // holds a fresh row's constant columns (the predicate reads nothing else).
    unsafe {
        let estate = pg_sys::CreateExecutorState();
        let previous = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
        let slot = pg_sys::MakeSingleTupleTableSlot((*rel).rd_att, &pg_sys::TTSOpsVirtual);
        for (i, column) in columns.iter().enumerate() {
            let attempts = *column == Column::PublishAttempts;
            *(*slot).tts_values.add(i) = pg_sys::Datum::from(0);
            *(*slot).tts_isnull.add(i) = !attempts;
        }
        pg_sys::ExecStoreVirtualTuple(slot);
        let econtext = pg_sys::MakePerTupleExprContext(estate);
        (*econtext).ecxt_scantuple = slot;
        let qual = pg_sys::ExecPrepareQual(predicate, estate);
        pg_sys::MemoryContextSwitchTo((*econtext).ecxt_per_tuple_memory);
        let evaluate = (*qual)
            .evalfunc
            .expect("a prepared qual has an evaluation function");
        let mut is_null = false;
        let result = evaluate(qual, econtext, &mut is_null);
        pg_sys::MemoryContextSwitchTo(previous);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::FreeExecutorState(estate);
        Some(!is_null && result.value() != 0)
    }
}

/// Forms the tuple and inserts it into the heap (which toasts large payloads as usual), then
/// makes its index entries: into the indexes a fresh row enters, or through the executor.
///
/// SAFETY: inside a transaction; `table` is open and locked and `layout` describes it.
unsafe fn insert_directly(table: &EventsTable, layout: &Layout, row: &EventRow) {
    let mut values = vec![pg_sys::Datum::from(0); layout.columns.len()];
    let mut nulls = vec![true; layout.columns.len()];
    for (i, column) in layout.columns.iter().enumerate() {
        let value = match column {
            Column::Id => Some(uuid_datum(row.id)),
            Column::EventType => Some(text_datum(row.event_type)),
            Column::AggregateId => Some(text_datum(row.aggregate_id)),
            Column::Payload => Some(row.payload),
            // The default of created_at is now(): the transaction's start.
            // SAFETY: inside a transaction.
            Column::CreatedAt => {
                unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }.into_datum()
            }
            Column::PublishAttempts => 0i32.into_datum(),
            Column::Seq => Some(next_seq(layout.seq_relid)),
            Column::Topic => row.topic.map(text_datum),
            Column::Headers => row.headers,
            Column::StartsNull | Column::Dropped => None,
        };
        if let Some(value) = value {
            values[i] = value;
            nulls[i] = false;
        }
    }
    // SAFETY: per the contract; values and nulls have one entry per attribute of the table.
    unsafe {
        match &layout.indexing {
            Indexing::Entered(indexes) => {
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
            Indexing::Executor => insert_with_executor(table.rel, &values, &nulls),
        }
        pg_sys::table_close(table.rel, pg_sys::NoLock as i32);
    }
}

/// Inserts the entry for the heap tuple at `tid` into one index a fresh row enters, with the
/// uniqueness check a unique index asks for.
///
/// SAFETY: inside a transaction; `rel` is open and locked; `tid` is the new tuple's location and
/// `values`/`nulls` its columns.
unsafe fn insert_index_entry(
    rel: pg_sys::Relation,
    index: &EnteredIndex,
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
        let info = pg_sys::makeIndexInfo(
            index.columns.len() as i32,
            index.key_count,
            pg_sys::BTREE_AM_OID,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            index.unique,
            index.nulls_not_distinct,
            true,
            false,
        );
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

/// The general route for index maintenance: the executor opens every index and evaluates each
/// predicate for this row.
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
        pg_sys::ExecInsertIndexTuples(
            result,
            slot,
            estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );

        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::ExecCloseIndices(result);
        pg_sys::FreeExecutorState(estate);
    }
}

fn text_datum(text: &str) -> pg_sys::Datum {
    text.into_datum().expect("text is never NULL")
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
    (id, event_type, aggregate_id, payload, headers, topic) VALUES ($1, $2, $3, $4, $5, $6)";

thread_local! {
    /// This backend's saved plan for INSERT_EVENT; plancache revalidates it after DDL.
    static INSERT_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

/// The general path: a prepared INSERT through SPI, which fires triggers, checks constraints
/// and applies every column default.
fn insert_through_spi(row: &EventRow) {
    let absent = pg_sys::Datum::from(0);
    let mut values = [
        uuid_datum(row.id),
        text_datum(row.event_type),
        text_datum(row.aggregate_id),
        row.payload,
        row.headers.unwrap_or(absent),
        row.topic.map(text_datum).unwrap_or(absent),
    ];
    let null = |absent: bool| if absent { b'n' } else { b' ' } as std::ffi::c_char;
    let nulls = [
        null(false),
        null(false),
        null(false),
        null(false),
        null(row.headers.is_none()),
        null(row.topic.is_none()),
    ];
    // SAFETY: called from a SQL function inside a transaction, the only place SPI may connect;
    // values and nulls have exactly the six entries the plan declares. The search path pushed
    // here is popped below, or by transaction abort if the insert raises an error.
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            pgrx::error!("outbox.emit: SPI_connect failed");
        }
        // emit() runs with its owner's rights: resolve names in pg_catalog only, never in the
        // caller's schemas or pg_temp. The plan keeps this path; Postgres replans only if the
        // active path differs, so it is pushed on every call.
        let mut catalog_only = pg_sys::OverrideSearchPath {
            schemas: std::ptr::null_mut(),
            addCatalog: true,
            addTemp: false,
            generation: 0,
        };
        pg_sys::PushOverrideSearchPath(&mut catalog_only);
        let plan = INSERT_PLAN.with(|cell| {
            if cell.get().is_null() {
                let mut types = [
                    pg_sys::UUIDOID,
                    pg_sys::TEXTOID,
                    pg_sys::TEXTOID,
                    pg_sys::JSONBOID,
                    pg_sys::JSONBOID,
                    pg_sys::TEXTOID,
                ];
                let plan = pg_sys::SPI_prepare(INSERT_EVENT.as_ptr(), 6, types.as_mut_ptr());
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
        pg_sys::PopOverrideSearchPath();
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
    /// rows its predicate selects, no more, no fewer.
    fn indexes_are_consistent() -> bool {
        Spi::run("CREATE EXTENSION IF NOT EXISTS amcheck").unwrap();
        holds(
            "SELECT count(*) > 0 AND bool_and(checked IS NOT NULL) FROM (
               SELECT bt_index_check(c.oid, true)::text IS NULL AS checked
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
               WHERE i.indrelid = 'outbox.events'::regclass AND am.amname = 'btree') each_index",
        )
    }

    #[pg_test]
    fn the_shipped_table_takes_the_direct_path() {
        let table = super::EventsTable::current();
        let plain = table.is_plain();
        let entered = match table.layout.as_deref() {
            Some(super::Layout {
                indexing: super::Indexing::Entered(indexes),
                ..
            }) => indexes.len(),
            _ => 0,
        };
        table.close();
        assert!(plain);
        // The primary key and events_pending; never the retry or dead-letter indexes.
        assert_eq!(entered, 2);
    }

    #[pg_test]
    fn direct_insert_maintains_every_index() {
        Spi::run(
            "SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 300) g;
             UPDATE outbox.events SET published_at = now() WHERE seq % 3 = 0;
             UPDATE outbox.events SET publish_attempts = 1, next_attempt_at = now() WHERE seq % 3 = 1;",
        )
        .unwrap();
        let id = emit("after-updates");
        assert!(indexes_are_consistent());
        Spi::run("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off").unwrap();
        assert!(holds(&format!(
            "SELECT count(*) = 1 FROM outbox.events WHERE id = '{id}'"
        )));
        assert!(holds(
            "SELECT count(*) = 101 FROM outbox.events WHERE published_at IS NULL AND publish_attempts = 0"
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
        let with_trigger = emit("a");
        Spi::run("DROP TRIGGER remember ON outbox.events").unwrap();
        let without_trigger = emit("a");
        assert!(holds(&format!(
            "SELECT array_agg(id) = ARRAY['{with_trigger}'::uuid] FROM public.seen"
        )));
        assert!(holds(&format!(
            "SELECT count(*) = 2 FROM outbox.events WHERE id IN ('{with_trigger}', '{without_trigger}')"
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
        let dropped = emit("a");
        assert!(holds(&format!(
            "SELECT seq > (SELECT seq FROM outbox.events WHERE id = '{after}')
                    AND publish_attempts = 0 AND created_at = now()
             FROM outbox.events WHERE id = '{dropped}'"
        )));
        assert!(indexes_are_consistent());
    }

    #[pg_test]
    fn columns_changed_by_hand_are_written_through_sql() {
        Spi::run(
            "ALTER TABLE outbox.events ALTER COLUMN error SET DEFAULT 'none yet';
             ALTER EXTENSION outbox_pg DROP VIEW outbox.status;
             ALTER EXTENSION outbox_pg DROP VIEW outbox.dead_letters;
             DROP VIEW outbox.status, outbox.dead_letters;
             ALTER TABLE outbox.events ALTER COLUMN publish_attempts TYPE bigint;",
        )
        .unwrap();
        let id = emit("a");
        assert!(holds(&format!(
            "SELECT error = 'none yet' AND publish_attempts = 0 FROM outbox.events WHERE id = '{id}'"
        )));
        Spi::run(
            "DELETE FROM outbox.events;
             ALTER TABLE outbox.events ALTER COLUMN topic SET NOT NULL;",
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
    fn indexes_someone_adds_are_maintained() {
        Spi::run(
            "CREATE INDEX by_type ON outbox.events (event_type) INCLUDE (created_at);
             CREATE UNIQUE INDEX by_seq ON outbox.events (seq);",
        )
        .unwrap();
        let plain = emit("plain");
        // A predicate on the row's own values, and a non-btree index: the executor's route.
        Spi::run(
            "CREATE INDEX only_a ON outbox.events (seq) WHERE aggregate_id = 'a';
             CREATE INDEX by_payload ON outbox.events USING gin (payload);",
        )
        .unwrap();
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
}
