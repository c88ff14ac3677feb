//! How a block is stored on the cluster: its Redis key and its value.
//!
//! - **Key**: `<prefix>:<namespace id hex>:<block key hex>`, ASCII, so an
//!   operator can find blocks with `redis-cli --cluster call ... SCAN`. No
//!   `{...}` hash tag: blocks spread over every slot of the cluster.
//! - **Value**: the first [`HEADER_LEN`] bytes of the disk tier's slot header
//!   (magic, format version, namespace id, key, parent, payload length,
//!   xxh3-64 of the payload, write sequence, header checksum; see
//!   [`crate::disk::header`]) followed by the payload.
//!
//! [`decode`] accepts a value only if the header verifies, names the
//! namespace and key that were asked for, and the payload has the recorded
//! length (the namespace's block size) and checksum. Anything else is a miss.

use bytes::Bytes;
use xxhash_rust::xxh3::xxh3_64;

use crate::disk::header::{CorruptKind, HEADER_LEN, HEADER_REGION, SlotHeader};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;

/// The Redis key of a block.
pub fn redis_key(prefix: &str, ns: &NamespaceId, key: &BlockKey) -> String {
    let mut s = String::with_capacity(prefix.len() + 2 + 32 + 2 * key.as_bytes().len());
    s.push_str(prefix);
    s.push(':');
    s.push_str(&ns.to_hex());
    s.push(':');
    s.push_str(&hex::encode(key.as_bytes()));
    s
}

/// The value stored for a block: header, then payload.
pub fn encode(
    ns: &NamespaceId,
    key: &BlockKey,
    parent: Option<&BlockKey>,
    payload: &[u8],
    seq: u64,
) -> Vec<u8> {
    let header = SlotHeader {
        namespace: *ns,
        key: *key,
        parent: parent.copied(),
        payload_len: payload.len() as u64,
        payload_xxh3: xxh3_64(payload),
        seq,
    };
    let mut region = [0u8; HEADER_REGION];
    header.encode(&mut region);
    let mut value = Vec::with_capacity(HEADER_LEN + payload.len());
    value.extend_from_slice(&region[..HEADER_LEN]);
    value.extend_from_slice(payload);
    value
}

/// A verified block read from the cluster.
#[derive(Debug, Clone)]
pub struct RemoteBlock {
    pub payload: Bytes,
    pub parent: Option<BlockKey>,
    pub seq: u64,
}

/// Verifies a value read under (`ns`, `key`) and returns its payload (a
/// slice of `value`, no copy). `block_bytes`: the namespace's block size.
pub fn decode(
    value: Bytes,
    ns: &NamespaceId,
    key: &BlockKey,
    block_bytes: u64,
) -> Result<RemoteBlock, CorruptKind> {
    decode_checked(value, ns, key, Some(block_bytes))
}

/// [`decode`] with the payload length to expect, if known (`None`: the
/// length the header records, still checked against the value's).
pub(crate) fn decode_checked(
    value: Bytes,
    ns: &NamespaceId,
    key: &BlockKey,
    block_bytes: Option<u64>,
) -> Result<RemoteBlock, CorruptKind> {
    let header = SlotHeader::decode(&value)?;
    if header.namespace != *ns {
        return Err(CorruptKind::Namespace);
    }
    if header.key != *key {
        return Err(CorruptKind::Key);
    }
    let payload_len = (value.len() - HEADER_LEN) as u64;
    if header.payload_len != payload_len || block_bytes.is_some_and(|len| len != payload_len) {
        return Err(CorruptKind::Length);
    }
    let payload = value.slice(HEADER_LEN..);
    if xxh3_64(&payload) != header.payload_xxh3 {
        return Err(CorruptKind::PayloadChecksum);
    }
    Ok(RemoteBlock {
        payload,
        parent: header.parent,
        seq: header.seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(b: u8) -> NamespaceId {
        NamespaceId([b; 16])
    }

    fn k(s: &str) -> BlockKey {
        BlockKey::new("k", s.as_bytes()).unwrap()
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn round_trip_keeps_bytes_and_parent() {
        let p = payload(4099);
        let v = encode(&ns(1), &k("a"), Some(&k("p")), &p, 42);
        assert_eq!(v.len(), HEADER_LEN + p.len());
        let b = decode(Bytes::from(v), &ns(1), &k("a"), p.len() as u64).unwrap();
        assert_eq!(&b.payload[..], &p[..]);
        assert_eq!(b.parent, Some(k("p")));
        assert_eq!(b.seq, 42);
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let p = payload(300);
        let v = encode(&ns(1), &k("a"), None, &p, 7);
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x10;
            // Bytes 12..16 and the zero padding of key/parent are covered by
            // the header checksum too, so every flip must fail.
            assert!(
                decode(Bytes::from(bad), &ns(1), &k("a"), p.len() as u64).is_err(),
                "flip at {i} accepted"
            );
        }
    }

    #[test]
    fn wrong_namespace_key_length_or_truncation_is_refused() {
        let p = payload(64);
        let v = Bytes::from(encode(&ns(1), &k("a"), None, &p, 1));
        assert_eq!(
            decode(v.clone(), &ns(2), &k("a"), 64).unwrap_err(),
            CorruptKind::Namespace
        );
        assert_eq!(
            decode(v.clone(), &ns(1), &k("b"), 64).unwrap_err(),
            CorruptKind::Key
        );
        assert_eq!(
            decode(v.clone(), &ns(1), &k("a"), 128).unwrap_err(),
            CorruptKind::Length
        );
        assert!(decode(v.slice(..v.len() - 1), &ns(1), &k("a"), 64).is_err());
        assert!(decode(v.slice(..10), &ns(1), &k("a"), 64).is_err());
        assert!(decode(Bytes::new(), &ns(1), &k("a"), 64).is_err());
    }

    #[test]
    fn keys_are_ascii_and_distinct_per_namespace() {
        let a = redis_key("kvstrata", &ns(1), &k("a"));
        let b = redis_key("kvstrata", &ns(2), &k("a"));
        assert_ne!(a, b);
        assert!(a.starts_with("kvstrata:01010101"));
        assert!(a.ends_with(":61"));
        assert!(!a.contains('{'));
    }
}
