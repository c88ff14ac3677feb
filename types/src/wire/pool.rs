//! The shared-memory pool registration preamble (`docs/protocol.md`,
//! "Shared-memory pools"; the wire format SGLang HiCache uses).
//!
//! The client sends, in one message with exactly one file descriptor attached
//! (`SCM_RIGHTS`): the 8-byte little-endian [`MAGIC`], a u32 little-endian
//! name length (1 to [`MAX_NAME_BYTES`]) and the UTF-8 name. The daemon
//! answers the pool id as a u32 little-endian ([`encode_reply`]), never 0.

use crate::error::InvalidField;

/// Magic that opens a pool registration, sent as 8 little-endian bytes.
pub const MAGIC: u64 = 0x8DF6_FBFD;
/// Longest pool name accepted, in bytes (SGLang names are short; the name
/// also becomes part of a namespace's model id).
pub const MAX_NAME_BYTES: usize = 240;
/// Bytes before the name: magic (8) and name length (4).
pub const FIXED_BYTES: usize = 12;
/// Bytes of the reply: the pool id.
pub const REPLY_BYTES: usize = 4;

/// The preamble registering a pool named `name`. The name is not checked
/// here; the daemon refuses one that is empty, longer than
/// [`MAX_NAME_BYTES`] or not UTF-8 ([`parse_preamble`]).
pub fn encode_preamble(name: &str) -> Vec<u8> {
    let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(FIXED_BYTES + name.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// What the first bytes of a preamble say ([`parse_preamble`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreambleParse {
    /// Not complete yet: the preamble is this many bytes in all
    /// ([`FIXED_BYTES`] until the name length is known, then that plus the
    /// name length; never more than `FIXED_BYTES + MAX_NAME_BYTES`).
    Need(usize),
    /// A complete preamble: the pool name. Bytes past the name are not part
    /// of it and are ignored.
    Complete(String),
}

/// Parses the bytes of a registration preamble received so far: magic, name
/// length, name. A reader reads exactly as many bytes as
/// [`PreambleParse::Need`] asks for; every prefix of a preamble either asks
/// for more or fails as the whole does. Refusals name `magic`,
/// `name_length` or `name`.
pub fn parse_preamble(buf: &[u8]) -> Result<PreambleParse, InvalidField> {
    let Some((fixed, rest)) = buf.split_first_chunk::<FIXED_BYTES>() else {
        return Ok(PreambleParse::Need(FIXED_BYTES));
    };
    let (magic, name_len) = fixed.split_at(8);
    let magic = u64::from_le_bytes(magic.try_into().unwrap_or_default());
    if magic != MAGIC {
        return Err(InvalidField::new(
            "magic",
            format!("{magic:#018x} is not {MAGIC:#x} (is this the mempool socket?)"),
        ));
    }
    let name_len = u32::from_le_bytes(name_len.try_into().unwrap_or_default());
    if name_len == 0 || name_len as usize > MAX_NAME_BYTES {
        return Err(InvalidField::new(
            "name_length",
            format!("{name_len} bytes (1 to {MAX_NAME_BYTES} allowed)"),
        ));
    }
    let Some(name) = rest.get(..name_len as usize) else {
        return Ok(PreambleParse::Need(FIXED_BYTES + name_len as usize));
    };
    let name = std::str::from_utf8(name).map_err(|_| InvalidField::new("name", "not UTF-8"))?;
    Ok(PreambleParse::Complete(name.to_owned()))
}

/// The daemon's answer to an accepted registration: the pool id (from 1).
pub fn encode_reply(pool_id: u32) -> [u8; REPLY_BYTES] {
    pool_id.to_le_bytes()
}

/// The pool id of a reply; 0 is not a pool id (`pool_id` names it).
pub fn parse_reply(reply: [u8; REPLY_BYTES]) -> Result<u32, InvalidField> {
    match u32::from_le_bytes(reply) {
        0 => Err(InvalidField::new("pool_id", "0 is not a pool id")),
        id => Ok(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trips_and_reads_in_pieces() {
        let b = encode_preamble("worker-0");
        assert_eq!(b.len(), FIXED_BYTES + 8);
        assert_eq!(&b[..8], &0x8DF6_FBFDu64.to_le_bytes());
        assert_eq!(&b[8..12], &8u32.to_le_bytes());
        assert_eq!(
            parse_preamble(&b[..5]),
            Ok(PreambleParse::Need(FIXED_BYTES))
        );
        assert_eq!(
            parse_preamble(&b[..FIXED_BYTES]),
            Ok(PreambleParse::Need(FIXED_BYTES + 8))
        );
        assert_eq!(
            parse_preamble(&b[..b.len() - 1]),
            Ok(PreambleParse::Need(b.len()))
        );
        assert_eq!(
            parse_preamble(&b),
            Ok(PreambleParse::Complete("worker-0".into()))
        );
        let mut longer = b.clone();
        longer.extend_from_slice(b"trailing");
        assert_eq!(
            parse_preamble(&longer),
            Ok(PreambleParse::Complete("worker-0".into()))
        );
        let longest = "x".repeat(MAX_NAME_BYTES);
        assert_eq!(
            parse_preamble(&encode_preamble(&longest)),
            Ok(PreambleParse::Complete(longest))
        );
    }

    #[test]
    fn bad_preambles_name_the_field() {
        let b = encode_preamble("p");
        let mut bad = b.clone();
        bad[0] ^= 1;
        let e = parse_preamble(&bad).unwrap_err();
        assert_eq!(e.field, "magic");
        assert!(
            e.to_string().starts_with("magic: 0x000000008df6fbfc"),
            "{e}"
        );
        let e = parse_preamble(&encode_preamble("")).unwrap_err();
        assert_eq!(e.field, "name_length");
        let e = parse_preamble(&encode_preamble(&"x".repeat(MAX_NAME_BYTES + 1))).unwrap_err();
        assert_eq!(e.to_string(), "name_length: 241 bytes (1 to 240 allowed)");
        let mut bad = b;
        bad[12] = 0xff;
        assert_eq!(parse_preamble(&bad).unwrap_err().field, "name");
    }

    #[test]
    fn reply_round_trips_and_refuses_id_zero() {
        assert_eq!(parse_reply(encode_reply(7)), Ok(7));
        assert_eq!(encode_reply(7), [7, 0, 0, 0]);
        assert_eq!(parse_reply(encode_reply(0)).unwrap_err().field, "pool_id");
    }
}
