//! A thin layer over SPI for the worker's statements: plans prepared once and kept for the
//! worker's life, arguments as datums of the declared types, rows read as raw datums (text is
//! read as bytes in the database's encoding; pgrx's `String` conversion assumes UTF-8).
//!
//! Everything here runs on the worker's main thread inside a transaction.

use std::ffi::{c_char, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Runs `f` inside an SPI connection.
pub fn connected<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the worker's main thread inside a transaction may connect to SPI; the connection
    // is closed below (or by transaction abort if `f` raises an error).
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            pgrx::error!("outbox_pg: SPI_connect failed");
        }
    }
    let result = f();
    // SAFETY: closes the connection opened above.
    unsafe { pg_sys::SPI_finish() };
    result
}

/// A statement prepared once, kept across transactions (SPI_keepplan); Postgres revalidates it
/// after DDL.
pub struct Plan {
    plan: pg_sys::SPIPlanPtr,
    arguments: usize,
}

impl Plan {
    /// Prepares `sql` with arguments of `types`. Inside [`connected`].
    pub fn prepare(sql: &str, types: &[pg_sys::Oid]) -> Plan {
        let sql = CString::new(sql).expect("statements have no NUL");
        let mut types = types.to_vec();
        // SAFETY: inside an SPI connection; the plan is moved out of the connection's context
        // by SPI_keepplan.
        unsafe {
            let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
            if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                pgrx::error!(
                    "outbox_pg: cannot prepare a statement: {}",
                    sql.to_string_lossy()
                );
            }
            Plan {
                plan,
                arguments: types.len(),
            }
        }
    }

    /// Runs the statement. Inside [`connected`]; `read_only` statements see the transaction's
    /// current snapshot.
    pub fn run(&self, arguments: &[Arg], read_only: bool) -> Rows {
        assert_eq!(arguments.len(), self.arguments, "argument count");
        let mut values: Vec<pg_sys::Datum> = arguments.iter().map(Arg::datum).collect();
        let nulls: Vec<c_char> = arguments
            .iter()
            .map(|a| if a.is_null() { b'n' } else { b' ' } as c_char)
            .collect();
        // SAFETY: inside an SPI connection; values and nulls match the plan's arguments.
        unsafe {
            pg_sys::SPI_tuptable = std::ptr::null_mut();
            let code = pg_sys::SPI_execute_plan(
                self.plan,
                values.as_mut_ptr(),
                nulls.as_ptr(),
                read_only,
                0,
            );
            if code < 0 {
                pgrx::error!("outbox_pg: a statement failed (SPI code {code})");
            }
            Rows {
                table: pg_sys::SPI_tuptable,
                count: pg_sys::SPI_processed as usize,
            }
        }
    }
}

/// One argument.
pub enum Arg {
    Null,
    Value(pg_sys::Datum),
}

impl Arg {
    fn datum(&self) -> pg_sys::Datum {
        match self {
            Arg::Null => pg_sys::Datum::from(0),
            Arg::Value(datum) => *datum,
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Arg::Null)
    }

    pub fn int8(value: i64) -> Arg {
        Arg::Value(pg_sys::Datum::from(value))
    }

    pub fn boolean(value: bool) -> Arg {
        Arg::Value(pg_sys::Datum::from(value))
    }

    /// An xid8: 64 bits by value, as int8.
    pub fn xid8(value: u64) -> Arg {
        Arg::Value(pg_sys::Datum::from(value))
    }

    pub fn uuid(id: uuid::Uuid) -> Arg {
        Arg::from_into(pgrx::Uuid::from_bytes(*id.as_bytes()))
    }

    /// A `pg_snapshot` from its text form (`xmin:xmax:xip,...`).
    pub fn snapshot(text: &str) -> Arg {
        let text = CString::new(text).expect("snapshots have no NUL");
        // SAFETY: pg_snapshot_in parses a C string into a palloc'd pg_snapshot.
        let datum = unsafe {
            pgrx::direct_function_call_as_datum(
                pg_sys::pg_snapshot_in,
                &[Some(pg_sys::Datum::from(text.as_ptr()))],
            )
        };
        datum.map_or(Arg::Null, Arg::Value)
    }

    /// Any value pgrx can turn into a datum (arrays, text made of ASCII or already-escaped
    /// strings).
    pub fn from_into<T: IntoDatum>(value: T) -> Arg {
        value.into_datum().map_or(Arg::Null, Arg::Value)
    }
}

/// The rows a statement returned; freed when dropped.
pub struct Rows {
    table: *mut pg_sys::SPITupleTable,
    count: usize,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.count
    }

    /// The raw datum at `row` (0-based), `column` (1-based); None for NULL.
    pub fn datum(&self, row: usize, column: i32) -> Option<pg_sys::Datum> {
        assert!(
            row < self.count && !self.table.is_null(),
            "row {row} exists"
        );
        // SAFETY: the tuple table holds `count` tuples described by its tupdesc.
        unsafe {
            let tuple = *(*self.table).vals.add(row);
            let mut is_null = false;
            let datum = pg_sys::SPI_getbinval(tuple, (*self.table).tupdesc, column, &mut is_null);
            (!is_null).then_some(datum)
        }
    }

    pub fn int8(&self, row: usize, column: i32) -> Option<i64> {
        self.datum(row, column).map(|d| d.value() as i64)
    }

    pub fn int4(&self, row: usize, column: i32) -> Option<i32> {
        self.datum(row, column).map(|d| d.value() as i32)
    }

    pub fn boolean(&self, row: usize, column: i32) -> Option<bool> {
        self.datum(row, column).map(|d| d.value() != 0)
    }

    pub fn uuid(&self, row: usize, column: i32) -> Option<uuid::Uuid> {
        // SAFETY: a uuid datum points at 16 bytes.
        self.datum(row, column)
            .map(|d| uuid::Uuid::from_bytes(unsafe { *d.cast_mut_ptr::<[u8; 16]>() }))
    }

    /// A text column's bytes, in the database's encoding.
    pub fn bytes(&self, row: usize, column: i32) -> Option<&[u8]> {
        // SAFETY: a text datum; the detoasted copy lives in SPI's memory until the rows go.
        self.datum(row, column).map(|d| unsafe {
            pgrx::varlena::varlena_to_byte_slice(pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr()))
        })
    }

    /// A text column known to be ASCII (a number, a ctid, a snapshot), as a String.
    pub fn ascii(&self, row: usize, column: i32) -> Option<String> {
        self.bytes(row, column)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

impl Drop for Rows {
    fn drop(&mut self) {
        if !self.table.is_null() {
            // SAFETY: the table was returned by SPI_execute_plan in this SPI connection.
            unsafe { pg_sys::SPI_freetuptable(self.table) };
        }
    }
}
