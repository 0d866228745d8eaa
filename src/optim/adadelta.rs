//! AdaDelta (`torch.optim.Adadelta`): Zeiler, *ADADELTA: An Adaptive Learning
//! Rate Method*, 2012 (<https://arxiv.org/abs/1212.5701>).
//!
//! Per element:
//! ```text
//! if maximize: g = -g
//! if weight_decay != 0: g = g + weight_decay * p
//! square_avg = square_avg * rho + (1 - rho) * g * g
//! delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
//! acc_delta = acc_delta * rho + (1 - rho) * delta * delta
//! p = p + (-lr) * delta
//! ```
//! The kernel computes `delta = sqrt((acc_delta + eps) / (square_avg + eps)) * g`,
//! the same value with one square root instead of two (a few ULP from torch's
//! rounding at most). With `torch_exact` it computes torch's form,
//! `sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g`, with torch's square
//! root (MKL's on AVX-512, not correctly rounded): torch's bits where torch's
//! MKL takes its AVX-512 path.

use super::{GradIn, Quot, sealed};
use crate::math::torch_sqrt;
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::{non_negative, unit_closed};
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`Adadelta`](crate::Adadelta), with `torch.optim.Adadelta`'s names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdadeltaConfig {
    /// Scale applied to the update. Default `1.0`.
    pub lr: f64,
    /// Decay rate of both running averages. Default `0.9`.
    pub rho: f64,
    /// Added inside both square roots. Default `1e-6`.
    pub eps: f64,
    /// L2 penalty added to the gradient. Default `0`.
    pub weight_decay: f64,
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
    /// Not a torch option: evaluate the step as torch's single-tensor CPU
    /// path does, square roots included (torch's MKL ones on AVX-512), for
    /// torch's exact bits there (see the module docs). Default `false`.
    pub torch_exact: bool,
}

impl Default for AdadeltaConfig {
    fn default() -> Self {
        AdadeltaConfig { lr: 1.0, rho: 0.9, eps: 1e-6, weight_decay: 0.0, maximize: false, torch_exact: false }
    }
}

/// `TORCH`: torch's form and square root (`torch_exact`).
struct AdadeltaKernel<const TORCH: bool> {
    grad: GradIn,
    rho: f32,
    one_minus_rho: f32,
    eps: f32,
    neg_lr: f32,
    div: Quot,
}

impl<const TORCH: bool> Kernel<2> for AdadeltaKernel<TORCH> {
    fn maximize(&self) -> bool {
        self.grad.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [sq, acc] = s;
        let g = self.grad.apply(*p, g);
        let (rho, omr, eps) = (V::splat(self.rho), V::splat(self.one_minus_rho), V::splat(self.eps));
        // torch: x.mul_(rho).addcmul_(y, y, value=1 - rho) and
        // param.add_(delta, alpha=-lr), each one fused multiply-add.
        *sq = (omr * g).mul_add(g, *sq * rho);
        let delta = if TORCH {
            // torch: (acc_delta + eps).sqrt_().div_((square_avg + eps).sqrt_()).mul_(g)
            self.div.apply(torch_sqrt(*acc + eps), torch_sqrt(*sq + eps)) * g
        } else {
            self.div.apply(*acc + eps, *sq + eps).sqrt() * g
        };
        *acc = (omr * delta).mul_add(delta, *acc * rho);
        *p = delta.mul_add(V::splat(self.neg_lr), *p);
    }
}

impl sealed::Sealed for AdadeltaConfig {
    type Aux = ();
    fn run(
        &self,
        _t: u64,
        _aux: &mut (),
        plan: Plan,
        bufs: Bufs<'_>,
    ) -> StepReport {
        fn go<const TORCH: bool>(c: &AdadeltaConfig, plan: Plan, bufs: Bufs<'_>) -> StepReport {
            let k = AdadeltaKernel::<TORCH> {
                grad: GradIn::new(c.maximize, c.weight_decay),
                rho: c.rho as f32,
                one_minus_rho: (1.0 - c.rho) as f32,
                eps: c.eps as f32,
                neg_lr: -c.lr as f32,
                div: Quot::new(c.eps),
            };
            drive::<_, 2>(&k, plan, bufs)
        }
        if self.torch_exact { go::<true>(self, plan, bufs) } else { go::<false>(self, plan, bufs) }
    }
}

impl Algorithm for AdadeltaConfig {
    const TORCH_CLASS: &'static str = "Adadelta";
    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        unit_closed("rho", self.rho)?;
        non_negative("eps", self.eps)?;
        non_negative("weight_decay", self.weight_decay)
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["square_avg", "acc_delta"]
    }
    fn aux_init(&self) {}
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr_unchecked(&mut self, lr: f64) {
        self.lr = lr;
    }
}

// The torch keyword options: the fields torch's constructor takes.
crate::keywords::torch_options!(AdadeltaConfig { lr, rho, eps, weight_decay, maximize, torch_exact });
