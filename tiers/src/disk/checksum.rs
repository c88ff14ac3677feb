//! xxh3-64 of slot payloads, fast: the same function as
//! [`xxhash_rust::xxh3::xxh3_64`] (bit for bit; the tests compare them on
//! every length class), with an AVX2 path chosen at run time.
//!
//! xxhash-rust picks its SIMD path at compile time; a build without
//! `-C target-feature=+avx2` gets SSE2, which hashes at about half the AVX2
//! rate. The disk tier hashes every payload it writes and every payload it
//! reads, so this module carries its own AVX2 version of xxh3's long-input
//! loop (inputs over 240 bytes) behind `is_x86_feature_detected!`, and a
//! fused variant, [`copy_and_xxh3_64`], that hashes a payload while copying
//! it into its aligned I/O buffer: each 32-byte load feeds both the store and
//! the hash, so the payload is read from memory once instead of twice.
//!
//! Inputs of at most 240 bytes, CPUs without AVX2, and processes started
//! with `KVSTRATA_XXH3_SIMD=0` (to compare, or to rule this code out) use
//! xxhash-rust, and copy with `copy_from_slice`.

use xxhash_rust::xxh3::xxh3_64 as xxh3_64_ref;

/// Longest input xxh3 hashes with its short-input paths.
const MID_SIZE_MAX: usize = 240;

/// xxh3-64 (seed 0, default secret) of `data`.
pub fn xxh3_64(data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if data.len() > MID_SIZE_MAX && avx2::available() {
        // SAFETY: AVX2 is available (checked above); `data` is a live
        // slice of more than 240 bytes and no destination is given.
        return unsafe { avx2::long(data.as_ptr(), data.len(), std::ptr::null_mut()) };
    }
    xxh3_64_ref(data)
}

/// Copies `src` into `dst` (which must be exactly as long) and returns
/// [`xxh3_64`] of it, reading `src` once where the CPU allows.
///
/// # Panics
///
/// If the lengths differ.
pub fn copy_and_xxh3_64(dst: &mut [u8], src: &[u8]) -> u64 {
    assert_eq!(dst.len(), src.len(), "copy_and_xxh3_64: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if src.len() > MID_SIZE_MAX && avx2::available() {
        // SAFETY: AVX2 is available; `src` and `dst` are live, distinct
        // (one is borrowed shared, the other exclusively) slices of the
        // same length, over 240 bytes.
        return unsafe { avx2::long(src.as_ptr(), src.len(), dst.as_mut_ptr()) };
    }
    dst.copy_from_slice(src);
    xxh3_64_ref(src)
}

/// Whether [`xxh3_64`] runs on its AVX2 path on this CPU.
pub fn simd_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return "avx2";
    }
    "xxhash-rust"
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    const STRIPE_LEN: usize = 64;
    const SECRET_SIZE: usize = 192;
    const SECRET_CONSUME_RATE: usize = 8;
    const STRIPES_PER_BLOCK: usize = (SECRET_SIZE - STRIPE_LEN) / SECRET_CONSUME_RATE;
    const BLOCK_LEN: usize = STRIPE_LEN * STRIPES_PER_BLOCK;
    const SECRET_MERGEACCS_START: usize = 11;
    const SECRET_LASTACC_START: usize = 7;

    use kvstrata_kernels::xxh3::{INITIAL_ACC, PRIME32_1, PRIME64_1};

    /// xxh3's default secret (the kernels crate's table).
    static SECRET: [u8; SECRET_SIZE] = kvstrata_kernels::xxh3::DEFAULT_SECRET;

    pub(super) fn available() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::env::var_os("KVSTRATA_XXH3_SIMD").is_none_or(|v| v != "0")
        })
    }

    /// One 64-byte stripe into the accumulators (xxh3's `accumulate_512`),
    /// storing the stripe at `dst` too when `dst` is not null.
    ///
    /// # Safety
    ///
    /// AVX2 is available; `input` and `secret` are readable for 64 bytes;
    /// `dst`, if not null, is writable for 64 bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn stripe(acc: &mut [__m256i; 2], input: *const u8, secret: *const u8, dst: *mut u8) {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: within the 64 bytes the caller vouches for.
            unsafe {
                let data = _mm256_loadu_si256(input.add(32 * i).cast());
                if !dst.is_null() {
                    _mm256_storeu_si256(dst.add(32 * i).cast(), data);
                }
                let key = _mm256_loadu_si256(secret.add(32 * i).cast());
                let data_key = _mm256_xor_si256(data, key);
                let data_key_lo = _mm256_srli_epi64(data_key, 32);
                let product = _mm256_mul_epu32(data_key, data_key_lo);
                // Swap the two 64-bit halves of each 128-bit lane.
                let swapped = _mm256_shuffle_epi32(data, 0b01_00_11_10);
                *a = _mm256_add_epi64(product, _mm256_add_epi64(*a, swapped));
            }
        }
    }

    /// xxh3's `scramble_acc`, with the last 64 bytes of the secret.
    ///
    /// # Safety
    ///
    /// AVX2 is available.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scramble(acc: &mut [__m256i; 2]) {
        let secret = SECRET[SECRET_SIZE - STRIPE_LEN..].as_ptr();
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: the secret slice holds 64 bytes.
            unsafe {
                let prime = _mm256_set1_epi32(PRIME32_1 as i32);
                let shifted = _mm256_srli_epi64(*a, 47);
                let data = _mm256_xor_si256(*a, shifted);
                let key = _mm256_loadu_si256(secret.add(32 * i).cast());
                let data_key = _mm256_xor_si256(data, key);
                let data_key_hi = _mm256_srli_epi64(data_key, 32);
                let lo = _mm256_mul_epu32(data_key, prime);
                let hi = _mm256_mul_epu32(data_key_hi, prime);
                *a = _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
            }
        }
    }

    fn read_u64(bytes: &[u8], at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    }

    fn mul128_fold64(a: u64, b: u64) -> u64 {
        let p = u128::from(a) * u128::from(b);
        (p as u64) ^ ((p >> 64) as u64)
    }

    fn avalanche(mut h: u64) -> u64 {
        h ^= h >> 37;
        h = h.wrapping_mul(0x1656_6791_9E37_79F9);
        h ^ (h >> 32)
    }

    /// xxh3-64 of the `len` bytes at `src` (`len` > 240), copying them to
    /// `dst` as well when `dst` is not null.
    ///
    /// # Safety
    ///
    /// AVX2 is available; `src` is readable for `len` bytes; `dst`, if not
    /// null, is writable for `len` bytes and does not overlap `src`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn long(src: *const u8, len: usize, dst: *mut u8) -> u64 {
        debug_assert!(len > super::MID_SIZE_MAX);
        let secret = SECRET.as_ptr();
        // SAFETY: plain loads of the constant initial accumulators.
        let mut acc: [__m256i; 2] = unsafe {
            [
                _mm256_loadu_si256(INITIAL_ACC.as_ptr().cast()),
                _mm256_loadu_si256(INITIAL_ACC.as_ptr().add(4).cast()),
            ]
        };
        let at = |base: *mut u8, off: usize| {
            if base.is_null() {
                base
            } else {
                // SAFETY: `off < len` at every use, within `dst`.
                unsafe { base.add(off) }
            }
        };
        let blocks = (len - 1) / BLOCK_LEN;
        for b in 0..blocks {
            for s in 0..STRIPES_PER_BLOCK {
                let off = b * BLOCK_LEN + s * STRIPE_LEN;
                // SAFETY: `off + 64 <= blocks * BLOCK_LEN < len`; the
                // secret offset `s * 8 + 64 <= 192`.
                unsafe {
                    stripe(
                        &mut acc,
                        src.add(off),
                        secret.add(s * SECRET_CONSUME_RATE),
                        at(dst, off),
                    )
                };
            }
            // SAFETY: AVX2 is available (this function's contract).
            unsafe { scramble(&mut acc) };
        }
        // The last, partial block: whole stripes, up to but excluding the final byte.
        let base = blocks * BLOCK_LEN;
        let stripes = ((len - 1) - base) / STRIPE_LEN;
        for s in 0..stripes {
            let off = base + s * STRIPE_LEN;
            // SAFETY: `off + 64 <= len - 1`; `s < 16`, so the secret offset
            // stays within its 192 bytes.
            unsafe {
                stripe(
                    &mut acc,
                    src.add(off),
                    secret.add(s * SECRET_CONSUME_RATE),
                    at(dst, off),
                )
            };
        }
        let copied = base + stripes * STRIPE_LEN;
        if !dst.is_null() {
            // SAFETY: `copied < len`; both ranges are within their buffers
            // and do not overlap (the caller's contract).
            unsafe {
                std::ptr::copy_nonoverlapping(src.add(copied), dst.add(copied), len - copied)
            };
        }
        // The last stripe: the final 64 bytes, with its own secret offset.
        // SAFETY: `len > 64`; the secret offset `192 - 64 - 7` leaves 64 bytes.
        unsafe {
            stripe(
                &mut acc,
                src.add(len - STRIPE_LEN),
                secret.add(SECRET_SIZE - STRIPE_LEN - SECRET_LASTACC_START),
                std::ptr::null_mut(),
            )
        };
        let mut lanes = [0u64; 8];
        // SAFETY: `lanes` holds 64 writable bytes.
        unsafe {
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc[0]);
            _mm256_storeu_si256(lanes.as_mut_ptr().add(4).cast(), acc[1]);
        }
        let mut h = (len as u64).wrapping_mul(PRIME64_1);
        for i in 0..4 {
            let k = SECRET_MERGEACCS_START + 16 * i;
            h = h.wrapping_add(mul128_fold64(
                lanes[2 * i] ^ read_u64(&SECRET, k),
                lanes[2 * i + 1] ^ read_u64(&SECRET, k + 8),
            ));
        }
        avalanche(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (x >> 33) as u8
            })
            .collect()
    }

    #[test]
    fn matches_xxhash_rust_on_every_length_class() {
        let mut lens: Vec<usize> = (0..=2100).collect();
        lens.extend([
            4095,
            4096,
            4097,
            65_536,
            65_537,
            262_143,
            262_144,
            262_145,
            1 << 20,
            (1 << 20) + 63,
            (1 << 20) + 64,
            (1 << 20) + 65,
        ]);
        for (i, &len) in lens.iter().enumerate() {
            let src = data(len, i as u64 + 1);
            let want = xxh3_64_ref(&src);
            assert_eq!(xxh3_64(&src), want, "len {len} ({})", simd_path());
            let mut dst = vec![0xAAu8; len];
            assert_eq!(copy_and_xxh3_64(&mut dst, &src), want, "copy, len {len}");
            assert_eq!(dst, src, "copy, len {len}");
        }
    }

    #[test]
    fn unaligned_inputs() {
        let src = data(300_000, 7);
        for shift in [1usize, 3, 31, 33, 63] {
            let s = &src[shift..shift + 262_144 + shift];
            let mut dst = vec![0u8; s.len() + 1];
            let d = &mut dst[1..];
            assert_eq!(copy_and_xxh3_64(d, s), xxh3_64_ref(s), "shift {shift}");
            assert_eq!(&*d, s);
            assert_eq!(xxh3_64(s), xxh3_64_ref(s));
        }
    }
}
