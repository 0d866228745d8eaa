//! Rprop (`torch.optim.Rprop`): resilient backpropagation, Riedmiller &
//! Braun 1993, *A direct adaptive method for faster backpropagation
//! learning: the RPROP algorithm*. Each element keeps its own step size,
//! grown while its gradient keeps its sign and shrunk when the sign flips;
//! the update uses only the gradient's sign.
//!
//! Per element, as torch's single-tensor path (the default on CPU):
//! ```text
//! if maximize: g = -g
//! s = sign(g * prev)                       torch.sign: NaN and zeros give 0
//! f = etaplus if s > 0, etaminus if s < 0, 1 otherwise
//! step_size = clamp(step_size * f, step_sizes.0, step_sizes.1)   (NaN propagates)
//! if s < 0: g = 0                          (no move after a sign flip)
//! p = p - sign(g) * step_size
//! prev = g
//! ```
//! Every operation is exact except the multiplication of the step size and
//! the final subtraction, which torch rounds the same way (its `addcmul_`
//! with `value=-1` multiplies exactly by `±1`), so results are torch's bits.
//! torch creates `step_size` at the first step, filled with the learning rate
//! of that moment; here the first step (`t = 1`) reads the current `lr`
//! instead of the stored buffer, so a learning rate changed before the first
//! step (a scheduler's warm-up) is honoured the same way.

use super::sealed;
use crate::driver::{Bufs, Kernel, Plan, StepReport, drive};
use crate::error::non_negative;
use crate::simd::F32Vec;
use crate::{Algorithm, Error};

/// Hyperparameters of [`Rprop`](crate::Rprop), with `torch.optim.Rprop`'s
/// names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RpropConfig {
    /// Learning rate: the initial step size of every element. Default `1e-2`.
    pub lr: f64,
    /// `(etaminus, etaplus)`: the factors a step size is multiplied by after
    /// a sign flip and after a sign repeat; `0 < etaminus < 1 < etaplus`.
    /// Default `(0.5, 1.2)`.
    pub etas: (f64, f64),
    /// `(min, max)` bounds of the step sizes. Default `(1e-6, 50)`.
    pub step_sizes: (f64, f64),
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
}

impl Default for RpropConfig {
    fn default() -> Self {
        RpropConfig { lr: 1e-2, etas: (0.5, 1.2), step_sizes: (1e-6, 50.0), maximize: false }
    }
}

/// The per-element step; `FIRST` is step 1, which starts from `lr`.
struct RpropKernel<const FIRST: bool> {
    maximize: bool,
    lr: f32,
    etaminus: f32,
    etaplus: f32,
    min: f32,
    max: f32,
}

impl<const FIRST: bool> Kernel<2> for RpropKernel<FIRST> {
    fn maximize(&self) -> bool {
        self.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [prev, step] = s;
        let zero = V::splat(0.0);
        let sign = (g * *prev).sign();
        let factor = zero.lt_select(sign, V::splat(self.etaplus), sign.lt_select(zero, V::splat(self.etaminus), V::splat(1.0)));
        let size = if FIRST { V::splat(self.lr) } else { *step };
        *step = (size * factor).max_nan(V::splat(self.min)).min_nan(V::splat(self.max));
        let g = sign.lt_select(zero, zero, g);
        *p = *p - g.sign() * *step;
        *prev = g;
    }
}

impl sealed::Sealed for RpropConfig {
    type Aux = ();
    fn run(&self, t: u64, _aux: &mut (), plan: Plan, bufs: Bufs<'_>) -> StepReport {
        let sl = bufs;
        let (lr, etaminus, etaplus) = (self.lr as f32, self.etas.0 as f32, self.etas.1 as f32);
        let (min, max, maximize) = (self.step_sizes.0 as f32, self.step_sizes.1 as f32, self.maximize);
        if t == 1 {
            drive::<_, 2>(&RpropKernel::<true> { maximize, lr, etaminus, etaplus, min, max }, plan, sl)
        } else {
            drive::<_, 2>(&RpropKernel::<false> { maximize, lr, etaminus, etaplus, min, max }, plan, sl)
        }
    }
}

impl Algorithm for RpropConfig {
    const TORCH_CLASS: &'static str = "Rprop";
    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        // torch: `0.0 < etas[0] < 1.0 < etas[1]`.
        let (lo, hi) = self.etas;
        if !(lo > 0.0 && lo < 1.0) {
            return Err(Error::InvalidHyperparameter { name: "etas[0]", value: lo, requirement: "in (0, 1)" });
        }
        if !(hi > 1.0 && hi.is_finite()) {
            return Err(Error::InvalidHyperparameter { name: "etas[1]", value: hi, requirement: "finite and > 1" });
        }
        // torch checks nothing here; a NaN bound would make every step size NaN.
        for (name, x) in [("step_sizes[0]", self.step_sizes.0), ("step_sizes[1]", self.step_sizes.1)] {
            if x.is_nan() {
                return Err(Error::InvalidHyperparameter { name, value: x, requirement: "not NaN" });
            }
        }
        Ok(())
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["prev", "step_size"]
    }
    fn state_init(&self, i: usize) -> f32 {
        // torch fills `step_size` with the learning rate.
        if i == 1 { self.lr as f32 } else { 0.0 }
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
crate::keywords::torch_options!(RpropConfig { lr, etas, step_sizes, maximize });
