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

pub mod chat;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod kv;
pub mod model;
pub mod rag;
pub mod sampling;
pub mod store;
pub mod tokenizer;

pub use error::{EngineError, Result};
