//! The score of one node for one request: the node's index of local blocks, the
//! shared remote set, the walk of a chain of keys over both, and the pick of the
//! winner (the module docs of the crate give the formula).

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use kvstrata_types::NamespaceId;

use crate::config::{RouteTier, TierWeights};
use crate::decision::{Candidate, TierCounts};

/// Which tiers of one node hold a block (bits of [`RouteTier::bit`]).
type TierSet = u8;

/// One node's index: namespace → key → local tiers holding it.
#[derive(Debug, Default)]
pub(crate) struct NodeIndex {
    blocks: HashMap<NamespaceId, HashMap<Bytes, TierSet>>,
}

impl NodeIndex {
    pub(crate) fn add(&mut self, ns: NamespaceId, key: Bytes, tier: RouteTier) {
        *self.blocks.entry(ns).or_default().entry(key).or_default() |= tier.bit();
    }

    /// Removes `tier` (every local tier with `None`) from the block's set.
    pub(crate) fn remove(&mut self, ns: &NamespaceId, key: &[u8], tier: Option<RouteTier>) {
        let Some(keys) = self.blocks.get_mut(ns) else {
            return;
        };
        if let Some(set) = keys.get_mut(key) {
            *set &= !tier.map_or(0xff, RouteTier::bit);
            if *set == 0 {
                keys.remove(key);
            }
        }
        if keys.is_empty() {
            self.blocks.remove(ns);
        }
    }

    pub(crate) fn tiers(&self, ns: &NamespaceId, key: &[u8]) -> TierSet {
        self.blocks
            .get(ns)
            .and_then(|k| k.get(key))
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn len(&self) -> u64 {
        self.blocks.values().map(|k| k.len() as u64).sum()
    }
}

/// The shared remote set: namespace → keys in the remote tier.
#[derive(Debug, Default)]
pub(crate) struct RemoteSet {
    blocks: HashMap<NamespaceId, HashSet<Bytes>>,
}

impl RemoteSet {
    pub(crate) fn add(&mut self, ns: NamespaceId, key: Bytes) {
        self.blocks.entry(ns).or_default().insert(key);
    }

    pub(crate) fn remove(&mut self, ns: &NamespaceId, key: &[u8]) {
        if let Some(keys) = self.blocks.get_mut(ns) {
            keys.remove(key);
            if keys.is_empty() {
                self.blocks.remove(ns);
            }
        }
    }

    pub(crate) fn contains(&self, ns: &NamespaceId, key: &[u8]) -> bool {
        self.blocks.get(ns).is_some_and(|k| k.contains(key))
    }

    pub(crate) fn len(&self) -> u64 {
        self.blocks.values().map(|k| k.len() as u64).sum()
    }
}

/// The best tier among `set`'s local tiers by weight (the faster one on equal weights).
fn best_local(weights: &TierWeights, set: TierSet) -> Option<RouteTier> {
    let mut best: Option<RouteTier> = None;
    for t in RouteTier::LOCAL {
        if set & t.bit() != 0 && best.is_none_or(|b| weights.weight(t) > weights.weight(b)) {
            best = Some(t);
        }
    }
    best
}

/// Walks `keys` over one node's index and the shared remote set: the block
/// score (without the load penalty), leading keys matched, and per-tier counts.
pub(crate) fn score_chain(
    weights: &TierWeights,
    index: &NodeIndex,
    remote: &RemoteSet,
    ns: &NamespaceId,
    keys: &[impl AsRef<[u8]>],
) -> (f64, usize, TierCounts) {
    let mut score = 0.0;
    let mut counts = TierCounts::default();
    let mut matched = 0;
    for key in keys {
        let key = key.as_ref();
        let tier = match best_local(weights, index.tiers(ns, key)) {
            Some(t) => t,
            None if remote.contains(ns, key) => RouteTier::Remote,
            None => break,
        };
        score += weights.weight(tier);
        counts.add(tier, 1);
        matched += 1;
    }
    (score, matched, counts)
}

/// The score rounded to 6 decimals, so that sums of the same weights in any
/// order compare (and print) equal: `0.8 + 0.8 + 0.8` is 2.4, not 2.4000000000000004.
pub(crate) fn round_score(score: f64) -> f64 {
    (score * 1e6).round() / 1e6
}

/// Scores closer than this are equal (they are sums of the same few weights).
const SCORE_EPSILON: f64 = 1e-9;

/// The winner among synced candidates: highest score, then fewer in flight,
/// then the earlier one.
pub(crate) fn pick(candidates: &[Candidate]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, c) in candidates.iter().enumerate() {
        if !c.synced {
            continue;
        }
        let better = match best.and_then(|b| candidates.get(b)) {
            None => true,
            Some(b) => {
                c.score > b.score + SCORE_EPSILON
                    || ((c.score - b.score).abs() <= SCORE_EPSILON && c.in_flight < b.in_flight)
            }
        };
        if better {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> NamespaceId {
        NamespaceId([7; 16])
    }

    fn key(i: u8) -> Bytes {
        Bytes::from(vec![i; 16])
    }

    fn chain(n: u8) -> Vec<Bytes> {
        (1..=n).map(key).collect()
    }

    fn cand(name: &str, synced: bool, score: f64, in_flight: u64) -> Candidate {
        Candidate {
            name: name.into(),
            target: format!("http://{name}:1"),
            synced,
            score,
            matched: 0,
            in_flight,
            tiers: TierCounts::default(),
        }
    }

    #[test]
    fn score_weights_tiers_and_stops_at_the_first_gap() {
        let w = TierWeights::default();
        let mut idx = NodeIndex::default();
        let remote = RemoteSet::default();
        idx.add(ns(), key(1), RouteTier::Hbm);
        idx.add(ns(), key(2), RouteTier::Host);
        idx.add(ns(), key(3), RouteTier::Disk);
        // key 4 missing; key 5 present but past the gap.
        idx.add(ns(), key(5), RouteTier::Hbm);
        let (s, m, t) = score_chain(&w, &idx, &remote, &ns(), &chain(5));
        assert_eq!(m, 3);
        assert!((s - 2.3).abs() < 1e-9, "{s}");
        assert_eq!(
            t,
            TierCounts {
                hbm: 1,
                host: 1,
                disk: 1,
                remote: 0
            }
        );
        // Another namespace holds nothing.
        let (s, m, _) = score_chain(&w, &idx, &remote, &NamespaceId([8; 16]), &chain(3));
        assert_eq!((s, m), (0.0, 0));
        // A missing first key matches nothing at all.
        let (_, m, _) = score_chain(&w, &idx, &remote, &ns(), &[key(4), key(5)]);
        assert_eq!(m, 0);
    }

    #[test]
    fn best_local_tier_counts_and_removal_follows() {
        let w = TierWeights::default();
        let mut idx = NodeIndex::default();
        let remote = RemoteSet::default();
        idx.add(ns(), key(1), RouteTier::Host);
        idx.add(ns(), key(1), RouteTier::Disk);
        let (s, _, t) = score_chain(&w, &idx, &remote, &ns(), &chain(1));
        assert!((s - 0.8).abs() < 1e-9);
        assert_eq!(t.host, 1);
        idx.remove(&ns(), &key(1), Some(RouteTier::Host));
        let (s, _, t) = score_chain(&w, &idx, &remote, &ns(), &chain(1));
        assert!((s - 0.5).abs() < 1e-9);
        assert_eq!(t.disk, 1);
        assert_eq!(idx.len(), 1);
        idx.remove(&ns(), &key(1), None);
        assert_eq!(idx.len(), 0);
        assert!(idx.blocks.is_empty(), "empty namespaces are dropped");
    }

    #[test]
    fn remote_counts_for_every_node_and_local_beats_it() {
        let w = TierWeights::default();
        let mut remote = RemoteSet::default();
        for k in chain(3) {
            remote.add(ns(), k);
        }
        let empty = NodeIndex::default();
        let mut local = NodeIndex::default();
        local.add(ns(), key(1), RouteTier::Disk);
        let (s, m, t) = score_chain(&w, &empty, &remote, &ns(), &chain(4));
        assert_eq!((m, t.remote), (3, 3));
        assert!((s - 0.75).abs() < 1e-9);
        let (s, m, t) = score_chain(&w, &local, &remote, &ns(), &chain(4));
        assert_eq!((m, t.disk, t.remote), (3, 1, 2));
        assert!((s - 1.0).abs() < 1e-9);
        // A local gap bridged by the remote tier continues the walk.
        local.add(ns(), key(3), RouteTier::Hbm);
        let (_, m, t) = score_chain(&w, &local, &remote, &ns(), &chain(3));
        assert_eq!((m, t.hbm, t.disk, t.remote), (3, 1, 1, 1));
        remote.remove(&ns(), &key(2));
        let (_, m, _) = score_chain(&w, &empty, &remote, &ns(), &chain(3));
        assert_eq!(m, 1);
    }

    #[test]
    fn pick_prefers_score_then_fewer_in_flight_then_earlier() {
        assert_eq!(
            pick(&[cand("a", true, 1.0, 0), cand("b", true, 2.0, 5)]),
            Some(1)
        );
        assert_eq!(
            pick(&[cand("a", true, 2.0, 3), cand("b", true, 2.0, 1)]),
            Some(1)
        );
        assert_eq!(
            pick(&[cand("a", true, 2.0, 1), cand("b", true, 2.0, 1)]),
            Some(0)
        );
        assert_eq!(
            pick(&[
                cand("a", false, 9.0, 0),
                cand("b", true, -4.0, 1),
                cand("c", true, -4.0, 1)
            ]),
            Some(1),
            "unsynced nodes are never chosen, even with a better score"
        );
        assert_eq!(pick(&[cand("a", false, 1.0, 0)]), None);
        assert_eq!(pick(&[]), None);
        assert_eq!(round_score(0.8 + 0.8 + 0.8), 2.4);
        assert_eq!(round_score(-2.4000000000000004), -2.4);
        // Sums of the same weights in another order still tie.
        let x = 0.8 + 0.5 + 0.25;
        let y = 0.25 + 0.8 + 0.5;
        assert_eq!(
            pick(&[cand("a", true, x, 2), cand("b", true, y, 0)]),
            Some(1)
        );
    }
}
