//! `outbox.stamp_event()`: the BEFORE INSERT trigger on `outbox.events` for rows that do not come
//! from emit() (emit() sets the same columns itself): a superuser's INSERT or COPY, a restore,
//! logical replication.
//!
//! - `xid` becomes the writing transaction, whatever the row said (a dumped row carries the
//!   xid of another cluster). Under `session_replication_role = replica` (a logical-replication
//!   apply worker, or `pg_restore --disable-triggers`-style sessions) it becomes NULL unless
//!   `outbox.publish_replicated` is on: the publisher publishes those events.
//! - `message_bytes`, if NULL, is measured as emit() would.

use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_pg_core::envelope::{self, MessageParts};
use outbox_pg_core::event::Timestamp;

use crate::api::v1_function_info;
use crate::{encoding, guc, message_size};

v1_function_info!(pg_finfo_outbox_stamp_event);

/// Trigger entry point. Runs in the inserting backend, inside its transaction, once per row.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_stamp_event(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: Postgres calls a trigger function with a TriggerData context; the table and the
    // new tuple are valid for the duration of the call.
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            pgrx::error!("outbox.stamp_event() may only be called as a trigger");
        }
        let trigger = context.cast::<pg_sys::TriggerData>();
        let tuple = (*trigger).tg_trigtuple;
        let desc = (*(*trigger).tg_relation).rd_att;
        let column = |name: &std::ffi::CStr| pg_sys::SPI_fnumber(desc, name.as_ptr());
        let (xid_column, bytes_column) = (column(c"xid"), column(c"message_bytes"));
        if xid_column <= 0 || bytes_column <= 0 {
            return pg_sys::Datum::from(tuple);
        }

        let replicated = pg_sys::SessionReplicationRole
            == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32
            && !guc::PUBLISH_REPLICATED.get();
        let mut columns = vec![xid_column];
        let mut values = vec![if replicated {
            pg_sys::Datum::from(0)
        } else {
            pg_sys::Datum::from(pg_sys::GetTopFullTransactionId().value)
        }];
        let mut nulls = vec![replicated];
        let mut is_null = false;
        pg_sys::heap_getattr(tuple, bytes_column, desc, &mut is_null);
        if is_null {
            columns.push(bytes_column);
            values.push(pg_sys::Datum::from(measure(tuple, desc)));
            nulls.push(false);
        }
        let stamped = pg_sys::heap_modify_tuple_by_cols(
            tuple,
            desc,
            columns.len() as i32,
            columns.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
        );
        pg_sys::Datum::from(stamped)
    }
}

/// The message size emit() would have recorded for this row. A text the worker could not send
/// as UTF-8 refuses the row.
///
/// SAFETY: `tuple` is a row of outbox.events described by `desc`.
unsafe fn measure(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) -> i32 {
    let get = |name: &std::ffi::CStr| -> Option<pg_sys::Datum> {
        // SAFETY: per the contract.
        unsafe {
            let number = pg_sys::SPI_fnumber(desc, name.as_ptr());
            if number <= 0 {
                return None;
            }
            let mut is_null = false;
            let datum = pg_sys::heap_getattr(tuple, number, desc, &mut is_null);
            (!is_null).then_some(datum)
        }
    };
    let text_len = |name: &std::ffi::CStr| -> usize {
        get(name).map_or(0, |datum| {
            // SAFETY: a non-NULL text datum of the row.
            let bytes = unsafe {
                pgrx::varlena::varlena_to_byte_slice(pg_sys::pg_detoast_datum_packed(
                    datum.cast_mut_ptr(),
                ))
            };
            encoding::utf8_len(bytes).unwrap_or_else(|reason| refuse(name, &reason))
        })
    };
    // SAFETY: a non-NULL jsonb datum of the row.
    let payload = get(c"payload").map_or(Ok(Some(4)), |payload| unsafe {
        message_size::json_text_bytes(payload, usize::MAX)
    });
    let payload = payload
        .unwrap_or_else(|reason| refuse(c"payload", &reason))
        .unwrap_or(0);
    // SAFETY: a non-NULL jsonb datum of the row.
    let headers = get(c"headers").map_or(0, |headers| unsafe {
        message_size::string_object_bytes(headers)
            .unwrap_or_else(|reason| refuse(c"headers", &reason))
    });
    let created_at = get(c"created_at").map_or(0, |datum| {
        Timestamp::from_postgres(datum.value() as i64)
            .rfc3339()
            .len()
    });
    let parts = MessageParts {
        key: text_len(c"aggregate_id"),
        event_type: text_len(c"event_type"),
        payload,
        created_at,
        user_headers: headers,
    };
    let database = {
        // SAFETY: MyDatabaseId is set in a connected backend; the name is a palloc'd copy.
        let name = unsafe { pg_sys::get_database_name(pg_sys::MyDatabaseId) };
        if name.is_null() {
            String::new()
        } else {
            // SAFETY: a NUL-terminated name.
            unsafe { std::ffi::CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let size = envelope::message_bytes(parts, &guc::message_format(&database));
    i32::try_from(size).unwrap_or(i32::MAX)
}

fn refuse(column: &std::ffi::CStr, reason: &str) -> ! {
    pgrx::ereport!(
        PgLogLevel::ERROR,
        PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
        format!(
            "outbox.events: {} cannot be sent as UTF-8: {reason}",
            column.to_string_lossy()
        ),
        "Kafka messages are UTF-8; in a SQL_ASCII database every text must already be UTF-8."
    );
    unreachable!("an ERROR report does not return")
}
