//! Weights that are the file itself: a tensor's buffer points into a private mapping of its safetensors
//! file, as PyTorch's `mmap` loading does, so loading copies nothing and the pages are the page cache's.
//!
//! Why: reading 5.2 GB of f32 weights into fresh buffers costs the kernel zeroing every page and then
//! copying the page cache into it (2.7–2.9 s warm on the 2-core box; diffusers maps and copies
//! nothing: 0.4–0.9 s). candle's CPU tensors own a `Vec<T>`, and a `Vec` is freed by the global
//! allocator, so the process's allocator is [`MappingAwareAllocator`]: the system allocator plus one
//! rule — memory inside a registered mapping is never handed to `free`; its whole pages are given
//! back to the kernel instead (`MADV_DONTNEED`: dropped from this process, kept in the page cache).
//!
//! Rules that keep this sound:
//! - A mapping is `MAP_PRIVATE`: a write to a tensor copies the page, the file never changes.
//! - A mapping is never unmapped and its slot never reused, so an address inside a registered range can
//!   only ever have come from that mapping. A process maps each model file once; when the slots run out
//!   (a test process opening hundreds of files), tensors are read by copying as before.
//! - Each tensor's range is handed out as a `Vec` at most once ([`MappedFile::take`]), so no two
//!   owners alias the same memory.
//! - A buffer is handed out only when the file's bytes are aligned for the element type.
//!
//! The price, shared with PyTorch: a weights file rewritten or truncated while sdscale runs changes or
//! faults (SIGBUS) the tensors read from it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Mappings one process can register; beyond this, files are read by copying.
const SLOTS: usize = 256;

static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static ENDS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Slots published so far; slot `i < PUBLISHED` is fully written (Release/Acquire).
static PUBLISHED: AtomicUsize = AtomicUsize::new(0);
/// Serialises registrations (readers never lock).
static REGISTERING: Mutex<()> = Mutex::new(());

/// The system allocator, aware of the weight mappings (see the module docs).
pub struct MappingAwareAllocator;

fn in_mapping(ptr: *mut u8) -> bool {
    let addr = ptr as usize;
    let published = PUBLISHED.load(Ordering::Acquire);
    (0..published).any(|i| STARTS[i].load(Ordering::Relaxed) <= addr && addr < ENDS[i].load(Ordering::Relaxed))
}

/// Gives the whole pages of a dropped mapped buffer back to the kernel. The bytes around them belong to
/// neighbouring tensors (or the header) and stay.
fn release(ptr: *mut u8, size: usize) {
    let page = page_size();
    let start = (ptr as usize).div_ceil(page) * page;
    let end = (ptr as usize + size) / page * page;
    if end > start {
        // SAFETY: [start, end) lies inside this buffer's range of a live private mapping, which no other
        // owner holds; DONTNEED on a private file mapping reverts those pages to the file's bytes.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize
}

// SAFETY: every block not inside a mapping is the system allocator's, passed through unchanged; blocks
// inside a mapping were handed out by `MappedFile::take` and are never passed to the system allocator.
unsafe impl GlobalAlloc for MappingAwareAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_mapping(ptr) {
            release(ptr, layout.size());
        } else {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !in_mapping(ptr) {
            return System.realloc(ptr, layout, new_size);
        }
        let moved = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
        if !moved.is_null() {
            std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
            release(ptr, layout.size());
        }
        moved
    }
}

/// A whole file mapped privately and registered with the allocator, for the life of the process.
pub struct MappedFile {
    base: *mut u8,
    len: usize,
    /// Start offsets of the ranges already handed out.
    taken: Mutex<HashSet<u64>>,
}

// SAFETY: the mapping is never unmapped; `base` is only read to compute addresses; `taken` is locked.
unsafe impl Send for MappedFile {}
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `file`, or None when it cannot be (empty file, no address space, all slots used): the
    /// caller then reads by copying.
    pub fn map(file: &std::fs::File) -> Option<Self> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(file.metadata().ok()?.len()).ok().filter(|&len| len > 0)?;
        let _registering = REGISTERING.lock().ok()?;
        let slot = PUBLISHED.load(Ordering::Relaxed);
        if slot == SLOTS {
            return None;
        }
        // SAFETY: a fresh private mapping of an open file; the kernel picks the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        STARTS[slot].store(base as usize, Ordering::Relaxed);
        ENDS[slot].store(base as usize + len, Ordering::Relaxed);
        PUBLISHED.store(slot + 1, Ordering::Release);
        Some(Self { base: base.cast(), len, taken: Mutex::new(HashSet::new()) })
    }

    /// The `count` elements of `T` at byte `offset` as a `Vec` whose memory is the mapping — None when
    /// that range was already handed out, is misaligned for `T` or lies outside the file.
    ///
    /// `T` must be a plain number type (every bit pattern valid), as tensor element types are, and
    /// ranges must not overlap one another (they come from one checked safetensors header).
    pub fn take<T: candle_core::WithDType>(&self, offset: u64, count: usize) -> Option<Vec<T>> {
        let bytes = count.checked_mul(std::mem::size_of::<T>())?;
        let start = usize::try_from(offset).ok()?;
        if count == 0 || start.checked_add(bytes)? > self.len {
            return None;
        }
        // SAFETY: in bounds, checked above.
        let ptr = unsafe { self.base.add(start) };
        if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) || !self.taken.lock().ok()?.insert(offset) {
            return None;
        }
        // SAFETY: the memory is mapped readable and writable (privately) for the life of the process,
        // aligned for T, initialised (file bytes are valid for a plain number type), owned by no one
        // else (taken once), and freed through `MappingAwareAllocator`, which recognises it.
        Some(unsafe { Vec::from_raw_parts(ptr.cast::<T>(), count, count) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn mapped_vecs_read_the_file_are_taken_once_and_freed_without_touching_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        // Two "tensors" after an 8-byte header, sharing a page at their boundary.
        let values: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5).collect();
        let mut bytes = vec![0u8; 8];
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        std::fs::File::create(&path).unwrap().write_all(&bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mapped = MappedFile::map(&file).unwrap();

        let mut first = mapped.take::<f32>(8, 1500).unwrap();
        let mut second = mapped.take::<f32>(8 + 1500 * 4, 1500).unwrap();
        assert_eq!((first.as_slice(), second.as_slice()), values.split_at(1500));
        assert!(mapped.take::<f32>(8, 1500).is_none(), "a range is handed out once");
        assert!(mapped.take::<f32>(9, 4).is_none(), "misaligned for f32");
        assert!(mapped.take::<f32>(8 + 3000 * 4, 1).is_none(), "past the end of the file");

        // Writes copy pages privately: the file keeps its bytes.
        first[0] = 42.0;
        second[0] = 43.0;
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        // Dropping the first gives its whole pages back, not the page it shares with the second.
        drop(first);
        assert_eq!((second[0], second[1], second[1499]), (43.0, values[1501], values[2999]));
        // Growing moves a mapped Vec to the heap.
        second.push(1.0);
        assert_eq!((second[0], second[1500], second.len()), (43.0, 1.0, 1501));
    }
}
