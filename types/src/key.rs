//! Block keys: opaque bytes (1 to 64) chosen by the client, stored inline.

use std::fmt;
use std::hash::{Hash, Hasher};

use crate::error::InvalidField;

/// Longest accepted key, in bytes.
pub const MAX_KEY_BYTES: usize = 64;

/// An opaque block key of 1 to [`MAX_KEY_BYTES`] bytes, stored inline (no heap).
#[derive(Clone, Copy)]
pub struct BlockKey {
    len: u8,
    bytes: [u8; MAX_KEY_BYTES],
}

impl BlockKey {
    /// From wire bytes; the error names `field` (e.g. `items[3].key`).
    pub fn new(field: &str, key: &[u8]) -> Result<Self, InvalidField> {
        if key.is_empty() {
            return Err(InvalidField::new(field, "key must not be empty"));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(InvalidField::new(
                field,
                format!(
                    "key of {} bytes exceeds the limit of {MAX_KEY_BYTES}",
                    key.len()
                ),
            ));
        }
        let mut bytes = [0u8; MAX_KEY_BYTES];
        bytes[..key.len()].copy_from_slice(key);
        Ok(BlockKey {
            len: key.len() as u8,
            bytes,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Printable form: the UTF-8 text when every byte is printable ASCII,
    /// otherwise `hex:` followed by lowercase hex digits.
    pub fn display(bytes: &[u8]) -> String {
        if !bytes.is_empty()
            && bytes.iter().all(|b| b.is_ascii_graphic())
            && !bytes.starts_with(b"hex:")
        {
            String::from_utf8_lossy(bytes).into_owned()
        } else {
            format!("hex:{}", hex::encode(bytes))
        }
    }
}

impl PartialEq for BlockKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for BlockKey {}

impl Hash for BlockKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl PartialOrd for BlockKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for BlockKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({})", BlockKey::display(self.as_bytes()))
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BlockKey::display(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(BlockKey::new("key", b"").is_err());
        assert!(BlockKey::new("key", &[7u8; 64]).is_ok());
        let e = BlockKey::new("items[2].key", &[7u8; 65]).unwrap_err();
        assert!(e.to_string().contains("items[2].key"), "{e}");
    }

    #[test]
    fn equality_ignores_padding() {
        let a = BlockKey::new("k", b"abc").unwrap();
        let b = BlockKey::new("k", b"abc").unwrap();
        let c = BlockKey::new("k", b"abcd").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "abc");
        assert_eq!(BlockKey::display(&[0, 255]), "hex:00ff");
    }
}
