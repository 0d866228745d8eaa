//! Learning-rate schedules with `torch.optim.lr_scheduler`'s names, parameters
//! and defaults, as pure closed-form functions of the step.
//!
//! `lr_at(t)` is the learning rate in force for step `t`, where `t` counts
//! `scheduler.step()` calls in torch (`t = 0` before the first). Nothing is
//! accumulated from step to step, so nothing drifts: `lr_at(10^9)` costs the
//! same and is as exact as `lr_at(1)`. Every constructor validates its
//! arguments and returns [`Error::InvalidHyperparameter`] naming the field, so
//! a schedule that exists never yields NaN or infinity.
//!
//! ```
//! use adaoptim::schedule::{LrSchedule, warmup_cosine};
//! use adaoptim::{Adam, AdamConfig};
//!
//! let sched = warmup_cosine(1e-3, 100, 1000, 0.01, 0.0)?;
//! let mut opt = Adam::new(AdamConfig::default(), 4)?;
//! let (mut p, g) = ([0.5f32; 4], [0.1f32; 4]);
//! for _ in 0..3 {
//!     opt.step_scheduled(&sched, &mut p, &g)?; // sets lr = sched.lr_at(step) then steps
//! }
//! assert!((opt.lr() - sched.lr_at(2)).abs() < 1e-18);
//! # Ok::<(), adaoptim::Error>(())
//! ```
//!
//! Momentum cycling ([`CyclicLR`], [`OneCycleLR`] with `cycle_momentum`) is
//! reported by [`LrSchedule::momentum_at`] and applied by
//! [`Optimizer::step_scheduled`](crate::Optimizer::step_scheduled) to SGD's and
//! RMSprop's `momentum` or the Adam family's `beta1`, as torch does.

use std::f64::consts::PI;

use crate::Error;

/// A learning-rate schedule: a pure function of the step.
pub trait LrSchedule {
    /// The learning rate for step `t` (`t = 0` before any `scheduler.step()`).
    fn lr_at(&self, t: u64) -> f64;
    /// The momentum (or `beta1`) for step `t`, for schedules that cycle it.
    fn momentum_at(&self, _t: u64) -> Option<f64> {
        None
    }
    /// Documented bounds `(lo, hi)`: `lo <= lr_at(t) <= hi` for every `t`.
    fn bounds(&self) -> (f64, f64);
}

fn bad(name: &'static str, value: f64, requirement: &'static str) -> Error {
    Error::InvalidHyperparameter { name, value, requirement }
}

fn check_lr(name: &'static str, v: f64) -> Result<(), Error> {
    if v.is_finite() && v >= 0.0 { Ok(()) } else { Err(bad(name, v, "finite and >= 0")) }
}

fn check_positive_steps(name: &'static str, v: u64) -> Result<(), Error> {
    if v >= 1 { Ok(()) } else { Err(bad(name, v as f64, ">= 1")) }
}

/// A decay factor: torch accepts any value, but one above 1 overflows to
/// infinity over a long run, so it is rejected here.
fn check_gamma(v: f64) -> Result<(), Error> {
    if (0.0..=1.0).contains(&v) { Ok(()) } else { Err(bad("gamma", v, "in [0, 1] (a growing schedule overflows)")) }
}

fn powu(x: f64, n: u64) -> f64 {
    x.powf(n as f64)
}

/// `ConstantLR`: `base_lr * factor` for `t < total_iters`, then `base_lr`.
/// torch defaults: `factor = 1/3`, `total_iters = 5`. Bounds: between
/// `base_lr * factor` and `base_lr`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstantLR {
    base_lr: f64,
    factor: f64,
    total_iters: u64,
}

impl ConstantLR {
    /// # Errors
    /// `factor` outside `[0, 1]` (torch's condition) or a bad `base_lr`.
    pub fn new(base_lr: f64, factor: f64, total_iters: u64) -> Result<Self, Error> {
        check_lr("base_lr", base_lr)?;
        if !(0.0..=1.0).contains(&factor) {
            return Err(bad("factor", factor, "in [0, 1]"));
        }
        Ok(ConstantLR { base_lr, factor, total_iters })
    }
}

impl LrSchedule for ConstantLR {
    fn lr_at(&self, t: u64) -> f64 {
        if t < self.total_iters { self.base_lr * self.factor } else { self.base_lr }
    }
    fn bounds(&self) -> (f64, f64) {
        (self.base_lr * self.factor, self.base_lr)
    }
}

/// `StepLR` (the lecture's step decay): `base_lr * gamma^floor(t / step_size)`.
/// torch default `gamma = 0.1`. Bounds: `[0, base_lr]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLR {
    base_lr: f64,
    step_size: u64,
    gamma: f64,
}

impl StepLR {
    /// # Errors
    /// `step_size == 0`, `gamma` outside `[0, 1]`, or a bad `base_lr`.
    pub fn new(base_lr: f64, step_size: u64, gamma: f64) -> Result<Self, Error> {
        check_lr("base_lr", base_lr)?;
        check_positive_steps("step_size", step_size)?;
        check_gamma(gamma)?;
        Ok(StepLR { base_lr, step_size, gamma })
    }
}

impl LrSchedule for StepLR {
    fn lr_at(&self, t: u64) -> f64 {
        self.base_lr * powu(self.gamma, t / self.step_size)
    }
    fn bounds(&self) -> (f64, f64) {
        (0.0, self.base_lr)
    }
}

/// `MultiStepLR`: `base_lr * gamma^(number of milestones <= t)`.
/// torch default `gamma = 0.1`. Bounds: `[0, base_lr]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiStepLR {
    base_lr: f64,
    milestones: Vec<u64>,
    gamma: f64,
}

impl MultiStepLR {
    /// Milestones may come in any order and repeat (a repeated milestone
    /// decays twice, as in torch's `Counter`).
    ///
    /// # Errors
    /// `gamma` outside `[0, 1]` or a bad `base_lr`.
    pub fn new(base_lr: f64, mut milestones: Vec<u64>, gamma: f64) -> Result<Self, Error> {
        check_lr("base_lr", base_lr)?;
        check_gamma(gamma)?;
        milestones.sort_unstable();
        Ok(MultiStepLR { base_lr, milestones, gamma })
    }
}

impl LrSchedule for MultiStepLR {
    fn lr_at(&self, t: u64) -> f64 {
        let passed = self.milestones.partition_point(|&m| m <= t) as u64;
        self.base_lr * powu(self.gamma, passed)
    }
    fn bounds(&self) -> (f64, f64) {
        (0.0, self.base_lr)
    }
}

/// `ExponentialLR` (the lecture's exponential decay): `base_lr * gamma^t`.
/// Bounds: `[0, base_lr]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExponentialLR {
    base_lr: f64,
    gamma: f64,
}

impl ExponentialLR {
    /// # Errors
    /// `gamma` outside `[0, 1]` or a bad `base_lr`.
    pub fn new(base_lr: f64, gamma: f64) -> Result<Self, Error> {
        check_lr("base_lr", base_lr)?;
        check_gamma(gamma)?;
        Ok(ExponentialLR { base_lr, gamma })
    }

    /// The lecture's form `eta_0 * e^(-lambda t)`: `gamma = e^(-lambda)`.
    ///
    /// # Errors
    /// `lambda` negative or not finite.
    pub fn from_decay_rate(base_lr: f64, lambda: f64) -> Result<Self, Error> {
        if !(lambda.is_finite() && lambda >= 0.0) {
            return Err(bad("lambda", lambda, "finite and >= 0"));
        }
        ExponentialLR::new(base_lr, (-lambda).exp())
    }
}

impl LrSchedule for ExponentialLR {
    fn lr_at(&self, t: u64) -> f64 {
        self.base_lr * powu(self.gamma, t)
    }
    fn bounds(&self) -> (f64, f64) {
        (0.0, self.base_lr)
    }
}

/// `LinearLR`: the factor moves linearly from `start_factor` to `end_factor`
/// over `total_iters` steps, then stays:
/// `base_lr * (start + (end - start) * min(t, total_iters) / total_iters)`.
/// torch defaults: `start_factor = 1/3`, `end_factor = 1`, `total_iters = 5`.
/// Bounds: between `base_lr * start_factor` and `base_lr * end_factor`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearLR {
    base_lr: f64,
    start_factor: f64,
    end_factor: f64,
    total_iters: u64,
}

impl LinearLR {
    /// # Errors
    /// torch's conditions: `start_factor` in `(0, 1]`, `end_factor` in
    /// `[0, 1]`; and `total_iters >= 1`.
    pub fn new(base_lr: f64, start_factor: f64, end_factor: f64, total_iters: u64) -> Result<Self, Error> {
        check_lr("base_lr", base_lr)?;
        if !(start_factor > 0.0 && start_factor <= 1.0) {
            return Err(bad("start_factor", start_factor, "in (0, 1]"));
        }
        if !(0.0..=1.0).contains(&end_factor) {
            return Err(bad("end_factor", end_factor, "in [0, 1]"));
        }
        check_positive_steps("total_iters", total_iters)?;
        Ok(LinearLR { base_lr, start_factor, end_factor, total_iters })
    }
}

impl LrSchedule for LinearLR {
    fn lr_at(&self, t: u64) -> f64 {
        let frac = t.min(self.total_iters) as f64 / self.total_iters as f64;
        self.base_lr * (self.start_factor + (self.end_factor - self.start_factor) * frac)
    }
    fn bounds(&self) -> (f64, f64) {
        let (a, b) = (self.base_lr * self.start_factor, self.base_lr * self.end_factor);
        (a.min(b), a.max(b))
    }
}

/// `PolynomialLR`: `base_lr * (1 - min(t, total_iters) / total_iters)^power`.
/// torch defaults: `total_iters = 5`, `power = 1`. Bounds: `[0, base_lr]`.
#[derive(Clone, Debug, PartialEq)]
pub struct PolynomialLR {
    base_lr: f64,
    total_iters: u64,
    power: f64,
}

impl PolynomialLR {
    /// # Errors
    /// `total_iters == 0`, or `power` negative or not finite (0 to a
    /// negative power is infinite).
    pub fn new(base_lr: f64, total_iters: u64, power: f64) -> Result<Self, Error> {
        check_lr("base_lr", base_lr)?;
        check_positive_steps("total_iters", total_iters)?;
        if !(power.is_finite() && power >= 0.0) {
            return Err(bad("power", power, "finite and >= 0"));
        }
        Ok(PolynomialLR { base_lr, total_iters, power })
    }
}

impl LrSchedule for PolynomialLR {
    fn lr_at(&self, t: u64) -> f64 {
        let frac = t.min(self.total_iters) as f64 / self.total_iters as f64;
        self.base_lr * (1.0 - frac).powf(self.power)
    }
    fn bounds(&self) -> (f64, f64) {
        (0.0, self.base_lr)
    }
}

/// `CosineAnnealingLR`:
/// `eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2`.
/// Past `T_max` the cosine continues (back up to `base_lr` at `2 T_max`), as
/// torch's recursive form does. torch default `eta_min = 0`. Bounds: between
/// `eta_min` and `base_lr`.
#[derive(Clone, Debug, PartialEq)]
pub struct CosineAnnealingLR {
    base_lr: f64,
    t_max: u64,
    eta_min: f64,
}

impl CosineAnnealingLR {
    /// # Errors
    /// `T_max == 0`, or a bad `base_lr` / `eta_min`.
    pub fn new(base_lr: f64, t_max: u64, eta_min: f64) -> Result<Self, Error> {
        check_lr("base_lr", base_lr)?;
        check_positive_steps("T_max", t_max)?;
        check_lr("eta_min", eta_min)?;
        Ok(CosineAnnealingLR { base_lr, t_max, eta_min })
    }
}

fn cosine(lo: f64, hi: f64, pos: f64, len: f64) -> f64 {
    // torch: `lo + (hi - lo) * (1 + cos) / 2`. Halving before the product is
    // the same number whenever neither over- nor underflows, and cannot
    // overflow for `hi` near `f64::MAX`.
    lerp(lo, hi, (1.0 + (PI * pos / len).cos()) / 2.0)
}

/// `a + (b - a) * f` for `f` in `[0, 1]`, kept inside `[min(a, b), max(a, b)]`:
/// rounding (notably of subnormal rates, where products lose bits) can
/// otherwise step one ulp outside the interval, e.g. below zero.
fn lerp(a: f64, b: f64, f: f64) -> f64 {
    between(a + (b - a) * f, a, b)
}

/// `v` clamped into `[min(a, b), max(a, b)]` (no panic on any input).
fn between(v: f64, a: f64, b: f64) -> f64 {
    v.max(a.min(b)).min(a.max(b))
}

impl LrSchedule for CosineAnnealingLR {
    fn lr_at(&self, t: u64) -> f64 {
        // The cosine has period 2 T_max: reduce t first so huge t stays exact.
        let pos = self.t_max.checked_mul(2).map_or(t, |period| t % period);
        cosine(self.eta_min, self.base_lr, pos as f64, self.t_max as f64)
    }
    fn bounds(&self) -> (f64, f64) {
        (self.eta_min.min(self.base_lr), self.eta_min.max(self.base_lr))
    }
}

/// `CosineAnnealingWarmRestarts` (SGDR, Loshchilov & Hutter 2017): cosine
/// from `base_lr` to `eta_min` over `T_i` steps, then restart, with
/// `T_0, T_0 T_mult, T_0 T_mult^2, ...`. torch defaults: `T_mult = 1`,
/// `eta_min = 0`. Bounds: between `eta_min` and `base_lr`.
#[derive(Clone, Debug, PartialEq)]
pub struct CosineAnnealingWarmRestarts {
    base_lr: f64,
    t_0: u64,
    t_mult: u64,
    eta_min: f64,
}

impl CosineAnnealingWarmRestarts {
    /// # Errors
    /// torch's conditions: `T_0 >= 1`, `T_mult >= 1`; a bad `eta_min`.
    pub fn new(base_lr: f64, t_0: u64, t_mult: u64, eta_min: f64) -> Result<Self, Error> {
        check_lr("base_lr", base_lr)?;
        check_positive_steps("T_0", t_0)?;
        check_positive_steps("T_mult", t_mult)?;
        check_lr("eta_min", eta_min)?;
        Ok(CosineAnnealingWarmRestarts { base_lr, t_0, t_mult, eta_min })
    }

    /// `(T_cur, T_i)` at step `t`, in exact integer arithmetic.
    fn position(&self, t: u64) -> (u64, u64) {
        if self.t_mult == 1 {
            return (t % self.t_0, self.t_0);
        }
        let (mut start, mut len) = (0u64, self.t_0);
        loop {
            match start.checked_add(len) {
                Some(end) if t >= end => {
                    start = end;
                    len = len.saturating_mul(self.t_mult);
                }
                _ => return (t - start, len),
            }
        }
    }
}

impl LrSchedule for CosineAnnealingWarmRestarts {
    fn lr_at(&self, t: u64) -> f64 {
        let (cur, len) = self.position(t);
        cosine(self.eta_min, self.base_lr, cur as f64, len as f64)
    }
    fn bounds(&self) -> (f64, f64) {
        (self.eta_min.min(self.base_lr), self.eta_min.max(self.base_lr))
    }
}

/// `CyclicLR`'s policies.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum CyclicMode {
    /// Constant amplitude.
    Triangular,
    /// Amplitude halved every cycle.
    Triangular2,
    /// Amplitude scaled by `gamma^t` (per step).
    ExpRange {
        /// Per-step decay of the amplitude, in `(0, 1]`.
        gamma: f64,
    },
}

/// `CyclicLR` (Smith 2017, the lecture's triangular schedule): the learning
/// rate goes from `base_lr` up to `max_lr` in `step_size_up` steps and back in
/// `step_size_down` steps (default: the same), the amplitude scaled per
/// `mode`. With `cycle_momentum` the momentum moves the opposite way between
/// `max_momentum` and `base_momentum`. torch defaults: `step_size_up = 2000`,
/// `mode = triangular`, `gamma = 1`, `cycle_momentum = true`,
/// `base_momentum = 0.8`, `max_momentum = 0.9`. Bounds: between `base_lr` and
/// `max_lr`.
#[derive(Clone, Debug, PartialEq)]
pub struct CyclicLR {
    base_lr: f64,
    max_lr: f64,
    total: u64,
    step_ratio: f64,
    mode: CyclicMode,
    momentum: Option<(f64, f64)>,
}

impl CyclicLR {
    /// `step_size_down = None` means equal to `step_size_up`;
    /// `cycle_momentum = Some((base_momentum, max_momentum))` cycles momentum.
    /// Note that torch's `CyclicLR` takes its `base_lr` from its own argument,
    /// not from the optimizer.
    ///
    /// # Errors
    /// Zero step sizes, non-finite or negative rates, an `exp_range` gamma
    /// outside `(0, 1]`, or momenta outside `[0, 1)`.
    pub fn new(
        base_lr: f64,
        max_lr: f64,
        step_size_up: u64,
        step_size_down: Option<u64>,
        mode: CyclicMode,
        cycle_momentum: Option<(f64, f64)>,
    ) -> Result<Self, Error> {
        check_lr("base_lr", base_lr)?;
        check_lr("max_lr", max_lr)?;
        check_positive_steps("step_size_up", step_size_up)?;
        let down = step_size_down.unwrap_or(step_size_up);
        check_positive_steps("step_size_down", down)?;
        if let CyclicMode::ExpRange { gamma } = mode
            && !(gamma > 0.0 && gamma <= 1.0)
        {
            return Err(bad("gamma", gamma, "in (0, 1]"));
        }
        if let Some((lo, hi)) = cycle_momentum {
            for (name, m) in [("base_momentum", lo), ("max_momentum", hi)] {
                if !(0.0..1.0).contains(&m) {
                    return Err(bad(name, m, "in [0, 1)"));
                }
            }
        }
        let total = step_size_up
            .checked_add(down)
            .ok_or_else(|| bad("step_size_down", down as f64, "such that step_size_up + step_size_down fits in u64"))?;
        let step_ratio = step_size_up as f64 / total as f64;
        Ok(CyclicLR { base_lr, max_lr, total, step_ratio, mode, momentum: cycle_momentum })
    }

    /// `(scale_factor, amplitude scale)` at step `t`, torch's formulas.
    ///
    /// torch computes `cycle = floor(1 + t / total)` and
    /// `x = 1 + t / total - cycle` in floating point, which loses the
    /// position within the cycle as `t` grows; the same quantities are taken
    /// here from integer division, so the schedule repeats exactly.
    fn phase(&self, t: u64) -> (f64, f64) {
        let total = self.total;
        let cycle = (t / total) as f64 + 1.0;
        let x = (t % total) as f64 / total as f64;
        let scale_factor = if x <= self.step_ratio { x / self.step_ratio } else { (x - 1.0) / (self.step_ratio - 1.0) };
        let amplitude = match self.mode {
            CyclicMode::Triangular => 1.0,
            CyclicMode::Triangular2 => 1.0 / 2f64.powf(cycle - 1.0),
            CyclicMode::ExpRange { gamma } => gamma.powf(t as f64),
        };
        (scale_factor, amplitude)
    }
}

impl LrSchedule for CyclicLR {
    fn lr_at(&self, t: u64) -> f64 {
        let (s, a) = self.phase(t);
        between(self.base_lr + (self.max_lr - self.base_lr) * s * a, self.base_lr, self.max_lr)
    }
    fn momentum_at(&self, t: u64) -> Option<f64> {
        let (lo, hi) = self.momentum?;
        let (s, a) = self.phase(t);
        Some(between(hi - (hi - lo) * s * a, lo, hi))
    }
    fn bounds(&self) -> (f64, f64) {
        (self.base_lr.min(self.max_lr), self.base_lr.max(self.max_lr))
    }
}

/// `OneCycleLR`'s annealing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Anneal {
    /// Cosine annealing (torch's default).
    Cos,
    /// Linear annealing.
    Linear,
}

/// `OneCycleLR` (Smith & Topin 2018): from `max_lr / div_factor` up to
/// `max_lr` over `pct_start` of `total_steps`, then down to
/// `initial_lr / final_div_factor` (with `three_phase`, back to the initial
/// rate first, then down). torch defaults: `pct_start = 0.3`,
/// `anneal_strategy = cos`, `div_factor = 25`, `final_div_factor = 1e4`,
/// `three_phase = false`, `cycle_momentum = true` with
/// `base_momentum = 0.85`, `max_momentum = 0.95`. Past `total_steps` (where
/// torch raises) the final rate holds. Bounds: between the smallest and the
/// largest phase endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct OneCycleLR {
    total_steps: u64,
    anneal: Anneal,
    /// `(end_step, start_lr, end_lr, start_momentum, end_momentum)`
    phases: Vec<(f64, f64, f64, f64, f64)>,
    cycle_momentum: bool,
}

/// [`OneCycleLR`]'s arguments with torch's names and defaults. torch has
/// no default for `max_lr` and `total_steps`; here they default to 0, which
/// [`OneCycleLR::from_config`] rejects, so set them:
/// `OneCycleLRConfig { max_lr: 0.1, total_steps: 1000, ..Default::default() }`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OneCycleLRConfig {
    /// The peak rate.
    pub max_lr: f64,
    /// Steps in the cycle.
    pub total_steps: u64,
    /// Fraction of the cycle spent raising the rate. Default `0.3`.
    pub pct_start: f64,
    /// Default [`Anneal::Cos`].
    pub anneal_strategy: Anneal,
    /// `initial_lr = max_lr / div_factor`. Default `25`.
    pub div_factor: f64,
    /// `min_lr = initial_lr / final_div_factor`. Default `1e4`.
    pub final_div_factor: f64,
    /// Default `false`.
    pub three_phase: bool,
    /// Cycle the momentum (or `beta1`) inversely to the rate. Default `true`.
    pub cycle_momentum: bool,
    /// Default `0.85`.
    pub base_momentum: f64,
    /// Default `0.95`.
    pub max_momentum: f64,
}

impl Default for OneCycleLRConfig {
    fn default() -> Self {
        OneCycleLRConfig {
            max_lr: 0.0,
            total_steps: 0,
            pct_start: 0.3,
            anneal_strategy: Anneal::Cos,
            div_factor: 25.0,
            final_div_factor: 1e4,
            three_phase: false,
            cycle_momentum: true,
            base_momentum: 0.85,
            max_momentum: 0.95,
        }
    }
}

impl OneCycleLR {
    /// The schedule from named arguments.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn from_config(c: &OneCycleLRConfig) -> Result<Self, Error> {
        Self::new(
            c.max_lr,
            c.total_steps,
            c.pct_start,
            c.anneal_strategy,
            c.div_factor,
            c.final_div_factor,
            c.three_phase,
            c.cycle_momentum.then_some((c.base_momentum, c.max_momentum)),
        )
    }

    /// `cycle_momentum = Some((base_momentum, max_momentum))`. The arguments
    /// mirror torch's signature, in its order.
    ///
    /// # Errors
    /// `total_steps == 0`, `pct_start` outside `(0, 1)`, non-positive or
    /// non-finite `max_lr`, `div_factor` or `final_div_factor`, or momenta
    /// outside `[0, 1)`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        max_lr: f64,
        total_steps: u64,
        pct_start: f64,
        anneal: Anneal,
        div_factor: f64,
        final_div_factor: f64,
        three_phase: bool,
        cycle_momentum: Option<(f64, f64)>,
    ) -> Result<Self, Error> {
        check_lr("max_lr", max_lr)?;
        check_positive_steps("total_steps", total_steps)?;
        if !(pct_start > 0.0 && pct_start < 1.0) {
            return Err(bad("pct_start", pct_start, "in (0, 1)"));
        }
        for (name, v) in [("div_factor", div_factor), ("final_div_factor", final_div_factor)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(name, v, "finite and > 0"));
            }
        }
        let (mlo, mhi) = cycle_momentum.unwrap_or((0.85, 0.95));
        for (name, m) in [("base_momentum", mlo), ("max_momentum", mhi)] {
            if !(0.0..1.0).contains(&m) {
                return Err(bad(name, m, "in [0, 1)"));
            }
        }
        let initial = max_lr / div_factor;
        if !initial.is_finite() {
            return Err(bad("div_factor", div_factor, "such that max_lr / div_factor is finite"));
        }
        let min_lr = initial / final_div_factor;
        if !min_lr.is_finite() {
            return Err(bad("final_div_factor", final_div_factor, "such that the final rate is finite"));
        }
        let n = total_steps as f64;
        let phases = if three_phase {
            vec![
                (pct_start * n - 1.0, initial, max_lr, mhi, mlo),
                (2.0 * pct_start * n - 2.0, max_lr, initial, mlo, mhi),
                (n - 1.0, initial, min_lr, mhi, mhi),
            ]
        } else {
            vec![(pct_start * n - 1.0, initial, max_lr, mhi, mlo), (n - 1.0, max_lr, min_lr, mlo, mhi)]
        };
        Ok(OneCycleLR { total_steps, anneal, phases, cycle_momentum: cycle_momentum.is_some() })
    }

    fn anneal(&self, start: f64, end: f64, pct: f64) -> f64 {
        match self.anneal {
            // torch: `end + (start - end) / 2 * (cos + 1)`; see `cosine`.
            Anneal::Cos => lerp(end, start, ((PI * pct).cos() + 1.0) / 2.0),
            // torch: `(end - start) * pct + start`.
            Anneal::Linear => lerp(start, end, pct),
        }
    }

    /// `(lr, momentum)` at step `t`, torch's phase walk.
    fn at(&self, t: u64) -> (f64, f64) {
        let step = t.min(self.total_steps - 1) as f64;
        let mut start_step = 0.0;
        for (i, &(end_step, lr0, lr1, m0, m1)) in self.phases.iter().enumerate() {
            if step <= end_step || i == self.phases.len() - 1 {
                let span = end_step - start_step;
                // A phase of zero length (tiny total_steps) is at its end.
                let pct = if span > 0.0 { ((step - start_step) / span).clamp(0.0, 1.0) } else { 1.0 };
                return (self.anneal(lr0, lr1, pct), self.anneal(m0, m1, pct));
            }
            start_step = end_step;
        }
        unreachable!("the last phase always matches")
    }
}

impl LrSchedule for OneCycleLR {
    fn lr_at(&self, t: u64) -> f64 {
        self.at(t).0
    }
    fn momentum_at(&self, t: u64) -> Option<f64> {
        self.cycle_momentum.then(|| self.at(t).1)
    }
    fn bounds(&self) -> (f64, f64) {
        let ends = self.phases.iter().flat_map(|p| [p.1, p.2]);
        (ends.clone().fold(f64::INFINITY, f64::min), ends.fold(f64::NEG_INFINITY, f64::max))
    }
}

/// Any schedule of this module, for composition and configuration files.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
#[non_exhaustive]
pub enum Schedule {
    Constant(ConstantLR),
    Step(StepLR),
    MultiStep(MultiStepLR),
    Exponential(ExponentialLR),
    Linear(LinearLR),
    Polynomial(PolynomialLR),
    CosineAnnealing(CosineAnnealingLR),
    CosineAnnealingWarmRestarts(CosineAnnealingWarmRestarts),
    Cyclic(CyclicLR),
    OneCycle(OneCycleLR),
    Sequential(SequentialLR),
    Chained(ChainedScheduler),
}

macro_rules! dispatch {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Schedule::Constant($s) => $e,
            Schedule::Step($s) => $e,
            Schedule::MultiStep($s) => $e,
            Schedule::Exponential($s) => $e,
            Schedule::Linear($s) => $e,
            Schedule::Polynomial($s) => $e,
            Schedule::CosineAnnealing($s) => $e,
            Schedule::CosineAnnealingWarmRestarts($s) => $e,
            Schedule::Cyclic($s) => $e,
            Schedule::OneCycle($s) => $e,
            Schedule::Sequential($s) => $e,
            Schedule::Chained($s) => $e,
        }
    };
}

impl LrSchedule for Schedule {
    fn lr_at(&self, t: u64) -> f64 {
        dispatch!(self, s => s.lr_at(t))
    }
    fn momentum_at(&self, t: u64) -> Option<f64> {
        dispatch!(self, s => s.momentum_at(t))
    }
    fn bounds(&self) -> (f64, f64) {
        dispatch!(self, s => s.bounds())
    }
}

macro_rules! into_schedule {
    ($($variant:ident($t:ty)),*) => {
        $(impl From<$t> for Schedule {
            fn from(s: $t) -> Schedule {
                Schedule::$variant(s)
            }
        })*
    };
}

into_schedule!(
    Constant(ConstantLR),
    Step(StepLR),
    MultiStep(MultiStepLR),
    Exponential(ExponentialLR),
    Linear(LinearLR),
    Polynomial(PolynomialLR),
    CosineAnnealing(CosineAnnealingLR),
    CosineAnnealingWarmRestarts(CosineAnnealingWarmRestarts),
    Cyclic(CyclicLR),
    OneCycle(OneCycleLR),
    Sequential(SequentialLR),
    Chained(ChainedScheduler)
);

/// `SequentialLR`: `schedules[i]` is in force from `milestones[i - 1]` on and
/// sees the step relative to that milestone (`t - milestones[i - 1]`), as
/// torch restarts each child at its milestone. Bounds: the union of the
/// children's.
#[derive(Clone, Debug, PartialEq)]
pub struct SequentialLR {
    schedules: Vec<Schedule>,
    milestones: Vec<u64>,
}

impl SequentialLR {
    /// # Errors
    /// No schedules, `milestones.len() != schedules.len() - 1` (torch's
    /// condition), or milestones not strictly increasing.
    pub fn new(schedules: Vec<Schedule>, milestones: Vec<u64>) -> Result<Self, Error> {
        if schedules.is_empty() {
            return Err(bad("schedulers", 0.0, "at least one schedule"));
        }
        if milestones.len() + 1 != schedules.len() {
            return Err(bad("milestones", milestones.len() as f64, "one fewer than the schedules"));
        }
        if milestones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("milestones", 0.0, "strictly increasing"));
        }
        Ok(SequentialLR { schedules, milestones })
    }

    fn child(&self, t: u64) -> (&Schedule, u64) {
        let i = self.milestones.partition_point(|&m| m <= t);
        let start = if i == 0 { 0 } else { self.milestones[i - 1] };
        (&self.schedules[i], t - start)
    }
}

impl LrSchedule for SequentialLR {
    fn lr_at(&self, t: u64) -> f64 {
        let (s, local) = self.child(t);
        s.lr_at(local)
    }
    fn momentum_at(&self, t: u64) -> Option<f64> {
        let (s, local) = self.child(t);
        s.momentum_at(local)
    }
    fn bounds(&self) -> (f64, f64) {
        self.schedules
            .iter()
            .map(|s| s.bounds())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |a, b| (a.0.min(b.0), a.1.max(b.1)))
    }
}

/// `ChainedScheduler` for multiplicative schedules: the learning rate is
/// `base_lr * prod_i (schedules[i].lr_at(t) / schedules[i].base)`, where each
/// child was built with base rate `base_lr` too (for example a warmup
/// `LinearLR` times a `StepLR` decay). Bounds: the product of the
/// children's factor bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct ChainedScheduler {
    base_lr: f64,
    schedules: Vec<Schedule>,
}

impl ChainedScheduler {
    /// # Errors
    /// A `base_lr` that is not a normal positive number, no schedules, or
    /// children whose product can overflow.
    pub fn new(base_lr: f64, schedules: Vec<Schedule>) -> Result<Self, Error> {
        check_lr("base_lr", base_lr)?;
        if !base_lr.is_normal() {
            return Err(bad("base_lr", base_lr, "a normal positive number (factors are relative to it)"));
        }
        if schedules.is_empty() {
            return Err(bad("schedulers", 0.0, "at least one schedule"));
        }
        let chained = ChainedScheduler { base_lr, schedules };
        let (lo, hi) = chained.bounds();
        if !(lo.is_finite() && hi.is_finite()) {
            return Err(bad("schedulers", hi, "factors whose product stays finite"));
        }
        Ok(chained)
    }

    /// `s_1 * prod_{i >= 2} (s_i / base_lr)`: the same value as
    /// `base_lr * prod (s_i / base_lr)` without forming a huge factor first.
    fn product(&self, value: impl Fn(&Schedule) -> f64) -> f64 {
        let mut it = self.schedules.iter();
        let first = it.next().map_or(self.base_lr, &value);
        it.fold(first, |lr, s| lr * (value(s) / self.base_lr))
    }
}

impl LrSchedule for ChainedScheduler {
    fn lr_at(&self, t: u64) -> f64 {
        self.product(|s| s.lr_at(t))
    }
    fn momentum_at(&self, t: u64) -> Option<f64> {
        self.schedules.iter().find_map(|s| s.momentum_at(t))
    }
    fn bounds(&self) -> (f64, f64) {
        // Every child is non-negative, so the product is monotone in each.
        (self.product(|s| s.bounds().0), self.product(|s| s.bounds().1))
    }
}

/// The most common recipe: linear warmup from `base_lr * start_factor` to
/// `base_lr` over `warmup_steps`, then cosine annealing to `eta_min` at
/// `total_steps` (torch: `SequentialLR([LinearLR, CosineAnnealingLR], [warmup_steps])`).
///
/// # Errors
/// `warmup_steps == 0`, `total_steps <= warmup_steps`, or the children's errors.
pub fn warmup_cosine(
    base_lr: f64,
    warmup_steps: u64,
    total_steps: u64,
    start_factor: f64,
    eta_min: f64,
) -> Result<Schedule, Error> {
    if total_steps <= warmup_steps {
        return Err(bad("total_steps", total_steps as f64, "> warmup_steps"));
    }
    let warm = LinearLR::new(base_lr, start_factor, 1.0, warmup_steps)?;
    let cos = CosineAnnealingLR::new(base_lr, total_steps - warmup_steps, eta_min)?;
    Ok(SequentialLR::new(vec![warm.into(), cos.into()], vec![warmup_steps])?.into())
}

/// `ReduceLROnPlateau`: cuts the learning rate by `factor` when a metric has
/// stopped improving for `patience` evaluations. Stateful: feed it the metric
/// with [`step`](Self::step) and read [`lr`](Self::lr).
///
/// torch defaults: `mode = min`, `factor = 0.1`, `patience = 10`,
/// `threshold = 1e-4`, `threshold_mode = rel`, `cooldown = 0`, `min_lr = 0`,
/// `eps = 1e-8`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReduceLROnPlateau {
    lr: f64,
    maximize: bool,
    factor: f64,
    patience: u64,
    threshold: f64,
    relative: bool,
    cooldown: u64,
    min_lr: f64,
    eps: f64,
    best: f64,
    num_bad: u64,
    cooldown_counter: u64,
}

/// Whether [`ReduceLROnPlateau`] looks for a smaller or a larger metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlateauMode {
    /// Smaller is better (a loss).
    Min,
    /// Larger is better (an accuracy).
    Max,
}

/// [`ReduceLROnPlateau`]'s arguments with torch's names and defaults
/// (`lr` is the optimizer's rate, which torch reads from the optimizer;
/// default `1e-3`, Adam's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReduceLROnPlateauConfig {
    /// The starting rate.
    pub lr: f64,
    /// Default [`PlateauMode::Min`].
    pub mode: PlateauMode,
    /// Default `0.1`.
    pub factor: f64,
    /// Default `10`.
    pub patience: u64,
    /// Default `1e-4`.
    pub threshold: f64,
    /// torch's `threshold_mode`: `true` is `"rel"` (the default), `false` `"abs"`.
    pub threshold_mode_rel: bool,
    /// Default `0`.
    pub cooldown: u64,
    /// Default `0`.
    pub min_lr: f64,
    /// Default `1e-8`.
    pub eps: f64,
}

impl Default for ReduceLROnPlateauConfig {
    fn default() -> Self {
        ReduceLROnPlateauConfig {
            lr: 1e-3,
            mode: PlateauMode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            threshold_mode_rel: true,
            cooldown: 0,
            min_lr: 0.0,
            eps: 1e-8,
        }
    }
}

impl ReduceLROnPlateau {
    /// The scheduler from named arguments.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn from_config(c: &ReduceLROnPlateauConfig) -> Result<Self, Error> {
        Self::new(c.lr, c.mode, c.factor, c.patience, c.threshold, c.threshold_mode_rel, c.cooldown, c.min_lr, c.eps)
    }

    /// torch's defaults for everything but the starting rate.
    ///
    /// # Errors
    /// A bad `lr`.
    pub fn with_defaults(lr: f64) -> Result<Self, Error> {
        Self::new(lr, PlateauMode::Min, 0.1, 10, 1e-4, true, 0, 0.0, 1e-8)
    }

    /// `relative = true` is torch's `threshold_mode = "rel"`.
    ///
    /// # Errors
    /// torch's condition `factor < 1`; and `factor > 0`, finite non-negative
    /// `threshold`, `min_lr`, `eps`, `lr`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        lr: f64,
        mode: PlateauMode,
        factor: f64,
        patience: u64,
        threshold: f64,
        relative: bool,
        cooldown: u64,
        min_lr: f64,
        eps: f64,
    ) -> Result<Self, Error> {
        check_lr("lr", lr)?;
        if !(factor > 0.0 && factor < 1.0) {
            return Err(bad("factor", factor, "in (0, 1)"));
        }
        check_lr("threshold", threshold)?;
        check_lr("min_lr", min_lr)?;
        check_lr("eps", eps)?;
        let maximize = mode == PlateauMode::Max;
        Ok(ReduceLROnPlateau {
            lr,
            maximize,
            factor,
            patience,
            threshold,
            relative,
            cooldown,
            min_lr,
            eps,
            best: if maximize { f64::NEG_INFINITY } else { f64::INFINITY },
            num_bad: 0,
            cooldown_counter: 0,
        })
    }

    fn is_better(&self, a: f64) -> bool {
        match (self.maximize, self.relative) {
            (false, true) => a < self.best * (1.0 - self.threshold),
            (false, false) => a < self.best - self.threshold,
            (true, true) => a > self.best * (self.threshold + 1.0),
            (true, false) => a > self.best + self.threshold,
        }
    }

    /// Records one evaluation of the metric; returns the learning rate now in
    /// force.
    ///
    /// # Errors
    /// A NaN metric (torch would silently count it as "not better"); the
    /// state is unchanged then.
    pub fn step(&mut self, metric: f64) -> Result<f64, Error> {
        if metric.is_nan() {
            return Err(bad("metric", metric, "not NaN"));
        }
        if self.is_better(metric) {
            self.best = metric;
            self.num_bad = 0;
        } else {
            self.num_bad += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad = 0;
        }
        if self.num_bad > self.patience {
            let new_lr = (self.lr * self.factor).max(self.min_lr);
            if self.lr - new_lr > self.eps {
                self.lr = new_lr;
            }
            self.cooldown_counter = self.cooldown;
            self.num_bad = 0;
        }
        Ok(self.lr)
    }

    /// The learning rate in force.
    pub fn lr(&self) -> f64 {
        self.lr
    }
}
