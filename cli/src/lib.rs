//! The verbs of the `kvstrata` binary (`src/main.rs` parses the command line and
//! calls them):
//!
//! - [`client_verbs`]: `stats`, `ls`, `get`, `put`, `ns`, `watch`, ... against a
//!   running daemon, through `kvstrata_client`.
//! - [`engine_verbs`]: `prefill`, `decode` and `chat` with the built-in engines
//!   (`kvstrata_engine`), on the CPU or a GPU through [`verb_engine`].
//! - [`demo`] and [`ttft`]: `kvstrata demo` and `kvstrata bench ttft`, an
//!   in-process daemon (`kvstrata_server::Daemon`) with the engines running
//!   through it.
//! - [`interference`]: `kvstrata bench interference`, GPU decode steps while
//!   another engine's KV is stored into a daemon child process.
//! - [`route`]: `kvstrata route`, one routing decision or the HTTP service of
//!   `kvstrata_router`.
//!
//! `serve` starts `kvstrata_server::Daemon`; `bench`, `bench-disk` and
//! `bench-remote` are `kvstrata_benches`; `gpu-check` is `kvstrata_gpucheck`.

pub mod client_verbs;
pub mod demo;
pub mod engine_verbs;
pub mod interference;
pub mod route;
pub mod ttft;
pub mod verb_engine;
