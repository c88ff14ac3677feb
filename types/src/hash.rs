//! The canonical chained block hash (specified, with test vectors, in `docs/hashing.md`).
//!
//! `h_0` is the 16-byte namespace id; `h_i = xxh3_128(h_{i-1} || tokens of block i
//! as u32 little-endian)`, each `h_i` written as `u128::to_le_bytes()`. A key thus
//! names a whole prefix: the same tokens under another namespace, or after another
//! prefix, get another key. No seed, no language hash: the keys are the same in
//! every process, on every machine and in every language.

use crate::namespace::NamespaceId;
use xxhash_rust::xxh3::xxh3_128;

/// A block key of the canonical chain: 16 bytes.
pub type BlockHash = [u8; 16];

/// The key of the block after `prev` (a key, or the namespace id for the first
/// block) holding the tokens `block`.
pub fn next_block_key(prev: &BlockHash, block: &[u32]) -> BlockHash {
    let mut buf = Vec::with_capacity(16 + 4 * block.len());
    chain_step(&mut buf, prev, block)
}

/// The keys of every full block of `tokens` under namespace `ns`, first block
/// first. A trailing partial block gets no key; `block_tokens` 0 gives no keys.
pub fn block_keys(ns: &NamespaceId, tokens: &[u32], block_tokens: usize) -> Vec<BlockHash> {
    chain_keys(ns.as_bytes(), tokens, block_tokens)
}

/// Like [`block_keys`], continuing a chain after the key `prev` (for tokens that
/// extend a prefix whose keys are already known).
pub fn chain_keys(prev: &BlockHash, tokens: &[u32], block_tokens: usize) -> Vec<BlockHash> {
    if block_tokens == 0 {
        return Vec::new();
    }
    let mut keys = Vec::with_capacity(tokens.len() / block_tokens);
    let mut buf = Vec::with_capacity(16 + 4 * block_tokens);
    let mut h = *prev;
    for block in tokens.chunks_exact(block_tokens) {
        h = chain_step(&mut buf, &h, block);
        keys.push(h);
    }
    keys
}

fn chain_step(buf: &mut Vec<u8>, prev: &BlockHash, block: &[u32]) -> BlockHash {
    buf.clear();
    buf.extend_from_slice(prev);
    for t in block {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_128(buf).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::{Dtype, NamespaceSpec};

    fn ns() -> NamespaceId {
        NamespaceSpec::layer_major("SmolLM2-135M-Instruct", 30, 3, 64, Dtype::F16, 16)
            .id()
            .unwrap()
    }

    #[test]
    fn chain_matches_step_by_step() {
        let tokens: Vec<u32> = (0..50).collect();
        let keys = block_keys(&ns(), &tokens, 16);
        assert_eq!(keys.len(), 3, "the partial block of 2 tokens gets no key");
        let mut h = *ns().as_bytes();
        for (i, k) in keys.iter().enumerate() {
            h = next_block_key(&h, &tokens[i * 16..(i + 1) * 16]);
            assert_eq!(&h, k);
        }
        assert_eq!(chain_keys(&keys[0], &tokens[16..], 16), keys[1..]);
    }

    #[test]
    fn step_is_xxh3_128_of_prev_and_le_tokens() {
        let prev = [7u8; 16];
        let mut input = prev.to_vec();
        input.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        let want = xxh3_128(&input).to_le_bytes();
        assert_eq!(next_block_key(&prev, &[1, u32::MAX]), want);
        let mut streaming = xxhash_rust::xxh3::Xxh3::new();
        streaming.update(&prev);
        streaming.update(&[1, 0, 0, 0]);
        streaming.update(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(streaming.digest128().to_le_bytes(), want);
    }

    #[test]
    fn keys_depend_on_prefix_and_namespace() {
        let a: Vec<u32> = (0..32).collect();
        let mut b = a.clone();
        b[0] = 99;
        let ka = block_keys(&ns(), &a, 16);
        let kb = block_keys(&ns(), &b, 16);
        assert_ne!(ka[0], kb[0]);
        assert_ne!(
            ka[1], kb[1],
            "block 1 is the same tokens after another prefix"
        );
        let other = NamespaceId([1; 16]);
        assert_ne!(block_keys(&other, &a, 16), ka);
    }

    #[test]
    fn degenerate_inputs() {
        assert!(block_keys(&ns(), &[1, 2, 3], 0).is_empty());
        assert!(block_keys(&ns(), &[1, 2, 3], 4).is_empty());
        assert!(block_keys(&ns(), &[], 16).is_empty());
        assert_eq!(block_keys(&ns(), &[5], 1).len(), 1);
    }
}
