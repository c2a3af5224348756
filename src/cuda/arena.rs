//! Device memory: two arenas and a budget.
//!
//! - **Persistent** (weights, LoRA parameters, optimizer state): one driver allocation per buffer,
//!   freed when the last [`DeviceBuffer`] referring to it is dropped.
//! - **Scratch** (activations, workspaces): spans carved first-fit out of large blocks that are kept
//!   from the driver. A span goes back to its block's free list when its last [`DeviceBuffer`]
//!   handle drops, so memory is reused as soon as a tensor dies. Reuse is safe without any
//!   synchronization because every kernel runs on the one stream: work queued later on a reused
//!   span starts after the earlier work on it has finished. The same sequence of allocations and
//!   frees lands at the same addresses every time (what CUDA-graph replay needs).
//!
//! Both count what they hold from the driver; `limit` (the `--vram-limit` budget) is checked before
//! every driver allocation, so running over it is an error with the numbers, not a crash mid-step.

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::sync::{Arc, Mutex};

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
    _hold: Arc<Hold>,
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
        (offset + bytes <= self.bytes).then(|| DeviceBuffer {
            ptr: self.ptr + offset as u64,
            bytes,
            _hold: self._hold.clone(),
        })
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} B)", self.ptr, self.bytes)
    }
}

/// What keeps a buffer's memory alive: its driver block, and for scratch the span to give back.
struct Hold {
    _block: Arc<CudaSlice<u8>>,
    scratch: Option<(Arc<Mutex<ScratchPool>>, Span)>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some((pool, span)) = self.scratch.take() {
            // A poisoned lock only means another thread panicked; the free list itself is consistent.
            let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.free(span);
        }
    }
}

/// A span of a scratch block: (block index, offset, rounded size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    block: usize,
    offset: usize,
    size: usize,
}

/// Free ranges of one block, sorted by offset and coalesced.
#[derive(Debug, Default)]
struct FreeList(Vec<(usize, usize)>);

impl FreeList {
    fn new(len: usize) -> FreeList {
        FreeList(vec![(0, len)])
    }

    /// First fit: the lowest offset with `size` free bytes.
    fn take(&mut self, size: usize) -> Option<usize> {
        let i = self.0.iter().position(|&(_, len)| len >= size)?;
        let (offset, len) = self.0[i];
        if len == size {
            self.0.remove(i);
        } else {
            self.0[i] = (offset + size, len - size);
        }
        Some(offset)
    }

    fn give(&mut self, offset: usize, size: usize) {
        let i = self.0.partition_point(|&(o, _)| o < offset);
        debug_assert!(
            i == 0 || self.0[i - 1].0 + self.0[i - 1].1 <= offset,
            "scratch span freed twice"
        );
        self.0.insert(i, (offset, size));
        if i + 1 < self.0.len() && offset + size == self.0[i + 1].0 {
            self.0[i].1 += self.0.remove(i + 1).1;
        }
        if i > 0 && self.0[i - 1].0 + self.0[i - 1].1 == offset {
            self.0[i - 1].1 += self.0.remove(i).1;
        }
    }
}

/// The scratch blocks with their free lists and byte counts.
#[derive(Default)]
struct ScratchPool {
    blocks: Vec<(Arc<CudaSlice<u8>>, FreeList)>,
    stats: ArenaStats,
}

impl ScratchPool {
    fn take(&mut self, size: usize) -> Option<Span> {
        let span = self
            .blocks
            .iter_mut()
            .enumerate()
            .find_map(|(block, (_, free))| {
                free.take(size).map(|offset| Span {
                    block,
                    offset,
                    size,
                })
            })?;
        self.stats.in_use += size;
        self.stats.high_water = self.stats.high_water.max(self.stats.in_use);
        Some(span)
    }

    fn free(&mut self, span: Span) {
        self.blocks[span.block].1.give(span.offset, span.size);
        self.stats.in_use -= span.size;
    }
}

#[derive(Default)]
pub(super) struct Arenas {
    pub limit: Option<usize>,
    persistent: Vec<std::sync::Weak<CudaSlice<u8>>>,
    persistent_stats: ArenaStats,
    scratch: Arc<Mutex<ScratchPool>>,
}

impl Arenas {
    pub fn alloc(
        &mut self,
        stream: &Arc<CudaStream>,
        kind: ArenaKind,
        bytes: usize,
    ) -> Result<DeviceBuffer> {
        let bytes = bytes.max(1);
        match kind {
            ArenaKind::Persistent => {
                self.refresh_persistent();
                let block = Arc::new(self.driver_alloc(stream, kind, bytes)?);
                self.persistent.push(Arc::downgrade(&block));
                self.persistent_stats.reserved += block.len();
                self.persistent_stats.in_use += block.len();
                self.persistent_stats.high_water = self
                    .persistent_stats
                    .high_water
                    .max(self.persistent_stats.in_use);
                Ok(DeviceBuffer {
                    ptr: base_ptr(&block, stream),
                    bytes,
                    _hold: Arc::new(Hold {
                        _block: block,
                        scratch: None,
                    }),
                })
            }
            ArenaKind::Scratch => self.alloc_scratch(stream, bytes),
        }
    }

    fn alloc_scratch(&mut self, stream: &Arc<CudaStream>, bytes: usize) -> Result<DeviceBuffer> {
        let size = bytes.div_ceil(ALIGN) * ALIGN;
        let lock = |pool: &Arc<Mutex<ScratchPool>>| {
            pool.lock().unwrap_or_else(|e| e.into_inner()).take(size)
        };
        let span = match lock(&self.scratch) {
            Some(span) => span,
            None => {
                let block =
                    self.driver_alloc(stream, ArenaKind::Scratch, size.max(SCRATCH_BLOCK))?;
                let mut pool = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
                pool.stats.reserved += block.len();
                let len = block.len();
                pool.blocks.push((Arc::new(block), FreeList::new(len)));
                pool.take(size).expect("a fresh block holds the span")
            }
        };
        let block = self
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .blocks[span.block]
            .0
            .clone();
        let ptr = base_ptr(&block, stream) + span.offset as u64;
        Ok(DeviceBuffer {
            ptr,
            bytes,
            _hold: Arc::new(Hold {
                _block: block,
                scratch: Some((self.scratch.clone(), span)),
            }),
        })
    }

    pub fn stats(&self, kind: ArenaKind) -> ArenaStats {
        match kind {
            ArenaKind::Persistent => {
                let live = self.persistent_live();
                ArenaStats {
                    in_use: live,
                    reserved: live,
                    high_water: self.persistent_stats.high_water,
                }
            }
            ArenaKind::Scratch => self.scratch.lock().unwrap_or_else(|e| e.into_inner()).stats,
        }
    }

    /// Starts the high-water marks again from what is in use now.
    pub fn reset_high_water(&mut self) {
        self.refresh_persistent();
        self.persistent_stats.high_water = self.persistent_stats.in_use;
        let mut pool = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        pool.stats.high_water = pool.stats.in_use;
    }

    /// Returns scratch blocks that hold no live buffer to the driver (after a phase whose
    /// activations were larger than what follows, e.g. the VAE before the UNet).
    pub fn release_free_scratch(&mut self) {
        let mut pool = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        // Only trailing blocks can go: live spans refer to blocks by index.
        while let Some((block, free)) = pool.blocks.last() {
            if free.0 != [(0, block.len())] {
                break;
            }
            pool.stats.reserved -= block.len();
            pool.blocks.pop();
        }
    }

    /// Bytes of the persistent buffers still alive.
    fn persistent_live(&self) -> usize {
        self.persistent.iter().filter_map(|w| w.upgrade()).map(|b| b.len()).sum()
    }

    /// Forgets persistent buffers that have been freed.
    fn refresh_persistent(&mut self) {
        self.persistent.retain(|w| w.strong_count() > 0);
        let live = self.persistent_live();
        self.persistent_stats.in_use = live;
        self.persistent_stats.reserved = live;
    }

    fn driver_alloc(
        &self,
        stream: &Arc<CudaStream>,
        kind: ArenaKind,
        bytes: usize,
    ) -> Result<CudaSlice<u8>> {
        let scratch_reserved = self
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats
            .reserved;
        let held = self.persistent_stats.reserved + scratch_reserved;
        if let Some(limit) = self.limit {
            if held + bytes > limit {
                bail!(
                    "VRAM budget exceeded: {kind:?} needs {} more, {} already held (persistent {}, scratch {}), limit {}; raise --vram-limit or lower --resolution / --batch-size",
                    mib(bytes),
                    mib(held),
                    mib(self.persistent_stats.reserved),
                    mib(scratch_reserved),
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

#[cfg(test)]
mod tests {
    use super::FreeList;

    #[test]
    fn free_list_is_first_fit_and_coalesces() {
        let mut f = FreeList::new(1000);
        let a = f.take(100).unwrap();
        let b = f.take(200).unwrap();
        let c = f.take(300).unwrap();
        assert_eq!((a, b, c), (0, 100, 300));
        f.give(b, 200);
        assert_eq!(f.take(150), Some(100), "first fit reuses the hole");
        f.give(100, 150);
        f.give(a, 100);
        assert_eq!(
            f.0,
            vec![(0, 300), (600, 400)],
            "a freed neighbour merges with the hole before it"
        );
        f.give(c, 300);
        assert_eq!(f.0, vec![(0, 1000)], "everything freed is one range again");
        assert_eq!(f.take(1001), None);
    }

    #[test]
    fn the_same_sequence_lands_at_the_same_offsets() {
        let run = |f: &mut FreeList| {
            let x = f.take(64).unwrap();
            let y = f.take(128).unwrap();
            f.give(x, 64);
            let z = f.take(32).unwrap();
            f.give(y, 128);
            f.give(z, 32);
            (x, y, z)
        };
        let mut f = FreeList::new(4096);
        let first = run(&mut f);
        assert_eq!(f.0, vec![(0, 4096)]);
        assert_eq!(run(&mut f), first);
    }
}
