//! NAdam (`torch.optim.NAdam`): Dozat, *Incorporating Nesterov Momentum into
//! Adam*, ICLR 2016 workshop, with torch's momentum-decay schedule.
//!
//! Per step `t` (scalars, f64):
//! ```text
//! mu_t   = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))
//! mu_t1  = beta1 * (1 - 0.5 * 0.96^((t + 1) * momentum_decay))
//! mu_product = mu_product * mu_t               (f32, starts at 1, as torch's state tensor)
//! c_g = -lr * (1 - mu_t) / (1 - mu_product)
//! c_m = -lr * mu_t1 / (1 - mu_product * mu_t1)
//! ```
//! Per element:
//! ```text
//! if maximize: g = -g
//! if decoupled_weight_decay: p = p * (1 - lr * weight_decay)
//! elif weight_decay != 0:    g = g + weight_decay * p
//! exp_avg    = lerp(exp_avg, g, 1 - beta1)
//! exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
//! denom = sqrt(exp_avg_sq / (1 - beta2^t)) + eps
//! p = p + c_g * g / denom
//! p = p + c_m * exp_avg / denom
//! ```
//! The kernel evaluates the last three lines in the mathematically identical
//! form `p = p + (s c_g * g + s c_m * exp_avg) / (sqrt(exp_avg_sq) + s eps)` with
//! `s = sqrt(1 - beta2^t)` folded into the scalars in f64: one square root and
//! one division per element instead of one square root and three divisions.
//! It differs from torch's rounding by a few ULP at most. With `torch_exact`
//! nothing is folded: `denom = sqrt(exp_avg_sq / (1 - beta2^t)) + eps` with
//! torch's square root (MKL's on AVX-512), then torch's two `addcdiv_`:
//! torch's bits where torch's MKL takes its AVX-512 path.

use super::adam::validate_betas;
use super::{GradIn, Lerp, Quot, pow_step, sealed};
use crate::math::torch_sqrt;
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::non_negative;
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`NAdam`](crate::NAdam), with `torch.optim.NAdam`'s names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NAdamConfig {
    /// Learning rate. Default `2e-3`.
    pub lr: f64,
    /// Decay rates of the moment estimates. Default `(0.9, 0.999)`.
    pub betas: (f64, f64),
    /// Added to the denominator. Default `1e-8`.
    pub eps: f64,
    /// L2 penalty, or with `decoupled_weight_decay` a shrink of the parameters. Default `0`.
    pub weight_decay: f64,
    /// Momentum decay `psi` of the `mu_t` schedule. Default `4e-3`.
    pub momentum_decay: f64,
    /// AdamW-style decoupled weight decay (torch's NAdamW). Default `false`.
    pub decoupled_weight_decay: bool,
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
    /// Not a torch option: evaluate the step as torch's single-tensor CPU
    /// path does, square roots included (torch's MKL ones on AVX-512), for
    /// torch's exact bits there (see the module docs). Default `false`.
    pub torch_exact: bool,
}

impl Default for NAdamConfig {
    fn default() -> Self {
        NAdamConfig {
            lr: 2e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            momentum_decay: 4e-3,
            decoupled_weight_decay: false,
            maximize: false,
            torch_exact: false,
        }
    }
}

/// `TORCH`: torch's evaluation (`torch_exact`).
struct NAdamKernel<const TORCH: bool> {
    grad: GradIn,
    decay: Option<f32>,
    m: Lerp,
    b2: f32,
    one_minus_b2: f32,
    /// `eps * sqrt(1 - beta2^t)`
    eps_scaled: f32,
    /// `c_g * sqrt(1 - beta2^t)`
    c_g: f32,
    /// `c_m * sqrt(1 - beta2^t)`
    c_m: f32,
    /// torch-exact: `1 - beta2^t`, which divides `exp_avg_sq` under the root
    /// (then `eps`, `c_g` and `c_m` are not scaled); unused otherwise.
    bc2: f32,
    div: Quot,
}

impl<const TORCH: bool> Kernel<2> for NAdamKernel<TORCH> {
    fn maximize(&self) -> bool {
        self.grad.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [m, v] = s;
        if let Some(d) = self.decay {
            *p = *p * V::splat(d);
        }
        let g = self.grad.apply(*p, g);
        *m = self.m.apply(*m, g);
        // torch: exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        *v = (V::splat(self.one_minus_b2) * g).mul_add(g, *v * V::splat(self.b2));
        let denom = if TORCH {
            // torch: exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
            torch_sqrt(*v / V::splat(self.bc2)) + V::splat(self.eps_scaled)
        } else {
            v.sqrt() + V::splat(self.eps_scaled)
        };
        // torch's two addcdiv_, in its order: p += (c_g g) / denom; p += (c_m m) / denom.
        *p = *p + self.div.apply(V::splat(self.c_g) * g, denom);
        *p = *p + self.div.apply(V::splat(self.c_m) * *m, denom);
    }
}

impl sealed::Sealed for NAdamConfig {
    /// `mu_product`, kept in f32 like torch's state tensor.
    type Aux = f32;
    const AUX_NAMES: &'static [&'static str] = &["mu_product"];
    fn aux_to_f32(aux: &f32) -> super::AuxState {
        [*aux, 0.0]
    }
    fn aux_from_f32(x: super::AuxState) -> Option<f32> {
        Some(x[0])
    }
    fn run(&self, t: u64, mu_product: &mut f32, plan: Plan, bufs: Bufs<'_>) -> StepReport {
        let (report, prod) = if self.torch_exact {
            let (k, prod) = self.kernel::<true>(t, *mu_product);
            (drive::<_, 2>(&k, plan, bufs), prod)
        } else {
            let (k, prod) = self.kernel::<false>(t, *mu_product);
            (drive::<_, 2>(&k, plan, bufs), prod)
        };
        *mu_product = prod;
        report
    }
}

impl NAdamConfig {
    /// Step `t`'s kernel, and the `mu_product` it leaves.
    fn kernel<const TORCH: bool>(&self, t: u64, mu_product: f32) -> (NAdamKernel<TORCH>, f32) {
        let (b1, b2) = self.betas;
        let mu = b1 * (1.0 - 0.5 * 0.96f64.powf(t as f64 * self.momentum_decay));
        let mu_next = b1 * (1.0 - 0.5 * 0.96f64.powf((t + 1) as f64 * self.momentum_decay));
        let prod = mu_product * mu as f32;
        let prod_next = prod as f64 * mu_next;
        let decoupled = self.decoupled_weight_decay;
        let bc2 = 1.0 - pow_step(b2, t);
        // torch-exact: the root of `v / bc2` is taken per element, nothing is folded
        let bc2_sqrt = if TORCH { 1.0 } else { bc2.sqrt() };
        let k = NAdamKernel {
            grad: GradIn::new(self.maximize, if decoupled { 0.0 } else { self.weight_decay }),
            decay: (decoupled && self.weight_decay != 0.0).then_some((1.0 - self.lr * self.weight_decay) as f32),
            m: Lerp::new(1.0 - b1),
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            eps_scaled: (self.eps * bc2_sqrt) as f32,
            c_g: (-self.lr * (1.0 - mu) / (1.0 - prod as f64) * bc2_sqrt) as f32,
            c_m: (-self.lr * mu_next / (1.0 - prod_next) * bc2_sqrt) as f32,
            bc2: bc2 as f32,
            div: Quot::new(self.eps),
        };
        (k, prod)
    }
}

impl Algorithm for NAdamConfig {
    const TORCH_CLASS: &'static str = "NAdam";
    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        non_negative("eps", self.eps)?;
        validate_betas(self.betas)?;
        non_negative("weight_decay", self.weight_decay)?;
        non_negative("momentum_decay", self.momentum_decay)
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }
    fn aux_init(&self) -> f32 {
        1.0
    }
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
crate::keywords::torch_options!(NAdamConfig { lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize, torch_exact });
