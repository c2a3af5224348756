//! Device memory: two arenas and a budget.
//!
//! - **Persistent** (weights, LoRA parameters, optimizer state): one driver allocation per buffer,
//!   freed when the last [`DeviceBuffer`] referring to it is dropped.
//! - **Scratch** (per-step activations): a bump allocator over large blocks. [`Arenas::reset_scratch`]
//!   rewinds it each step without returning memory to the driver, so a step's buffers land at the same
//!   addresses every time (what CUDA-graph replay needs). A scratch buffer must not be used after
//!   the reset that follows its allocation.
//!
//! Both count what they hold from the driver; `limit` (the `--vram-limit` budget) is checked before
//! every driver allocation, so running over it is an error with the numbers, not a crash mid-step.

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::sync::Arc;

const ALIGN: usize = 256;
const SCRATCH_BLOCK: usize = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArenaKind {
    Persistent,
    Scratch,
}

/// Byte counts of one arena.
#[derive(Clone, Copy, Debug, Default)]
pub struct ArenaStats {
    /// Bytes currently handed out to buffers.
    pub in_use: usize,
    /// Largest `in_use` seen.
    pub high_water: usize,
    /// Bytes held from the driver.
    pub reserved: usize,
}

/// A span of device memory. Cloning shares it; the memory lives while any clone does.
#[derive(Clone)]
pub struct DeviceBuffer {
    ptr: u64,
    bytes: usize,
    _block: Arc<CudaSlice<u8>>,
}

impl DeviceBuffer {
    /// The device address, as passed to kernels.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// `bytes` bytes starting `offset` bytes in, sharing this buffer's memory.
    pub fn slice(&self, offset: usize, bytes: usize) -> Option<DeviceBuffer> {
        (offset + bytes <= self.bytes).then(|| DeviceBuffer { ptr: self.ptr + offset as u64, bytes, _block: self._block.clone() })
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} B)", self.ptr, self.bytes)
    }
}

#[derive(Default)]
pub(super) struct Arenas {
    pub limit: Option<usize>,
    persistent: Vec<std::sync::Weak<CudaSlice<u8>>>,
    persistent_stats: ArenaStats,
    scratch_blocks: Vec<Arc<CudaSlice<u8>>>,
    scratch_block: usize,
    scratch_offset: usize,
    scratch_stats: ArenaStats,
}

impl Arenas {
    pub fn alloc(&mut self, stream: &Arc<CudaStream>, kind: ArenaKind, bytes: usize) -> Result<DeviceBuffer> {
        let bytes = bytes.max(1);
        match kind {
            ArenaKind::Persistent => {
                self.refresh_persistent();
                let block = Arc::new(self.driver_alloc(stream, kind, bytes)?);
                self.persistent.push(Arc::downgrade(&block));
                self.persistent_stats.reserved += block.len();
                self.persistent_stats.in_use += block.len();
                self.persistent_stats.high_water = self.persistent_stats.high_water.max(self.persistent_stats.in_use);
                Ok(DeviceBuffer { ptr: base_ptr(&block, stream), bytes, _block: block })
            }
            ArenaKind::Scratch => self.alloc_scratch(stream, bytes),
        }
    }

    fn alloc_scratch(&mut self, stream: &Arc<CudaStream>, bytes: usize) -> Result<DeviceBuffer> {
        let rounded = bytes.div_ceil(ALIGN) * ALIGN;
        loop {
            if let Some(block) = self.scratch_blocks.get(self.scratch_block) {
                if self.scratch_offset + rounded <= block.len() {
                    let ptr = base_ptr(block, stream) + self.scratch_offset as u64;
                    self.scratch_offset += rounded;
                    self.scratch_stats.in_use += rounded;
                    self.scratch_stats.high_water = self.scratch_stats.high_water.max(self.scratch_stats.in_use);
                    return Ok(DeviceBuffer { ptr, bytes, _block: block.clone() });
                }
                self.scratch_block += 1;
                self.scratch_offset = 0;
                continue;
            }
            let block = self.driver_alloc(stream, ArenaKind::Scratch, rounded.max(SCRATCH_BLOCK))?;
            self.scratch_stats.reserved += block.len();
            self.scratch_blocks.push(Arc::new(block));
        }
    }

    pub fn reset_scratch(&mut self) {
        self.scratch_block = 0;
        self.scratch_offset = 0;
        self.scratch_stats.in_use = 0;
    }

    pub fn stats(&self, kind: ArenaKind) -> ArenaStats {
        match kind {
            ArenaKind::Persistent => {
                let live: usize = self.persistent.iter().filter_map(|w| w.upgrade()).map(|b| b.len()).sum();
                ArenaStats { in_use: live, reserved: live, high_water: self.persistent_stats.high_water }
            }
            ArenaKind::Scratch => self.scratch_stats,
        }
    }

    /// Forgets persistent buffers that have been freed.
    fn refresh_persistent(&mut self) {
        self.persistent.retain(|w| w.strong_count() > 0);
        let live: usize = self.persistent.iter().filter_map(|w| w.upgrade()).map(|b| b.len()).sum();
        self.persistent_stats.in_use = live;
        self.persistent_stats.reserved = live;
    }

    fn driver_alloc(&self, stream: &Arc<CudaStream>, kind: ArenaKind, bytes: usize) -> Result<CudaSlice<u8>> {
        let held = self.persistent_stats.reserved + self.scratch_stats.reserved;
        if let Some(limit) = self.limit {
            if held + bytes > limit {
                bail!(
                    "VRAM budget exceeded: {kind:?} needs {} more, {} already held (persistent {}, scratch {}), limit {}; raise --vram-limit or lower --resolution / --batch-size",
                    mib(bytes),
                    mib(held),
                    mib(self.persistent_stats.reserved),
                    mib(self.scratch_stats.reserved),
                    mib(limit)
                );
            }
        }
        // SAFETY: uninitialized device memory; every kernel writes its outputs before they are read.
        unsafe { stream.alloc::<u8>(bytes) }.map_err(|e| {
            let (free, total) = stream.context().mem_get_info().unwrap_or((0, 0));
            anyhow!(
                "out of GPU memory: {kind:?} allocation of {} failed ({e}); sdlora holds {}, the device has {} free of {}; lower --resolution or --batch-size, or free the GPU of other work",
                mib(bytes),
                mib(held),
                mib(free),
                mib(total)
            )
        })
    }
}

fn base_ptr(block: &CudaSlice<u8>, stream: &Arc<CudaStream>) -> u64 {
    let (ptr, _sync) = block.device_ptr(stream);
    ptr
}

/// Bytes as "12.3 MiB".
pub fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}
