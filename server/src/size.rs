//! Exact, readable byte sizes in the config file: written as `4GiB`, `512MiB`,
//! `64KiB` when exact, otherwise as a plain number of bytes; read from either
//! form (anything `bytesize` parses: `4GiB`, `4 GiB`, `4.5 GB`, `1048576`).

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer, Serializer};

/// The exact text for a size.
pub fn format(size: ByteSize) -> String {
    let b = size.as_u64();
    for (unit, name) in [
        (1u64 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ] {
        if b >= unit && b.is_multiple_of(unit) {
            return format!("{}{name}", b / unit);
        }
    }
    b.to_string()
}

pub fn serialize<S: Serializer>(size: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*size))
}

/// [`serialize`] for an optional size (a flag): `None` is written as `null`.
pub fn serialize_option<S: Serializer>(size: &Option<ByteSize>, s: S) -> Result<S::Ok, S::Error> {
    match size {
        Some(size) => serialize(size, s),
        None => s.serialize_none(),
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    ByteSize::deserialize(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_forms() {
        assert_eq!(format(ByteSize::gib(4)), "4GiB");
        assert_eq!(format(ByteSize::mib(512)), "512MiB");
        assert_eq!(format(ByteSize::b(1_000_000_000)), "1000000000");
        for text in ["4GiB", "512MiB", "1000000000", "3KiB"] {
            let parsed: ByteSize = text.parse().unwrap();
            assert_eq!(format(parsed), text);
        }
    }
}
