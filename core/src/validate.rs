//! Pure checks and parsers for user input and setting values. No Postgres, no Kafka calls here,
//! so every rule is testable on its own and shared by emit(), the GUC check hooks and the worker.

use crate::envelope;

/// Kafka's limit on topic name length.
pub const MAX_TOPIC_LEN: usize = 249;

/// Longest accepted `event_type`, in bytes: it travels in every message's headers.
pub const MAX_EVENT_TYPE_BYTES: usize = 255;
/// Longest accepted `aggregate_id`, in bytes: it is the Kafka key and is indexed while parked.
pub const MAX_AGGREGATE_ID_BYTES: usize = 1024;

/// A topic name Kafka accepts (1..=249 characters from `[a-zA-Z0-9._-]`, not `.` or `..`) and
/// that is not one of Kafka's internal topics (`__consumer_offsets`, `__transaction_state`, ...).
pub fn topic_name(name: &str) -> Result<(), String> {
    topic_syntax(name)?;
    if name.starts_with("__") {
        return Err(format!(
            "topic name \"{name}\" starts with \"__\", which Kafka reserves for its internal topics"
        ));
    }
    Ok(())
}

/// The characters and length Kafka accepts in a topic name.
fn topic_syntax(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "topic name is {} characters long, Kafka allows at most {MAX_TOPIC_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("topic name \"{name}\" is reserved by Kafka"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name \"{}\" contains {bad:?}; Kafka allows only [a-zA-Z0-9._-]",
            name.escape_default()
        ));
    }
    Ok(())
}

/// `outbox.topic_prefix`: empty, or itself a valid start of a topic name (the full name is
/// checked at emit).
pub fn topic_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        Ok(())
    } else {
        topic_name(prefix)
    }
}

/// `outbox.allowed_topics`: the full topic names (after `outbox.topic_prefix`) emit() may target.
/// Comma-separated; a name ending in `*` allows every topic that starts with what precedes it,
/// and `*` alone allows every topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedTopics {
    patterns: Vec<TopicPattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TopicPattern {
    Exactly(String),
    StartingWith(String),
}

impl AllowedTopics {
    pub fn parse(text: &str) -> Result<AllowedTopics, String> {
        let mut patterns = Vec::new();
        for item in text.split(',').map(str::trim) {
            if item.is_empty() {
                return Err("the list contains an empty entry".into());
            }
            let pattern = match item.strip_suffix('*') {
                Some(prefix) => {
                    if !prefix.is_empty() {
                        topic_syntax(prefix)?;
                    }
                    TopicPattern::StartingWith(prefix.to_string())
                }
                None => {
                    if item.contains('*') {
                        return Err(format!(
                            "\"{}\": a * is allowed only at the end of a name",
                            item.escape_default()
                        ));
                    }
                    topic_syntax(item)?;
                    TopicPattern::Exactly(item.to_string())
                }
            };
            patterns.push(pattern);
        }
        Ok(AllowedTopics { patterns })
    }

    pub fn allows(&self, topic: &str) -> bool {
        self.patterns.iter().any(|pattern| match pattern {
            TopicPattern::Exactly(name) => name == topic,
            TopicPattern::StartingWith(prefix) => topic.starts_with(prefix.as_str()),
        })
    }
}

/// `outbox.message_format`: `raw` or `cloudevents`.
pub fn message_format(format: &str) -> Result<(), String> {
    match format {
        "raw" | "cloudevents" => Ok(()),
        other => Err(format!(
            "\"{}\" is not a message format: use raw or cloudevents",
            other.escape_default()
        )),
    }
}

/// A user header name: non-empty and not a header outbox_pg may set itself in any message format
/// (compared without regard to case).
pub fn header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name is empty".into());
    }
    if envelope::is_reserved(name) {
        return Err(format!(
            "header \"{}\" is set by outbox_pg and cannot be overridden",
            name.escape_default()
        ));
    }
    Ok(())
}

/// librdkafka properties that load code into the server process or run a command. Setting them
/// would turn the right to change `outbox.kafka_config` into the right to run anything as the
/// database server, so they are refused whatever their value.
const CODE_LOADING_PROPERTIES: [&str; 6] = [
    "plugin.library.paths",
    "interceptors",
    "ssl.engine.location",
    "ssl.engine.id",
    "ssl.providers",
    "sasl.kerberos.kinit.cmd",
];

/// A W3C trace-context `traceparent`: `version-traceid-parentid-flags` in lowercase hex, version
/// not `ff`, trace and parent ids not all zero.
pub fn traceparent(value: &str) -> Result<(), String> {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let shape = "expected 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>";
    if parts.len() < 4
        || !hex(parts[0], 2)
        || !hex(parts[1], 32)
        || !hex(parts[2], 16)
        || !hex(parts[3], 2)
    {
        return Err(format!(
            "\"{}\" is not a W3C traceparent: {shape}",
            value.escape_default()
        ));
    }
    if parts[0] == "ff" || (parts[0] == "00" && parts.len() != 4) {
        return Err(format!(
            "traceparent version {} is not valid here: {shape}",
            parts[0]
        ));
    }
    if parts[1].bytes().all(|b| b == b'0') || parts[2].bytes().all(|b| b == b'0') {
        return Err("traceparent trace id and parent id must not be all zeros".into());
    }
    Ok(())
}

/// Parses `outbox.kafka_config`: `key=value` pairs separated by commas. A literal comma or
/// backslash inside a value is written `\,` or `\\`. Whitespace around keys and values is ignored.
pub fn kafka_properties(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for (position, item) in split_unescaped(text)?.iter().enumerate() {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        // Errors name the item's position, never its text: values may be secrets.
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!(
                "item {} is not of the form key=value",
                position + 1
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err("a property has an empty name".into());
        }
        if key.chars().any(|c| c.is_whitespace()) {
            return Err(format!("property name \"{key}\" contains whitespace"));
        }
        if key == "bootstrap.servers" || key == "metadata.broker.list" {
            return Err(format!(
                "set the brokers with outbox.brokers, not with {key}"
            ));
        }
        if CODE_LOADING_PROPERTIES.contains(&key) || key.ends_with("_cb") {
            return Err(format!(
                "property \"{key}\" loads code or runs a command in the database server and is not allowed"
            ));
        }
        pairs.push((key.to_string(), value.trim().to_string()));
    }
    Ok(pairs)
}

/// Checks `outbox.brokers`: a comma-separated list of `host:port`, optionally `PROTOCOL://host:port`.
pub fn broker_list(text: &str) -> Result<(), String> {
    let brokers: Vec<&str> = text.split(',').map(str::trim).collect();
    if brokers.iter().all(|b| b.is_empty()) {
        return Err("no broker given".into());
    }
    for broker in brokers {
        let address = broker.split_once("://").map_or(broker, |(_, rest)| rest);
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (address, None),
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(format!("\"{broker}\" is not a host:port address"));
        }
        if let Some(port) = port {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(format!("\"{broker}\" has an invalid port \"{port}\"")),
            }
        }
    }
    Ok(())
}

/// Parses `outbox.database`: one or more database names separated by commas.
pub fn database_list(text: &str, max: usize) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = Vec::new();
    for name in text.split(',').map(str::trim) {
        if name.is_empty() {
            return Err("the list contains an empty database name".into());
        }
        if name.len() >= 64 {
            return Err(format!("database name \"{name}\" is longer than 63 bytes"));
        }
        if names.iter().any(|n| n == name) {
            return Err(format!("database \"{name}\" is listed twice"));
        }
        names.push(name.to_string());
    }
    if names.len() > max {
        return Err(format!(
            "{} databases listed, at most {max} are supported",
            names.len()
        ));
    }
    Ok(names)
}

fn split_unescaped(text: &str) -> Result<Vec<String>, String> {
    let mut items = vec![String::new()];
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped @ (',' | '\\')) => items.last_mut().unwrap().push(escaped),
                Some(other) => {
                    return Err(format!("\"\\{other}\" is not an escape; use \\, or \\\\"));
                }
                None => return Err("the value ends with a lone backslash".into()),
            },
            ',' => items.push(String::new()),
            c => items.last_mut().unwrap().push(c),
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        let cases: &[(&str, bool)] = &[
            ("orders", true),
            ("order.created", true),
            ("a-b_c.D9", true),
            ("", false),
            (".", false),
            ("..", false),
            ("...", true),
            ("has space", false),
            ("slash/topic", false),
            ("ünïcode", false),
            ("semi;colon", false),
        ];
        for (name, ok) in cases {
            assert_eq!(topic_name(name).is_ok(), *ok, "{name:?}");
        }
        assert!(topic_name(&"x".repeat(249)).is_ok());
        assert!(topic_name(&"x".repeat(250)).is_err());
    }

    #[test]
    fn kafka_properties_parse_pairs_and_escapes() {
        assert_eq!(
            kafka_properties("linger.ms=5, compression.type = lz4").unwrap(),
            vec![
                ("linger.ms".to_string(), "5".to_string()),
                ("compression.type".to_string(), "lz4".to_string())
            ]
        );
        assert_eq!(
            kafka_properties(r"debug=broker\,topic").unwrap(),
            vec![("debug".to_string(), "broker,topic".to_string())]
        );
        assert!(kafka_properties("").unwrap().is_empty());
        assert!(kafka_properties("linger.ms").is_err());
        assert!(kafka_properties("=5").is_err());
        assert!(kafka_properties(r"a=b\x").is_err());
        assert!(kafka_properties("bootstrap.servers=x:1").is_err());
    }

    #[test]
    fn broker_lists_need_hosts_and_valid_ports() {
        assert!(broker_list("localhost:9092").is_ok());
        assert!(broker_list("a:1, b:2,SSL://c:9093").is_ok());
        assert!(broker_list("kafka").is_ok());
        assert!(broker_list("").is_err());
        assert!(broker_list("host:notaport").is_err());
        assert!(broker_list("host:0").is_err());
        assert!(broker_list("host:70000").is_err());
        assert!(broker_list(":9092").is_err());
    }

    #[test]
    fn database_lists_reject_empty_and_duplicate_names() {
        assert_eq!(database_list("a, b", 4).unwrap(), vec!["a", "b"]);
        assert!(database_list("a,,b", 4).is_err());
        assert!(database_list("a,a", 4).is_err());
        assert!(database_list("a,b,c", 2).is_err());
        assert!(database_list(&"d".repeat(64), 4).is_err());
    }

    #[test]
    fn traceparents_follow_the_w3c_format() {
        assert!(traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_ok());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "not a traceparent",
        ] {
            assert!(traceparent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reserved_headers_are_refused_in_every_format() {
        assert!(header_name("trace").is_ok());
        assert!(header_name("traceparent").is_ok());
        for reserved in [
            "outbox-id",
            "OUTBOX-ID",
            "ce_id",
            "ce_source",
            "content-type",
            "",
        ] {
            assert!(header_name(reserved).is_err(), "{reserved}");
        }
    }

    #[test]
    fn kafka_internal_topics_are_refused() {
        for name in ["__consumer_offsets", "__transaction_state", "__x"] {
            assert!(topic_name(name).is_err(), "{name}");
        }
        assert!(topic_name("_private").is_ok());
        assert!(topic_name("a__b").is_ok());
    }

    #[test]
    fn allowed_topics_match_names_and_prefixes() {
        let every = AllowedTopics::parse("*").unwrap();
        assert!(every.allows("anything") && every.allows("x"));
        let some = AllowedTopics::parse("orders, billing.*").unwrap();
        assert!(some.allows("orders"));
        assert!(!some.allows("orders2"));
        assert!(some.allows("billing.invoice") && some.allows("billing."));
        assert!(!some.allows("billing") && !some.allows("shipping"));
        for bad in ["", "a,,b", "a*b", "bad topic", "*x"] {
            assert!(AllowedTopics::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn code_loading_kafka_properties_are_refused_without_echoing_values() {
        for key in [
            "plugin.library.paths",
            "ssl.engine.location",
            "ssl.providers",
            "sasl.kerberos.kinit.cmd",
            "dr_msg_cb",
        ] {
            let error = kafka_properties(&format!("{key}=/tmp/secret-value.so")).unwrap_err();
            assert!(
                error.contains(key) && !error.contains("secret-value"),
                "{error}"
            );
        }
        assert!(kafka_properties("ssl.ca.location=/etc/ssl/ca.pem").is_ok());
    }
}
