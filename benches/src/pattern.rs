//! The stamped payloads of `bench-disk` and `bench-remote`, and their
//! byte-for-byte check.
//!
//! One pseudo-random buffer of the block size (splitmix64 from a fixed
//! seed) with a 16-byte stamp (block index, page number) at the start of
//! every 4 KiB page: blocks are distinct, a page read from the wrong place
//! is caught, and making a block's payload costs one copy of the base
//! buffer plus its stamps.

/// Stamp stride: every 4 KiB page of a payload starts with a stamp.
pub(crate) const PAGE: usize = 4096;
/// Bytes of a stamp: block index and page number, little-endian u64s.
pub(crate) const STAMP: usize = 16;
/// Seed of the payload (and of bench-disk's read order).
pub(crate) const SEED: u64 = 0x6b76_7374_7261_7461;

/// Payloads and their check.
pub(crate) struct Pattern {
    base: Vec<u8>,
}

impl Pattern {
    pub(crate) fn new(len: usize) -> Self {
        let mut x = SEED;
        let mut base = Vec::with_capacity(len + 8);
        while base.len() < len {
            // splitmix64
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            base.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        base.truncate(len);
        Pattern { base }
    }

    fn stamp(index: u64, page: usize) -> [u8; STAMP] {
        let mut s = [0u8; STAMP];
        s[..8].copy_from_slice(&index.to_le_bytes());
        s[8..].copy_from_slice(&(page as u64).to_le_bytes());
        s
    }

    /// A copy of the base buffer, for [`Pattern::fill`] to stamp.
    pub(crate) fn unstamped(&self) -> Vec<u8> {
        self.base.clone()
    }

    /// Block `index`'s payload, in a new buffer.
    pub(crate) fn payload(&self, index: u64) -> bytes::Bytes {
        let mut buf = self.unstamped();
        self.fill(index, &mut buf);
        bytes::Bytes::from(buf)
    }

    /// Turns a copy of the base buffer into block `index`'s payload.
    pub(crate) fn fill(&self, index: u64, buf: &mut [u8]) {
        for (page, chunk) in buf.chunks_mut(PAGE).enumerate() {
            let s = Self::stamp(index, page);
            let n = chunk.len().min(STAMP);
            chunk[..n].copy_from_slice(&s[..n]);
        }
    }

    /// `None` when `got` is block `index`'s payload, else what differs.
    pub(crate) fn check(&self, index: u64, got: &[u8]) -> Option<String> {
        if got.len() != self.base.len() {
            return Some(format!(
                "block {index}: {} bytes, expected {}",
                got.len(),
                self.base.len()
            ));
        }
        for (page, (g, b)) in got.chunks(PAGE).zip(self.base.chunks(PAGE)).enumerate() {
            let s = Self::stamp(index, page);
            let n = g.len().min(STAMP);
            if g[..n] != s[..n] || g[n..] != b[n..] {
                let at = g
                    .iter()
                    .zip(s[..n].iter().chain(&b[n..]))
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Some(format!(
                    "block {index}: byte {} differs (page {page})",
                    page * PAGE + at
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_catches_wrong_blocks_and_pages() {
        let p = Pattern::new(3 * PAGE + 100);
        let mut a = p.base.clone();
        p.fill(7, &mut a);
        assert_eq!(p.check(7, &a), None);
        assert!(p.check(8, &a).is_some());
        let mut b = a.clone();
        b[PAGE + 20] ^= 1;
        let why = p.check(7, &b).unwrap();
        assert!(why.contains(&format!("byte {}", PAGE + 20)), "{why}");
        // A page of another block in the right place.
        let mut c = p.base.clone();
        p.fill(9, &mut c);
        a[2 * PAGE..3 * PAGE].copy_from_slice(&c[2 * PAGE..3 * PAGE]);
        assert!(p.check(7, &a).is_some());
        assert!(p.check(7, &a[..10]).is_some());
    }

    #[test]
    fn pattern_catches_wrong_blocks() {
        let p = Pattern::new(2 * PAGE + 10);
        let a = p.payload(3);
        assert_eq!(p.check(3, &a), None);
        assert!(p.check(4, &a).is_some());
        let mut b = a.to_vec();
        b[PAGE + 100] ^= 1;
        assert!(
            p.check(3, &b)
                .unwrap()
                .contains(&format!("byte {}", PAGE + 100))
        );
        assert!(p.check(3, &a[..10]).is_some());
        assert_ne!(p.payload(1), p.payload(2));
    }
}
