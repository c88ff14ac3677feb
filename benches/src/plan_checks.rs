//! The flag checks the benchmarks' plans share (`kvstrata bench`,
//! `bench-disk`, `bench-remote`): a block size within the benchmark's
//! limits, counts of at least one. Each error names the flag.

use crate::error::BenchError;

/// A block size of `bytes`, at least `min` (`floor` says what needs that
/// much, e.g. "the verification stamp") and at most `max`, as a `usize`.
pub(crate) fn block_size(
    field: &'static str,
    bytes: u64,
    min: u64,
    floor: &str,
    max: u64,
) -> Result<usize, BenchError> {
    let bad = |reason: String| BenchError::InvalidArg { field, reason };
    if bytes < min {
        return Err(bad(format!("{bytes} bytes; at least {min} ({floor})")));
    }
    if bytes > max {
        return Err(bad(format!("{bytes} bytes; at most {max}")));
    }
    usize::try_from(bytes).map_err(|_| bad(format!("{bytes} bytes does not fit in memory")))
}

/// A count (or duration in its unit) that must be at least one.
pub(crate) fn at_least_one(field: &'static str, n: u64) -> Result<(), BenchError> {
    if n == 0 {
        return Err(BenchError::InvalidArg {
            field,
            reason: "must be at least 1".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_and_reason(r: Result<usize, BenchError>) -> (&'static str, String) {
        match r {
            Err(BenchError::InvalidArg { field, reason }) => (field, reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn block_size_bounds_name_the_flag() {
        assert_eq!(block_size("--block-size", 64, 16, "x", 64).unwrap(), 64);
        assert_eq!(block_size("--block-size", 16, 16, "x", 64).unwrap(), 16);
        let (f, r) = field_and_reason(block_size("--block-size", 8, 16, "the stamp", 64));
        assert_eq!(
            (f, r.as_str()),
            ("--block-size", "8 bytes; at least 16 (the stamp)")
        );
        let (f, r) = field_and_reason(block_size("--size", 65, 16, "x", 64));
        assert_eq!((f, r.as_str()), ("--size", "65 bytes; at most 64"));
        assert!(at_least_one("--threads", 1).is_ok());
        match at_least_one("--threads", 0) {
            Err(BenchError::InvalidArg { field, reason }) => {
                assert_eq!(
                    (field, reason.as_str()),
                    ("--threads", "must be at least 1")
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
