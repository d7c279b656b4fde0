//! Which claimed events may be in flight together without breaking per-aggregate order.
//!
//! The guarantee: an event is never published before an earlier (lower `seq`) committed,
//! unpublished event of the same aggregate, unless that earlier one is dead. Kafka keeps order
//! only within a partition, and librdkafka's idempotent producer keeps it per partition, so
//! events of one aggregate may travel together only while they go to the same topic (same key,
//! same topic = same partition). Everything else waits for a later round.

use std::collections::HashMap;

use crate::event::Event;

/// What one round sends.
#[derive(Debug, Default)]
pub struct RoundPlan {
    /// Retries, each sent and confirmed on its own so a poison event cannot fail its neighbours.
    pub retries: Vec<Event>,
    /// Fresh events sent together.
    pub batch: Vec<Event>,
    /// Claimed events left for a later round (order constraints); their presence means more work.
    pub deferred: usize,
}

/// Plans a round from due retries (first retrying event per aggregate) and fresh events (in
/// `seq` order, up to `fresh_limit`, already excluding events behind a retrying one).
pub fn plan_round(retries: Vec<Event>, fresh: Vec<Event>, fresh_limit: usize) -> RoundPlan {
    let mut plan = RoundPlan::default();

    // A retry goes only when no earlier fresh event of its aggregate may still be unpublished:
    // none in this batch, and the batch reached past its seq (or held every fresh event).
    let fresh_is_complete = fresh.len() < fresh_limit;
    let last_fresh_seq = fresh.last().map_or(i64::MIN, |e| e.seq);
    for retry in retries {
        let earlier_fresh = fresh
            .iter()
            .take_while(|e| e.seq < retry.seq)
            .any(|e| e.aggregate_id == retry.aggregate_id);
        let maybe_unclaimed_earlier = !fresh_is_complete && last_fresh_seq < retry.seq;
        if earlier_fresh || maybe_unclaimed_earlier {
            plan.deferred += 1;
        } else {
            plan.retries.push(retry);
        }
    }

    // Fresh events: an aggregate's events travel together while they share its first topic in
    // this batch; from the first topic change on, the rest of that aggregate waits.
    let mut first_topic: HashMap<&str, Option<&str>> = HashMap::new();
    let mut keep = vec![false; fresh.len()];
    for (i, event) in fresh.iter().enumerate() {
        let entry = first_topic
            .entry(event.aggregate_id.as_str())
            .or_insert(Some(event.topic.as_str()));
        match entry {
            Some(topic) if *topic == event.topic => keep[i] = true,
            _ => *entry = None, // topic changed, or already stopped: stop this aggregate here
        }
    }
    for (event, keep) in fresh.into_iter().zip(keep) {
        if keep {
            plan.batch.push(event);
        } else {
            plan.deferred += 1;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64, aggregate: &str, topic: &str) -> Event {
        Event {
            seq,
            id: uuid::Uuid::nil(),
            event_type: topic.into(),
            aggregate_id: aggregate.into(),
            payload: "{}".into(),
            headers: vec![],
            topic: topic.into(),
            created_at: String::new(),
            attempts: 0,
        }
    }

    fn seqs(events: &[Event]) -> Vec<i64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn same_topic_events_of_an_aggregate_travel_together() {
        let plan = plan_round(
            vec![],
            vec![event(1, "a", "t"), event(2, "a", "t"), event(3, "b", "t")],
            10,
        );
        assert_eq!(seqs(&plan.batch), vec![1, 2, 3]);
        assert_eq!(plan.deferred, 0);
    }

    #[test]
    fn a_topic_change_defers_the_rest_of_that_aggregate_only() {
        let fresh = vec![
            event(1, "a", "created"),
            event(2, "b", "created"),
            event(3, "a", "paid"),
            event(4, "a", "created"),
            event(5, "b", "created"),
        ];
        let plan = plan_round(vec![], fresh, 10);
        assert_eq!(seqs(&plan.batch), vec![1, 2, 5]);
        assert_eq!(plan.deferred, 2);
    }

    #[test]
    fn a_retry_waits_for_earlier_fresh_events_of_its_aggregate() {
        let mut retry = event(7, "a", "t");
        retry.attempts = 1;
        let plan = plan_round(vec![retry.clone()], vec![event(3, "a", "t")], 10);
        assert!(plan.retries.is_empty());
        assert_eq!(plan.deferred, 1);

        let plan = plan_round(vec![retry], vec![event(3, "b", "t")], 10);
        assert_eq!(seqs(&plan.retries), vec![7]);
    }

    #[test]
    fn a_retry_waits_while_a_full_batch_has_not_reached_its_seq() {
        let mut retry = event(50, "a", "t");
        retry.attempts = 1;
        let plan = plan_round(
            vec![retry.clone()],
            vec![event(3, "b", "t"), event(4, "c", "t")],
            2,
        );
        assert!(plan.retries.is_empty());
        let plan = plan_round(
            vec![retry],
            vec![event(3, "b", "t"), event(60, "c", "t")],
            2,
        );
        assert_eq!(seqs(&plan.retries), vec![50]);
    }
}
