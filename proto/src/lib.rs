//! kvstrata wire protocol: the generated prost messages and tonic client/server
//! stubs for `kvstrata.v1`, plus the encoded file descriptor set that the server's
//! reflection service publishes.
#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod codec;
pub mod frame_buffers;

/// `kvstrata.v1`: the KV-block cache service.
pub mod v1 {
    tonic::include_proto!("kvstrata.v1");
}

/// `sglang.runtime.hicache`: SGLang HiCache's L3 storage service, which the
/// daemon serves on its own Unix socket (docs/sglang.md).
pub mod sglang {
    tonic::include_proto!("sglang.runtime.hicache");
}

/// Encoded `FileDescriptorSet` of every kvstrata .proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kvstrata_descriptor.bin"));
