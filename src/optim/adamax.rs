//! AdaMax (`torch.optim.Adamax`): the infinity-norm variant of Adam, Kingma &
//! Ba 2015, section 7.1.
//!
//! Per element, with `t` the step number:
//! ```text
//! if maximize: g = -g
//! if weight_decay != 0: g = g + weight_decay * p
//! exp_avg = lerp(exp_avg, g, 1 - beta1)
//! exp_inf = max(exp_inf * beta2, |g| + eps)     (eps inside the max; NaN propagates)
//! p = p + (-lr / (1 - beta1^t)) * exp_avg / exp_inf
//! ```
//! The lecture notes leave the placement of `eps` open; torch's form is used.
//! `exp_inf >= eps > 0` after the first step, so the division is safe when `eps > 0`.

use super::adam::validate_betas;
use super::{GradIn, Lerp, Quot, pow_step, sealed};
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::non_negative;
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`Adamax`](crate::Adamax), with `torch.optim.Adamax`'s names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamaxConfig {
    /// Learning rate. Default `2e-3`.
    pub lr: f64,
    /// Decay rates of the first moment and of the infinity norm. Default `(0.9, 0.999)`.
    pub betas: (f64, f64),
    /// Added to `|g|` inside the max. Default `1e-8`.
    pub eps: f64,
    /// L2 penalty added to the gradient. Default `0`.
    pub weight_decay: f64,
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
}

impl Default for AdamaxConfig {
    fn default() -> Self {
        AdamaxConfig { lr: 2e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0, maximize: false }
    }
}

struct AdamaxKernel {
    grad: GradIn,
    m: Lerp,
    b2: f32,
    eps: f32,
    neg_clr: f32,
    div: Quot,
}

impl Kernel<2> for AdamaxKernel {
    fn maximize(&self) -> bool {
        self.grad.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [m, u] = s;
        let g = self.grad.apply(*p, g);
        *m = self.m.apply(*m, g);
        *u = (*u * V::splat(self.b2)).max_nan(g.abs() + V::splat(self.eps));
        *p = *p + self.div.apply(V::splat(self.neg_clr) * *m, *u);
    }
}

impl sealed::Sealed for AdamaxConfig {
    type Aux = ();
    fn run(&self, t: u64, _aux: &mut (), plan: Plan, bufs: Bufs<'_>) -> StepReport {
        let k = AdamaxKernel {
            grad: GradIn::new(self.maximize, self.weight_decay),
            m: Lerp::new(1.0 - self.betas.0),
            b2: self.betas.1 as f32,
            eps: self.eps as f32,
            neg_clr: (-(self.lr / (1.0 - pow_step(self.betas.0, t)))) as f32,
            div: Quot::new(self.eps),
        };
        drive::<_, 2>(&k, plan, bufs)
    }
}

impl Algorithm for AdamaxConfig {
    const TORCH_CLASS: &'static str = "Adamax";
    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        non_negative("eps", self.eps)?;
        validate_betas(self.betas)?;
        non_negative("weight_decay", self.weight_decay)
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg", "exp_inf"]
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
crate::keywords::torch_options!(AdamaxConfig { lr, betas, eps, weight_decay, maximize });
