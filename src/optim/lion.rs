//! Lion (EvoLved Sign Momentum), Chen et al., *Symbolic Discovery of
//! Optimization Algorithms*, 2023 (<https://arxiv.org/abs/2302.06675>). Not
//! in `torch.optim`; the reference is the `lion-pytorch` package (lucidrains,
//! the PyTorch implementation the paper's authors link), whose class, names
//! and defaults this follows (golden files from `lion-pytorch` 0.2.5).
//!
//! Per element, as `lion_pytorch.Lion` evaluates it on CPU:
//! ```text
//! p = p * (1 - lr * weight_decay)                  (skipped when weight_decay = 0: a multiply by 1)
//! c = fma(g, 1 - beta1, exp_avg * beta1)           torch's `mul_(beta1).add(g, alpha=1-beta1)`
//! p = p - lr * sign(c)                             torch.sign: NaN and zeros give 0
//! exp_avg = fma(g, 1 - beta2, exp_avg * beta2)
//! ```
//! torch's vectorized CPU kernels evaluate `add(x, alpha=a)` as one fused
//! multiply-add, so the moment updates here use `mul_add`, on every
//! backend. The update has magnitude `lr` in every coordinate, so Lion wants
//! a learning rate 3-10x smaller than AdamW's and a weight decay as much
//! larger.
//!
//! Not supported: `lion-pytorch`'s `decoupled_weight_decay=True`, which
//! divides the weight decay by the learning rate given at construction (a
//! value a configuration does not hold); `use_triton` (a GPU kernel).

use super::sealed;
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::{non_negative, unit_closed};
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`Lion`](crate::Lion), with `lion_pytorch.Lion`'s
/// names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LionConfig {
    /// Learning rate: the size of every coordinate's step. Default `1e-4`.
    pub lr: f64,
    /// `(beta1, beta2)`: the interpolation of the update direction and the
    /// decay of the momentum. Default `(0.9, 0.99)`.
    pub betas: (f64, f64),
    /// Decoupled weight decay: parameters shrink by `lr * weight_decay`
    /// before the step. Default `0`.
    pub weight_decay: f64,
}

impl Default for LionConfig {
    fn default() -> Self {
        LionConfig { lr: 1e-4, betas: (0.9, 0.99), weight_decay: 0.0 }
    }
}

struct LionKernel {
    /// `1 - lr * weight_decay`; 1 skips the multiply.
    decay: f32,
    lr: f32,
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
}

impl Kernel<1> for LionKernel {
    fn maximize(&self) -> bool {
        false
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 1]) {
        let [m] = s;
        if self.decay != 1.0 {
            *p = *p * V::splat(self.decay);
        }
        let c = g.mul_add(V::splat(self.one_minus_b1), *m * V::splat(self.b1));
        *p = *p - V::splat(self.lr) * c.sign();
        *m = g.mul_add(V::splat(self.one_minus_b2), *m * V::splat(self.b2));
    }
}

impl sealed::Sealed for LionConfig {
    type Aux = ();
    fn run(&self, _t: u64, _aux: &mut (), plan: Plan, bufs: Bufs<'_>) -> StepReport {
        let (b1, b2) = self.betas;
        let k = LionKernel {
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            lr: self.lr as f32,
            b1: b1 as f32,
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
        };
        drive::<_, 1>(&k, plan, bufs)
    }
}

impl Algorithm for LionConfig {
    const TORCH_CLASS: &'static str = "Lion";
    fn validate(&self) -> Result<(), Error> {
        // lion-pytorch asserts `lr > 0` and `0 <= beta <= 1` at construction;
        // lr = 0 is allowed here, as for every optimizer, so a schedule may
        // reach it.
        non_negative("lr", self.lr)?;
        unit_closed("betas[0]", self.betas.0)?;
        unit_closed("betas[1]", self.betas.1)?;
        non_negative("weight_decay", self.weight_decay)
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg"]
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

// The keyword options of `lion_pytorch.Lion`.
crate::keywords::torch_options!(LionConfig { lr, betas, weight_decay } fixed { decoupled_weight_decay = false, use_triton = false });
