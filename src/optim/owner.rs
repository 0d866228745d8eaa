//! [`Optimizer`]: one tensor's optimizer owning its state.

use super::{Algorithm, Guards, MAX_STATE, NonFinitePolicy, check_len, controls, scheduled, sealed};
use crate::Error;
use crate::driver::{Bufs, StepReport};
use crate::exec::Exec;
use crate::memory::Raw;
use crate::schedule::LrSchedule;

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
    /// [`MAX_STEP`](crate::MAX_STEP) steps. Nothing is modified on error.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) -> Result<StepReport, Error> {
        check_len("params", self.n, params.len())?;
        check_len("grads", self.n, grads.len())?;
        let t = crate::error::next_step(self.t)?;
        let plan = match self.guards.begin(&self.exec, grads, None)? {
            Ok(plan) => plan,
            Err(skipped) => return Ok(skipped),
        };
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
