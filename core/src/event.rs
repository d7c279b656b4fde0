//! An event as the worker claims it from `outbox.events`, and what the broker said about it.

/// Position of an event in emission order (`outbox.events.seq`).
pub type Seq = i64;

/// A point in time, in microseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

impl Timestamp {
    /// From a PostgreSQL `timestamptz` datum value (microseconds since 2000-01-01).
    pub fn from_postgres(us: i64) -> Self {
        Timestamp(us.saturating_add(POSTGRES_EPOCH_US))
    }

    /// RFC 3339 in UTC with microseconds, e.g. `2026-11-26T19:46:07.188408Z`.
    /// PostgreSQL's `infinity` and `-infinity` are written as such.
    pub fn rfc3339(self) -> String {
        if self.0 >= i64::MAX - POSTGRES_EPOCH_US {
            return "infinity".into();
        }
        if self.0 <= i64::MIN + POSTGRES_EPOCH_US {
            return "-infinity".into();
        }
        let micros = self.0.rem_euclid(1_000_000);
        let seconds = self.0.div_euclid(1_000_000);
        let (days, second_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            second_of_day / 3600,
            second_of_day % 3600 / 60,
            second_of_day % 60
        )
    }
}

/// Year, month, day of a day count since 1970-01-01 in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// One committed event, ready to be produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event id: the `outbox-id` header consumers de-duplicate on.
    pub id: uuid::Uuid,
    pub seq: Seq,
    pub event_type: String,
    /// The Kafka message key.
    pub aggregate_id: String,
    /// The payload as JSON text (UTF-8): the Kafka message value.
    pub payload: String,
    /// The caller's headers.
    pub headers: Vec<(String, String)>,
    /// The topic argument, else the event type; `outbox.topic_prefix` is applied when sending.
    pub topic: String,
    /// When the emitting transaction started.
    pub created_at: Timestamp,
    /// Failed attempts so far.
    pub attempts: i32,
    /// The Kafka message's size as emit() measured it (key, value and headers).
    pub message_bytes: usize,
}

impl Event {
    /// What Kafka orders by: one key in one topic lands in one partition.
    pub fn order_key(&self) -> (&str, &str) {
        (&self.topic, &self.aggregate_id)
    }
}

/// What became of one event sent to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged by the broker at this partition and offset.
    Published { partition: i32, offset: i64 },
    /// Refused for a reason that belongs to the event (too large, topic missing or not allowed,
    /// record rejected, not authorised): a failed attempt.
    Refused { error: String },
    /// Not known to be stored: withdrawn, timed out, or the producer failed. Sent again; never
    /// counted as a failed attempt (the broker may hold it, so it must not die).
    Undelivered { error: String },
}

impl Outcome {
    pub fn is_published(&self) -> bool {
        matches!(self, Outcome::Published { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_written_in_rfc3339_utc() {
        let cases = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (1_795_722_367_188_408, "2026-11-26T19:46:07.188408Z"),
            (951_782_400_000_001, "2000-02-29T00:00:00.000001Z"),
            (-1, "1969-12-31T23:59:59.999999Z"),
            (253_402_300_799_999_999, "9999-12-31T23:59:59.999999Z"),
        ];
        for (us, text) in cases {
            assert_eq!(Timestamp(us).rfc3339(), text, "{us}");
        }
        assert_eq!(
            Timestamp::from_postgres(0).rfc3339(),
            "2000-01-01T00:00:00.000000Z"
        );
        assert_eq!(Timestamp::from_postgres(i64::MAX).rfc3339(), "infinity");
        assert_eq!(Timestamp::from_postgres(i64::MIN).rfc3339(), "-infinity");
    }
}
