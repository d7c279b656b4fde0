//! Every `outbox.*` setting: name, unit, bounds, context and a one-line description.
//!
//! All settings are `PGC_SIGHUP` (postgresql.conf or ALTER SYSTEM, then `pg_reload_conf()`), so
//! every backend and the worker agree on them. String settings have check hooks: a bad value is
//! refused at reload with a log line naming the setting, and the previous value stays in force.

use std::ffi::{c_char, c_void, CStr, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use outbox_pg_core::envelope::MessageFormat;
use outbox_pg_core::validate::{self, AllowedTopics};

use crate::shmem::MAX_DATABASES;

pub static BROKERS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"localhost:9092"));
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);
pub static TOPIC_PREFIX: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static KAFKA_CONFIG: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static DELIVERY_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static RETRY_BACKOFF_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static RETRY_BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(300_000);
pub static MESSAGE_FORMAT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"raw"));
pub static CLOUDEVENTS_SOURCE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static TRACEPARENT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static AUTO_CREATE_TOPICS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static TOPIC_PARTITIONS: GucSetting<i32> = GucSetting::<i32>::new(3);
pub static TOPIC_REPLICATION: GucSetting<i32> = GucSetting::<i32>::new(-1);
pub static MAX_MESSAGE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);
pub static BATCH_BYTES: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024 * 1024);
pub static ALLOWED_TOPICS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"*"));
pub static PUBLISH_REPLICATED: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static DEAD_EVENTS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"skip"));
pub static DIRECT_INSERT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"auto"));

const HOUR_MS: i32 = 3_600_000;

/// Defines every setting. Called from `_PG_init` in every process that loads the library.
pub fn init() {
    // SAFETY: the check hooks only parse their argument and never raise an ERROR.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.brokers",
            c"Kafka bootstrap servers, host:port[,host:port...].",
            c"Changing it rebuilds the worker's producer at the next reload.",
            &BROKERS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_brokers),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.database",
            c"Databases whose outbox is published, comma-separated; one worker each.",
            c"Databases can be added or removed with a reload.",
            &DATABASE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_database),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.topic_prefix",
            c"Prepended to every topic name.",
            c"Topic = prefix || coalesce(topic argument, event_type).",
            &TOPIC_PREFIX,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_topic_prefix),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.message_format",
            c"Message layout: raw (the payload as value) or cloudevents (CloudEvents 1.0 Kafka binary mode).",
            c"cloudevents adds ce_id, ce_type, ce_source, ce_time, ce_subject, ce_specversion and content-type headers.",
            &MESSAGE_FORMAT,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_message_format),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.cloudevents_source",
            c"The ce_source of CloudEvents messages; empty means /outbox_pg/<database>.",
            c"",
            &CLOUDEVENTS_SOURCE,
            GucContext::Sighup,
            GucFlags::default(),
            None,
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.traceparent",
            c"W3C trace context for events emitted in this session or transaction.",
            c"SET LOCAL outbox.traceparent = '00-<trace id>-<span id>-<flags>'; emit() adds it as the traceparent header.",
            &TRACEPARENT,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_traceparent),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.allowed_topics",
            c"Topics emit() may publish to (after outbox.topic_prefix), comma-separated; a trailing * matches any rest.",
            c"Checked at emit() and again by the worker before producing. Topics starting with __ are always refused.",
            &ALLOWED_TOPICS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_allowed_topics),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.dead_events",
            c"What a dead event means for later events of its topic and key: skip (they are published without it) or hold (they wait for outbox.retry or outbox.discard).",
            c"",
            &DEAD_EVENTS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_dead_events),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.direct_insert",
            c"How emit() writes its row: auto (directly, unless an audit hook such as pgaudit or sepgsql is loaded), on (always directly), off (always through an SQL INSERT).",
            c"Rows written directly are not seen by object-level audit hooks.",
            &DIRECT_INSERT,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_direct_insert),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.kafka_config",
            c"Extra librdkafka properties, key=value[,key=value...].",
            c"Visible to superusers only: it may hold credentials. Escape commas in values as \\,.",
            &KAFKA_CONFIG,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
            Some(check_kafka_config),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"outbox.poll_interval",
        c"How long the idle worker sleeps before looking for events a commit did not announce.",
        c"Commits that emitted events wake the worker at once; this is the fallback.",
        &POLL_INTERVAL_MS,
        10,
        HOUR_MS,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.batch_size",
        c"Events claimed and produced per batch.",
        c"",
        &BATCH_SIZE,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.max_attempts",
        c"Failed publish attempts after which an event is dead and skipped.",
        c"",
        &MAX_ATTEMPTS,
        1,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.retention",
        c"How long published events and their receipts are kept after they were published; -1 keeps them forever.",
        c"",
        &RETENTION_S,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"outbox.delivery_timeout",
        c"How long the worker waits for the broker to acknowledge a batch before it withdraws the unacknowledged messages and sends them again; 0 waits indefinitely.",
        c"An unacknowledged message never counts as a failed attempt (the broker may hold it); sending it again may duplicate it.",
        &DELIVERY_TIMEOUT_MS,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.retry_backoff",
        c"Delay before the first retry of a failed event; doubles with every further failure.",
        c"",
        &RETRY_BACKOFF_MS,
        0,
        HOUR_MS,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"outbox.auto_create_topics",
        c"Create missing topics (with outbox.topic_partitions and outbox.topic_replication) instead of failing their events.",
        c"When off, an event for a missing topic fails with the broker's error and is retried.",
        &AUTO_CREATE_TOPICS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.topic_partitions",
        c"Partitions of topics created by outbox.auto_create_topics.",
        c"",
        &TOPIC_PARTITIONS,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.topic_replication",
        c"Replication factor of topics created by outbox.auto_create_topics; -1 uses the broker's default.",
        c"",
        &TOPIC_REPLICATION,
        -1,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.max_message_size",
        c"Largest Kafka message emit() accepts: payload as JSON text plus key and headers.",
        c"Keep it at or below the topics' max.message.bytes; the producer's message.max.bytes follows it.",
        &MAX_MESSAGE_SIZE,
        1024,
        100 * 1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"outbox.batch_bytes",
        c"Most message bytes claimed and produced per batch; an event larger than this is claimed alone.",
        c"Bounds the worker's memory: a batch holds at most this much payload (plus one event).",
        &BATCH_BYTES,
        64 * 1024,
        1024 * 1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_bool_guc(
        c"outbox.publish_replicated",
        c"Publish events that arrive in outbox.events by logical replication.",
        c"Off: a subscriber does not publish again what its publisher publishes. Turn it on where the subscriber takes over publishing (blue/green switch-over).",
        &PUBLISH_REPLICATED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.retry_backoff_max",
        c"Upper bound of the retry delay.",
        c"",
        &RETRY_BACKOFF_MAX_MS,
        0,
        24 * HOUR_MS,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

pub fn brokers() -> String {
    string(&BROKERS)
}

/// The message format in force; `database` names the default CloudEvents source.
pub fn message_format(database: &str) -> MessageFormat {
    if string(&MESSAGE_FORMAT) != "cloudevents" {
        return MessageFormat::Raw;
    }
    let source = string(&CLOUDEVENTS_SOURCE);
    MessageFormat::CloudEvents {
        source: if source.is_empty() {
            format!("/outbox_pg/{database}")
        } else {
            source
        },
    }
}

/// The parsed `outbox.allowed_topics`; the check hook guarantees it parses.
pub fn allowed_topics() -> AllowedTopics {
    AllowedTopics::parse(&string(&ALLOWED_TOPICS))
        .unwrap_or_else(|_| AllowedTopics::parse("*").expect("* parses"))
}

/// True when `outbox.dead_events = hold`: a dead event holds back its topic and key.
pub fn dead_events_hold() -> bool {
    string(&DEAD_EVENTS) == "hold"
}

/// How emit() writes its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectInsert {
    Auto,
    On,
    Off,
}

pub fn direct_insert() -> DirectInsert {
    match string(&DIRECT_INSERT).as_str() {
        "on" => DirectInsert::On,
        "off" => DirectInsert::Off,
        _ => DirectInsert::Auto,
    }
}

/// The session's trace context, if set.
pub fn traceparent() -> Option<String> {
    Some(string(&TRACEPARENT)).filter(|t| !t.is_empty())
}

pub fn topic_prefix() -> String {
    string(&TOPIC_PREFIX)
}

/// The parsed `outbox.kafka_config`; the check hook guarantees it parses.
pub fn kafka_properties() -> Vec<(String, String)> {
    validate::kafka_properties(&string(&KAFKA_CONFIG)).unwrap_or_default()
}

/// The parsed `outbox.database` list; the check hook guarantees it parses.
pub fn databases() -> Vec<String> {
    validate::database_list(&string(&DATABASE), MAX_DATABASES).unwrap_or_default()
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs a validator from a string check hook: on failure, sets the DETAIL line and refuses.
///
/// SAFETY: `newval` points to the proposed value (possibly NULL), as the GUC machinery guarantees.
unsafe fn check_string(newval: *mut *mut c_char, check: fn(&str) -> Result<(), String>) -> bool {
    let value = unsafe { (*newval).as_ref() }
        .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .unwrap_or_default();
    match check(&value) {
        Ok(()) => true,
        Err(detail) => {
            let detail = CString::new(detail).unwrap_or_else(|_| c"invalid value".into());
            // SAFETY: check hooks run in a backend with a valid memory context; the GUC machinery
            // reads GUC_check_errdetail_string once when reporting the refusal.
            unsafe { pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr()) };
            false
        }
    }
}

/// Defines a string GUC check hook that refuses what `validator` refuses, with its reason as the
/// DETAIL. Check hooks run in any backend at SET or reload, and must not raise an ERROR.
macro_rules! string_check_hook {
    ($hook:ident, $validator:expr) => {
        #[pg_guard]
        unsafe extern "C-unwind" fn $hook(
            newval: *mut *mut c_char,
            _extra: *mut *mut c_void,
            _source: pg_sys::GucSource::Type,
        ) -> bool {
            unsafe { check_string(newval, $validator) }
        }
    };
}

string_check_hook!(check_brokers, validate::broker_list);
string_check_hook!(check_database, |v| validate::database_list(
    v,
    MAX_DATABASES
)
.map(drop));
string_check_hook!(check_topic_prefix, validate::topic_prefix);
string_check_hook!(check_kafka_config, |v| validate::kafka_properties(v)
    .map(drop));
string_check_hook!(check_traceparent, |v| if v.is_empty() {
    Ok(())
} else {
    validate::traceparent(v)
});
string_check_hook!(check_message_format, validate::message_format);
string_check_hook!(check_allowed_topics, |v| AllowedTopics::parse(v).map(drop));
string_check_hook!(check_dead_events, |v| match v {
    "skip" | "hold" => Ok(()),
    other => Err(format!(
        "\"{}\" is not a dead-event policy: use skip or hold",
        other.escape_default()
    )),
});
string_check_hook!(check_direct_insert, |v| match v {
    "auto" | "on" | "off" => Ok(()),
    other => Err(format!(
        "\"{}\" is not valid: use auto, on or off",
        other.escape_default()
    )),
});
