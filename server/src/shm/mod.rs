//! Shared memory between the daemon and clients on the same host: the
//! mempool socket where clients register memfd pools ([`mempool`]), the pool
//! registry and the byte ranges requests name in it ([`pool`]), and SGLang
//! HiCache's storage service, which moves data by ranges of such pools
//! ([`sglang`]). Engine KV memory registered over CUDA IPC is a region, see
//! [`crate::region`].

pub mod mempool;
pub mod pool;
pub mod sglang;
