//! SQL functions users call. Their declarations (argument names, defaults, privileges) are in
//! `sql/api.sql`; the C-level entry points are here.
//!
//! `emit()` is written against the V1 calling convention directly so the payload `jsonb` datum goes
//! from the caller to the INSERT untouched: no detoast, no re-serialisation, no per-call planning.

use pgrx::fcinfo::{pg_arg_is_null, pg_getarg, pg_getarg_datum_raw};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::append::{self, EventRow};
use crate::error::Refusal;
use crate::{guc, validate, wake};

/// Longest accepted `event_type`, in bytes: it travels in every message's headers.
pub const MAX_EVENT_TYPE_BYTES: usize = 255;
/// Longest accepted `aggregate_id`, in bytes: it is the Kafka key and is indexed while retried.
pub const MAX_AGGREGATE_ID_BYTES: usize = 1024;

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
    let aggregate_id = unsafe { pg_getarg::<String>(fcinfo, 1) };
    unsafe { emit(fcinfo, aggregate_id) }
}

/// `outbox.emit(event_type text, aggregate_id uuid, ...)`: the key is the canonical UUID text.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_emit_uuid(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with a valid fcinfo whose argument 1 is uuid, per sql/api.sql.
    let aggregate_id = unsafe { pg_getarg::<pgrx::Uuid>(fcinfo, 1) }.map(|u| u.to_string());
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
    let aggregate_id = unsafe { pg_getarg::<i64>(fcinfo, 1) }.map(|i| i.to_string());
    unsafe { emit(fcinfo, aggregate_id) }
}

/// A validated emit() call, ready to insert.
struct NewEvent {
    event_type: String,
    aggregate_id: String,
    payload: pg_sys::Datum,
    headers: Option<pg_sys::Datum>,
    topic: Option<String>,
}

/// The shared body of the emit() overloads: validate everything, then insert one row.
///
/// SAFETY: `fcinfo` is a valid call frame with the argument layout of sql/api.sql.
unsafe fn emit(fcinfo: pg_sys::FunctionCallInfo, aggregate_id: Option<String>) -> pg_sys::Datum {
    let event = unsafe { NewEvent::from_arguments(fcinfo, aggregate_id) };
    let id = uuid::Uuid::now_v7();
    append::append(&EventRow {
        id,
        event_type: &event.event_type,
        aggregate_id: &event.aggregate_id,
        payload: event.payload,
        headers: event.headers,
        topic: event.topic.as_deref(),
    });
    wake::note_emitted();
    pgrx::Uuid::from_bytes(*id.as_bytes())
        .into_datum()
        .expect("a uuid is never NULL")
}

impl NewEvent {
    /// Reads and checks the arguments; raises a clear error for the first bad one.
    ///
    /// SAFETY: `fcinfo` is a valid call frame with the argument layout of sql/api.sql.
    unsafe fn from_arguments(
        fcinfo: pg_sys::FunctionCallInfo,
        aggregate_id: Option<String>,
    ) -> Self {
        let event_type = unsafe { pg_getarg::<String>(fcinfo, 0) }
            .unwrap_or_else(|| Refusal::null_argument("outbox.emit", "event_type").raise());
        let aggregate_id = aggregate_id
            .unwrap_or_else(|| Refusal::null_argument("outbox.emit", "aggregate_id").raise());
        if unsafe { pg_arg_is_null(fcinfo, 2) } {
            Refusal::null_argument("outbox.emit", "payload")
                .hint("Pass 'null'::jsonb for an event without a body.")
                .raise();
        }
        let payload = unsafe { pg_getarg_datum_raw(fcinfo, 2) };
        let topic = unsafe { pg_getarg::<String>(fcinfo, 4) };
        check_event_type(&event_type);
        check_aggregate_id(&aggregate_id);
        check_topic(&event_type, topic.as_deref());
        let traceparent = guc::traceparent();
        let (headers, header_bytes) = if unsafe { pg_arg_is_null(fcinfo, 3) } {
            match traceparent {
                // The session's trace context travels as a header; no argument to parse.
                Some(traceparent) => {
                    let bytes = TRACEPARENT.len() + traceparent.len();
                    let mut map = serde_json::Map::new();
                    map.insert(TRACEPARENT.into(), traceparent.into());
                    (Some(jsonb_datum(map)), bytes)
                }
                None => (None, 0),
            }
        } else {
            let given = unsafe { pg_getarg::<pgrx::JsonB>(fcinfo, 3) }
                .expect("not NULL")
                .0;
            let (mut map, mut bytes) = check_headers(given);
            match traceparent {
                // An explicit traceparent header wins over the session's.
                Some(traceparent) if !map.contains_key(TRACEPARENT) => {
                    bytes += TRACEPARENT.len() + traceparent.len();
                    map.insert(TRACEPARENT.into(), traceparent.into());
                    (Some(jsonb_datum(map)), bytes)
                }
                _ => (Some(unsafe { pg_getarg_datum_raw(fcinfo, 3) }), bytes),
            }
        };
        // SAFETY: `payload` is the non-NULL jsonb argument.
        unsafe { check_message_size(payload, &event_type, &aggregate_id, header_bytes) };
        NewEvent {
            event_type,
            aggregate_id,
            payload,
            headers,
            topic,
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

/// The topic is `outbox.topic_prefix` followed by the topic argument, else the event type.
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
            refusal.hint("Kafka topic names use only [a-zA-Z0-9._-], at most 249 characters.")
        };
        refusal.raise();
    }
}

/// Headers must be a JSON object whose values are strings (Kafka header values are bytes; we send
/// the string's UTF-8), with names that do not collide with the headers outbox_pg sets.
/// Returns the headers' size in bytes (names and values).
fn check_headers(
    headers: serde_json::Value,
) -> (serde_json::Map<String, serde_json::Value>, usize) {
    let serde_json::Value::Object(map) = headers else {
        Refusal::invalid(format!(
            "outbox.emit: headers must be a JSON object, not {}",
            json_kind(&headers)
        ))
        .hint("For example '{\"traceparent\": \"00-...\"}'::jsonb.")
        .raise();
    };
    let mut bytes = 0;
    for (name, value) in &map {
        if let Err(reason) = validate::header_name(name) {
            Refusal::invalid(format!("outbox.emit: {reason}")).raise();
        }
        if !value.is_string() {
            Refusal::invalid(format!(
                "outbox.emit: header \"{name}\" is {}, header values must be strings",
                json_kind(value)
            ))
            .hint("Convert the value to a JSON string, e.g. to_jsonb(42::text).")
            .raise();
        }
        bytes += name.len() + value.as_str().map_or(0, str::len);
    }
    (map, bytes)
}

/// The W3C trace-context header emit() adds from `outbox.traceparent`.
const TRACEPARENT: &str = "traceparent";

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

/// Bytes of the headers outbox_pg adds to every message (names, id, timestamp), over-estimated.
const FIXED_HEADER_BYTES: usize = 160;

/// Refuses an event whose Kafka message would exceed `outbox.max_message_size`, so the
/// application learns it in its transaction instead of finding a dead event later. The payload
/// is measured as the JSON text that is sent; rendering it is skipped when its stored size makes
/// the limit unreachable (JSON text is at most 8 times the jsonb size, for strings of escapes).
///
/// SAFETY: `payload` is a non-NULL jsonb datum.
unsafe fn check_message_size(
    payload: pg_sys::Datum,
    event_type: &str,
    aggregate_id: &str,
    header_bytes: usize,
) {
    let limit = guc::MAX_MESSAGE_SIZE.get().max(0) as usize;
    let others = FIXED_HEADER_BYTES + 2 * aggregate_id.len() + event_type.len() + header_bytes;
    // SAFETY: toast_raw_datum_size reads the varlena header of a valid datum without detoasting.
    let stored = unsafe { pg_sys::toast_raw_datum_size(payload) };
    if others + stored * 8 <= limit {
        return;
    }
    // SAFETY: jsonb_out renders a valid jsonb datum as a palloc'd C string.
    let text_len = unsafe {
        let text = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(payload)])
            .expect("jsonb_out returns text")
            .cast_mut_ptr::<std::ffi::c_char>();
        std::ffi::CStr::from_ptr(text).to_bytes().len()
    };
    let size = others + text_len;
    if size > limit {
        Refusal::new(
            pgrx::pg_sys::errcodes::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "outbox.emit: the message would be {size} bytes, more than outbox.max_message_size ({limit} bytes)"
            ),
        )
        .detail(format!("payload {text_len} bytes as JSON text, key and headers {others} bytes"))
        .hint("Store large documents elsewhere and emit a reference to them, or raise outbox.max_message_size together with the topic's max.message.bytes.")
        .raise();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Runs `sql` and returns "SQLSTATE: message" of the error it raised, or None.
    fn error_of(sql: &str) -> Option<String> {
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
                    AND topic = 'orders' AND published_at IS NULL AND publish_attempts = 0
                    AND error IS NULL AND created_at = now() AND seq > 0
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
    fn emit_refuses_bad_input_with_a_sqlstate_and_writes_nothing() {
        Spi::run("SELECT outbox.emit('kept', 'k', '{}')").unwrap();
        let long_type = "e".repeat(256);
        let long_id = "i".repeat(1025);
        let long_topic = "t".repeat(250);
        let cases: Vec<(String, &str, &str)> = vec![
            (
                "SELECT outbox.emit(NULL, 'a', '{}')".into(),
                "22004",
                "event_type must not be NULL",
            ),
            (
                "SELECT outbox.emit('t', NULL::text, '{}')".into(),
                "22004",
                "aggregate_id must not be NULL",
            ),
            (
                "SELECT outbox.emit('t', NULL::uuid, '{}')".into(),
                "22004",
                "aggregate_id must not be NULL",
            ),
            (
                "SELECT outbox.emit('t', NULL::bigint, '{}')".into(),
                "22004",
                "aggregate_id must not be NULL",
            ),
            (
                "SELECT outbox.emit('t', 'a', NULL)".into(),
                "22004",
                "payload must not be NULL",
            ),
            (
                "SELECT outbox.emit('', 'a', '{}')".into(),
                "22023",
                "event_type must not be empty",
            ),
            (
                "SELECT outbox.emit('t', '', '{}')".into(),
                "22023",
                "aggregate_id must not be empty",
            ),
            (
                "SELECT outbox.emit('order created', 'a', '{}')".into(),
                "22023",
                "\"order created\" is not a valid Kafka topic name",
            ),
            (
                "SELECT outbox.emit('t', 'a', '{}', topic => 'a/b')".into(),
                "22023",
                "\"a/b\" is not a valid Kafka topic name",
            ),
            (
                "SELECT outbox.emit('t', 'a', '{}', topic => '..')".into(),
                "22023",
                "\"..\" is not a valid Kafka topic name",
            ),
            (
                "SELECT outbox.emit('.', 'a', '{}')".into(),
                "22023",
                "\".\" is not a valid Kafka topic name",
            ),
            (
                "SELECT outbox.emit('t', 'a', '{}', topic => '')".into(),
                "22023",
                "topic must not be empty",
            ),
            (
                format!("SELECT outbox.emit('t', 'a', '{{}}', topic => '{long_topic}')"),
                "22023",
                "is not a valid Kafka topic name",
            ),
            (
                "SELECT outbox.emit('t', 'a', '{}', '[1, 2]')".into(),
                "22023",
                "headers must be a JSON object, not an array",
            ),
            (
                "SELECT outbox.emit('t', 'a', '{}', '\"x\"')".into(),
                "22023",
                "headers must be a JSON object, not a string",
            ),
            (
                "SELECT outbox.emit('t', 'a', '{}', '{\"n\": 1}')".into(),
                "22023",
                "header \"n\" is a number, header values must be strings",
            ),
            (
                "SELECT outbox.emit('t', 'a', '{}', '{\"o\": {}}')".into(),
                "22023",
                "header \"o\" is an object",
            ),
            (
                "SELECT outbox.emit('t', 'a', '{}', '{\"outbox-id\": \"x\"}')".into(),
                "22023",
                "header \"outbox-id\" is set by outbox_pg",
            ),
            (
                format!("SELECT outbox.emit('{long_type}', 'a', '{{}}', topic => 'x')"),
                "22023",
                "event_type is 256 bytes long",
            ),
            (
                format!("SELECT outbox.emit('t', '{long_id}', '{{}}')"),
                "22023",
                "aggregate_id is 1025 bytes long",
            ),
            (
                "SELECT outbox.emit('t', 'a', 'not json')".into(),
                "22P02",
                "invalid input syntax for type json",
            ),
            (
                "SELECT outbox.emit('t', 1.5, '{}')".into(),
                "42883",
                "does not exist",
            ),
        ];
        for (sql, sqlstate, message) in &cases {
            let error = error_of(sql).unwrap_or_else(|| panic!("{sql} was accepted"));
            assert!(
                error.starts_with(&format!("{sqlstate}: ")) && error.contains(message),
                "{sql}\n  expected {sqlstate}: …{message}…\n  got      {error}"
            );
        }
        assert_eq!(count("true"), 1, "refused calls wrote nothing");
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
        let update = error_of("UPDATE outbox.events SET published_at = now()");
        let delete = error_of("DELETE FROM outbox.events");
        Spi::run("RESET ROLE").unwrap();
        for error in [insert, update, delete] {
            assert!(error
                .unwrap_or_default()
                .starts_with("42501: permission denied"));
        }
        assert_eq!(
            count("aggregate_id = 'from-app' AND published_at IS NULL"),
            1
        );
    }
}
