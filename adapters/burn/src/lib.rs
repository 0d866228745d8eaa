//! [adaoptim]'s CPU optimizers for [burn](https://burn.dev) 0.22:
//! [`Optim<C>`] implements burn's per-parameter [`burn::optim::Optimizer`]
//! for every adaoptim configuration `C`, so it drives a whole module through
//! burn's own [`ModuleOptimizer`](burn::optim::ModuleOptimizer): parameter
//! groups (`with_group`), learning-rate schedules, per-parameter gradient
//! clipping, and records (`to_record`/`save`/`load`). Clipping by the
//! global norm over every parameter (torch's `clip_grad_norm_`), which
//! burn's per-parameter trait cannot do, is [`clip_grad_norm`], called on
//! the gradients before the step. [`Adafactor`] does the same for
//! `torch.optim.Adafactor`, whose state is made for each parameter's shape.
//!
//! ```
//! use adaoptim_burn::{AdamW, AdamWConfig};
//! use burn::optim::ModuleOptimizer;
//!
//! let mut optim: ModuleOptimizer = AdamW::new(AdamWConfig { weight_decay: 0.1, ..Default::default() }).into();
//! // model = optim.step(1e-3, model, GradientsParams::from_grads(loss.backward(), &model));
//! ```
//!
//! # How a step runs, and what it copies
//! burn hands the optimizer one parameter at a time, by value, with its
//! gradient and its state. The adapter takes the parameter's and the
//! gradient's data out of burn ([`Tensor::into_data`]), runs adaoptim's
//! fused step on the `f32` slices (SIMD, and parallel for large tensors),
//! and gives the parameter back ([`Tensor::from_data`]). The state is an
//! adaoptim [`Optimizer`](adaoptim::Optimizer) per parameter (64-byte
//! aligned buffers, torch's state names), moved, never copied, from step to
//! step. Whether taking the data out and back in copies is up to burn's
//! backend; on the ndarray backend the measured cost is in the repository
//! README ("burn"). The learning rate is burn's (the `lr` of `step` or its
//! scheduler); the configuration's own `lr` is not used.
//!
//! # State storage
//! [`Optim::with_state_dtype`] keeps the state in `bf16` or 8-bit
//! block-wise form ([`Dtype::Bf16`], [`Dtype::Q8`]: bitsandbytes' scheme,
//! 2 bytes per parameter for Adam's two moments instead of 8) through
//! adaoptim's [`MixedOptimizer`]; the
//! parameters and gradients stay `f32`. burn's ndarray backend itself turns
//! `bf16`/`f16` data into `f32` tensors (`Tensor::from_data` of `bf16` data
//! gives an `F32` tensor, and so do its gradients), so the adapter sees
//! `f32` there.
//!
//! # What it accepts, and errors
//! burn's trait returns no `Result`. A step that cannot run (a parameter or
//! gradient that is not `f32`, an invalid learning rate from a schedule, a
//! state of another length) leaves that parameter and its state as they
//! were and records the reason in the [`StepErrors`] shared by every clone of
//! the optimizer ([`Optim::errors`]); nothing panics. Check it after a step
//! where that matters.

#![deny(missing_docs)]

use std::sync::{Arc, Mutex};

use adaoptim::mixed::MixedOptimizer;
use adaoptim::storage::{Dtype, Grads, Params};
use adaoptim::{Algorithm, Error, Exec, clip};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, LearningRate, RecordState, StateSink, StateSource};
use burn::tensor::{DType, Device, Tensor, TensorData};

mod adafactor;

pub use adafactor::{Adafactor, AdafactorState};
pub use adaoptim;
pub use adaoptim::AdafactorConfig;
/// Every adaoptim configuration, to build an optimizer with.
pub use adaoptim::optim::registered::*;

/// The reasons of the steps that could not run, shared by the clones of an
/// [`Optim`] (burn keeps its own clone inside `ModuleOptimizer`).
#[derive(Clone, Debug, Default)]
pub struct StepErrors(Arc<Mutex<Vec<String>>>);

impl StepErrors {
    /// Takes the recorded reasons, oldest first, leaving none.
    pub fn take(&self) -> Vec<String> {
        match self.0.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }

    /// True if no step failed since the last [`take`](Self::take).
    pub fn is_empty(&self) -> bool {
        match self.0.lock() {
            Ok(v) => v.is_empty(),
            Err(p) => p.into_inner().is_empty(),
        }
    }

    fn push(&self, reason: String) {
        match self.0.lock() {
            Ok(mut v) => v.push(reason),
            Err(p) => p.into_inner().push(reason),
        }
    }
}

/// An adaoptim optimizer as burn's per-parameter optimizer; see the
/// [crate docs](crate).
#[derive(Clone, Debug)]
pub struct Optim<C: Algorithm> {
    config: C,
    exec: Exec,
    errors: StepErrors,
    state_dtype: Dtype,
}

// One alias per optimizer of adaoptim's registry, named as adaoptim's own.
macro_rules! aliases {
    ($($module:ident { $($alias:ident($cfg:ident)),+ })*) => {$($(
        #[doc = concat!("`Optim<", stringify!($cfg), ">`: the burn optimizer of [`", stringify!($cfg), "`].")]
        pub type $alias = Optim<$cfg>;
    )+)*};
}
adaoptim::for_each_optimizer!(aliases);

impl<C: Algorithm> Optim<C> {
    /// An optimizer with these hyperparameters (the learning rate comes from
    /// burn at each step).
    pub fn new(config: C) -> Self {
        Optim { config, exec: Exec::auto(), errors: StepErrors::default(), state_dtype: Dtype::F32 }
    }

    /// The same, keeping each parameter's state in `dtype`: [`Dtype::F32`]
    /// (the default), [`Dtype::Bf16`] (rounded to nearest-even each step) or
    /// [`Dtype::Q8`] (8-bit block-wise, bitsandbytes' scheme). A state made
    /// in one storage (a record loaded, say) is not stepped by an optimizer
    /// set to another: that parameter's step is refused and recorded in
    /// [`errors`](Self::errors). [`Dtype::F16`] is not a state storage: a
    /// step with it is refused the same way.
    pub fn with_state_dtype(mut self, dtype: Dtype) -> Self {
        self.state_dtype = dtype;
        self
    }

    /// The storage of the state this optimizer makes.
    pub fn state_dtype(&self) -> Dtype {
        self.state_dtype
    }

    /// The same, with an execution policy (backend, threads) for every step.
    pub fn with_exec(mut self, exec: Exec) -> Self {
        self.exec = exec;
        self
    }

    /// The hyperparameters.
    pub fn config(&self) -> &C {
        &self.config
    }

    /// The reasons of steps that could not run (shared with every clone).
    pub fn errors(&self) -> StepErrors {
        self.errors.clone()
    }

    /// One parameter's step on its data; a state is made when `state` is
    /// `None`. On error the data and the state are as they were.
    fn step_data(
        &self,
        lr: LearningRate,
        params: &mut TensorData,
        grads: &TensorData,
        state: &mut Option<State<C>>,
    ) -> Result<(), String> {
        f32_only(params, grads)?;
        let n = params.num_elements();
        let g = grads.as_slice::<f32>().map_err(|e| format!("gradient: {e:?}"))?;
        let p = params.as_mut_slice::<f32>().map_err(|e| format!("parameter: {e:?}"))?;
        let mut fresh = None;
        let st =
            match (self.state_dtype, state.as_mut()) {
                (d, Some(s)) if s.dtype() == d => s,
                (d, Some(s)) => {
                    return Err(format!("a state kept in {:?} is not stepped by an optimizer set to {d:?}", s.dtype()));
                }
                (Dtype::F32, None) => fresh
                    .insert(State::F32(adaoptim::Optimizer::new(self.config.clone(), n).map_err(|e| e.to_string())?)),
                (d @ (Dtype::Bf16 | Dtype::Q8), None) => fresh
                    .insert(State::Mixed(MixedOptimizer::new(self.config.clone(), n, d).map_err(|e| e.to_string())?)),
                (d, None) => return Err(format!("{d:?} is not a state storage (f32, bf16 or q8)")),
            };
        st.run(self.exec, lr, p, g)?;
        if let Some(f) = fresh {
            *state = Some(f);
        }
        Ok(())
    }
}

impl<C: Algorithm + Default> Default for Optim<C> {
    fn default() -> Self {
        Self::new(C::default())
    }
}

/// Refuses a parameter or gradient that is not `f32`.
fn f32_only(params: &TensorData, grads: &TensorData) -> Result<(), String> {
    if params.dtype() != DType::F32 || grads.dtype() != DType::F32 {
        return Err(format!("parameter {:?} and gradient {:?}: only f32 is supported", params.dtype(), grads.dtype()));
    }
    Ok(())
}

/// burn's step of one parameter: its data and its gradient's out of burn,
/// `step` on them (which leaves both and the state as they were on error),
/// the reason of a failed step recorded, the parameter given back.
fn step_tensor<const D: usize, S>(
    errors: &StepErrors,
    tensor: Tensor<D>,
    grad: Tensor<D>,
    mut state: Option<S>,
    step: impl FnOnce(&mut TensorData, &TensorData, &mut Option<S>) -> Result<(), String>,
) -> (Tensor<D>, Option<S>) {
    let device = tensor.device();
    let mut params = tensor.into_data();
    let grads = grad.into_data();
    if let Err(reason) = step(&mut params, &grads, &mut state) {
        errors.push(reason);
    }
    (Tensor::from_data(params, &device), state)
}

/// One parameter's state: an adaoptim optimizer over its elements (state
/// buffers by torch name, its own step count). In a burn record it is one
/// `U8` tensor holding adaoptim's safetensors checkpoint of that optimizer
/// (so the state names inside are torch's): named `adaoptim` for `f32`
/// state, `adaoptim_mixed` for `bf16` or 8-bit state.
#[derive(Clone, Debug)]
pub enum State<C: Algorithm> {
    /// `f32` state.
    F32(adaoptim::Optimizer<C>),
    /// `bf16` or 8-bit block-wise state ([`Optim::with_state_dtype`]).
    Mixed(MixedOptimizer<C>),
}

impl<C: Algorithm> State<C> {
    /// One `f32` parameter's step with this state; on error nothing changed.
    fn run(&mut self, exec: Exec, lr: LearningRate, p: &mut [f32], g: &[f32]) -> Result<(), String> {
        let r = match self {
            State::F32(o) => {
                o.set_exec(exec);
                o.set_lr(lr).and_then(|()| o.step(p, g))
            }
            State::Mixed(o) => {
                o.set_exec(exec);
                o.set_lr(lr).and_then(|()| o.step(Params::F32(p), Grads::F32(g), None))
            }
        };
        r.map(|_| ()).map_err(|e| e.to_string())
    }

    /// The steps taken with this state.
    pub fn steps(&self) -> u64 {
        match self {
            State::F32(o) => o.step_count(),
            State::Mixed(m) => m.steps(),
        }
    }

    /// The storage the state is kept in.
    pub fn dtype(&self) -> Dtype {
        match self {
            State::F32(_) => Dtype::F32,
            State::Mixed(m) => m.state_dtype(),
        }
    }
}

impl<C: Algorithm> RecordState for State<C> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        // A checkpoint of an existing optimizer only fails on an internal
        // inconsistency; an empty tensor then makes the load fail (`None`)
        // rather than restore a wrong state.
        let (name, bytes) = match self {
            State::F32(o) => ("adaoptim", o.to_safetensors().unwrap_or_default()),
            State::Mixed(o) => ("adaoptim_mixed", o.to_safetensors().unwrap_or_default()),
        };
        let n = bytes.len();
        out.push_tensor(prefix, name, TensorData::new(bytes, [n]));
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, _device: &Device) -> Option<Self> {
        if let Some(data) = src.take_tensor(prefix, "adaoptim") {
            let bytes = data.as_slice::<u8>().ok()?;
            return adaoptim::Optimizer::from_safetensors(bytes).ok().map(State::F32);
        }
        let data = src.take_tensor(prefix, "adaoptim_mixed")?;
        let bytes = data.as_slice::<u8>().ok()?;
        MixedOptimizer::from_safetensors(bytes).ok().map(State::Mixed)
    }
}

impl<C: Algorithm> burn::optim::Optimizer for Optim<C> {
    type State<const D: usize> = State<C>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<State<C>>,
    ) -> (Tensor<D>, Option<State<C>>) {
        step_tensor(&self.errors, tensor, grad, state, |p, g, s| self.step_data(lr, p, g, s))
    }

    fn to_device<const D: usize>(state: State<C>, _device: &Device) -> State<C> {
        // The state is host memory, used on the CPU wherever the tensors are.
        state
    }
}

/// Clips the gradients of `module`'s parameters held in `grads` to a global
/// L2 norm of `max_norm`, as `torch.nn.utils.clip_grad_norm_` does over
/// all parameters: each gradient is multiplied by torch's factor
/// `min(1, max_norm / (norm + 1e-6))` (in `f32`, as torch computes it;
/// [`adaoptim::clip::clip_coef`]) when it is below 1, and left as it is
/// otherwise. Returns the total norm before clipping, NaN or infinite if a
/// gradient is (the factor is then NaN or 0, as torch's; skip such a step
/// yourself). The sum of squares is adaoptim's (f64, a fixed tree per
/// tensor, the tensors in module order), so the result does not depend on
/// the thread count. Gradients of parameters not in `module` are left
/// alone.
///
/// ```ignore
/// let mut grads = GradientsParams::from_grads(loss.backward(), &model);
/// let norm = adaoptim_burn::clip_grad_norm(&model, &mut grads, 1.0)?;
/// model = optim.step(lr, model, grads);
/// ```
///
/// Cost: each gradient is read out of burn once for the norm and, when
/// clipped, once more to scale it ([`Tensor::into_data`], a copy on burn's
/// ndarray backend where the data is shared) and put back.
///
/// # Errors
/// [`Error::InvalidHyperparameter`] unless `max_norm` is finite and `> 0`;
/// [`Error::InvalidOption`] for a gradient that is not `f32`. No gradient
/// is changed when an error is returned.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> Result<f64, Error> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::InvalidHyperparameter { name: "max_norm", value: max_norm, requirement: "finite and > 0" });
    }
    struct Norm<'a> {
        grads: &'a GradientsParams,
        exec: Exec,
        sum: f64,
        error: Option<Error>,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.error.is_some() {
                return;
            }
            let Some(g) = self.grads.get::<D>(param.id) else { return };
            let data = g.into_data();
            match data.as_slice::<f32>() {
                Ok(s) => match clip::sum_of_squares(s, &self.exec) {
                    Ok(x) => self.sum += x,
                    Err(e) => self.error = Some(e),
                },
                Err(_) => {
                    self.error = Some(Error::InvalidOption {
                        name: "grads".into(),
                        reason: "clip_grad_norm takes f32 gradients only",
                    })
                }
            }
        }
    }
    let mut norm = Norm { grads, exec: Exec::auto(), sum: 0.0, error: None };
    module.visit(&mut norm);
    if let Some(e) = norm.error {
        return Err(e);
    }
    let total = norm.sum.sqrt();
    let coef = clip::clip_coef(total, max_norm);
    if coef != 1.0 {
        struct Scale<'a> {
            grads: &'a mut GradientsParams,
            coef: f32,
        }
        impl ModuleVisitor for Scale<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let Some(g) = self.grads.remove::<D>(param.id) else { return };
                let device = g.device();
                let mut data = g.into_data();
                // Every gradient was read as f32 above.
                if let Ok(s) = data.as_mut_slice::<f32>() {
                    for x in s {
                        *x *= self.coef;
                    }
                }
                self.grads.register::<D>(param.id, Tensor::from_data(data, &device));
            }
        }
        module.visit(&mut Scale { grads, coef });
    }
    Ok(total)
}
