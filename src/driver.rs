//! One driver for every optimizer: walks the slices in `LANES`-wide steps with a
//! backend's vector type, finishes the tail with the scalar instantiation of
//! the same formula, and splits work across rayon threads at fixed chunk
//! boundaries (multiples of 16 elements, the widest lane count) so the result never depends on the
//! thread count.

use crate::backend::Backend;
use crate::exec::Exec;
pub(crate) use crate::math::Unscale;
use crate::simd::{F32Vec, LaneOp, dispatch};
use crate::storage::{
    Elem, Exact, Grads, ParamCopy, Params, StateBuf, TILE, bf16, dequantize, f16, narrow, narrow_bf16_stochastic,
    quantize, widen,
};

/// What the driver does to every gradient before any kernel sees it: divide
/// by the loss scale, then multiply by the clipping factor (torch's order:
/// `GradScaler` unscales, `clip_grad_norm_` multiplies, then the step), and
/// negate it for a kernel that maximizes (torch's `maximize`, the first line
/// of every torch update). The negation is folded into the multiplier
/// (`clip` holds `-c`, or `-1` alone), which is exact: round-to-nearest is
/// symmetric, so `(g * a) * -c` is `-((g * a) * c)` and `g * -1` is `-g`.
/// It lives here, not in each kernel, so no optimizer and no path (dense,
/// grouped, borrowed, row-sparse) can leave it out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GradPre {
    pub(crate) unscale: Unscale,
    pub(crate) clip: Option<f32>,
}

impl GradPre {
    /// No loss scale and no clipping: the gradients are used as they are.
    pub(crate) fn is_identity(&self) -> bool {
        matches!((self.unscale, self.clip), (Unscale::None, None))
    }
}

/// A gradient transform the lane loop is compiled for, one type per shape
/// of [`GradPre`], so the loop carries no per-vector branch (measured: a
/// `match` inside the loop halved the throughput of a scaled or clipped
/// step). Each applies the same roundings in the same order as `GradPre`:
/// the division or multiplication by the loss scale's reciprocal, then the
/// clipping factor.
pub(crate) trait Pre: Copy {
    fn apply<V: F32Vec>(self, g: V) -> V;
}

/// No loss scale and no clipping.
#[derive(Clone, Copy)]
struct Identity;
/// `g * a` (a power-of-two scale's reciprocal, or the clipping factor alone).
#[derive(Clone, Copy)]
struct Mul1(f32);
/// `(g * a) * b` (a power-of-two scale, then clipping).
#[derive(Clone, Copy)]
struct Mul2(f32, f32);
/// `g / s` (any other scale).
#[derive(Clone, Copy)]
struct Div1(f32);
/// `(g / s) * c` (any other scale, then clipping).
#[derive(Clone, Copy)]
struct DivMul(f32, f32);

impl Pre for Identity {
    #[inline(always)]
    fn apply<V: F32Vec>(self, g: V) -> V {
        g
    }
}
impl Pre for Mul1 {
    #[inline(always)]
    fn apply<V: F32Vec>(self, g: V) -> V {
        g * V::splat(self.0)
    }
}
impl Pre for Mul2 {
    #[inline(always)]
    fn apply<V: F32Vec>(self, g: V) -> V {
        g * V::splat(self.0) * V::splat(self.1)
    }
}
impl Pre for Div1 {
    #[inline(always)]
    fn apply<V: F32Vec>(self, g: V) -> V {
        g / V::splat(self.0)
    }
}
impl Pre for DivMul {
    #[inline(always)]
    fn apply<V: F32Vec>(self, g: V) -> V {
        g / V::splat(self.0) * V::splat(self.1)
    }
}

impl Pre for GradPre {
    #[inline(always)]
    fn apply<V: F32Vec>(self, g: V) -> V {
        let g = self.unscale.apply(g);
        match self.clip {
            Some(c) => g * V::splat(c),
            None => g,
        }
    }
}

/// The per-element formula of one optimizer configuration with `S` state
/// buffers. Written once, generic over the lane type.
pub(crate) trait Kernel<const S: usize>: Sync {
    /// Updates one vector of parameters `p` from gradients `g` and state `s`.
    /// `g` arrives unscaled, clipped and, under [`maximize`](Self::maximize),
    /// negated.
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; S]);
    /// Whether the driver negates the gradient first (torch's `maximize`).
    /// Required, so no kernel can leave it out.
    fn maximize(&self) -> bool;
}

/// Parameters, gradients and `S` state buffers of equal length.
pub(crate) struct Slices<'a, const S: usize> {
    pub p: &'a mut [f32],
    pub g: &'a [f32],
    pub s: [&'a mut [f32]; S],
}

impl<'a, const S: usize> Slices<'a, S> {
    fn len(&self) -> usize {
        self.p.len()
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.p.split_at_mut(mid);
        let (g0, g1) = self.g.split_at(mid);
        let mut lo: [&'a mut [f32]; S] = std::array::from_fn(|_| <&mut [f32]>::default());
        let mut hi: [&'a mut [f32]; S] = std::array::from_fn(|_| <&mut [f32]>::default());
        for (i, s) in self.s.into_iter().enumerate() {
            let (a, b) = s.split_at_mut(mid);
            lo[i] = a;
            hi[i] = b;
        }
        (Slices { p: p0, g: g0, s: lo }, Slices { p: p1, g: g1, s: hi })
    }
}

/// The most buffers of state a kernel takes.
pub(crate) const MAX_BUFS: usize = 3;

/// The buffers of one step in their storage types, with the state count
/// known only at run time: what an optimizer's `run` receives and hands to
/// [`drive`] with its kernel's const state count. Lengths are checked by the
/// callers.
pub struct Bufs<'a> {
    pub(crate) p: Params<'a>,
    pub(crate) g: Grads<'a>,
    pub(crate) s: [StateBuf<'a>; MAX_BUFS],
    pub(crate) k: usize,
    pub(crate) copy: Option<ParamCopy<'a>>,
    /// The stochastic-rounding key of `bf16` parameters, if they round so,
    /// and the index of the first element in the whole tensor.
    pub(crate) sr: Option<(u64, u64)>,
}

impl<'a> Bufs<'a> {
    /// All buffers `f32`, no copy.
    pub(crate) fn dense(p: &'a mut [f32], g: &'a [f32], state: &'a mut [&mut [f32]]) -> Self {
        let k = state.len();
        assert!(k <= MAX_BUFS, "state count is checked by the callers");
        let mut it = state.iter_mut();
        let s = std::array::from_fn(|_| StateBuf::F32(it.next().map_or(&mut [][..], |x| &mut **x)));
        Bufs { p: Params::F32(p), g: Grads::F32(g), s, k, copy: None, sr: None }
    }

    /// Buffers in any storage (`state` at most [`MAX_BUFS`], checked by the callers).
    pub(crate) fn new(p: Params<'a>, g: Grads<'a>, state: &'a mut [StateBuf<'_>], copy: Option<ParamCopy<'a>>) -> Self {
        let k = state.len();
        assert!(k <= MAX_BUFS, "state count is checked by the callers");
        let mut it = state.iter_mut();
        let s = std::array::from_fn(|_| it.next().map_or(StateBuf::F32(&mut []), |x| x.reborrow()));
        Bufs { p, g, s, k, copy, sr: None }
    }

    /// The number of state buffers.
    pub(crate) fn states(&self) -> usize {
        self.k
    }

    fn fixed<const S: usize>(self) -> Mixed<'a, S> {
        assert!(self.k == S, "state count is checked by the callers");
        let mut it = self.s.into_iter();
        let s = std::array::from_fn(|_| it.next().expect("S <= MAX_BUFS"));
        let (sr, base) = self.sr.map_or((None, 0), |(key, base)| (Some(key), base));
        Mixed { p: self.p, g: self.g, s, copy: self.copy, sr, base }
    }
}

/// A step's buffers in their storage types, `S` state buffers.
pub(crate) struct Mixed<'a, const S: usize> {
    p: Params<'a>,
    g: Grads<'a>,
    s: [StateBuf<'a>; S],
    copy: Option<ParamCopy<'a>>,
    /// Stochastic-rounding key of `bf16` parameters, if any.
    sr: Option<u64>,
    /// The index of this piece's first element in the whole buffer (the
    /// stochastic-rounding stream's counter).
    base: u64,
}

impl<'a, const S: usize> Mixed<'a, S> {
    /// The `f32` slices, if every buffer is `f32` and there is no copy.
    fn into_dense(self) -> Result<Slices<'a, S>, Self> {
        let dense = matches!(self.p, Params::F32(_))
            && matches!(self.g, Grads::F32(_))
            && self.s.iter().all(|s| matches!(s, StateBuf::F32(_)))
            && self.copy.is_none()
            && self.sr.is_none();
        if !dense {
            return Err(self);
        }
        let (Params::F32(p), Grads::F32(g)) = (self.p, self.g) else { unreachable!() };
        let s = self.s.map(|s| match s {
            StateBuf::F32(s) => s,
            _ => unreachable!(),
        });
        Ok(Slices { p, g, s })
    }
}

/// Buffers the driver can split at an element index and run on a backend.
pub(crate) trait Lanes<K>: Sized + Send {
    fn len(&self) -> usize;
    fn split_at(self, mid: usize) -> (Self, Self);
    /// Runs `k` over all elements with lane type `V`.
    fn run<V: F32Vec>(self, k: &K, pre: GradPre);
}

impl<K: Kernel<S>, const S: usize> Lanes<K> for Slices<'_, S> {
    fn len(&self) -> usize {
        Slices::len(self)
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        Slices::split_at(self, mid)
    }
    #[inline(always)]
    fn run<V: F32Vec>(self, k: &K, pre: GradPre) {
        run_lanes::<V, K, S>(k, self, pre)
    }
}

impl<K: Kernel<S>, const S: usize> Lanes<K> for Mixed<'_, S> {
    fn len(&self) -> usize {
        self.p.len()
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.p.split_at(mid);
        let (g0, g1) = self.g.split_at(mid);
        let mut lo: [Option<StateBuf<'_>>; S] = std::array::from_fn(|_| None);
        let mut hi: [Option<StateBuf<'_>>; S] = std::array::from_fn(|_| None);
        for (j, s) in self.s.into_iter().enumerate() {
            let (a, b) = s.split_at(mid);
            lo[j] = Some(a);
            hi[j] = Some(b);
        }
        let (c0, c1) = match self.copy {
            Some(c) => {
                let (a, b) = c.split_at(mid);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        let (sr, base) = (self.sr, self.base);
        (
            Mixed { p: p0, g: g0, s: lo.map(|x| x.expect("S entries")), copy: c0, sr, base },
            Mixed { p: p1, g: g1, s: hi.map(|x| x.expect("S entries")), copy: c1, sr, base: base + mid as u64 },
        )
    }
    #[inline(always)]
    fn run<V: F32Vec>(self, k: &K, pre: GradPre) {
        run_tiles::<V, K, S>(k, self, pre)
    }
}

/// A step's buffers for the fused loop: parameters `P`, gradients `G`,
/// every state `T`, an optional copy of the updated parameters `C`; each
/// converted in registers on load and store, no tiles.
pub(crate) struct Fused<'a, P, G, T, C, const S: usize> {
    p: &'a mut [P],
    g: &'a [G],
    s: [&'a mut [T]; S],
    copy: Option<&'a mut [C]>,
    /// Stochastic-rounding key of the parameters, if any.
    sr: Option<u64>,
    /// Index of the first element in the whole buffer.
    base: u64,
}

/// The storage combinations the fused loop is compiled for (the others go
/// through tiles): the mixed-precision issue's `bf16-grads` (with or
/// without the copy), `bf16-f32states` and `bf16`, and their `f16` forms
/// `f16-grads` and `f16-f32states`.
pub(crate) enum AnyFused<'a, const S: usize> {
    /// f32 params and states, bf16 gradients, optional bf16 copy.
    GradsBf16(Fused<'a, f32, bf16, f32, bf16, S>),
    /// f32 params and states, f16 gradients, optional f16 copy.
    GradsF16(Fused<'a, f32, f16, f32, f16, S>),
    /// bf16 params and gradients, f32 states.
    ParamsBf16(Fused<'a, bf16, bf16, f32, bf16, S>),
    /// f16 params and gradients, f32 states.
    ParamsF16(Fused<'a, f16, f16, f32, f16, S>),
    /// bf16 params, gradients and states.
    AllBf16(Fused<'a, bf16, bf16, bf16, bf16, S>),
}

impl<'a, const S: usize> Mixed<'a, S> {
    /// The fused form, if this combination has one.
    fn into_fused(self) -> Result<AnyFused<'a, S>, Self> {
        let all = |f: fn(&StateBuf<'_>) -> bool| self.s.iter().all(f);
        let states_f32 = all(|s| matches!(s, StateBuf::F32(_)));
        let states_bf16 = all(|s| matches!(s, StateBuf::Bf16(_)));
        let copy_bf16 = matches!(self.copy, None | Some(ParamCopy::Bf16(_)));
        let f32_states = |s: [StateBuf<'a>; S]| {
            s.map(|s| match s {
                StateBuf::F32(x) => x,
                _ => unreachable!("checked above"),
            })
        };
        let bf16_states = |s: [StateBuf<'a>; S]| {
            s.map(|s| match s {
                StateBuf::Bf16(x) => x,
                _ => unreachable!("checked above"),
            })
        };
        let copy_f16 = matches!(self.copy, None | Some(ParamCopy::F16(_)));
        let copy = |c: Option<ParamCopy<'a>>| match c {
            Some(ParamCopy::Bf16(x)) => Some(x),
            _ => None,
        };
        let copy_half = |c: Option<ParamCopy<'a>>| match c {
            Some(ParamCopy::F16(x)) => Some(x),
            _ => None,
        };
        match (self.p, self.g) {
            (Params::F32(p), Grads::Bf16(g)) if states_f32 && copy_bf16 => {
                let copy = copy(self.copy);
                Ok(AnyFused::GradsBf16(Fused { p, g, s: f32_states(self.s), copy, sr: None, base: self.base }))
            }
            (Params::F32(p), Grads::F16(g)) if states_f32 && copy_f16 => {
                let copy = copy_half(self.copy);
                Ok(AnyFused::GradsF16(Fused { p, g, s: f32_states(self.s), copy, sr: None, base: self.base }))
            }
            // Stochastic rounding of f16 parameters is refused before here.
            (Params::F16(p), Grads::F16(g)) if states_f32 && self.copy.is_none() => {
                Ok(AnyFused::ParamsF16(Fused { p, g, s: f32_states(self.s), copy: None, sr: None, base: self.base }))
            }
            (Params::Bf16(p), Grads::Bf16(g)) if states_f32 && self.copy.is_none() => Ok(AnyFused::ParamsBf16(Fused {
                p,
                g,
                s: f32_states(self.s),
                copy: None,
                sr: self.sr,
                base: self.base,
            })),
            (Params::Bf16(p), Grads::Bf16(g)) if states_bf16 && self.copy.is_none() => {
                Ok(AnyFused::AllBf16(Fused { p, g, s: bf16_states(self.s), copy: None, sr: self.sr, base: self.base }))
            }
            (p, g) => Err(Mixed { p, g, s: self.s, copy: self.copy, sr: self.sr, base: self.base }),
        }
    }
}

impl<K: Kernel<S>, P: Elem, G: Elem, T: Elem, C: Elem, const S: usize> Lanes<K> for Fused<'_, P, G, T, C, S> {
    fn len(&self) -> usize {
        self.p.len()
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.p.split_at_mut(mid);
        let (g0, g1) = self.g.split_at(mid);
        let mut lo: [&mut [T]; S] = std::array::from_fn(|_| <&mut [T]>::default());
        let mut hi: [&mut [T]; S] = std::array::from_fn(|_| <&mut [T]>::default());
        for (j, s) in self.s.into_iter().enumerate() {
            let (a, b) = s.split_at_mut(mid);
            lo[j] = a;
            hi[j] = b;
        }
        let (c0, c1) = match self.copy {
            Some(c) => {
                let (a, b) = c.split_at_mut(mid);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        let (sr, base) = (self.sr, self.base);
        (
            Fused { p: p0, g: g0, s: lo, copy: c0, sr, base },
            Fused { p: p1, g: g1, s: hi, copy: c1, sr, base: base + mid as u64 },
        )
    }
    #[inline(always)]
    fn run<V: F32Vec>(self, k: &K, pre: GradPre) {
        match self.sr {
            Some(key) => {
                let put = Stochastic { key, base: self.base };
                run_fused::<V, K, S, P, G, T, C, _, _>(k, self, pre, put)
            }
            None if pre.is_identity() => run_fused::<V, K, S, P, G, T, C, _, _>(k, self, Identity, Nearest),
            None => run_fused::<V, K, S, P, G, T, C, _, _>(k, self, pre, Nearest),
        }
    }
}

/// How the fused loop stores the updated parameters.
trait PutParams: Copy {
    /// Stores `W::LANES` parameters at element `i` of the piece.
    ///
    /// # Safety
    /// `ptr..ptr + W::LANES` writable, `i` a multiple of `W::LANES`.
    unsafe fn put<W: F32Vec, P: Elem>(self, v: W, ptr: *mut P, i: usize);
}

/// Round to nearest (the storage's own narrowing).
#[derive(Clone, Copy)]
struct Nearest;

impl PutParams for Nearest {
    #[inline(always)]
    unsafe fn put<W: F32Vec, P: Elem>(self, v: W, ptr: *mut P, _: usize) {
        // SAFETY: forwarded contract.
        unsafe { P::put(v, ptr) }
    }
}

/// Stochastic rounding: the piece starts at element `base` (a multiple of
/// [`TILE`]) of the whole buffer.
#[derive(Clone, Copy)]
struct Stochastic {
    key: u64,
    base: u64,
}

impl PutParams for Stochastic {
    #[inline(always)]
    unsafe fn put<W: F32Vec, P: Elem>(self, v: W, ptr: *mut P, i: usize) {
        // base + i is a multiple of W::LANES (<= 16, dividing 2^32), so its
        // lanes add to the low half without a carry: base + i + l = (base + i) ^ l.
        let index = self.base + i as u64;
        let (lo, hi) = ((index as u32) ^ (self.key as u32), ((index >> 32) as u32) ^ ((self.key >> 32) as u32));
        // SAFETY: forwarded contract.
        unsafe { P::put_stochastic(v, ptr, lo, hi) }
    }
}

/// The fused lane loop: [`run_lanes_with`] with every buffer converted in
/// registers, then the tail with `f32` lanes. The kernel sees the values the
/// tiled loop gives it, so both write the same bits.
#[inline(always)]
fn run_fused<V: F32Vec, K: Kernel<S>, const S: usize, P: Elem, G: Elem, T: Elem, C: Elem, Q: Pre, R: PutParams>(
    k: &K,
    sl: Fused<'_, P, G, T, C, S>,
    pre: Q,
    put: R,
) {
    let n = sl.p.len();
    // Soundness of the raw-pointer loop below rests on this; the public entry
    // points return an error before getting here, so it never fires.
    assert!(
        sl.g.len() == n && sl.s.iter().all(|s| s.len() == n) && sl.copy.as_ref().is_none_or(|c| c.len() == n),
        "slice lengths differ"
    );
    let p = sl.p.as_mut_ptr();
    let g = sl.g.as_ptr();
    let s: [*mut T; S] = sl.s.map(|s| s.as_mut_ptr());
    let c: Option<*mut C> = sl.copy.map(|c| c.as_mut_ptr());
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn one<W: F32Vec, K: Kernel<S>, const S: usize, P: Elem, G: Elem, T: Elem, C: Elem, Q: Pre, R: PutParams>(
        k: &K,
        pre: Q,
        put: R,
        i: usize,
        p: *mut P,
        g: *const G,
        s: &[*mut T; S],
        c: Option<*mut C>,
    ) {
        // SAFETY: the caller guarantees i + W::LANES <= n for every buffer.
        unsafe {
            let mut pv = P::get::<W>(p.add(i));
            let gv = pre.apply(G::get::<W>(g.add(i)));
            let mut sv: [W; S] = std::array::from_fn(|j| T::get::<W>(s[j].add(i)));
            k.apply(&mut pv, gv, &mut sv);
            put.put(pv, p.add(i), i);
            for j in 0..S {
                T::put(sv[j], s[j].add(i));
            }
            if let Some(c) = c {
                C::put(pv, c.add(i));
            }
        }
    }
    const U: usize = 4;
    let block = n - n % (V::LANES * U);
    let mut i = 0;
    while i < block {
        if size_of::<P>() == 2 && size_of::<G>() == 2 && size_of::<T>() == 2 {
            fetch_ahead::<V, P>(p, i, U * V::LANES);
            fetch_ahead::<V, G>(g, i, U * V::LANES);
            for s in &s {
                fetch_ahead::<V, T>(*s, i, U * V::LANES);
            }
        }
        for u in 0..U {
            // SAFETY: i + U * LANES <= block <= n, the common length.
            unsafe { one::<V, K, S, P, G, T, C, Q, R>(k, pre, put, i + u * V::LANES, p, g, &s, c) };
        }
        i += V::LANES * U;
    }
    while i + V::LANES <= n {
        // SAFETY: i + LANES <= n.
        unsafe { one::<V, K, S, P, G, T, C, Q, R>(k, pre, put, i, p, g, &s, c) };
        i += V::LANES;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { one::<f32, K, S, P, G, T, C, Q, R>(k, pre, put, i, p, g, &s, c) };
        i += 1;
    }
}

/// How far ahead of the fused loop its streams are fetched when params,
/// gradients and state are all 16-bit, in elements (2 KB): the hardware
/// prefetchers alone left that loop waiting on memory at DRAM sizes
/// (measured on AVX-512, Zen 5). Loops with an `f32` stream are left to
/// them: a software prefetch slowed the `f32` streams and the mixed
/// loops in cache.
const FETCH_AHEAD: usize = 1024;

/// Prefetches the cache lines of the `len` elements of a stream
/// [`FETCH_AHEAD`] elements past `i` (past the end near it: a prefetch of
/// any address is harmless).
#[inline(always)]
fn fetch_ahead<V: F32Vec, E: Elem>(base: *const E, i: usize, len: usize) {
    let at = base.wrapping_add(i + FETCH_AHEAD).cast::<u8>();
    let mut b = 0;
    while b < len * size_of::<E>() {
        V::prefetch(at.wrapping_add(b));
        b += 64;
    }
}

/// Applies the gradient transform to a gradient tile, with the roundings of
/// the [`Pre`] types in the same order (so the kernel sees the bits the
/// `f32` loop's transform gives). One loop per shape, the shape chosen once
/// per tile: the mixed loop is then compiled once per kernel, not once per
/// transform.
#[inline(always)]
pub(crate) fn pre_tile(pre: GradPre, g: &mut [f32]) {
    #[inline(always)]
    fn each(g: &mut [f32], p: impl Pre) {
        for x in g {
            *x = p.apply(*x);
        }
    }
    match (pre.unscale, pre.clip) {
        (Unscale::None, None) => {}
        (Unscale::None, Some(c)) | (Unscale::Mul(c), None) => each(g, Mul1(c)),
        (Unscale::Mul(r), Some(c)) => each(g, Mul2(r, c)),
        (Unscale::Div(d), None) => each(g, Div1(d)),
        (Unscale::Div(d), Some(c)) => each(g, DivMul(d, c)),
    }
}

/// The mixed-storage loop: per tile of [`TILE`] elements, widen every
/// non-`f32` buffer into an `f32` tile (an `f32` buffer is used in place),
/// run the `f32` lane loop over the tiles, narrow the parameters and state
/// back, and write the parameter copy. The kernel sees exactly the `f32`
/// values an `f32` step on the widened buffers would.
#[inline(always)]
fn run_tiles<V: F32Vec, K: Kernel<S>, const S: usize>(k: &K, mut sl: Mixed<'_, S>, pre: GradPre) {
    let n = sl.p.len();
    let mut pt = [0f32; TILE];
    let mut gt = [0f32; TILE];
    let mut st = [[0f32; TILE]; S];
    let mut i = 0;
    while i < n {
        let len = TILE.min(n - i);
        let r = i..i + len;
        {
            let p: &mut [f32] = match &mut sl.p {
                Params::F32(x) => &mut x[r.clone()],
                Params::Bf16(x) => {
                    widen::<V, _>(&x[r.clone()], &mut pt[..len]);
                    &mut pt[..len]
                }
                Params::F16(x) => {
                    widen::<V, _>(&x[r.clone()], &mut pt[..len]);
                    &mut pt[..len]
                }
            };
            let identity = pre.is_identity();
            let g: &[f32] = match sl.g {
                Grads::F32(x) if identity => &x[r.clone()],
                Grads::F32(x) => {
                    gt[..len].copy_from_slice(&x[r.clone()]);
                    pre_tile(pre, &mut gt[..len]);
                    &gt[..len]
                }
                Grads::Bf16(x) => {
                    widen::<V, _>(&x[r.clone()], &mut gt[..len]);
                    pre_tile(pre, &mut gt[..len]);
                    &gt[..len]
                }
                Grads::F16(x) => {
                    widen::<V, _>(&x[r.clone()], &mut gt[..len]);
                    pre_tile(pre, &mut gt[..len]);
                    &gt[..len]
                }
            };
            // Widen outside the closure below: a closure is compiled without
            // the backend's target features unless inlined.
            for (b, t) in sl.s.iter().zip(st.iter_mut()) {
                match b {
                    StateBuf::F32(_) => {}
                    StateBuf::Bf16(x) => widen::<V, _>(&x[r.clone()], &mut t[..len]),
                    StateBuf::Q8(q) => dequantize::<V>(&q.codes[r.clone()], q.absmax[i / TILE], q.map, &mut t[..len]),
                }
            }
            let mut it = sl.s.iter_mut().zip(st.iter_mut());
            let s: [&mut [f32]; S] = std::array::from_fn(|_| {
                let (b, t) = it.next().expect("S entries");
                match b {
                    StateBuf::F32(x) => &mut x[r.clone()],
                    StateBuf::Bf16(_) | StateBuf::Q8(_) => &mut t[..len],
                }
            });
            run_lanes_with::<V, K, S, _>(k, Slices { p, g, s }, Identity);
        }
        match &mut sl.p {
            Params::F32(_) => {}
            Params::Bf16(x) => match sl.sr {
                None => narrow::<V, _>(&pt[..len], &mut x[r.clone()]),
                Some(key) => narrow_bf16_stochastic::<V>(&pt[..len], &mut x[r.clone()], key, sl.base + i as u64),
            },
            // Stochastic rounding is refused for f16 parameters (checked).
            Params::F16(x) => narrow::<V, _>(&pt[..len], &mut x[r.clone()]),
        }
        for (b, t) in sl.s.iter_mut().zip(&st) {
            match b {
                StateBuf::F32(_) => {}
                StateBuf::Bf16(x) => narrow::<V, _>(&t[..len], &mut x[r.clone()]),
                StateBuf::Q8(q) => q.absmax[i / TILE] = quantize::<V>(&t[..len], q.map, &mut q.codes[r.clone()]),
            }
        }
        if let Some(c) = &mut sl.copy {
            let src: &[f32] = match &sl.p {
                Params::F32(x) => &x[r.clone()],
                Params::Bf16(_) | Params::F16(_) => &pt[..len],
            };
            match c {
                ParamCopy::Bf16(x) => narrow::<V, _>(src, &mut x[r]),
                ParamCopy::F16(x) => narrow::<V, _>(src, &mut x[r]),
            }
        }
        i += len;
    }
}

/// Runs `k` over one piece whose gradient is `f32` and whose parameters and
/// state are in any storage (a row of an embedding table), nearest rounding,
/// no copy: the `f32` lane loop when every buffer is `f32`; the fused loop
/// (converting in registers) for an `f32`, `bf16` or `f16` table with every
/// state `f32` or every state `bf16`; else the tiles (8-bit state, which
/// must then start on a block boundary: the caller's rows are whole blocks).
/// Each gives the kernel the same values, so the same bits.
#[inline(always)]
pub(crate) fn run_piece<V: F32Vec, K: Kernel<S>, const S: usize>(
    k: &K,
    p: Params<'_>,
    g: &[f32],
    s: [StateBuf<'_>; S],
    pre: GradPre,
) {
    fn fused<'a, P: Elem, T: Elem, const S: usize>(
        p: &'a mut [P],
        g: &'a [f32],
        s: [&'a mut [T]; S],
    ) -> Fused<'a, P, f32, T, P, S> {
        Fused { p, g, s, copy: None, sr: None, base: 0 }
    }
    let f32_states = s.iter().all(|b| matches!(b, StateBuf::F32(_)));
    let bf16_states = s.iter().all(|b| matches!(b, StateBuf::Bf16(_)));
    if f32_states {
        let s = s.map(|b| match b {
            StateBuf::F32(x) => x,
            _ => unreachable!("checked above"),
        });
        match p {
            Params::F32(p) => run_lanes::<V, K, S>(k, Slices { p, g, s }, pre),
            Params::Bf16(p) => Lanes::<K>::run::<V>(fused(p, g, s), k, pre),
            Params::F16(p) => Lanes::<K>::run::<V>(fused(p, g, s), k, pre),
        }
    } else if bf16_states {
        let s = s.map(|b| match b {
            StateBuf::Bf16(x) => x,
            _ => unreachable!("checked above"),
        });
        match p {
            Params::F32(p) => Lanes::<K>::run::<V>(fused(p, g, s), k, pre),
            Params::Bf16(p) => Lanes::<K>::run::<V>(fused(p, g, s), k, pre),
            Params::F16(p) => Lanes::<K>::run::<V>(fused(p, g, s), k, pre),
        }
    } else {
        run_tiles::<V, K, S>(k, Mixed { p, g: Grads::F32(g), s, copy: None, sr: None, base: 0 }, pre)
    }
}

/// Runs `k` over the slices with lane type `V`, then the tail with `f32`.
#[inline(always)]
fn run_lanes<V: F32Vec, K: Kernel<S>, const S: usize>(k: &K, sl: Slices<'_, S>, pre: GradPre) {
    match (pre.unscale, pre.clip) {
        (Unscale::None, None) => run_lanes_with::<V, K, S, _>(k, sl, Identity),
        (Unscale::None, Some(c)) | (Unscale::Mul(c), None) => run_lanes_with::<V, K, S, _>(k, sl, Mul1(c)),
        (Unscale::Mul(r), Some(c)) => run_lanes_with::<V, K, S, _>(k, sl, Mul2(r, c)),
        (Unscale::Div(d), None) => run_lanes_with::<V, K, S, _>(k, sl, Div1(d)),
        (Unscale::Div(d), Some(c)) => run_lanes_with::<V, K, S, _>(k, sl, DivMul(d, c)),
    }
}

/// [`run_lanes`] for one gradient transform.
#[inline(always)]
fn run_lanes_with<V: F32Vec, K: Kernel<S>, const S: usize, P: Pre>(k: &K, sl: Slices<'_, S>, pre: P) {
    let n = sl.len();
    // Soundness of the raw-pointer loop below rests on this; the public entry
    // points return an error before getting here, so it never fires.
    assert!(sl.g.len() == n && sl.s.iter().all(|s| s.len() == n), "slice lengths differ");
    let p = sl.p.as_mut_ptr();
    let g = sl.g.as_ptr();
    let s: [*mut f32; S] = sl.s.map(|s| s.as_mut_ptr());
    const U: usize = 4;
    let block = n - n % (V::LANES * U);
    let mut i = 0;
    while i < block {
        // SAFETY: every slice has length n (asserted above) and
        // i + U * LANES <= block <= n.
        unsafe {
            let mut pv: [V; U] = std::array::from_fn(|u| V::load(p.add(i + u * V::LANES)));
            let gv: [V; U] = std::array::from_fn(|u| pre.apply(V::load(g.add(i + u * V::LANES))));
            let mut sv: [[V; S]; U] =
                std::array::from_fn(|u| std::array::from_fn(|j| V::load(s[j].add(i + u * V::LANES))));
            for u in 0..U {
                k.apply(&mut pv[u], gv[u], &mut sv[u]);
            }
            for u in 0..U {
                pv[u].store(p.add(i + u * V::LANES));
                for j in 0..S {
                    sv[u][j].store(s[j].add(i + u * V::LANES));
                }
            }
        }
        i += V::LANES * U;
    }
    let body = n - n % V::LANES;
    while i < body {
        // SAFETY: every slice has length n (asserted above) and
        // i + LANES <= body <= n.
        unsafe {
            let mut pv = V::load(p.add(i));
            let gv = pre.apply(V::load(g.add(i)));
            let mut sv: [V; S] = std::array::from_fn(|j| V::load(s[j].add(i)));
            k.apply(&mut pv, gv, &mut sv);
            pv.store(p.add(i));
            for j in 0..S {
                sv[j].store(s[j].add(i));
            }
        }
        i += V::LANES;
    }
    while i < n {
        // SAFETY: i < n, the common length of all slices.
        unsafe {
            let mut pv = <f32 as F32Vec>::load(p.add(i));
            let gv = pre.apply(<f32 as F32Vec>::load(g.add(i)));
            let mut sv: [f32; S] = std::array::from_fn(|j| <f32 as F32Vec>::load(s[j].add(i)));
            k.apply(&mut pv, gv, &mut sv);
            pv.store(p.add(i));
            for j in 0..S {
                sv[j].store(s[j].add(i));
            }
        }
        i += 1;
    }
}

/// One piece of a step as a [`LaneOp`]: what [`dispatch`] runs.
struct Step<'k, K, L> {
    k: &'k K,
    sl: L,
    pre: GradPre,
}

impl<K, L: Lanes<K>> LaneOp for Step<'_, K, L> {
    type Out = ();
    // Inlined into `dispatch`'s `#[target_feature]` entry, so the lane loop
    // is compiled with the backend's instructions.
    #[inline(always)]
    fn run<V: F32Vec>(self) {
        self.sl.run::<V>(self.k, self.pre)
    }
}

/// Runs `k` over one piece on `backend` (no splitting).
#[inline]
pub(crate) fn run_on<K, L: Lanes<K>>(backend: Backend, k: &K, sl: L, pre: GradPre) {
    dispatch(backend, Step { k, sl, pre })
}

/// True if any `unscale(g[i])` is NaN or infinite. Accumulates `x * 0`
/// (NaN for inf and NaN, else 0) and tests once per block, so the scan runs at
/// memory speed: four independent streams (quarters of the slice) keep more
/// cache misses in flight than one, and four accumulators keep the add
/// latency out of the way.
#[inline(always)]
fn scan_lanes<V: F32Vec>(g: &[f32], unscale: Unscale) -> bool {
    const BLOCK: usize = 64;
    let n = g.len();
    let quarter = n / (4 * V::LANES) * V::LANES;
    let ptr = g.as_ptr();
    let zero = V::splat(0.0);
    let mut i = 0;
    while i < quarter {
        let end = (i + BLOCK * V::LANES).min(quarter);
        let mut acc = [zero; 4];
        while i < end {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + LANES <= quarter and k < 4, so the load ends at
                // or before 4 * quarter <= n = g.len().
                *a = *a + unscale.apply(unsafe { V::load(ptr.add(k * quarter + i)) }) * zero;
            }
            i += V::LANES;
        }
        if ((acc[0] + acc[1]) + (acc[2] + acc[3])).any_non_finite() {
            return true;
        }
    }
    g[4 * quarter..].iter().any(|&x| !unscale.apply(x).is_finite())
}

/// The non-finite scan of one piece as a [`LaneOp`].
struct Scan<'a> {
    g: &'a [f32],
    unscale: Unscale,
}

impl LaneOp for Scan<'_> {
    type Out = bool;
    #[inline(always)]
    fn run<V: F32Vec>(self) -> bool {
        scan_lanes::<V>(self.g, self.unscale)
    }
}

/// Whether any gradient (divided by the plan's loss scale) is NaN or
/// infinite, with the plan's backend and thread split.
pub(crate) fn any_non_finite(plan: &Plan, g: &[f32]) -> bool {
    let (backend, unscale) = (plan.backend, plan.unscale);
    let leaf = |g: &[f32]| dispatch(backend, Scan { g, unscale });
    match plan.exec.chunk_for(g.len()) {
        Some(chunk) => split_reduce(g, chunk, true, &|g| g.len(), &|g, mid| g.split_at(mid), &leaf, &|x, y| x || y),
        None => leaf(g),
    }
}

/// Splits `x` at multiples of `chunk` counted from its start (so the piece
/// boundaries, and the shape of the tree, are the same whatever the recursion
/// depth and thread count), runs `leaf` on every piece and combines the two
/// halves of each split with `join` (first half first), the halves on
/// `rayon::join` when `parallel`. The one split-and-join recursion of the
/// crate: the dense and mixed steps, the non-finite scan, the sum of squares,
/// the grouped arena and the borrowed multi-tensor step all run on it.
///
/// `len` is the size the split points are counted in; a value that cannot be
/// split further reports a size of at most `chunk`.
pub(crate) fn split_reduce<T: Send, R: Send>(
    x: T,
    chunk: usize,
    parallel: bool,
    len: &(impl Fn(&T) -> usize + Sync),
    split: &(impl Fn(T, usize) -> (T, T) + Sync),
    leaf: &(impl Fn(T) -> R + Sync),
    join: &(impl Fn(R, R) -> R + Sync),
) -> R {
    let n = len(&x);
    if n <= chunk {
        return leaf(x);
    }
    let mid = n.div_ceil(chunk) / 2 * chunk;
    let (a, b) = split(x, mid);
    let (ra, rb) = if parallel {
        rayon::join(
            || split_reduce(a, chunk, true, len, split, leaf, join),
            || split_reduce(b, chunk, true, len, split, leaf, join),
        )
    } else {
        (split_reduce(a, chunk, false, len, split, leaf, join), split_reduce(b, chunk, false, len, split, leaf, join))
    };
    join(ra, rb)
}

/// [`split_reduce`] on rayon for work that returns nothing.
pub(crate) fn split_join<T: Send>(
    x: T,
    chunk: usize,
    len: &(impl Fn(&T) -> usize + Sync),
    split: &(impl Fn(T, usize) -> (T, T) + Sync),
    f: &(impl Fn(T) + Sync),
) {
    split_reduce(x, chunk, true, len, split, f, &|(), ()| ())
}

fn drive_lanes<K: Sync, L: Lanes<K>>(k: &K, plan: Plan, pre: GradPre, sl: L, chunk_multiple: usize) -> StepReport {
    let backend = plan.backend;
    match plan.exec.chunk_for(sl.len()) {
        Some(chunk) => {
            let chunk = chunk.next_multiple_of(chunk_multiple);
            split_join(sl, chunk, &|x: &L| x.len(), &|x: L, mid| x.split_at(mid), &|x| run_on(backend, k, x, pre));
            StepReport { backend, parallel: true, skipped: false }
        }
        None => {
            run_on(backend, k, sl, pre);
            StepReport { backend, parallel: false, skipped: false }
        }
    }
}

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepReport {
    /// The backend that ran.
    pub backend: Backend,
    /// Whether the step ran through rayon.
    pub parallel: bool,
    /// True when the step was skipped and nothing changed.
    pub skipped: bool,
}

/// A resolved execution policy: the backend that will run, and the policy's
/// thread splitting.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub(crate) backend: Backend,
    pub(crate) exec: Exec,
    pub(crate) unscale: Unscale,
    /// Gradient-clipping factor, multiplied in after unscaling.
    pub(crate) clip: Option<f32>,
}

impl Plan {
    pub(crate) fn new(exec: &Exec) -> Result<Plan, crate::Error> {
        Ok(Plan { backend: exec.resolve_backend()?, exec: *exec, unscale: Unscale::None, clip: None })
    }

    /// What the driver applies to every gradient under this plan.
    /// `maximize` negates on top (folded into the multiplier, exactly).
    pub(crate) fn pre(&self, maximize: bool) -> GradPre {
        let clip = if maximize { Some(-self.clip.unwrap_or(1.0)) } else { self.clip };
        GradPre { unscale: self.unscale, clip }
    }
}

/// Elements per leaf of the sum-of-squares tree. Fixed (not derived from the
/// thread count), so the summation order, and the result, are the same for
/// any thread count, chunk size and backend.
pub(crate) const NORM_BLOCK: usize = 1 << 14;

/// Accumulators per leaf: 32 f64s (four AVX-512 or eight AVX2 registers of
/// independent add chains). The f32-to-f64 conversion bounds the leaf at
/// about 11 G elements/s on one core here (measured), above memory speed
/// beyond the caches.
const SUMSQ_LANES: usize = 32;

/// One leaf: `sum(unscale(g)^2)` in f64, element `i` into accumulator
/// `i % 32`, the accumulators then added in a fixed pairwise tree. The lanes
/// widen, square and add (`add_squares_f64`: lane `l` of a vector starting at
/// a multiple of 32 plus `k` into accumulator `k + l`), so each accumulator
/// sees the same operations in the same order on every backend, and every
/// backend gives the same bits. A half-precision gradient is widened first
/// (exactly), so its sum is the sum of the widened `f32` values.
#[inline(always)]
fn sumsq_leaf<V: F32Vec, E: Exact>(g: &[E], unscale: Unscale) -> f64 {
    // One loop per transform, chosen once per leaf.
    match unscale {
        Unscale::None => sumsq_leaf_with::<V, E, _>(g, Identity),
        Unscale::Mul(r) => sumsq_leaf_with::<V, E, _>(g, Mul1(r)),
        Unscale::Div(d) => sumsq_leaf_with::<V, E, _>(g, Div1(d)),
    }
}

#[inline(always)]
fn sumsq_leaf_with<V: F32Vec, E: Exact, P: Pre>(g: &[E], pre: P) -> f64 {
    let mut acc = [0f64; SUMSQ_LANES];
    let n = g.len() / SUMSQ_LANES * SUMSQ_LANES;
    let ptr = g.as_ptr();
    let a = acc.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let mut k = 0;
        while k < SUMSQ_LANES {
            // SAFETY: i + k + LANES <= i + 32 <= n <= g.len() (LANES divides
            // 32), and k + LANES <= 32 = acc.len().
            unsafe { pre.apply(E::exact_lanes::<V>(ptr.add(i + k))).add_squares_f64(a.add(k)) };
            k += V::LANES;
        }
        i += SUMSQ_LANES;
    }
    for (a, &x) in acc.iter_mut().zip(&g[n..]) {
        let x = f64::from(pre.apply(x.exact()));
        *a += x * x;
    }
    let mut w = SUMSQ_LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0]
}

/// One leaf of the sum of squares as a [`LaneOp`], on the backend's lanes.
struct SumSq<'a, E> {
    g: &'a [E],
    unscale: Unscale,
}

impl<E: Exact> LaneOp for SumSq<'_, E> {
    type Out = f64;
    #[inline(always)]
    fn run<V: F32Vec>(self) -> f64 {
        sumsq_leaf::<V, E>(self.g, self.unscale)
    }
}

/// `sum(unscale(g)^2)` in f64 with the plan's backend and threads; the same
/// bits on every path. Infinite or NaN if any unscaled gradient is (f32
/// squares cannot overflow f64, so a finite result means finite gradients).
pub(crate) fn sum_of_squares<E: Exact>(plan: &Plan, g: &[E]) -> f64 {
    let (backend, unscale) = (plan.backend, plan.unscale);
    // Leaves of NORM_BLOCK elements, split at multiples of it from the start:
    // one tree for every thread count, summed in its fixed order.
    split_reduce(
        g,
        NORM_BLOCK,
        plan.exec.chunk_for(g.len()).is_some(),
        &|g| g.len(),
        &|g, mid| g.split_at(mid),
        &|g| dispatch(backend, SumSq { g, unscale }),
        &|x, y| x + y,
    )
}

/// Runs kernel `k` under the plan: the `f32` loop when every buffer is
/// `f32`, else the tiled mixed-storage loop (split at multiples of [`TILE`]).
/// Lengths must already be checked.
pub(crate) fn drive<K: Kernel<S>, const S: usize>(k: &K, plan: Plan, bufs: Bufs<'_>) -> StepReport {
    let pre = plan.pre(k.maximize());
    // Stochastic rounding's lanes need pieces that start at multiples of TILE.
    let fused_multiple = if bufs.sr.is_some() { TILE } else { 1 };
    match bufs.fixed::<S>().into_dense() {
        Ok(sl) => drive_lanes(k, plan, pre, sl, 1),
        Err(mixed) => match mixed.into_fused() {
            Ok(AnyFused::GradsBf16(f)) => drive_lanes(k, plan, pre, f, fused_multiple),
            Ok(AnyFused::GradsF16(f)) => drive_lanes(k, plan, pre, f, fused_multiple),
            Ok(AnyFused::ParamsBf16(f)) => drive_lanes(k, plan, pre, f, fused_multiple),
            Ok(AnyFused::ParamsF16(f)) => drive_lanes(k, plan, pre, f, fused_multiple),
            Ok(AnyFused::AllBf16(f)) => drive_lanes(k, plan, pre, f, fused_multiple),
            Err(mixed) => drive_lanes(k, plan, pre, mixed, TILE),
        },
    }
}
