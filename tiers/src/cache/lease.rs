//! Pins and leases: `Pin` pins every key in the fastest tier holding it
//! (all or none) for a lease that ends at `Unpin` or its deadline
//! ([`BlockCache::expire_leases`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::{BlockCache, LeaseInfo, unix_ms};
use crate::error::CacheError;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::PinToken;

/// The first lease id of a cache: a random point in 1..2^63 (std's randomly
/// keyed hasher, seeded from the OS), so a lease id a client kept across a
/// daemon restart names no lease of the new run (odds about n / 2^63 after n
/// pins) and cannot end another client's pins. Counting up from there never
/// reaches 0.
pub(super) fn first_lease_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (random >> 1).max(1)
}

/// A granted lease: the pins it holds and when it ends.
pub(super) struct Lease {
    tokens: Vec<PinToken>,
    deadline: Instant,
}

impl BlockCache {
    /// Pins every key (all or none) until `lease` has passed or `unpin`.
    pub fn pin(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        lease: Duration,
    ) -> Result<LeaseInfo, CacheError> {
        self.namespace("namespace_id", ns)?;
        if lease.is_zero() {
            return Err(CacheError::invalid("lease_ms", "must be at least 1"));
        }
        if lease > self.config.max_lease {
            return Err(CacheError::invalid(
                "lease_ms",
                format!(
                    "{} ms exceeds the limit of {} ms",
                    lease.as_millis(),
                    self.config.max_lease.as_millis()
                ),
            ));
        }
        if keys.is_empty() {
            return Err(CacheError::invalid("keys", "must name at least one block"));
        }
        let tokens = self.pin_all(ns, keys)?;
        let lease_id = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + lease;
        self.leases
            .lock()
            .insert(lease_id, Lease { tokens, deadline });
        Ok(LeaseInfo {
            lease_id,
            deadline_unix_ms: unix_ms(SystemTime::now() + lease),
        })
    }

    /// Pins each key in the fastest tier holding it; all or none.
    fn pin_all(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<PinToken>, CacheError> {
        let not_cached = |i: usize| CacheError::BlockNotCached {
            field: format!("keys[{i}]"),
            key: keys[i].to_string(),
        };
        let mut tokens = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let pinned = self
                .tiers
                .iter()
                .find_map(|t| t.pin(ns, std::slice::from_ref(k)).ok());
            match pinned {
                Some(mut t) => tokens.append(&mut t),
                None => {
                    for t in &tokens {
                        self.unpin_token(t);
                    }
                    return Err(not_cached(i));
                }
            }
        }
        Ok(tokens)
    }

    fn unpin_token(&self, token: &PinToken) {
        // Several HBM tiers share a kind; incarnations are disjoint between
        // tiers, so only the one that issued the token matches it.
        for t in self.tiers.iter().filter(|t| t.kind() == token.tier) {
            t.unpin(token);
        }
    }

    /// The namespace whose blocks a lease pins (a lease pins in one
    /// namespace); `None` for an unknown, ended or expired lease.
    pub fn lease_namespace(&self, lease_id: u64) -> Option<NamespaceId> {
        let leases = self.leases.lock();
        leases
            .get(&lease_id)
            .and_then(|l| l.tokens.first())
            .map(|t| t.namespace)
    }

    /// Ends a lease.
    pub fn unpin(&self, lease_id: u64) -> Result<(), CacheError> {
        let lease = self
            .leases
            .lock()
            .remove(&lease_id)
            .ok_or(CacheError::LeaseNotFound(lease_id))?;
        self.release(&lease);
        Ok(())
    }

    fn release(&self, lease: &Lease) {
        for t in &lease.tokens {
            self.unpin_token(t);
        }
    }

    /// Ends every lease past its deadline; returns how many ended.
    pub fn expire_leases(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<Lease> = {
            let mut leases = self.leases.lock();
            let ids: Vec<u64> = leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| leases.remove(&id))
                .collect()
        };
        for l in &expired {
            self.release(l);
        }
        expired.len()
    }
}
