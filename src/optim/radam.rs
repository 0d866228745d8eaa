//! RAdam (`torch.optim.RAdam`): Adam with the variance of the adaptive rate
//! rectified. Liu et al., *On the Variance of the Adaptive Learning Rate and
//! Beyond*, ICLR 2020 (<https://arxiv.org/abs/1908.03265>).
//!
//! Per element, with `t` the step number (1 for the first step), as torch's
//! single-tensor path:
//! ```text
//! if maximize: g = -g
//! if weight_decay != 0:
//!     if decoupled_weight_decay: p = p * (1 - lr * weight_decay)
//!     else:                      g = g + weight_decay * p
//! exp_avg    = lerp(exp_avg, g, 1 - beta1)
//! exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
//! rho_inf = 2 / (1 - beta2) - 1
//! rho_t   = rho_inf - 2 t beta2^t / (1 - beta2^t)
//! if rho_t > 5:
//!     rect = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
//!     p = p - exp_avg / (1 - beta1^t) * lr * sqrt(1 - beta2^t) / (sqrt(exp_avg_sq) + eps) * rect
//! else:
//!     p = p - exp_avg / (1 - beta1^t) * lr
//! ```
//! The scalars (`rho_t`, `rect`, the bias corrections) are computed in f64
//! per step and folded into one f32 factor, so the adaptive update is one
//! division per element, as Adam's kernel does; torch rounds each product
//! separately (a few ULP apart, well inside the golden tolerance). Whether
//! `rho_t > 5` depends only on `t`, so each step runs one of two kernels,
//! with no branch per element. With `torch_exact` the update is evaluated as
//! torch writes it, product by product (see `TorchSteps`), with torch's
//! square root (MKL's on AVX-512): torch's bits where torch's MKL takes its
//! AVX-512 path.

use super::adam::{Moments, validate_betas};
use super::{Quot, pow_step, sealed};
use crate::math::torch_sqrt;
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::non_negative;
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`RAdam`](crate::RAdam), with `torch.optim.RAdam`'s
/// names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RAdamConfig {
    /// Learning rate. Default `1e-3`.
    pub lr: f64,
    /// Decay rates of the first and second moments. Default `(0.9, 0.999)`.
    pub betas: (f64, f64),
    /// Added to the root of the second moment. Default `1e-8`.
    pub eps: f64,
    /// Weight decay: an L2 penalty added to the gradient, or with
    /// `decoupled_weight_decay` a shrink of the parameters. Default `0`.
    pub weight_decay: f64,
    /// Decoupled (AdamW-style) weight decay. Default `false`.
    pub decoupled_weight_decay: bool,
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
    /// Not a torch option: evaluate the step as torch's single-tensor CPU
    /// path does, square roots included (torch's MKL ones on AVX-512), for
    /// torch's exact bits there (see the module docs). Default `false`.
    pub torch_exact: bool,
}

impl Default for RAdamConfig {
    fn default() -> Self {
        RAdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            maximize: false,
            torch_exact: false,
        }
    }
}

/// `rho_t > 5`: the rectified adaptive step.
struct Rectified {
    moments: Moments,
    eps: f32,
    /// `-(lr * sqrt(1 - beta2^t) * rect / (1 - beta1^t))`.
    neg_step: f32,
    div: Quot,
}

impl Kernel<2> for Rectified {
    fn maximize(&self) -> bool {
        self.moments.maximize()
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [m, v] = s;
        self.moments.update(p, g, m, v);
        let denom = v.sqrt() + V::splat(self.eps);
        *p = *p + self.div.apply(V::splat(self.neg_step) * *m, denom);
    }
}

/// Both steps as torch evaluates them (`torch_exact`):
/// `p - ((exp_avg / bc1) * lr) * ((1 / (sqrt(exp_avg_sq) + eps)) * sqrt(bc2)) * rect`
/// (torch's `float / tensor` is a reciprocal and a product) when rectified,
/// else `p - (exp_avg / bc1) * lr`.
struct TorchSteps {
    moments: Moments,
    bc1: f32,
    lr: f32,
    eps: f32,
    /// `(sqrt(1 - beta2^t), rect)` when `rho_t > 5`.
    adaptive: Option<(f32, f32)>,
    div: Quot,
}

impl Kernel<2> for TorchSteps {
    fn maximize(&self) -> bool {
        self.moments.maximize()
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [m, v] = s;
        self.moments.update(p, g, m, v);
        let step = *m / V::splat(self.bc1) * V::splat(self.lr);
        let step = match self.adaptive {
            Some((bc2_sqrt, rect)) => {
                let inv = self.div.apply(V::splat(1.0), torch_sqrt(*v) + V::splat(self.eps));
                step * (inv * V::splat(bc2_sqrt)) * V::splat(rect)
            }
            None => step,
        };
        // torch: param.add_(update, alpha=-1.0)
        *p = *p - step;
    }
}

/// `rho_t <= 5`: the un-adapted step (SGD with momentum, bias-corrected).
struct Plain {
    moments: Moments,
    /// `-(lr / (1 - beta1^t))`.
    neg_step: f32,
}

impl Kernel<2> for Plain {
    fn maximize(&self) -> bool {
        self.moments.maximize()
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [m, v] = s;
        self.moments.update(p, g, m, v);
        *p = *p + V::splat(self.neg_step) * *m;
    }
}

impl sealed::Sealed for RAdamConfig {
    type Aux = ();
    fn run(&self, t: u64, _aux: &mut (), plan: Plan, bufs: Bufs<'_>) -> StepReport {
        let (b1, b2) = self.betas;
        let moments = Moments::new(self.lr, b1, b2, self.weight_decay, self.decoupled_weight_decay, self.maximize);
        let bc1 = 1.0 - pow_step(b1, t);
        let bc2 = 1.0 - pow_step(b2, t);
        let rho_inf = 2.0 / (1.0 - b2) - 1.0;
        let rho_t = rho_inf - 2.0 * t as f64 * pow_step(b2, t) / bc2;
        let sl = bufs;
        if self.torch_exact {
            // torch's Python: rect = (...) ** 0.5, bias_correction2 ** 0.5
            let rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)).powf(0.5);
            let k = TorchSteps {
                moments,
                bc1: bc1 as f32,
                lr: self.lr as f32,
                eps: self.eps as f32,
                adaptive: (rho_t > 5.0).then_some((bc2.powf(0.5) as f32, rect as f32)),
                div: Quot::new(self.eps),
            };
            return drive::<_, 2>(&k, plan, sl);
        }
        if rho_t > 5.0 {
            let rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)).sqrt();
            let k = Rectified {
                moments,
                eps: self.eps as f32,
                neg_step: (-(self.lr * bc2.sqrt() * rect / bc1)) as f32,
                div: Quot::new(self.eps),
            };
            drive::<_, 2>(&k, plan, sl)
        } else {
            drive::<_, 2>(&Plain { moments, neg_step: (-(self.lr / bc1)) as f32 }, plan, sl)
        }
    }
}

impl Algorithm for RAdamConfig {
    const TORCH_CLASS: &'static str = "RAdam";
    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        non_negative("eps", self.eps)?;
        validate_betas(self.betas)?;
        non_negative("weight_decay", self.weight_decay)
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }
    fn aux_init(&self) {}
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr_unchecked(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn set_cycled_momentum_unchecked(&mut self, m: f64) -> bool {
        self.betas.0 = m;
        true
    }
}

// The torch keyword options: the fields torch's constructor takes.
crate::keywords::torch_options!(RAdamConfig { lr, betas, eps, weight_decay, decoupled_weight_decay, maximize, torch_exact });
