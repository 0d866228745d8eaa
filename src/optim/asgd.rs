//! ASGD (`torch.optim.ASGD`): averaged stochastic gradient descent, Polyak
//! & Juditsky 1992, *Acceleration of stochastic approximation by averaging*,
//! with the decaying step size of Bottou's SGD toolkit.
//!
//! Per element, as torch's single-tensor path (the default on CPU), with `t`
//! the step number and `eta`, `mu` the scalar state left by the previous step
//! (`eta = lr`, `mu = 1` before the first):
//! ```text
//! if maximize: g = -g
//! if weight_decay != 0: g = fma(p, weight_decay, g)      torch's g.add(p, alpha=weight_decay)
//! p = p * (1 - lambd * eta)                              (a multiply by 1 when lambd = 0)
//! p = fma(g, -eta, p)                                    torch's p.add_(g, alpha=-eta)
//! ax = ax + (p - ax) * mu   if mu != 1, else ax = p      (the average; torch's branch)
//! eta = lr / (1 + lambd * lr * t)^alpha                  (f64, stored as f32)
//! mu  = 1 / max(1, t - t0)                               (f64, stored as f32)
//! ```
//! The two `add(alpha=...)` are fused multiply-adds in torch's vectorized CPU
//! kernels and here on every backend (`mul_add`). `eta` and `mu`
//! are per-tensor scalars (torch's 0-d `eta` and `mu` state tensors, f32),
//! computed from the learning rate in force at the step that wrote them, so a
//! schedule acts one step late, as in torch. `ax`, the averaged parameters,
//! is what a user evaluates with; the parameters themselves are the SGD
//! iterate.

use super::{AuxState, sealed};
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::{finite, non_negative};
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`Asgd`](crate::Asgd), with `torch.optim.ASGD`'s
/// names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AsgdConfig {
    /// Learning rate. Default `1e-2`.
    pub lr: f64,
    /// Decay term. Default `1e-4`.
    pub lambd: f64,
    /// Power of the step size's decay. Default `0.75`.
    pub alpha: f64,
    /// The step at which averaging starts. Default `1e6`.
    pub t0: f64,
    /// L2 penalty added to the gradient. Default `0`.
    pub weight_decay: f64,
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
}

impl Default for AsgdConfig {
    fn default() -> Self {
        AsgdConfig { lr: 1e-2, lambd: 1e-4, alpha: 0.75, t0: 1e6, weight_decay: 0.0, maximize: false }
    }
}

/// ASGD's scalar state: torch's `eta` and `mu`, f32 as torch keeps them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AsgdAux {
    eta: f32,
    mu: f32,
}

/// One step; `AVERAGE` is `mu != 1` (else the average is a copy).
struct AsgdKernel<const AVERAGE: bool> {
    maximize: bool,
    wd: f32,
    /// `1 - lambd * eta`.
    decay: f32,
    neg_eta: f32,
    mu: f32,
}

impl<const AVERAGE: bool> Kernel<1> for AsgdKernel<AVERAGE> {
    fn maximize(&self) -> bool {
        self.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 1]) {
        let [ax] = s;
        let g = if self.wd != 0.0 { p.mul_add(V::splat(self.wd), g) } else { g };
        if self.decay != 1.0 {
            *p = *p * V::splat(self.decay);
        }
        *p = g.mul_add(V::splat(self.neg_eta), *p);
        *ax = if AVERAGE { *ax + (*p - *ax) * V::splat(self.mu) } else { *p };
    }
}

impl sealed::Sealed for AsgdConfig {
    type Aux = AsgdAux;
    const AUX_NAMES: &'static [&'static str] = &["eta", "mu"];
    fn aux_to_f32(aux: &AsgdAux) -> AuxState {
        [aux.eta, aux.mu]
    }
    fn aux_from_f32(x: AuxState) -> Option<AsgdAux> {
        Some(AsgdAux { eta: x[0], mu: x[1] })
    }
    fn run(&self, t: u64, aux: &mut AsgdAux, plan: Plan, bufs: Bufs<'_>) -> StepReport {
        let eta = f64::from(aux.eta);
        let (maximize, wd) = (self.maximize, self.weight_decay as f32);
        let (decay, neg_eta, mu) = ((1.0 - self.lambd * eta) as f32, (-eta) as f32, aux.mu);
        let sl = bufs;
        let report = if aux.mu != 1.0 {
            drive::<_, 1>(&AsgdKernel::<true> { maximize, wd, decay, neg_eta, mu }, plan, sl)
        } else {
            drive::<_, 1>(&AsgdKernel::<false> { maximize, wd, decay, neg_eta, mu }, plan, sl)
        };
        // torch's step tensor is f32: `t as f32` is exact below 2^24, and past
        // it torch's own count stops moving, which no run reaches.
        let step = f64::from(t as f32);
        aux.eta = (self.lr / (1.0 + self.lambd * self.lr * step).powf(self.alpha)) as f32;
        aux.mu = (1.0 / (step - self.t0).max(1.0)) as f32;
        report
    }
}

impl Algorithm for AsgdConfig {
    const TORCH_CLASS: &'static str = "ASGD";
    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        non_negative("lambd", self.lambd)?;
        non_negative("alpha", self.alpha)?;
        finite("t0", self.t0)?;
        non_negative("weight_decay", self.weight_decay)
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["ax"]
    }
    fn aux_init(&self) -> AsgdAux {
        AsgdAux { eta: self.lr as f32, mu: 1.0 }
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr_unchecked(&mut self, lr: f64) {
        self.lr = lr;
    }
}

// The torch keyword options: the fields torch's constructor takes.
crate::keywords::torch_options!(AsgdConfig { lr, lambd, alpha, t0, weight_decay, maximize });
