//! [`Adafactor`]: `torch.optim.Adafactor` as burn's per-parameter
//! optimizer. Adafactor factors the second moment of a parameter of two or
//! more dimensions into row and column statistics, so its state is made for
//! the parameter's *shape*, which burn hands over with every step.

use adaoptim::{AdafactorConfig, Exec};
use burn::optim::{LearningRate, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor, TensorData};

use crate::StepErrors;

/// `torch.optim.Adafactor` for burn: one [`adaoptim::Adafactor`] per
/// parameter (factored for two or more dimensions, as torch's), driven by
/// burn's [`ModuleOptimizer`](burn::optim::ModuleOptimizer) like
/// [`Optim`](crate::Optim): groups, schedules and records are burn's. The
/// learning rate is burn's (torch's Adafactor `lr`: the largest relative
/// step and the weight-decay factor); the configuration's own `lr` is not
/// used.
///
/// ```
/// use adaoptim_burn::{Adafactor, AdafactorConfig};
/// use burn::optim::ModuleOptimizer;
///
/// let mut optim: ModuleOptimizer = Adafactor::new(AdafactorConfig { weight_decay: 0.01, ..Default::default() }).into();
/// // model = optim.step(1e-2, model, GradientsParams::from_grads(loss.backward(), &model));
/// ```
///
/// A step that cannot run (a parameter or gradient that is not `f32`, a
/// gradient or state of another shape, an invalid learning rate) leaves
/// that parameter and its state as they were and is recorded in
/// [`errors`](Self::errors), as for [`Optim`](crate::Optim).
#[derive(Clone, Debug)]
pub struct Adafactor {
    config: AdafactorConfig,
    exec: Exec,
    errors: StepErrors,
}

impl Adafactor {
    /// An optimizer with these hyperparameters (the learning rate comes from
    /// burn at each step).
    pub fn new(config: AdafactorConfig) -> Self {
        Adafactor { config, exec: Exec::auto(), errors: StepErrors::default() }
    }

    /// The same, with an execution policy (backend, threads) for every step.
    pub fn with_exec(mut self, exec: Exec) -> Self {
        self.exec = exec;
        self
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdafactorConfig {
        &self.config
    }

    /// The reasons of steps that could not run (shared with every clone).
    pub fn errors(&self) -> StepErrors {
        self.errors.clone()
    }

    /// One parameter's step on its data; a state is made for its shape when
    /// `state` is `None`. On error the data and the state are as they were.
    fn step_data(
        &self,
        lr: LearningRate,
        params: &mut TensorData,
        grads: &TensorData,
        state: &mut Option<AdafactorState>,
    ) -> Result<(), String> {
        crate::f32_only(params, grads)?;
        let shape = params.shape().to_vec();
        if grads.shape().as_slice() != shape.as_slice() {
            return Err(format!("gradient of shape {:?} for a parameter of shape {shape:?}", grads.shape().as_slice()));
        }
        let mut fresh = None;
        let st = match state.as_mut() {
            Some(s) if s.0.shape() == shape.as_slice() => &mut s.0,
            Some(s) => return Err(format!("a state of shape {:?} for a parameter of shape {shape:?}", s.0.shape())),
            None => fresh.insert(adaoptim::Adafactor::new(self.config, &shape).map_err(|e| e.to_string())?),
        };
        let g = grads.as_slice::<f32>().map_err(|e| format!("gradient: {e:?}"))?;
        let p = params.as_mut_slice::<f32>().map_err(|e| format!("parameter: {e:?}"))?;
        st.set_exec(self.exec);
        // An invalid lr is refused before anything changes; a step that then
        // fails (the step limit) puts the old lr back.
        let old = st.lr();
        st.set_lr(lr).map_err(|e| e.to_string())?;
        if let Err(e) = st.step(p, g) {
            st.set_lr(old).map_err(|e| e.to_string())?;
            return Err(e.to_string());
        }
        if let Some(f) = fresh {
            *state = Some(AdafactorState(f));
        }
        Ok(())
    }
}

impl Default for Adafactor {
    fn default() -> Self {
        Self::new(AdafactorConfig::default())
    }
}

/// One parameter's Adafactor state: `row_var`/`col_var` or `variance` and
/// the step count. In a burn record it is one `U8` tensor named
/// `adaoptim_adafactor` holding adaoptim's safetensors checkpoint of it
/// (torch's state names and shapes inside).
#[derive(Clone, Debug)]
pub struct AdafactorState(pub adaoptim::Adafactor);

impl RecordState for AdafactorState {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        // As for `State`: an empty tensor on an internal inconsistency makes
        // the load fail rather than restore a wrong state.
        let bytes = self.0.to_safetensors().unwrap_or_default();
        let n = bytes.len();
        out.push_tensor(prefix, "adaoptim_adafactor", TensorData::new(bytes, [n]));
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, _device: &Device) -> Option<Self> {
        let data = src.take_tensor(prefix, "adaoptim_adafactor")?;
        let bytes = data.as_slice::<u8>().ok()?;
        adaoptim::Adafactor::from_safetensors(bytes).ok().map(AdafactorState)
    }
}

impl burn::optim::Optimizer for Adafactor {
    type State<const D: usize> = AdafactorState;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdafactorState>,
    ) -> (Tensor<D>, Option<AdafactorState>) {
        crate::step_tensor(&self.errors, tensor, grad, state, |p, g, s| self.step_data(lr, p, g, s))
    }

    fn to_device<const D: usize>(state: AdafactorState, _device: &Device) -> AdafactorState {
        // The state is host memory, used on the CPU wherever the tensors are.
        state
    }
}
