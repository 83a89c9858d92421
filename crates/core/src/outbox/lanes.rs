//! Lanes: how the SQL outboxes hand rows to relays without writing each
//! row twice.
//!
//! A per-row claim writes every message twice (its lease, then
//! `published`), and on PostgreSQL each of those writes inserts into every
//! index of the outbox: that, not the broker, bounded the relay (see
//! BENCHMARKS.md). The SQL outboxes instead split the outbox into
//! [`OUTBOX_LANES`] lanes by partition key ([`lane_of`]) and keep, per lane,
//! a **cursor**: the highest sequence the relays have published. A row in a
//! lane is published exactly when its sequence is at or below its lane's
//! cursor, so the common path writes one lane row per batch, not two rows
//! per message.
//!
//! - **Enqueue** takes the lane's lock for the rest of the transaction
//!   before drawing the row's sequence (PostgreSQL: a transaction-scoped
//!   advisory lock per lane; SQLite has one writer). So a lane's rows
//!   commit in sequence order: a reader that sees a lane's row sees every
//!   earlier row of the lane, and the cursor never passes a row that
//!   commits later. A key always maps to one lane, so a key's order is its
//!   lane's order.
//! - **Claim** leases free lanes that have rows past their cursor (the
//!   lease is judged by the store's clock, as a row lease was) and returns
//!   those rows; the lane's rows stay in the lane. A row whose key has an
//!   earlier unfinished row *off* the lanes (a retry, a dead letter that
//!   blocks its key, a replay) leaves its lane at the claim and joins that
//!   key's per-row queue, so a key is never published past its own retry.
//! - **Settle**: when every row a worker claimed in a lane has been
//!   settled, the lane's cursor moves to the end of the longest run of
//!   published rows from its start and the lease ends. A failed row leaves
//!   the lane for the per-row path (attempts, backoff, dead letter), as do
//!   published rows after it; released rows stay in the lane, unpublished,
//!   and are claimed again. So a batch that was published whole costs one
//!   lane update, and a batch released whole (the relay's breaker was
//!   open) costs nothing but its lease.
//!
//! [`LaneLedger`] is the part of this shared by the SQL backends: it
//! remembers, in the process, which rows each worker claimed in which lane
//! and how each was settled, and turns each settle into a [`LanePlan`]: the
//! per-row writes it needs and the lanes to advance. If the process dies,
//! its leases expire and another worker claims the lanes again from their
//! cursors (a possible duplicate publish, never a loss or a reordering).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::transport::MessageId;

/// How many lanes the SQL outboxes split partition keys over. Fixed: a key's
/// lane must be the same in every process that enqueues to one outbox.
pub const OUTBOX_LANES: i32 = 64;

/// The lane of a partition key: FNV-1a (32-bit) of its UTF-8 bytes, modulo
/// [`OUTBOX_LANES`]. Stable across processes, platforms and releases.
///
/// ```
/// use vextrus_core::outbox::{OUTBOX_LANES, lane_of};
///
/// let lane = lane_of("order-42");
/// assert!((0..OUTBOX_LANES).contains(&lane));
/// assert_eq!(lane, lane_of("order-42"));
/// ```
pub fn lane_of(partition_key: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in partition_key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    // OUTBOX_LANES is a small positive constant: the remainder fits.
    (h % OUTBOX_LANES.unsigned_abs()) as i32
}

/// How one claimed row of a lane was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Outstanding,
    /// Published; `written` when its row was already marked published on
    /// its own (it was settled before the rest of its lane).
    Published {
        written: bool,
    },
    Failed,
    Released,
}

#[derive(Debug, Default)]
struct LaneClaim {
    /// The claimed rows by sequence.
    rows: BTreeMap<u64, (MessageId, Settled)>,
}

#[derive(Debug, Default)]
struct Ledger {
    claims: HashMap<(String, i32), LaneClaim>,
    /// Every claimed row: its worker, lane and sequence.
    rows: HashMap<MessageId, (String, i32, u64)>,
}

impl Ledger {
    /// Removes one (worker, lane) claim and its rows' entries.
    fn drop_claim(&mut self, key: &(String, i32)) {
        if let Some(old) = self.claims.remove(key) {
            for (id, _) in old.rows.values() {
                self.rows.remove(id);
            }
        }
    }
}

/// A claimed row of a lane, as a settle plan names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneRow {
    /// The message.
    pub id: MessageId,
    /// The worker that claimed it.
    pub worker: String,
    /// Its lane.
    pub lane: i32,
}

/// A lane whose claimed rows are all settled: its lease ends, and its
/// cursor moves to `cursor` if that is `Some`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneAdvance {
    /// The worker whose lease ends (the store only acts if the worker still
    /// holds the lane).
    pub worker: String,
    /// The lane.
    pub lane: i32,
    /// The new cursor: the last row of the run of published rows from the
    /// start of the claim; `None` if the claim's first row was not
    /// published (the lease just ends).
    pub cursor: Option<u64>,
}

/// What one settle must write, as [`LaneLedger::plan`] decides it. Ids not
/// claimed through a lane (rows on the per-row path, or unknown ids) are in
/// `per_row_*` exactly as given; lane rows are split into the writes they
/// need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LanePlan {
    /// Published ids to mark on their own rows, off the lanes.
    pub per_row_published: Vec<MessageId>,
    /// Failed ids for the per-row failure path (attempts, backoff, dead
    /// letter), in the order given.
    pub per_row_failed: Vec<MessageId>,
    /// Released ids on the per-row path (their claim is cleared).
    pub per_row_released: Vec<MessageId>,
    /// Lane rows published but past their lane's new cursor (or in a lane
    /// not yet fully settled): marked published on their own rows, leaving
    /// the lane, if `worker` still holds the lane.
    pub lane_published: Vec<LaneRow>,
    /// Lane rows that failed: they leave the lane for the per-row failure
    /// path, if `worker` still holds the lane.
    pub lane_failed: Vec<LaneRow>,
    /// Lanes fully settled by this call.
    pub advances: Vec<LaneAdvance>,
}

impl LanePlan {
    /// Whether the plan writes nothing.
    pub fn is_empty(&self) -> bool {
        self.per_row_published.is_empty()
            && self.per_row_failed.is_empty()
            && self.per_row_released.is_empty()
            && self.lane_published.is_empty()
            && self.lane_failed.is_empty()
            && self.advances.is_empty()
    }
}

/// The rows each worker of this process claimed in each lane, and how far
/// each lane's claim is settled (see the [module docs](self)).
///
/// ```
/// use vextrus_core::outbox::LaneLedger;
/// use vextrus_core::transport::MessageId;
///
/// let ledger = LaneLedger::default();
/// let (a, b) = (MessageId::new(), MessageId::new());
/// ledger.record("w1", [(7, 10, a), (7, 11, b)]);
/// // a published alone: lane 7 is not fully settled, so a is marked on its row.
/// let plan = ledger.plan(Some("w1"), &[a], &[], &[]);
/// assert_eq!(plan.lane_published.len(), 1);
/// assert!(plan.advances.is_empty());
/// // b published: lane 7's cursor moves to 11 (a was already written).
/// let plan = ledger.plan(Some("w1"), &[b], &[], &[]);
/// assert!(plan.lane_published.is_empty());
/// assert_eq!(plan.advances[0].cursor, Some(11));
/// ```
#[derive(Debug, Default)]
pub struct LaneLedger {
    inner: Mutex<Ledger>,
}

impl LaneLedger {
    /// Records one claim of `worker`: `(lane, sequence, id)` per returned
    /// lane row. A claim of a lane means its lease was free: any claim of
    /// that lane still in the ledger (this worker's or another's, whose
    /// lease ran out) is stale and is dropped, so the ledger does not grow
    /// with expired leases.
    pub fn record(&self, worker: &str, rows: impl IntoIterator<Item = (i32, u64, MessageId)>) {
        let mut ledger = self.lock();
        let mut fresh: Vec<i32> = Vec::new();
        for (lane, seq, id) in rows {
            let key = (worker.to_owned(), lane);
            if !fresh.contains(&lane) {
                fresh.push(lane);
                let stale: Vec<(String, i32)> = ledger
                    .claims
                    .keys()
                    .filter(|(_, l)| *l == lane)
                    .cloned()
                    .collect();
                for k in stale {
                    ledger.drop_claim(&k);
                }
            }
            ledger
                .claims
                .entry(key)
                .or_default()
                .rows
                .insert(seq, (id, Settled::Outstanding));
            ledger.rows.insert(id, (worker.to_owned(), lane, seq));
        }
    }

    /// Whether `id` is a lane row claimed in this process and not yet
    /// settled.
    pub fn holds(&self, id: MessageId) -> bool {
        self.lock().rows.contains_key(&id)
    }

    /// Forgets every unsettled claim of `worker` in `lane` (after a settle
    /// that failed in the store: the lease runs out and the lane is claimed
    /// again from its cursor).
    pub fn forget(&self, worker: &str, lane: i32) {
        self.lock().drop_claim(&(worker.to_owned(), lane));
    }

    /// Settles ids, for `worker` (`None`: whichever worker claimed each id)
    /// and returns what to write. Lanes whose claimed rows are now all
    /// settled are removed from the ledger and returned as advances.
    pub fn plan(
        &self,
        worker: Option<&str>,
        published: &[MessageId],
        failed: &[MessageId],
        released: &[MessageId],
    ) -> LanePlan {
        let mut ledger = self.lock();
        let mut plan = LanePlan::default();
        let mut touched: Vec<(String, i32)> = Vec::new();
        let mut settle = |ledger: &mut Ledger, id: MessageId, how: Settled| -> Option<LaneRow> {
            let (w, lane, seq) = ledger.rows.get(&id)?.clone();
            if worker.is_some_and(|want| want != w) {
                return None;
            }
            let claim = ledger.claims.get_mut(&(w.clone(), lane))?;
            let slot = claim.rows.get_mut(&seq)?;
            if slot.1 != Settled::Outstanding {
                return None;
            }
            slot.1 = how;
            ledger.rows.remove(&id);
            if !touched.contains(&(w.clone(), lane)) {
                touched.push((w.clone(), lane));
            }
            Some(LaneRow {
                id,
                worker: w,
                lane,
            })
        };
        let mut newly_published = Vec::new();
        for &id in published {
            match settle(&mut ledger, id, Settled::Published { written: false }) {
                Some(row) => newly_published.push(row),
                None => plan.per_row_published.push(id),
            }
        }
        for &id in failed {
            match settle(&mut ledger, id, Settled::Failed) {
                Some(row) => plan.lane_failed.push(row),
                None => plan.per_row_failed.push(id),
            }
        }
        for &id in released {
            if settle(&mut ledger, id, Settled::Released).is_none() {
                plan.per_row_released.push(id);
            }
        }
        // Lanes now fully settled advance; published rows past the new
        // cursor, or in lanes still waiting for other rows, are written on
        // their own rows now (so they read as published at once).
        let mut past_cursor: Vec<MessageId> = Vec::new();
        for key in touched {
            let done = ledger
                .claims
                .get(&key)
                .is_some_and(|c| c.rows.values().all(|(_, s)| *s != Settled::Outstanding));
            if !done {
                if let Some(claim) = ledger.claims.get_mut(&key) {
                    for (_, s) in claim.rows.values_mut() {
                        if *s == (Settled::Published { written: false }) {
                            *s = Settled::Published { written: true };
                        }
                    }
                }
                continue;
            }
            let Some(claim) = ledger.claims.remove(&key) else {
                continue;
            };
            let mut cursor = None;
            let mut in_run = true;
            for (seq, (id, s)) in &claim.rows {
                match s {
                    Settled::Published { written } => {
                        if in_run {
                            cursor = Some(*seq);
                        } else if !written {
                            past_cursor.push(*id);
                        }
                    }
                    _ => in_run = false,
                }
            }
            plan.advances.push(LaneAdvance {
                worker: key.0,
                lane: key.1,
                cursor,
            });
        }
        // Keep the rows written now: the published ids in lanes not yet
        // settled, and those past a new cursor.
        plan.lane_published = newly_published
            .into_iter()
            .filter(|row| {
                past_cursor.contains(&row.id)
                    || !plan
                        .advances
                        .iter()
                        .any(|a| a.lane == row.lane && a.worker == row.worker)
            })
            .collect();
        plan
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // A panic while holding the lock leaves a consistent map (every
        // method finishes its edits before anything can panic).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<MessageId> {
        (0..n).map(|_| MessageId::new()).collect()
    }

    #[test]
    fn lanes_are_spread_and_stable() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let lane = lane_of(&format!("order-{i}"));
            assert!((0..OUTBOX_LANES).contains(&lane));
            seen.insert(lane);
        }
        assert_eq!(
            seen.len(),
            OUTBOX_LANES as usize,
            "1000 keys cover every lane"
        );
        // Pinned: the lane of a key must never change between releases.
        assert_eq!(lane_of(""), (0x811c_9dc5u32 % 64) as i32);
        assert_eq!(lane_of("a"), (0xe40c_292cu32 % 64) as i32);
    }

    #[test]
    fn a_lane_published_whole_advances_to_its_last_row_with_no_row_writes() {
        let l = LaneLedger::default();
        let id = ids(3);
        l.record("w", [(1, 5, id[0]), (1, 6, id[1]), (2, 9, id[2])]);
        let plan = l.plan(Some("w"), &id, &[], &[]);
        assert!(plan.lane_published.is_empty() && plan.per_row_published.is_empty());
        let mut adv = plan.advances.clone();
        adv.sort_by_key(|a| a.lane);
        assert_eq!(
            adv.iter().map(|a| (a.lane, a.cursor)).collect::<Vec<_>>(),
            vec![(1, Some(6)), (2, Some(9))]
        );
        assert!(!l.holds(id[0]));
    }

    #[test]
    fn a_failure_stops_the_cursor_and_later_published_rows_are_written() {
        let l = LaneLedger::default();
        let id = ids(4);
        l.record(
            "w",
            [(3, 1, id[0]), (3, 2, id[1]), (3, 3, id[2]), (3, 4, id[3])],
        );
        let plan = l.plan(Some("w"), &[id[0], id[2]], &[id[1]], &[id[3]]);
        assert_eq!(plan.advances[0].cursor, Some(1));
        assert_eq!(
            plan.lane_failed.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![id[1]]
        );
        assert_eq!(
            plan.lane_published.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![id[2]]
        );
        assert!(
            plan.per_row_released.is_empty(),
            "released lane rows stay queued"
        );
    }

    #[test]
    fn a_lane_released_whole_only_ends_its_lease() {
        let l = LaneLedger::default();
        let id = ids(2);
        l.record("w", [(4, 1, id[0]), (4, 2, id[1])]);
        let plan = l.plan(Some("w"), &[], &[], &id);
        assert_eq!(plan.advances.len(), 1);
        assert_eq!(plan.advances[0].cursor, None);
        assert!(plan.lane_published.is_empty() && plan.lane_failed.is_empty());
    }

    #[test]
    fn other_workers_and_unknown_ids_go_per_row() {
        let l = LaneLedger::default();
        let id = ids(2);
        l.record("w1", [(0, 1, id[0])]);
        let plan = l.plan(Some("w2"), &[id[0]], &[], &[id[1]]);
        assert_eq!(plan.per_row_published, vec![id[0]]);
        assert_eq!(plan.per_row_released, vec![id[1]]);
        assert!(plan.advances.is_empty());
        assert!(l.holds(id[0]), "w1's claim is untouched");
        // Without a worker, the claiming worker's lane settles.
        let plan = l.plan(None, &[id[0]], &[], &[]);
        assert_eq!(plan.advances[0].worker, "w1");
    }

    #[test]
    fn reclaiming_a_lane_starts_afresh_and_forget_drops_a_claim() {
        let l = LaneLedger::default();
        let id = ids(3);
        l.record("w", [(5, 1, id[0]), (5, 2, id[1])]);
        l.record("w", [(5, 1, id[0]), (5, 2, id[1]), (5, 3, id[2])]);
        let plan = l.plan(Some("w"), &id, &[], &[]);
        assert_eq!(plan.advances[0].cursor, Some(3));
        l.record("w", [(6, 1, id[0])]);
        l.forget("w", 6);
        assert!(!l.holds(id[0]));
        assert_eq!(
            l.plan(Some("w"), &[id[0]], &[], &[]).per_row_published,
            vec![id[0]]
        );
    }

    #[test]
    fn a_lane_taken_over_drops_the_stale_claim_of_another_worker() {
        let l = LaneLedger::default();
        let id = ids(2);
        l.record("w1", [(9, 1, id[0]), (9, 2, id[1])]);
        l.record("w2", [(9, 1, id[0]), (9, 2, id[1])]);
        // w1's late settle is not a lane settle any more.
        let stale = l.plan(Some("w1"), &id, &[], &[]);
        assert!(stale.advances.is_empty());
        assert_eq!(stale.per_row_published, id);
        let plan = l.plan(Some("w2"), &id, &[], &[]);
        assert_eq!(plan.advances[0].worker, "w2");
        assert_eq!(plan.advances[0].cursor, Some(2));
        assert!(l.lock().claims.is_empty(), "nothing left behind");
    }

    #[test]
    fn a_row_settled_twice_counts_once() {
        let l = LaneLedger::default();
        let id = ids(2);
        l.record("w", [(8, 1, id[0]), (8, 2, id[1])]);
        let first = l.plan(Some("w"), &[id[0]], &[], &[]);
        assert_eq!(first.lane_published.len(), 1);
        // Settled again: no longer a lane row of this claim.
        let again = l.plan(Some("w"), &[id[0]], &[], &[]);
        assert_eq!(again.per_row_published, vec![id[0]]);
        let last = l.plan(Some("w"), &[id[1]], &[], &[]);
        assert_eq!(last.advances[0].cursor, Some(2));
        assert!(last.lane_published.is_empty());
    }
}
