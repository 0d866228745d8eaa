//! [adaoptim]'s CPU optimizers for [candle](https://github.com/huggingface/candle):
//! [`Optim<C>`] implements [`candle_nn::Optimizer`] for every adaoptim
//! configuration `C`, stepping the `Var`s in place.
//!
//! ```no_run
//! use adaoptim_candle::{AdamW, AdamWConfig};
//! use candle_nn::Optimizer; // for `new` and `backward_step`
//! # fn main() -> candle_core::Result<()> {
//! # let varmap = candle_nn::VarMap::new();
//! # let loss = candle_core::Tensor::new(0f32, &candle_core::Device::Cpu)?;
//! let mut opt = AdamW::new(varmap.all_vars(), AdamWConfig { lr: 1e-3, ..Default::default() })?;
//! opt.backward_step(&loss)?;
//! # Ok(()) }
//! ```
//!
//! # How a step runs
//! [`step`](candle_nn::Optimizer::step) takes the write lock of every `Var`
//! (candle's in-place custom op, nested one `Var` inside the other), hands
//! each `Var`'s storage and its gradient's storage to one
//! [`MultiOptimizer::step_mixed`] as borrowed slices, and so updates every
//! `Var` in **one** parallel region, without a copy: the bits are those of
//! adaoptim on raw slices. A `Var` whose gradient is absent from the
//! `GradStore` is left untouched, its state and step count included
//! (torch's semantics for a parameter whose `.grad` is `None`).
//!
//! # What it accepts
//! `f32`, `bf16` and `f16` `Var`s on the CPU device, contiguous (every
//! `Var` candle creates is). A `bf16` or `f16` `Var` is widened, stepped in
//! `f32` and rounded back to nearest (or, for `bf16`, stochastically:
//! [`Optim::set_stochastic_rounding`]). The optimizer state is `f32` by
//! default (candle's own optimizers keep it in the `Var`'s dtype);
//! [`Optim::set_state_dtype`] keeps it in `bf16` or bitsandbytes' 8-bit
//! block-wise form instead (6 or 2 bytes of Adam state per parameter
//! instead of 8), the bits those of adaoptim's
//! [`MultiOptimizer::add_group_with_state`]. A `Var` of
//! another float dtype (`f64`, ...), on another device or with a strided layout is an
//! error at construction; a `Var` of an integer dtype is not optimized, as
//! candle's own optimizers skip it. The same `Var` twice is an error (it
//! would be stepped twice). Gradients must be `f32`, `bf16` or `f16` on the
//! CPU with the `Var`'s shape (any of the three for either kind of `Var`;
//! half-precision ones are widened exactly, and the non-finite guard and
//! the clipping norm read them so); a non-contiguous gradient is copied
//! into a contiguous one first (the only copy this crate ever makes;
//! backprop produces contiguous gradients). Every error is a
//! [`candle_core::Error`] carrying adaoptim's message, and a step that
//! returns an error changes nothing.
//!
//! # Learning rate and schedules
//! [`set_learning_rate`](candle_nn::Optimizer::set_learning_rate) cannot
//! return an error in candle's trait. An invalid value (negative, NaN or
//! infinite) is not applied: the learning rate stays as it was, and every
//! following `step` returns an error naming the value until a valid one is
//! set. Nothing panics. A schedule from [`adaoptim::schedule`] either drives
//! it by hand (`opt.set_learning_rate(s.lr_at(t))`) or is attached with
//! [`Optim::set_schedule`], which applies it before each step.

#![deny(missing_docs)]

use std::cell::RefCell;

use adaoptim::multi::{MixedTensorStep, MultiOptimizer};
use adaoptim::schedule::LrSchedule;
use adaoptim::storage::{Grads, Params, bf16, f16};
use adaoptim::{Algorithm, Exec, NonFinitePolicy};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, Var};

mod adafactor;

pub use adafactor::Adafactor;
pub use adaoptim;
pub use adaoptim::AdafactorConfig;
/// Every adaoptim configuration, to build an optimizer with.
pub use adaoptim::optim::registered::*;

/// An adaoptim optimizer over candle `Var`s; see the [crate docs](crate).
pub struct Optim<C: Algorithm> {
    /// The optimized `Var`s, in tensor order (group by group).
    vars: Vec<Var>,
    /// The names of the `Var`s when built from a `VarMap`, recorded in
    /// checkpoints and checked when one is loaded.
    names: Option<Vec<String>>,
    opt: MultiOptimizer<C>,
    /// An invalid value given to `set_learning_rate`, reported by `step`.
    bad_lr: Option<f64>,
    schedule: Option<Box<dyn LrSchedule + Send + Sync>>,
    /// Calls of `step` that updated (the schedule's step count).
    steps: u64,
}

impl<C: Algorithm> std::fmt::Debug for Optim<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optim")
            .field("vars", &self.vars.len())
            .field("names", &self.names)
            .field("opt", &self.opt)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

// One alias per optimizer of adaoptim's registry, named as adaoptim's own.
macro_rules! aliases {
    ($($module:ident { $($alias:ident($cfg:ident)),+ })*) => {$($(
        #[doc = concat!("`Optim<", stringify!($cfg), ">`: the candle optimizer of [`", stringify!($cfg), "`].")]
        pub type $alias = Optim<$cfg>;
    )+)*};
}
adaoptim::for_each_optimizer!(aliases);

fn wrap(e: adaoptim::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The error every step returns after `set_learning_rate` was given an
/// invalid value (`bad_lr`), until a valid one is set.
fn pending_lr_error(bad_lr: Option<f64>) -> candle_core::Result<()> {
    match bad_lr {
        Some(lr) => Err(wrap(adaoptim::Error::InvalidHyperparameter {
            name: "lr",
            value: lr,
            requirement: "finite and >= 0 (set by set_learning_rate)",
        })),
        None => Ok(()),
    }
}

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::msg(format!("adaoptim-candle: {s}"))
}

/// Why a `Var` cannot be optimized in place, or `Ok(false)` for one that is
/// skipped (an integer dtype, as candle's optimizers skip it).
fn check_var(var: &Var, what: &str) -> candle_core::Result<bool> {
    if !var.dtype().is_float() {
        return Ok(false);
    }
    if !matches!(var.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Err(msg(format!("{what} is {:?}; only f32, bf16 and f16 Vars are supported", var.dtype())));
    }
    if !var.device().is_cpu() {
        return Err(msg(format!("{what} is on {:?}; only CPU Vars are supported", var.device().location())));
    }
    if var.layout().contiguous_offsets().is_none() {
        return Err(msg(format!("{what} has a strided layout; only contiguous Vars are supported")));
    }
    Ok(true)
}

/// Matches `name` against a pattern where `*` stands for any run of
/// characters (dots included) and everything else for itself.
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

impl<C: Algorithm> Optim<C> {
    /// An optimizer over parameter groups, each with its own configuration
    /// (torch's `param_groups`). Integer `Var`s are dropped (see the
    /// [crate docs](crate)).
    ///
    /// # Errors
    /// Invalid hyperparameters; a `Var` that is not f32, bf16 or f16, not on
    /// the CPU or not contiguous; the same `Var` twice.
    pub fn with_groups(groups: Vec<(Vec<Var>, C)>) -> candle_core::Result<Self> {
        Self::build(groups.into_iter().map(|(vars, c)| (vars.into_iter().map(|v| (None, v)).collect(), c)).collect())
    }

    /// An optimizer over every `Var` of `varmap`, in name order: a `Var`
    /// whose name matches one of `rules`' patterns (`*` stands for any
    /// characters: `"*.bias"`, `"*norm*"`) goes into that rule's group, the
    /// first rule that matches; the others into a group with `config`. Empty
    /// groups are left out. The names are recorded in checkpoints.
    ///
    /// ```
    /// use adaoptim_candle::{AdamW, AdamWConfig};
    /// # fn main() -> candle_core::Result<()> {
    /// let varmap = candle_nn::VarMap::new();
    /// let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let _layer = candle_nn::linear(4, 2, vb.pp("fc"))?;
    /// let decay = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    /// let no_decay = AdamWConfig { weight_decay: 0.0, ..Default::default() };
    /// let opt = AdamW::from_varmap(&varmap, decay, &[("*.bias", no_decay)])?;
    /// assert_eq!(opt.names().unwrap(), ["fc.weight", "fc.bias"]);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`with_groups`](Self::with_groups).
    pub fn from_varmap(varmap: &candle_nn::VarMap, config: C, rules: &[(&str, C)]) -> candle_core::Result<Self> {
        Self::build(varmap_groups(varmap, config, rules)?)
    }

    fn build(groups: Vec<Group<C>>) -> candle_core::Result<Self> {
        let mut opt = MultiOptimizer::new();
        let mut vars = Vec::new();
        let mut names = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (members, config) in groups {
            let mut sizes = Vec::new();
            for (name, var) in members {
                let what = var_label(&name, vars.len());
                if !check_var(&var, &what)? {
                    continue;
                }
                if !seen.insert(var.id()) {
                    return Err(msg(format!("{what} is given twice")));
                }
                sizes.push(var.elem_count());
                vars.push(var);
                names.push(name);
            }
            // A group is added even when empty, so that the configuration
            // is validated.
            opt.add_group(config, &sizes).map_err(wrap)?;
        }
        let names = names.into_iter().collect::<Option<Vec<_>>>();
        Ok(Optim { vars, names, opt, bad_lr: None, schedule: None, steps: 0 })
    }

    /// The optimized `Var`s, in tensor order (the checkpoint's numbering).
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The `Var`s' names, for an optimizer built by
    /// [`from_varmap`](Self::from_varmap).
    pub fn names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    /// The state underneath: per-tensor state buffers by torch name, step
    /// counts, groups (read only; the controls are forwarded below).
    pub fn inner(&self) -> &MultiOptimizer<C> {
        &self.opt
    }

    /// Replaces a group's configuration (another weight decay, say).
    ///
    /// # Errors
    /// Invalid hyperparameters, another state layout or no such group;
    /// nothing changes then.
    pub fn set_group_config(&mut self, group: usize, config: C) -> candle_core::Result<()> {
        self.opt.set_group_config(group, config).map_err(wrap)
    }

    /// Attaches a schedule: before each step every group's learning rate
    /// (and, for schedules that cycle it, the momentum or `beta1`) is set
    /// to the schedule's value for that step (`lr_at(steps())`); `None`
    /// detaches it.
    pub fn set_schedule(&mut self, schedule: Option<Box<dyn LrSchedule + Send + Sync>>) {
        self.schedule = schedule;
    }

    /// Steps that updated so far (the count an attached schedule reads).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Clips the gradients to a global L2 norm of `max_norm` over every
    /// `Var`'s gradient inside each step, as
    /// `torch.nn.utils.clip_grad_norm_` over all parameters would; `None`
    /// turns it off. The `GradStore` is not written.
    ///
    /// # Errors
    /// Unless `max_norm` is finite and `> 0`.
    pub fn set_max_grad_norm(&mut self, max_norm: Option<f64>) -> candle_core::Result<()> {
        self.opt.set_max_grad_norm(max_norm).map_err(wrap)
    }

    /// The global gradient norm the last step measured (clipping on).
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.opt.last_grad_norm()
    }

    /// Divides every gradient by `grad_scale` inside the step (loss scaling).
    ///
    /// # Errors
    /// Unless the scale is finite and nonzero.
    pub fn set_grad_scale(&mut self, grad_scale: Option<f32>) -> candle_core::Result<()> {
        self.opt.set_grad_scale(grad_scale).map_err(wrap)
    }

    /// What a step does with NaN/inf gradients.
    pub fn set_non_finite(&mut self, policy: NonFinitePolicy) {
        self.opt.set_non_finite(policy);
    }

    /// The execution policy (backend, threads).
    pub fn set_exec(&mut self, exec: Exec) {
        self.opt.set_exec(exec);
    }

    /// Keeps every group's optimizer state in `dtype`:
    /// [`Dtype::F32`](adaoptim::storage::Dtype) (the default),
    /// [`Dtype::Bf16`](adaoptim::storage::Dtype) or
    /// [`Dtype::Q8`](adaoptim::storage::Dtype) (bitsandbytes' block-wise
    /// 8-bit scheme, checkpointed under its names `state1`, `absmax1`,
    /// `qmap1`, ...). The current state moves over, rounded or quantized
    /// (see [`MultiOptimizer::set_state_dtype_all`]); call it before the
    /// first step for a run in that storage from the start. A checkpoint
    /// loaded later brings its own storage.
    ///
    /// # Errors
    /// Another dtype (`F16`), or state that cannot be allocated; nothing
    /// changes then.
    pub fn set_state_dtype(&mut self, dtype: adaoptim::storage::Dtype) -> candle_core::Result<()> {
        self.opt.set_state_dtype_all(dtype).map_err(wrap)
    }

    /// Stochastic rounding of `bf16` `Var`s (`None`, the default: round to
    /// nearest, ties to even): each `bf16` `Var` rounds with its own
    /// counter-based stream (the `i`-th `Var`'s is adaoptim's of seed
    /// `adaoptim::storage::stochastic_key(seed, i)`, at its step count), the
    /// same bits for any thread count, and resumed from a checkpoint at the
    /// step it holds (the seed is a control, like the execution policy: a
    /// checkpoint does not hold it, and loading one keeps this optimizer's).
    /// `f32` `Var`s are not rounded; with an `f16`
    /// `Var` that has a gradient, a step is an error that changes nothing.
    pub fn set_stochastic_rounding(&mut self, seed: Option<u64>) {
        self.opt.set_stochastic_rounding(seed);
    }

    /// The group configurations with the attached schedule's values for the
    /// next step, validated (nothing is changed here).
    fn scheduled(&self) -> candle_core::Result<Option<Vec<C>>> {
        let Some(s) = &self.schedule else { return Ok(None) };
        let mut out = Vec::with_capacity(self.opt.num_groups());
        for g in 0..self.opt.num_groups() {
            let mut c = self.opt.group_config(g).cloned().ok_or_else(|| msg("a group vanished".into()))?;
            c.set_lr_unchecked(s.lr_at(self.steps));
            if let Some(m) = s.momentum_at(self.steps)
                && !c.set_cycled_momentum_unchecked(m)
            {
                return Err(msg("the schedule cycles momentum; this optimizer has none".into()));
            }
            c.validate().map_err(wrap)?;
            out.push(c);
        }
        Ok(Some(out))
    }

    /// One step with an explicit gradient per `Var` (`None`: skipped), in
    /// [`vars`](Self::vars) order; what [`step`](candle_nn::Optimizer::step)
    /// does after looking the gradients up.
    ///
    /// # Errors
    /// Another number of gradients; a gradient of another shape, dtype or
    /// device; a `Var` or gradient sharing storage with another `Var`; an
    /// invalid learning rate set earlier; adaoptim's step errors. Nothing
    /// changes on error.
    pub fn step_with(&mut self, grads: &[Option<&Tensor>]) -> candle_core::Result<()> {
        pending_lr_error(self.bad_lr)?;
        let owned = checked_grads(&self.vars, grads)?;
        let scheduled = self.scheduled()?;
        let old: Vec<C> = (0..self.opt.num_groups()).filter_map(|g| self.opt.group_config(g).cloned()).collect();
        if let Some(configs) = scheduled {
            for (g, c) in configs.into_iter().enumerate() {
                self.opt.set_group_config(g, c).map_err(wrap)?;
            }
        }
        let opt = &mut self.opt;
        let outcome = locked_step(&self.vars, &owned, |steps| opt.step_mixed(steps).map(|_| ()));
        match outcome {
            Ok(()) => {
                self.steps += 1;
                Ok(())
            }
            Err(e) => {
                for (g, c) in old.into_iter().enumerate() {
                    // Restores what was there before; it was valid then.
                    let _ = self.opt.set_group_config(g, c);
                }
                Err(e)
            }
        }
    }

    /// The optimizer's state as safetensors bytes: adaoptim's
    /// [`MultiOptimizer`] checkpoint (torch's `state_dict` names, per `Var`
    /// index), with the `Var`s' shapes and, from a `VarMap`, their names in
    /// the metadata. The `Var`s themselves are the caller's to save
    /// (`varmap.save`).
    ///
    /// # Errors
    /// If serialization fails.
    pub fn to_safetensors(&self) -> candle_core::Result<Vec<u8>> {
        let shapes: Vec<Vec<usize>> = self.vars.iter().map(|v| v.dims().to_vec()).collect();
        let mut extra = vec![("candle.shapes", serde_json::Value::from(shapes).to_string())];
        extra.extend(candle_metadata(self.steps, self.names.as_deref()));
        self.opt.to_safetensors_with(&extra).map_err(wrap)
    }

    /// Saves atomically (a previous file survives a failed save); see
    /// [`adaoptim::checkpoint::write_atomic`].
    ///
    /// # Errors
    /// I/O and serialization errors.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> candle_core::Result<()> {
        adaoptim::checkpoint::write_atomic(path.as_ref(), &self.to_safetensors()?).map_err(wrap)
    }

    /// Loads a checkpoint of an optimizer over the same `Var`s (same
    /// count, shapes, groups and, where both have them, names): state,
    /// step counts, group configurations and the state's storage; the
    /// controls set on this optimizer (clipping, loss scale, execution,
    /// stochastic rounding) stay.
    ///
    /// # Errors
    /// A damaged file or one of another optimizer or other `Var`s; nothing
    /// changes then.
    pub fn load_safetensors(&mut self, bytes: &[u8]) -> candle_core::Result<()> {
        let mut loaded = MultiOptimizer::<C>::from_safetensors(bytes).map_err(wrap)?;
        let meta = adaoptim::checkpoint::format::metadata(bytes).map_err(wrap)?;
        let get = |k: &str| meta.get(k).ok_or_else(|| msg(format!("checkpoint: no `{k}` (not written by this crate)")));
        let shapes: Vec<Vec<usize>> =
            serde_json::from_str(get("candle.shapes")?).map_err(|e| msg(format!("checkpoint: shapes: {e}")))?;
        let mine: Vec<Vec<usize>> = self.vars.iter().map(|v| v.dims().to_vec()).collect();
        if shapes != mine {
            return Err(msg(format!("checkpoint: its Vars have shapes {shapes:?}, these have {mine:?}")));
        }
        check_names(self.names.as_deref(), &meta)?;
        let steps = checkpoint_steps(&meta)?;
        if loaded.num_groups() != self.opt.num_groups()
            || (0..self.vars.len()).any(|i| loaded.group_of(i).ok() != self.opt.group_of(i).ok())
        {
            return Err(msg("checkpoint: its parameter groups differ from these".into()));
        }
        loaded.set_exec(self.opt.exec());
        loaded.set_non_finite(self.opt.non_finite());
        loaded.set_grad_scale(self.opt.grad_scale()).map_err(wrap)?;
        loaded.set_max_grad_norm(self.opt.max_grad_norm()).map_err(wrap)?;
        loaded.set_stochastic_rounding(self.opt.stochastic_rounding());
        self.opt = loaded;
        self.steps = steps;
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

/// Where both this optimizer and a checkpoint's metadata name their `Var`s
/// (`candle.names`), that the names agree.
fn check_names(names: Option<&[String]>, meta: &std::collections::HashMap<String, String>) -> candle_core::Result<()> {
    if let (Some(names), Some(theirs)) = (names, meta.get("candle.names")) {
        let theirs: Vec<String> = serde_json::from_str(theirs).map_err(|e| msg(format!("checkpoint: names: {e}")))?;
        if theirs != names {
            return Err(msg(format!("checkpoint: its Vars are named {theirs:?}, these {names:?}")));
        }
    }
    Ok(())
}

/// A checkpoint's step count (`candle.steps`, what an attached schedule reads).
fn checkpoint_steps(meta: &std::collections::HashMap<String, String>) -> candle_core::Result<u64> {
    let steps = meta
        .get("candle.steps")
        .ok_or_else(|| msg("checkpoint: no `candle.steps` (not written by this crate)".into()))?;
    steps.parse().map_err(|e| msg(format!("checkpoint: steps: {e}")))
}

/// The metadata a checkpoint of this crate carries beside the core's: the
/// step count and, from a `VarMap`, the `Var`s' names.
fn candle_metadata(steps: u64, names: Option<&[String]>) -> Vec<(&'static str, String)> {
    let mut extra = vec![("candle.steps", steps.to_string())];
    if let Some(n) = names {
        extra.push(("candle.names", serde_json::Value::from(n.to_vec()).to_string()));
    }
    extra
}

/// A checkpoint file's bytes, an I/O error naming the path.
fn read_file(path: &std::path::Path) -> candle_core::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| msg(format!("reading {}: {e}", path.display())))
}

/// The gradients of a step, checked against `vars`: one per `Var`, `f32`,
/// `bf16` or `f16` on the CPU with the `Var`'s shape (a strided one copied
/// into a contiguous one), and no storage shared between a `Var` and
/// anything else (which would deadlock on the `Var`'s lock, or alias the
/// update).
fn checked_grads(vars: &[Var], grads: &[Option<&Tensor>]) -> candle_core::Result<Vec<Option<Tensor>>> {
    if grads.len() != vars.len() {
        return Err(msg(format!("{} gradients for {} Vars", grads.len(), vars.len())));
    }
    let mut owned: Vec<Option<Tensor>> = Vec::with_capacity(grads.len());
    for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
        owned.push(match g {
            None => None,
            Some(g) => {
                let dtype_ok = matches!(g.dtype(), DType::F32 | DType::BF16 | DType::F16);
                if !dtype_ok || !g.device().is_cpu() || g.shape() != var.shape() {
                    return Err(msg(format!(
                        "the gradient of Var {i} is {:?} {:?} on {:?}; expected f32, bf16 or f16 {:?} on the CPU",
                        g.dtype(),
                        g.shape(),
                        g.device().location(),
                        var.shape()
                    )));
                }
                Some(if g.is_contiguous() { (*g).clone() } else { g.contiguous()? })
            }
        });
    }
    let mut ranges: Vec<(usize, usize, bool)> = Vec::new();
    for (var, g) in vars.iter().zip(&owned) {
        ranges.push(extent(var.as_tensor(), true)?);
        if let Some(g) = g {
            ranges.push(extent(g, false)?);
        }
    }
    ranges.retain(|r| r.1 > r.0);
    ranges.sort_unstable();
    // In start order: a range overlaps an earlier one iff it starts
    // before the furthest end so far (of any range, for a Var; of a
    // Var's, for a gradient, as gradients may share storage).
    let (mut end_any, mut end_var) = (0usize, 0usize);
    for &(start, end, is_var) in &ranges {
        if start < end_var || (is_var && start < end_any) {
            return Err(msg("a Var shares its storage with another Var or a gradient".into()));
        }
        end_any = end_any.max(end);
        if is_var {
            end_var = end_var.max(end);
        }
    }
    Ok(owned)
}

/// Runs `f` on every `Var` and its gradient (from [`checked_grads`]) as the
/// core's borrowed steps, while every `Var`'s write lock and every
/// gradient's read lock is held.
fn locked_step(
    vars: &[Var],
    grads: &[Option<Tensor>],
    f: impl FnOnce(&mut [MixedTensorStep<'_>]) -> Result<(), adaoptim::Error>,
) -> candle_core::Result<()> {
    let items: Vec<(&Var, Option<&Tensor>)> = vars.iter().zip(grads.iter().map(Option::as_ref)).collect();
    let mut slices: Vec<Raw> = Vec::with_capacity(items.len());
    let mut f = Some(f);
    let mut result = None;
    let locked = lock_all(&items, &mut slices, &mut |slices| {
        // SAFETY: every pointer comes from a `CpuStorage` of the element
        // type it is tagged with, which `lock_all`'s callers still hold: the
        // Var's under its write lock, the gradient's under its read lock, on
        // the stack frames this closure runs inside of, `len` elements each.
        // `checked_grads` found no range overlapping a Var's, so the `&mut`
        // slices alias nothing.
        let mut steps: Vec<MixedTensorStep<'_>> = slices.iter().map(|r| unsafe { r.borrow() }).collect();
        if let Some(f) = f.take() {
            result = Some(f(&mut steps));
        }
    });
    locked.and_then(|()| match result {
        Some(r) => r.map_err(wrap),
        None => Err(msg("the step did not run".into())),
    })
}

/// The element range `(start, end, is_var)` of a tensor's storage, as
/// addresses, for the overlap check.
fn extent(t: &Tensor, is_var: bool) -> candle_core::Result<(usize, usize, bool)> {
    let (storage, layout) = t.storage_and_layout();
    let (a, b) = layout.contiguous_offsets().ok_or_else(|| msg("a tensor is not contiguous".into()))?;
    let (base, size) = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => (v.as_ptr() as usize, 4),
        Storage::Cpu(CpuStorage::BF16(v)) => (v.as_ptr() as usize, 2),
        Storage::Cpu(CpuStorage::F16(v)) => (v.as_ptr() as usize, 2),
        _ => return Err(msg("a tensor is not f32, bf16 or f16 on the CPU".into())),
    };
    Ok((base + a * size, base + b * size, is_var))
}

/// A group under construction: its `Var`s (with names from a `VarMap`) and
/// its configuration.
type Group<C> = (Vec<(Option<String>, Var)>, C);

/// Every `Var` of `varmap` in name order, grouped by the first of `rules`'
/// patterns its name matches (the others with `config`); empty groups left
/// out.
fn varmap_groups<C: Clone>(
    varmap: &candle_nn::VarMap,
    config: C,
    rules: &[(&str, C)],
) -> candle_core::Result<Vec<Group<C>>> {
    let mut named: Vec<(String, Var)> = {
        let data = varmap.data().lock().map_err(|_| msg("the VarMap's lock is poisoned".into()))?;
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut groups: Vec<Group<C>> =
        std::iter::once(config).chain(rules.iter().map(|(_, c)| c.clone())).map(|c| (Vec::new(), c)).collect();
    for (name, var) in named {
        let g = rules.iter().position(|(p, _)| matches(p, &name)).map_or(0, |i| i + 1);
        groups[g].0.push((Some(name), var));
    }
    groups.retain(|(vars, _)| !vars.is_empty());
    Ok(groups)
}

/// The label of a `Var` in errors: its name, else its index.
fn var_label(name: &Option<String>, index: usize) -> String {
    match name {
        Some(n) => format!("Var `{n}`"),
        None => format!("Var {index}"),
    }
}

/// What runs inside every lock.
type Innermost<'a> = &'a mut dyn FnMut(&[Raw]);

/// A locked tensor's parameters and gradient, as raw parts.
struct Raw {
    p: RawParams,
    len: usize,
    g: Option<RawGrads>,
}

/// A locked `Var`'s data pointer, by element type.
enum RawParams {
    F32(*mut f32),
    Bf16(*mut bf16),
    F16(*mut f16),
}

/// A locked gradient's data pointer, by element type.
enum RawGrads {
    F32(*const f32),
    Bf16(*const bf16),
    F16(*const f16),
}

impl Raw {
    /// The tensor as the core's borrowed step.
    ///
    /// # Safety
    /// The pointers are valid for `len` elements for `'a`, the parameters
    /// writable and aliased by nothing else.
    unsafe fn borrow<'a>(&self) -> MixedTensorStep<'a> {
        // SAFETY: as this function's contract.
        unsafe {
            let params = match self.p {
                RawParams::F32(p) => Params::F32(std::slice::from_raw_parts_mut(p, self.len)),
                RawParams::Bf16(p) => Params::Bf16(std::slice::from_raw_parts_mut(p, self.len)),
                RawParams::F16(p) => Params::F16(std::slice::from_raw_parts_mut(p, self.len)),
            };
            let grads = self.g.as_ref().map(|g| match *g {
                RawGrads::F32(g) => Grads::F32(std::slice::from_raw_parts(g, self.len)),
                RawGrads::Bf16(g) => Grads::Bf16(std::slice::from_raw_parts(g, self.len)),
                RawGrads::F16(g) => Grads::F16(std::slice::from_raw_parts(g, self.len)),
            });
            MixedTensorStep::new(params, grads)
        }
    }
}

/// Candle's in-place op that records one locked `Var` (and its gradient)
/// and runs the next level inside the lock.
struct Nest<'a, 'b> {
    items: &'a [(&'b Var, Option<&'b Tensor>)],
    slices: RefCell<&'a mut Vec<Raw>>,
    f: RefCell<Innermost<'a>>,
}

/// A locked `Var`'s elements: pointer and length.
fn params_raw(s: &mut CpuStorage, l: &Layout) -> candle_core::Result<(RawParams, usize)> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok((RawParams::F32(v[a..b].as_mut_ptr()), b - a)),
        (CpuStorage::BF16(v), Some((a, b))) => Ok((RawParams::Bf16(v[a..b].as_mut_ptr()), b - a)),
        (CpuStorage::F16(v), Some((a, b))) => Ok((RawParams::F16(v[a..b].as_mut_ptr()), b - a)),
        _ => Err(msg("a Var is not contiguous f32, bf16 or f16".into())),
    }
}

/// A gradient's elements: pointer and length.
fn grads_raw(s: &CpuStorage, l: &Layout) -> candle_core::Result<(RawGrads, usize)> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok((RawGrads::F32(v[a..b].as_ptr()), b - a)),
        (CpuStorage::BF16(v), Some((a, b))) => Ok((RawGrads::Bf16(v[a..b].as_ptr()), b - a)),
        (CpuStorage::F16(v), Some((a, b))) => Ok((RawGrads::F16(v[a..b].as_ptr()), b - a)),
        _ => Err(msg("a gradient is not contiguous f32, bf16 or f16".into())),
    }
}

impl Nest<'_, '_> {
    fn record(&self, (p, len): (RawParams, usize), g: Option<(RawGrads, usize)>) -> candle_core::Result<()> {
        if let Some((_, glen)) = &g
            && *glen != len
        {
            return Err(msg(format!("a gradient of {glen} elements for a Var of {len}")));
        }
        self.slices.borrow_mut().push(Raw { p, len, g: g.map(|g| g.0) });
        let rest = &self.items[1..];
        let mut slices = self.slices.borrow_mut();
        let mut f = self.f.borrow_mut();
        lock_all(rest, &mut slices, &mut **f)
    }
}

impl candle_core::InplaceOp1 for Nest<'_, '_> {
    fn name(&self) -> &'static str {
        "adaoptim-step"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        self.record(params_raw(s, l)?, None)
    }
}

impl candle_core::InplaceOp2 for Nest<'_, '_> {
    fn name(&self) -> &'static str {
        "adaoptim-step"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        self.record(params_raw(s1, l1)?, Some(grads_raw(s2, l2)?))
    }
}

/// Locks every `Var` of `items` in turn (write lock; its gradient's read
/// lock), nesting each inside the previous one, and calls `f` with all of
/// them at the innermost level, while every lock is held.
fn lock_all(
    items: &[(&Var, Option<&Tensor>)],
    slices: &mut Vec<Raw>,
    f: &mut dyn FnMut(&[Raw]),
) -> candle_core::Result<()> {
    let Some(&(var, g)) = items.first() else {
        f(slices);
        return Ok(());
    };
    let nest = Nest { items, slices: RefCell::new(slices), f: RefCell::new(f) };
    match g {
        Some(g) => var.as_tensor().inplace_op2(g, &nest),
        None => var.as_tensor().inplace_op1(&nest),
    }
}

impl<C: Algorithm> candle_nn::Optimizer for Optim<C> {
    type Config = C;

    /// One group over `vars`; see [`Optim::with_groups`].
    fn new(vars: Vec<Var>, config: C) -> candle_core::Result<Self> {
        Self::with_groups(vec![(vars, config)])
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let gs: Vec<Option<&Tensor>> = self.vars.iter().map(|v| grads.get(v.as_tensor())).collect();
        self.step_with(&gs)
    }

    /// The first group's learning rate.
    fn learning_rate(&self) -> f64 {
        self.opt.group_config(0).map_or(0.0, |c| c.lr())
    }

    /// Sets every group's learning rate; an invalid value is not applied and
    /// makes the next steps fail (see the [crate docs](crate)).
    fn set_learning_rate(&mut self, lr: f64) {
        match self.opt.set_lr(lr) {
            Ok(()) => self.bad_lr = None,
            Err(_) => self.bad_lr = Some(lr),
        }
    }
}
