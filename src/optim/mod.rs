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

mod guards;
mod owner;

use crate::Error;
use crate::driver::{Bufs, Plan, StepReport, Unscale};
use crate::error::{check_grad_scale, check_len};
use crate::exec::Exec;
pub(crate) use crate::math::{GradIn, Lerp, Quot, pow_step};
use crate::storage::{Dtype, Grads, ParamCopy, ParamRounding, Params, StateBuf, TILE, stochastic_key};
pub use guards::NonFinitePolicy;
pub(crate) use guards::{Guards, controls, non_finite_guard, non_finite_guard_grads, scheduled};
pub use owner::Optimizer;

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
    /// How `bf16` parameters are rounded ([`step_mixed`] only; round to
    /// nearest by default). Stochastic rounding next to parameters that are
    /// not `bf16` is an error.
    pub param_rounding: ParamRounding,
}

impl Default for StepOptions {
    /// [`Exec::auto`], no loss scale, no clipping, round to nearest.
    fn default() -> Self {
        StepOptions { exec: Exec::auto(), grad_scale: None, clip_coef: None, param_rounding: ParamRounding::Nearest }
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
    check_options(options)?;
    config.validate()?;
    if t == 0 || t > MAX_STEP {
        return Err(Error::InvalidStep { step: t });
    }
    let names = config.state_names();
    if state.len() != names.len() {
        return Err(Error::StateCount { expected: names.len(), actual: state.len() });
    }
    check_storage(&params, &grads, names, state, param_copy.as_ref())?;
    let sr = rounding_key(options.param_rounding, params.dtype(), t)?;
    let plan = options_plan(options)?;
    let mut bufs = Bufs::new(params, grads, state, param_copy);
    bufs.sr = sr;
    Ok(config.run(t, aux, plan, bufs))
}

/// The stream key of step `t` and the first element's index when
/// `rounding` is stochastic (`None` for round to nearest), for parameters
/// of `dtype`.
///
/// # Errors
/// [`Error::Storage`] for stochastic rounding of parameters that are not
/// `bf16`; [`Error::InvalidOption`] for an offset that is not a multiple of
/// [`TILE`].
pub(crate) fn rounding_key(rounding: ParamRounding, dtype: Dtype, t: u64) -> Result<Option<(u64, u64)>, Error> {
    match rounding {
        ParamRounding::Nearest => Ok(None),
        ParamRounding::Stochastic { .. } if dtype != Dtype::Bf16 => {
            Err(Error::Storage { what: "params", dtype, reason: "stochastic rounding applies to bf16 parameters only" })
        }
        ParamRounding::Stochastic { offset, .. } if !offset.is_multiple_of(TILE as u64) => Err(Error::InvalidOption {
            name: "param_rounding".into(),
            reason: "a stochastic-rounding offset must be a multiple of 256",
        }),
        ParamRounding::Stochastic { seed, offset } => Ok(Some((stochastic_key(seed, t), offset))),
    }
}

/// [`Error::InvalidHyperparameter`] for a zero or non-finite `grad_scale`
/// or a negative or non-finite `clip_coef`.
pub(crate) fn check_options(options: &StepOptions) -> Result<(), Error> {
    check_grad_scale(options.grad_scale)?;
    if let Some(c) = options.clip_coef.filter(|c| !(c.is_finite() && *c >= 0.0)) {
        return Err(Error::InvalidHyperparameter {
            name: "clip_coef",
            value: c as f64,
            requirement: "finite and >= 0",
        });
    }
    Ok(())
}

/// The plan of `options` (backend, loss scale, clipping factor), after
/// [`check_options`]: an unavailable forced backend is the only error.
pub(crate) fn options_plan(options: &StepOptions) -> Result<Plan, Error> {
    let mut plan = Plan::new(&options.exec)?;
    plan.unscale = Unscale::new(options.grad_scale);
    // A factor of 1 changes no bits; skip the multiply, as the guards do.
    plan.clip = options.clip_coef.filter(|&c| c != 1.0);
    Ok(plan)
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
