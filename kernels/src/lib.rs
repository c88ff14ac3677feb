//! kvstrata's device code: the CUDA kernels (`kernels/cuda/*.cu`, compiled
//! at start-up with NVRTC), their launch wrappers, and a CPU reference for
//! every kernel.
//!
//! - [`layout`]: an engine's paged KV geometry and how its pages map onto
//!   kvstrata's layer-major blocks (`kvstrata_types::geometry`, re-exported).
//! - [`reference`]: the CPU references (batched copy, gather, scatter); CI
//!   tests them against naive loops, the GPU checks compare the kernels with
//!   them.
//! - [`xxh3`]: xxh3-64 of blocks on the device (the HBM tier's demotion
//!   check) and its CPU reference.
//! - [`Gpu`]: a device with two backends, CUDA and CPU, behind one API
//!   (memory, streams, fences, kernels, CUDA IPC). Without a GPU everything
//!   runs on the CPU backend with the same results.
//! - [`staging`]: pinned host buffers lent per request; [`device_staging`]:
//!   a few device buffers per device, lent in sets, for moves between pinned
//!   host memory and an engine's pages that pass through device memory.
//!
//! Data path of a batched copy: [`GpuStream::copy_blocks`] → runs that
//! continue each other are merged ([`reference::coalesce`]); runs of at least
//! the DMA threshold go to the DMA engines (one `cuMemcpyBatchAsync` call, or
//! `cuMemcpyAsync` per run on drivers without it), the rest to one
//! `kvs_batched_copy` launch over a pointer table staged in pinned memory.

pub mod cuda;
mod device;
pub mod device_staging;
mod error;
pub use kvstrata_types::geometry as layout;
pub mod reference;
pub mod staging;
pub mod xxh3;

pub use device::{
    Backend, DEFAULT_DMA_THRESHOLD, DeviceBuffer, DeviceInfo, Fence, Gpu, GpuStream, IpcEvent,
    IpcHandle, PinnedBuffer,
};
pub use device_staging::{
    DEVICE_STAGING_BUFFERS, DEVICE_STAGING_SETS, DEVICE_STAGING_WAIT, DeviceStaging,
    DeviceStagingCounts,
};
pub use error::GpuError;
pub use layout::{ChunkCopy, GeometryError, PageLayout, PagedGeometry};
pub use reference::{CopyOp, CopyTableError};
pub use staging::{STAGING_CACHE_BYTES, StagingBuffer};
pub use xxh3::HashRun;
