//! Step math shared by the kernels, below the driver and the optimizers:
//! the loss-scale removal ([`Unscale`]), coupled weight decay ([`GradIn`]),
//! the guarded division ([`Quot`]), torch's `lerp` ([`Lerp`]), `beta **
//! step` ([`pow_step`]) and torch's own square root ([`torch_sqrt`]). Each is
//! written once over the lane type, so every backend evaluates it with the
//! same roundings.

use crate::simd::F32Vec;

/// How gradients are divided by a loss scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Unscale {
    /// No scale.
    None,
    /// A power-of-two scale: multiplying by its exact reciprocal gives the
    /// same bits as dividing, without the divider.
    Mul(f32),
    /// Any other scale: divide, as torch does.
    Div(f32),
}

impl Unscale {
    pub(crate) fn new(grad_scale: Option<f32>) -> Unscale {
        match grad_scale {
            None => Unscale::None,
            Some(s) if s.is_normal() && (1.0 / s).is_normal() && (s.to_bits() & 0x007f_ffff) == 0 => {
                Unscale::Mul(1.0 / s)
            }
            Some(s) => Unscale::Div(s),
        }
    }

    #[inline(always)]
    pub(crate) fn apply<V: F32Vec>(self, g: V) -> V {
        match self {
            Unscale::None => g,
            Unscale::Mul(r) => g * V::splat(r),
            Unscale::Div(s) => g / V::splat(s),
        }
    }
}

/// Coupled (L2) weight decay, applied to the gradient the way torch does
/// first: `g + wd * p`. Before it, the driver has divided out the loss scale,
/// multiplied in the clipping factor and, where `maximize` is set, negated
/// the gradient ([`GradPre`](crate::driver::GradPre)): a kernel holding a
/// `GradIn` reports `maximize` from here through
/// [`Kernel::maximize`](crate::driver::Kernel::maximize).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GradIn {
    /// torch's `maximize`: read by the driver, which negates the gradient.
    pub maximize: bool,
    /// L2 weight decay added to the gradient; 0 disables (torch skips the add).
    pub wd: f32,
}

impl GradIn {
    pub(crate) fn new(maximize: bool, wd: f64) -> Self {
        GradIn { maximize, wd: wd as f32 }
    }

    /// torch's `grad.add(param, alpha=weight_decay)`: one fused multiply-add.
    #[inline(always)]
    pub(crate) fn apply<V: F32Vec>(self, p: V, g: V) -> V {
        if self.wd != 0.0 { p.mul_add(V::splat(self.wd), g) } else { g }
    }
}

/// The division by an adaptive denominator. With `eps = 0` (allowed by
/// torch) the denominator can be exactly 0 — zero state and zero gradient, or
/// a second moment that underflowed — and torch produces `0/0 = NaN` or
/// `x/0 = inf`, poisoning the parameter forever. Here a zero denominator
/// gives a zero update instead; with `eps > 0` the plain division runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quot {
    guard: bool,
}

impl Quot {
    pub(crate) fn new(eps: f64) -> Quot {
        Quot { guard: eps == 0.0 }
    }

    #[inline(always)]
    pub(crate) fn apply<V: F32Vec>(self, num: V, den: V) -> V {
        if self.guard { num.div_or_zero(den) } else { num / den }
    }
}

/// torch's `lerp(a, b, w)`: `a + w (b - a)` for `w < 0.5`, else
/// `b - (b - a)(1 - w)`, each with the product and the sum fused as torch's
/// vectorized CPU kernel does (`fmadd`, `fnmadd`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lerp {
    w: f32,
    one_minus_w: f32,
    high: bool,
}

impl Lerp {
    pub(crate) fn new(w: f64) -> Self {
        let w = w as f32;
        Lerp { w, one_minus_w: 1.0 - w, high: w.abs() >= 0.5 }
    }

    #[inline(always)]
    pub(crate) fn apply<V: F32Vec>(self, a: V, b: V) -> V {
        if self.high { (a - b).mul_add(V::splat(self.one_minus_w), b) } else { V::splat(self.w).mul_add(b - a, a) }
    }
}

/// `x^t` for a hyperparameter `x` and a step count, in f64 with libm's `pow`
/// as Python's `beta ** step` computes it.
pub(crate) fn pow_step(x: f64, t: u64) -> f64 {
    x.powf(t as f64)
}

/// torch's float32 CPU `sqrt`, bit for bit where torch's MKL takes its
/// AVX-512 path (the torch-exact evaluation's square root).
///
/// torch's `sqrt` calls MKL's vector math, which is not correctly rounded:
/// about 0.7% of values come out one unit in the last place low, and which
/// ones depends on the code path MKL picks for the CPU. On AVX-512 it is one
/// Markstein step from `vrsqrt14ps`: `r = rsqrt14(x)`, `y = x r`,
/// `y + (x - y y) (r / 2)` with both products fused. Inputs below `2^-64`
/// are scaled by `2^64` first and the root by `2^-32` after (exact; without
/// it the residual `x - y y` would be subnormal and lose bits, and torch's
/// roots show MKL scales them), and `+-0` and `+inf` are their own roots.
/// Checked against torch 2.15 on 12832 values, 2621 of them ones where torch
/// is not correctly rounded (`tests/torch_sqrt/`).
#[inline(always)]
pub(crate) fn torch_sqrt<V: F32Vec>(x: V) -> V {
    let tiny = V::splat(f32::from_bits(0x1f80_0000)); // 2^-64
    let xs = x.lt_select(tiny, x * V::splat(f32::from_bits(0x5f80_0000)), x); // * 2^64
    let r = xs.rsqrt14();
    let y = xs * r;
    let half_r = V::splat(0.5) * r;
    let s = (-y).mul_add(y, xs).mul_add(half_r, y);
    let s = x.lt_select(tiny, s * V::splat(f32::from_bits(0x2f80_0000)), s); // * 2^-32
    // +-0 and NaN give themselves, +inf itself; negative values keep the NaN
    let zero = V::splat(0.0);
    let inner = x.lt_select(zero, s, zero.lt_select(x, s, x));
    x.lt_select(V::splat(f32::INFINITY), inner, x)
}

/// `sqrt(x)`, correctly rounded, or with `TORCH` as torch computes it
/// ([`torch_sqrt`]): the square root of a kernel that has a torch-exact
/// instance (`torch_exact`). A constant, so the default instance is the
/// kernel without it.
#[inline(always)]
pub(crate) fn root<const TORCH: bool, V: F32Vec>(x: V) -> V {
    if TORCH { torch_sqrt(x) } else { x.sqrt() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::simd::{LaneOp, dispatch};

    /// `torch_sqrt` on every backend of this machine against torch's own
    /// roots (`tests/torch_sqrt/torch_sqrt.json`, made with torch 2.15 where
    /// MKL takes its AVX-512 path): every bit, NaN for NaN.
    #[test]
    fn torch_sqrt_gives_torchs_bits() {
        struct Map<'a>(&'a [f32], &'a mut [f32]);
        impl LaneOp for Map<'_> {
            type Out = ();
            fn run<V: F32Vec>(self) {
                for (x, y) in self.0.chunks_exact(V::LANES).zip(self.1.chunks_exact_mut(V::LANES)) {
                    // SAFETY: both chunks hold LANES values.
                    unsafe { torch_sqrt(V::load(x.as_ptr())).store(y.as_mut_ptr()) }
                }
            }
        }
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../tests/torch_sqrt/torch_sqrt.json")).expect("valid JSON");
        let bits = |k: &str| -> Vec<u32> {
            golden[k].as_array().expect("an array").iter().map(|b| b.as_u64().expect("bits") as u32).collect()
        };
        let (mut xs, mut want): (Vec<f32>, Vec<f32>) = (
            bits("input_bits").into_iter().map(f32::from_bits).collect(),
            bits("sqrt_bits").into_iter().map(f32::from_bits).collect(),
        );
        assert!(xs.len() > 10_000 && xs.len() == want.len());
        let correctly_rounded = xs.iter().zip(&want).filter(|&(x, w)| x.sqrt().to_bits() == w.to_bits()).count();
        assert!(xs.len() - correctly_rounded > 2000, "the data holds roots torch does not round correctly");
        while !xs.len().is_multiple_of(16) {
            xs.push(4.0);
            want.push(2.0);
        }
        for backend in Backend::ALL.into_iter().filter(|b| b.is_available()) {
            let mut got = vec![0f32; xs.len()];
            dispatch(backend, Map(&xs, &mut got));
            for ((x, w), g) in xs.iter().zip(&want).zip(&got) {
                assert!(
                    w.to_bits() == g.to_bits() || (w.is_nan() && g.is_nan()),
                    "{backend:?}: torch_sqrt({x:e} = {:#010x}) = {g:e}, torch gives {w:e}",
                    x.to_bits()
                );
            }
        }
    }
}
