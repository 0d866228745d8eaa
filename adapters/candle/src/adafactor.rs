//! [`Adafactor`]: `torch.optim.Adafactor` over candle `Var`s, each `Var`
//! with its own factored state (row and column variances for two or more
//! dimensions), as adaoptim's [`adaoptim::Adafactor`] keeps it.

use adaoptim::storage::{Grads, Params};
use adaoptim::{AdafactorConfig, Exec, NonFinitePolicy};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{check_var, checked_grads, locked_step, msg, pending_lr_error, read_file, wrap};

/// `torch.optim.Adafactor` over candle `Var`s, stepped in place: every
/// `Var` locked at once (as [`Optim`](crate::Optim) does), then stepped one
/// after another by its own [`adaoptim::Adafactor`], each in parallel when
/// large. The bits are adaoptim's on raw slices. `f32` `Var`s and gradients
/// only (a `bf16` `Var` is an error at construction, a `bf16` or `f16`
/// gradient at the step); a `Var` without a gradient is left untouched.
///
/// ```
/// use adaoptim_candle::{Adafactor, AdafactorConfig};
/// use candle_nn::Optimizer;
/// # fn main() -> candle_core::Result<()> {
/// let w = candle_core::Var::ones((4, 3), candle_core::DType::F32, &candle_core::Device::Cpu)?;
/// let mut opt = Adafactor::new(vec![w.clone()], AdafactorConfig::default())?;
/// opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
/// assert_eq!(opt.inner(0).unwrap().row_var().len(), 4);
/// # Ok(()) }
/// ```
///
/// Global-norm clipping ([`set_max_grad_norm`](Self::set_max_grad_norm))
/// and the non-finite guard ([`set_non_finite`](Self::set_non_finite)) look
/// at every present gradient before any `Var` moves. They cost one more
/// read of the gradients, and clipping by a factor other than 1 a scaled
/// copy of each gradient (adaoptim's Adafactor kernel has no clipping
/// factor of its own).
///
/// Checkpoints hold the whole optimizer (every `Var`'s state and step
/// count, [`save`](Self::save) and [`load`](Self::load)).
///
/// Not supported yet: parameter groups, attached schedules (set the
/// learning rate by hand), loss scaling.
#[derive(Debug)]
pub struct Adafactor {
    vars: Vec<Var>,
    opts: Vec<adaoptim::Adafactor>,
    /// An invalid value given to `set_learning_rate`, reported by `step`.
    bad_lr: Option<f64>,
    exec: Exec,
    max_norm: Option<f64>,
    policy: NonFinitePolicy,
    last_norm: Option<f64>,
}

impl Adafactor {
    /// The optimized `Var`s, in order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The state of the `i`-th `Var` (`row_var`, `col_var` or `variance`,
    /// step count, checkpoint).
    pub fn inner(&self, i: usize) -> Option<&adaoptim::Adafactor> {
        self.opts.get(i)
    }

    /// The execution policy (backend, threads) of every `Var`'s step.
    pub fn set_exec(&mut self, exec: Exec) {
        self.exec = exec;
        self.opts.iter_mut().for_each(|o| o.set_exec(exec));
    }

    /// Clips the gradients to a global L2 norm of `max_norm` over every
    /// present gradient inside each step, as
    /// `torch.nn.utils.clip_grad_norm_` over all parameters would (the norm
    /// summed in f64, the factor [`adaoptim::clip::clip_coef`], each
    /// gradient multiplied by it in f32); `None` turns it off. The
    /// `GradStore` is not written.
    ///
    /// # Errors
    /// Unless `max_norm` is finite and `> 0`; nothing changes then.
    pub fn set_max_grad_norm(&mut self, max_norm: Option<f64>) -> candle_core::Result<()> {
        if let Some(m) = max_norm
            && !(m.is_finite() && m > 0.0)
        {
            return Err(wrap(adaoptim::Error::InvalidHyperparameter {
                name: "max_norm",
                value: m,
                requirement: "finite and > 0",
            }));
        }
        self.max_norm = max_norm;
        Ok(())
    }

    /// The global gradient norm the last step measured (clipping on).
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_norm
    }

    /// What a step does with NaN/inf gradients: under `SkipStep` nothing
    /// changes, under `Error` the step fails with the first such element's
    /// index counted through the present gradients in order (as
    /// [`Optim`](crate::Optim) counts); `Propagate` (the default) steps them
    /// as torch does.
    pub fn set_non_finite(&mut self, policy: NonFinitePolicy) {
        self.policy = policy;
    }

    /// One step with an explicit gradient per `Var` (`None`: skipped), in
    /// [`vars`](Self::vars) order.
    ///
    /// # Errors
    /// Another number of gradients; a gradient that is not `f32`, or of
    /// another shape or device; a `Var` or gradient sharing storage with
    /// another `Var`; an invalid learning rate set earlier; a `Var` at
    /// adaoptim's step limit; a NaN or infinite gradient under
    /// [`NonFinitePolicy::Error`]. Nothing changes on error.
    pub fn step_with(&mut self, grads: &[Option<&Tensor>]) -> candle_core::Result<()> {
        pending_lr_error(self.bad_lr)?;
        let owned = checked_grads(&self.vars, grads)?;
        for (i, (g, o)) in owned.iter().zip(&self.opts).enumerate() {
            if let Some(g) = g {
                if g.dtype() != DType::F32 {
                    return Err(msg(format!("the gradient of Var {i} is {:?}; Adafactor takes f32 only", g.dtype())));
                }
                if o.steps() >= adaoptim::MAX_STEP {
                    return Err(wrap(adaoptim::Error::StepLimit { step: o.steps() }));
                }
            }
        }
        let opts = &mut self.opts;
        let (exec, max_norm, policy) = (self.exec, self.max_norm, self.policy);
        let mut norm = None;
        locked_step(&self.vars, &owned, |steps| {
            // Everything that can fail is checked before the first Var is
            // stepped, so no Var is stepped unless all are.
            let mut work = Vec::with_capacity(steps.len());
            for (ts, o) in steps.iter_mut().zip(opts.iter_mut()) {
                match (ts.params.reborrow(), ts.grads) {
                    (_, None) => {}
                    (Params::F32(p), Some(Grads::F32(g))) => work.push((o, p, g)),
                    (p, _) => {
                        return Err(adaoptim::Error::Storage {
                            what: "params",
                            dtype: p.dtype(),
                            reason: "Adafactor steps f32 parameters and gradients only",
                        });
                    }
                }
            }
            let mut coef = 1.0f32;
            if max_norm.is_some() || policy != NonFinitePolicy::Propagate {
                let mut sum = 0.0f64;
                for (_, _, g) in &work {
                    sum += adaoptim::clip::sum_of_squares(g, &exec)?;
                }
                if max_norm.is_some() {
                    norm = Some(sum.sqrt());
                }
                if !sum.is_finite() && policy != NonFinitePolicy::Propagate {
                    if policy == NonFinitePolicy::SkipStep {
                        return Ok(());
                    }
                    let index = work.iter().flat_map(|(_, _, g)| g.iter()).position(|x| !x.is_finite());
                    return Err(adaoptim::Error::NonFiniteGradient { index: index.unwrap_or(0) });
                }
                if let Some(m) = max_norm {
                    coef = adaoptim::clip::clip_coef(sum.sqrt(), m);
                }
            }
            for (o, p, g) in work {
                if coef == 1.0 {
                    o.step(p, g)?;
                } else {
                    let scaled: Vec<f32> = g.iter().map(|&x| x * coef).collect();
                    o.step(p, &scaled)?;
                }
            }
            Ok(())
        })?;
        if norm.is_some() {
            self.last_norm = norm;
        }
        Ok(())
    }
}

impl Adafactor {
    /// The optimizer's state as safetensors bytes: adaoptim's checkpoint of
    /// several Adafactors ([`adaoptim::Adafactor::many_to_safetensors`]:
    /// torch's `state.{i}.row_var`, `state.{i}.col_var` or
    /// `state.{i}.variance` and `state.{i}.step` per `Var` index, each
    /// group's options, the `Var`s' shapes). The `Var`s themselves are the
    /// caller's to save (`varmap.save`).
    ///
    /// # Errors
    /// If serialization fails.
    pub fn to_safetensors(&self) -> candle_core::Result<Vec<u8>> {
        adaoptim::Adafactor::many_to_safetensors(&self.opts, &[]).map_err(wrap)
    }

    /// Saves atomically (a previous file survives a failed save); see
    /// [`adaoptim::checkpoint::write_atomic`].
    ///
    /// # Errors
    /// I/O and serialization errors.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> candle_core::Result<()> {
        adaoptim::checkpoint::write_atomic(path.as_ref(), &self.to_safetensors()?).map_err(wrap)
    }

    /// Loads a checkpoint of an Adafactor over `Var`s of the same count and
    /// shapes: every `Var`'s state, step count and configuration; the
    /// controls set here (clipping, the non-finite policy, execution) stay,
    /// and a pending invalid learning rate is dropped with the old
    /// configuration.
    ///
    /// # Errors
    /// A damaged file, one of another optimizer, or of other `Var`s;
    /// nothing changes then.
    pub fn load_safetensors(&mut self, bytes: &[u8]) -> candle_core::Result<()> {
        let mut loaded = adaoptim::Adafactor::many_from_safetensors(bytes).map_err(wrap)?;
        let theirs: Vec<&[usize]> = loaded.iter().map(|o| o.shape()).collect();
        let mine: Vec<&[usize]> = self.vars.iter().map(|v| v.dims()).collect();
        if theirs != mine {
            return Err(msg(format!("checkpoint: its Vars have shapes {theirs:?}, these have {mine:?}")));
        }
        for o in &mut loaded {
            o.set_exec(self.exec);
        }
        self.opts = loaded;
        self.bad_lr = None;
        Ok(())
    }

    /// Loads a checkpoint file; see [`load_safetensors`](Self::load_safetensors).
    ///
    /// # Errors
    /// As [`load_safetensors`](Self::load_safetensors), and I/O errors.
    pub fn load(&mut self, path: impl AsRef<std::path::Path>) -> candle_core::Result<()> {
        self.load_safetensors(&read_file(path.as_ref())?)
    }
}

impl candle_nn::Optimizer for Adafactor {
    type Config = AdafactorConfig;

    /// An Adafactor state per `Var` (its shape decides factoring);
    /// integer `Var`s are dropped.
    ///
    /// # Errors
    /// Invalid hyperparameters; a `Var` that is not f32, not on the CPU or
    /// not contiguous; the same `Var` twice.
    fn new(vars: Vec<Var>, config: AdafactorConfig) -> candle_core::Result<Self> {
        config.validate().map_err(wrap)?;
        let mut kept = Vec::new();
        let mut opts = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, var) in vars.into_iter().enumerate() {
            let what = format!("Var {i}");
            if !check_var(&var, &what)? {
                continue;
            }
            if var.dtype() != DType::F32 {
                return Err(msg(format!("{what} is {:?}; Adafactor steps f32 Vars only", var.dtype())));
            }
            if !seen.insert(var.id()) {
                return Err(msg(format!("{what} is given twice")));
            }
            opts.push(adaoptim::Adafactor::new(config, var.dims()).map_err(wrap)?);
            kept.push(var);
        }
        Ok(Adafactor {
            vars: kept,
            opts,
            bad_lr: None,
            exec: Exec::auto(),
            max_norm: None,
            policy: NonFinitePolicy::Propagate,
            last_norm: None,
        })
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let gs: Vec<Option<&Tensor>> = self.vars.iter().map(|v| grads.get(v.as_tensor())).collect();
        self.step_with(&gs)
    }

    /// The learning rate (every `Var`'s).
    fn learning_rate(&self) -> f64 {
        self.opts.first().map_or(0.0, |o| o.lr())
    }

    /// Sets every `Var`'s learning rate; an invalid value is not applied
    /// and makes the next steps fail (see the [crate docs](crate)).
    fn set_learning_rate(&mut self, lr: f64) {
        let base = self.opts.first().map_or_else(AdafactorConfig::default, |o| *o.config());
        if (AdafactorConfig { lr, ..base }).validate().is_err() {
            self.bad_lr = Some(lr);
            return;
        }
        for o in &mut self.opts {
            // Valid: checked above with the same configuration but the lr.
            let _ = o.set_lr(lr);
        }
        self.bad_lr = None;
    }
}
