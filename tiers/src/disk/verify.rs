//! Diagnostics over the slots: [`DiskTier::verify`] reads and verifies
//! every indexed slot (optionally dropping the corrupt ones), and
//! [`DiskTier::inspect_header`] reports one slot's header fields and
//! checks without dropping anything (`kvstrata inspect`).

use super::checksum::xxh3_64;
use super::error::DiskError;
use super::file::align_up;
use super::header::{self, CorruptKind, HEADER_REGION, SlotHeader};
use super::io::{IoDone, IoFailure, IoOp, OpKind};
use super::read::ReadOutcome;
use super::{CorruptSlot, DiskTier, HeaderInspection, VerifyReport};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;

impl DiskTier {
    /// Reads and verifies every indexed slot, 32 slots (one batch of
    /// transfers) at a time; blocks for the whole scan.
    /// With `drop_corrupt` the slots that fail are dropped (and counted) as a
    /// read would; otherwise they are only reported.
    pub fn verify(&self, drop_corrupt: bool) -> VerifyReport {
        let inner = &*self.inner;
        let _open = self.enter();
        let mut report = VerifyReport::default();
        let ids: Vec<usize> = inner
            .meta
            .lock()
            .entries
            .iter()
            .filter(|(_, e)| e.live)
            .map(|(id, _)| id)
            .collect();
        for chunk in ids.chunks(32) {
            let plans = {
                let mut meta = inner.meta.lock();
                self.plan_reads(&mut meta, chunk.iter().copied(), false)
            };
            let outcomes = self.read_planned(&plans);
            let mut bad = Vec::new();
            for (p, o) in plans.iter().zip(outcomes) {
                report.scanned += 1;
                match o {
                    ReadOutcome::Good(_) => {}
                    ReadOutcome::Corrupt(kind) => {
                        report.corrupt.push(CorruptSlot {
                            namespace: p.ns,
                            key: p.key,
                            file: inner.files[p.file as usize].path.clone(),
                            offset: p.offset,
                            slot_bytes: p.slot_bytes as u64,
                            reason: kind,
                        });
                        bad.push((p, kind));
                    }
                    ReadOutcome::Failed(f) => report.unreadable.push((p.ns, p.key, f)),
                }
            }
            if drop_corrupt {
                self.drop_corrupt(&bad);
            }
        }
        report
    }

    /// Reads one block's slot and reports its header fields and checks,
    /// without dropping it (a diagnostic, for `kvstrata inspect`).
    pub fn inspect_header(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
    ) -> Result<HeaderInspection, DiskError> {
        let inner = &*self.inner;
        let _open = self.enter();
        let plans = {
            let mut meta = inner.meta.lock();
            let id = meta.lookup(ns, key).ok_or(DiskError::NotFound)?;
            self.plan_reads(&mut meta, [id], false)
        };
        let p = plans.first().ok_or(DiskError::NotFound)?;
        let done = match inner.pool.get(HEADER_REGION + align_up(p.len as usize)) {
            Some(buf) => {
                let fd = inner.files[p.file as usize].fd();
                let op = IoOp {
                    kind: OpKind::Read,
                    fd,
                    offset: p.offset,
                    buf,
                    on_late: None,
                };
                self.transfer(OpKind::Read, vec![op]).pop()
            }
            None => Some(IoDone {
                buf: None,
                result: Err(IoFailure::Errno(libc::ENOMEM)),
            }),
        };
        self.release_reads(&plans);
        let buf = match done {
            Some(IoDone {
                result: Ok(()),
                buf: Some(buf),
            }) => buf,
            Some(IoDone { result: Err(f), .. }) => return Err(DiskError::ReadFailed(f)),
            _ => return Err(DiskError::ReadFailed(IoFailure::Shutdown)),
        };
        let slot = buf.as_slice();
        let header = SlotHeader::decode(slot);
        let payload_xxh3 = usize::try_from(p.len)
            .ok()
            .and_then(|len| slot.get(HEADER_REGION..HEADER_REGION.checked_add(len)?))
            .map_or(0, xxh3_64);
        let want = p.expected();
        let (problem, payload_checksum_ok) = match &header {
            Ok(h) => {
                let end = (HEADER_REGION as u64).saturating_add(h.payload_len);
                let ok = usize::try_from(end)
                    .ok()
                    .and_then(|end| slot.get(HEADER_REGION..end))
                    .is_some_and(|pl| xxh3_64(pl) == h.payload_xxh3);
                let problem = header::check_fields(h, &want)
                    .err()
                    .or((!ok).then_some(CorruptKind::PayloadChecksum));
                (problem, ok)
            }
            Err(kind) => (Some(*kind), false),
        };
        Ok(HeaderInspection {
            file: inner.files[p.file as usize].path.clone(),
            offset: p.offset,
            slot_bytes: p.slot_bytes as u64,
            index_payload_len: p.len,
            index_checksum: p.checksum,
            index_seq: p.seq,
            header,
            problem,
            payload_checksum_ok,
            payload_xxh3,
        })
    }
}
