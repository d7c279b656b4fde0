//! SQL functions users call. Their declarations (argument names, defaults, privileges) are in
//! `sql/api.sql`; the C-level entry points are here.
//!
//! `emit()` is written against the V1 calling convention directly so the payload `jsonb` datum goes
//! from the caller to the INSERT untouched: no detoast, no re-serialisation, no per-call planning.

use pgrx::fcinfo::{pg_arg_is_null, pg_getarg, pg_getarg_datum_raw};
use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::prelude::*;

use outbox_pg_core::envelope::{self, MessageParts};
use outbox_pg_core::event::Timestamp;
use outbox_pg_core::validate::{self, MAX_AGGREGATE_ID_BYTES, MAX_EVENT_TYPE_BYTES};

use crate::append::{self, EventRow};
use crate::error::Refusal;
use crate::{encoding, guc, message_size, wake};

/// Declares the V1 calling-convention record Postgres looks up for a C function.
macro_rules! v1_function_info {
    ($info:ident) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub extern "C" fn $info() -> &'static pg_sys::Pg_finfo_record {
            const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
pub(crate) use v1_function_info;

v1_function_info!(pg_finfo_outbox_emit_text);
v1_function_info!(pg_finfo_outbox_emit_uuid);
v1_function_info!(pg_finfo_outbox_emit_int8);

/// `outbox.emit(event_type text, aggregate_id text, payload jsonb, headers jsonb, topic text)`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_emit_text(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with a valid fcinfo whose argument 1 is text, per sql/api.sql.
    let aggregate_id = unsafe { text_argument(fcinfo, 1, "aggregate_id") };
    unsafe { emit(fcinfo, aggregate_id) }
}

/// `outbox.emit(event_type text, aggregate_id uuid, ...)`: the key is the canonical UUID text.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_emit_uuid(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with a valid fcinfo whose argument 1 is uuid, per sql/api.sql.
    let aggregate_id = unsafe { pg_getarg::<pgrx::Uuid>(fcinfo, 1) }
        .map(|u| TextArgument::from_ascii(u.to_string()));
    unsafe { emit(fcinfo, aggregate_id) }
}

/// `outbox.emit(event_type text, aggregate_id bigint, ...)`: smallint and integer ids arrive here
/// through Postgres' implicit casts; the key is the decimal text.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_emit_int8(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with a valid fcinfo whose argument 1 is bigint, per sql/api.sql.
    let aggregate_id =
        unsafe { pg_getarg::<i64>(fcinfo, 1) }.map(|i| TextArgument::from_ascii(i.to_string()));
    unsafe { emit(fcinfo, aggregate_id) }
}

/// A text argument: its datum, stored as given (in the database's encoding), and the UTF-8
/// text it is sent as.
struct TextArgument {
    datum: pg_sys::Datum,
    utf8: String,
}

impl TextArgument {
    /// An id rendered by one of the typed overloads (ASCII).
    fn from_ascii(text: String) -> Self {
        TextArgument {
            datum: text.as_str().into_datum().expect("text is never NULL"),
            utf8: text,
        }
    }
}

/// Argument `n` as text, or None if NULL; 22021 if it cannot be sent as UTF-8.
///
/// SAFETY: `fcinfo` is a valid call frame whose argument `n` is text.
unsafe fn text_argument(
    fcinfo: pg_sys::FunctionCallInfo,
    n: usize,
    name: &str,
) -> Option<TextArgument> {
    if unsafe { pg_arg_is_null(fcinfo, n) } {
        return None;
    }
    let datum = unsafe { pg_getarg_datum_raw(fcinfo, n) };
    // SAFETY: a non-NULL text datum; the detoasted copy (if any) lives in the current context.
    let bytes = unsafe {
        let text = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        pgrx::varlena::varlena_to_byte_slice(text)
    };
    let utf8 = utf8_text(name, bytes);
    Some(TextArgument { datum, utf8 })
}

/// `bytes` (in the database's encoding) as UTF-8, or 22021 naming `what`.
fn utf8_text(what: &str, bytes: &[u8]) -> String {
    match encoding::to_utf8(bytes) {
        Ok(text) => text.into_owned(),
        Err(reason) => Refusal::new(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            format!("outbox.emit: {what} cannot be sent as UTF-8"),
        )
        .detail(reason)
        .hint("Kafka messages are UTF-8; in a SQL_ASCII database every text must already be UTF-8.")
        .raise(),
    }
}

/// A validated emit() call, ready to insert.
struct NewEvent {
    event_type: TextArgument,
    aggregate_id: TextArgument,
    payload: pg_sys::Datum,
    headers: Option<pg_sys::Datum>,
    topic: Option<TextArgument>,
    message_bytes: usize,
}

/// The shared body of the emit() overloads: validate everything, then insert one row.
///
/// SAFETY: `fcinfo` is a valid call frame with the argument layout of sql/api.sql.
unsafe fn emit(
    fcinfo: pg_sys::FunctionCallInfo,
    aggregate_id: Option<TextArgument>,
) -> pg_sys::Datum {
    refuse_when_read_only();
    let event = unsafe { NewEvent::from_arguments(fcinfo, aggregate_id) };
    let id = uuid::Uuid::now_v7();
    // SAFETY: inside a transaction that may write (checked above); assigns the top-level xid
    // the row would get anyway.
    let xid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
    append::append(&EventRow {
        id,
        event_type: event.event_type.datum,
        aggregate_id: event.aggregate_id.datum,
        payload: event.payload,
        headers: event.headers,
        topic: event.topic.as_ref().map(|t| t.datum),
        xid: Some(xid),
        message_bytes: i32::try_from(event.message_bytes).unwrap_or(i32::MAX),
    });
    wake::note_emitted();
    pgrx::Uuid::from_bytes(*id.as_bytes())
        .into_datum()
        .expect("a uuid is never NULL")
}

/// 25006: a standby, or a read-only transaction, cannot take events.
fn refuse_when_read_only() {
    // SAFETY: reading backend-global state inside a transaction.
    let (standby, read_only) = unsafe { (pg_sys::RecoveryInProgress(), pg_sys::XactReadOnly) };
    if standby {
        Refusal::new(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "outbox.emit: cannot emit events on a standby server",
        )
        .hint("Emit on the primary; the standby publishes once it is promoted.")
        .raise();
    }
    if read_only {
        Refusal::new(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "outbox.emit: cannot emit events in a read-only transaction",
        )
        .hint("Emit in the read-write transaction that changes the data the event is about.")
        .raise();
    }
}

impl NewEvent {
    /// Reads and checks the arguments; raises a clear error for the first bad one.
    ///
    /// SAFETY: `fcinfo` is a valid call frame with the argument layout of sql/api.sql.
    unsafe fn from_arguments(
        fcinfo: pg_sys::FunctionCallInfo,
        aggregate_id: Option<TextArgument>,
    ) -> Self {
        let event_type = unsafe { text_argument(fcinfo, 0, "event_type") }
            .unwrap_or_else(|| Refusal::null_argument("outbox.emit", "event_type").raise());
        let aggregate_id = aggregate_id
            .unwrap_or_else(|| Refusal::null_argument("outbox.emit", "aggregate_id").raise());
        if unsafe { pg_arg_is_null(fcinfo, 2) } {
            Refusal::null_argument("outbox.emit", "payload")
                .hint("Pass 'null'::jsonb for an event without a body.")
                .raise();
        }
        let payload = unsafe { pg_getarg_datum_raw(fcinfo, 2) };
        let topic = unsafe { text_argument(fcinfo, 4, "topic") };
        check_event_type(&event_type.utf8);
        check_aggregate_id(&aggregate_id.utf8);
        check_topic(&event_type.utf8, topic.as_ref().map(|t| t.utf8.as_str()));
        // The session's trace context travels as a header; an explicit one wins.
        let traceparent = guc::traceparent().map(|value| {
            let mut map = serde_json::Map::new();
            map.insert(envelope::TRACEPARENT.into(), value.into());
            map
        });
        let (headers, header_bytes) = if unsafe { pg_arg_is_null(fcinfo, 3) } {
            match traceparent {
                Some(map) => {
                    let bytes = header_bytes(&map);
                    (Some(jsonb_datum(map)), bytes)
                }
                None => (None, 0),
            }
        } else {
            let given = unsafe { pg_getarg_datum_raw(fcinfo, 3) };
            let map = check_headers(given);
            let bytes = header_bytes(&map);
            match traceparent {
                Some(trace) if !map.contains_key(envelope::TRACEPARENT) => {
                    let bytes = bytes + header_bytes(&trace);
                    // SAFETY: both are valid jsonb objects; jsonb_concat merges them.
                    let merged = unsafe {
                        pgrx::direct_function_call_as_datum(
                            pg_sys::jsonb_concat,
                            &[Some(given), Some(jsonb_datum(trace))],
                        )
                    };
                    (merged, bytes)
                }
                _ => (Some(given), bytes),
            }
        };
        // SAFETY: `payload` is the non-NULL jsonb argument.
        let message_bytes = unsafe {
            check_message_size(payload, &event_type.utf8, &aggregate_id.utf8, header_bytes)
        };
        NewEvent {
            event_type,
            aggregate_id,
            payload,
            headers,
            topic,
            message_bytes,
        }
    }
}

fn check_event_type(event_type: &str) {
    if event_type.is_empty() {
        Refusal::invalid("outbox.emit: event_type must not be empty")
            .hint("Name the event, e.g. 'order.created'.")
            .raise();
    }
    if event_type.len() > MAX_EVENT_TYPE_BYTES {
        Refusal::invalid(format!(
            "outbox.emit: event_type is {} bytes long, at most {MAX_EVENT_TYPE_BYTES} are allowed",
            event_type.len()
        ))
        .raise();
    }
}

fn check_aggregate_id(aggregate_id: &str) {
    if aggregate_id.is_empty() {
        Refusal::invalid("outbox.emit: aggregate_id must not be empty")
            .hint("The aggregate id is the Kafka message key that keeps one aggregate's events in order.")
            .raise();
    }
    if aggregate_id.len() > MAX_AGGREGATE_ID_BYTES {
        Refusal::invalid(format!(
            "outbox.emit: aggregate_id is {} bytes long, at most {MAX_AGGREGATE_ID_BYTES} are allowed",
            aggregate_id.len()
        ))
        .raise();
    }
}

/// The topic is `outbox.topic_prefix` followed by the topic argument, else the event type; it
/// must be a name Kafka accepts, not one of Kafka's internal topics, and allowed by
/// `outbox.allowed_topics`.
fn check_topic(event_type: &str, topic: Option<&str>) {
    if topic == Some("") {
        Refusal::invalid("outbox.emit: topic must not be empty")
            .hint("Pass NULL to publish to the topic named after the event type.")
            .raise();
    }
    let full = format!("{}{}", guc::topic_prefix(), topic.unwrap_or(event_type));
    if let Err(reason) = validate::topic_name(&full) {
        let refusal = Refusal::invalid(format!(
            "outbox.emit: \"{}\" is not a valid Kafka topic name",
            full.escape_default()
        ))
        .detail(reason);
        let refusal = if topic.is_none() {
            refusal.hint("The topic defaults to the event type; pass a topic argument, or use only [a-zA-Z0-9._-] in the event type.")
        } else {
            refusal.hint("Kafka topic names use only [a-zA-Z0-9._-], at most 249 characters, and do not start with __.")
        };
        refusal.raise();
    }
    if !guc::allowed_topics().allows(&full) {
        Refusal::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("outbox.emit: topic \"{full}\" is not in outbox.allowed_topics"),
        )
        .hint("A superuser lists the topics events may go to in outbox.allowed_topics.")
        .raise();
    }
}

/// Headers must be a JSON object whose values are strings (Kafka header values are bytes; we send
/// the string's UTF-8), with names that do not collide with the headers outbox_pg sets in any
/// message format. Returns them, in UTF-8.
fn check_headers(headers: pg_sys::Datum) -> serde_json::Map<String, serde_json::Value> {
    // SAFETY: a non-NULL jsonb datum; jsonb_out renders it as a palloc'd C string.
    let text = unsafe {
        let text = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(headers)])
            .expect("jsonb_out returns text")
            .cast_mut_ptr::<std::ffi::c_char>();
        std::ffi::CStr::from_ptr(text).to_bytes()
    };
    let headers: serde_json::Value =
        serde_json::from_str(&utf8_text("headers", text)).expect("jsonb_out writes valid JSON");
    let serde_json::Value::Object(map) = headers else {
        Refusal::invalid(format!(
            "outbox.emit: headers must be a JSON object, not {}",
            json_kind(&headers)
        ))
        .hint("For example '{\"traceparent\": \"00-...\"}'::jsonb.")
        .raise();
    };
    for (name, value) in &map {
        if let Err(reason) = validate::header_name(name) {
            Refusal::invalid(format!("outbox.emit: {reason}")).raise();
        }
        if !value.is_string() {
            Refusal::invalid(format!(
                "outbox.emit: header \"{}\" is {}, header values must be strings",
                name.escape_default(),
                json_kind(value)
            ))
            .hint("Convert the value to a JSON string, e.g. to_jsonb(42::text).")
            .raise();
        }
    }
    map
}

/// The headers' size as sent: names and values in UTF-8.
fn header_bytes(map: &serde_json::Map<String, serde_json::Value>) -> usize {
    map.iter()
        .map(|(name, value)| name.len() + value.as_str().map_or(0, str::len))
        .sum()
}

fn jsonb_datum(map: serde_json::Map<String, serde_json::Value>) -> pg_sys::Datum {
    pgrx::JsonB(serde_json::Value::Object(map))
        .into_datum()
        .expect("jsonb is never NULL")
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Measures the Kafka message the worker will send for this event (key, value as JSON text,
/// every header, in UTF-8) and refuses it with 54000 if it exceeds `outbox.max_message_size`,
/// so the application learns it in its transaction instead of finding a dead event later.
/// Returns the size.
///
/// SAFETY: `payload` is a non-NULL jsonb datum.
unsafe fn check_message_size(
    payload: pg_sys::Datum,
    event_type: &str,
    aggregate_id: &str,
    header_bytes: usize,
) -> usize {
    let limit = guc::MAX_MESSAGE_SIZE.get().max(0) as usize;
    // SAFETY: inside a transaction.
    let created_at =
        Timestamp::from_postgres(unsafe { pg_sys::GetCurrentTransactionStartTimestamp() });
    let mut parts = MessageParts {
        key: aggregate_id.len(),
        event_type: event_type.len(),
        payload: 0,
        created_at: created_at.rfc3339().len(),
        user_headers: header_bytes,
    };
    let format = guc::message_format(&current_database());
    let others = envelope::message_bytes(parts, &format);
    let too_large = |size: Option<usize>| -> ! {
        let size = size.map_or_else(|| format!("more than {limit}"), |s| s.to_string());
        Refusal::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "outbox.emit: the message would be {size} bytes, more than outbox.max_message_size ({limit} bytes)"
            ),
        )
        .detail(format!("key and headers take {others} bytes; the payload is measured as the JSON text that is sent"))
        .hint("Store large documents elsewhere and emit a reference to them, or raise outbox.max_message_size together with the topic's max.message.bytes.")
        .raise()
    };
    // SAFETY: `payload` is a valid jsonb datum.
    let measured = unsafe { message_size::json_text_bytes(payload, limit.saturating_sub(others)) }
        .unwrap_or_else(|reason| {
            Refusal::new(
                PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
                "outbox.emit: the payload cannot be sent as UTF-8",
            )
            .detail(reason)
            .raise()
        });
    let Some(payload_bytes) = measured else {
        too_large(None)
    };
    parts.payload = payload_bytes;
    let size = envelope::message_bytes(parts, &format);
    if size > limit {
        too_large(Some(size));
    }
    size
}

/// This database's name (for the default CloudEvents source).
fn current_database() -> String {
    // SAFETY: MyDatabaseId is set for the whole life of a connected backend; the name is a
    // palloc'd copy.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return String::new();
        }
        std::ffi::CStr::from_ptr(name)
            .to_string_lossy()
            .into_owned()
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Runs `sql` and returns "SQLSTATE: message" of the error it raised, or None.
    fn error_of(sql: &str) -> Option<String> {
        let defined =
            Spi::get_one::<bool>("SELECT to_regprocedure('pg_temp.error_of(text)') IS NOT NULL")
                .unwrap()
                .unwrap_or(false);
        if defined {
            return Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()])
                .unwrap();
        }
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.error_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN EXECUTE sql; RETURN NULL;
             EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ': ' || SQLERRM; END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()]).unwrap()
    }

    fn count(condition: &str) -> i64 {
        Spi::get_one::<i64>(&format!(
            "SELECT count(*) FROM outbox.events WHERE {condition}"
        ))
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn emit_stores_the_event_and_returns_its_id() {
        let id = Spi::get_one::<String>(
            "SELECT outbox.emit('order.created', 'order-1', '{\"total\": 12.5}',
                                '{\"tenant\": \"acme\"}', 'orders')::text",
        )
        .unwrap()
        .unwrap();
        let row = Spi::get_one::<bool>(&format!(
            "SELECT event_type = 'order.created' AND aggregate_id = 'order-1'
                    AND payload = '{{\"total\": 12.5}}' AND headers = '{{\"tenant\": \"acme\"}}'
                    AND topic = 'orders' AND xid = pg_current_xact_id() AND message_bytes > 0
                    AND created_at = now() AND seq > 0
             FROM outbox.events WHERE id = '{id}'"
        ))
        .unwrap();
        assert_eq!(row, Some(true));
    }

    #[pg_test]
    fn emit_accepts_text_uuid_and_integer_ids_without_a_cast() {
        Spi::run(
            "CREATE TEMP TABLE things (big bigint, small smallint, med int, u uuid, t text, v varchar);
             INSERT INTO things VALUES (9000000000, 7, 42, '5f0c7a64-8d55-4f5e-9a4b-2f5f6f4cb0a1', 'abc', 'xyz');
             SELECT outbox.emit('t', big, '{}') FROM things;
             SELECT outbox.emit('t', small, '{}') FROM things;
             SELECT outbox.emit('t', med, '{}') FROM things;
             SELECT outbox.emit('t', u, '{}') FROM things;
             SELECT outbox.emit('t', t, '{}') FROM things;
             SELECT outbox.emit('t', v, '{}') FROM things;
             SELECT outbox.emit('t', 'literal', '{}');
             SELECT outbox.emit('t', 5, '{}');",
        )
        .unwrap();
        let keys = Spi::get_one::<String>(
            "SELECT string_agg(aggregate_id, ',' ORDER BY seq) FROM outbox.events",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            keys,
            "9000000000,7,42,5f0c7a64-8d55-4f5e-9a4b-2f5f6f4cb0a1,abc,xyz,literal,5"
        );
    }

    #[pg_test]
    fn seq_follows_emission_order_and_ids_are_time_ordered() {
        Spi::run("SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 50) g").unwrap();
        let ordered = Spi::get_one::<bool>(
            "SELECT bool_and(ordered) FROM (
               SELECT aggregate_id::int > lag(aggregate_id::int, 1, 0) OVER (ORDER BY seq)
                      AND id > lag(id, 1, '00000000-0000-0000-0000-000000000000') OVER (ORDER BY seq)
                      AS ordered
               FROM outbox.events) s",
        )
        .unwrap();
        assert_eq!(ordered, Some(true));
    }

    #[pg_test]
    fn rolled_back_savepoint_discards_its_event() {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.emit_then_fail() RETURNS void LANGUAGE plpgsql AS $$
             BEGIN
               PERFORM outbox.emit('t', 'kept', '{}');
               BEGIN
                 PERFORM outbox.emit('t', 'discarded', '{}');
                 RAISE EXCEPTION 'roll back to the block''s savepoint';
               EXCEPTION WHEN raise_exception THEN NULL;
               END;
             END $$;
             SELECT pg_temp.emit_then_fail();",
        )
        .unwrap();
        assert_eq!(count("aggregate_id = 'kept'"), 1);
        assert_eq!(count("aggregate_id = 'discarded'"), 0);
    }

    #[pg_test]
    fn any_role_may_emit_but_not_write_the_table() {
        Spi::run(
            "CREATE ROLE outbox_app LOGIN;
             SET ROLE outbox_app;
             SELECT outbox.emit('t', 'from-app', '{}');",
        )
        .unwrap();
        let insert = error_of("INSERT INTO outbox.events (id, event_type, aggregate_id, payload) VALUES (gen_random_uuid(), 't', 'x', '{}')");
        let update = error_of("UPDATE outbox.events SET xid = NULL");
        let delete = error_of("DELETE FROM outbox.events");
        Spi::run("RESET ROLE").unwrap();
        for error in [insert, update, delete] {
            assert!(error
                .unwrap_or_default()
                .starts_with("42501: permission denied"));
        }
        assert_eq!(count("aggregate_id = 'from-app' AND xid IS NOT NULL"), 1);
    }

    #[pg_test]
    fn read_only_transactions_are_refused_with_25006() {
        error_of("SELECT 1");
        Spi::run("SET LOCAL transaction_read_only = on").unwrap();
        let error = error_of("SELECT outbox.emit('t', 'a', '{}')").unwrap_or_default();
        assert!(
            error.starts_with("25006: outbox.emit: cannot emit events in a read-only transaction"),
            "{error}"
        );
    }

    #[pg_test]
    fn kafka_internal_topics_and_topics_not_allowed_are_refused() {
        let internal =
            error_of("SELECT outbox.emit('t', 'a', '{}', topic => '__consumer_offsets')")
                .unwrap_or_default();
        assert!(
            internal.starts_with("22023: ") && internal.contains("__consumer_offsets"),
            "{internal}"
        );
        // allowed_topics is SIGHUP; as superuser in a test we can SET it via set_config for the
        // check hook, but not change it: its default * allows everything else.
        assert!(error_of("SELECT outbox.emit('t', 'a', '{}', topic => 'orders')").is_none());
    }

    #[pg_test]
    fn reserved_headers_are_refused_in_every_format_and_case() {
        for name in [
            "outbox-id",
            "Outbox-Id",
            "ce_id",
            "ce_source",
            "content-type",
            "CE_TYPE",
        ] {
            let error = error_of(&format!(
                "SELECT outbox.emit('t', 'a', '{{}}', jsonb_build_object('{name}', 'x'))"
            ))
            .unwrap_or_default();
            assert!(
                error.starts_with("22023: ") && error.contains("is set by outbox_pg"),
                "{name}: {error}"
            );
        }
        assert!(error_of("SELECT outbox.emit('t', 'a', '{}', '{\"ce_tenant\": \"x\"}')").is_none());
    }

    #[pg_test]
    fn message_size_is_the_json_text_the_worker_sends() {
        // Every shape of JSON text jsonb_out writes: the measured payload bytes equal
        // octet_length of the rendered UTF-8 text.
        let payloads = [
            "'null'",
            "'true'",
            "'false'",
            "'0'",
            "'-1.50'",
            "'\"\"'",
            "'[]'",
            "'{}'",
            "'\"tab\\there \\u0001 \\\" \\\\\"'",
            "'\"Zoë ✓ 😀\"'",
            "'{\"a\": [1, {\"b\": null}, [], {}], \"c\": {\"d\": \"e\"}}'",
            "'[[[[]]], [1, 2, 3], {\"x\": [true, false]}]'",
            "jsonb_build_object('big', '1e1000'::numeric)",
            "jsonb_build_object('k', repeat('x', 5000))",
        ];
        let measure = |payload: &str| -> (i32, i32) {
            let id = Spi::get_one::<String>(&format!(
                "SELECT outbox.emit('t', 'k', {payload}::jsonb)::text"
            ))
            .unwrap()
            .unwrap();
            let (measured, rendered) = Spi::get_two::<i32, i32>(&format!(
                "SELECT message_bytes, octet_length(convert_to(payload::text, 'UTF8'))
                 FROM outbox.events WHERE id = '{id}'"
            ))
            .unwrap();
            (measured.unwrap(), rendered.unwrap())
        };
        let fixed = measure("'null'").0 - 4;
        for payload in payloads {
            let (measured, rendered) = measure(payload);
            assert_eq!(measured - fixed, rendered, "payload {payload}");
        }
    }

    #[pg_test]
    fn tiny_jsonb_that_renders_huge_is_refused_without_rendering_it() {
        // 400 numbers of 131,072 digits: a few kB as jsonb, 52 MB as text.
        let error = error_of(
            "SELECT outbox.emit('t', 'a', (SELECT jsonb_agg('1e131071'::numeric) FROM generate_series(1, 400)))",
        )
        .unwrap_or_default();
        assert!(
            error.starts_with("54000: outbox.emit: the message would be more than"),
            "{error}"
        );
    }
}
