//! [`Adafactor`]: `torch.optim.Adafactor` over candle `Var`s, each `Var`
//! with its own factored state (row and column variances for two or more
//! dimensions), as adaoptim's [`adaoptim::Adafactor`] keeps it.

use adaoptim::storage::Grads;
use adaoptim::{AdafactorConfig, Exec, NonFinitePolicy};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use adaoptim::schedule::LrSchedule;

use crate::{
    Group, candle_metadata, check_names, check_var, checked_grads, checkpoint_steps, locked_step, msg,
    pending_lr_error, read_file, var_label, varmap_groups, wrap,
};

/// `torch.optim.Adafactor` over candle `Var`s, stepped in place: every
/// `Var` locked at once (as [`Optim`](crate::Optim) does), then stepped one
/// after another by its own [`adaoptim::Adafactor`], each in parallel when
/// large. The bits are adaoptim's on raw slices. `Var`s and gradients may
/// be `f32`, `bf16` or `f16` (each its own): half-precision values are
/// widened exactly, stepped as `f32` with `f32` state and the `Var` rounded
/// back to nearest even, or stochastically for `bf16`
/// ([`set_stochastic_rounding`](Self::set_stochastic_rounding))
/// ([`adaoptim::Adafactor::step_mixed`]: two more
/// passes and 4 bytes per element for each widened buffer, during the
/// step). A `Var` without a gradient is left untouched (its step count
/// too, as in torch).
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
/// Parameter groups ([`with_groups`](Self::with_groups), or
/// [`from_varmap`](Self::from_varmap) by name patterns), each with its own
/// configuration, as [`Optim`](crate::Optim) has them.
///
/// The guards of [`Optim`](crate::Optim) look at every present gradient
/// before any `Var` moves: the loss scale ([`set_grad_scale`](Self::set_grad_scale)),
/// global-norm clipping ([`set_max_grad_norm`](Self::set_max_grad_norm),
/// the norm of the unscaled gradients over all `Var`s, each `Var` stepped
/// by [`adaoptim::Adafactor::step_with_grad_norm`]) and the non-finite
/// guard ([`set_non_finite`](Self::set_non_finite)). They cost one more
/// read of the gradients, and a loss scale or a clipping factor other
/// than 1 a scaled copy of each gradient (adaoptim's Adafactor kernel reads
/// each gradient up to three times, so the factor is not fused into it).
///
/// An attached schedule ([`set_schedule`](Self::set_schedule)) sets every
/// group's learning rate before each step. Checkpoints hold the whole
/// optimizer (every `Var`'s state and step count, the groups' options, the
/// schedule's step count, [`save`](Self::save) and [`load`](Self::load)).
pub struct Adafactor {
    vars: Vec<Var>,
    /// The names of the `Var`s when built from a `VarMap`.
    names: Option<Vec<String>>,
    opts: Vec<adaoptim::Adafactor>,
    /// The group of each `Var`.
    group: Vec<usize>,
    /// Each group's configuration (also of a group without `Var`s).
    configs: Vec<AdafactorConfig>,
    /// An invalid value given to `set_learning_rate`, reported by `step`.
    bad_lr: Option<f64>,
    schedule: Option<Box<dyn LrSchedule + Send + Sync>>,
    /// Calls of `step` that succeeded (the schedule's step count).
    steps: u64,
    exec: Exec,
    max_norm: Option<f64>,
    grad_scale: Option<f32>,
    policy: NonFinitePolicy,
    last_norm: Option<f64>,
    /// The stochastic-rounding seed of `bf16` `Var`s, if set.
    sr_seed: Option<u64>,
}

impl std::fmt::Debug for Adafactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adafactor")
            .field("vars", &self.vars.len())
            .field("names", &self.names)
            .field("group", &self.group)
            .field("configs", &self.configs)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

/// The exact `f32` values of gradients in any storage, one at a time.
fn widened(g: Grads<'_>) -> Box<dyn Iterator<Item = f32> + '_> {
    match g {
        Grads::F32(x) => Box::new(x.iter().copied()),
        Grads::Bf16(x) => Box::new(x.iter().map(|v| v.to_f32())),
        Grads::F16(x) => Box::new(x.iter().map(|v| v.to_f32())),
    }
}

impl Adafactor {
    /// An optimizer over parameter groups, each with its own configuration
    /// (torch's `param_groups`). Integer `Var`s are dropped.
    ///
    /// # Errors
    /// Invalid hyperparameters; a `Var` that is not f32, not on the CPU or
    /// not contiguous; the same `Var` twice.
    pub fn with_groups(groups: Vec<(Vec<Var>, AdafactorConfig)>) -> candle_core::Result<Self> {
        Self::build(groups.into_iter().map(|(vars, c)| (vars.into_iter().map(|v| (None, v)).collect(), c)).collect())
    }

    /// An optimizer over every `Var` of `varmap`, in name order, grouped by
    /// name patterns as [`Optim::from_varmap`](crate::Optim::from_varmap)
    /// groups them (the first rule whose pattern matches; the others with
    /// `config`). The names are recorded in checkpoints.
    ///
    /// # Errors
    /// As [`with_groups`](Self::with_groups).
    pub fn from_varmap(
        varmap: &candle_nn::VarMap,
        config: AdafactorConfig,
        rules: &[(&str, AdafactorConfig)],
    ) -> candle_core::Result<Self> {
        Self::build(varmap_groups(varmap, config, rules)?)
    }

    fn build(groups: Vec<Group<AdafactorConfig>>) -> candle_core::Result<Self> {
        let (mut vars, mut names, mut opts, mut group, mut configs) = (vec![], vec![], vec![], vec![], vec![]);
        let mut seen = std::collections::HashSet::new();
        for (g, (members, config)) in groups.into_iter().enumerate() {
            config.validate().map_err(wrap)?;
            for (name, var) in members {
                let what = var_label(&name, vars.len());
                if !check_var(&var, &what)? {
                    continue;
                }
                if !seen.insert(var.id()) {
                    return Err(msg(format!("{what} is given twice")));
                }
                opts.push(adaoptim::Adafactor::new(config, var.dims()).map_err(wrap)?);
                vars.push(var);
                names.push(name);
                group.push(g);
            }
            configs.push(config);
        }
        Ok(Adafactor {
            vars,
            names: names.into_iter().collect(),
            opts,
            group,
            configs,
            bad_lr: None,
            schedule: None,
            steps: 0,
            exec: Exec::auto(),
            max_norm: None,
            grad_scale: None,
            policy: NonFinitePolicy::Propagate,
            last_norm: None,
            sr_seed: None,
        })
    }

    /// The optimized `Var`s, in order (the checkpoint's numbering).
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The `Var`s' names, for an optimizer built by
    /// [`from_varmap`](Self::from_varmap).
    pub fn names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    /// The state of the `i`-th `Var` (`row_var`, `col_var` or `variance`,
    /// step count, configuration).
    pub fn inner(&self, i: usize) -> Option<&adaoptim::Adafactor> {
        self.opts.get(i)
    }

    /// The group of the `i`-th `Var`.
    pub fn group_of(&self, i: usize) -> Option<usize> {
        self.group.get(i).copied()
    }

    /// Groups (also those without `Var`s).
    pub fn num_groups(&self) -> usize {
        self.configs.len()
    }

    /// A group's configuration.
    pub fn group_config(&self, group: usize) -> Option<&AdafactorConfig> {
        self.configs.get(group)
    }

    /// Replaces a group's configuration (another weight decay, say); the
    /// state is kept.
    ///
    /// # Errors
    /// Invalid hyperparameters or no such group; nothing changes then.
    pub fn set_group_config(&mut self, group: usize, config: AdafactorConfig) -> candle_core::Result<()> {
        config.validate().map_err(wrap)?;
        let slot = self.configs.get_mut(group).ok_or_else(|| msg(format!("no group {group}")))?;
        *slot = config;
        for (o, _) in self.opts.iter_mut().zip(&self.group).filter(|(_, g)| **g == group) {
            // Valid: checked above.
            let _ = o.set_config(config);
        }
        Ok(())
    }

    /// Attaches a schedule: before each step every group's learning rate is
    /// set to the schedule's value for that step (`lr_at(steps())`); a
    /// schedule that cycles momentum makes the step fail (Adafactor has
    /// none). `None` detaches it.
    pub fn set_schedule(&mut self, schedule: Option<Box<dyn LrSchedule + Send + Sync>>) {
        self.schedule = schedule;
    }

    /// Calls of `step` that succeeded so far (the count an attached
    /// schedule reads; a step skipped for a non-finite gradient counts, as
    /// torch's scheduler steps after a skipped `GradScaler` step).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The execution policy (backend, threads) of every `Var`'s step.
    pub fn set_exec(&mut self, exec: Exec) {
        self.exec = exec;
        self.opts.iter_mut().for_each(|o| o.set_exec(exec));
    }

    /// Stochastic rounding of `bf16` `Var`s (`None`, the default: round to
    /// nearest, ties to even), as [`Optim::set_stochastic_rounding`](crate::Optim::set_stochastic_rounding)
    /// keys it: the `i`-th `Var` rounds with adaoptim's stream of seed
    /// `adaoptim::storage::stochastic_key(seed, i)` at its step count
    /// ([`adaoptim::Adafactor::set_stochastic_rounding`]), the same bits for
    /// any thread count, resumed from a checkpoint at the step it holds (the
    /// seed is a control: a checkpoint does not hold it, and loading one
    /// keeps this optimizer's). `f32` and `f16` `Var`s round as before (`f16`
    /// to nearest).
    pub fn set_stochastic_rounding(&mut self, seed: Option<u64>) {
        self.sr_seed = seed;
        let key = |i: usize| seed.map(|s| adaoptim::storage::stochastic_key(s, i as u64));
        self.opts.iter_mut().enumerate().for_each(|(i, o)| o.set_stochastic_rounding(key(i)));
    }

    /// The stochastic-rounding seed, if set.
    pub fn stochastic_rounding(&self) -> Option<u64> {
        self.sr_seed
    }

    /// Clips the gradients to a global L2 norm of `max_norm` over every
    /// present gradient inside each step, as
    /// `torch.nn.utils.clip_grad_norm_` over all parameters would (the norm
    /// of the unscaled gradients summed in f64, the factor
    /// [`adaoptim::clip::clip_coef`], each gradient multiplied by it in
    /// f32); `None` turns it off. The `GradStore` is not written.
    ///
    /// # Errors
    /// Unless `max_norm` is finite and `> 0`; nothing changes then.
    pub fn set_max_grad_norm(&mut self, max_norm: Option<f64>) -> candle_core::Result<()> {
        self.set_every(|o| o.set_max_grad_norm(max_norm))?;
        self.max_norm = max_norm;
        Ok(())
    }

    /// The global gradient norm the last step measured (clipping on).
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_norm
    }

    /// Divides every gradient by `grad_scale` inside the step (loss
    /// scaling; a power-of-two scale exactly); `None` turns it off. The
    /// non-finite guard and the clipping norm see the unscaled gradients.
    ///
    /// # Errors
    /// Unless the scale is finite and nonzero; nothing changes then.
    pub fn set_grad_scale(&mut self, grad_scale: Option<f32>) -> candle_core::Result<()> {
        self.set_every(|o| o.set_grad_scale(grad_scale))?;
        self.grad_scale = grad_scale;
        Ok(())
    }

    /// Applies a control setter to every `Var`'s Adafactor, checked first on
    /// a stand-in (so a refused value changes nothing, with or without
    /// `Var`s): the core's own check, not a copy of it.
    fn set_every(
        &mut self,
        set: impl Fn(&mut adaoptim::Adafactor) -> Result<(), adaoptim::Error>,
    ) -> candle_core::Result<()> {
        let mut probe = adaoptim::Adafactor::new(AdafactorConfig::default(), &[]).map_err(wrap)?;
        set(&mut probe).map_err(wrap)?;
        for o in &mut self.opts {
            set(o).map_err(wrap)?;
        }
        Ok(())
    }

    /// What a step does with NaN/inf gradients (after unscaling): under
    /// `SkipStep` nothing changes, under `Error` the step fails with the
    /// first such element's index counted through the present gradients in
    /// order (as [`Optim`](crate::Optim) counts); `Propagate` (the default)
    /// steps them as torch does.
    pub fn set_non_finite(&mut self, policy: NonFinitePolicy) {
        self.policy = policy;
    }

    /// The group configurations with the attached schedule's learning rate
    /// for the next step, validated (nothing is changed here).
    fn scheduled(&self) -> candle_core::Result<Option<Vec<AdafactorConfig>>> {
        let Some(s) = &self.schedule else { return Ok(None) };
        if s.momentum_at(self.steps).is_some() {
            return Err(wrap(adaoptim::Error::IncompatibleConfig {
                reason: "the schedule cycles momentum; Adafactor has none",
            }));
        }
        let lr = s.lr_at(self.steps);
        let configs = self.configs.iter().map(|c| AdafactorConfig { lr, ..*c });
        configs.map(|c| c.validate().map(|()| c)).collect::<Result<Vec<_>, _>>().map(Some).map_err(wrap)
    }

    /// One step with an explicit gradient per `Var` (`None`: skipped), in
    /// [`vars`](Self::vars) order.
    ///
    /// # Errors
    /// Another number of gradients; a gradient that is not `f32`, or of
    /// another shape or device; a `Var` or gradient sharing storage with
    /// another `Var`; an invalid learning rate (set earlier, or from the
    /// schedule); a `Var` at adaoptim's step limit; a forced backend this
    /// CPU lacks; a NaN or infinite gradient under
    /// [`NonFinitePolicy::Error`]. Nothing changes on error.
    pub fn step_with(&mut self, grads: &[Option<&Tensor>]) -> candle_core::Result<()> {
        pending_lr_error(self.bad_lr)?;
        let owned = checked_grads(&self.vars, grads)?;
        for (g, o) in owned.iter().zip(&self.opts) {
            if g.is_some() && o.steps() >= adaoptim::MAX_STEP {
                return Err(wrap(adaoptim::Error::StepLimit { step: o.steps() }));
            }
        }
        let scheduled = self.scheduled()?;
        let (opts, group) = (&mut self.opts, &self.group);
        let (exec, max_norm, policy, grad_scale) = (self.exec, self.max_norm, self.policy, self.grad_scale);
        let mut norm = None;
        locked_step(&self.vars, &owned, |steps| {
            // Everything that can fail is checked before the first Var is
            // stepped, so no Var is stepped unless all are.
            adaoptim::clip::sum_of_squares(&[], &exec)?;
            let mut work = Vec::with_capacity(steps.len());
            for ((ts, o), &g) in steps.iter_mut().zip(opts.iter_mut()).zip(group) {
                if let Some(grads) = ts.grads {
                    work.push((o, g, ts.params.reborrow(), grads));
                }
            }
            if max_norm.is_some() || policy != NonFinitePolicy::Propagate {
                let mut sum = 0.0f64;
                for (o, _, _, g) in &work {
                    sum += o.grad_sum_of_squares_mixed(*g)?;
                }
                if max_norm.is_some() {
                    norm = Some(sum.sqrt());
                }
                if !sum.is_finite() && policy != NonFinitePolicy::Propagate {
                    if policy == NonFinitePolicy::SkipStep {
                        return Ok(());
                    }
                    let unscaled = |x: f32| grad_scale.map_or(x, |s| x / s);
                    let index = work.iter().flat_map(|w| widened(w.3)).position(|x| !unscaled(x).is_finite());
                    return Err(adaoptim::Error::NonFiniteGradient { index: index.unwrap_or(0) });
                }
            }
            if let Some(configs) = &scheduled {
                for (o, g, _, _) in &mut work {
                    // Validated by `scheduled`.
                    o.set_config(configs[*g])?;
                }
            }
            for (o, _, p, g) in work {
                match norm {
                    Some(total) => o.step_mixed_with_grad_norm(p, g, total)?,
                    None => o.step_mixed(p, g)?,
                };
            }
            Ok(())
        })?;
        if norm.is_some() {
            self.last_norm = norm;
        }
        if let Some(configs) = scheduled {
            for (o, &g) in self.opts.iter_mut().zip(&self.group) {
                // Validated by `scheduled`; Vars without a gradient take the
                // schedule's value too.
                let _ = o.set_config(configs[g]);
            }
            self.configs = configs;
        }
        self.steps += 1;
        Ok(())
    }
}

impl Adafactor {
    /// The optimizer's state as safetensors bytes: adaoptim's checkpoint of
    /// several Adafactors ([`adaoptim::Adafactor::many_to_safetensors`]:
    /// torch's `state.{i}.row_var`, `state.{i}.col_var` or
    /// `state.{i}.variance` and `state.{i}.step` per `Var` index, the
    /// options, the `Var`s' shapes), with each `Var`'s group, the step count
    /// and, from a `VarMap`, the names in the metadata. The `Var`s
    /// themselves are the caller's to save (`varmap.save`).
    ///
    /// # Errors
    /// If serialization fails.
    pub fn to_safetensors(&self) -> candle_core::Result<Vec<u8>> {
        let mut extra = vec![("candle.groups", serde_json::Value::from(self.group.clone()).to_string())];
        extra.extend(candle_metadata(self.steps, self.names.as_deref()));
        adaoptim::Adafactor::many_to_safetensors(&self.opts, &extra).map_err(wrap)
    }

    /// Saves atomically (a previous file survives a failed save); see
    /// [`adaoptim::checkpoint::write_atomic`].
    ///
    /// # Errors
    /// I/O and serialization errors.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> candle_core::Result<()> {
        adaoptim::checkpoint::write_atomic(path.as_ref(), &self.to_safetensors()?).map_err(wrap)
    }

    /// Loads a checkpoint of an Adafactor over `Var`s of the same count,
    /// shapes, groups and (where both have them) names: every `Var`'s state,
    /// step count and configuration, each group's configuration and the
    /// schedule's step count; the controls set here (loss scale, clipping,
    /// the non-finite policy, execution, the schedule) stay, and a pending
    /// invalid learning rate is dropped with the old configuration.
    ///
    /// # Errors
    /// A damaged file, one of another optimizer, or of other `Var`s or
    /// groups; nothing changes then.
    pub fn load_safetensors(&mut self, bytes: &[u8]) -> candle_core::Result<()> {
        let mut loaded = adaoptim::Adafactor::many_from_safetensors(bytes).map_err(wrap)?;
        let theirs: Vec<&[usize]> = loaded.iter().map(|o| o.shape()).collect();
        let mine: Vec<&[usize]> = self.vars.iter().map(|v| v.dims()).collect();
        if theirs != mine {
            return Err(msg(format!("checkpoint: its Vars have shapes {theirs:?}, these have {mine:?}")));
        }
        let meta = adaoptim::checkpoint::format::metadata(bytes).map_err(wrap)?;
        check_names(self.names.as_deref(), &meta)?;
        let steps = checkpoint_steps(&meta)?;
        let groups: Vec<usize> = meta
            .get("candle.groups")
            .ok_or_else(|| msg("checkpoint: no `candle.groups` (not written by this crate)".into()))
            .and_then(|g| serde_json::from_str(g).map_err(|e| msg(format!("checkpoint: groups: {e}"))))?;
        if groups != self.group {
            return Err(msg("checkpoint: its parameter groups differ from these".into()));
        }
        let mut configs = self.configs.clone();
        for (g, config) in configs.iter_mut().enumerate() {
            let mut members = loaded.iter().zip(&groups).filter(|(_, h)| **h == g).map(|(o, _)| *o.config());
            if let Some(first) = members.next() {
                if members.any(|c| c != first) {
                    return Err(msg(format!("checkpoint: the Vars of group {g} have different options")));
                }
                *config = first;
            }
        }
        for o in &mut loaded {
            o.set_exec(self.exec);
            o.set_grad_scale(self.grad_scale).map_err(wrap)?;
            o.set_max_grad_norm(self.max_norm).map_err(wrap)?;
        }
        self.opts = loaded;
        self.set_stochastic_rounding(self.sr_seed);
        self.configs = configs;
        self.steps = steps;
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

    /// One group: an Adafactor state per `Var` (its shape decides
    /// factoring); integer `Var`s are dropped.
    ///
    /// # Errors
    /// Invalid hyperparameters; a `Var` that is not f32, not on the CPU or
    /// not contiguous; the same `Var` twice.
    fn new(vars: Vec<Var>, config: AdafactorConfig) -> candle_core::Result<Self> {
        Self::with_groups(vec![(vars, config)])
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let gs: Vec<Option<&Tensor>> = self.vars.iter().map(|v| grads.get(v.as_tensor())).collect();
        self.step_with(&gs)
    }

    /// The first group's learning rate.
    fn learning_rate(&self) -> f64 {
        self.configs.first().map_or(0.0, |c| c.lr)
    }

    /// Sets every group's learning rate; an invalid value is not applied
    /// and makes the next steps fail (see the [crate docs](crate)).
    fn set_learning_rate(&mut self, lr: f64) {
        if self.configs.iter().any(|c| (AdafactorConfig { lr, ..*c }).validate().is_err()) {
            self.bad_lr = Some(lr);
            return;
        }
        for g in 0..self.configs.len() {
            // Valid: checked above with the same configuration but the lr.
            let _ = self.set_group_config(g, AdafactorConfig { lr, ..self.configs[g] });
        }
        self.bad_lr = None;
    }
}
