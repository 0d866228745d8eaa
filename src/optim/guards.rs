//! The controls every optimizer type shares: the non-finite policy, the
//! `controls!` macro (execution policy, guards, loss scale, clipping, written
//! once and expanded into each owner), the guards that run before a step, and
//! the one schedule application.

use super::{Algorithm, check_grad_scale};
use crate::Error;
use crate::driver::{Plan, StepReport, Unscale};
use crate::exec::Exec;
use crate::schedule::LrSchedule;
use crate::storage::{Exact, Grads};

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

/// [`non_finite_guard`] over gradients in any storage: `bf16` and `f16`
/// ones are widened exactly (and unscaled as the step unscales them); a
/// half-precision gradient is non-finite exactly when its sum of squares
/// is, so one reduction answers, and the index is searched only then.
pub(crate) fn non_finite_guard_grads(
    policy: NonFinitePolicy,
    plan: &Plan,
    grads: Grads<'_>,
    offset: usize,
) -> Result<Option<StepReport>, Error> {
    fn half<E: Exact>(
        policy: NonFinitePolicy,
        plan: &Plan,
        g: &[E],
        offset: usize,
    ) -> Result<Option<StepReport>, Error> {
        if policy == NonFinitePolicy::Propagate || crate::driver::sum_of_squares(plan, g).is_finite() {
            return Ok(None);
        }
        if policy == NonFinitePolicy::Error {
            let index = g.iter().position(|&x| !plan.unscale.apply(x.exact()).is_finite()).unwrap_or(0);
            return Err(Error::NonFiniteGradient { index: offset + index });
        }
        Ok(Some(StepReport { backend: plan.backend, parallel: false, skipped: true }))
    }
    match grads {
        Grads::F32(g) => non_finite_guard(policy, plan, g, offset),
        Grads::Bf16(g) => half(policy, plan, g, offset),
        Grads::F16(g) => half(policy, plan, g, offset),
    }
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
    /// No loss scale, no clipping, non-finite gradients propagated: a step
    /// needs no scan or scaled copy of its gradients.
    pub(crate) fn is_off(&self) -> bool {
        self.non_finite == NonFinitePolicy::Propagate && self.grad_scale.is_none() && self.max_grad_norm.is_none()
    }

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

    /// The guards of a whole-buffer step over `grads`: the plan for `exec`
    /// with the loss scale and clip factor, or the report of a skipped step;
    /// the norm measured (clipping on), or `given_norm`, is recorded either
    /// way.
    pub(crate) fn begin(
        &mut self,
        exec: &Exec,
        grads: &[f32],
        given_norm: Option<f64>,
    ) -> Result<Result<Plan, StepReport>, Error> {
        let mut plan = self.plan(exec)?;
        let (skipped, norm) = self.check(&mut plan, grads, 0, given_norm)?;
        if norm.is_some() {
            self.last_grad_norm = norm;
        }
        Ok(skipped.map_or(Ok(plan), Err))
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
