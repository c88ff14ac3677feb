//! kvstrata's built-in prefill and decode engines, and the Llama-family model they run.
//!
//! The engines are the cache's first clients. A [`model::LlamaModel`] runs on the CPU
//! (candle) over an explicit [`kv::PagedKv`] whose pages are exactly kvstrata blocks
//! (layer-major, f16), so a prefill can store what it computed and a decode, possibly
//! in another process, can start from blocks it loaded.
//!
//! Data path of one request, following calls:
//! [`engine::Engine::prefill`] → tokenize ([`tokenizer`]) → chained keys
//! (`kvstrata_client::block_keys`) → `Lookup` → load the cached prefix into pages
//! ([`store::BlockStore`]) → [`model::LlamaModel::forward`] on the rest → store the new
//! full blocks → first token. [`engine::Engine::decode`] loads the blocks again and
//! generates.
//!
//! [`cuda`] is the same model on a CUDA device (cuBLAS and NVRTC-compiled kernels,
//! KV pages in GPU memory); [`synthetic`] makes seeded random weights in real
//! geometries (Llama-3-8B, Qwen3-8B, ...) for performance work.

pub mod chat;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod kv;
pub mod load_policy;
pub mod model;
pub mod rag;
pub mod sampling;
pub mod store;
pub mod synthetic;
pub mod tokenizer;

pub use error::{EngineError, Result};
