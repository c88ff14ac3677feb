//! The shared-memory pool registration preamble (`docs/protocol.md`,
//! "Shared-memory pools").
//!
//! The client sends, in one message with exactly one file descriptor attached
//! (`SCM_RIGHTS`): an 8-byte little-endian magic, a u32 little-endian name
//! length (1 to [`MAX_NAME_BYTES`]) and the UTF-8 name. The magic picks the
//! format ([`PoolFormat`]) and so the width of the pool id the daemon answers:
//!
//! - [`MAGIC_WIDE`] (kvstrata's clients): a u64 little-endian pool id, never
//!   0 and never below [`MIN_WIDE_POOL_ID`];
//! - [`MAGIC`] (SGLang HiCache's format, whose `Transfer.pool_id` is an
//!   `int32`): a u32 little-endian pool id from 1 to [`MAX_SGLANG_POOL_ID`].
//!
//! Pool ids are unique to one run of the daemon: each run numbers its pools
//! from a random base drawn at start-up, so an id kept across a daemon
//! restart names no pool of the new run (see `docs/protocol.md`).

use crate::error::InvalidField;

/// Magic of SGLang HiCache's preamble, sent as 8 little-endian bytes; the
/// reply is a u32 pool id ([`PoolFormat::Sglang`]).
pub const MAGIC: u64 = 0x8DF6_FBFD;
/// Magic of kvstrata's own preamble: SGLang's with 2 in its upper half. The
/// reply is a u64 pool id ([`PoolFormat::Wide`]).
pub const MAGIC_WIDE: u64 = 0x0000_0002_8DF6_FBFD;
/// Longest pool name accepted, in bytes (SGLang names are short; the name
/// also becomes part of a namespace's model id).
pub const MAX_NAME_BYTES: usize = 240;
/// Bytes before the name: magic (8) and name length (4).
pub const FIXED_BYTES: usize = 12;
/// Bytes of the reply to an SGLang-format preamble: a u32 pool id.
pub const REPLY_BYTES: usize = 4;
/// Bytes of the reply to a wide preamble: a u64 pool id.
pub const WIDE_REPLY_BYTES: usize = 8;
/// Largest id of an SGLang-format pool: it must be a positive `int32`.
pub const MAX_SGLANG_POOL_ID: u64 = i32::MAX as u64;
/// Smallest id of a wide pool: the two formats' ids never overlap.
pub const MIN_WIDE_POOL_ID: u64 = MAX_SGLANG_POOL_ID + 1;

/// The two preamble formats, told apart by their magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolFormat {
    /// SGLang HiCache's ([`MAGIC`]): a u32 pool id from 1 to
    /// [`MAX_SGLANG_POOL_ID`].
    Sglang,
    /// kvstrata's ([`MAGIC_WIDE`]): a u64 pool id from [`MIN_WIDE_POOL_ID`].
    Wide,
}

impl PoolFormat {
    /// The magic that opens a preamble of this format.
    pub fn magic(self) -> u64 {
        match self {
            PoolFormat::Sglang => MAGIC,
            PoolFormat::Wide => MAGIC_WIDE,
        }
    }

    /// The format a magic opens, if any.
    pub fn of_magic(magic: u64) -> Option<Self> {
        match magic {
            MAGIC => Some(PoolFormat::Sglang),
            MAGIC_WIDE => Some(PoolFormat::Wide),
            _ => None,
        }
    }

    /// Bytes of the daemon's reply in this format.
    pub fn reply_bytes(self) -> usize {
        match self {
            PoolFormat::Sglang => REPLY_BYTES,
            PoolFormat::Wide => WIDE_REPLY_BYTES,
        }
    }

    /// Whether `id` is a pool id this format can carry.
    pub fn holds(self, id: u64) -> bool {
        match self {
            PoolFormat::Sglang => (1..=MAX_SGLANG_POOL_ID).contains(&id),
            PoolFormat::Wide => id >= MIN_WIDE_POOL_ID,
        }
    }
}

/// The preamble registering a pool named `name` in `format`. The name is not
/// checked here; the daemon refuses one that is empty, longer than
/// [`MAX_NAME_BYTES`] or not UTF-8 ([`parse_preamble`]).
pub fn encode_preamble(format: PoolFormat, name: &str) -> Vec<u8> {
    let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(FIXED_BYTES + name.len());
    out.extend_from_slice(&format.magic().to_le_bytes());
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// A complete preamble: the pool's name and the format of its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPreamble {
    pub name: String,
    pub format: PoolFormat,
}

/// What the first bytes of a preamble say ([`parse_preamble`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreambleParse {
    /// Not complete yet: the preamble is this many bytes in all
    /// ([`FIXED_BYTES`] until the name length is known, then that plus the
    /// name length; never more than `FIXED_BYTES + MAX_NAME_BYTES`).
    Need(usize),
    /// A complete preamble. Bytes past the name are not part of it and are
    /// ignored.
    Complete(PoolPreamble),
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
    let Some(format) = PoolFormat::of_magic(magic) else {
        return Err(InvalidField::new(
            "magic",
            format!(
                "{magic:#018x} is neither {MAGIC_WIDE:#x} nor {MAGIC:#x} (is this the mempool socket?)"
            ),
        ));
    };
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
    Ok(PreambleParse::Complete(PoolPreamble {
        name: name.to_owned(),
        format,
    }))
}

/// The daemon's answer to an accepted registration in `format`: the pool id,
/// which must be one the format holds ([`PoolFormat::holds`]; else `pool_id`
/// is refused).
pub fn encode_reply(format: PoolFormat, pool_id: u64) -> Result<Vec<u8>, InvalidField> {
    if !format.holds(pool_id) {
        return Err(InvalidField::new(
            "pool_id",
            format!("{pool_id} is not a pool id of the {format:?} format"),
        ));
    }
    Ok(match format {
        PoolFormat::Sglang => (pool_id as u32).to_le_bytes().to_vec(),
        PoolFormat::Wide => pool_id.to_le_bytes().to_vec(),
    })
}

/// The pool id of a reply in `format` ([`PoolFormat::reply_bytes`] bytes);
/// a reply of another length or an id the format cannot hold (0, say) is
/// refused naming `pool_id`.
pub fn parse_reply(format: PoolFormat, reply: &[u8]) -> Result<u64, InvalidField> {
    let id = match (format, reply.len()) {
        (PoolFormat::Sglang, REPLY_BYTES) => {
            u64::from(u32::from_le_bytes(reply.try_into().unwrap_or_default()))
        }
        (PoolFormat::Wide, WIDE_REPLY_BYTES) => {
            u64::from_le_bytes(reply.try_into().unwrap_or_default())
        }
        (_, n) => {
            return Err(InvalidField::new(
                "pool_id",
                format!("{n} bytes, not the {} of the reply", format.reply_bytes()),
            ));
        }
    };
    if format.holds(id) {
        Ok(id)
    } else {
        Err(InvalidField::new(
            "pool_id",
            format!("{id} is not a pool id of the {format:?} format"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trips_and_reads_in_pieces() {
        for format in [PoolFormat::Sglang, PoolFormat::Wide] {
            let b = encode_preamble(format, "worker-0");
            assert_eq!(b.len(), FIXED_BYTES + 8);
            assert_eq!(&b[..8], &format.magic().to_le_bytes());
            assert_eq!(&b[8..12], &8u32.to_le_bytes());
            let complete = |name: &str| {
                Ok(PreambleParse::Complete(PoolPreamble {
                    name: name.into(),
                    format,
                }))
            };
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
            assert_eq!(parse_preamble(&b), complete("worker-0"));
            let mut longer = b.clone();
            longer.extend_from_slice(b"trailing");
            assert_eq!(parse_preamble(&longer), complete("worker-0"));
            let longest = "x".repeat(MAX_NAME_BYTES);
            assert_eq!(
                parse_preamble(&encode_preamble(format, &longest)),
                complete(&longest)
            );
        }
        // SGLang's magic is the one its clients send.
        assert_eq!(
            &encode_preamble(PoolFormat::Sglang, "p")[..8],
            &0x8DF6_FBFDu64.to_le_bytes()
        );
        assert_eq!(
            &encode_preamble(PoolFormat::Wide, "p")[..8],
            &[0xFD, 0xFB, 0xF6, 0x8D, 2, 0, 0, 0]
        );
    }

    #[test]
    fn bad_preambles_name_the_field() {
        let b = encode_preamble(PoolFormat::Sglang, "p");
        let mut bad = b.clone();
        bad[0] ^= 1;
        let e = parse_preamble(&bad).unwrap_err();
        assert_eq!(e.field, "magic");
        assert!(
            e.to_string().starts_with("magic: 0x000000008df6fbfc"),
            "{e}"
        );
        // Another upper half is no format either.
        let mut bad = b.clone();
        bad[4] = 3;
        assert_eq!(parse_preamble(&bad).unwrap_err().field, "magic");
        let e = parse_preamble(&encode_preamble(PoolFormat::Wide, "")).unwrap_err();
        assert_eq!(e.field, "name_length");
        let e = parse_preamble(&encode_preamble(
            PoolFormat::Sglang,
            &"x".repeat(MAX_NAME_BYTES + 1),
        ))
        .unwrap_err();
        assert_eq!(e.to_string(), "name_length: 241 bytes (1 to 240 allowed)");
        let mut bad = b;
        bad[12] = 0xff;
        assert_eq!(parse_preamble(&bad).unwrap_err().field, "name");
    }

    #[test]
    fn replies_round_trip_and_hold_only_their_format_ids() {
        let sglang = PoolFormat::Sglang;
        let wide = PoolFormat::Wide;
        assert_eq!(encode_reply(sglang, 7).unwrap(), vec![7, 0, 0, 0]);
        assert_eq!(parse_reply(sglang, &[7, 0, 0, 0]), Ok(7));
        let max = MAX_SGLANG_POOL_ID;
        assert_eq!(
            parse_reply(sglang, &encode_reply(sglang, max).unwrap()),
            Ok(max)
        );
        let big = 0x1234_5678_9abc_def0;
        let b = encode_reply(wide, big).unwrap();
        assert_eq!(b.len(), WIDE_REPLY_BYTES);
        assert_eq!(parse_reply(wide, &b), Ok(big));
        assert_eq!(
            parse_reply(wide, &MIN_WIDE_POOL_ID.to_le_bytes()),
            Ok(MIN_WIDE_POOL_ID)
        );
        // Ids outside a format, and replies of the wrong length.
        for (f, id) in [(sglang, 0), (sglang, max + 1), (wide, 0), (wide, max)] {
            assert_eq!(encode_reply(f, id).unwrap_err().field, "pool_id");
        }
        assert_eq!(parse_reply(sglang, &[0; 4]).unwrap_err().field, "pool_id");
        assert_eq!(
            parse_reply(sglang, &[0, 0, 0, 0x80]).unwrap_err().field,
            "pool_id"
        );
        assert_eq!(parse_reply(wide, &[0; 8]).unwrap_err().field, "pool_id");
        assert_eq!(
            parse_reply(wide, &7u64.to_le_bytes()).unwrap_err().field,
            "pool_id"
        );
        assert_eq!(parse_reply(wide, &[1; 4]).unwrap_err().field, "pool_id");
        assert!(sglang.holds(1) && !sglang.holds(MIN_WIDE_POOL_ID));
        assert!(wide.holds(u64::MAX) && !wide.holds(max));
    }
}
