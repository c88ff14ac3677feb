//! The slot allocators of the tiers: one fixed region carved into slots of
//! one size class each (one class per distinct block size), so a tier can
//! never hold more bytes than its capacity and nothing is allocated per block.
//!
//! - [`SlabArena`] (host and HBM tiers): each class takes *slabs*, runs of the
//!   region sized for the class (about 1/256 of the region, at least one
//!   block), carved from free space wherever it lies; a slab returns its
//!   bytes as soon as its last slot is freed, merging with free neighbours.
//!   Any number of classes can share the region, and it fills close to its
//!   capacity before anything has to go.
//! - [`SlotArena`] (disk tier): segments of one fixed size, assigned to a
//!   class whole; its layout (segment, slot) is what the disk index records,
//!   and [`SlotArena::restore`] rebuilds it at start-up.
//!
//! The arenas are bookkeeping only (offsets); they are not thread-safe by
//! themselves and live under the owning tier's metadata lock. Bytes are moved
//! through [`ArenaMemory`] outside that lock.

mod memory;
mod slab;
mod slot;

pub use memory::ArenaMemory;
pub use slab::{SLAB_DIVISOR, SLABS_PER_CLASS, SlabArena, SlabCost};
pub use slot::SlotArena;

/// Alignment of segments inside the region (and so of the first slot of each).
pub const SEGMENT_ALIGN: usize = 4096;

/// A slot's position: segment (in a [`SlabArena`], slab) number and slot
/// number inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotRef {
    pub segment: u32,
    pub index: u32,
}
