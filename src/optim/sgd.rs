//! Stochastic gradient descent with momentum (`torch.optim.SGD`): the baseline
//! the adaptive methods are compared against.
//!
//! Per element, with `fma(a, b, c) = a * b + c` rounded once (torch's
//! vectorized CPU `add(x, alpha=a)`):
//! ```text
//! if maximize: g = -g
//! if weight_decay != 0: g = fma(p, weight_decay, g)
//! if momentum != 0:
//!     buf = g                                         on the first step
//!     buf = fma(g, 1 - dampening, buf * momentum)     afterwards
//!     g = fma(buf, momentum, g)  if nesterov  else  buf
//! p = fma(g, -lr, p)
//! ```
//! Nesterov momentum: Sutskever et al., ICML 2013.

use super::{GradIn, sealed};
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::{finite, non_negative};
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`Sgd`](crate::Sgd), with `torch.optim.SGD`'s names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate. Default `1e-3`.
    pub lr: f64,
    /// Momentum factor; 0 keeps no state. Default `0`.
    pub momentum: f64,
    /// Dampening of the gradient in the momentum update. Default `0`.
    pub dampening: f64,
    /// L2 penalty added to the gradient. Default `0`.
    pub weight_decay: f64,
    /// Nesterov momentum (needs `momentum > 0` and `dampening == 0`). Default `false`.
    pub nesterov: bool,
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig { lr: 1e-3, momentum: 0.0, dampening: 0.0, weight_decay: 0.0, nesterov: false, maximize: false }
    }
}

struct SgdKernel {
    grad: GradIn,
    momentum: f32,
    one_minus_dampening: f32,
    first: bool,
    nesterov: bool,
    neg_lr: f32,
}

impl Kernel<0> for SgdKernel {
    fn maximize(&self) -> bool {
        self.grad.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, _s: &mut [V; 0]) {
        let g = self.grad.apply(*p, g);
        *p = g.mul_add(V::splat(self.neg_lr), *p);
    }
}

impl Kernel<1> for SgdKernel {
    fn maximize(&self) -> bool {
        self.grad.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 1]) {
        let [buf] = s;
        let g = self.grad.apply(*p, g);
        *buf = if self.first { g } else { g.mul_add(V::splat(self.one_minus_dampening), *buf * V::splat(self.momentum)) };
        let g = if self.nesterov { buf.mul_add(V::splat(self.momentum), g) } else { *buf };
        *p = g.mul_add(V::splat(self.neg_lr), *p);
    }
}

impl sealed::Sealed for SgdConfig {
    type Aux = ();
    fn run(&self, t: u64, _aux: &mut (), plan: Plan, bufs: Bufs<'_>) -> StepReport {
        let k = SgdKernel {
            grad: GradIn::new(self.maximize, self.weight_decay),
            momentum: self.momentum as f32,
            one_minus_dampening: (1.0 - self.dampening) as f32,
            first: t == 1,
            nesterov: self.nesterov,
            neg_lr: -self.lr as f32,
        };
        match bufs.states() {
            0 => drive::<_, 0>(&k, plan, bufs),
            1 => drive::<_, 1>(&k, plan, bufs),
            _ => unreachable!("state count is checked by the callers"),
        }
    }
}

impl Algorithm for SgdConfig {
    const TORCH_CLASS: &'static str = "SGD";
    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        non_negative("momentum", self.momentum)?;
        finite("dampening", self.dampening)?;
        non_negative("weight_decay", self.weight_decay)?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::InvalidHyperparameter {
                name: "nesterov",
                value: 1.0,
                requirement: "used only with momentum > 0 and dampening == 0",
            });
        }
        Ok(())
    }
    fn state_names(&self) -> &'static [&'static str] {
        if self.momentum != 0.0 { &["momentum_buffer"] } else { &[] }
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
crate::keywords::torch_options!(SgdConfig { lr, momentum, dampening, weight_decay, nesterov, maximize });
