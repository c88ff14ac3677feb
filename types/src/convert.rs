//! [`NamespaceSpec`] to and from its protobuf form (`kvstrata.v1.NamespaceSpec`),
//! for the client (which sends specs and reads them back from `ListNamespaces`)
//! and the daemon (which reads them from `RegisterNamespace`). Dtype and layout
//! codes are the Rust enums' discriminants; `docs/protocol.md` lists them.

use bytes::Bytes;
use kvstrata_proto::v1 as proto;

use crate::error::InvalidField;
use crate::namespace::{Dtype, Layout, NamespaceSpec};

/// The wire form of a spec.
pub fn spec_to_proto(spec: &NamespaceSpec) -> proto::NamespaceSpec {
    proto::NamespaceSpec {
        model_id: spec.model_id.clone(),
        model_fingerprint: Bytes::copy_from_slice(&spec.model_fingerprint),
        num_layers: spec.num_layers,
        num_kv_heads: spec.num_kv_heads,
        head_dim: spec.head_dim,
        dtype: spec.dtype as i32,
        block_tokens: spec.block_tokens,
        layout: spec.layout as i32,
        tp_rank: spec.tp_rank,
        tp_size: spec.tp_size,
        opaque_block_bytes: spec.opaque_block_bytes,
    }
}

/// A spec from its wire form. `LAYOUT_UNSPECIFIED` (0) reads as layer-major;
/// an unknown dtype (0 included) or layout code fails, naming `spec.dtype` or
/// `spec.layout`. The fields are not validated here
/// ([`NamespaceSpec::validate`] does that).
pub fn spec_from_proto(spec: &proto::NamespaceSpec) -> Result<NamespaceSpec, InvalidField> {
    let dtype = Dtype::from_code(spec.dtype).ok_or_else(|| {
        InvalidField::new(
            "spec.dtype",
            format!("{} is not a known dtype (1 = f16 ... 6 = int8)", spec.dtype),
        )
    })?;
    let layout = match spec.layout {
        0 => Layout::LayerMajor,
        code => Layout::from_code(code).ok_or_else(|| {
            InvalidField::new("spec.layout", format!("{code} is not a known layout"))
        })?,
    };
    Ok(NamespaceSpec {
        model_id: spec.model_id.clone(),
        model_fingerprint: spec.model_fingerprint.to_vec(),
        num_layers: spec.num_layers,
        num_kv_heads: spec.num_kv_heads,
        head_dim: spec.head_dim,
        dtype,
        block_tokens: spec.block_tokens,
        layout,
        tp_rank: spec.tp_rank,
        tp_size: spec.tp_size,
        opaque_block_bytes: spec.opaque_block_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_proto() {
        let mut spec = NamespaceSpec::layer_major("m", 2, 3, 4, Dtype::Fp8E5m2, 16);
        spec.model_fingerprint = vec![1, 2, 3];
        spec.tp_rank = 1;
        spec.tp_size = 4;
        let wire = spec_to_proto(&spec);
        assert_eq!(wire.dtype, proto::Dtype::Fp8E5m2 as i32);
        assert_eq!(wire.layout, proto::Layout::LayerMajor as i32);
        assert_eq!(spec_from_proto(&wire).unwrap(), spec);
        let mut opaque = spec.clone();
        opaque.layout = Layout::Opaque;
        opaque.opaque_block_bytes = 4096;
        let wire = spec_to_proto(&opaque);
        assert_eq!(wire.layout, proto::Layout::Opaque as i32);
        assert_eq!(spec_from_proto(&wire).unwrap(), opaque);
    }

    #[test]
    fn enum_codes_match_the_wire() {
        for (rust, wire) in [
            (Dtype::F16, proto::Dtype::F16),
            (Dtype::Bf16, proto::Dtype::Bf16),
            (Dtype::F32, proto::Dtype::F32),
            (Dtype::Fp8E4m3, proto::Dtype::Fp8E4m3),
            (Dtype::Fp8E5m2, proto::Dtype::Fp8E5m2),
            (Dtype::Int8, proto::Dtype::Int8),
        ] {
            assert_eq!(rust as i32, wire as i32);
        }
        assert_eq!(Layout::LayerMajor as i32, proto::Layout::LayerMajor as i32);
        assert_eq!(Layout::Opaque as i32, proto::Layout::Opaque as i32);
    }

    #[test]
    fn unknown_codes_are_refused_naming_the_field() {
        let mut wire = spec_to_proto(&NamespaceSpec::layer_major("m", 1, 1, 1, Dtype::F16, 1));
        wire.dtype = 0;
        let e = spec_from_proto(&wire).unwrap_err();
        assert_eq!(e.field, "spec.dtype");
        assert_eq!(
            e.to_string(),
            "spec.dtype: 0 is not a known dtype (1 = f16 ... 6 = int8)"
        );
        wire.dtype = 1;
        wire.layout = 9;
        let e = spec_from_proto(&wire).unwrap_err();
        assert_eq!(e.to_string(), "spec.layout: 9 is not a known layout");
    }

    #[test]
    fn unspecified_layout_reads_as_layer_major() {
        let mut wire = spec_to_proto(&NamespaceSpec::layer_major("m", 1, 1, 1, Dtype::F16, 1));
        wire.layout = proto::Layout::Unspecified as i32;
        assert_eq!(spec_from_proto(&wire).unwrap().layout, Layout::LayerMajor);
    }
}
