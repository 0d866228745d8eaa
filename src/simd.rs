//! The lane abstraction every optimizer formula is written against.
//!
//! An optimizer's per-element update is written once, generic over [`F32Vec`],
//! and instantiated for plain `f32` (the scalar reference), `wide::f32x8` (the
//! portable path) and, on x86-64, raw AVX2 (`__m256`) and AVX-512 (`__m512`)
//! registers behind runtime-detected `#[target_feature]` drivers.
//!
//! # Numeric contract
//! Every operation here is a single correctly rounded IEEE-754 operation
//! (`+ - * /`, `sqrt`, and `mul_add`, the fused multiply-add, where a formula
//! asks for it by name) or exact (`neg`, `abs`, `max_nan`, `min_nan`, `sign`,
//! `lt_select`). No backend fuses a multiply and an add on its own (`a * b + c`
//! is two roundings everywhere), and none uses an approximate reciprocal or
//! reciprocal square root. The formulas are evaluated in the same order on every backend,
//! so **every backend is bitwise identical to the scalar reference** for finite
//! and infinite values (0 ULP per step); NaN results are NaN on every backend,
//! though the NaN payload bits may differ.

use core::ops::{Add, Div, Mul, Neg, Sub};

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
}

/// The portable path: `wide::f32x8` (SSE2 pairs in a default x86-64 build,
/// NEON on aarch64, whatever `wide` compiles to elsewhere).
#[derive(Clone, Copy)]
pub(crate) struct Wide(wide::f32x8);

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
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Raw `std::arch` lanes. These types are only ever instantiated inside the
    //! `#[target_feature]` drivers in `driver.rs`, which are only called after
    //! `is_x86_feature_detected!` confirmed the features, so every intrinsic
    //! below runs on a CPU that has it.
    use super::*;
    use core::arch::x86_64::*;

    /// Eight lanes in one `ymm` register (AVX).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(__m256);

    /// Sixteen lanes in one `zmm` register (AVX-512F).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    // SAFETY (all intrinsic calls in this module): `Avx2` values exist only in
    // code reached from `driver::run_avx2`, a `#[target_feature(enable = "avx2,fma")]`
    // function called only after runtime detection of AVX2 and FMA; likewise
    // `Avx512` only under `driver::run_avx512` after detection of AVX-512F.
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
    }

    impl F32Vec for Avx512 {
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

    fn check_backend<V: F32Vec>() {
        lanes_match::<V>("max_nan", |a, b| a.max_nan(b), |a, b| a.max_nan(b));
        lanes_match::<V>("div_or_zero", |a, b| a.div_or_zero(b), |a, b| if b == 0.0 { 0.0 } else { a / b });
        lanes_match::<V>("sqrt", |a, _| a.sqrt(), |a, _| a.sqrt());
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

    #[test]
    fn scalar_lanes() {
        check_backend::<f32>();
    }

    #[test]
    fn wide_lanes_match_scalar() {
        check_backend::<Wide>();
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_lanes_match_scalar() {
        if Backend::Avx2.is_available() {
            check_backend::<Avx2>();
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_lanes_match_scalar() {
        if Backend::Avx512.is_available() {
            check_backend::<Avx512>();
        }
    }
}
