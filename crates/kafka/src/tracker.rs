//! Which offsets of each partition may be committed.
//!
//! Kafka commits a position per partition, and committing position `p` says
//! "every offset below `p` is done". A consumer may ack out of order, so the
//! position committed is the lowest offset still handed out and not acked
//! (or one past the highest acked when none is outstanding); never lower
//! than a position already committed.

use std::collections::{BTreeSet, HashMap};

/// A topic partition.
pub(crate) type Partition = (String, i32);

#[derive(Debug, Default)]
struct PartitionState {
    /// Offsets handed out and neither acked nor taken back by a nack.
    outstanding: BTreeSet<i64>,
    /// The highest offset acked.
    acked_max: Option<i64>,
    /// The position last committed (the next offset to read).
    committed: Option<i64>,
    /// How often each outstanding or nacked offset was handed out.
    attempts: HashMap<i64, u32>,
}

/// Offsets handed out, acked and committed, per partition.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    partitions: HashMap<Partition, PartitionState>,
}

impl Tracker {
    /// Records that `offset` was handed out; returns which delivery of it
    /// this is (1 for the first in this process).
    pub(crate) fn delivered(&mut self, topic: &str, partition: i32, offset: i64) -> u32 {
        let state = self
            .partitions
            .entry((topic.to_owned(), partition))
            .or_default();
        state.outstanding.insert(offset);
        let attempts = state.attempts.entry(offset).or_insert(0);
        *attempts = attempts.saturating_add(1);
        *attempts
    }

    /// Records that `offset` is done. Returns the position to commit, if it
    /// moved past the last committed one.
    pub(crate) fn acked(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let state = self.partitions.get_mut(&(topic.to_owned(), partition))?;
        if !state.outstanding.remove(&offset) {
            // Already acked, or taken back by a nack or a revocation.
            return None;
        }
        state.attempts.remove(&offset);
        state.acked_max = Some(state.acked_max.map_or(offset, |max| max.max(offset)));
        let position = match state.outstanding.first() {
            Some(lowest) => *lowest,
            None => state.acked_max? + 1,
        };
        if state
            .committed
            .is_some_and(|committed| committed >= position)
        {
            return None;
        }
        Some(position)
    }

    /// Records that `position` was committed.
    pub(crate) fn committed(&mut self, topic: &str, partition: i32, position: i64) {
        if let Some(state) = self.partitions.get_mut(&(topic.to_owned(), partition)) {
            state.committed = Some(state.committed.map_or(position, |c| c.max(position)));
        }
    }

    /// Takes back `offset` and every later outstanding offset of its
    /// partition: the consumer seeks back to `offset`, so they come again.
    pub(crate) fn nacked(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&(topic.to_owned(), partition)) {
            let later = state.outstanding.split_off(&offset);
            for taken in later {
                if taken != offset {
                    // Handed out but never handled: not an attempt.
                    if let Some(n) = state.attempts.get_mut(&taken) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// Forgets a partition the group took away from this member.
    pub(crate) fn revoked(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_owned(), partition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_acks_commit_one_past_each() {
        let mut t = Tracker::default();
        assert_eq!(t.delivered("t", 0, 10), 1);
        assert_eq!(t.acked("t", 0, 10), Some(11));
        t.committed("t", 0, 11);
        t.delivered("t", 0, 11);
        assert_eq!(t.acked("t", 0, 11), Some(12));
    }

    #[test]
    fn out_of_order_acks_never_commit_past_an_outstanding_offset() {
        let mut t = Tracker::default();
        for offset in 0..3 {
            t.delivered("t", 0, offset);
        }
        // 1 and 2 done, 0 still in flight: nothing may be committed past 0.
        assert_eq!(t.acked("t", 0, 2), Some(0));
        t.committed("t", 0, 0);
        assert_eq!(t.acked("t", 0, 1), None);
        assert_eq!(t.acked("t", 0, 0), Some(3));
        // Acking twice changes nothing.
        assert_eq!(t.acked("t", 0, 0), None);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = Tracker::default();
        t.delivered("t", 0, 5);
        t.delivered("t", 1, 7);
        assert_eq!(t.acked("t", 1, 7), Some(8));
        assert_eq!(t.acked("t", 0, 5), Some(6));
        assert_eq!(t.acked("u", 0, 5), None);
    }

    #[test]
    fn a_nack_takes_back_later_offsets_and_counts_attempts() {
        let mut t = Tracker::default();
        t.delivered("t", 0, 1);
        t.delivered("t", 0, 2);
        t.nacked("t", 0, 1);
        // Both come again; 1 is on its second attempt, 2 on its first.
        assert_eq!(t.delivered("t", 0, 1), 2);
        assert_eq!(t.delivered("t", 0, 2), 1);
        assert_eq!(t.acked("t", 0, 1), Some(2));
        assert_eq!(t.acked("t", 0, 2), Some(3));
    }

    #[test]
    fn a_revoked_partition_is_forgotten() {
        let mut t = Tracker::default();
        t.delivered("t", 0, 1);
        t.revoked("t", 0);
        assert_eq!(t.acked("t", 0, 1), None);
        assert_eq!(t.delivered("t", 0, 1), 1);
    }
}
