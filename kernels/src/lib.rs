//! CUDA kernels of kvstrata and their CPU references.
//!
//! The kernels (batched block copy, gather from and scatter to an engine's
//! paged KV cache) arrive with the GPU-tier issue: CUDA C sources in
//! `kernels/cuda/*.cu`, compiled at start-up with NVRTC, each with a CPU
//! reference here that CI tests against. Until then this crate holds only the
//! CPU reference of the one operation every tier already performs: copying a
//! list of whole blocks between two buffers through a table of offsets.

/// One block copy: `len` bytes from `src` offset to `dst` offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: usize,
    pub dst: usize,
    pub len: usize,
}

/// Why a copy table was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyTableError {
    /// Entry `index` reads or writes past the end of its buffer.
    OutOfBounds { index: usize },
}

impl std::fmt::Display for CopyTableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyTableError::OutOfBounds { index } => {
                write!(f, "copy table entry {index} is out of bounds")
            }
        }
    }
}

impl std::error::Error for CopyTableError {}

/// CPU reference of the batched block copy: checks every entry first, then
/// copies; on error nothing is written.
pub fn batched_copy_reference(
    src: &[u8],
    dst: &mut [u8],
    table: &[BlockCopy],
) -> Result<(), CopyTableError> {
    for (index, c) in table.iter().enumerate() {
        let src_ok = c.src.checked_add(c.len).is_some_and(|end| end <= src.len());
        let dst_ok = c.dst.checked_add(c.len).is_some_and(|end| end <= dst.len());
        if !src_ok || !dst_ok {
            return Err(CopyTableError::OutOfBounds { index });
        }
    }
    for c in table {
        dst[c.dst..c.dst + c.len].copy_from_slice(&src[c.src..c.src + c.len]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_a_naive_loop_on_random_tables() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let src: Vec<u8> = (0..4099).map(|_| rng.random()).collect();
            let mut dst = vec![0xA5u8; 5003];
            let mut want = dst.clone();
            let table: Vec<BlockCopy> = (0..rng.random_range(1..9))
                .map(|_| {
                    let len = rng.random_range(1..700);
                    BlockCopy {
                        src: rng.random_range(0..src.len() - len),
                        dst: rng.random_range(0..dst.len() - len),
                        len,
                    }
                })
                .collect();
            for c in &table {
                for i in 0..c.len {
                    want[c.dst + i] = src[c.src + i];
                }
            }
            batched_copy_reference(&src, &mut dst, &table).unwrap();
            assert_eq!(dst, want);
        }
    }

    #[test]
    fn out_of_bounds_writes_nothing() {
        let src = vec![1u8; 16];
        let mut dst = vec![0u8; 16];
        let table = [
            BlockCopy {
                src: 0,
                dst: 0,
                len: 8,
            },
            BlockCopy {
                src: 10,
                dst: 0,
                len: 8,
            },
        ];
        assert_eq!(
            batched_copy_reference(&src, &mut dst, &table),
            Err(CopyTableError::OutOfBounds { index: 1 })
        );
        assert_eq!(dst, vec![0u8; 16]);
    }
}
