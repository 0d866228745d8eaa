//! RMSprop (`torch.optim.RMSprop`): Hinton, *Neural Networks for Machine
//! Learning*, lecture 6e; centered variant: Graves, 2013
//! (<https://arxiv.org/abs/1308.0850>).
//!
//! Per element:
//! ```text
//! if maximize: g = -g
//! if weight_decay != 0: g = g + weight_decay * p
//! square_avg = square_avg * alpha + (1 - alpha) * g * g
//! if centered: grad_avg = lerp(grad_avg, g, 1 - alpha)
//!              x = max(square_avg - grad_avg * grad_avg, 0)
//! else:        x = square_avg
//! avg = sqrt(x) + eps      (torch)   or   sqrt(x + eps)   (eps_inside_sqrt)
//! if momentum != 0: buf = buf * momentum + g / avg;  p = p + (-lr) * buf
//! else:             p = p + (-lr) * g / avg
//! ```
//! The clamp at zero in the centered variant is ours: torch computes
//! `sqrt(square_avg - grad_avg^2)` directly, which rounding can make the
//! square root of a small negative number, i.e. NaN. Wherever torch's value is
//! not NaN the clamp changes nothing.
//!
//! The rest is torch's evaluation operation by operation; with `torch_exact`
//! the square root is also torch's (MKL's on AVX-512, not correctly
//! rounded), which gives torch's bits where torch's MKL takes its AVX-512
//! path.

use super::{GradIn, Lerp, Quot, sealed};
use crate::math::root;
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::non_negative;
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`RmsProp`](crate::RmsProp), with `torch.optim.RMSprop`'s names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsPropConfig {
    /// Learning rate. Default `1e-2`.
    pub lr: f64,
    /// Smoothing constant of the squared-gradient average. Default `0.99`.
    pub alpha: f64,
    /// Added to the denominator. Default `1e-8`.
    pub eps: f64,
    /// L2 penalty added to the gradient. Default `0`.
    pub weight_decay: f64,
    /// Momentum factor; 0 keeps no momentum buffer. Default `0`.
    pub momentum: f64,
    /// Normalize by the estimated variance instead of the second moment. Default `false`.
    pub centered: bool,
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
    /// Not in torch: `sqrt(x + eps)` instead of `sqrt(x) + eps`, as the lecture
    /// notes and TensorFlow write it. Default `false` (torch).
    pub eps_inside_sqrt: bool,
    /// Not a torch option: take square roots as torch's MKL computes them
    /// on AVX-512 (one Newton step from `vrsqrt14ps`), for torch's exact
    /// bits there (the rest of the step is evaluated as torch's already).
    /// Default `false`.
    pub torch_exact: bool,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        RmsPropConfig {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: false,
            maximize: false,
            eps_inside_sqrt: false,
            torch_exact: false,
        }
    }
}

/// `TORCH`: torch's square root (`torch_exact`).
struct RmsKernel<const TORCH: bool> {
    grad: GradIn,
    alpha: f32,
    one_minus_alpha: f32,
    grad_avg: Lerp,
    eps: f32,
    eps_inside: bool,
    momentum: f32,
    neg_lr: f32,
    centered: bool,
    div: Quot,
}

impl<const TORCH: bool> RmsKernel<TORCH> {
    #[inline(always)]
    fn body<V: F32Vec>(&self, p: &mut V, g: V, sq: &mut V, ga: Option<&mut V>, buf: Option<&mut V>) {
        let g = self.grad.apply(*p, g);
        // torch: square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        *sq = (V::splat(self.one_minus_alpha) * g).mul_add(g, *sq * V::splat(self.alpha));
        let x = match ga {
            Some(ga) => {
                *ga = self.grad_avg.apply(*ga, g);
                // torch: square_avg.addcmul(grad_avg, grad_avg, value=-1), fused;
                // clamped at 0 here where rounding makes it negative.
                (-*ga).mul_add(*ga, *sq).max_nan(V::splat(0.0))
            }
            None => *sq,
        };
        let eps = V::splat(self.eps);
        let avg = if self.eps_inside { root::<TORCH, _>(x + eps) } else { root::<TORCH, _>(x) + eps };
        match buf {
            Some(buf) => {
                *buf = *buf * V::splat(self.momentum) + self.div.apply(g, avg);
                // torch: param.add_(buf, alpha=-lr)
                *p = buf.mul_add(V::splat(self.neg_lr), *p);
            }
            None => *p = *p + self.div.apply(V::splat(self.neg_lr) * g, avg),
        }
    }
}

impl<const TORCH: bool> Kernel<1> for RmsKernel<TORCH> {
    fn maximize(&self) -> bool {
        self.grad.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 1]) {
        let [sq] = s;
        self.body(p, g, sq, None, None)
    }
}

impl<const TORCH: bool> Kernel<2> for RmsKernel<TORCH> {
    fn maximize(&self) -> bool {
        self.grad.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [sq, x] = s;
        if self.centered { self.body(p, g, sq, Some(x), None) } else { self.body(p, g, sq, None, Some(x)) }
    }
}

impl<const TORCH: bool> Kernel<3> for RmsKernel<TORCH> {
    fn maximize(&self) -> bool {
        self.grad.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 3]) {
        let [sq, buf, ga] = s;
        self.body(p, g, sq, Some(ga), Some(buf))
    }
}

impl sealed::Sealed for RmsPropConfig {
    type Aux = ();
    fn run(
        &self,
        _t: u64,
        _aux: &mut (),
        plan: Plan,
        bufs: Bufs<'_>,
    ) -> StepReport {
        fn go<const TORCH: bool>(c: &RmsPropConfig, plan: Plan, bufs: Bufs<'_>) -> StepReport {
            let k = RmsKernel::<TORCH> {
                grad: GradIn::new(c.maximize, c.weight_decay),
                alpha: c.alpha as f32,
                one_minus_alpha: (1.0 - c.alpha) as f32,
                grad_avg: Lerp::new(1.0 - c.alpha),
                eps: c.eps as f32,
                eps_inside: c.eps_inside_sqrt,
                momentum: c.momentum as f32,
                neg_lr: -c.lr as f32,
                centered: c.centered,
                div: Quot::new(c.eps),
            };
            match bufs.states() {
                1 => drive::<_, 1>(&k, plan, bufs),
                2 => drive::<_, 2>(&k, plan, bufs),
                3 => drive::<_, 3>(&k, plan, bufs),
                _ => unreachable!("state count is checked by the callers"),
            }
        }
        if self.torch_exact { go::<true>(self, plan, bufs) } else { go::<false>(self, plan, bufs) }
    }
}

impl Algorithm for RmsPropConfig {
    const TORCH_CLASS: &'static str = "RMSprop";
    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        non_negative("eps", self.eps)?;
        non_negative("momentum", self.momentum)?;
        non_negative("weight_decay", self.weight_decay)?;
        non_negative("alpha", self.alpha)
    }
    fn state_names(&self) -> &'static [&'static str] {
        match (self.momentum != 0.0, self.centered) {
            (false, false) => &["square_avg"],
            (true, false) => &["square_avg", "momentum_buffer"],
            (false, true) => &["square_avg", "grad_avg"],
            (true, true) => &["square_avg", "momentum_buffer", "grad_avg"],
        }
    }
    fn aux_init(&self) {}
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr_unchecked(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn set_cycled_momentum_unchecked(&mut self, m: f64) -> bool {
        self.momentum = m;
        true
    }
}

// The torch keyword options: the fields torch's constructor takes.
crate::keywords::torch_options!(RmsPropConfig { lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_inside_sqrt, torch_exact });
