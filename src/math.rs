//! Step math shared by the kernels, below the driver and the optimizers:
//! the loss-scale removal ([`Unscale`]), coupled weight decay ([`GradIn`]),
//! the guarded division ([`Quot`]), torch's `lerp` ([`Lerp`]) and `beta **
//! step` ([`pow_step`]). Each is written once over the lane type, so every
//! backend evaluates it with the same roundings.

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
