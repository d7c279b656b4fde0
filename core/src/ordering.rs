//! Per-(topic, key) order: what a batch's outcomes mean for each event.
//!
//! Kafka orders messages within a partition, and one key of one topic always lands in one
//! partition. So the guarantee outbox_pg keeps is per (topic, key): an event is never published
//! before an earlier (lower `seq`) event of the same topic and key that is still unpublished.
//! Events of different keys, or of one key in different topics, are independent.
//!
//! A batch holds events in emission order. The producer keeps one key's messages in order and,
//! when one fails, fails every later message of its partition too (idempotent producer with the
//! gapless guarantee, one request in flight per broker). The rules below turn the outcomes into
//! what happens to each event, and notice if the broker ever broke that order.

use std::collections::HashMap;

use crate::event::{Event, Outcome};

/// One claimed event on its way: the event and, once the broker answered, its outcome.
#[derive(Debug, Clone)]
pub struct Shipment {
    pub event: Event,
    /// None: not sent (an earlier event of its key could not be).
    pub outcome: Option<Outcome>,
}

impl Shipment {
    pub fn new(event: Event) -> Self {
        Shipment {
            event,
            outcome: None,
        }
    }
}

/// What becomes of an event once its batch is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The broker stored it.
    Published { partition: i32, offset: i64 },
    /// Refused: a failed attempt; later events of its key wait behind it.
    Failed { error: String },
    /// An earlier event of its key failed: it waits behind that one, whatever it got itself.
    Waiting,
    /// Not known to be stored, and nothing earlier of its key failed: send it again now.
    SendAgain,
}

/// The settled batch: one disposition per shipment, in the same order, and the order breaches
/// (an event published after an earlier event of its key was not) that the producer should
/// have made impossible.
#[derive(Debug, Default)]
pub struct Settlement {
    pub dispositions: Vec<Disposition>,
    pub breaches: Vec<Breach>,
}

/// An event the broker stored although an earlier event of the same key was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    pub published: uuid::Uuid,
    pub earlier: uuid::Uuid,
}

/// Where a key stands while its events are walked in order.
#[derive(Clone, Copy)]
enum KeyState {
    /// Everything so far was published.
    Clear,
    /// An earlier event failed: the rest waits behind it.
    Blocked(usize),
    /// An earlier event was not delivered: the rest is sent again after it.
    Resending(usize),
}

/// Settles `shipments` (in emission order). An event whose outcome is missing was not sent.
pub fn settle(shipments: &[Shipment]) -> Settlement {
    let mut keys: HashMap<(&str, &str), KeyState> = HashMap::new();
    let mut settlement = Settlement::default();
    for (i, shipment) in shipments.iter().enumerate() {
        let state = keys
            .entry(shipment.event.order_key())
            .or_insert(KeyState::Clear);
        let disposition = match (*state, &shipment.outcome) {
            (KeyState::Clear, Some(Outcome::Published { partition, offset })) => {
                Disposition::Published {
                    partition: *partition,
                    offset: *offset,
                }
            }
            (KeyState::Clear, Some(Outcome::Refused { error })) => {
                *state = KeyState::Blocked(i);
                Disposition::Failed {
                    error: error.clone(),
                }
            }
            (KeyState::Clear, Some(Outcome::Undelivered { .. }) | None) => {
                *state = KeyState::Resending(i);
                Disposition::SendAgain
            }
            // Out there although something earlier of its key is not: keep the truth, report it.
            (
                KeyState::Blocked(earlier) | KeyState::Resending(earlier),
                Some(Outcome::Published { partition, offset }),
            ) => {
                settlement.breaches.push(Breach {
                    published: shipment.event.id,
                    earlier: shipments[earlier].event.id,
                });
                Disposition::Published {
                    partition: *partition,
                    offset: *offset,
                }
            }
            (KeyState::Blocked(_), _) => Disposition::Waiting,
            // A refusal behind an undelivered event is decided when both are sent again.
            (KeyState::Resending(_), _) => Disposition::SendAgain,
        };
        settlement.dispositions.push(disposition);
    }
    settlement
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Timestamp;

    fn shipment(seq: i64, key: &str, topic: &str, outcome: Option<Outcome>) -> Shipment {
        Shipment {
            event: Event {
                id: uuid::Uuid::from_u128(seq as u128),
                seq,
                event_type: topic.into(),
                aggregate_id: key.into(),
                payload: "{}".into(),
                headers: vec![],
                topic: topic.into(),
                created_at: Timestamp(0),
                attempts: 0,
                message_bytes: 0,
            },
            outcome,
        }
    }

    fn published() -> Option<Outcome> {
        Some(Outcome::Published {
            partition: 0,
            offset: 0,
        })
    }

    fn refused() -> Option<Outcome> {
        Some(Outcome::Refused {
            error: "refused".into(),
        })
    }

    fn undelivered() -> Option<Outcome> {
        Some(Outcome::Undelivered {
            error: "purged".into(),
        })
    }

    fn kinds(settlement: &Settlement) -> Vec<&'static str> {
        settlement
            .dispositions
            .iter()
            .map(|d| match d {
                Disposition::Published { .. } => "published",
                Disposition::Failed { .. } => "failed",
                Disposition::Waiting => "waiting",
                Disposition::SendAgain => "again",
            })
            .collect()
    }

    #[test]
    fn a_failure_holds_back_only_later_events_of_its_topic_and_key() {
        let batch = vec![
            shipment(1, "a", "t", refused()),
            shipment(2, "b", "t", published()),
            shipment(3, "a", "t", None),
            shipment(4, "a", "other", published()),
            shipment(5, "a", "t", refused()),
        ];
        let settled = settle(&batch);
        assert_eq!(
            kinds(&settled),
            ["failed", "published", "waiting", "published", "waiting"]
        );
        assert!(settled.breaches.is_empty());
    }

    #[test]
    fn undelivered_events_and_everything_after_them_in_their_key_are_sent_again() {
        let batch = vec![
            shipment(1, "a", "t", published()),
            shipment(2, "a", "t", undelivered()),
            shipment(3, "a", "t", refused()),
            shipment(4, "b", "t", undelivered()),
            shipment(5, "c", "t", published()),
        ];
        assert_eq!(
            kinds(&settle(&batch)),
            ["published", "again", "again", "again", "published"]
        );
    }

    #[test]
    fn a_later_event_published_after_an_earlier_failure_is_reported_as_a_breach() {
        let batch = vec![
            shipment(1, "a", "t", refused()),
            shipment(2, "a", "t", published()),
        ];
        let settled = settle(&batch);
        assert_eq!(kinds(&settled), ["failed", "published"]);
        assert_eq!(
            settled.breaches,
            vec![Breach {
                published: batch[1].event.id,
                earlier: batch[0].event.id
            }]
        );
    }
}
