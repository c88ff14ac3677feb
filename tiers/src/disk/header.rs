//! The self-describing slot header: encoding, decoding and verification.
//!
//! # Slot layout
//!
//! A slot is a 4 KiB header region followed by the payload, padded with zeros
//! to a multiple of 4 KiB: `slot_bytes = 4096 + align_up(payload_len)`. The
//! payload therefore starts 4 KiB-aligned, so a read can later land straight
//! in a caller's aligned buffer. The header occupies the first
//! [`HEADER_LEN`] bytes of the region (little-endian; the rest is zero):
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `KVSTSLOT` |
//! | 8 | 2 | format version ([`FORMAT_VERSION`]) |
//! | 10 | 2 | header length ([`HEADER_LEN`]) |
//! | 12 | 4 | reserved (0) |
//! | 16 | 16 | namespace id |
//! | 32 | 1 | key length (1..=64) |
//! | 33 | 64 | key bytes, zero padded |
//! | 97 | 1 | parent length (0 = no parent) |
//! | 98 | 64 | parent bytes, zero padded |
//! | 162 | 6 | reserved (0) |
//! | 168 | 8 | payload length |
//! | 176 | 8 | xxh3-64 of the payload |
//! | 184 | 8 | write sequence number |
//! | 192 | 8 | xxh3-64 of bytes 0..192 (the header checksum) |
//!
//! A read checks the header checksum, then every field against the index
//! entry, then the payload's xxh3 against both; see [`verify`].

use xxhash_rust::xxh3::xxh3_64;

use crate::key::{BlockKey, MAX_KEY_BYTES};
use crate::namespace::NamespaceId;

/// Size of the header region at the start of every slot.
pub const HEADER_REGION: usize = 4096;
/// Bytes of the region the header uses.
pub const HEADER_LEN: usize = 200;
/// Slot magic.
pub const MAGIC: [u8; 8] = *b"KVSTSLOT";
/// Header format version written by this build.
pub const FORMAT_VERSION: u16 = 1;

const CHECKED_LEN: usize = 192;

/// The decoded header of one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHeader {
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub payload_len: u64,
    pub payload_xxh3: u64,
    pub seq: u64,
}

/// Why a slot failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CorruptKind {
    Magic,
    Version,
    HeaderChecksum,
    /// A length field is out of range (key, parent or header length).
    Malformed,
    Namespace,
    Key,
    Parent,
    Length,
    /// The header's sequence number is not the index's: the slot was
    /// rewritten (or never written) after the index entry was made.
    Sequence,
    /// The header records another payload checksum than the index.
    IndexChecksum,
    /// The payload bytes do not hash to the recorded checksum.
    PayloadChecksum,
}

impl CorruptKind {
    pub fn name(self) -> &'static str {
        match self {
            CorruptKind::Magic => "bad magic",
            CorruptKind::Version => "unknown format version",
            CorruptKind::HeaderChecksum => "header checksum mismatch",
            CorruptKind::Malformed => "malformed header",
            CorruptKind::Namespace => "namespace mismatch",
            CorruptKind::Key => "key mismatch",
            CorruptKind::Parent => "parent mismatch",
            CorruptKind::Length => "payload length mismatch",
            CorruptKind::Sequence => "sequence number mismatch",
            CorruptKind::IndexChecksum => "recorded checksum differs from the index",
            CorruptKind::PayloadChecksum => "payload checksum mismatch",
        }
    }
}

impl std::fmt::Display for CorruptKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl SlotHeader {
    /// Writes the header region (`out` must hold at least [`HEADER_REGION`]
    /// bytes; the whole region is overwritten).
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_REGION];
        out.fill(0);
        out[0..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        out[16..32].copy_from_slice(self.namespace.as_bytes());
        let key = self.key.as_bytes();
        out[32] = key.len() as u8;
        out[33..33 + key.len()].copy_from_slice(key);
        if let Some(p) = &self.parent {
            let p = p.as_bytes();
            out[97] = p.len() as u8;
            out[98..98 + p.len()].copy_from_slice(p);
        }
        out[168..176].copy_from_slice(&self.payload_len.to_le_bytes());
        out[176..184].copy_from_slice(&self.payload_xxh3.to_le_bytes());
        out[184..192].copy_from_slice(&self.seq.to_le_bytes());
        let sum = xxh3_64(&out[..CHECKED_LEN]);
        out[192..200].copy_from_slice(&sum.to_le_bytes());
    }

    /// Decodes a header region, checking magic, version and header checksum,
    /// and that every reserved or padding byte is zero: a header that decodes
    /// is exactly the one [`SlotHeader::encode`] writes for the result.
    pub fn decode(region: &[u8]) -> Result<SlotHeader, CorruptKind> {
        if region.len() < HEADER_LEN {
            return Err(CorruptKind::Malformed);
        }
        if region[0..8] != MAGIC {
            return Err(CorruptKind::Magic);
        }
        if u16_at(region, 8) != FORMAT_VERSION {
            return Err(CorruptKind::Version);
        }
        if xxh3_64(&region[..CHECKED_LEN]) != u64_at(region, 192) {
            return Err(CorruptKind::HeaderChecksum);
        }
        if u16_at(region, 10) as usize != HEADER_LEN {
            return Err(CorruptKind::Malformed);
        }
        let mut ns = [0u8; 16];
        ns.copy_from_slice(&region[16..32]);
        let key_len = region[32] as usize;
        if key_len == 0 || key_len > MAX_KEY_BYTES {
            return Err(CorruptKind::Malformed);
        }
        let key =
            BlockKey::new("key", &region[33..33 + key_len]).map_err(|_| CorruptKind::Malformed)?;
        let parent_len = region[97] as usize;
        let parent = match parent_len {
            0 => None,
            n if n <= MAX_KEY_BYTES => Some(
                BlockKey::new("parent", &region[98..98 + n]).map_err(|_| CorruptKind::Malformed)?,
            ),
            _ => return Err(CorruptKind::Malformed),
        };
        let zeros = [
            &region[12..16],
            &region[33 + key_len..97],
            &region[98 + parent_len..168],
        ];
        if zeros.iter().any(|z| z.iter().any(|&b| b != 0)) {
            return Err(CorruptKind::Malformed);
        }
        Ok(SlotHeader {
            namespace: NamespaceId(ns),
            key,
            parent,
            payload_len: u64_at(region, 168),
            payload_xxh3: u64_at(region, 176),
            seq: u64_at(region, 184),
        })
    }
}

/// What the index says a slot holds.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub namespace: &'a NamespaceId,
    pub key: &'a BlockKey,
    pub parent: Option<&'a BlockKey>,
    pub payload_len: u64,
    pub checksum: u64,
    pub seq: u64,
}

/// Checks a slot's bytes (`slot` starts with the header region and holds at
/// least the payload) against the index. `Ok` means the payload,
/// `slot[HEADER_REGION..HEADER_REGION + payload_len]`, is exactly what was
/// written under that key.
pub fn verify(slot: &[u8], want: &Expected<'_>) -> Result<SlotHeader, CorruptKind> {
    let header = SlotHeader::decode(slot)?;
    check_fields(&header, want)?;
    let end = HEADER_REGION
        .checked_add(usize::try_from(header.payload_len).map_err(|_| CorruptKind::Length)?)
        .ok_or(CorruptKind::Length)?;
    let payload = slot.get(HEADER_REGION..end).ok_or(CorruptKind::Length)?;
    // The payload's hash on the fast path (same function as xxh3_64).
    if super::checksum::xxh3_64(payload) != header.payload_xxh3 {
        return Err(CorruptKind::PayloadChecksum);
    }
    Ok(header)
}

/// Compares a decoded header with the index entry (no payload check).
pub fn check_fields(header: &SlotHeader, want: &Expected<'_>) -> Result<(), CorruptKind> {
    if &header.namespace != want.namespace {
        return Err(CorruptKind::Namespace);
    }
    if &header.key != want.key {
        return Err(CorruptKind::Key);
    }
    if header.payload_len != want.payload_len {
        return Err(CorruptKind::Length);
    }
    if header.seq != want.seq {
        return Err(CorruptKind::Sequence);
    }
    if header.payload_xxh3 != want.checksum {
        return Err(CorruptKind::IndexChecksum);
    }
    if header.parent.as_ref() != want.parent {
        return Err(CorruptKind::Parent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (SlotHeader, Vec<u8>) {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let h = SlotHeader {
            namespace: NamespaceId([3; 16]),
            key: BlockKey::new("k", b"key-1").unwrap(),
            parent: Some(BlockKey::new("p", b"key-0").unwrap()),
            payload_len: payload.len() as u64,
            payload_xxh3: xxh3_64(&payload),
            seq: 42,
        };
        let mut slot = vec![0xAAu8; HEADER_REGION + 8192];
        h.encode(&mut slot);
        slot[HEADER_REGION..HEADER_REGION + payload.len()].copy_from_slice(&payload);
        (h, slot)
    }

    fn want(h: &SlotHeader) -> Expected<'_> {
        Expected {
            namespace: &h.namespace,
            key: &h.key,
            parent: h.parent.as_ref(),
            payload_len: h.payload_len,
            checksum: h.payload_xxh3,
            seq: h.seq,
        }
    }

    #[test]
    fn round_trip() {
        let (h, slot) = sample();
        assert_eq!(SlotHeader::decode(&slot).unwrap(), h);
        assert_eq!(verify(&slot, &want(&h)).unwrap(), h);
        assert!(slot[HEADER_LEN..HEADER_REGION].iter().all(|&b| b == 0));
    }

    #[test]
    fn every_header_byte_is_covered() {
        let (h, slot) = sample();
        for i in 0..HEADER_LEN {
            let mut bad = slot.clone();
            bad[i] ^= 0x01;
            assert!(
                verify(&bad, &want(&h)).is_err(),
                "flip at {i} went unnoticed"
            );
        }
    }

    #[test]
    fn mismatches_are_named() {
        let (h, mut slot) = sample();
        let mut w = want(&h);
        w.seq = 41;
        assert_eq!(verify(&slot, &w), Err(CorruptKind::Sequence));
        let other = NamespaceId([4; 16]);
        let mut w = want(&h);
        w.namespace = &other;
        assert_eq!(verify(&slot, &w), Err(CorruptKind::Namespace));
        slot[HEADER_REGION + 10] ^= 0x80;
        assert_eq!(verify(&slot, &want(&h)), Err(CorruptKind::PayloadChecksum));
        slot[0] = b'X';
        assert_eq!(verify(&slot, &want(&h)), Err(CorruptKind::Magic));
    }
}
