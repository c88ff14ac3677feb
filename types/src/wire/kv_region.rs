//! The KV-region registration preamble and reply (`docs/protocol.md`, "CUDA
//! IPC regions"): how an engine registers its paged KV memory on the
//! daemon's region socket.
//!
//! The preamble is a fixed little-endian header ([`header_bytes`]: 144 bytes
//! in version 3, 128 in version 2) and a name ([`encode_preamble`],
//! [`parse_preamble`]); a memfd region (kind 2)
//! sends its fd with it (`SCM_RIGHTS`). The daemon answers a status and a
//! message, and on success the region id ([`encode_reply`],
//! [`parse_reply_header`], [`parse_reply_id`]): status 0 is success, any other
//! is a [`RefuseReason`] code.
//!
//! Region ids are 64-bit and unique to one run of the daemon (a random base
//! drawn at start-up plus a counter), so an id kept across a daemon restart
//! names no region of the new run. Version 1 of the preamble answered a
//! 32-bit id counted from 1 in every run; the daemon refuses it, in a reply a
//! version-1 client reads ([`VERSION_1`]). Version 3 added the page and K/V
//! strides of per-layer regions ([`PagedGeometry::page_stride`],
//! [`PagedGeometry::kv_stride`]); version 2, whose header ends before them, is
//! still accepted (both strides 0: the packed layout).
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `KVSREGN\0` |
//! | 8 | 2 | version (3; 2 accepted) |
//! | 10 | 2 | kind (1 CUDA IPC, 2 memfd) |
//! | 12 | 4 | device ordinal (kind 1) |
//! | 16 | 8 | region bytes |
//! | 24 | 64 | CUDA IPC handle (kind 1; zeros otherwise) |
//! | 88 | 4 | layout (1 per-layer, 2 cross-layer) |
//! | 92 | 4 | layers |
//! | 96 | 4 | page_tokens |
//! | 100 | 4 | kv_heads |
//! | 104 | 4 | head_dim |
//! | 108 | 4 | dtype_bytes |
//! | 112 | 4 | num_pages |
//! | 116 | 4 | name length (1..=240) |
//! | 120 | 8 | layer_stride (per-layer; 0 = packed) |
//! | 128 | 8 | page_stride (per-layer; 0 = `2 * chunk`; version 3 only) |
//! | 136 | 8 | kv_stride (per-layer; 0 = `chunk`; version 3 only) |
//! | 144 | n | name (UTF-8; at 128 in version 2) |

use crate::error::InvalidField;
use crate::geometry::{PageLayout, PagedGeometry};

/// The first 8 bytes of a registration.
pub const MAGIC: [u8; 8] = *b"KVSREGN\0";
/// The preamble version: 3, with the page and K/V strides (its reply, like
/// version 2's, carries a 64-bit region id).
pub const VERSION: u16 = 3;
/// The version before the strides: a 128-byte header, still accepted.
pub const VERSION_2: u16 = 2;
/// The first version, refused since region ids became 64-bit: its reply held
/// a 32-bit id that every daemon run counted from 1.
pub const VERSION_1: u16 = 1;
/// Bytes of the fixed part every accepted version starts with (version 2's
/// whole header): a reader asks for this many first ([`parse_preamble`] says
/// how many more).
pub const HEADER_BYTES: usize = 128;
/// Bytes of the fixed part of a version-3 preamble (the name follows).
pub const HEADER_BYTES_V3: usize = 144;
/// Longest region name, in bytes.
pub const MAX_NAME_BYTES: usize = 240;
/// Kind 1: a CUDA IPC handle of device memory.
pub const KIND_CUDA_IPC: u16 = 1;
/// Kind 2: a memfd (host memory) passed with `SCM_RIGHTS`.
pub const KIND_MEMFD: u16 = 2;
/// Layout code of [`PageLayout::PerLayer`].
pub const LAYOUT_PER_LAYER: u32 = 1;
/// Layout code of [`PageLayout::CrossLayer`].
pub const LAYOUT_CROSS_LAYER: u32 = 2;
/// Bytes of the reply before its message: status, 4 reserved bytes (0; the
/// region id of version 1), message length.
pub const REPLY_HEADER_BYTES: usize = 12;
/// Bytes of the region id that follows the message of a success reply.
pub const REPLY_ID_BYTES: usize = 8;
/// Longest reply message, in bytes (longer ones are cut).
pub const MAX_REPLY_MESSAGE_BYTES: usize = 4096;

/// A registration, without its fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionPreamble {
    /// [`KIND_CUDA_IPC`] or [`KIND_MEMFD`].
    pub kind: u16,
    /// CUDA device ordinal (kind 1).
    pub device: u32,
    /// Bytes of the region (at least `geometry.region_bytes()`).
    pub bytes: u64,
    /// The CUDA IPC handle (kind 1; zeros for kind 2).
    pub handle: [u8; 64],
    pub geometry: PagedGeometry,
    pub name: String,
}

impl RegionPreamble {
    /// The preamble's bytes ([`encode_preamble`]).
    pub fn encode(&self) -> Vec<u8> {
        encode_preamble(
            self.kind,
            self.device,
            self.bytes,
            &self.handle,
            &self.geometry,
            &self.name,
        )
    }
}

/// Bytes of the fixed part of a preamble of `version` (the name follows);
/// `None` for a version the daemon does not accept.
pub fn header_bytes(version: u16) -> Option<usize> {
    match version {
        VERSION => Some(HEADER_BYTES_V3),
        VERSION_2 => Some(HEADER_BYTES),
        _ => None,
    }
}

/// The registration preamble (version 3): the 144-byte header and the name.
/// Nothing is checked here (tests send malformed preambles on purpose); the
/// daemon checks everything ([`parse_preamble`], then the geometry).
pub fn encode_preamble(
    kind: u16,
    device: u32,
    bytes: u64,
    handle: &[u8; 64],
    geometry: &PagedGeometry,
    name: &str,
) -> Vec<u8> {
    let mut b = encode_v2_header(kind, device, bytes, handle, geometry, name);
    b[8..10].copy_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&geometry.page_stride.to_le_bytes());
    b.extend_from_slice(&geometry.kv_stride.to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// A version-2 preamble (no strides; what clients before version 3 send),
/// for tests of the daemon's compatibility.
pub fn encode_preamble_v2(
    kind: u16,
    device: u32,
    bytes: u64,
    handle: &[u8; 64],
    geometry: &PagedGeometry,
    name: &str,
) -> Vec<u8> {
    let mut b = encode_v2_header(kind, device, bytes, handle, geometry, name);
    b.extend_from_slice(name.as_bytes());
    b
}

/// The first 128 bytes, common to versions 2 and 3 (version 2 in the version
/// field).
fn encode_v2_header(
    kind: u16,
    device: u32,
    bytes: u64,
    handle: &[u8; 64],
    geometry: &PagedGeometry,
    name: &str,
) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_BYTES];
    b[..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&VERSION_2.to_le_bytes());
    b[10..12].copy_from_slice(&kind.to_le_bytes());
    b[12..16].copy_from_slice(&device.to_le_bytes());
    b[16..24].copy_from_slice(&bytes.to_le_bytes());
    b[24..88].copy_from_slice(handle);
    let layout = match geometry.layout {
        PageLayout::PerLayer => LAYOUT_PER_LAYER,
        PageLayout::CrossLayer => LAYOUT_CROSS_LAYER,
    };
    for (at, v) in [
        (88, layout),
        (92, geometry.layers),
        (96, geometry.page_tokens),
        (100, geometry.kv_heads),
        (104, geometry.head_dim),
        (108, geometry.dtype_bytes),
        (112, geometry.num_pages),
        (116, u32::try_from(name.len()).unwrap_or(u32::MAX)),
    ] {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    b[120..128].copy_from_slice(&geometry.layer_stride.to_le_bytes());
    b
}

/// What the bytes received so far say ([`parse_preamble`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreambleParse {
    /// Not complete: the preamble is this many bytes in all.
    Need(usize),
    Complete(Box<RegionPreamble>),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses a registration preamble received so far (layout in the [module
/// docs](self)). Checks the magic, version, kind, name and layout code; the
/// geometry's values are the daemon's to check ([`PagedGeometry::validate`]).
/// Refusals name `magic`, `version`, `kind`, `name` or `layout`
/// ([`RefuseReason::of_preamble_field`] classifies them).
pub fn parse_preamble(buf: &[u8]) -> Result<PreambleParse, InvalidField> {
    if buf.len() < 8 {
        return Ok(PreambleParse::Need(HEADER_BYTES));
    }
    if buf[..8] != MAGIC {
        return Err(InvalidField::new(
            "magic",
            format!(
                "{:02x?} is not {:?} (is this the region socket?)",
                &buf[..8],
                String::from_utf8_lossy(&MAGIC[..7])
            ),
        ));
    }
    if buf.len() < HEADER_BYTES {
        return Ok(PreambleParse::Need(HEADER_BYTES));
    }
    let version = u16_at(buf, 8);
    if version == VERSION_1 {
        return Err(InvalidField::new(
            "version",
            format!(
                "{VERSION_1} is not supported (this daemon speaks {VERSION}, with 64-bit region ids \
                 unique to each daemon run): upgrade the client"
            ),
        ));
    }
    let Some(header) = header_bytes(version) else {
        return Err(InvalidField::new(
            "version",
            format!("{version} is not supported (this daemon speaks {VERSION} and {VERSION_2})"),
        ));
    };
    if buf.len() < header {
        return Ok(PreambleParse::Need(header));
    }
    let kind = u16_at(buf, 10);
    if kind != KIND_CUDA_IPC && kind != KIND_MEMFD {
        return Err(InvalidField::new(
            "kind",
            format!("{kind} is neither {KIND_CUDA_IPC} (CUDA IPC handle) nor {KIND_MEMFD} (memfd)"),
        ));
    }
    let name_len = u32_at(buf, 116) as usize;
    if name_len == 0 || name_len > MAX_NAME_BYTES {
        return Err(InvalidField::new(
            "name",
            format!("{name_len} bytes (1 to {MAX_NAME_BYTES} allowed)"),
        ));
    }
    let Some(name) = buf.get(header..header + name_len) else {
        return Ok(PreambleParse::Need(header + name_len));
    };
    let name = std::str::from_utf8(name)
        .map_err(|_| InvalidField::new("name", "not UTF-8"))?
        .to_owned();
    let layout = match u32_at(buf, 88) {
        LAYOUT_PER_LAYER => PageLayout::PerLayer,
        LAYOUT_CROSS_LAYER => PageLayout::CrossLayer,
        other => {
            return Err(InvalidField::new(
                "layout",
                format!(
                    "{other} is neither {LAYOUT_PER_LAYER} (per-layer) nor {LAYOUT_CROSS_LAYER} (cross-layer)"
                ),
            ));
        }
    };
    let mut handle = [0u8; 64];
    handle.copy_from_slice(&buf[24..88]);
    // Version 2 has no strides: its per-layer regions are packed.
    let (page_stride, kv_stride) = match header > HEADER_BYTES {
        true => (u64_at(buf, 128), u64_at(buf, 136)),
        false => (0, 0),
    };
    Ok(PreambleParse::Complete(Box::new(RegionPreamble {
        kind,
        device: u32_at(buf, 12),
        bytes: u64_at(buf, 16),
        handle,
        geometry: PagedGeometry {
            layout,
            layers: u32_at(buf, 92),
            page_tokens: u32_at(buf, 96),
            kv_heads: u32_at(buf, 100),
            head_dim: u32_at(buf, 104),
            dtype_bytes: u32_at(buf, 108),
            num_pages: u32_at(buf, 112),
            layer_stride: u64_at(buf, 120),
            page_stride,
            kv_stride,
        },
        name,
    })))
}

/// Why a registration was refused: the reply's status code, and the label
/// of the daemon's `kvstrata_kv_regions_refused` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum RefuseReason {
    /// Malformed preamble: magic, version, kind, name, fds, cut short, too slow.
    Preamble = 1,
    /// The geometry is invalid or does not fit in the announced bytes.
    Geometry = 2,
    /// The daemon's region limits (`gpu.max_regions`, `gpu.max_region_bytes`) are reached.
    Limit = 3,
    /// The memory could not be mapped (fd too small, not a file, IPC open failed).
    Map = 4,
    /// A CUDA IPC region without a GPU, or on a device the daemon does not use.
    NoGpu = 5,
    /// The peer's uid is not allowed (`auth.uid_allow`; closed without a reply).
    Uid = 6,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 6] = [
        RefuseReason::Preamble,
        RefuseReason::Geometry,
        RefuseReason::Limit,
        RefuseReason::Map,
        RefuseReason::NoGpu,
        RefuseReason::Uid,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RefuseReason::Preamble => "preamble",
            RefuseReason::Geometry => "geometry",
            RefuseReason::Limit => "limit",
            RefuseReason::Map => "map",
            RefuseReason::NoGpu => "no_gpu",
            RefuseReason::Uid => "uid",
        }
    }

    /// The reply's status code.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The reason of a reply's status code; `None` for 0 (success) and unknown codes.
    pub fn from_code(status: u32) -> Option<Self> {
        RefuseReason::ALL.into_iter().find(|r| r.code() == status)
    }

    /// The reason for a preamble [`parse_preamble`] refused: [`RefuseReason::Geometry`]
    /// for the layout, [`RefuseReason::Preamble`] for every other field.
    pub fn of_preamble_field(e: &InvalidField) -> Self {
        if e.field == "layout" {
            RefuseReason::Geometry
        } else {
            RefuseReason::Preamble
        }
    }
}

/// The reply: u32 status (0 registered, else a [`RefuseReason`] code), 4
/// bytes of 0, u32 message length, the message (UTF-8, cut at
/// [`MAX_REPLY_MESSAGE_BYTES`]), and with status 0 the u64 region id. A
/// refusal is byte for byte what version 1 answered, so a client of either
/// version reads it; `region_id` is ignored unless `status` is 0.
pub fn encode_reply(status: u32, region_id: u64, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_REPLY_MESSAGE_BYTES)];
    let mut out = Vec::with_capacity(REPLY_HEADER_BYTES + msg.len() + REPLY_ID_BYTES);
    out.extend_from_slice(&status.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg);
    if status == 0 {
        out.extend_from_slice(&region_id.to_le_bytes());
    }
    out
}

/// The fixed part of a reply; the message of `message_len` bytes follows,
/// then, with status 0, the region id ([`parse_reply_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    /// 0 when registered, else a [`RefuseReason`] code.
    pub status: u32,
    /// Bytes of the message that follows.
    pub message_len: u32,
}

/// Parses the fixed part of a reply ([`encode_reply`]).
pub fn parse_reply_header(b: &[u8; REPLY_HEADER_BYTES]) -> ReplyHeader {
    ReplyHeader {
        status: u32_at(b, 0),
        message_len: u32_at(b, 8),
    }
}

/// The region id at the end of a success reply; 0 is not a region id
/// (`region_id` names it).
pub fn parse_reply_id(b: &[u8; REPLY_ID_BYTES]) -> Result<u64, InvalidField> {
    match u64_at(b, 0) {
        0 => Err(InvalidField::new("region_id", "0 is not a region id")),
        id => Ok(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> PagedGeometry {
        PagedGeometry::packed(PageLayout::CrossLayer, 3, 4, 2, 8, 2, 10)
    }

    #[test]
    fn the_preamble_has_the_documented_layout() {
        let g = PagedGeometry {
            page_stride: 0x1122,
            kv_stride: 0x3344,
            ..PagedGeometry::packed(PageLayout::PerLayer, 2, 3, 4, 5, 2, 6)
        };
        let b = encode_preamble(KIND_CUDA_IPC, 3, 999, &[7u8; 64], &g, "eng");
        assert_eq!(b.len(), HEADER_BYTES_V3 + 3);
        assert_eq!(&b[..8], b"KVSREGN\0");
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 3);
        assert_eq!(&b[128..136], &0x1122u64.to_le_bytes());
        assert_eq!(&b[136..144], &0x3344u64.to_le_bytes());
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), KIND_CUDA_IPC);
        assert_eq!(u32::from_le_bytes([b[12], b[13], b[14], b[15]]), 3);
        assert_eq!(b[24], 7);
        assert_eq!(u32::from_le_bytes([b[88], b[89], b[90], b[91]]), 1);
        assert_eq!(u32::from_le_bytes([b[112], b[113], b[114], b[115]]), 6);
        assert_eq!(&b[144..], b"eng");
        // Version 2: the same first 128 bytes but its version, then the name.
        let v2 = encode_preamble_v2(KIND_CUDA_IPC, 3, 999, &[7u8; 64], &g, "eng");
        assert_eq!(&v2[10..128], &b[10..128]);
        assert_eq!(u16::from_le_bytes([v2[8], v2[9]]), 2);
        assert_eq!(&v2[128..], b"eng");
        assert_eq!(
            RefuseReason::from_code(2).map(RefuseReason::label),
            Some("geometry")
        );
    }

    #[test]
    fn preambles_round_trip_through_the_parser() {
        for (kind, layout, layer_stride, page_stride, kv_stride) in [
            (KIND_MEMFD, PageLayout::CrossLayer, 0, 0, 0),
            (KIND_CUDA_IPC, PageLayout::PerLayer, 1 << 20, 0, 0),
            (KIND_CUDA_IPC, PageLayout::PerLayer, 0, 128, 1280),
        ] {
            let p = RegionPreamble {
                kind,
                device: 1,
                bytes: 1 << 22,
                handle: std::array::from_fn(|i| i as u8),
                geometry: PagedGeometry {
                    layout,
                    layer_stride,
                    page_stride,
                    kv_stride,
                    ..geometry()
                },
                name: "engine-0".into(),
            };
            let b = p.encode();
            assert_eq!(
                parse_preamble(&b),
                Ok(PreambleParse::Complete(Box::new(p.clone())))
            );
            // A version-2 client's preamble parses with packed strides.
            let v2 = encode_preamble_v2(p.kind, p.device, p.bytes, &p.handle, &p.geometry, &p.name);
            let mut want = p.clone();
            want.geometry.page_stride = 0;
            want.geometry.kv_stride = 0;
            assert_eq!(
                parse_preamble(&v2),
                Ok(PreambleParse::Complete(Box::new(want)))
            );
        }
    }

    #[test]
    fn preambles_parse_step_by_step_and_name_bad_fields() {
        let g = geometry();
        let b = encode_preamble(KIND_MEMFD, 0, g.region_bytes(), &[0; 64], &g, "engine-0");
        assert_eq!(
            parse_preamble(&b[..3]),
            Ok(PreambleParse::Need(HEADER_BYTES))
        );
        assert_eq!(
            parse_preamble(&b[..HEADER_BYTES]),
            Ok(PreambleParse::Need(HEADER_BYTES_V3))
        );
        assert_eq!(
            parse_preamble(&b[..HEADER_BYTES_V3]),
            Ok(PreambleParse::Need(HEADER_BYTES_V3 + 8))
        );
        let v2 = encode_preamble_v2(KIND_MEMFD, 0, g.region_bytes(), &[0; 64], &g, "engine-0");
        assert_eq!(
            parse_preamble(&v2[..HEADER_BYTES]),
            Ok(PreambleParse::Need(HEADER_BYTES + 8))
        );
        let PreambleParse::Complete(p) = parse_preamble(&b).unwrap() else {
            panic!("complete")
        };
        assert_eq!(
            (p.kind, p.geometry, p.name.as_str()),
            (KIND_MEMFD, g, "engine-0")
        );
        let field_of = |at: usize, v: u8| {
            let mut bad = b.clone();
            bad[at] = v;
            parse_preamble(&bad).unwrap_err()
        };
        assert_eq!(field_of(0, b'X').field, "magic");
        assert!(field_of(0, b'X').to_string().starts_with("magic: "));
        assert_eq!(field_of(8, 9).field, "version");
        // A version-1 client is told why, in a reply it can read.
        let e = field_of(8, 1);
        assert_eq!(e.field, "version");
        assert!(e.reason.contains("64-bit region ids"), "{e}");
        assert_eq!(field_of(10, 3).field, "kind");
        let e = field_of(88, 7);
        assert_eq!(e.field, "layout");
        assert_eq!(RefuseReason::of_preamble_field(&e), RefuseReason::Geometry);
        assert_eq!(
            RefuseReason::of_preamble_field(&field_of(8, 9)),
            RefuseReason::Preamble
        );
        let e = field_of(116, 0);
        assert_eq!(e.to_string(), "name: 0 bytes (1 to 240 allowed)");
        assert_eq!(
            field_of(HEADER_BYTES_V3, 0xff).to_string(),
            "name: not UTF-8"
        );
    }

    #[test]
    fn replies_round_trip() {
        let reply = encode_reply(2, 77, "layers: must be at least 1");
        assert_eq!(&reply[..4], &2u32.to_le_bytes());
        // A refusal is version 1's: status, a zero id, the message, nothing after.
        assert_eq!(&reply[4..8], &[0; 4]);
        assert_eq!(reply.len(), REPLY_HEADER_BYTES + 26);
        let head = parse_reply_header(reply[..REPLY_HEADER_BYTES].try_into().unwrap());
        assert_eq!(
            head,
            ReplyHeader {
                status: 2,
                message_len: 26
            }
        );
        assert_eq!(&reply[REPLY_HEADER_BYTES..], b"layers: must be at least 1");
        let id = 0xfedc_ba98_7654_3210u64;
        let ok = encode_reply(0, id, "");
        assert_eq!(ok.len(), REPLY_HEADER_BYTES + REPLY_ID_BYTES);
        assert_eq!(
            parse_reply_header(ok[..REPLY_HEADER_BYTES].try_into().unwrap()),
            ReplyHeader {
                status: 0,
                message_len: 0
            }
        );
        assert_eq!(
            parse_reply_id(ok[REPLY_HEADER_BYTES..].try_into().unwrap()),
            Ok(id)
        );
        assert_eq!(parse_reply_id(&[0; 8]).unwrap_err().field, "region_id");
        let long = encode_reply(0, 9, &"m".repeat(5000));
        assert_eq!(
            long.len(),
            REPLY_HEADER_BYTES + MAX_REPLY_MESSAGE_BYTES + REPLY_ID_BYTES
        );
        for r in RefuseReason::ALL {
            assert_eq!(RefuseReason::from_code(r.code()), Some(r));
        }
        assert_eq!(RefuseReason::from_code(0), None);
    }
}
