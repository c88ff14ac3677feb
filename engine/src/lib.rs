//! Built-in prefill and decode engines of kvstrata.
//!
//! Empty for now: the engines and the model they run arrive with the engine
//! issue (see docs/architecture.md). The crate exists so the workspace layout of
//! DESIGN.md holds from the start.
