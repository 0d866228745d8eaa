//! AdaGrad (`torch.optim.Adagrad`): Duchi, Hazan & Singer, *Adaptive
//! Subgradient Methods for Online Learning and Stochastic Optimization*, JMLR 2011.
//!
//! Per element, with `t` the step number:
//! ```text
//! if maximize: g = -g
//! if weight_decay != 0: g = g + weight_decay * p
//! clr = lr / (1 + (t - 1) * lr_decay)
//! sum = sum + g * g                 (sum starts at initial_accumulator_value)
//! std = sqrt(sum) + eps             (torch)   or   sqrt(sum + eps)   (eps_inside_sqrt, the lecture notes)
//! p = p + (-clr) * g / std
//! ```
//! This is torch's evaluation operation by operation; with `torch_exact` the
//! square root is also torch's (MKL's on AVX-512, not correctly rounded),
//! which gives torch's bits where torch's MKL takes its AVX-512 path.

use super::{GradIn, Quot, sealed};
use crate::math::root;
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::non_negative;
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`Adagrad`](crate::Adagrad), with `torch.optim.Adagrad`'s names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdagradConfig {
    /// Learning rate. Default `1e-2`.
    pub lr: f64,
    /// Learning-rate decay: step `t` uses `lr / (1 + (t - 1) * lr_decay)`. Default `0`.
    pub lr_decay: f64,
    /// L2 penalty added to the gradient. Default `0`.
    pub weight_decay: f64,
    /// Starting value of the `sum` accumulator. Default `0`.
    pub initial_accumulator_value: f64,
    /// Added to the denominator. Default `1e-10`.
    pub eps: f64,
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
    /// Not in torch: put `eps` inside the square root, `sqrt(sum + eps)`, as
    /// the lecture notes, TensorFlow and optax write it. Default `false` (torch).
    pub eps_inside_sqrt: bool,
    /// Not a torch option: take square roots as torch's MKL computes them
    /// on AVX-512 (one Newton step from `vrsqrt14ps`), for torch's exact
    /// bits there (the rest of the step is evaluated as torch's already). Not
    /// with sparse gradients. Default `false`.
    pub torch_exact: bool,
}

impl Default for AdagradConfig {
    fn default() -> Self {
        AdagradConfig {
            lr: 1e-2,
            lr_decay: 0.0,
            weight_decay: 0.0,
            initial_accumulator_value: 0.0,
            eps: 1e-10,
            maximize: false,
            eps_inside_sqrt: false,
            torch_exact: false,
        }
    }
}

impl AdagradConfig {
    /// `-clr` for step `t`, as torch computes it (f64, then rounded).
    pub(crate) fn neg_clr(&self, t: u64) -> f32 {
        (-(self.lr / (1.0 + (t - 1) as f64 * self.lr_decay))) as f32
    }
}

/// The AdaGrad update of one element given its (already decayed) gradient;
/// `TORCH`: torch's square root (`torch_exact`).
#[derive(Clone, Copy)]
pub(crate) struct AdagradKernel<const TORCH: bool> {
    pub(crate) grad: GradIn,
    pub(crate) neg_clr: f32,
    pub(crate) eps: f32,
    pub(crate) eps_inside: bool,
    pub(crate) div: Quot,
}

impl<const TORCH: bool> Kernel<1> for AdagradKernel<TORCH> {
    fn maximize(&self) -> bool {
        self.grad.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 1]) {
        let [sum] = s;
        let g = self.grad.apply(*p, g);
        // torch: state_sum.addcmul_(g, g, value=1), one fused multiply-add.
        *sum = g.mul_add(g, *sum);
        let eps = V::splat(self.eps);
        let std = if self.eps_inside { root::<TORCH, _>(*sum + eps) } else { root::<TORCH, _>(*sum) + eps };
        *p = *p + self.div.apply(V::splat(self.neg_clr) * g, std);
    }
}

impl sealed::Sealed for AdagradConfig {
    type Aux = ();
    fn run(&self, t: u64, _aux: &mut (), plan: Plan, bufs: Bufs<'_>) -> StepReport {
        fn go<const TORCH: bool>(c: &AdagradConfig, t: u64, plan: Plan, bufs: Bufs<'_>) -> StepReport {
            let k = AdagradKernel::<TORCH> {
                grad: GradIn::new(c.maximize, c.weight_decay),
                neg_clr: c.neg_clr(t),
                eps: c.eps as f32,
                eps_inside: c.eps_inside_sqrt,
                div: Quot::new(c.eps),
            };
            drive::<_, 1>(&k, plan, bufs)
        }
        if self.torch_exact { go::<true>(self, t, plan, bufs) } else { go::<false>(self, t, plan, bufs) }
    }
}

impl Algorithm for AdagradConfig {
    const TORCH_CLASS: &'static str = "Adagrad";
    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        non_negative("lr_decay", self.lr_decay)?;
        non_negative("weight_decay", self.weight_decay)?;
        non_negative("initial_accumulator_value", self.initial_accumulator_value)?;
        non_negative("eps", self.eps)
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["sum"]
    }
    fn state_init(&self, _i: usize) -> f32 {
        self.initial_accumulator_value as f32
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
crate::keywords::torch_options!(AdagradConfig { lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize, eps_inside_sqrt, torch_exact });
