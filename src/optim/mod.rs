//! The optimizers: one file each, holding the config (torch's names and
//! defaults), the per-element formula and the state layout.

/// The registry: every element-wise optimizer, once, as
/// `module { Variant(Config), ... }`. Adding an optimizer is its file under
/// `src/optim/` and one line here; everything else is generated from this
/// list by the macros it is handed to:
/// - [`declare`] (below): the `pub mod`, the config re-export, the
///   `Optimizer<Config>` type alias named after the variant;
/// - `any_types!` in `any.rs`: [`AnyConfig`](crate::AnyConfig),
///   [`AnyOptimizer`](crate::AnyOptimizer) and their conversions, so
///   [`AnyConfig::TORCH_CLASSES`](crate::AnyConfig::TORCH_CLASSES) (which
///   tests, benches, fuzz targets and examples iterate) lists it;
/// - the framework adapters' type aliases (`adaoptim_candle::AdamW`, ...),
///   which is why it is exported (hidden from the docs: the list's format
///   is for this workspace's crates, not a stable API).
#[doc(hidden)]
#[macro_export]
macro_rules! for_each_optimizer {
    ($m:ident) => {
        $m! {
            sgd { Sgd(SgdConfig) }
            adagrad { Adagrad(AdagradConfig) }
            rmsprop { RmsProp(RmsPropConfig) }
            adadelta { Adadelta(AdadeltaConfig) }
            adam { Adam(AdamConfig), AdamW(AdamWConfig) }
            adamax { Adamax(AdamaxConfig) }
            nadam { NAdam(NAdamConfig) }
            radam { RAdam(RAdamConfig) }
            rprop { Rprop(RpropConfig) }
            lion { Lion(LionConfig) }
            asgd { Asgd(AsgdConfig) }
        }
    };
}
pub(crate) use for_each_optimizer;

/// The module declarations, re-exports and aliases of the registry.
macro_rules! declare {
    ($($module:ident { $($variant:ident($cfg:ident)),+ })*) => {
        $(pub mod $module;)*

        /// Every registered configuration and its optimizer alias
        /// (re-exported at the crate root).
        pub mod registered {
            $($(
                pub use super::$module::$cfg;
                #[doc = concat!("The optimizer of [`", stringify!($cfg), "`]: `Optimizer<", stringify!($cfg), ">`.")]
                pub type $variant = super::Optimizer<$cfg>;
            )+)*
        }
    };
}
for_each_optimizer!(declare);

use crate::Error;
use crate::driver::{Bufs, Plan, StepReport, Unscale};
use crate::error::{check_grad_scale, check_len};
use crate::exec::Exec;
pub(crate) use crate::math::{GradIn, Lerp, Quot, pow_step};
use crate::schedule::LrSchedule;
use crate::storage::{Dtype, Grads, ParamCopy, Params, StateBuf};

pub use crate::error::MAX_STEP;

/// The most state buffers any optimizer keeps per parameter.
pub const MAX_STATE: usize = 3;

/// The most scalar states any optimizer keeps per parameter tensor (ASGD's
/// `eta` and `mu`).
pub const MAX_AUX: usize = 2;

/// An optimizer's scalar state as torch stores it: one f32 per name of
/// [`AnyConfig::aux_names`](crate::AnyConfig::aux_names) (NAdam's
/// `mu_product`; ASGD's `eta`, `mu`), unused entries 0.
pub type AuxState = [f32; MAX_AUX];

pub(crate) mod sealed {
    use super::*;

    /// The part of [`Algorithm`] that touches raw kernels; not callable from
    /// outside the crate.
    pub trait Sealed {
        /// Scalar state carried from step to step (NAdam's `mu_product`).
        type Aux: Copy + std::fmt::Debug + PartialEq + Send + Sync;
        /// The torch names of the scalar states (at most [`MAX_AUX`]).
        const AUX_NAMES: &'static [&'static str] = &[];
        /// The scalar state as the f32 values torch stores, in the order of
        /// `AUX_NAMES`.
        fn aux_to_f32(_aux: &Self::Aux) -> AuxState {
            [0.0; MAX_AUX]
        }
        /// The scalar state from the f32 values torch stores; `None` if they
        /// are not a valid state.
        fn aux_from_f32(_x: AuxState) -> Option<Self::Aux> {
            None
        }
        /// Runs step `t` (>= 1) with validated lengths and a resolved backend,
        /// updating `aux`.
        fn run(&self, t: u64, aux: &mut Self::Aux, plan: Plan, bufs: Bufs<'_>) -> StepReport;
    }
}

/// An optimizer configuration: what turns a [`Config`](crate::Adam) into an
/// [`Optimizer`]. Implemented by every `*Config` type of this crate.
pub trait Algorithm:
    sealed::Sealed + crate::keywords::TorchOptions + Clone + std::fmt::Debug + Send + Sync + 'static
{
    /// The `torch.optim` class this follows (`"Adam"`, `"SGD"`, ...).
    const TORCH_CLASS: &'static str;
    /// Checks every hyperparameter (torch's `ValueError` conditions, and
    /// non-finite values).
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`] naming the first bad field.
    fn validate(&self) -> Result<(), Error>;
    /// The per-parameter state buffers this configuration keeps, in the order
    /// the free kernels take them, with torch's `state_dict` names.
    fn state_names(&self) -> &'static [&'static str];
    /// Initial value of state buffer `i` (0 except Adagrad's `sum`).
    fn state_init(&self, _i: usize) -> f32 {
        0.0
    }
    /// Initial scalar state.
    fn aux_init(&self) -> <Self as sealed::Sealed>::Aux;
    /// The learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate without checking it (see [`Optimizer::set_lr`]).
    fn set_lr_unchecked(&mut self, lr: f64);
    /// Sets the momentum a schedule cycles (torch's `cycle_momentum`): SGD's
    /// and RMSprop's `momentum`, the Adam family's `betas.0`. Returns false
    /// for optimizers without one (AdaGrad, AdaDelta). Not validated here.
    fn set_cycled_momentum_unchecked(&mut self, _momentum: f64) -> bool {
        false
    }
}

/// One step over caller-owned state: the free-kernel layer.
///
/// `t` is the step number after incrementing (1 for the first step), `aux` the
/// scalar state (start from [`Algorithm::aux_init`]; `()` for all but NAdam),
/// `state` the buffers named by [`Algorithm::state_names`], in that order,
/// initialised with [`Algorithm::state_init`].
///
/// The update is element-wise, so a shard (any sub-range of params, grads and
/// state, stepped with the same `t` and `aux`) gets exactly the bits the same
/// range gets from the unsharded step.
///
/// # Errors
/// Invalid hyperparameters, `t == 0`, a wrong number of state buffers, any
/// length differing from `params.len()`, or an unavailable forced backend.
/// Nothing is modified when an error is returned.
pub fn step_slices<A: Algorithm>(
    config: &A,
    t: u64,
    aux: &mut <A as sealed::Sealed>::Aux,
    params: &mut [f32],
    grads: &[f32],
    state: &mut [&mut [f32]],
    exec: &Exec,
) -> Result<StepReport, Error> {
    step_slices_with(config, t, aux, params, grads, state, &StepOptions { exec: *exec, ..StepOptions::default() })
}

/// How [`step_slices_with`] runs, and what it does to the gradients inside
/// the fused pass, in the order an [`Optimizer`]'s guards do it: divide by
/// `grad_scale` (torch's fused `grad_scale`), then multiply by `clip_coef`
/// (torch's `clip_grad_norm_` factor). The caller's gradients are never
/// written.
///
/// For a sharded model, every worker uses the same `clip_coef`:
/// [`clip::clip_coef`](crate::clip::clip_coef) of the global norm, the square
/// root of the sum over workers of
/// [`clip::sum_of_squares`](crate::clip::sum_of_squares) of their shard
/// (divided by the loss scale squared if gradients are scaled). A caller who
/// wants [`NonFinitePolicy::SkipStep`] checks that norm for finiteness first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOptions {
    /// Backend and threads.
    pub exec: Exec,
    /// Loss scale divided out of every gradient (finite and nonzero), if any.
    pub grad_scale: Option<f32>,
    /// Clipping factor multiplied into every gradient after unscaling
    /// (finite and >= 0), if any.
    pub clip_coef: Option<f32>,
}

impl Default for StepOptions {
    /// [`Exec::auto`], no loss scale, no clipping.
    fn default() -> Self {
        StepOptions { exec: Exec::auto(), grad_scale: None, clip_coef: None }
    }
}

/// [`step_slices`] with a loss scale and a clipping factor applied inside the
/// fused pass (see [`StepOptions`]); the same bits as an [`Optimizer`] with
/// that `grad_scale` whose clipping produced that factor.
///
/// # Errors
/// As [`step_slices`], and [`Error::InvalidHyperparameter`] for a
/// `grad_scale` that is zero or not finite, or a `clip_coef` that is
/// negative or not finite. Nothing is modified when an error is returned.
pub fn step_slices_with<A: Algorithm>(
    config: &A,
    t: u64,
    aux: &mut <A as sealed::Sealed>::Aux,
    params: &mut [f32],
    grads: &[f32],
    state: &mut [&mut [f32]],
    options: &StepOptions,
) -> Result<StepReport, Error> {
    if state.len() > MAX_STATE {
        return Err(Error::StateCount { expected: config.state_names().len(), actual: state.len() });
    }
    let k = state.len();
    let mut it = state.iter_mut();
    let mut bufs: [StateBuf<'_>; MAX_STATE] =
        std::array::from_fn(|_| StateBuf::F32(it.next().map_or(&mut [][..], |x| &mut **x)));
    step_mixed(config, t, aux, Params::F32(params), Grads::F32(grads), &mut bufs[..k], None, options)
}

/// One step over caller-owned buffers in any [`storage`](crate::storage)
/// type: `f32`, `bf16` or `f16` gradients, `f32` or `bf16` parameters, each
/// state buffer `f32` or `bf16`, and optionally a `bf16`/`f16` copy of the
/// updated `f32` parameters written in the same pass (`param_copy`).
///
/// The formula runs in `f32` on the widened values, so the parameters and
/// state come out as the [`step_slices_with`] step on the widened buffers
/// would leave them, rounded to nearest-even into their storage; an all-`f32`
/// call is exactly [`step_slices_with`]. Loss scale and clipping factor apply
/// to half-precision gradients as to `f32` ones, inside the pass. Every
/// backend, thread count and chunk size gives the same bits.
///
/// # Errors
/// As [`step_slices_with`]; [`Error::Storage`] for a `param_copy` next to
/// parameters that are not `f32`; [`Error::LengthMismatch`] for a
/// `param_copy` of another length. Nothing is modified when an error is
/// returned.
#[allow(clippy::too_many_arguments)]
pub fn step_mixed<A: Algorithm>(
    config: &A,
    t: u64,
    aux: &mut <A as sealed::Sealed>::Aux,
    params: Params<'_>,
    grads: Grads<'_>,
    state: &mut [StateBuf<'_>],
    param_copy: Option<ParamCopy<'_>>,
    options: &StepOptions,
) -> Result<StepReport, Error> {
    check_grad_scale(options.grad_scale)?;
    if let Some(c) = options.clip_coef.filter(|c| !(c.is_finite() && *c >= 0.0)) {
        return Err(Error::InvalidHyperparameter {
            name: "clip_coef",
            value: c as f64,
            requirement: "finite and >= 0",
        });
    }
    config.validate()?;
    if t == 0 || t > MAX_STEP {
        return Err(Error::InvalidStep { step: t });
    }
    let names = config.state_names();
    if state.len() != names.len() {
        return Err(Error::StateCount { expected: names.len(), actual: state.len() });
    }
    check_storage(&params, &grads, names, state, param_copy.as_ref())?;
    let mut plan = Plan::new(&options.exec)?;
    plan.unscale = Unscale::new(options.grad_scale);
    // A factor of 1 changes no bits; skip the multiply, as the guards do.
    plan.clip = options.clip_coef.filter(|&c| c != 1.0);
    Ok(config.run(t, aux, plan, Bufs::new(params, grads, state, param_copy)))
}

/// The length and storage checks of a mixed step: grads, each state buffer
/// (named by `names`) and an 8-bit state's absmax, the copy (only next to
/// `f32` params).
pub(crate) fn check_storage(
    params: &Params<'_>,
    grads: &Grads<'_>,
    names: &[&'static str],
    state: &[StateBuf<'_>],
    param_copy: Option<&ParamCopy<'_>>,
) -> Result<(), Error> {
    let n = params.len();
    check_len("grads", n, grads.len())?;
    for (name, s) in names.iter().zip(state.iter()) {
        check_len(name, n, s.len())?;
        if let StateBuf::Q8(q) = s {
            check_len("absmax", n.div_ceil(crate::storage::Q8_BLOCK), q.absmax.len())?;
        }
    }
    if let Some(c) = param_copy {
        if params.dtype() != Dtype::F32 {
            return Err(Error::Storage {
                what: "params",
                dtype: params.dtype(),
                reason: "a param_copy is written from f32 master parameters only",
            });
        }
        check_len("param_copy", n, c.len())?;
    }
    Ok(())
}

use crate::memory::Raw;

/// What a step does with NaN or infinite gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NonFinitePolicy {
    /// torch's behaviour: the arithmetic runs, and a NaN/inf gradient makes
    /// its parameter and state NaN/inf (other elements are unaffected).
    #[default]
    Propagate,
    /// If any gradient is NaN or infinite, nothing changes (parameters,
    /// state, step count) and the report says `skipped: true` — what a
    /// mixed-precision loss scaler wants. Costs one read of the gradients.
    SkipStep,
    /// Like `SkipStep`, but returns [`Error::NonFiniteGradient`].
    Error,
}

/// The controls every optimizer type shares (execution policy, non-finite
/// policy, loss scale, clipping, the last norm), written once and expanded
/// into each type's `impl` with the paths of its [`Exec`] and [`Guards`].
macro_rules! controls {
    ($($exec:ident).+; $($guards:ident).+) => {
        /// Sets the execution policy (backend and threads).
        pub fn set_exec(&mut self, exec: $crate::Exec) {
            self.$($exec).+ = exec;
        }

        /// The execution policy.
        pub fn exec(&self) -> $crate::Exec {
            self.$($exec).+
        }

        /// Sets what a step does with NaN/inf gradients (see
        /// [`NonFinitePolicy`](crate::NonFinitePolicy)); with `SkipStep` a step
        /// that sees one changes nothing, its step count included.
        pub fn set_non_finite(&mut self, policy: $crate::NonFinitePolicy) {
            self.$($guards).+.non_finite = policy;
        }

        /// What a step does with NaN/inf gradients.
        pub fn non_finite(&self) -> $crate::NonFinitePolicy {
            self.$($guards).+.non_finite
        }

        /// Divides every gradient by `grad_scale` inside the step (mixed-precision
        /// loss scaling, torch's fused `grad_scale`); `None` turns it off. A
        /// power-of-two scale is applied as an exact multiplication by its
        /// reciprocal. With `SkipStep` the non-finite check sees the unscaled
        /// gradients, like torch's `found_inf`.
        ///
        /// # Errors
        /// [`Error::InvalidHyperparameter`](crate::Error::InvalidHyperparameter)
        /// unless the scale is finite and nonzero; the scale is unchanged then.
        pub fn set_grad_scale(&mut self, grad_scale: Option<f32>) -> Result<(), $crate::Error> {
            self.$($guards).+.set_grad_scale(grad_scale)
        }

        /// The loss scale gradients are divided by.
        pub fn grad_scale(&self) -> Option<f32> {
            self.$($guards).+.grad_scale
        }

        /// Clips the gradients to a total L2 norm of `max_norm` inside each step,
        /// as `torch.nn.utils.clip_grad_norm_(params, max_norm)` before
        /// `optimizer.step()` would (see [`clip`](crate::clip)); `None` turns it
        /// off. The gradients are read once for the norm and multiplied by
        /// [`clip_coef`](crate::clip::clip_coef) inside the fused step; the
        /// caller's gradients are not written. The norm is of the unscaled
        /// gradients, as with torch's `scaler.unscale_(opt)` before clipping. A
        /// non-finite norm means a non-finite gradient, which the non-finite
        /// policy handles (under `Propagate`, as torch, the factor is NaN or 0
        /// and so are the updates). Not part of a checkpoint (it is not
        /// optimizer state in torch either).
        ///
        /// # Errors
        /// [`Error::InvalidHyperparameter`](crate::Error::InvalidHyperparameter)
        /// unless `max_norm` is finite and `> 0`; the setting is unchanged then.
        pub fn set_max_grad_norm(&mut self, max_norm: Option<f64>) -> Result<(), $crate::Error> {
            self.$($guards).+.set_max_grad_norm(max_norm)
        }

        /// The clipping norm, if clipping is on.
        pub fn max_grad_norm(&self) -> Option<f64> {
            self.$($guards).+.max_grad_norm
        }

        /// The total gradient norm the last successful step measured (clipping
        /// on), also when that step was skipped for a non-finite gradient; for
        /// logging, as torch's `clip_grad_norm_` returns it.
        pub fn last_grad_norm(&self) -> Option<f64> {
            self.$($guards).+.last_grad_norm
        }
    };
}
pub(crate) use controls;

/// An optimizer that owns its state: `n` parameters, 64-byte aligned state
/// buffers, a step count and an execution policy.
///
/// Use it through the aliases: [`Adam`](crate::Adam), [`Sgd`](crate::Sgd), ...
#[derive(Clone, Debug)]
pub struct Optimizer<A: Algorithm> {
    pub(crate) config: A,
    pub(crate) n: usize,
    pub(crate) t: u64,
    pub(crate) aux: <A as sealed::Sealed>::Aux,
    pub(crate) state: Vec<Raw>,
    exec: Exec,
    guards: Guards,
}

impl<A: Algorithm> Optimizer<A> {
    /// Validates `config` and allocates zeroed (Adagrad: `initial_accumulator_value`)
    /// state for `n` parameters.
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`] naming the bad field;
    /// [`Error::TooLarge`] if the state cannot be allocated.
    pub fn new(config: A, n: usize) -> Result<Self, Error> {
        config.validate()?;
        let state = (0..config.state_names().len())
            .map(|i| crate::memory::try_filled("state", n, config.state_init(i)))
            .collect::<Result<_, _>>()?;
        Ok(Optimizer { aux: config.aux_init(), config, n, t: 0, state, exec: Exec::auto(), guards: Guards::default() })
    }

    /// Sets the execution policy (builder style).
    pub fn with_exec(mut self, exec: Exec) -> Self {
        self.exec = exec;
        self
    }

    /// Sets what a step does with NaN/inf gradients (builder style).
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.guards.non_finite = policy;
        self
    }

    controls!(exec; guards);

    /// One optimizer step: updates `params` in place from `grads`.
    ///
    /// Allocates nothing. With [`NonFinitePolicy::SkipStep`], a step that
    /// sees a NaN/inf gradient changes nothing and reports `skipped: true`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `params` or `grads` is not of the length
    /// given to [`new`](Self::new); [`Error::BackendUnavailable`] for a forced
    /// backend this CPU lacks; [`Error::NonFiniteGradient`] under
    /// [`NonFinitePolicy::Error`]; [`Error::StepLimit`] after
    /// [`MAX_STEP`] steps. Nothing is modified on error.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) -> Result<StepReport, Error> {
        check_len("params", self.n, params.len())?;
        check_len("grads", self.n, grads.len())?;
        let t = crate::error::next_step(self.t)?;
        let mut plan = self.guards.plan(&self.exec)?;
        let (skipped, norm) = self.guards.check(&mut plan, grads, 0, None)?;
        if norm.is_some() {
            self.guards.last_grad_norm = norm;
        }
        if let Some(skipped) = skipped {
            return Ok(skipped);
        }
        let mut refs: [&mut [f32]; MAX_STATE] = Default::default();
        let k = self.state.len();
        for (r, s) in refs.iter_mut().zip(self.state.iter_mut()) {
            *r = s.as_mut_slice();
        }
        let report = self.config.run(t, &mut self.aux, plan, Bufs::dense(params, grads, &mut refs[..k]));
        self.t = t;
        Ok(report)
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr()
    }

    /// Sets the learning rate.
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`] unless `lr` is finite and `>= 0`; the
    /// learning rate is unchanged then.
    pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
        crate::error::non_negative("lr", lr)?;
        self.config.set_lr_unchecked(lr);
        Ok(())
    }

    /// Sets the learning rate (and, for schedules that cycle it, the
    /// momentum) from `schedule` for the step about to be taken
    /// (`schedule.lr_at(self.step_count())`), then steps.
    ///
    /// # Errors
    /// As [`step`](Self::step); [`Error::IncompatibleConfig`] if the schedule
    /// cycles momentum and this optimizer has none (or SGD/RMSprop built with
    /// `momentum = 0`, which keep no momentum buffer); an invalid scheduled
    /// value. The configuration, state and parameters are unchanged on error.
    pub fn step_scheduled<S: LrSchedule + ?Sized>(
        &mut self,
        schedule: &S,
        params: &mut [f32],
        grads: &[f32],
    ) -> Result<StepReport, Error> {
        let config = scheduled(&self.config, schedule, self.t)?;
        let old = std::mem::replace(&mut self.config, config);
        // The scheduled configuration is valid, so only `step`'s own checks
        // can fail now; restore the old configuration if they do.
        match self.step(params, grads) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.config = old;
                Err(e)
            }
        }
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.t
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True for an optimizer over zero parameters.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The configuration.
    pub fn config(&self) -> &A {
        &self.config
    }

    /// Replaces the configuration (for example a new `betas` from a momentum
    /// schedule), keeping the state.
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`], or [`Error::IncompatibleConfig`] if
    /// the new configuration keeps different state buffers. Nothing changes
    /// on error.
    pub fn set_config(&mut self, config: A) -> Result<(), Error> {
        config.validate()?;
        if config.state_names() != self.config.state_names() {
            return Err(Error::IncompatibleConfig { reason: "the new configuration keeps different state buffers" });
        }
        self.config = config;
        Ok(())
    }

    /// The names of the state buffers, in order (torch's `state_dict` names).
    pub fn state_names(&self) -> &'static [&'static str] {
        self.config.state_names()
    }

    /// A state buffer by its torch name (`"exp_avg"`, `"sum"`, ...).
    pub fn state(&self, name: &str) -> Option<&[f32]> {
        let i = self.config.state_names().iter().position(|s| *s == name)?;
        Some(self.state[i].as_slice())
    }

    /// All state buffers, in [`state_names`](Self::state_names) order.
    pub fn state_buffers(&self) -> impl Iterator<Item = &[f32]> {
        self.state.iter().map(|b| b.as_slice())
    }

    /// The scalar state (NAdam's `mu_product`; `()` for the others).
    pub fn aux(&self) -> <A as sealed::Sealed>::Aux {
        self.aux
    }
}

/// `config` with a schedule's learning rate (and, for schedules that cycle
/// it, momentum) for the step after `t` steps, validated, with the same state
/// layout: the one schedule application of every optimizer type.
pub(crate) fn scheduled<A: Algorithm, S: LrSchedule + ?Sized>(config: &A, s: &S, t: u64) -> Result<A, Error> {
    let mut c = config.clone();
    c.set_lr_unchecked(s.lr_at(t));
    if let Some(m) = s.momentum_at(t)
        && !c.set_cycled_momentum_unchecked(m)
    {
        return Err(Error::IncompatibleConfig { reason: "the schedule cycles momentum; this optimizer has none" });
    }
    c.validate()?;
    if c.state_names() != config.state_names() {
        return Err(Error::IncompatibleConfig { reason: "the schedule changes the state layout" });
    }
    Ok(c)
}

/// Applies a [`NonFinitePolicy`] before a step: `Ok(Some(report))` if the
/// step is to be skipped, an error under `Error`, `Ok(None)` to go on.
/// `offset` is added to the reported index (the position of `grads` in a
/// larger buffer).
pub(crate) fn non_finite_guard(
    policy: NonFinitePolicy,
    plan: &Plan,
    grads: &[f32],
    offset: usize,
) -> Result<Option<StepReport>, Error> {
    if policy == NonFinitePolicy::Propagate || !crate::driver::any_non_finite(plan, grads) {
        return Ok(None);
    }
    if policy == NonFinitePolicy::Error {
        let index = grads.iter().position(|&g| !plan.unscale.apply(g).is_finite()).unwrap_or(0);
        return Err(Error::NonFiniteGradient { index: offset + index });
    }
    Ok(Some(StepReport { backend: plan.backend, parallel: false, skipped: true }))
}

/// The gradient guards applied before a step updates anything: the
/// non-finite policy, the loss scale and the clipping norm, plus the last
/// norm measured. One copy serves [`Optimizer`] and
/// [`GroupedOptimizer`](crate::groups::GroupedOptimizer).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Guards {
    pub non_finite: NonFinitePolicy,
    pub grad_scale: Option<f32>,
    pub max_grad_norm: Option<f64>,
    pub last_grad_norm: Option<f64>,
}

impl Guards {
    pub(crate) fn set_grad_scale(&mut self, grad_scale: Option<f32>) -> Result<(), Error> {
        check_grad_scale(grad_scale)?;
        self.grad_scale = grad_scale;
        Ok(())
    }

    pub(crate) fn set_max_grad_norm(&mut self, max_norm: Option<f64>) -> Result<(), Error> {
        crate::clip::check_max_norm(max_norm)?;
        self.max_grad_norm = max_norm;
        Ok(())
    }

    /// The plan for `exec`, with the loss scale.
    pub(crate) fn plan(&self, exec: &Exec) -> Result<Plan, Error> {
        let mut plan = Plan::new(exec)?;
        plan.unscale = Unscale::new(self.grad_scale);
        Ok(plan)
    }

    /// The checks before a step: with clipping off, the non-finite policy's
    /// scan; with clipping on, the norm pass instead — over `grads`, or
    /// `given_norm` when the caller has the global norm of a sharded model —
    /// whose non-finite result triggers the policy, and whose clip factor
    /// goes into `plan`. Returns the skip report if the step is skipped, and
    /// the total norm if clipping is on (the caller records it in
    /// `last_grad_norm` once nothing can fail any more).
    pub(crate) fn check(
        &self,
        plan: &mut Plan,
        grads: &[f32],
        offset: usize,
        given_norm: Option<f64>,
    ) -> Result<(Option<StepReport>, Option<f64>), Error> {
        let policy = self.non_finite;
        let Some(max_norm) = self.max_grad_norm else {
            return Ok((non_finite_guard(policy, plan, grads, offset)?, None));
        };
        let total = given_norm.unwrap_or_else(|| crate::driver::sum_of_squares(plan, grads).sqrt());
        if !total.is_finite() && policy != NonFinitePolicy::Propagate {
            // A non-finite norm means a non-finite gradient: here (find it),
            // or in another shard (then there is no local index to report).
            if let Some(skipped) = non_finite_guard(policy, plan, grads, offset)? {
                return Ok((Some(skipped), Some(total)));
            }
            if policy == NonFinitePolicy::Error {
                return Err(Error::NonFiniteGradNorm { norm: total });
            }
            return Ok((Some(StepReport { backend: plan.backend, parallel: false, skipped: true }), Some(total)));
        }
        let coef = crate::clip::clip_coef(total, max_norm);
        plan.clip = (coef != 1.0).then_some(coef);
        Ok((None, Some(total)))
    }
}
