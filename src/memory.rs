//! Buffers for parameters, gradients and state: 64-byte aligned, and on
//! Linux backed by transparent huge pages (THP) where the kernel allows it.
//! Every optimizer allocates its state this way; [`filled`] and [`copied`]
//! give callers the same for their parameters, gradients and embedding tables.
//!
//! A step streams through its state, and the row-sparse optimizers jump to
//! random rows of it: with 4 KiB pages every jump into a 256 MiB buffer is a
//! TLB miss and a page walk. With THP in its common `madvise` mode a buffer is
//! only backed by 2 MiB pages if it asks before it is first touched, which is
//! what [`filled`] does. Nothing else changes: the memory is ordinary, and
//! where THP is off (or on other systems) the advice is ignored.
//! `ADAOPTIM_HUGE_PAGES=0` in the environment turns the advice off (read at
//! each allocation).

use aligned_vec::{AVec, ConstAlign};

use crate::Error;

/// An `aligned_vec` vector on 64-byte boundaries.
type Aligned<T> = AVec<T, ConstAlign<64>>;

/// The crate's own buffers (optimizer state, arenas): an `aligned_vec`
/// vector on 64-byte boundaries. Not public: users get [`Buffer`].
pub(crate) type Raw = Aligned<f32>;

/// Elements on 64-byte (cache line, AVX-512 register) boundaries,
/// huge-page advised: what [`filled`], [`copied`] and [`buffer`] return.
/// `Buffer` alone is a buffer of `f32`; `Buffer<bf16>`, `Buffer<u8>` and so
/// on hold the other storages (a `bf16` embedding table, 8-bit codes).
/// Derefs to `[T]`; its representation (today an `aligned_vec` vector) is
/// not part of the API.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer<T = f32>(Aligned<T>);

impl<T> std::ops::Deref for Buffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Buffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

impl<T> AsRef<[T]> for Buffer<T> {
    fn as_ref(&self) -> &[T] {
        &self.0
    }
}

impl<T> AsMut<[T]> for Buffer<T> {
    fn as_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

/// Buffers at least this large ask for huge pages (smaller ones could not
/// fill one).
const HUGE_MIN_BYTES: usize = 4 << 20;

/// An empty buffer with room for `n` elements, advised before any touch.
fn with_capacity<T>(n: usize) -> Aligned<T> {
    let mut b = Aligned::<T>::with_capacity(64, n);
    advise_huge(b.as_mut_ptr().cast(), n.saturating_mul(size_of::<T>()));
    b
}

/// [`with_capacity`], or [`Error::TooLarge`] where the allocation fails or
/// its size overflows (instead of aborting the process).
fn try_with_capacity(what: &'static str, n: usize) -> Result<Raw, Error> {
    let mut b = Raw::new(64);
    b.try_reserve_exact(n).map_err(|_| Error::TooLarge { what, elements: n })?;
    advise_huge(b.as_mut_ptr().cast(), n * size_of::<f32>());
    Ok(b)
}

/// [`filled`], or [`Error::TooLarge`] for a buffer that cannot be allocated.
pub(crate) fn try_filled(what: &'static str, n: usize, v: f32) -> Result<Raw, Error> {
    let mut b = try_with_capacity(what, n)?;
    b.resize(n, v);
    Ok(b)
}

/// A buffer of `n` copies of `v`.
///
/// ```
/// let mut table = adaoptim::memory::filled(1 << 20, 0.0);
/// table[7] = 1.0;
/// assert_eq!(table.len(), 1 << 20);
/// assert_eq!(table.as_ptr() as usize % 64, 0);
/// ```
pub fn filled(n: usize, v: f32) -> Buffer {
    buffer(n, v)
}

/// A buffer holding a copy of `src`.
pub fn copied(src: &[f32]) -> Buffer {
    let mut b = with_capacity(src.len());
    b.extend_from_slice(src);
    Buffer(b)
}

/// A buffer of `n` copies of `v` of any element type: [`filled`] for the
/// other storages, such as a `bf16` embedding table, whose random rows
/// gain from huge pages as an `f32` table's do.
///
/// ```
/// use adaoptim::storage::bf16;
/// let mut table = adaoptim::memory::buffer(1 << 20, bf16::from_f32(0.5));
/// table[7] = bf16::ONE;
/// assert_eq!(table.len(), 1 << 20);
/// assert_eq!(table.as_ptr() as usize % 64, 0);
/// let params = adaoptim::storage::Params::Bf16(&mut table);
/// # let _ = params;
/// ```
pub fn buffer<T: Copy>(n: usize, v: T) -> Buffer<T> {
    let mut b = with_capacity(n);
    b.resize(n, v);
    Buffer(b)
}

/// Makes room for `n` elements in `b` (amortized doubling), keeping its
/// contents and length.
///
/// # Errors
/// [`Error::TooLarge`] if the larger buffer cannot be allocated; `b` is
/// unchanged then.
pub(crate) fn reserve_total(what: &'static str, b: &mut Raw, n: usize) -> Result<(), Error> {
    if n > b.capacity() {
        let mut bigger =
            try_with_capacity(what, n.max(b.capacity().saturating_mul(2))).or_else(|_| try_with_capacity(what, n))?;
        bigger.extend_from_slice(b);
        *b = bigger;
    }
    Ok(())
}

/// Grows `b` to `n` elements, the new ones `v` (amortized doubling, as
/// `Vec` grows; a new allocation is advised like [`filled`]'s).
///
/// # Errors
/// [`Error::TooLarge`] if the larger buffer cannot be allocated; `b` is
/// unchanged then.
pub(crate) fn grow(what: &'static str, b: &mut Raw, n: usize, v: f32) -> Result<(), Error> {
    reserve_total(what, b, n)?;
    b.resize(n, v);
    Ok(())
}

#[cfg(target_os = "linux")]
fn advise_huge(ptr: *mut u8, bytes: usize) {
    if bytes < HUGE_MIN_BYTES || std::env::var_os("ADAOPTIM_HUGE_PAGES").is_some_and(|v| v == "0") {
        return;
    }
    // The 2 MiB-aligned part of the allocation.
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + bytes) / HUGE * HUGE;
    if end > start {
        // SAFETY: [start, end) lies inside an allocation this module just
        // made and owns; MADV_HUGEPAGE only changes how the kernel backs the
        // pages, never their contents or validity. Failure (THP disabled, an
        // old kernel) is harmless and ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_ptr: *mut u8, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_filled_on_both_sides_of_the_huge_page_threshold() {
        for n in [0, 1, 17, HUGE_MIN_BYTES / 4 - 1, HUGE_MIN_BYTES / 4 + 12345] {
            let b = filled(n, 0.25);
            assert_eq!(b.len(), n);
            assert_eq!(b.as_ptr() as usize % 64, 0);
            assert!(b.iter().all(|&x| x == 0.25));
            let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let c = copied(&src);
            assert_eq!(c.as_ptr() as usize % 64, 0);
            assert_eq!(&c[..], &src[..]);
            // Any element type (this layer sits below `storage`, so plain
            // integers stand in for its bf16 and 8-bit codes).
            let h = buffer(n, 0xC020u16);
            assert_eq!((h.len(), h.as_ptr() as usize % 64), (n, 0));
            assert!(h.iter().all(|&x| x == 0xC020));
            let mut u = buffer(n * 2, 7u8);
            assert_eq!((u.len(), u.as_ptr() as usize % 64), (n * 2, 0));
            assert!(u.iter().all(|&x| x == 7));
            u.iter_mut().for_each(|x| *x = 1);
            assert!(u.as_ref().iter().all(|&x| x == 1));
        }
    }

    #[test]
    fn grow_keeps_contents_and_doubles() {
        let mut b = filled(3, 1.0).0;
        grow("b", &mut b, 5, 2.0).unwrap();
        assert_eq!(&b[..], &[1.0, 1.0, 1.0, 2.0, 2.0]);
        let cap = b.capacity();
        grow("b", &mut b, cap + 1, 3.0).unwrap();
        assert!(b.capacity() >= 2 * cap);
        assert_eq!(b.as_ptr() as usize % 64, 0);
        assert_eq!(&b[..5], &[1.0, 1.0, 1.0, 2.0, 2.0]);
        assert!(b[5..].iter().all(|&x| x == 3.0));
        grow("b", &mut b, HUGE_MIN_BYTES, 4.0).unwrap();
        assert_eq!(b.len(), HUGE_MIN_BYTES);
        assert_eq!(b[HUGE_MIN_BYTES - 1], 4.0);
        assert_eq!(b[4], 2.0);
    }
}
