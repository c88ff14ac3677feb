//! xxh3-64 of blocks on the device: the run table of the `kvs_xxh3` kernel
//! and its CPU reference.
//!
//! The HBM tier checks a block against the checksum recorded at put while
//! it copies the block out ([`crate::GpuStream::xxh3`]), on the GPU, so the
//! host's memory bandwidth goes to the copy alone.
//!
//! # The kernel (`kernels/cuda/xxh3.cu`)
//!
//! One launch hashes a table of [`HashRun`]s: `out[i]` = xxh3-64 (seed 0,
//! default 192-byte secret) of run `i`, bit for bit
//! `xxhash_rust::xxh3::xxh3_64`. One CTA of 256 threads (8 warps) per run,
//! grid-stride over the runs.
//!
//! - Up to 240 bytes: thread 0 runs xxh3's short paths (0, 1–3, 4–8, 9–16,
//!   17–128, 129–240 bytes).
//! - Longer runs: xxh3's long loop works in 1 KiB chunks (16 stripes of 64
//!   bytes) and scrambles its 8 accumulators after each full chunk. Inside a
//!   chunk the accumulators only receive additions, so each full chunk `k`
//!   reduces to 8 independent sums `S_k[j]` ([`chunk_sums`]) and the serial
//!   part is only `acc = scramble(acc + S_k)`. The CTA goes through windows
//!   of [`WINDOW_CHUNKS`] chunks, double-buffered in shared memory: warps
//!   1–7 compute the sums of window `t` (8 chunks each, every 16-byte load of
//!   a lane issued before the first is used) while warp 0 chains window
//!   `t - 1`. Then warp 0 hashes the tail exactly as xxh3 does (the stripes
//!   of the last partial chunk, the last stripe, the merge and avalanche).
//! - Chunk sums: a warp takes a chunk as 64 16-byte words; lane `L` takes
//!   words `L` and `L + 32` (stripes `L / 4` and `L / 4 + 8`), both of which
//!   feed accumulator pair `L % 4` (xxh3's cross-lane term `j ^ 1` stays
//!   within a 16-byte word); a butterfly over the lanes with equal `L % 4`
//!   (shuffle xor 4, 8, 16) leaves the pair's sums in lanes 0–3.
//! - Loads: 16 bytes wide (read-only path) when the run's address is 16-byte
//!   aligned, else 8 bytes where aligned, else bytes.
//!
//! [`xxh3_64`] is the kernel's CPU mirror: the same steps in the same order
//! (short paths, per-lane chunk words, the butterfly, the windowed chain,
//! the tail, the merge), so CI checks the decomposition against
//! `xxhash_rust` and the GPU check compares the kernel with it.

/// One block to hash: `len` bytes at the device-reachable address `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct HashRun {
    pub addr: u64,
    pub len: u64,
}

/// Bytes of one xxh3 long-loop chunk (16 stripes of 64 bytes).
pub const CHUNK_BYTES: usize = 1024;
/// Longest input of xxh3's short paths.
pub const SHORT_MAX: usize = 240;
/// Chunks per window of the kernel: 7 compute warps × 8 chunks
/// (`XXH3_WINDOW` in xxh3.cu).
pub const WINDOW_CHUNKS: usize = 56;

/// xxh3's primes (the disk tier's AVX2 xxh3 uses these too).
pub const PRIME32_1: u64 = 0x9E37_79B1;
pub const PRIME32_2: u64 = 0x85EB_CA77;
pub const PRIME32_3: u64 = 0xC2B2_AE3D;
pub const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
pub const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
pub const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
pub const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
pub const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

/// xxh3's initial accumulators of the long-input loop.
pub const INITIAL_ACC: [u64; 8] = [
    PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
];

/// xxh3's published default secret (kSecret of xxhash.h): the one table of
/// it in the project (the disk tier's AVX2 xxh3 uses it too).
pub const DEFAULT_SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

/// [`DEFAULT_SECRET`] as 24 little-endian u64s (bytes `8i..8i + 8`), as the
/// kernel holds it in constant memory.
const SECRET: [u64; 24] = {
    let mut words = [0u64; 24];
    let mut i = 0;
    while i < 24 {
        let mut b = [0u8; 8];
        let mut k = 0;
        while k < 8 {
            b[k] = DEFAULT_SECRET[8 * i + k];
            k += 1;
        }
        words[i] = u64::from_le_bytes(b);
        i += 1;
    }
    words
};

/// The u64 at secret byte `off` (`xxh_secret64`).
fn secret64(off: usize) -> u64 {
    let (i, r) = (off / 8, off % 8);
    let lo = SECRET[i];
    if r == 0 {
        lo
    } else {
        (lo >> (8 * r)) | (SECRET[(i + 1).min(23)] << (64 - 8 * r))
    }
}

fn ld64(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[at..at + 8]);
    u64::from_le_bytes(b)
}

fn ld32(d: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&d[at..at + 4]);
    u32::from_le_bytes(b)
}

fn mul128_fold64(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// `lo32(d) * hi32(d)` (`xxh_lo_hi`).
fn lo_hi(d: u64) -> u64 {
    (d & 0xffff_ffff) * (d >> 32)
}

fn xxh64_avalanche(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(PRIME64_2);
    h ^= h >> 29;
    h = h.wrapping_mul(PRIME64_3);
    h ^ (h >> 32)
}

fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9E37_79F9);
    h ^ (h >> 32)
}

fn rrmxmx(mut h: u64, len: u64) -> u64 {
    h ^= h.rotate_left(49) ^ h.rotate_left(24);
    h = h.wrapping_mul(0x9FB2_1C65_1E98_DF25);
    h ^= (h >> 35).wrapping_add(len);
    h = h.wrapping_mul(0x9FB2_1C65_1E98_DF25);
    h ^ (h >> 28)
}

/// 16 input bytes at `at` against 16 secret bytes at `s` (`xxh3_mix16`).
fn mix16(d: &[u8], at: usize, s: usize) -> u64 {
    mul128_fold64(ld64(d, at) ^ secret64(s), ld64(d, at + 8) ^ secret64(s + 8))
}

/// CPU reference of the `kvs_xxh3` kernel: xxh3-64 (seed 0, default secret)
/// of `data`, bit for bit the function of `xxhash_rust::xxh3::xxh3_64`,
/// computed the way the kernel computes it.
pub fn xxh3_64(data: &[u8]) -> u64 {
    if data.len() <= SHORT_MAX {
        short(data)
    } else {
        long(data)
    }
}

/// xxh3's short paths (`xxh3_short`, one thread).
fn short(p: &[u8]) -> u64 {
    let len = p.len();
    let len64 = len as u64;
    if len == 0 {
        return xxh64_avalanche(secret64(56) ^ secret64(64));
    }
    if len <= 3 {
        let (c1, c2, c3) = (p[0] as u32, p[len >> 1] as u32, p[len - 1] as u32);
        let combo = (c1 << 16) | (c2 << 24) | c3 | ((len as u32) << 8);
        let flip = u64::from(secret64(0) as u32 ^ secret64(4) as u32);
        return xxh64_avalanche(u64::from(combo) ^ flip);
    }
    if len <= 8 {
        let (in1, in2) = (u64::from(ld32(p, 0)), u64::from(ld32(p, len - 4)));
        let flip = secret64(8) ^ secret64(16);
        return rrmxmx(in2.wrapping_add(in1 << 32) ^ flip, len64);
    }
    if len <= 16 {
        let flip1 = secret64(24) ^ secret64(32);
        let flip2 = secret64(40) ^ secret64(48);
        let lo = ld64(p, 0) ^ flip1;
        let hi = ld64(p, len - 8) ^ flip2;
        return avalanche(
            len64
                .wrapping_add(lo.swap_bytes())
                .wrapping_add(hi)
                .wrapping_add(mul128_fold64(lo, hi)),
        );
    }
    let mut acc = len64.wrapping_mul(PRIME64_1);
    if len <= 128 {
        if len > 32 {
            if len > 64 {
                if len > 96 {
                    acc = acc.wrapping_add(mix16(p, 48, 96));
                    acc = acc.wrapping_add(mix16(p, len - 64, 112));
                }
                acc = acc.wrapping_add(mix16(p, 32, 64));
                acc = acc.wrapping_add(mix16(p, len - 48, 80));
            }
            acc = acc.wrapping_add(mix16(p, 16, 32));
            acc = acc.wrapping_add(mix16(p, len - 32, 48));
        }
        acc = acc.wrapping_add(mix16(p, 0, 0));
        acc = acc.wrapping_add(mix16(p, len - 16, 16));
        return avalanche(acc);
    }
    // 129..=240: eight rounds, avalanche, the remaining rounds with the
    // secret shifted by 3, the last 16 bytes at secret 136 - 17.
    let rounds = len / 16;
    for i in 0..8 {
        acc = acc.wrapping_add(mix16(p, 16 * i, 16 * i));
    }
    acc = avalanche(acc);
    for i in 8..rounds {
        acc = acc.wrapping_add(mix16(p, 16 * i, 16 * (i - 8) + 3));
    }
    acc = acc.wrapping_add(mix16(p, len - 16, 119));
    avalanche(acc)
}

/// One 16-byte word (`a` = stripe word `2p`, `b` = word `2p + 1`) into the
/// sums of accumulator pair `p` (`xxh3_word`).
fn word(a: u64, b: u64, ka: u64, kb: u64, sums: &mut [u64; 2]) {
    sums[0] = sums[0].wrapping_add(b).wrapping_add(lo_hi(a ^ ka));
    sums[1] = sums[1].wrapping_add(a).wrapping_add(lo_hi(b ^ kb));
}

/// The 8 accumulator sums `S[j]` of one full 1 KiB chunk, as one warp of
/// the kernel computes them (`xxh3_window_sums`): lane `L` loads 16-byte
/// words `L` and `L + 32`, adds them into the pair `L % 4` with its four
/// keys, then the butterfly (xor 4, 8, 16) sums each pair over its 8 lanes
/// and lanes 0..4 hold the result.
pub fn chunk_sums(chunk: &[u8]) -> [u64; 8] {
    debug_assert_eq!(chunk.len(), CHUNK_BYTES);
    let mut lanes = [[0u64; 2]; 32];
    for (lane, sums) in lanes.iter_mut().enumerate() {
        let (s0, pr) = (lane / 4, lane % 4);
        let key = [
            secret64(8 * s0 + 16 * pr),
            secret64(8 * s0 + 16 * pr + 8),
            secret64(8 * (s0 + 8) + 16 * pr),
            secret64(8 * (s0 + 8) + 16 * pr + 8),
        ];
        let q = 16 * lane;
        let w = [
            ld64(chunk, q),
            ld64(chunk, q + 8),
            ld64(chunk, q + 512),
            ld64(chunk, q + 520),
        ];
        word(w[0], w[1], key[0], key[1], sums);
        word(w[2], w[3], key[2], key[3], sums);
    }
    for m in [4, 8, 16] {
        let before = lanes;
        for (l, sums) in lanes.iter_mut().enumerate() {
            for (s, other) in sums.iter_mut().zip(before[l ^ m]) {
                *s = s.wrapping_add(other);
            }
        }
    }
    let mut out = [0u64; 8];
    for (pr, lane) in lanes.iter().take(4).enumerate() {
        out[2 * pr] = lane[0];
        out[2 * pr + 1] = lane[1];
    }
    out
}

/// One stripe (64 bytes at `at`, secret offset `k`) into accumulator `j`
/// (`xxh3_stripe_lane`).
fn stripe_lane(d: &[u8], at: usize, k: usize, j: usize) -> u64 {
    ld64(d, at + 8 * (j ^ 1)).wrapping_add(lo_hi(ld64(d, at + 8 * j) ^ secret64(k + 8 * j)))
}

/// xxh3's long hash (`xxh3_long`), in the kernel's steps.
fn long(p: &[u8]) -> u64 {
    let len = p.len();
    let nb = (len - 1) / CHUNK_BYTES;
    let windows = nb.div_ceil(WINDOW_CHUNKS);
    let mut acc = INITIAL_ACC;
    let scramble_key: [u64; 8] = std::array::from_fn(|j| secret64(128 + 8 * j));
    // The kernel's two shared buffers; iteration t fills buf[t % 2] (the
    // compute warps) while buf[(t - 1) % 2] is chained (warp 0).
    let mut buf = [[[0u64; 8]; WINDOW_CHUNKS]; 2];
    for t in 0..=windows {
        if t > 0 {
            let first = (t - 1) * WINDOW_CHUNKS;
            let cnt = WINDOW_CHUNKS.min(nb - first);
            for sums in &buf[(t - 1) % 2][..cnt] {
                for (j, a) in acc.iter_mut().enumerate() {
                    let mut v = a.wrapping_add(sums[j]);
                    v ^= v >> 47;
                    v ^= scramble_key[j];
                    *a = v.wrapping_mul(PRIME32_1);
                }
            }
        }
        if t < windows {
            let first = t * WINDOW_CHUNKS;
            let cnt = WINDOW_CHUNKS.min(nb - first);
            for (c, sums) in buf[t % 2][..cnt].iter_mut().enumerate() {
                let at = (first + c) * CHUNK_BYTES;
                *sums = chunk_sums(&p[at..at + CHUNK_BYTES]);
            }
        }
    }
    // The last, partial chunk: whole stripes up to but excluding the final
    // byte, then the last stripe (the final 64 bytes, secret 192 - 64 - 7).
    let base = nb * CHUNK_BYTES;
    let stripes = ((len - 1) - base) / 64;
    for (j, a) in acc.iter_mut().enumerate() {
        for s in 0..stripes {
            *a = a.wrapping_add(stripe_lane(p, base + 64 * s, 8 * s, j));
        }
        *a = a.wrapping_add(stripe_lane(p, len - 64, 121, j));
    }
    // Merge: accumulators 2i and 2i + 1 with secret 11 + 16i.
    let mut h = (len as u64).wrapping_mul(PRIME64_1);
    for i in 0..4 {
        let j = 2 * i;
        h = h.wrapping_add(mul128_fold64(
            acc[j] ^ secret64(11 + 8 * j),
            acc[j + 1] ^ secret64(19 + 8 * j),
        ));
    }
    avalanche(h)
}

/// Hashes every run into `out[i]` (little-endian u64s at `out`).
///
/// # Safety
/// Every run must be readable and `out..out + 8 * runs.len()` writable for
/// the whole call.
pub(crate) unsafe fn xxh3_raw(runs: &[HashRun], out: u64) {
    for (i, r) in runs.iter().enumerate() {
        // SAFETY: the caller's contract.
        let data = unsafe { std::slice::from_raw_parts(r.addr as *const u8, r.len as usize) };
        let h = xxh3_64(data).to_le_bytes();
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(h.as_ptr(), (out + 8 * i as u64) as *mut u8, 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};

    fn random(rng: &mut StdRng, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rng.fill_bytes(&mut v);
        v
    }

    fn same(data: &[u8]) {
        assert_eq!(
            xxh3_64(data),
            xxhash_rust::xxh3::xxh3_64(data),
            "length {}",
            data.len()
        );
    }

    #[test]
    fn secret_words_are_the_default_secret() {
        let bytes: Vec<u8> = SECRET.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&bytes[..], &DEFAULT_SECRET[..]);
        for off in 0..=184 {
            assert_eq!(secret64(off), ld64(&DEFAULT_SECRET, off), "offset {off}");
        }
    }

    /// The kernel's constant tables are the ones this mirror uses.
    #[test]
    fn kernel_tables_match_the_mirror() {
        let src = crate::cuda::XXH3_SOURCE;
        let (Some(a), Some(b)) = (
            src.find("// secret table begin"),
            src.find("// secret table end"),
        ) else {
            panic!("secret table markers missing in xxh3.cu");
        };
        let table = &src[a..b];
        let words: Vec<u64> = table
            .split("0x")
            .skip(1)
            .map(|t| {
                let hex: String = t.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
                u64::from_str_radix(&hex, 16).unwrap()
            })
            .collect();
        assert_eq!(words, SECRET);
        assert!(src.contains(&format!(
            "#define XXH3_CHUNKS_PER_WARP {}",
            WINDOW_CHUNKS / 7
        )));
        assert!(src.contains("#define XXH3_WARPS 8 "));
    }

    #[test]
    fn every_length_to_2100() {
        let mut rng = StdRng::seed_from_u64(1);
        let data = random(&mut rng, 2100);
        for len in 0..=2100 {
            same(&data[..len]);
        }
        // Each length over fresh bytes too (a prefix family shares bytes).
        for len in 0..=2100 {
            same(&random(&mut rng, len));
        }
    }

    #[test]
    fn boundary_lengths() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut lens = vec![
            0, 1, 3, 4, 8, 9, 16, 17, 32, 33, 64, 65, 96, 97, 128, 129, 239, 240, 241, 1023, 1024,
            1025, 2047, 2048, 2049,
        ];
        for k in 4..=200 {
            lens.extend([64 * k - 1, 64 * k, 64 * k + 1]);
        }
        // Window boundaries: 56 chunks and around.
        for w in [1, 2, 3] {
            let c = WINDOW_CHUNKS * CHUNK_BYTES * w;
            lens.extend([c - 1, c, c + 1, c + 2, c + CHUNK_BYTES + 1]);
        }
        lens.extend([720 << 10, (720 << 10) + 1, 16 << 10, 2 << 20]);
        for len in lens {
            same(&random(&mut rng, len));
        }
    }

    #[test]
    fn random_odd_lengths_to_3_mib() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..24 {
            let len = rng.random_range(0..(3 << 20)) | 1;
            same(&random(&mut rng, len));
        }
    }

    #[test]
    fn misaligned_slices() {
        let mut rng = StdRng::seed_from_u64(4);
        let data = random(&mut rng, (64 << 10) + 64);
        for off in 0..17 {
            for len in [0, 5, 15, 100, 200, 241, 1000, 1025, 5000, 64 << 10] {
                same(&data[off..off + len]);
            }
        }
    }

    /// The decomposition itself: one chunk's sums against stripe-by-stripe
    /// accumulation from zero.
    #[test]
    fn chunk_sums_are_the_stripe_loop() {
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..50 {
            let chunk = random(&mut rng, CHUNK_BYTES);
            let mut want = [0u64; 8];
            for s in 0..16 {
                for (j, w) in want.iter_mut().enumerate() {
                    let d = ld64(&chunk, 64 * s + 8 * j) ^ secret64(8 * s + 8 * j);
                    *w = w
                        .wrapping_add(ld64(&chunk, 64 * s + 8 * (j ^ 1)))
                        .wrapping_add(lo_hi(d));
                }
            }
            assert_eq!(chunk_sums(&chunk), want);
        }
    }

    /// A single flipped bit anywhere changes the hash (the comparison is live).
    #[test]
    fn bit_flips_change_the_hash() {
        let mut rng = StdRng::seed_from_u64(6);
        let mut data = random(&mut rng, 70_001);
        let h = xxh3_64(&data);
        for _ in 0..64 {
            let i = rng.random_range(0..data.len());
            let bit = 1 << rng.random_range(0..8);
            data[i] ^= bit;
            assert_ne!(xxh3_64(&data), h);
            same(&data);
            data[i] ^= bit;
        }
    }

    #[test]
    fn raw_backend_writes_every_hash() {
        let mut rng = StdRng::seed_from_u64(7);
        let data = random(&mut rng, 1 << 20);
        let runs: Vec<HashRun> = (0..40)
            .map(|_| {
                let len = rng.random_range(0..100_000u64);
                let at = rng.random_range(0..(data.len() as u64 - len));
                HashRun {
                    addr: data.as_ptr() as u64 + at,
                    len,
                }
            })
            .collect();
        let mut out = vec![0u8; 8 * runs.len() + 3];
        // SAFETY: the runs lie in `data`; `out` holds 8 bytes per run (at a
        // misaligned start).
        unsafe { xxh3_raw(&runs, out.as_mut_ptr() as u64 + 3) };
        for (i, r) in runs.iter().enumerate() {
            let at = (r.addr - data.as_ptr() as u64) as usize;
            let want = xxhash_rust::xxh3::xxh3_64(&data[at..at + r.len as usize]);
            let got = u64::from_le_bytes(out[3 + 8 * i..11 + 8 * i].try_into().unwrap());
            assert_eq!(got, want, "run {i}");
        }
    }
}
