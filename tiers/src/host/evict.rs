//! Eviction under pressure with somewhere for the victims to go: the
//! index chooses them under the lock and marks them leaving
//! ([`SlotIndex::reserve`]); the [`EvictionSink`] receives them with the
//! lock released, their bytes still in place; then they leave the index and
//! their slots are reused ([`SlotIndex::finish_leaving`]). See the module
//! docs of [`crate::host`] for why deletes and puts wait for leaving blocks.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use parking_lot::MutexGuard;

use super::HostTier;
use super::index::{Reservation, SlotIndex};
use crate::arena::SlotRef;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;

/// A block the host tier is evicting under pressure, with its bytes still in
/// place. Only blocks nobody was reading and nobody had pinned are chosen.
#[derive(Debug)]
pub struct Victim<'a> {
    pub namespace: &'a NamespaceId,
    pub key: &'a BlockKey,
    pub parent: Option<&'a BlockKey>,
    /// xxh3-64 of the payload.
    pub checksum: u64,
    pub payload: &'a [u8],
}

/// Receives the blocks the host tier evicts to make room (the cache demotes
/// them to disk and to the remote tier). Called with the host tier's lock
/// released, while the victims are still indexed and their slots held: a
/// delete or put of one of their keys waits until this returns, so anything
/// queued here for a victim is queued before that delete or put makes older
/// copies unreachable. It may take other locks and copy the bytes; it must
/// not delete, replace or evict the victims' keys in the host tier (that
/// would wait for itself).
pub trait EvictionSink: Send + Sync {
    fn hand_on(&self, victims: &[Victim<'_>]);
}

/// A leaving block's identity and where its bytes lie.
struct Leaving {
    ns: NamespaceId,
    key: BlockKey,
    parent: Option<BlockKey>,
    checksum: u64,
    offset: usize,
    len: usize,
}

impl HostTier {
    /// A free slot of `len` bytes and its offset, evicting (and handing the
    /// victims to the sink) as needed; `None` if nothing can go.
    pub(super) fn reserve_slot(&self, len: usize) -> Option<(SlotRef, usize)> {
        self.reserve_slots(len, 1).and_then(|mut slots| slots.pop())
    }

    /// [`HostTier::reserve_slot`] of `n` slots under one taking of the lock
    /// (given back only while victims are handed on): all of them, or
    /// `None` with none kept.
    pub(super) fn reserve_slots(&self, len: usize, n: usize) -> Option<Vec<(SlotRef, usize)>> {
        let inner = &*self.inner;
        let sink = inner.sink.get().map(|s| s.as_ref());
        let mut events = Vec::new();
        let mut got: Vec<(SlotRef, usize)> = Vec::with_capacity(n);
        let complete = {
            let mut meta = inner.meta.lock();
            let complete = 'slots: loop {
                if got.len() == n {
                    break true;
                }
                match meta.reserve(len, &mut events, &inner.counters, sink.is_some()) {
                    Reservation::Slot(slot) => {
                        let offset = meta.arena.offset(slot);
                        got.push((slot, offset));
                    }
                    Reservation::Full => break false,
                    Reservation::Leaving(ids) => {
                        let handed = match sink {
                            Some(sink) => self.hand_on(&mut meta, sink, &ids),
                            None => Ok(()),
                        };
                        meta.finish_leaving(&ids, &mut events, &inner.counters);
                        inner.handed_on.notify_all();
                        if let Err(panic) = handed {
                            for (slot, _) in got.drain(..) {
                                meta.arena.free(slot);
                            }
                            drop(meta);
                            inner.events.publish(events);
                            resume_unwind(panic);
                        }
                        continue 'slots;
                    }
                }
            };
            if !complete {
                for (slot, _) in got.drain(..) {
                    meta.arena.free(slot);
                }
            }
            complete
        };
        inner.events.publish(events);
        complete.then_some(got)
    }

    /// Gives the leaving blocks `ids` to the sink with the lock released.
    /// A panic of the sink is returned (after the lock is taken back), so
    /// the blocks still leave and nobody waits for them forever.
    fn hand_on(
        &self,
        meta: &mut MutexGuard<'_, SlotIndex>,
        sink: &dyn EvictionSink,
        ids: &[usize],
    ) -> std::thread::Result<()> {
        let leaving: Vec<Leaving> = ids
            .iter()
            .filter_map(|&id| meta.entries.get(id))
            .map(|e| Leaving {
                ns: e.ns,
                key: e.key,
                parent: e.parent,
                checksum: e.checksum,
                offset: meta.arena.offset(e.slot),
                len: e.len,
            })
            .collect();
        let region = &self.inner.region;
        MutexGuard::unlocked(meta, || {
            let victims: Vec<Victim<'_>> = leaving
                .iter()
                .map(|l| Victim {
                    namespace: &l.ns,
                    key: &l.key,
                    parent: l.parent.as_ref(),
                    checksum: l.checksum,
                    // SAFETY: a leaving block's slot is neither freed nor
                    // written until `finish_leaving`, which runs after this.
                    payload: unsafe { region.slice(l.offset, l.len) },
                })
                .collect();
            catch_unwind(AssertUnwindSafe(|| sink.hand_on(&victims)))
        })
    }
}
