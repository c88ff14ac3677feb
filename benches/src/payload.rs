//! Block payloads that can be verified cheaply.
//!
//! One random buffer of the block size is generated at start from a fixed seed.
//! The payload of key index `k` at version `v` is that buffer with its first 16
//! bytes replaced by `k` (u64 little-endian) and `v` (u64 little-endian).
//! Checking a read is one length check, two integer comparisons and one
//! `memcmp` of the rest against the buffer.
//!
//! Versions come from one counter per run and start at 1, so 0 is never valid
//! and a zeroed header is caught.

use std::fmt;
use std::ops::RangeInclusive;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

/// Bytes of the (key index, version) header at the start of every payload.
pub const HEADER_BYTES: usize = 16;
/// Seed of the shared random buffer ("kvstrata" in ASCII).
pub const BASE_SEED: u64 = 0x6b76_7374_7261_7461;

/// Why a payload read back is not what was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// The daemon answered a different key than requested.
    WrongResultKey,
    /// Payload length differs from the block size.
    Length { got: usize, want: usize },
    /// The header names another key.
    WrongKey { got: u64, want: u64 },
    /// A version older than one already acknowledged for this key.
    Stale { version: u64, oldest_valid: u64 },
    /// A version that was never written for this key.
    UnknownVersion { version: u64, newest_written: u64 },
    /// The bytes after the header differ, first at `offset`.
    Corrupt { offset: usize },
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::WrongResultKey => write!(f, "result names another key"),
            VerifyError::Length { got, want } => {
                write!(f, "payload is {got} bytes, expected {want}")
            }
            VerifyError::WrongKey { got, want } => {
                write!(f, "payload belongs to key #{got}, expected key #{want}")
            }
            VerifyError::Stale {
                version,
                oldest_valid,
            } => write!(
                f,
                "stale payload: version {version}, but version {oldest_valid} was already acknowledged"
            ),
            VerifyError::UnknownVersion {
                version,
                newest_written,
            } => write!(
                f,
                "payload version {version} was never written (newest written: {newest_written})"
            ),
            VerifyError::Corrupt { offset } => {
                write!(
                    f,
                    "payload bytes differ from what was written, first at offset {offset}"
                )
            }
        }
    }
}

/// Makes and checks block payloads of one size.
#[derive(Debug, Clone)]
pub struct PayloadGen {
    base: Vec<u8>,
}

impl PayloadGen {
    /// A generator for blocks of `block_size` bytes (at least [`HEADER_BYTES`];
    /// smaller sizes are raised to it).
    pub fn new(block_size: usize) -> Self {
        let mut base = vec![0u8; block_size.max(HEADER_BYTES)];
        SmallRng::seed_from_u64(BASE_SEED).fill_bytes(&mut base);
        PayloadGen { base }
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> usize {
        self.base.len()
    }

    /// The payload of key index `key` at `version`.
    pub fn block(&self, key: u64, version: u64) -> Bytes {
        let mut v = Vec::with_capacity(self.base.len());
        v.extend_from_slice(&key.to_le_bytes());
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&self.base[HEADER_BYTES..]);
        Bytes::from(v)
    }

    /// Turns `block` (a payload this generator made, of any key and
    /// version, its bytes unchanged since) into the payload of key index
    /// `key` at `version`: only the header differs between payloads.
    pub fn restamp(&self, block: &mut [u8], key: u64, version: u64) -> Result<(), VerifyError> {
        if block.len() != self.base.len() {
            return Err(VerifyError::Length {
                got: block.len(),
                want: self.base.len(),
            });
        }
        block[..8].copy_from_slice(&key.to_le_bytes());
        block[8..HEADER_BYTES].copy_from_slice(&version.to_le_bytes());
        Ok(())
    }

    /// Writes the payload of key index `key` at `version` into `dst` (a
    /// shared-memory region), which must be exactly one block long.
    pub fn write_block(&self, dst: &mut [u8], key: u64, version: u64) -> Result<(), VerifyError> {
        if dst.len() != self.base.len() {
            return Err(VerifyError::Length {
                got: dst.len(),
                want: self.base.len(),
            });
        }
        let (header, body) = dst.split_at_mut(HEADER_BYTES);
        header[..8].copy_from_slice(&key.to_le_bytes());
        header[8..].copy_from_slice(&version.to_le_bytes());
        body.copy_from_slice(&self.base[HEADER_BYTES..]);
        Ok(())
    }

    /// Checks that `payload` is the block of key index `key` at a version in
    /// `versions`; returns the version found.
    pub fn verify(
        &self,
        payload: &[u8],
        key: u64,
        versions: RangeInclusive<u64>,
    ) -> Result<u64, VerifyError> {
        if payload.len() != self.base.len() {
            return Err(VerifyError::Length {
                got: payload.len(),
                want: self.base.len(),
            });
        }
        let (header, body) = payload.split_at(HEADER_BYTES);
        let (k, v) = header.split_at(8);
        let got_key = u64::from_le_bytes(k.try_into().unwrap_or([0; 8]));
        let version = u64::from_le_bytes(v.try_into().unwrap_or([0; 8]));
        if got_key != key {
            return Err(VerifyError::WrongKey {
                got: got_key,
                want: key,
            });
        }
        let expected = &self.base[HEADER_BYTES..];
        if body != expected {
            let offset = body
                .iter()
                .zip(expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0)
                + HEADER_BYTES;
            return Err(VerifyError::Corrupt { offset });
        }
        if version == 0 || version > *versions.end() {
            return Err(VerifyError::UnknownVersion {
                version,
                newest_written: *versions.end(),
            });
        }
        if version < *versions.start() {
            return Err(VerifyError::Stale {
                version,
                oldest_valid: *versions.start(),
            });
        }
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restamped_block_is_the_new_keys_block() {
        let g = PayloadGen::new(4096);
        let mut b = g.block(1, 2).to_vec();
        g.restamp(&mut b, 3, 4).unwrap();
        assert_eq!(b, g.block(3, 4).to_vec());
        assert!(g.restamp(&mut b[..100], 3, 4).is_err());
    }

    #[test]
    fn blocks_carry_key_and_version_and_share_the_body() {
        let g = PayloadGen::new(4096);
        let a = g.block(7, 3);
        let b = g.block(8, 9);
        assert_eq!(a.len(), 4096);
        assert_eq!(&a[..8], &7u64.to_le_bytes());
        assert_eq!(&a[8..16], &3u64.to_le_bytes());
        assert_eq!(&a[16..], &b[16..]);
        assert_ne!(a, b);
        // The body is random, not zeros, and the same in every run.
        assert!(a[16..].iter().any(|&x| x != 0));
        assert_eq!(PayloadGen::new(4096).block(7, 3), a);
    }

    #[test]
    fn written_blocks_equal_built_ones() {
        let g = PayloadGen::new(1000);
        let mut dst = vec![0u8; 1000];
        g.write_block(&mut dst, 9, 4).unwrap();
        assert_eq!(&dst[..], &g.block(9, 4)[..]);
        assert_eq!(g.verify(&dst, 9, 4..=4), Ok(4));
        assert_eq!(
            g.write_block(&mut dst[..999], 9, 4),
            Err(VerifyError::Length {
                got: 999,
                want: 1000
            })
        );
    }

    #[test]
    fn a_good_block_verifies() {
        let g = PayloadGen::new(1000);
        assert_eq!(g.verify(&g.block(5, 10), 5, 1..=20), Ok(10));
        assert_eq!(g.verify(&g.block(5, 10), 5, 10..=10), Ok(10));
        // The smallest block is only a header.
        let h = PayloadGen::new(HEADER_BYTES);
        assert_eq!(h.verify(&h.block(1, 1), 1, 1..=1), Ok(1));
    }

    #[test]
    fn every_kind_of_damage_is_caught() {
        let g = PayloadGen::new(1000);
        let good = g.block(5, 10).to_vec();

        assert_eq!(
            g.verify(&good[..999], 5, 1..=20),
            Err(VerifyError::Length {
                got: 999,
                want: 1000
            })
        );
        assert_eq!(
            g.verify(&[], 5, 1..=20),
            Err(VerifyError::Length { got: 0, want: 1000 })
        );
        assert_eq!(
            g.verify(&good, 6, 1..=20),
            Err(VerifyError::WrongKey { got: 5, want: 6 })
        );
        let mut flipped = good.clone();
        flipped[777] ^= 1;
        assert_eq!(
            g.verify(&flipped, 5, 1..=20),
            Err(VerifyError::Corrupt { offset: 777 })
        );
        let mut last = good.clone();
        last[999] ^= 0x80;
        assert_eq!(
            g.verify(&last, 5, 1..=20),
            Err(VerifyError::Corrupt { offset: 999 })
        );
        assert_eq!(
            g.verify(&good, 5, 11..=20),
            Err(VerifyError::Stale {
                version: 10,
                oldest_valid: 11
            })
        );
        assert_eq!(
            g.verify(&good, 5, 1..=9),
            Err(VerifyError::UnknownVersion {
                version: 10,
                newest_written: 9
            })
        );
        let zero_version = g.block(5, 0);
        assert!(matches!(
            g.verify(&zero_version, 5, 0..=20),
            Err(VerifyError::UnknownVersion { version: 0, .. })
        ));
        let zeros = vec![0u8; 1000];
        assert!(g.verify(&zeros, 0, 0..=20).is_err());
    }

    #[test]
    fn errors_read_well() {
        let e = VerifyError::Stale {
            version: 3,
            oldest_valid: 4,
        };
        assert!(e.to_string().contains("stale"));
        assert!(
            VerifyError::Corrupt { offset: 17 }
                .to_string()
                .contains("17")
        );
    }
}
