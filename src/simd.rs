//! The lane abstraction every optimizer formula is written against.
//!
//! An optimizer's per-element update is written once, generic over [`F32Vec`],
//! and instantiated for plain `f32` (the scalar reference), `wide::f32x8` (the
//! portable path) and, on x86-64, raw AVX2 (`__m256`) and AVX-512 (`__m512`)
//! registers behind runtime-detected `#[target_feature]` drivers.
//!
//! # One dispatch, and who may hold an x86 lane
//! Code that runs on lanes (a step, the non-finite scan, the sum of squares,
//! Adafactor's passes, a lane test) is a [`LaneOp`], and [`dispatch`] is the
//! one place that turns a [`Backend`] into a lane type. The AVX2 and AVX-512
//! lane types are private to this module's `x86` part: no other code can name
//! them, so none can make one (`F32Vec::splat` is a safe function that runs
//! AVX instructions). The only way in is [`dispatch`], which asks for a
//! capability token (`Avx2Cap`, `Avx512Cap`, in the style of `pulp`'s `V3`)
//! that only runtime detection makes, and enters the `#[target_feature]`
//! function only with it. Lane safety is therefore a property of this module,
//! not a convention of its callers.
//!
//! # Numeric contract
//! Every operation here is a single correctly rounded IEEE-754 operation
//! (`+ - * /`, `sqrt`, and `mul_add`, the fused multiply-add, where a formula
//! asks for it by name) or exact (`neg`, `abs`, `max_nan`, `min_nan`, `sign`,
//! `lt_select`). No backend fuses a multiply and an add on its own (`a * b + c`
//! is two roundings everywhere), and none uses an approximate reciprocal or
//! reciprocal square root except `rsqrt14`, whose bits Intel's reference
//! implementation defines exactly (the AVX-512 lanes run the instruction,
//! the others the reference; only torch's bit-exact square root,
//! [`torch_sqrt`](crate::math::torch_sqrt), uses it). The formulas are evaluated in the same order on every backend,
//! so **every backend is bitwise identical to the scalar reference** for finite
//! and infinite values (0 ULP per step); NaN results are NaN on every backend,
//! though the NaN payload bits may differ.

use core::ops::{Add, Div, Mul, Neg, Sub};

use crate::backend::Backend;

/// Work written once over a lane type and run by [`dispatch`].
pub(crate) trait LaneOp {
    /// What the work returns.
    type Out;
    /// Runs the work with lane type `V`.
    fn run<V: F32Vec>(self) -> Self::Out;
}

/// Runs `op` on `backend`'s lane type: the one backend dispatch of the crate.
///
/// A backend this CPU cannot run (never asked for by the crate: an
/// [`Exec`](crate::Exec) resolves to an available backend first) runs the
/// portable lanes, which give the same bits.
#[inline]
pub(crate) fn dispatch<O: LaneOp>(backend: Backend, op: O) -> O::Out {
    match backend {
        Backend::Scalar => op.run::<f32>(),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => match x86::Avx2Cap::detect() {
            Some(cap) => cap.run(op),
            None => op.run::<Wide>(),
        },
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => match x86::Avx512Cap::detect() {
            Some(cap) => cap.run(op),
            None => op.run::<Wide>(),
        },
        _ => op.run::<Wide>(),
    }
}

/// A vector of `LANES` f32 values with the handful of operations optimizers need.
///
/// # Safety (for implementors)
/// `load`/`store` read/write `LANES` consecutive `f32` at the pointer.
pub(crate) trait F32Vec:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self>
{
    /// Number of f32 lanes.
    const LANES: usize;
    /// All lanes equal to `x`.
    fn splat(x: f32) -> Self;
    /// Loads `LANES` values.
    ///
    /// # Safety
    /// `ptr..ptr + LANES` must be valid for reads.
    unsafe fn load(ptr: *const f32) -> Self;
    /// Stores `LANES` values.
    ///
    /// # Safety
    /// `ptr..ptr + LANES` must be valid for writes.
    unsafe fn store(self, ptr: *mut f32);
    /// Correctly rounded square root (NaN for negative input).
    fn sqrt(self) -> Self;
    /// AVX-512's `vrsqrt14ps` approximate reciprocal square root, bit for
    /// bit ([`rsqrt14`], the reference; the AVX-512 lanes run the instruction).
    fn rsqrt14(self) -> Self;
    /// Absolute value (clears the sign bit).
    fn abs(self) -> Self;
    /// `torch.maximum`: the larger value, NaN if either operand is NaN.
    fn max_nan(self, other: Self) -> Self;
    /// `self / den`, except `0` where `den == 0` (used only when a user set
    /// `eps = 0`, where torch divides 0 by 0).
    fn div_or_zero(self, den: Self) -> Self;
    /// True if any lane is NaN or infinite.
    fn any_non_finite(self) -> bool;
    /// `self * b + c` with one rounding (fused multiply-add), as torch's
    /// vectorized CPU kernels evaluate `add_(x, alpha=a)` and `addcmul_`.
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// `torch.sign`: `1` for positive lanes, `-1` for negative ones, `+0` for
    /// zeros of either sign and for NaN (torch's `(0 < x) - (x < 0)`).
    fn sign(self) -> Self;
    /// Per lane `if self < other { a } else { b }` (ordered: a NaN operand
    /// picks `b`).
    fn lt_select(self, other: Self, a: Self, b: Self) -> Self;
    /// `torch.minimum`: the smaller value, NaN if either operand is NaN.
    fn min_nan(self, other: Self) -> Self;
    /// Widens `LANES` bf16 bit patterns (exact, [`bf16_to_f32`]).
    ///
    /// # Safety
    /// `ptr..ptr + LANES` must be valid for reads.
    unsafe fn load_bf16(ptr: *const u16) -> Self;
    /// Narrows to bf16 ([`f32_to_bf16`]: nearest, ties to even, NaN to `0x7fc0`).
    ///
    /// # Safety
    /// `ptr..ptr + LANES` must be valid for writes.
    unsafe fn store_bf16(self, ptr: *mut u16);
    /// Narrows to bf16 stochastically: lane `l` is
    /// [`f32_to_bf16_stochastic_bits`] with the bits
    /// [`stream_bits`]`(lo ^ l, hi)` (lane `l`'s element index xor the key,
    /// low and high halves, where the first lane's index is a multiple of
    /// `LANES`). Lane by lane by default; the x86 lanes hash in registers.
    ///
    /// # Safety
    /// `ptr..ptr + LANES` must be valid for writes.
    #[inline(always)]
    unsafe fn store_bf16_stochastic(self, ptr: *mut u16, lo: u32, hi: u32) {
        let mut buf = [0f32; 16];
        assert!(Self::LANES <= buf.len(), "at most 16 lanes");
        // SAFETY: LANES <= 16 values fit in buf.
        unsafe { self.store(buf.as_mut_ptr()) };
        for (l, &x) in buf[..Self::LANES].iter().enumerate() {
            // SAFETY: l < LANES, inside the caller's writable range.
            unsafe { *ptr.add(l) = f32_to_bf16_stochastic_bits(x, stream_bits(lo ^ l as u32, hi)) };
        }
    }
    /// Widens `LANES` f16 bit patterns (exact, [`f16_to_f32`]).
    ///
    /// # Safety
    /// `ptr..ptr + LANES` must be valid for reads.
    unsafe fn load_f16(ptr: *const u16) -> Self;
    /// Narrows to f16 ([`f32_to_f16`]: nearest, ties to even, overflow to
    /// infinity, every NaN to `0x7e00`).
    ///
    /// # Safety
    /// `ptr..ptr + LANES` must be valid for writes.
    unsafe fn store_f16(self, ptr: *mut u16);
    /// `table[codes[i]]` per lane (an 8-bit state's values before scaling).
    ///
    /// # Safety
    /// `codes..codes + LANES` must be valid for reads and `table` for 256 `f32`.
    unsafe fn lookup(table: *const f32, codes: *const u8) -> Self;
    /// `table.code[codes[i]] * scale` into `dst[i]` for the first `n - n %
    /// LANES` codes (whole vectors; the caller does the tail), returning how
    /// many were written. Each lane is [`lookup`](Self::lookup)'s value times
    /// `scale`, one rounding, on every backend; a backend may hold the table
    /// in registers for the whole run (AVX-512 does, as `f32`s or as byte
    /// planes).
    ///
    /// # Safety
    /// `codes..codes + n` must be valid for reads and `dst..dst + n` for writes.
    #[inline(always)]
    unsafe fn dequantize_lanes(table: &Q8Table, codes: *const u8, scale: f32, dst: *mut f32, n: usize) -> usize {
        let table = &table.code;
        let s = Self::splat(scale);
        let mut i = 0;
        while i + Self::LANES <= n {
            // SAFETY: i + LANES <= n, within both ranges; `table` has 256 entries.
            unsafe { (Self::lookup(table.as_ptr(), codes.add(i)) * s).store(dst.add(i)) };
            i += Self::LANES;
        }
        i
    }
    /// A hint to fetch the cache line at `ptr` (any address: a prefetch
    /// reads nothing and cannot fault); nothing on the portable backends.
    #[inline(always)]
    fn prefetch(ptr: *const u8) {
        let _ = ptr;
    }
    /// The largest magnitude among the whole vectors of `src[..n]` (a NaN,
    /// of any payload, if one of them is NaN; 0 if there are none) and how
    /// many were read; the caller folds the tail. Exact, so the order in
    /// which the maxima are taken does not matter.
    ///
    /// # Safety
    /// `src..src + n` must be valid for reads.
    #[inline(always)]
    unsafe fn abs_max_lanes(src: *const f32, n: usize) -> (f32, usize) {
        assert!(Self::LANES <= 16, "widest backend");
        let mut acc = Self::splat(0.0);
        let mut i = 0;
        while i + Self::LANES <= n {
            // SAFETY: i + LANES <= n, within the caller's range.
            acc = acc.max_nan(unsafe { Self::load(src.add(i)) }.abs());
            i += Self::LANES;
        }
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds 16 >= LANES values.
        unsafe { acc.store(lanes.as_mut_ptr()) };
        (lanes[..Self::LANES].iter().fold(0.0f32, |m, &x| m.max_nan(x)), i)
    }
    /// The 8-bit codes of the lanes ([`q8_code`]) through a map's 65536-entry
    /// table (`storage::QMap`'s), written to `out`.
    ///
    /// # Safety
    /// `out..out + LANES` must be valid for writes and `lut` for 65536 `u32`.
    unsafe fn store_codes(self, lut: *const u32, out: *mut u8);
    /// The codes of `src[i] / absmax` (one rounding, NaN as 0) for the
    /// first `n - n % LANES` elements (whole vectors; the caller does the
    /// tail), returning how many were written: [`q8_code`] on every lane,
    /// through the table by default; AVX-512 runs [`Q8Fast`] where the map
    /// has it (same codes).
    ///
    /// # Safety
    /// `src..src + n` must be valid for reads and `codes..codes + n` for writes.
    #[inline(always)]
    unsafe fn quantize_lanes(q: &Q8Quantizer, src: *const f32, absmax: f32, codes: *mut u8, n: usize) -> usize {
        // SAFETY: forwarded from the caller.
        unsafe { quantize_lanes_with_table::<Self>(&q.lut, src, absmax, codes, n) }
    }
    /// Lane `l` widened to `f64`, squared and added to `acc[l]` (a multiply
    /// and an add, each rounded in `f64`): the sum-of-squares accumulators.
    ///
    /// # Safety
    /// `acc..acc + LANES` must be valid for reads and writes.
    unsafe fn add_squares_f64(self, acc: *mut f64);
}

/// The exact `f32` of a bf16 bit pattern.
#[inline(always)]
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// torch's c10 `round_to_nearest_even` narrowing to bf16: nearest, ties to
/// even, every NaN to `0x7fc0`.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() { 0x7fc0 } else { rounded }
}

/// MurmurHash3's 32-bit finalizer, a bijection on `u32`.
#[inline(always)]
pub(crate) const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The 16 random bits of stochastic rounding from an element index's halves
/// already xored with the key's (`storage::stochastic_bits`).
#[inline(always)]
pub(crate) const fn stream_bits(lo: u32, hi: u32) -> u32 {
    fmix32(fmix32(lo) ^ hi) >> 16
}

/// `x` rounded to a bf16 bit pattern stochastically with the random bits
/// `r < 2^16`: `(bits(x) + r) >> 16`, NaN to `0x7FC0`
/// (`storage::f32_to_bf16_stochastic`).
#[inline(always)]
pub(crate) fn f32_to_bf16_stochastic_bits(x: f32, r: u32) -> u16 {
    let rounded = (x.to_bits().wrapping_add(r & 0xffff) >> 16) as u16;
    if x.is_nan() { 0x7fc0 } else { rounded }
}

/// The exact `f32` of an f16 bit pattern: FP16's `fp16_ieee_to_fp32_value`
/// (normal and infinite/NaN inputs by a shift and an exact scaling,
/// subnormals by a magic subtraction; a signalling NaN comes back quiet, as
/// from the hardware conversion).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let w = u32::from(h) << 16;
    let sign = w & 0x8000_0000;
    let two_w = w.wrapping_add(w);
    let normalized = f32::from_bits((two_w >> 4) + (0xe0 << 23)) * f32::from_bits(0x0780_0000); // 2^-112
    let denormalized = f32::from_bits((two_w >> 17) | (126 << 23)) - 0.5;
    let bits = if two_w < (1 << 27) { denormalized.to_bits() } else { normalized.to_bits() };
    f32::from_bits(sign | bits)
}

/// FP16's `fp16_ieee_from_fp32_value`: the two scalings round the mantissa
/// at the f16 position (nearest even) and send overflow to infinity; the
/// added bias places subnormals. Every NaN becomes `0x7e00`, as every NaN
/// narrows to `0x7fc0` in [`f32_to_bf16`]: FP16 (and torch's `Half`) keep a
/// NaN's sign, but the sign of a NaN an operation makes is not the same on
/// every path (x86's default NaN is negative, `fmaf` and operand order
/// differ), so a signed NaN would make backends differ in the bits they
/// store.
#[inline(always)]
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    let base = (x.abs() * f32::from_bits(0x7780_0000)) * f32::from_bits(0x0880_0000); // 2^112, 2^-110
    let w = x.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xff00_0000).max(0x7100_0000);
    let base = f32::from_bits((bias >> 1) + 0x0780_0000) + base;
    let bits = base.to_bits();
    let nonsign = ((bits >> 13) & 0x7c00) + (bits & 0x0fff);
    if shl1_w > 0xff00_0000 { 0x7e00 } else { ((sign >> 16) | nonsign) as u16 }
}

/// `vrsqrt14`'s segments, `(c, d)` each: on segment `i` of `[1, 2)` (width
/// 1/32, midpoint `y = 1 + 1/64 + i/32`) the value is
/// `(c - 2^8 d (x - y)) / 2^19`, on segment `i` of `[2, 4)` (width 1/16,
/// midpoint `y = 2 + 1/32 + i/16`) `(c - 2^7 d (x - y)) / 2^19`. The numbers
/// are those of Intel's "Reference Implementations for IA Approximation
/// Instructions VRCP14, VRSQRT14, VRCP28, VRSQRT28, and VEXP2" (2015), which
/// defines the instruction's bits; [`rsqrt14`] is checked against the
/// instruction on every positive input of three binades and all subnormals.
const RSQRT14_LOW: [(u32, u32); 32] = [
    (520261, 1001),
    (512437, 955),
    (504953, 915),
    (497790, 877),
    (490922, 841),
    (484331, 807),
    (478001, 775),
    (471909, 747),
    (466046, 719),
    (460397, 693),
    (454947, 669),
    (449688, 647),
    (444606, 625),
    (439694, 603),
    (434939, 585),
    (430335, 567),
    (425875, 549),
    (421551, 533),
    (417355, 517),
    (413284, 501),
    (409329, 487),
    (405487, 473),
    (401748, 461),
    (398111, 449),
    (394571, 437),
    (391127, 425),
    (387770, 415),
    (384498, 403),
    (381307, 393),
    (378194, 385),
    (375155, 375),
    (372190, 367),
];
/// The `[2, 4)` segments (see [`RSQRT14_LOW`]).
const RSQRT14_HIGH: [(u32, u32); 32] = [
    (367881, 707),
    (362349, 675),
    (357056, 647),
    (351992, 619),
    (347136, 595),
    (342475, 571),
    (337997, 549),
    (333693, 527),
    (329545, 509),
    (325551, 491),
    (321697, 473),
    (317977, 457),
    (314385, 441),
    (310910, 427),
    (307549, 413),
    (304295, 401),
    (301139, 389),
    (298079, 377),
    (295115, 365),
    (292237, 355),
    (289439, 345),
    (286722, 335),
    (284080, 325),
    (281508, 317),
    (279006, 309),
    (276569, 301),
    (274195, 293),
    (271882, 285),
    (269625, 279),
    (267425, 271),
    (265276, 265),
    (263178, 259),
];

/// `vrsqrt14ps` on one value, by its definition: `x = m * 4^n` with `m` in
/// `[1, 4)` (subnormals normalized first), the segment of `m` evaluated with
/// `m` truncated to 15 fraction bits, exactly in f64, the result truncated
/// to 16 fraction bits and divided by `2^n`. `1` for `m = 1`; `+-inf` for
/// `+-0`, `0` for `+inf`, the default NaN for negative input, a NaN quieted.
pub(crate) fn rsqrt14(x: f32) -> f32 {
    let b = x.to_bits();
    if x.is_nan() {
        return f32::from_bits(b | 0x0040_0000);
    }
    if b & 0x7fff_ffff == 0 {
        return f32::from_bits(b | 0x7f80_0000);
    }
    if b >> 31 != 0 {
        return f32::from_bits(0xffc0_0000);
    }
    if x == f32::INFINITY {
        return 0.0;
    }
    // x = (1 + f / 2^23) * 2^e, with a 23-bit fraction f
    let (e, f) = match b >> 23 {
        0 => {
            let k = b.leading_zeros() - 8; // brings the leading one to bit 23
            (-126 - k as i32, (b << k) & 0x007f_ffff)
        }
        biased => (biased as i32 - 127, b & 0x007f_ffff),
    };
    let high = e & 1 != 0;
    let n = (e - i32::from(high)) / 2; // exact: x = m * 4^n, m = 2^(e - 2n) (1 + f / 2^23)
    let r = if !high && f == 0 {
        1.0
    } else {
        let i = (f >> 18) as usize;
        let t = f64::from(f & !0xff) / f64::from(1u32 << 23); // the fraction, 15 bits kept
        let ((c, d), m_minus_y) = if high {
            (RSQRT14_HIGH[i], 2.0 * (1.0 + t) - (2.0 + 1.0 / 32.0 + i as f64 / 16.0))
        } else {
            (RSQRT14_LOW[i], (1.0 + t) - (1.0 + 1.0 / 64.0 + i as f64 / 32.0))
        };
        let slope = f64::from(d) * if high { 128.0 } else { 256.0 };
        // every term and the sum are exact in f64 (at most 40 significant bits)
        let v = f64::from(c) - slope * m_minus_y;
        (f64::from_bits(v.to_bits() & 0xffff_fff0_0000_0000) / f64::from(1u32 << 19)) as f32
    };
    f32::from_bits((r.to_bits() as i32 - (n << 23)) as u32)
}

/// [`rsqrt14`] on each lane of `v`: the lanes that have no `vrsqrt14ps`
/// (`wide`, AVX2, and AVX-512 on a CPU whose instruction is not the reference).
#[inline(always)]
fn rsqrt14_lanewise<V: F32Vec>(v: V) -> V {
    let mut lanes = [0f32; 16];
    assert!(V::LANES <= 16, "widest backend");
    // SAFETY: `lanes` holds 16 >= LANES values.
    unsafe { v.store(lanes.as_mut_ptr()) };
    for x in &mut lanes[..V::LANES] {
        *x = rsqrt14(*x);
    }
    // SAFETY: as above.
    unsafe { V::load(lanes.as_ptr()) }
}

/// The order-preserving key of an f32 (negative values reversed), so
/// unsigned comparison of keys is comparison of the values.
#[inline(always)]
pub(crate) fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    b ^ (((b as i32) >> 31) as u32 | 0x8000_0000)
}

/// The 8-bit code of `x` (a value divided by its block's absmax; NaN counts
/// as 0) through a map's table: the entry of `x`'s bucket (the top 16 bits
/// of its order key) holds the bucket's code in its top byte and where in
/// the bucket the next code begins in its low 17 bits.
#[inline(always)]
pub(crate) fn q8_code(lut: &[u32], x: f32) -> u8 {
    let key = order_key(if x.is_nan() { 0.0 } else { x });
    let e = lut[(key >> 16) as usize];
    ((e >> 24) + u32::from(key & 0xffff >= e & 0x1_ffff)) as u8
}

/// How close to an integer the arithmetic quantizer's `t` may come before
/// a lane is settled by the exact table instead ([`Q8Fast`]).
pub(crate) const Q8_FAST_DELTA: f32 = 1.0 / 2048.0;

/// The tables of the arithmetic 8-bit quantizer, which finds a code without
/// a table gather (the AVX-512 lanes run it; `storage::QMap` builds and
/// proves it).
///
/// The codes of a map are cut into at most 32 *segments* of codes whose
/// jumps (the values where the nearest-code rule moves to the next code)
/// lie nearly evenly spaced, as within a decade of bitsandbytes' dynamic
/// maps. For `y` (a value over its block's absmax, NaN taken as 0):
/// 1. its *cell* is its sign and binade: `min(max(exponent - 96, 0), 31) +
///    32 * sign` (64 cells; no cell holds more than one segment start);
/// 2. its segment is `seg_lo[cell]`, plus one if `y >= bnd[cell]` (the next
///    segment's first jump, exactly, or infinity);
/// 3. `t = clamp(y * s + o, lo, hi)` (the product and sum rounded once;
///    `lo` and `hi` are the segment's first and last codes plus a half),
///    and the code is `floor(t)`;
/// 4. unless `t` lies within [`Q8_FAST_DELTA`] of an integer: such a lane is
///    *ambiguous* and takes the exact table's code ([`q8_code`]).
///
/// Exact by construction: `t` is monotone in `y` within a segment, and the
/// map's builder checks that at every jump `J` to code `k` inside a segment,
/// `t(J) > k - delta` and `t` of the float before `J` is `< k + delta`, so a
/// lane whose `t` is not ambiguous floors to the rule's code (the clamp
/// settles the segment's first and last codes).
#[derive(Clone, Debug)]
pub(crate) struct Q8Fast {
    /// Per cell: the start of the cell's second segment, or infinity.
    pub(crate) bnd: [f32; 64],
    /// Per cell: the segment its smallest values fall in.
    pub(crate) seg_lo: [i32; 64],
    /// Per segment: `t`'s slope.
    pub(crate) s: [f32; 32],
    /// Per segment: `t`'s offset.
    pub(crate) o: [f32; 32],
    /// Per segment: its first code plus a half.
    pub(crate) lo: [f32; 32],
    /// Per segment: its last code plus a half.
    pub(crate) hi: [f32; 32],
    /// Whether the map's values at or below zero all share code 0, so that
    /// the lanes look up the positive cells only and settle a vector with a
    /// negative lane (rare for such a map's states) through the table.
    pub(crate) positive: bool,
}

impl Q8Fast {
    /// The cell of `y` (see the type's docs).
    #[inline(always)]
    pub(crate) fn cell(y: f32) -> usize {
        let b = y.to_bits();
        let e = ((b & 0x7fff_ffff) >> 23) as i32;
        (e - 96).clamp(0, 31) as usize + 32 * (b >> 31) as usize
    }

    /// The segment of `y`.
    #[cfg(test)]
    pub(crate) fn segment(&self, y: f32) -> usize {
        let c = Q8Fast::cell(y);
        (self.seg_lo[c] + i32::from(y >= self.bnd[c])) as usize
    }

    /// `t` of `y` for slope `s` and offset `o`, rounded once as the lanes
    /// round it (the builder's proof and the model share it).
    #[inline(always)]
    pub(crate) fn t(y: f32, s: f32, o: f32) -> f32 {
        y.mul_add(s, o)
    }

    /// Whether the lanes settle `t` from the table instead.
    #[cfg(test)]
    pub(crate) fn ambiguous(t: f32) -> bool {
        (t - t.round_ties_even()).abs() < Q8_FAST_DELTA
    }

    /// The scalar model of the lanes: the code of `y` (not NaN), or `None`
    /// where the lanes take the table's.
    #[cfg(test)]
    pub(crate) fn code(&self, y: f32) -> Option<u8> {
        let g = self.segment(y);
        let t = Q8Fast::t(y, self.s[g], self.o[g]).max(self.lo[g]).min(self.hi[g]);
        if Q8Fast::ambiguous(t) {
            return None;
        }
        Some(t.floor() as u8)
    }
}

/// A map's 256 values as the dequantizing lanes read them: the `f32`s, and
/// their bytes split into four planes (`planes[b][c]` is byte `b`, little
/// endian, of `code[c]`) for lanes that look bytes up in registers.
#[derive(Clone)]
pub(crate) struct Q8Table {
    /// The values.
    pub(crate) code: [f32; 256],
    /// The values' bytes, plane by plane.
    pub(crate) planes: [[u8; 256]; 4],
}

impl Q8Table {
    /// The table of `code`.
    pub(crate) fn new(code: [f32; 256]) -> Q8Table {
        let planes = core::array::from_fn(|b| core::array::from_fn(|c| code[c].to_le_bytes()[b]));
        Q8Table { code, planes }
    }
}

/// A map's quantizer: the exact 65536-entry table ([`q8_code`]) and, where
/// the map allows, the arithmetic one ([`Q8Fast`]).
#[derive(Clone)]
pub(crate) struct Q8Quantizer {
    /// Per bucket: `code << 24 | jump` ([`q8_code`]).
    pub(crate) lut: Box<[u32]>,
    /// The arithmetic quantizer's tables, proven for this map.
    pub(crate) fast: Option<Box<Q8Fast>>,
}

/// `codes[i] = q8_code(src[i] / absmax)` for the whole vectors of `n`
/// (the default [`F32Vec::quantize_lanes`]), returning how many were written.
///
/// # Safety
/// `src..src + n` readable, `codes..codes + n` writable.
#[inline(always)]
pub(crate) unsafe fn quantize_lanes_with_table<V: F32Vec>(
    lut: &[u32],
    src: *const f32,
    absmax: f32,
    codes: *mut u8,
    n: usize,
) -> usize {
    assert_eq!(lut.len(), 1 << 16, "a map's table");
    let d = V::splat(absmax);
    let mut i = 0;
    while i + V::LANES <= n {
        // SAFETY: i + LANES <= n, within both ranges; `lut` has 65536 entries.
        unsafe { (V::load(src.add(i)) / d).store_codes(lut.as_ptr(), codes.add(i)) };
        i += V::LANES;
    }
    i
}

impl F32Vec for f32 {
    const LANES: usize = 1;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        // SAFETY: the caller guarantees `ptr` is valid for one read.
        unsafe { *ptr }
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        // SAFETY: the caller guarantees `ptr` is valid for one write.
        unsafe { *ptr = self }
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn rsqrt14(self) -> Self {
        rsqrt14(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn max_nan(self, other: Self) -> Self {
        // Same selection as x86 `maxps(a, b)` (`a > b ? a : b`) plus NaN in `a` kept.
        if self.is_nan() || self > other { self } else { other }
    }
    #[inline(always)]
    fn div_or_zero(self, den: Self) -> Self {
        if den == 0.0 { 0.0 } else { self / den }
    }
    #[inline(always)]
    fn any_non_finite(self) -> bool {
        !self.is_finite()
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        // Hardware FMA where the build has it, else libm's correctly rounded fmaf.
        f32::mul_add(self, b, c)
    }
    #[inline(always)]
    fn sign(self) -> Self {
        f32::from(u8::from(self > 0.0)) - f32::from(u8::from(self < 0.0))
    }
    #[inline(always)]
    fn lt_select(self, other: Self, a: Self, b: Self) -> Self {
        if self < other { a } else { b }
    }
    #[inline(always)]
    fn min_nan(self, other: Self) -> Self {
        // Same selection as x86 `minps(a, b)` (`a < b ? a : b`) plus NaN in `a` kept.
        if self.is_nan() || self < other { self } else { other }
    }
    #[inline(always)]
    unsafe fn load_bf16(ptr: *const u16) -> Self {
        // SAFETY: the caller guarantees one readable u16.
        bf16_to_f32(unsafe { ptr.read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store_bf16(self, ptr: *mut u16) {
        // SAFETY: the caller guarantees one writable u16.
        unsafe { ptr.write_unaligned(f32_to_bf16(self)) }
    }
    #[inline(always)]
    unsafe fn load_f16(ptr: *const u16) -> Self {
        // SAFETY: the caller guarantees one readable u16.
        f16_to_f32(unsafe { ptr.read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store_f16(self, ptr: *mut u16) {
        // SAFETY: the caller guarantees one writable u16.
        unsafe { ptr.write_unaligned(f32_to_f16(self)) }
    }
    #[inline(always)]
    unsafe fn lookup(table: *const f32, codes: *const u8) -> Self {
        // SAFETY: the caller guarantees a readable code and a 256-entry table.
        unsafe { *table.add(usize::from(*codes)) }
    }
    #[inline(always)]
    unsafe fn store_codes(self, lut: *const u32, out: *mut u8) {
        // SAFETY: the caller guarantees a 65536-entry table and a writable byte.
        unsafe { *out = q8_code(core::slice::from_raw_parts(lut, 1 << 16), self) }
    }
    #[inline(always)]
    unsafe fn add_squares_f64(self, acc: *mut f64) {
        let x = f64::from(self);
        // SAFETY: the caller guarantees one readable and writable f64.
        unsafe { *acc += x * x }
    }
}

/// Lane by lane through the scalar reference, for the `Wide` conversions.
macro_rules! lanewise_conversions {
    ($n:literal, $wrap:expr, $arr:expr) => {
        #[inline(always)]
        unsafe fn load_bf16(ptr: *const u16) -> Self {
            // SAFETY: the caller guarantees LANES readable u16.
            $wrap(core::array::from_fn(|i| bf16_to_f32(unsafe { ptr.add(i).read_unaligned() })))
        }
        #[inline(always)]
        unsafe fn store_bf16(self, ptr: *mut u16) {
            for (i, x) in $arr(self).into_iter().enumerate() {
                // SAFETY: the caller guarantees LANES writable u16.
                unsafe { ptr.add(i).write_unaligned(f32_to_bf16(x)) }
            }
        }
        #[inline(always)]
        unsafe fn load_f16(ptr: *const u16) -> Self {
            // SAFETY: the caller guarantees LANES readable u16.
            $wrap(core::array::from_fn(|i| f16_to_f32(unsafe { ptr.add(i).read_unaligned() })))
        }
        #[inline(always)]
        unsafe fn store_f16(self, ptr: *mut u16) {
            for (i, x) in $arr(self).into_iter().enumerate() {
                // SAFETY: the caller guarantees LANES writable u16.
                unsafe { ptr.add(i).write_unaligned(f32_to_f16(x)) }
            }
        }
        #[inline(always)]
        unsafe fn lookup(table: *const f32, codes: *const u8) -> Self {
            // SAFETY: the caller guarantees LANES readable codes and a 256-entry table.
            $wrap(core::array::from_fn(|i| unsafe { *table.add(usize::from(*codes.add(i))) }))
        }
        #[inline(always)]
        unsafe fn store_codes(self, lut: *const u32, out: *mut u8) {
            // SAFETY: the caller guarantees a 65536-entry table.
            let lut = unsafe { core::slice::from_raw_parts(lut, 1 << 16) };
            for (i, x) in $arr(self).into_iter().enumerate() {
                // SAFETY: the caller guarantees LANES writable bytes.
                unsafe { *out.add(i) = q8_code(lut, x) }
            }
        }
        #[inline(always)]
        unsafe fn add_squares_f64(self, acc: *mut f64) {
            for (i, x) in $arr(self).into_iter().enumerate() {
                let x = f64::from(x);
                // SAFETY: the caller guarantees LANES readable and writable f64.
                unsafe { *acc.add(i) += x * x }
            }
        }
    };
}

/// The portable path: `wide::f32x8` (SSE2 pairs in a default x86-64 build,
/// NEON on aarch64, whatever `wide` compiles to elsewhere).
#[derive(Clone, Copy)]
struct Wide(wide::f32x8);

macro_rules! impl_ops {
    ($t:ident, $add:expr, $sub:expr, $mul:expr, $div:expr) => {
        impl Add for $t {
            type Output = Self;
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                $add(self, o)
            }
        }
        impl Sub for $t {
            type Output = Self;
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                $sub(self, o)
            }
        }
        impl Mul for $t {
            type Output = Self;
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                $mul(self, o)
            }
        }
        impl Div for $t {
            type Output = Self;
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                $div(self, o)
            }
        }
    };
}

impl_ops!(
    Wide,
    |a: Wide, b: Wide| Wide(a.0 + b.0),
    |a: Wide, b: Wide| Wide(a.0 - b.0),
    |a: Wide, b: Wide| Wide(a.0 * b.0),
    |a: Wide, b: Wide| Wide(a.0 / b.0)
);

impl Neg for Wide {
    type Output = Self;
    #[inline(always)]
    fn neg(self) -> Self {
        Wide(-self.0)
    }
}

impl F32Vec for Wide {
    const LANES: usize = 8;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Wide(wide::f32x8::splat(x))
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable f32; `read_unaligned` has no
        // alignment requirement.
        Wide(wide::f32x8::new(unsafe { ptr.cast::<[f32; 8]>().read_unaligned() }))
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        // SAFETY: the caller guarantees 8 writable f32; no alignment requirement.
        unsafe { ptr.cast::<[f32; 8]>().write_unaligned(self.0.to_array()) }
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        Wide(self.0.sqrt())
    }
    #[inline(always)]
    fn rsqrt14(self) -> Self {
        rsqrt14_lanewise(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        Wide(self.0.abs())
    }
    #[inline(always)]
    fn max_nan(self, other: Self) -> Self {
        // `wide`'s `max` ignores NaN like `f32::max`; torch.maximum propagates it.
        // `a > b ? a : b` is x86 `maxps`; then keep a NaN `a`.
        let picked = self.0.simd_gt(other.0).select(self.0, other.0);
        Wide(self.0.is_nan().select(self.0, picked))
    }
    #[inline(always)]
    fn div_or_zero(self, den: Self) -> Self {
        let zero = wide::f32x8::splat(0.0);
        Wide(den.0.simd_eq(zero).select(zero, self.0 / den.0))
    }
    #[inline(always)]
    fn any_non_finite(self) -> bool {
        !self.0.is_finite().all()
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        // Lane by lane through `f32::mul_add`, never `wide`'s `mul_add`, which
        // falls back to a multiply and a separate add (two roundings) where the
        // build lacks FMA: this way the portable path gives the scalar
        // reference's bits on every target (vector FMA where the target has
        // it, libm's exact `fmaf` where it does not).
        let (x, y, z) = (self.0.to_array(), b.0.to_array(), c.0.to_array());
        Wide(wide::f32x8::new(core::array::from_fn(|i| x[i].mul_add(y[i], z[i]))))
    }
    #[inline(always)]
    fn sign(self) -> Self {
        let (zero, one) = (wide::f32x8::splat(0.0), wide::f32x8::splat(1.0));
        Wide(self.0.simd_gt(zero).select(one, zero) - self.0.simd_lt(zero).select(one, zero))
    }
    #[inline(always)]
    fn lt_select(self, other: Self, a: Self, b: Self) -> Self {
        Wide(self.0.simd_lt(other.0).select(a.0, b.0))
    }
    #[inline(always)]
    fn min_nan(self, other: Self) -> Self {
        let picked = self.0.simd_lt(other.0).select(self.0, other.0);
        Wide(self.0.is_nan().select(self.0, picked))
    }
    lanewise_conversions!(8, |a: [f32; 8]| Wide(wide::f32x8::new(a)), |v: Wide| v.0.to_array());
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Raw `std::arch` lanes and the capability tokens that guard them. The
    //! lane types are visible to this file only (`pub(super)`); generic code
    //! elsewhere meets them only as the `V` of a [`LaneOp`] run by
    //! [`Avx2Cap::run`] / [`Avx512Cap::run`], which need a token, which only
    //! [`Avx2Cap::detect`] / [`Avx512Cap::detect`] make, after runtime
    //! detection. So every intrinsic below runs on a CPU that has it.
    use super::*;
    use core::arch::x86_64::*;

    /// Eight lanes in one `ymm` register (AVX).
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256);

    /// Sixteen lanes in one `zmm` register (AVX-512F).
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    /// Proof that this CPU has AVX2, FMA and F16C: made only by
    /// [`Avx2Cap::detect`] (the field is private).
    #[derive(Clone, Copy)]
    pub(super) struct Avx2Cap(());

    /// Proof that this CPU has AVX-512F: made only by [`Avx512Cap::detect`].
    #[derive(Clone, Copy)]
    pub(super) struct Avx512Cap(());

    /// Whether this CPU's `vrsqrt14ps` gives the reference's bits ([`rsqrt14`],
    /// Intel's definition of the instruction), checked once per process on
    /// every segment and 15-bit fraction of `[1, 4)` (the reference reads no
    /// more of the input) with three settings of the bits below, subnormals
    /// and the special values: about 400 000 inputs, a few milliseconds.
    /// Where it does not (a CPU that implements the approximation
    /// differently), the AVX-512 lanes take the reference lane by lane, so
    /// every backend keeps the same bits. Called only from AVX-512 lanes,
    /// which exist only after detection.
    pub(super) fn rsqrt14_instruction_is_reference() -> bool {
        static SAME: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        #[target_feature(enable = "avx512f")]
        fn check() -> bool {
            let fractions = (0..2u32).flat_map(|e| (0..1u32 << 15).map(move |f| (127 + e) << 23 | f << 8));
            let mut xs: Vec<f32> = fractions
                .flat_map(|b| [b, b | 0xff, b | 0x5a])
                .chain((1..1u32 << 23).step_by(97))
                .map(f32::from_bits)
                .collect();
            xs.extend([0.0, -0.0, 1.0, 4.0, f32::INFINITY, f32::MAX, f32::MIN_POSITIVE, f32::from_bits(1), -1.0]);
            xs.resize(xs.len().next_multiple_of(16), 2.0);
            xs.chunks_exact(16).all(|c| {
                let mut hw = [0f32; 16];
                // SAFETY: `c` and `hw` hold 16 values; AVX-512F is enabled here.
                unsafe { _mm512_storeu_ps(hw.as_mut_ptr(), _mm512_rsqrt14_ps(_mm512_loadu_ps(c.as_ptr()))) };
                c.iter().zip(hw).all(|(&x, h)| h.to_bits() == rsqrt14(x).to_bits())
            })
        }
        // SAFETY: only AVX-512 lanes call this, and they exist only where
        // `Avx512Cap::detect` found AVX-512F.
        *SAME.get_or_init(|| unsafe { check() })
    }

    /// `table[codes[i]] * scale` for the whole 16-lane vectors of `n`
    /// ([`F32Vec::dequantize_lanes`]) on AVX-512F alone, returning how many
    /// were written.
    ///
    /// # Safety
    /// `codes..codes + n` readable, `dst..dst + n` writable; only from code
    /// reached through `Avx512Cap::run`.
    #[inline(always)]
    pub(super) unsafe fn dequantize_tree(
        table: &[f32; 256],
        codes: *const u8,
        scale: f32,
        dst: *mut f32,
        n: usize,
    ) -> usize {
        // The 256 entries in 16 registers; per 16 codes, eight two-register
        // permutes (the low 5 bits of each code pick within a 32-entry
        // pair) and a blend tree on bits 5, 6 and 7: no gather.
        // SAFETY: the table reads stay inside its 256 entries; the caller
        // guarantees `n` readable codes and `n` writable floats, and
        // i + 16 <= n below; AVX-512F under the module's detection contract.
        unsafe {
            let t: [__m512; 16] = core::array::from_fn(|k| _mm512_loadu_ps(table.as_ptr().add(16 * k)));
            let s = _mm512_set1_ps(scale);
            let mut i = 0;
            while i + 16 <= n {
                let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.add(i).cast()));
                let p: [__m512; 8] = core::array::from_fn(|k| _mm512_permutex2var_ps(t[2 * k], idx, t[2 * k + 1]));
                let b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
                let b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
                let b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
                let q: [__m512; 4] = core::array::from_fn(|k| _mm512_mask_blend_ps(b5, p[2 * k], p[2 * k + 1]));
                let r0 = _mm512_mask_blend_ps(b6, q[0], q[1]);
                let r1 = _mm512_mask_blend_ps(b6, q[2], q[3]);
                _mm512_storeu_ps(dst.add(i), _mm512_mul_ps(_mm512_mask_blend_ps(b7, r0, r1), s));
                i += 16;
            }
            i
        }
    }

    /// [`Q8Fast`] in lanes, its tables in registers, for
    /// [`F32Vec::quantize_lanes`]: per 16 elements a division, at most ten
    /// two-register permutes and some integer work; a vector with a lane
    /// whose `t` is ambiguous (or NaN) is redone through the exact table
    /// (`lut`), as is, when `SIGNED` is false (the map's `positive` lanes:
    /// its negative cells' tables are not loaded), one with a lane whose
    /// sign bit is set.
    ///
    /// The loop is software-pipelined: the division and the segment of the
    /// next vector are found before the current vector's code, so the long
    /// chain of each vector does not hold the scheduler. With the NaN lanes
    /// sent to the table rather than zeroed first, quantizing a tile took
    /// about a quarter less time in a microbenchmark on Zen 5
    /// (`benches/results/q8-quantize-pipeline-session33.txt`).
    ///
    /// # Safety
    /// `src..src + n` readable, `codes..codes + n` writable, `lut` of 65536
    /// entries; AVX-512F under the module's detection contract.
    #[inline(always)]
    pub(super) unsafe fn quantize_fast<const SIGNED: bool>(
        f: &Q8Fast,
        lut: &[u32],
        src: *const f32,
        absmax: f32,
        codes: *mut u8,
        n: usize,
    ) -> usize {
        assert_eq!(lut.len(), 1 << 16, "a map's table");
        if n < 16 {
            return 0;
        }
        // SAFETY: the table loads read inside `f`'s arrays (64 and 32
        // entries); every source load is at an offset + 16 <= n (the
        // stages below load only vectors that exist) and every store of
        // codes at i + 16 <= n; every permute index is masked to 5 bits by
        // the instruction; AVX-512F under the module's detection contract.
        unsafe {
            let ps = |p: *const f32| -> [__m512; 2] { [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))] };
            let pi = |p: *const i32| -> [__m512i; 2] {
                [_mm512_loadu_si512(p.cast()), _mm512_loadu_si512(p.add(16).cast())]
            };
            let (bnd_p, seg_p) = (ps(f.bnd.as_ptr()), pi(f.seg_lo.as_ptr()));
            let (bnd_n, seg_n) =
                if SIGNED { (ps(f.bnd.as_ptr().add(32)), pi(f.seg_lo.as_ptr().add(32))) } else { (bnd_p, seg_p) };
            let (sl, ol, lo, hi) = (ps(f.s.as_ptr()), ps(f.o.as_ptr()), ps(f.lo.as_ptr()), ps(f.hi.as_ptr()));
            let d = _mm512_set1_ps(absmax);
            let (one, cells, bias) = (_mm512_set1_epi32(1), _mm512_set1_epi32(127), _mm512_set1_epi32(96));
            let (magnitude, sign) = (_mm512_set1_epi32(0x7fff_ffff), _mm512_set1_epi32(i32::MIN));
            let delta = _mm512_set1_ps(Q8_FAST_DELTA);
            // stage one: y, its segment, and (unsigned lanes) its sign mask;
            // a NaN `y` takes some segment, and stage two sends it to the table
            // (a macro, not a closure: a closure not inlined would be
            // compiled without the backend's target features; and AVX-512F
            // intrinsics only, the one feature the entry enables: another's
            // would be a call per vector)
            macro_rules! stage1 {
                ($p:expr) => {{
                    let p: *const f32 = $p;
                    let y = _mm512_div_ps(_mm512_loadu_ps(p), d);
                    let yb = _mm512_castps_si512(y);
                    let neg = _mm512_test_epi32_mask(yb, sign);
                    // the cell: min(max(exponent, 96), 127), of which the
                    // permutes read the low five bits, `exponent - 96`
                    let e = _mm512_srli_epi32::<23>(_mm512_and_si512(yb, magnitude));
                    let c = _mm512_min_epu32(_mm512_max_epu32(e, bias), cells);
                    let (bnd, first) = if SIGNED {
                        (
                            _mm512_mask_blend_ps(
                                neg,
                                _mm512_permutex2var_ps(bnd_p[0], c, bnd_p[1]),
                                _mm512_permutex2var_ps(bnd_n[0], c, bnd_n[1]),
                            ),
                            _mm512_mask_blend_epi32(
                                neg,
                                _mm512_permutex2var_epi32(seg_p[0], c, seg_p[1]),
                                _mm512_permutex2var_epi32(seg_n[0], c, seg_n[1]),
                            ),
                        )
                    } else {
                        (
                            _mm512_permutex2var_ps(bnd_p[0], c, bnd_p[1]),
                            _mm512_permutex2var_epi32(seg_p[0], c, seg_p[1]),
                        )
                    };
                    let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(y, bnd);
                    (y, _mm512_mask_add_epi32(first, up, first, one), if SIGNED { 0 } else { neg })
                }};
            }
            // stage two: the code of the vector at `i` from its stage one
            macro_rules! stage2 {
                ($now:expr, $i:expr) => {{
                    let ((y, g, neg), i): ((__m512, __m512i, __mmask16), usize) = ($now, $i);
                    let t = _mm512_fmadd_ps(
                        y,
                        _mm512_permutex2var_ps(sl[0], g, sl[1]),
                        _mm512_permutex2var_ps(ol[0], g, ol[1]),
                    );
                    // the clamp's bound first: a NaN `t` stays NaN
                    let t = _mm512_max_ps(_mm512_permutex2var_ps(lo[0], g, lo[1]), t);
                    let t = _mm512_min_ps(_mm512_permutex2var_ps(hi[0], g, hi[1]), t);
                    let r =
                        _mm512_sub_ps(t, _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t));
                    let off = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r), magnitude));
                    // ambiguous, or NaN (unordered compares true)
                    if _mm512_cmp_ps_mask::<_CMP_NGE_UQ>(off, delta) | neg != 0 {
                        Avx512(y).store_codes(lut.as_ptr(), codes.add(i));
                    } else {
                        let k = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
                        _mm_storeu_si128(codes.add(i).cast(), _mm512_cvtepi32_epi8(k));
                    }
                }};
            }
            // n >= 16: stage one of the next vector before stage two of this one
            let mut now = stage1!(src);
            let mut i = 0;
            while i + 32 <= n {
                let next = stage1!(src.add(i + 16));
                stage2!(now, i);
                now = next;
                i += 16;
            }
            stage2!(now, i);
            i + 16
        }
    }

    /// Whether this CPU has AVX-512 VBMI and BW, which [`dequantize_vbmi`]
    /// needs (std caches the detection).
    #[inline(always)]
    pub(super) fn vbmi_available() -> bool {
        std::arch::is_x86_feature_detected!("avx512vbmi") && std::arch::is_x86_feature_detected!("avx512bw")
    }

    /// `code[codes[i]] * scale` for the whole 64-code runs of `n`, from the
    /// table's four byte planes (`planes[b][c]`: byte `b` of `code[c]`) held in
    /// 16 registers: per 64 codes, a byte shuffle that puts the codes in the
    /// order the interleave below writes them, two two-register byte permutes
    /// and a blend on bit 7 per plane, the bytes interleaved into 64 floats, a
    /// multiply per 16. Returns how many were written (a multiple of 64).
    ///
    /// # Safety
    /// `codes..codes + n` readable, `dst..dst + n` writable, and the CPU has
    /// AVX-512F, BW and VBMI ([`vbmi_available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn dequantize_vbmi(
        planes: &[[u8; 256]; 4],
        codes: *const u8,
        scale: f32,
        dst: *mut f32,
        n: usize,
    ) -> usize {
        // The interleave leaves output float 16k + 4l + j (k, l, j < 4) at byte
        // position 16l + 4k + j of the codes: swap k and l first.
        let order: [u8; 64] = core::array::from_fn(|p| ((p >> 2 & 3) << 4 | (p >> 4 & 3) << 2 | (p & 3)) as u8);
        // SAFETY: the plane loads read 4 x 256 bytes of `planes`; the caller
        // guarantees `n` readable codes and `n` writable floats, and i + 64 <= n
        // below; byte permutes read only their registers; the features are
        // the caller's promise.
        unsafe {
            let pl: [[__m512i; 4]; 4] = core::array::from_fn(|b| {
                core::array::from_fn(|k| _mm512_loadu_si512(planes[b].as_ptr().add(64 * k).cast()))
            });
            let order = _mm512_loadu_si512(order.as_ptr().cast());
            let s = _mm512_set1_ps(scale);
            let mut i = 0;
            while i + 64 <= n {
                let idx = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes.add(i).cast()));
                let high = _mm512_movepi8_mask(idx);
                let b: [__m512i; 4] = core::array::from_fn(|b| {
                    let low = _mm512_permutex2var_epi8(pl[b][0], idx, pl[b][1]);
                    let top = _mm512_permutex2var_epi8(pl[b][2], idx, pl[b][3]);
                    _mm512_mask_blend_epi8(high, low, top)
                });
                let (l01, h01) = (_mm512_unpacklo_epi8(b[0], b[1]), _mm512_unpackhi_epi8(b[0], b[1]));
                let (l23, h23) = (_mm512_unpacklo_epi8(b[2], b[3]), _mm512_unpackhi_epi8(b[2], b[3]));
                let w = [
                    _mm512_unpacklo_epi16(l01, l23),
                    _mm512_unpackhi_epi16(l01, l23),
                    _mm512_unpacklo_epi16(h01, h23),
                    _mm512_unpackhi_epi16(h01, h23),
                ];
                for (k, w) in w.into_iter().enumerate() {
                    _mm512_storeu_ps(dst.add(i + 16 * k), _mm512_mul_ps(_mm512_castsi512_ps(w), s));
                }
                i += 64;
            }
            i
        }
    }

    impl Avx2Cap {
        /// The token, where runtime detection found the features.
        #[inline]
        pub(super) fn detect() -> Option<Avx2Cap> {
            Backend::Avx2.is_available().then_some(Avx2Cap(()))
        }
        /// Runs `op` on [`Avx2`] lanes, compiled with the features enabled.
        #[inline]
        pub(super) fn run<O: LaneOp>(self, op: O) -> O::Out {
            #[target_feature(enable = "avx2,fma,f16c")]
            fn entry<O: LaneOp>(op: O) -> O::Out {
                op.run::<Avx2>()
            }
            // SAFETY: `self` exists, so detection found AVX2, FMA and F16C.
            unsafe { entry(op) }
        }
    }

    impl Avx512Cap {
        /// The token, where runtime detection found the feature.
        #[inline]
        pub(super) fn detect() -> Option<Avx512Cap> {
            Backend::Avx512.is_available().then_some(Avx512Cap(()))
        }
        /// Runs `op` on [`Avx512`] lanes, compiled with the feature enabled.
        #[inline]
        pub(super) fn run<O: LaneOp>(self, op: O) -> O::Out {
            #[target_feature(enable = "avx512f")]
            fn entry<O: LaneOp>(op: O) -> O::Out {
                op.run::<Avx512>()
            }
            // SAFETY: `self` exists, so detection found AVX-512F.
            unsafe { entry(op) }
        }
    }

    // SAFETY (all intrinsic calls in this module): `Avx2` values exist only in
    // code reached from `Avx2Cap::run`, a `#[target_feature(enable = "avx2,fma,f16c")]`
    // entry that needs a token only runtime detection makes (the lane tests
    // below reach them the same way); likewise `Avx512` only under
    // `Avx512Cap::run`.
    impl_ops!(
        Avx2,
        |a: Avx2, b: Avx2| Avx2(unsafe { _mm256_add_ps(a.0, b.0) }),
        |a: Avx2, b: Avx2| Avx2(unsafe { _mm256_sub_ps(a.0, b.0) }),
        |a: Avx2, b: Avx2| Avx2(unsafe { _mm256_mul_ps(a.0, b.0) }),
        |a: Avx2, b: Avx2| Avx2(unsafe { _mm256_div_ps(a.0, b.0) })
    );
    impl_ops!(
        Avx512,
        |a: Avx512, b: Avx512| Avx512(unsafe { _mm512_add_ps(a.0, b.0) }),
        |a: Avx512, b: Avx512| Avx512(unsafe { _mm512_sub_ps(a.0, b.0) }),
        |a: Avx512, b: Avx512| Avx512(unsafe { _mm512_mul_ps(a.0, b.0) }),
        |a: Avx512, b: Avx512| Avx512(unsafe { _mm512_div_ps(a.0, b.0) })
    );

    /// Stores the low 16 bits of each of 8 lanes (all `<= 0xffff`).
    ///
    /// # Safety
    /// `ptr..ptr + 8` writable; AVX2 available.
    #[inline(always)]
    unsafe fn store_u16x8(ptr: *mut u16, r: __m256i) {
        // SAFETY: per the function's contract. `packus` packs within each
        // 128-bit half, so qwords 0 and 2 hold lanes 0-3 and 4-7.
        unsafe {
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r));
            _mm_storeu_si128(ptr.cast(), _mm256_castsi256_si128(packed));
        }
    }

    impl Neg for Avx2 {
        type Output = Self;
        #[inline(always)]
        fn neg(self) -> Self {
            // SAFETY: see the module comment (AVX detected).
            Avx2(unsafe { _mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)) })
        }
    }
    impl Neg for Avx512 {
        type Output = Self;
        #[inline(always)]
        fn neg(self) -> Self {
            // SAFETY: see the module comment (AVX-512F detected).
            Avx512(unsafe {
                _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(self.0), _mm512_set1_epi32(i32::MIN)))
            })
        }
    }

    impl F32Vec for Avx2 {
        #[inline(always)]
        fn prefetch(ptr: *const u8) {
            // SAFETY: a prefetch is a hint: it reads nothing architecturally
            // and never faults, whatever the address (SSE, always on x86-64).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.cast()) }
        }
        const LANES: usize = 8;
        #[inline(always)]
        fn splat(x: f32) -> Self {
            // SAFETY: see the module comment.
            Avx2(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(ptr: *const f32) -> Self {
            // SAFETY: caller guarantees 8 readable f32; `loadu` needs no alignment.
            Avx2(unsafe { _mm256_loadu_ps(ptr) })
        }
        #[inline(always)]
        unsafe fn store(self, ptr: *mut f32) {
            // SAFETY: caller guarantees 8 writable f32; `storeu` needs no alignment.
            unsafe { _mm256_storeu_ps(ptr, self.0) }
        }
        #[inline(always)]
        fn sqrt(self) -> Self {
            // SAFETY: see the module comment.
            Avx2(unsafe { _mm256_sqrt_ps(self.0) })
        }
        #[inline(always)]
        fn rsqrt14(self) -> Self {
            // AVX2 has no `vrsqrt14ps`.
            rsqrt14_lanewise(self)
        }
        #[inline(always)]
        fn abs(self) -> Self {
            // SAFETY: see the module comment.
            Avx2(unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0) })
        }
        #[inline(always)]
        fn max_nan(self, other: Self) -> Self {
            // SAFETY: see the module comment. `max_ps(a, b)` returns `b` when
            // either is NaN; blending `a` back where `a` is NaN propagates both.
            unsafe {
                let m = _mm256_max_ps(self.0, other.0);
                let a_nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0);
                Avx2(_mm256_blendv_ps(m, self.0, a_nan))
            }
        }
        #[inline(always)]
        fn div_or_zero(self, den: Self) -> Self {
            // SAFETY: see the module comment.
            unsafe {
                let zero = _mm256_setzero_ps();
                let is_zero = _mm256_cmp_ps::<_CMP_EQ_OQ>(den.0, zero);
                Avx2(_mm256_blendv_ps(_mm256_div_ps(self.0, den.0), zero, is_zero))
            }
        }
        #[inline(always)]
        fn any_non_finite(self) -> bool {
            // SAFETY: see the module comment. x - x is 0 for finite x, NaN otherwise.
            unsafe {
                let d = _mm256_sub_ps(self.0, self.0);
                _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(d, d)) != 0
            }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            // SAFETY: see the module comment (FMA is detected with AVX2).
            Avx2(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        fn sign(self) -> Self {
            // SAFETY: see the module comment.
            unsafe {
                let (zero, one) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0));
                let pos = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(self.0, zero), one);
                let neg = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(self.0, zero), one);
                Avx2(_mm256_sub_ps(pos, neg))
            }
        }
        #[inline(always)]
        fn lt_select(self, other: Self, a: Self, b: Self) -> Self {
            // SAFETY: see the module comment.
            unsafe { Avx2(_mm256_blendv_ps(b.0, a.0, _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, other.0))) }
        }
        #[inline(always)]
        fn min_nan(self, other: Self) -> Self {
            // SAFETY: see the module comment; the NaN handling of `max_nan`.
            unsafe {
                let m = _mm256_min_ps(self.0, other.0);
                let a_nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0);
                Avx2(_mm256_blendv_ps(m, self.0, a_nan))
            }
        }
        #[inline(always)]
        unsafe fn load_bf16(ptr: *const u16) -> Self {
            // SAFETY: the caller guarantees 8 readable u16 (16 bytes, `loadu`
            // needs no alignment); AVX2 per the module comment.
            unsafe {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(ptr.cast()));
                Avx2(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(h)))
            }
        }
        #[inline(always)]
        unsafe fn store_bf16(self, ptr: *mut u16) {
            // SAFETY: the caller guarantees 8 writable u16; AVX2 per the
            // module comment. `f32_to_bf16` in integer lanes: add 0x7fff plus
            // the kept lowest bit, shift, NaN lanes replaced by 0x7fc0.
            // NaN lanes become 0x7fc0_0000 first, which the rounding maps to
            // 0x7fc0 (a select on the input, which the compiler keeps ahead
            // of the narrowing).
            unsafe {
                let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0);
                let x = _mm256_blendv_ps(self.0, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0_0000)), nan);
                let b = _mm256_castps_si256(x);
                let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
                let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))));
                store_u16x8(ptr, r);
            }
        }
        #[inline(always)]
        unsafe fn store_bf16_stochastic(self, ptr: *mut u16, lo: u32, hi: u32) {
            // SAFETY: the caller guarantees 8 writable u16; AVX2 per the
            // module comment. `stream_bits` and the stochastic narrowing in
            // integer lanes (wrapping 32-bit adds and multiplies, as the
            // scalar's), NaN lanes replaced by 0x7fc0 after.
            unsafe {
                let fmix = |h: __m256i| {
                    let h = _mm256_xor_si256(h, _mm256_srli_epi32::<16>(h));
                    let h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x85eb_ca6bu32 as i32));
                    let h = _mm256_xor_si256(h, _mm256_srli_epi32::<13>(h));
                    let h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0xc2b2_ae35u32 as i32));
                    _mm256_xor_si256(h, _mm256_srli_epi32::<16>(h))
                };
                let index = _mm256_xor_si256(_mm256_set1_epi32(lo as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                let h = fmix(_mm256_xor_si256(fmix(index), _mm256_set1_epi32(hi as i32)));
                let b = _mm256_castps_si256(self.0);
                let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, _mm256_srli_epi32::<16>(h)));
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0));
                store_u16x8(ptr, _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan));
            }
        }
        #[inline(always)]
        unsafe fn load_f16(ptr: *const u16) -> Self {
            // SAFETY: the caller guarantees 8 readable u16; F16C is part of
            // the AVX2 backend's detected features. `vcvtph2ps` is exact and
            // quiets a signalling NaN as `f16_to_f32` does.
            unsafe { Avx2(_mm256_cvtph_ps(_mm_loadu_si128(ptr.cast()))) }
        }
        #[inline(always)]
        unsafe fn store_f16(self, ptr: *mut u16) {
            // SAFETY: the caller guarantees 8 writable u16; F16C detected.
            // `vcvtps2ph` rounds to nearest even like `f32_to_f16`; NaN lanes
            // are first made the positive quiet NaN, which it narrows to
            // `0x7e00`, the scalar rule's NaN.
            unsafe {
                let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0);
                let canon = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0_0000));
                let x = _mm256_blendv_ps(self.0, canon, nan);
                _mm_storeu_si128(ptr.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            }
        }
        #[inline(always)]
        unsafe fn lookup(table: *const f32, codes: *const u8) -> Self {
            // SAFETY: the caller guarantees 8 readable codes and a 256-entry
            // table; every index is a byte, so the gather stays inside it.
            unsafe {
                let idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.cast()));
                Avx2(_mm256_i32gather_ps::<4>(table, idx))
            }
        }
        #[inline(always)]
        unsafe fn store_codes(self, lut: *const u32, out: *mut u8) {
            // SAFETY: the caller guarantees 8 writable bytes and a 65536-entry
            // table; every index is a key's top 16 bits. `q8_code` in lanes.
            unsafe {
                let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0);
                let b = _mm256_castps_si256(_mm256_blendv_ps(self.0, _mm256_setzero_ps(), nan));
                let key = _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32::<31>(b), _mm256_set1_epi32(i32::MIN)));
                let e = _mm256_i32gather_epi32::<4>(lut.cast(), _mm256_srli_epi32::<16>(key));
                let low = _mm256_and_si256(key, _mm256_set1_epi32(0xffff));
                let at = _mm256_and_si256(e, _mm256_set1_epi32(0x1_ffff));
                // -1 where low < at, else 0: the code is top byte + 1 + that
                let before = _mm256_cmpgt_epi32(at, low);
                let code = _mm256_add_epi32(_mm256_srli_epi32::<24>(e), _mm256_add_epi32(before, _mm256_set1_epi32(1)));
                let w = _mm256_packus_epi32(code, code);
                let bytes = _mm256_packus_epi16(w, w);
                let both = _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256::<1>(bytes));
                _mm_storel_epi64(out.cast(), both);
            }
        }
        #[inline(always)]
        unsafe fn add_squares_f64(self, acc: *mut f64) {
            // SAFETY: the caller guarantees 8 readable and writable f64;
            // the intrinsics run under the module's detection contract.
            unsafe {
                let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(self.0));
                let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(self.0));
                _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), _mm256_mul_pd(lo, lo)));
                let acc = acc.add(4);
                _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), _mm256_mul_pd(hi, hi)));
            }
        }
    }

    impl F32Vec for Avx512 {
        #[inline(always)]
        fn prefetch(ptr: *const u8) {
            // SAFETY: a prefetch is a hint: it reads nothing architecturally
            // and never faults, whatever the address (SSE, always on x86-64).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.cast()) }
        }
        const LANES: usize = 16;
        #[inline(always)]
        fn splat(x: f32) -> Self {
            // SAFETY: see the module comment.
            Avx512(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(ptr: *const f32) -> Self {
            // SAFETY: caller guarantees 16 readable f32; `loadu` needs no alignment.
            Avx512(unsafe { _mm512_loadu_ps(ptr) })
        }
        #[inline(always)]
        unsafe fn store(self, ptr: *mut f32) {
            // SAFETY: caller guarantees 16 writable f32; `storeu` needs no alignment.
            unsafe { _mm512_storeu_ps(ptr, self.0) }
        }
        #[inline(always)]
        fn sqrt(self) -> Self {
            // SAFETY: see the module comment.
            Avx512(unsafe { _mm512_sqrt_ps(self.0) })
        }
        #[inline(always)]
        fn rsqrt14(self) -> Self {
            if rsqrt14_instruction_is_reference() {
                // SAFETY: see the module comment (AVX-512F detected).
                Avx512(unsafe { _mm512_rsqrt14_ps(self.0) })
            } else {
                rsqrt14_lanewise(self)
            }
        }
        #[inline(always)]
        fn abs(self) -> Self {
            // SAFETY: see the module comment.
            Avx512(unsafe { _mm512_abs_ps(self.0) })
        }
        #[inline(always)]
        fn max_nan(self, other: Self) -> Self {
            // SAFETY: see the module comment; same NaN handling as `Avx2::max_nan`.
            unsafe {
                let m = _mm512_max_ps(self.0, other.0);
                let a_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0);
                Avx512(_mm512_mask_blend_ps(a_nan, m, self.0))
            }
        }
        #[inline(always)]
        fn div_or_zero(self, den: Self) -> Self {
            // SAFETY: see the module comment.
            unsafe {
                let zero = _mm512_setzero_ps();
                let is_zero = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(den.0, zero);
                Avx512(_mm512_mask_blend_ps(is_zero, _mm512_div_ps(self.0, den.0), zero))
            }
        }
        #[inline(always)]
        fn any_non_finite(self) -> bool {
            // SAFETY: see the module comment.
            unsafe {
                let d = _mm512_sub_ps(self.0, self.0);
                _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(d, d) != 0
            }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            // SAFETY: see the module comment (FMA is part of AVX-512F).
            Avx512(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        fn sign(self) -> Self {
            // SAFETY: see the module comment.
            unsafe {
                let (zero, one) = (_mm512_setzero_ps(), _mm512_set1_ps(1.0));
                let pos = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, zero), one);
                let neg = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, zero), one);
                Avx512(_mm512_sub_ps(pos, neg))
            }
        }
        #[inline(always)]
        fn lt_select(self, other: Self, a: Self, b: Self) -> Self {
            // SAFETY: see the module comment.
            unsafe { Avx512(_mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, other.0), b.0, a.0)) }
        }
        #[inline(always)]
        fn min_nan(self, other: Self) -> Self {
            // SAFETY: see the module comment; the NaN handling of `max_nan`.
            unsafe {
                let m = _mm512_min_ps(self.0, other.0);
                let a_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0);
                Avx512(_mm512_mask_blend_ps(a_nan, m, self.0))
            }
        }
        #[inline(always)]
        unsafe fn load_bf16(ptr: *const u16) -> Self {
            // SAFETY: the caller guarantees 16 readable u16; AVX-512F per the
            // module comment.
            unsafe {
                let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(ptr.cast()));
                Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(h)))
            }
        }
        #[inline(always)]
        unsafe fn store_bf16(self, ptr: *mut u16) {
            // SAFETY: the caller guarantees 16 writable u16; AVX-512F. The
            // integer rounding of `f32_to_bf16` (not `vcvtneps2bf16`, which
            // flushes subnormals).
            // NaN lanes become 0x7fc0_0000 first, as in the AVX2 lanes.
            unsafe {
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0);
                let x = _mm512_mask_mov_ps(self.0, nan, _mm512_castsi512_ps(_mm512_set1_epi32(0x7fc0_0000)));
                let b = _mm512_castps_si512(x);
                let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
                let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))));
                _mm256_storeu_si256(ptr.cast(), _mm512_cvtepi32_epi16(r));
            }
        }
        #[inline(always)]
        unsafe fn store_bf16_stochastic(self, ptr: *mut u16, lo: u32, hi: u32) {
            // SAFETY: the caller guarantees 16 writable u16; AVX-512F. As the
            // AVX2 lanes, 16 at a time.
            unsafe {
                let fmix = |h: __m512i| {
                    let h = _mm512_xor_si512(h, _mm512_srli_epi32::<16>(h));
                    let h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x85eb_ca6bu32 as i32));
                    let h = _mm512_xor_si512(h, _mm512_srli_epi32::<13>(h));
                    let h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0xc2b2_ae35u32 as i32));
                    _mm512_xor_si512(h, _mm512_srli_epi32::<16>(h))
                };
                let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                let index = _mm512_xor_si512(_mm512_set1_epi32(lo as i32), lanes);
                let h = fmix(_mm512_xor_si512(fmix(index), _mm512_set1_epi32(hi as i32)));
                let b = _mm512_castps_si512(self.0);
                let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_srli_epi32::<16>(h)));
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0);
                let r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
                _mm256_storeu_si256(ptr.cast(), _mm512_cvtepi32_epi16(r));
            }
        }
        #[inline(always)]
        unsafe fn load_f16(ptr: *const u16) -> Self {
            // SAFETY: the caller guarantees 16 readable u16; the conversion is
            // AVX-512F.
            unsafe { Avx512(_mm512_cvtph_ps(_mm256_loadu_si256(ptr.cast()))) }
        }
        #[inline(always)]
        unsafe fn store_f16(self, ptr: *mut u16) {
            // SAFETY: the caller guarantees 16 writable u16; AVX-512F. NaN
            // lanes made the positive quiet NaN first, as in the AVX2 lanes.
            unsafe {
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0);
                let canon = _mm512_set1_ps(f32::from_bits(0x7fc0_0000));
                let x = _mm512_mask_mov_ps(self.0, nan, canon);
                _mm256_storeu_si256(ptr.cast(), _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            }
        }
        #[inline(always)]
        unsafe fn lookup(table: *const f32, codes: *const u8) -> Self {
            // SAFETY: the caller guarantees 16 readable codes and a 256-entry
            // table; every index is a byte.
            unsafe {
                let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.cast()));
                Avx512(_mm512_i32gather_ps::<4>(idx, table))
            }
        }
        #[inline(always)]
        unsafe fn abs_max_lanes(src: *const f32, n: usize) -> (f32, usize) {
            // With the sign cleared, floats' bit patterns order as their
            // magnitudes do, every NaN above infinity: an unsigned integer
            // maximum, and one reduction at the end.
            // SAFETY: the caller guarantees `n` readable floats, and
            // i + 16 <= n below; AVX-512F under the module's detection contract.
            unsafe {
                let magnitude = _mm512_set1_epi32(0x7fff_ffff);
                let mut acc = _mm512_setzero_si512();
                let mut i = 0;
                while i + 16 <= n {
                    acc = _mm512_max_epu32(acc, _mm512_and_si512(_mm512_loadu_si512(src.add(i).cast()), magnitude));
                    i += 16;
                }
                (f32::from_bits(_mm512_reduce_max_epu32(acc)), i)
            }
        }
        #[inline(always)]
        unsafe fn dequantize_lanes(table: &Q8Table, codes: *const u8, scale: f32, dst: *mut f32, n: usize) -> usize {
            // 64 codes at a time by byte permutes where the CPU has VBMI (a
            // call per run: those lanes need features this entry lacks), the
            // rest by the `f32` permute tree.
            let done = if vbmi_available() {
                // SAFETY: forwarded from the caller; VBMI and BW just detected.
                unsafe { dequantize_vbmi(&table.planes, codes, scale, dst, n) }
            } else {
                0
            };
            // SAFETY: `done <= n`, so the rest of both ranges is the caller's.
            done + unsafe { dequantize_tree(&table.code, codes.add(done), scale, dst.add(done), n - done) }
        }
        #[inline(always)]
        unsafe fn store_codes(self, lut: *const u32, out: *mut u8) {
            // SAFETY: the caller guarantees 16 writable bytes and a
            // 65536-entry table; every index is a key's top 16 bits.
            unsafe {
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0);
                let b = _mm512_castps_si512(_mm512_mask_mov_ps(self.0, nan, _mm512_setzero_ps()));
                let key = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32::<31>(b), _mm512_set1_epi32(i32::MIN)));
                let e = _mm512_i32gather_epi32::<4>(_mm512_srli_epi32::<16>(key), lut.cast());
                let low = _mm512_and_si512(key, _mm512_set1_epi32(0xffff));
                let at = _mm512_and_si512(e, _mm512_set1_epi32(0x1_ffff));
                let past = _mm512_cmpge_epi32_mask(low, at);
                let top = _mm512_srli_epi32::<24>(e);
                let code = _mm512_mask_add_epi32(top, past, top, _mm512_set1_epi32(1));
                _mm_storeu_si128(out.cast(), _mm512_cvtepi32_epi8(code));
            }
        }
        #[inline(always)]
        unsafe fn quantize_lanes(q: &Q8Quantizer, src: *const f32, absmax: f32, codes: *mut u8, n: usize) -> usize {
            let Some(f) = q.fast.as_deref() else {
                // SAFETY: forwarded from the caller.
                return unsafe { quantize_lanes_with_table::<Self>(&q.lut, src, absmax, codes, n) };
            };
            // SAFETY: forwarded from the caller.
            unsafe {
                if f.positive {
                    quantize_fast::<false>(f, &q.lut, src, absmax, codes, n)
                } else {
                    quantize_fast::<true>(f, &q.lut, src, absmax, codes, n)
                }
            }
        }
        #[inline(always)]
        unsafe fn add_squares_f64(self, acc: *mut f64) {
            // SAFETY: the caller guarantees 16 readable and writable f64;
            // the intrinsics run under the module's detection contract.
            unsafe {
                let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(self.0));
                let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0))));
                _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_mul_pd(lo, lo)));
                let acc = acc.add(8);
                _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_mul_pd(hi, hi)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every lane operation of every backend this CPU has, lane by lane,
    //! against `f32`'s own operation (the scalar reference) over edge values
    //! (signed zeros, infinities, NaN, subnormals, extremes) and random ones.

    use super::*;
    use crate::Backend;

    fn edge_values() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE / 8.0,
            -f32::MIN_POSITIVE / 3.0,
            f32::from_bits(1),
            f32::MAX,
            f32::MIN,
            1e-30,
            3e38,
            0.5,
            2.0,
        ];
        let mut x = 0x2545_F491_u32;
        for _ in 0..110 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            v.push(f32::from_bits(x));
        }
        v
    }

    /// torch.sign as torch's CPU kernel computes it (checked against torch
    /// 2.15: `sign([-0., 0., nan, -inf, 1e-45, -3.]) = [0, 0, 0, -1, 1, -1]`,
    /// all zeros positive).
    fn torch_sign(x: f32, _: f32) -> f32 {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    }

    fn same(a: f32, b: f32) -> bool {
        (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
    }

    /// `op` on `V` lanes equals `op` on `f32`, for every pair of values.
    fn lanes_match<V: F32Vec>(name: &str, op: impl Fn(V, V) -> V, op1: impl Fn(f32, f32) -> f32) {
        let vals = edge_values();
        let mut a = vec![0f32; V::LANES];
        let mut b = vec![0f32; V::LANES];
        let mut out = vec![0f32; V::LANES];
        for (i, &x) in vals.iter().enumerate() {
            for (j, &y) in vals.iter().enumerate() {
                let lane = (i + j) % V::LANES;
                // Lane `lane` holds the pair; the other lanes hold other pairs.
                for l in 0..V::LANES {
                    a[l] = vals[(i + l) % vals.len()];
                    b[l] = vals[(j + 3 * l) % vals.len()];
                }
                a[lane] = x;
                b[lane] = y;
                // SAFETY: `a`, `b` and `out` hold LANES values each.
                unsafe { op(V::load(a.as_ptr()), V::load(b.as_ptr())).store(out.as_mut_ptr()) };
                for l in 0..V::LANES {
                    let want = op1(a[l], b[l]);
                    assert!(same(out[l], want), "{name} lane {l}: ({}, {}) gave {} want {}", a[l], b[l], out[l], want);
                }
            }
        }
    }

    /// The storage conversions and 8-bit lookups of `V`, bit for bit against
    /// the scalar reference: every bf16 and f16 pattern widened, edge values
    /// and a stride through every f32 narrowed, every code looked up.
    fn check_conversions<V: F32Vec>() {
        let n = V::LANES;
        for start in (0..=u16::MAX as usize + 1 - n).step_by(n) {
            let h: Vec<u16> = (start..start + n).map(|x| x as u16).collect();
            let mut out = vec![0f32; n];
            // SAFETY: `h` and `out` hold LANES values.
            unsafe { V::load_bf16(h.as_ptr()).store(out.as_mut_ptr()) };
            for (x, &y) in h.iter().zip(&out) {
                assert_eq!(y.to_bits(), bf16_to_f32(*x).to_bits(), "load_bf16 {x:#06x}");
            }
            // SAFETY: as above.
            unsafe { V::load_f16(h.as_ptr()).store(out.as_mut_ptr()) };
            for (x, &y) in h.iter().zip(&out) {
                assert_eq!(y.to_bits(), f16_to_f32(*x).to_bits(), "load_f16 {x:#06x}");
            }
        }
        let mut xs = edge_values();
        xs.extend((0..=u32::MAX).step_by(65_537).map(f32::from_bits));
        // f16's rounding boundaries and subnormals, and payload NaNs
        xs.extend([65_519.0, 65_520.0, 65_504.0, 5.960_464_5e-8, 2.980_232_2e-8, 2.980_232_3e-8, 6.103_515_6e-5]);
        xs.extend([0x7fc0_0001u32, 0xffe0_0000, 0x7f80_0001, 0x7fa0_0000, 0xff80_0001].map(f32::from_bits));
        while !xs.len().is_multiple_of(n) {
            xs.push(0.5);
        }
        for chunk in xs.chunks(n) {
            // SAFETY: `chunk` holds LANES values.
            let v = unsafe { V::load(chunk.as_ptr()) };
            let mut h = vec![0u16; n];
            // SAFETY: `h` holds LANES values.
            unsafe { v.store_bf16(h.as_mut_ptr()) };
            for (x, &y) in chunk.iter().zip(&h) {
                assert_eq!(y, f32_to_bf16(*x), "store_bf16 {:#010x}", x.to_bits());
            }
            // SAFETY: as above.
            unsafe { v.store_f16(h.as_mut_ptr()) };
            for (x, &y) in chunk.iter().zip(&h) {
                assert_eq!(y, f32_to_f16(*x), "store_f16 {:#010x}", x.to_bits());
            }
            // stochastic: lane l hashes lo ^ l (lo a multiple of LANES), for
            // index halves that exercise the wrapping multiplies
            for (k, &(lo, hi)) in
                [(0u32, 0u32), (0xffff_fff0, 0xffff_ffff), (0x1234_5670, 0x9e37_79b9)].iter().enumerate()
            {
                let lo = lo.wrapping_mul(k as u32 + 1) & !(n as u32 - 1);
                // SAFETY: as above.
                unsafe { v.store_bf16_stochastic(h.as_mut_ptr(), lo, hi) };
                for (l, (x, &y)) in chunk.iter().zip(&h).enumerate() {
                    let want = f32_to_bf16_stochastic_bits(*x, stream_bits(lo ^ l as u32, hi));
                    assert_eq!(y, want, "store_bf16_stochastic {:#010x}, lo {lo:#x}, hi {hi:#x}", x.to_bits());
                }
            }
        }
        let table: Vec<f32> = (0..256).map(|i| (i as f32 - 127.5) / 3.0).collect();
        let codes: Vec<u8> = (0..=255u8).rev().collect();
        for chunk in codes.chunks(n) {
            let mut out = vec![0f32; n];
            // SAFETY: `chunk` and `out` hold LANES values, `table` 256.
            unsafe { V::lookup(table.as_ptr(), chunk.as_ptr()).store(out.as_mut_ptr()) };
            for (&c, &y) in chunk.iter().zip(&out) {
                assert_eq!(y.to_bits(), table[usize::from(c)].to_bits());
            }
        }
        // dequantize_lanes: every code, lengths that end mid-vector and
        // mid-run of 64 (AVX-512 with VBMI takes runs of 64 by bytes)
        let table: [f32; 256] = core::array::from_fn(|i| (i as f32 - 127.5) / 3.0);
        let q8_table = Q8Table::new(table);
        let codes: Vec<u8> = (0..300u32).map(|i| (i * 89 % 256) as u8).collect();
        for (len, scale) in [(300, 0.37f32), (256, -3.0e-5), (17, 1.0e30), (5, 7.0), (127, 1.5)] {
            let mut out = vec![f32::NAN; len];
            // SAFETY: `codes` holds 300 >= len codes and `out` len floats.
            let done = unsafe { V::dequantize_lanes(&q8_table, codes.as_ptr(), scale, out.as_mut_ptr(), len) };
            assert_eq!(done, len - len % n, "dequantize_lanes covers whole vectors");
            for (&c, &y) in codes.iter().zip(&out[..done]) {
                assert_eq!(y.to_bits(), (table[usize::from(c)] * scale).to_bits(), "dequantize_lanes code {c}");
            }
            assert!(out[done..].iter().all(|y| y.is_nan()), "dequantize_lanes wrote past its vectors");
        }
        // abs_max_lanes: the largest magnitude of the whole vectors (NaN if
        // one is NaN) over the edge values, with and without the NaNs
        let finite: Vec<f32> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
        for vals in [&xs[..], &finite[..], &finite[..3], &[-0.0; 40][..], &[][..]] {
            // SAFETY: `vals` holds `vals.len()` floats.
            let (m, read) = unsafe { V::abs_max_lanes(vals.as_ptr(), vals.len()) };
            assert_eq!(read, vals.len() - vals.len() % n, "abs_max_lanes reads whole vectors");
            let want = vals[..read].iter().fold(0.0f32, |m, &x| m.max_nan(x.abs()));
            assert!(same(m, want), "abs_max_lanes {m:e} against {want:e}");
        }
        // store_codes against q8_code over a table with varied entries
        // (as in a real map's table, code 255 has no jump inside its bucket)
        let lut: Vec<u32> = (0..1u32 << 16)
            .map(|k| {
                let top = k.wrapping_mul(2_654_435_761) >> 8 & 0xff;
                top << 24 | if top == 255 { 0x1_0000 } else { (k * 7919) % 0x1_0001 }
            })
            .collect();
        for chunk in xs.chunks(n) {
            // SAFETY: `chunk` holds LANES values.
            let v = unsafe { V::load(chunk.as_ptr()) };
            let mut out = vec![0u8; n];
            // SAFETY: `out` holds LANES bytes and `lut` 65536 entries.
            unsafe { v.store_codes(lut.as_ptr(), out.as_mut_ptr()) };
            for (&x, &y) in chunk.iter().zip(&out) {
                assert_eq!(y, q8_code(&lut, x), "store_codes {:#010x}", x.to_bits());
            }
        }
    }

    fn check_backend<V: F32Vec>() {
        check_conversions::<V>();
        lanes_match::<V>("max_nan", |a, b| a.max_nan(b), |a, b| a.max_nan(b));
        lanes_match::<V>("div_or_zero", |a, b| a.div_or_zero(b), |a, b| if b == 0.0 { 0.0 } else { a / b });
        lanes_match::<V>("sqrt", |a, _| a.sqrt(), |a, _| a.sqrt());
        lanes_match::<V>("rsqrt14", |a, _| a.rsqrt14(), |a, _| rsqrt14(a));
        lanes_match::<V>("abs", |a, _| a.abs(), |a, _| a.abs());
        lanes_match::<V>("neg", |a, _| -a, |a, _| -a);
        lanes_match::<V>("add", |a, b| a + b, |a, b| a + b);
        lanes_match::<V>("mul", |a, b| a * b, |a, b| a * b);
        lanes_match::<V>("div", |a, b| a / b, |a, b| a / b);
        lanes_match::<V>("min_nan", |a, b| a.min_nan(b), |a, b| a.min_nan(b));
        lanes_match::<V>("sign", |a, _| a.sign(), torch_sign);
        lanes_match::<V>(
            "lt_select",
            |a, b| a.lt_select(b, V::splat(1.5), a - b),
            |a, b| if a < b { 1.5 } else { a - b },
        );
        // Fused multiply-add: every pair with every third value as addend,
        // against `f32::mul_add` (one rounding).
        let vals = edge_values();
        for &c in vals.iter().step_by(3) {
            lanes_match::<V>("mul_add", |a, b| a.mul_add(b, V::splat(c)), |a, b| f32::mul_add(a, b, c));
        }
        // The fused form differs from two roundings: 1 + 2^-23 squared minus the
        // rounded square keeps its last term only when fused.
        let x = 1.0 + f32::EPSILON;
        let fused = V::splat(x).mul_add(V::splat(x), V::splat(-(x * x)));
        let mut out = vec![0f32; V::LANES];
        // SAFETY: `out` holds LANES values.
        unsafe { fused.store(out.as_mut_ptr()) };
        assert!(out.iter().all(|&y| y == f32::EPSILON * f32::EPSILON), "mul_add is not fused: {out:?}");
        // add_squares_f64: lane l into accumulator l, in f64, against the
        // scalar definition, over every edge value.
        for chunk in vals.chunks(V::LANES).filter(|c| c.len() == V::LANES) {
            let mut acc: Vec<f64> = (0..V::LANES).map(|l| 0.1 * l as f64 - 0.3).collect();
            let mut want = acc.clone();
            // SAFETY: `chunk` holds LANES f32 and `acc` LANES f64.
            unsafe { V::load(chunk.as_ptr()).add_squares_f64(acc.as_mut_ptr()) };
            for (w, &x) in want.iter_mut().zip(chunk) {
                let x = f64::from(x);
                *w += x * x;
            }
            for (a, w) in acc.iter().zip(&want) {
                assert!(a.to_bits() == w.to_bits() || (a.is_nan() && w.is_nan()), "add_squares_f64: {a} want {w}");
            }
        }
        // min_nan is torch.minimum: NaN if either operand is.
        assert!(f32::NAN.min_nan(1.0).is_nan() && 1.0f32.min_nan(f32::NAN).is_nan());
        // max_nan is torch.maximum: NaN if either operand is.
        assert!(f32::NAN.max_nan(1.0).is_nan() && 1.0f32.max_nan(f32::NAN).is_nan());
        // any_non_finite: one non-finite lane anywhere is seen; finite lanes never.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for lane in 0..V::LANES {
                let mut a = vec![f32::MAX; V::LANES];
                a[lane] = bad;
                // SAFETY: `a` holds LANES values.
                assert!(unsafe { V::load(a.as_ptr()) }.any_non_finite(), "{bad} in lane {lane}");
            }
        }
        let finite = [f32::MAX, f32::MIN, 0.0, -0.0, f32::from_bits(1), 1.0, -3.5, 1e30];
        let a: Vec<f32> = (0..V::LANES).map(|l| finite[l % finite.len()]).collect();
        // SAFETY: `a` holds LANES values.
        assert!(!unsafe { V::load(a.as_ptr()) }.any_non_finite());
    }

    /// [`check_backend`] as a [`LaneOp`], so the x86 lanes are reached
    /// through [`dispatch`] and its capability tokens like every other use.
    struct Check;
    impl LaneOp for Check {
        type Out = usize;
        fn run<V: F32Vec>(self) -> usize {
            check_backend::<V>();
            V::LANES
        }
    }

    #[test]
    fn scalar_lanes() {
        assert_eq!(dispatch(Backend::Scalar, Check), 1);
    }

    #[test]
    fn wide_lanes_match_scalar() {
        assert_eq!(dispatch(Backend::Wide, Check), 8);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_lanes_match_scalar() {
        if Backend::Avx2.is_available() {
            assert!(x86::Avx2Cap::detect().is_some());
            assert_eq!(dispatch(Backend::Avx2, Check), 8);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_lanes_match_scalar() {
        if Backend::Avx512.is_available() {
            assert!(x86::Avx512Cap::detect().is_some());
            assert_eq!(dispatch(Backend::Avx512, Check), 16);
        }
    }

    /// Both AVX-512 dequantizers, whichever `dequantize_lanes` takes on this
    /// CPU: the `f32` permute tree and (with VBMI) the byte planes, each on
    /// every code at every position of its vector or run.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_dequantizers_give_the_table() {
        if !Backend::Avx512.is_available() {
            return;
        }
        let table = Q8Table::new(core::array::from_fn(|i| {
            f32::from_bits((0x3000_0000 + 0x0031_0b07 * i as u32) | ((i as u32 & 1) << 31))
        }));
        // every code at every position mod 64: position 64b + r holds code
        // 65b + r (mod 256), and b -> 65b is a bijection mod 256
        let codes: Vec<u8> = (0..64 * 256u32).map(|i| ((i + i / 64) % 256) as u8).collect();
        let scale = -0.37f32;
        let check = |out: &[f32], done: usize, what: &str| {
            assert_eq!(done, codes.len(), "{what}: whole vectors");
            for (&c, &y) in codes.iter().zip(out) {
                assert_eq!(y.to_bits(), (table.code[usize::from(c)] * scale).to_bits(), "{what}: code {c}");
            }
        };
        #[target_feature(enable = "avx512f")]
        fn tree(t: &[f32; 256], codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
            // SAFETY: both slices hold `codes.len()` elements; AVX-512F is
            // enabled here and was detected.
            unsafe { x86::dequantize_tree(t, codes.as_ptr(), scale, out.as_mut_ptr(), codes.len()) }
        }
        let mut out = vec![f32::NAN; codes.len()];
        // SAFETY: AVX-512F is available (checked above).
        let done = unsafe { tree(&table.code, &codes, scale, &mut out) };
        check(&out, done, "f32 permute tree");
        if x86::vbmi_available() {
            out.fill(f32::NAN);
            // SAFETY: both hold `codes.len()` elements; VBMI, BW and F detected.
            let done =
                unsafe { x86::dequantize_vbmi(&table.planes, codes.as_ptr(), scale, out.as_mut_ptr(), codes.len()) };
            check(&out, done, "byte planes");
        }
    }

    /// The reference `rsqrt14` against the instruction itself, on every
    /// positive value of the binades `[0.5, 1)`, `[1, 2)` and `[2, 4)` (each
    /// segment and truncation; other exponents only shift the result), every
    /// subnormal, a stride through all other bit patterns and the special
    /// values; and the AVX-512 lanes against the reference on all of them.
    /// Where the once-per-process check finds the instruction equal to the
    /// reference, the lanes run it, so it must equal the reference on every
    /// one of these inputs too; where it does not, the lanes run the
    /// reference. Runs where AVX-512 is available.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rsqrt14_reference_is_the_instruction() {
        use core::arch::x86_64::*;
        struct Map<'a>(&'a [f32], &'a mut [f32]);
        impl LaneOp for Map<'_> {
            type Out = ();
            fn run<V: F32Vec>(self) {
                for (x, y) in self.0.chunks_exact(V::LANES).zip(self.1.chunks_exact_mut(V::LANES)) {
                    // SAFETY: both chunks hold LANES values.
                    unsafe { V::load(x.as_ptr()).rsqrt14().store(y.as_mut_ptr()) }
                }
            }
        }
        #[target_feature(enable = "avx512f")]
        fn instruction(xs: &[f32], out: &mut [f32]) {
            for (x, y) in xs.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                // SAFETY: both chunks hold 16 values; AVX-512F is enabled here.
                unsafe { _mm512_storeu_ps(y.as_mut_ptr(), _mm512_rsqrt14_ps(_mm512_loadu_ps(x.as_ptr()))) }
            }
        }
        if !Backend::Avx512.is_available() {
            return;
        }
        let binades = (126u32..=128).flat_map(|e| (0..1u32 << 23).map(move |f| e << 23 | f));
        let subnormals = 1..1u32 << 23;
        let stride = (0..=u32::MAX).step_by(4099);
        let mut xs: Vec<f32> = binades.chain(subnormals).chain(stride).map(f32::from_bits).collect();
        xs.extend(edge_values());
        xs.resize(xs.len().next_multiple_of(16), 1.0);
        let mut lanes = vec![0f32; xs.len()];
        dispatch(Backend::Avx512, Map(&xs, &mut lanes));
        let bad: Vec<_> = xs.iter().zip(&lanes).filter(|&(&x, &h)| !same(rsqrt14(x), h)).take(5).collect();
        assert!(bad.is_empty(), "AVX-512 lanes differ from rsqrt14 (input, lane): {bad:?}");
        let mut hw = vec![0f32; xs.len()];
        // SAFETY: AVX-512F is available (checked above).
        unsafe { instruction(&xs, &mut hw) };
        let bad: Vec<_> = xs.iter().zip(&hw).filter(|&(&x, &h)| !same(rsqrt14(x), h)).take(5).collect();
        if x86::rsqrt14_instruction_is_reference() {
            assert!(bad.is_empty(), "rsqrt14 differs from vrsqrt14ps (input, instruction): {bad:?}");
        } else {
            eprintln!(
                "this CPU's vrsqrt14ps differs from Intel's reference (e.g. {bad:?}); its lanes take the reference"
            );
        }
    }

    /// A token exists exactly where its backend is available.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tokens_follow_detection() {
        assert_eq!(x86::Avx2Cap::detect().is_some(), Backend::Avx2.is_available());
        assert_eq!(x86::Avx512Cap::detect().is_some(), Backend::Avx512.is_available());
    }
}
