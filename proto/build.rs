//! Compiles the .proto files with protox (no system protoc) and generates
//! tonic/prost code plus a file descriptor set for server reflection.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["kvstrata/v1/kvstrata.proto", "sglang/runtime/hicache.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("kvstrata_descriptor.bin"), fds.encode_to_vec())?;
    // Every `bytes` field is a `bytes::Bytes` (decoded as a slice of the
    // received buffer, not a copy); the codec reserves before encoding
    // (src/codec.rs).
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::codec::KvCodec")
        .compile_fds(fds)?;
    Ok(())
}
