//! The global allocator of wasm32 plugins: free lists of small blocks in front
//! of the system allocator.
//!
//! A small command makes a handful of heap operations, all on small blocks:
//! the buffer the host writes the command into, the decoded fields, the
//! replaced value, the response and its release after the call. With the
//! system allocator alone (dlmalloc on `wasm32-unknown-unknown`) they are a
//! large share of the instructions, so of the fuel, the command costs.
//! [`SmallBlockCache`] serves them from one free list per size class instead:
//! a few loads and stores per operation.
//!
//! It is deterministic: an instance is single-threaded, the cache reads
//! nothing from outside the instance, and memory still comes only from the
//! system allocator, that is from `memory.grow`. When the host refuses to grow
//! memory, allocation returns null and the call traps, as before.
//!
//! Plugins that want a different allocator turn off the SDK's default
//! `allocator` feature and declare their own `#[global_allocator]`.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ptr;

/// Sizes of cached blocks are multiples of this, and so is their alignment.
const GRANULE: usize = 8;
/// Requests up to this size (with alignment up to [`GRANULE`]) are cached.
const MAX_CACHED_SIZE: usize = 256;
const CLASSES: usize = MAX_CACHED_SIZE / GRANULE;
/// The most bytes the free lists hold together; blocks freed beyond it go back
/// to the system allocator.
///
/// The bound is small on purpose. What the lists hold between calls is heap
/// state that the host's calls which are not replicated (queries, batches)
/// can change, and an apply's fuel depends on it: a cached block saves a few
/// hundred instructions. The host assumes such heap differences change an
/// apply's fuel by much less than a quarter of its budget; 512 blocks at most
/// keep the difference near 10⁵ units, while a command stream needs only a
/// handful of blocks per size class.
const MAX_CACHED_BYTES: usize = 4 << 10;

/// Wraps an allocator with one free list per small block size.
///
/// Blocks of up to [`MAX_CACHED_SIZE`] bytes are taken from the inner
/// allocator rounded up to a multiple of [`GRANULE`], and on release are kept
/// on the list of their size class, up to [`MAX_CACHED_BYTES`] in all. Other
/// requests go to the inner allocator unchanged.
pub struct SmallBlockCache<A: GlobalAlloc> {
    inner: A,
    state: UnsafeCell<Lists>,
}

struct Lists {
    /// Head of each size class's list; a free block's first word links to the
    /// next one.
    heads: [*mut u8; CLASSES],
    /// Total size of the blocks on the lists.
    cached_bytes: usize,
}

// SAFETY: wasm32 without the `atomics` target feature has no threads, so the
// lists are never accessed concurrently.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl<A: GlobalAlloc + Sync> Sync for SmallBlockCache<A> {}

impl<A: GlobalAlloc> SmallBlockCache<A> {
    /// An empty cache in front of `inner`.
    pub const fn new(inner: A) -> Self {
        Self {
            inner,
            state: UnsafeCell::new(Lists {
                heads: [ptr::null_mut(); CLASSES],
                cached_bytes: 0,
            }),
        }
    }
}

/// The size class serving `layout`, if it is cached.
fn class_of(layout: Layout) -> Option<usize> {
    (layout.size() <= MAX_CACHED_SIZE && layout.align() <= GRANULE)
        .then(|| layout.size().saturating_sub(1) / GRANULE)
}

/// The layout of every block of size class `class`.
fn block_layout(class: usize) -> Layout {
    debug_assert!(class < CLASSES);
    // SAFETY: GRANULE is a power of two and the size is at most
    // MAX_CACHED_SIZE, far below isize::MAX.
    unsafe { Layout::from_size_align_unchecked((class + 1) * GRANULE, GRANULE) }
}

impl<A: GlobalAlloc> SmallBlockCache<A> {
    /// Takes a block of `class` from its list, or from the inner allocator.
    ///
    /// # Safety
    ///
    /// No other reference to the lists may be live (single-threaded use).
    unsafe fn take(&self, class: usize) -> *mut u8 {
        // SAFETY: exclusive access, by the caller's contract.
        let lists = unsafe { &mut *self.state.get() };
        let head = lists.heads[class];
        if head.is_null() {
            // SAFETY: the layout has a non-zero size.
            return unsafe { self.inner.alloc(block_layout(class)) };
        }
        // SAFETY: a listed block is at least GRANULE bytes, aligned to it, and
        // its first word was written by `give`.
        lists.heads[class] = unsafe { head.cast::<*mut u8>().read() };
        lists.cached_bytes -= block_layout(class).size();
        head
    }

    /// Puts `block` of `class` on its list, or back to the inner allocator if
    /// the lists are full.
    ///
    /// # Safety
    ///
    /// `block` was returned by `take(class)` and is no longer used; no other
    /// reference to the lists is live.
    unsafe fn give(&self, block: *mut u8, class: usize) {
        // SAFETY: exclusive access, by the caller's contract.
        let lists = unsafe { &mut *self.state.get() };
        let size = block_layout(class).size();
        if lists.cached_bytes + size > MAX_CACHED_BYTES {
            // SAFETY: the block came from the inner allocator with this layout.
            unsafe { self.inner.dealloc(block, block_layout(class)) };
            return;
        }
        // SAFETY: the block is at least GRANULE bytes, aligned to it, and free.
        unsafe { block.cast::<*mut u8>().write(lists.heads[class]) };
        lists.heads[class] = block;
        lists.cached_bytes += size;
    }
}

// SAFETY: every block handed out is either a block of the inner allocator with
// the requested layout, or a cached block at least as large and as aligned as
// requested that no one else holds: a block is on a list only between its
// release and its next allocation.
unsafe impl<A: GlobalAlloc> GlobalAlloc for SmallBlockCache<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            // SAFETY: single-threaded (see the `Sync` implementation).
            Some(class) => unsafe { self.take(class) },
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { self.inner.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => {
                // SAFETY: single-threaded (see the `Sync` implementation).
                let block = unsafe { self.take(class) };
                if !block.is_null() {
                    // SAFETY: the block holds at least `layout.size()` bytes.
                    unsafe { block.write_bytes(0, layout.size()) };
                }
                block
            }
            // Fresh memory from `memory.grow` is already zero, which the inner
            // allocator knows and large zeroed requests (snapshot buffers)
            // rely on.
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { self.inner.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        match class_of(layout) {
            // SAFETY: `block` was allocated with `layout`, so by `take(class)`.
            Some(class) => unsafe { self.give(block, class) },
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { self.inner.dealloc(block, layout) },
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to the
        // alignment, does not overflow isize.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(layout), class_of(new_layout)) {
            // The block is already large enough.
            (Some(old), Some(new)) if old == new => block,
            // SAFETY: forwarded with the caller's guarantees; the block is the
            // inner allocator's with this layout.
            (None, None) => unsafe { self.inner.realloc(block, layout, new_size) },
            _ => {
                // SAFETY: `new_layout` has a non-zero size.
                let moved = unsafe { self.alloc(new_layout) };
                if !moved.is_null() {
                    // SAFETY: both blocks hold at least the copied length and
                    // are distinct, since `block` is still allocated.
                    unsafe {
                        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                }
                moved
            }
        }
    }
}

impl<A: GlobalAlloc> Drop for SmallBlockCache<A> {
    fn drop(&mut self) {
        let lists = self.state.get_mut();
        for class in 0..CLASSES {
            let mut block = lists.heads[class];
            while !block.is_null() {
                // SAFETY: listed blocks are free blocks of the inner allocator
                // with this class's layout, linked through their first word.
                unsafe {
                    let next = block.cast::<*mut u8>().read();
                    self.inner.dealloc(block, block_layout(class));
                    block = next;
                }
            }
        }
    }
}

#[cfg(all(target_arch = "wasm32", feature = "allocator"))]
#[global_allocator]
static ALLOCATOR: SmallBlockCache<std::alloc::System> = SmallBlockCache::new(std::alloc::System);

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn classes_round_up_to_granules() {
        assert_eq!(class_of(layout(1, 1)), Some(0));
        assert_eq!(class_of(layout(8, 8)), Some(0));
        assert_eq!(class_of(layout(9, 1)), Some(1));
        assert_eq!(class_of(layout(MAX_CACHED_SIZE, 4)), Some(CLASSES - 1));
        assert_eq!(class_of(layout(MAX_CACHED_SIZE + 1, 1)), None);
        assert_eq!(class_of(layout(8, 16)), None);
    }

    #[test]
    fn reuses_freed_blocks_of_the_same_class() {
        let cache = SmallBlockCache::new(System);
        unsafe {
            let a = cache.alloc(layout(10, 1));
            a.write_bytes(0xAB, 10);
            cache.dealloc(a, layout(10, 1));
            // 16 bytes is the same class as 10: the same block comes back.
            let b = cache.alloc(layout(16, 8));
            assert_eq!(a, b);
            // Another class does not get it.
            let c = cache.alloc(layout(24, 8));
            assert_ne!(c, b);
            cache.dealloc(b, layout(16, 8));
            cache.dealloc(c, layout(24, 8));
            assert_eq!((*cache.state.get()).cached_bytes, 16 + 24);
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_even_when_reused() {
        let cache = SmallBlockCache::new(System);
        unsafe {
            let a = cache.alloc(layout(32, 8));
            a.write_bytes(0xFF, 32);
            cache.dealloc(a, layout(32, 8));
            let b = cache.alloc_zeroed(layout(30, 2));
            assert_eq!(a, b);
            assert!(std::slice::from_raw_parts(b, 30).iter().all(|&x| x == 0));
            cache.dealloc(b, layout(30, 2));
        }
    }

    #[test]
    fn realloc_keeps_contents_across_classes_and_sizes() {
        let cache = SmallBlockCache::new(System);
        unsafe {
            let mut size = 1;
            let mut block = cache.alloc(layout(size, 1));
            block.write(0);
            // Grow through every class and into the inner allocator, then
            // shrink back, checking the bytes written so far each time.
            let sizes = (2..=600).chain((1..600).rev());
            for new_size in sizes {
                block = cache.realloc(block, layout(size, 1), new_size);
                assert!(!block.is_null());
                let kept = size.min(new_size);
                for i in 0..kept {
                    assert_eq!(block.add(i).read(), i as u8, "size {size} -> {new_size}");
                }
                for i in kept..new_size {
                    block.add(i).write(i as u8);
                }
                size = new_size;
            }
            cache.dealloc(block, layout(size, 1));
        }
    }

    #[test]
    fn cached_bytes_are_bounded() {
        let cache = SmallBlockCache::new(System);
        let block = layout(MAX_CACHED_SIZE, 8);
        let count = 2 * MAX_CACHED_BYTES / MAX_CACHED_SIZE;
        unsafe {
            let blocks: Vec<*mut u8> = (0..count).map(|_| cache.alloc(block)).collect();
            for &b in &blocks {
                cache.dealloc(b, block);
            }
            assert_eq!((*cache.state.get()).cached_bytes, MAX_CACHED_BYTES);
            // Draining the lists hands back exactly the cached blocks.
            let again: Vec<*mut u8> = (0..count / 2).map(|_| cache.alloc(block)).collect();
            assert_eq!((*cache.state.get()).cached_bytes, 0);
            for &b in &again {
                assert!(blocks.contains(&b));
                cache.dealloc(b, block);
            }
        }
    }
}
