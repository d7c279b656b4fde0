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

/// One claimed event on its way from the claim to the record: the event, the broker's answer,
/// and what that answer means once the batch is settled.
#[derive(Debug, Clone)]
pub struct Shipment {
    pub event: Event,
    /// An earlier attempt failed and the event was waiting (parked) when it was claimed.
    pub parked: bool,
    /// None: not sent (an earlier event of its key could not be).
    pub outcome: Option<Outcome>,
    /// Decided by [`settle`]; before that, nothing is known to be stored: send again.
    pub disposition: Disposition,
}

impl Shipment {
    pub fn new(event: Event, parked: bool) -> Self {
        Shipment {
            event,
            parked,
            outcome: None,
            disposition: Disposition::SendAgain,
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

/// Settles `shipments` (in emission order): sets each one's disposition, and returns the order
/// breaches (an event published after an earlier event of its key was not) that the producer
/// should have made impossible. An event whose outcome is missing was not sent.
pub fn settle(shipments: &mut [Shipment]) -> Vec<Breach> {
    let mut breaches = Vec::new();
    let decided: Vec<Disposition> = {
        let mut keys: HashMap<(&str, &str), KeyState> = HashMap::new();
        let batch: &[Shipment] = shipments;
        batch
            .iter()
            .enumerate()
            .map(|(i, shipment)| {
                let state = keys
                    .entry(shipment.event.order_key())
                    .or_insert(KeyState::Clear);
                match (*state, &shipment.outcome) {
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
                    // Out there although something earlier of its key is not: keep the truth,
                    // report it.
                    (
                        KeyState::Blocked(earlier) | KeyState::Resending(earlier),
                        Some(Outcome::Published { partition, offset }),
                    ) => {
                        breaches.push(Breach {
                            published: shipment.event.id,
                            earlier: batch[earlier].event.id,
                        });
                        Disposition::Published {
                            partition: *partition,
                            offset: *offset,
                        }
                    }
                    (KeyState::Blocked(_), _) => Disposition::Waiting,
                    // A refusal behind an undelivered event is decided when both are sent again.
                    (KeyState::Resending(_), _) => Disposition::SendAgain,
                }
            })
            .collect()
    };
    for (shipment, disposition) in shipments.iter_mut().zip(decided) {
        shipment.disposition = disposition;
    }
    breaches
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Timestamp;

    fn shipment(seq: i64, key: &str, topic: &str, outcome: Option<Outcome>) -> Shipment {
        Shipment {
            parked: false,
            disposition: Disposition::SendAgain,
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

    fn kinds(batch: &[Shipment]) -> Vec<&'static str> {
        batch
            .iter()
            .map(|s| match s.disposition {
                Disposition::Published { .. } => "published",
                Disposition::Failed { .. } => "failed",
                Disposition::Waiting => "waiting",
                Disposition::SendAgain => "again",
            })
            .collect()
    }

    #[test]
    fn a_failure_holds_back_only_later_events_of_its_topic_and_key() {
        let mut batch = vec![
            shipment(1, "a", "t", refused()),
            shipment(2, "b", "t", published()),
            shipment(3, "a", "t", None),
            shipment(4, "a", "other", published()),
            shipment(5, "a", "t", refused()),
        ];
        let breaches = settle(&mut batch);
        assert_eq!(
            kinds(&batch),
            ["failed", "published", "waiting", "published", "waiting"]
        );
        assert!(breaches.is_empty());
    }

    #[test]
    fn undelivered_events_and_everything_after_them_in_their_key_are_sent_again() {
        let mut batch = vec![
            shipment(1, "a", "t", published()),
            shipment(2, "a", "t", undelivered()),
            shipment(3, "a", "t", refused()),
            shipment(4, "b", "t", undelivered()),
            shipment(5, "c", "t", published()),
        ];
        settle(&mut batch);
        assert_eq!(
            kinds(&batch),
            ["published", "again", "again", "again", "published"]
        );
    }

    #[test]
    fn a_later_event_published_after_an_earlier_failure_is_reported_as_a_breach() {
        let mut batch = vec![
            shipment(1, "a", "t", refused()),
            shipment(2, "a", "t", published()),
        ];
        let breaches = settle(&mut batch);
        assert_eq!(kinds(&batch), ["failed", "published"]);
        assert_eq!(
            breaches,
            vec![Breach {
                published: batch[1].event.id,
                earlier: batch[0].event.id
            }]
        );
    }
}
