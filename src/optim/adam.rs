//! Adam, AMSGrad and AdamW (`torch.optim.Adam`, `torch.optim.AdamW`).
//!
//! Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015
//! (<https://arxiv.org/abs/1412.6980>); AMSGrad: Reddi et al., ICLR 2018;
//! AdamW: Loshchilov & Hutter, ICLR 2019.
//!
//! Per element, with `t` the step number (1 for the first step):
//! ```text
//! if maximize: g = -g
//! if decoupled_weight_decay: p = p * (1 - lr * weight_decay)
//! elif weight_decay != 0:    g = g + weight_decay * p
//! exp_avg    = lerp(exp_avg, g, 1 - beta1)
//! exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
//! v = exp_avg_sq, or with amsgrad: max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq); v = max_exp_avg_sq
//! denom = sqrt(v) / sqrt(1 - beta2^t) + eps
//! p = p + (-lr / (1 - beta1^t)) * exp_avg / denom
//! ```
//! Scalars (`1 - beta2`, bias corrections, step size) are computed in f64 and
//! rounded to f32 once, as torch does.
//!
//! The kernel evaluates the last two lines in the mathematically identical form
//! `p = p + (-lr sqrt(1 - beta2^t) / (1 - beta1^t)) * exp_avg / (sqrt(v) + eps sqrt(1 - beta2^t))`
//! (both scalars folded in f64): one division per element instead of two, which
//! is what makes the step memory-bound rather than divider-bound. The result
//! differs from torch's rounding by a few ULP at most (golden tests: well under
//! 1/10 of their tolerance).
//!
//! With `torch_exact` the last two lines are evaluated as torch's
//! single-tensor CPU path does, for torch's bits: `sqrt(v)` as torch's MKL
//! computes it on AVX-512 (one Newton step from `vrsqrt14ps`, not
//! correctly rounded), divided by `sqrt(1 - beta2^t)` (Python's `** 0.5`,
//! rounded to f32), plus `eps`; then `p + ((-lr / (1 - beta1^t)) * exp_avg) /
//! denom` (`addcdiv`'s order): two divisions per element. The other lines are
//! torch's already (`lerp` and `addcmul` fused as torch's kernels fuse
//! them). Bit-identical to torch where its MKL takes the AVX-512 path; on
//! other machines torch's own square roots differ (`python3
//! python/benches/torch_sqrt.py`). With `eps = 0` a zero denominator still
//! gives a zero update here where torch divides 0 by 0.

use super::{GradIn, Lerp, Quot, pow_step, sealed};
use crate::math::torch_sqrt;
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::{non_negative, unit_half_open};
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`Adam`](crate::Adam), with `torch.optim.Adam`'s names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Learning rate. Default `1e-3`.
    pub lr: f64,
    /// Decay rates of the first and second moment estimates. Default `(0.9, 0.999)`.
    pub betas: (f64, f64),
    /// Added to the denominator, outside the square root. Default `1e-8`.
    pub eps: f64,
    /// Weight decay: L2 penalty added to the gradient, or with
    /// `decoupled_weight_decay` a multiplicative shrink of the parameters. Default `0`.
    pub weight_decay: f64,
    /// Use the AMSGrad variant (keeps `max_exp_avg_sq`). Default `false`.
    pub amsgrad: bool,
    /// Maximize the objective instead of minimizing. Default `false`.
    pub maximize: bool,
    /// AdamW-style decoupled weight decay. Default `false`.
    pub decoupled_weight_decay: bool,
    /// Not a torch option: evaluate the step as torch's single-tensor CPU
    /// path does (its two divisions and its MKL square root), for torch's
    /// exact bits where torch's MKL takes its AVX-512 path (see the
    /// [module docs](self)). A second division per element: 0.96-1.01x the
    /// default's speed measured with AVX-512 (2 threads, 1M and 64M); the
    /// scalar, `wide` and AVX2 lanes compute `vrsqrt14ps` lane by lane and
    /// are slower. Default `false`.
    pub torch_exact: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
            decoupled_weight_decay: false,
            torch_exact: false,
        }
    }
}

/// Hyperparameters of [`AdamW`](crate::AdamW): `torch.optim.AdamW`, i.e. Adam
/// with decoupled weight decay and `weight_decay` defaulting to `1e-2`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate. Default `1e-3`.
    pub lr: f64,
    /// Decay rates of the moment estimates. Default `(0.9, 0.999)`.
    pub betas: (f64, f64),
    /// Added to the denominator. Default `1e-8`.
    pub eps: f64,
    /// Decoupled weight decay: `p *= 1 - lr * weight_decay` each step. Default `1e-2`.
    pub weight_decay: f64,
    /// Use the AMSGrad variant. Default `false`.
    pub amsgrad: bool,
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
    /// Not a torch option: torch's bits, as [`AdamConfig::torch_exact`]. Default `false`.
    pub torch_exact: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
            maximize: false,
            torch_exact: false,
        }
    }
}

impl From<AdamWConfig> for AdamConfig {
    fn from(c: AdamWConfig) -> Self {
        AdamConfig {
            lr: c.lr,
            betas: c.betas,
            eps: c.eps,
            weight_decay: c.weight_decay,
            amsgrad: c.amsgrad,
            maximize: c.maximize,
            decoupled_weight_decay: true,
            torch_exact: c.torch_exact,
        }
    }
}

pub(crate) fn validate_betas(betas: (f64, f64)) -> Result<(), Error> {
    unit_half_open("betas[0]", betas.0)?;
    unit_half_open("betas[1]", betas.1)
}

impl AdamConfig {
    fn kernel<const TORCH: bool>(&self, t: u64) -> AdamKernel<TORCH> {
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - pow_step(b1, t);
        let bc2 = 1.0 - pow_step(b2, t);
        let moments = Moments::new(self.lr, b1, b2, self.weight_decay, self.decoupled_weight_decay, self.maximize);
        let div = Quot::new(self.eps);
        if TORCH {
            // torch: step_size = lr / bc1; bias_correction2_sqrt = bc2 ** 0.5
            AdamKernel { moments, eps: self.eps as f32, neg_step: (-(self.lr / bc1)) as f32, bc2_sqrt: bc2.powf(0.5) as f32, div }
        } else {
            let eps = (self.eps * bc2.sqrt()) as f32;
            AdamKernel { moments, eps, neg_step: (-(self.lr / bc1) * bc2.sqrt()) as f32, bc2_sqrt: 1.0, div }
        }
    }
}

/// The first lines of the Adam family's formula, shared by Adam and RAdam:
/// `maximize`, the weight decay (coupled into the gradient, or decoupled as
/// a shrink of the parameters), and the two moment updates.
pub(crate) struct Moments {
    grad: GradIn,
    decay: Option<f32>,
    m: Lerp,
    b2: f32,
    one_minus_b2: f32,
}

impl Moments {
    pub(crate) fn new(lr: f64, b1: f64, b2: f64, weight_decay: f64, decoupled: bool, maximize: bool) -> Self {
        Moments {
            grad: GradIn::new(maximize, if decoupled { 0.0 } else { weight_decay }),
            decay: (decoupled && weight_decay != 0.0).then_some((1.0 - lr * weight_decay) as f32),
            m: Lerp::new(1.0 - b1),
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
        }
    }

    /// Whether the gradient is negated first (by the driver).
    pub(crate) fn maximize(&self) -> bool {
        self.grad.maximize
    }

    /// `p` decayed (decoupled), then `m` and `v` updated from the gradient.
    #[inline(always)]
    pub(crate) fn update<V: F32Vec>(&self, p: &mut V, g: V, m: &mut V, v: &mut V) {
        if let Some(d) = self.decay {
            *p = *p * V::splat(d);
        }
        let g = self.grad.apply(*p, g);
        *m = self.m.apply(*m, g);
        // torch: exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        *v = (V::splat(self.one_minus_b2) * g).mul_add(g, *v * V::splat(self.b2));
    }
}

/// Step scalars of one Adam step; `TORCH`: the torch-exact evaluation.
pub(crate) struct AdamKernel<const TORCH: bool> {
    moments: Moments,
    /// `eps * sqrt(1 - beta2^t)`; torch-exact: `eps`
    eps: f32,
    /// `-lr * sqrt(1 - beta2^t) / (1 - beta1^t)`; torch-exact: `-lr / (1 - beta1^t)`
    neg_step: f32,
    /// torch-exact: `(1 - beta2^t) ** 0.5`
    bc2_sqrt: f32,
    div: Quot,
}

impl<const TORCH: bool> AdamKernel<TORCH> {
    #[inline(always)]
    fn body<V: F32Vec>(&self, p: &mut V, g: V, m: &mut V, v: &mut V, vmax: Option<&mut V>) {
        self.moments.update(p, g, m, v);
        let vv = match vmax {
            Some(vmax) => {
                *vmax = vmax.max_nan(*v);
                *vmax
            }
            None => *v,
        };
        let denom = if TORCH {
            // torch: (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            torch_sqrt(vv) / V::splat(self.bc2_sqrt) + V::splat(self.eps)
        } else {
            vv.sqrt() + V::splat(self.eps)
        };
        // torch-exact: param.addcdiv_(exp_avg, denom, value=-step_size)
        *p = *p + self.div.apply(V::splat(self.neg_step) * *m, denom);
    }
}

impl<const TORCH: bool> Kernel<2> for AdamKernel<TORCH> {
    fn maximize(&self) -> bool {
        self.moments.maximize()
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [m, v] = s;
        self.body(p, g, m, v, None)
    }
}

impl<const TORCH: bool> Kernel<3> for AdamKernel<TORCH> {
    fn maximize(&self) -> bool {
        self.moments.maximize()
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 3]) {
        let [m, v, vmax] = s;
        self.body(p, g, m, v, Some(vmax))
    }
}

impl sealed::Sealed for AdamConfig {
    type Aux = ();
    fn run(&self, t: u64, _aux: &mut (), plan: Plan, bufs: Bufs<'_>) -> StepReport {
        fn go<const TORCH: bool>(k: AdamKernel<TORCH>, plan: Plan, bufs: Bufs<'_>) -> StepReport {
            match bufs.states() {
                2 => drive::<_, 2>(&k, plan, bufs),
                3 => drive::<_, 3>(&k, plan, bufs),
                _ => unreachable!("state count is checked by the callers"),
            }
        }
        if self.torch_exact { go(self.kernel::<true>(t), plan, bufs) } else { go(self.kernel::<false>(t), plan, bufs) }
    }
}

impl Algorithm for AdamConfig {
    const TORCH_CLASS: &'static str = "Adam";
    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        non_negative("eps", self.eps)?;
        validate_betas(self.betas)?;
        non_negative("weight_decay", self.weight_decay)
    }
    fn state_names(&self) -> &'static [&'static str] {
        if self.amsgrad { &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] } else { &["exp_avg", "exp_avg_sq"] }
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

impl sealed::Sealed for AdamWConfig {
    type Aux = ();
    fn run(&self, t: u64, aux: &mut (), plan: Plan, bufs: Bufs<'_>) -> StepReport {
        AdamConfig::from(*self).run(t, aux, plan, bufs)
    }
}

impl Algorithm for AdamWConfig {
    const TORCH_CLASS: &'static str = "AdamW";
    fn validate(&self) -> Result<(), Error> {
        AdamConfig::from(*self).validate()
    }
    fn state_names(&self) -> &'static [&'static str] {
        AdamConfig::from(*self).state_names()
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
crate::keywords::torch_options!(AdamConfig { lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, torch_exact });

crate::keywords::torch_options!(AdamWConfig { lr, betas, eps, weight_decay, amsgrad, maximize, torch_exact } fixed { decoupled_weight_decay = true });
