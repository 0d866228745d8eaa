//! Borrowed multi-tensor steps: the optimizer keeps each tensor's state, the
//! caller keeps the tensors.
//!
//! Frameworks own their weights (a torch `Parameter`, a candle `Var`, a
//! burn tensor), so an optimizer that owns the parameters, as
//! [`GroupedOptimizer`](crate::groups::GroupedOptimizer) does, costs copies
//! in and out on every step. A [`MultiOptimizer`] holds only the state:
//! parameter groups with their own hyperparameters, and per tensor its state
//! buffers, its own step count and scalar state, as torch's `state[p]`
//! does. [`step`](MultiOptimizer::step) takes every tensor as a borrowed
//! `(&mut params, Option<&grads>)` pair and updates all of them in **one**
//! parallel region, split by element count (every element moves the same
//! bytes), so a model of hundreds of small tensors is not hundreds of
//! thread hand-offs.
//!
//! A tensor whose gradient is `None` is skipped as torch skips a parameter
//! whose `.grad` is `None`: its parameters, state and step count do not
//! move. Each tensor's update is the bits a lone [`Optimizer`](crate::Optimizer)
//! over it gives (tested on every path).
//!
//! ```
//! use adaoptim::multi::{MultiOptimizer, TensorStep};
//! use adaoptim::AdamWConfig;
//!
//! let mut opt = MultiOptimizer::new();
//! opt.add_group(AdamWConfig { weight_decay: 0.1, ..Default::default() }, &[6])?;
//! opt.add_group(AdamWConfig { weight_decay: 0.0, ..Default::default() }, &[2])?;
//! let (mut w, mut b) = (vec![0.5f32; 6], vec![0.0f32; 2]);
//! let gw = vec![0.1f32; 6];
//! // The bias has no gradient this step: it and its state stay as they are.
//! opt.step(&mut [TensorStep::new(&mut w, Some(&gw)), TensorStep::new(&mut b, None)])?;
//! assert_eq!((opt.step_count(0)?, opt.step_count(1)?), (1, 0));
//! assert!(w[0] < 0.5);
//! # Ok::<(), adaoptim::Error>(())
//! ```
//!
//! A step allocates one list of work pieces (a few words per tensor, more
//! for tensors split across threads); the state is allocated once, by
//! [`add_group`](MultiOptimizer::add_group).
//!
//! [`step_mixed`](MultiOptimizer::step_mixed) takes parameters and
//! gradients in other storage types ([`MixedTensorStep`]: `bf16` or `f16`
//! parameters, `bf16` or `f16` gradients) beside `f32` ones, in the same
//! parallel region. Each group keeps its state in one storage: `f32`
//! ([`add_group`](MultiOptimizer::add_group)), or `bf16` or 8-bit block-wise
//! ([`add_group_with_state`](MultiOptimizer::add_group_with_state)), each
//! tensor's update the bits [`MixedOptimizer`](crate::mixed::MixedOptimizer)
//! over it gives:
//!
//! ```
//! use adaoptim::multi::{MixedTensorStep, MultiOptimizer};
//! use adaoptim::storage::{bf16, Dtype, Grads, Params};
//! use adaoptim::AdamWConfig;
//!
//! let mut opt = MultiOptimizer::new();
//! opt.add_group_with_state(AdamWConfig::default(), &[1000, 10], Dtype::Q8)?; // 8-bit states
//! let (mut w, mut b) = (vec![bf16::from_f32(0.5); 1000], vec![0.0f32; 10]);
//! let (gw, gb) = (vec![bf16::from_f32(0.01); 1000], vec![0.01f32; 10]);
//! opt.step_mixed(&mut [
//!     MixedTensorStep::new(Params::Bf16(&mut w), Some(Grads::Bf16(&gw))),
//!     MixedTensorStep::new(Params::F32(&mut b), Some(Grads::F32(&gb))),
//! ])?;
//! assert!(opt.q8_parts(0)?.is_some()); // bitsandbytes' state1, absmax1, qmap1, ...
//! # Ok::<(), adaoptim::Error>(())
//! ```
//!
//! Guards apply to the step as a whole: the non-finite policy looks at every
//! present gradient (an index it reports counts through the present
//! gradients in order), and clipping uses the global norm over all of them,
//! as `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)` does.

use crate::driver::{Bufs, Plan, StepReport, split_join};
use crate::error::next_step;
use crate::mixed::{Owned, Q8Parts, check_state_dtype};
use crate::optim::sealed::Sealed;
use crate::optim::{Guards, MAX_STATE, NonFinitePolicy, non_finite_guard_grads};
use crate::storage::{Dtype, Grads, Params, StateBuf, TILE, stochastic_key};
use crate::{Algorithm, Error, Exec, Parallel};

/// One tensor handed to [`MultiOptimizer::step`]: its parameters, updated in
/// place, and its gradient (`None`: no gradient this step, skipped).
#[derive(Debug)]
pub struct TensorStep<'a> {
    /// The parameters, updated in place.
    pub params: &'a mut [f32],
    /// The gradient, of the same length; `None` skips the tensor.
    pub grads: Option<&'a [f32]>,
}

impl<'a> TensorStep<'a> {
    /// A tensor and its gradient.
    pub fn new(params: &'a mut [f32], grads: Option<&'a [f32]>) -> Self {
        TensorStep { params, grads }
    }
}

/// One tensor handed to [`MultiOptimizer::step_mixed`]: parameters and
/// gradient in any storage a [`step_mixed`](crate::step_mixed) takes
/// (`f32`, `bf16` or `f16` parameters; `f32`, `bf16` or `f16` gradients), the
/// state in its group's storage.
#[derive(Debug)]
pub struct MixedTensorStep<'a> {
    /// The parameters, updated in place (`bf16` ones rounded to nearest).
    pub params: Params<'a>,
    /// The gradient, of the same length; `None` skips the tensor.
    pub grads: Option<Grads<'a>>,
}

impl<'a> MixedTensorStep<'a> {
    /// A tensor and its gradient.
    pub fn new(params: Params<'a>, grads: Option<Grads<'a>>) -> Self {
        MixedTensorStep { params, grads }
    }
}

impl<'a> From<TensorStep<'a>> for MixedTensorStep<'a> {
    fn from(t: TensorStep<'a>) -> Self {
        MixedTensorStep { params: Params::F32(t.params), grads: t.grads.map(Grads::F32) }
    }
}

/// What the optimizer keeps for one tensor.
#[derive(Clone, Debug)]
pub(crate) struct Slot<A: Algorithm> {
    pub(crate) group: usize,
    pub(crate) len: usize,
    pub(crate) t: u64,
    pub(crate) aux: <A as Sealed>::Aux,
    pub(crate) state: Vec<Owned>,
}

/// State for many caller-owned tensors in groups; see the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct MultiOptimizer<A: Algorithm> {
    pub(crate) groups: Vec<A>,
    /// Each group's state storage.
    pub(crate) dtypes: Vec<Dtype>,
    pub(crate) tensors: Vec<Slot<A>>,
    exec: Exec,
    guards: Guards,
    /// The stochastic-rounding seed of bf16 parameters in `step_mixed`.
    sr_seed: Option<u64>,
}

impl<A: Algorithm> Default for MultiOptimizer<A> {
    fn default() -> Self {
        MultiOptimizer {
            groups: Vec::new(),
            dtypes: Vec::new(),
            tensors: Vec::new(),
            exec: Exec::auto(),
            guards: Guards::default(),
            sr_seed: None,
        }
    }
}

/// One piece of a tensor's work: a sub-range of its parameters, gradient
/// and state.
struct Piece<'a, A: Algorithm> {
    /// The tensor's step number for this step, its scalar state before it
    /// (each piece works on a copy), its group and buffer count.
    t: u64,
    aux: <A as Sealed>::Aux,
    group: usize,
    k: usize,
    p: Params<'a>,
    g: Grads<'a>,
    s: [StateBuf<'a>; MAX_STATE],
    /// The stochastic-rounding key of this step and the piece's first
    /// element in its tensor (a multiple of [`TILE`]).
    sr: Option<(u64, u64)>,
}

impl<A: Algorithm> MultiOptimizer<A> {
    /// An optimizer with no tensors yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a group of tensors of the given element counts, with state
    /// initialised and step counts at 0; returns their indices (the order
    /// tensors were added, across groups: the order [`step`](Self::step)
    /// takes them in, and torch's `state_dict` numbering).
    ///
    /// # Errors
    /// Invalid hyperparameters; [`Error::TooLarge`] for a tensor whose state
    /// cannot be allocated. Nothing changes then.
    pub fn add_group(&mut self, config: A, sizes: &[usize]) -> Result<Vec<usize>, Error> {
        self.add_group_with_state(config, sizes, Dtype::F32)
    }

    /// [`add_group`](Self::add_group) with the group's state kept in
    /// `state_dtype`: [`Dtype::F32`], [`Dtype::Bf16`] (rounded to nearest
    /// each step) or [`Dtype::Q8`] (bitsandbytes' block-wise 8-bit scheme,
    /// blocks of 256 elements of each tensor); the initial value
    /// (Adagrad's `initial_accumulator_value`) is rounded into it. Each
    /// tensor's update is then the bits of a
    /// [`MixedOptimizer`](crate::mixed::MixedOptimizer) over it with that
    /// state storage.
    ///
    /// # Errors
    /// As [`add_group`](Self::add_group); [`Error::Storage`] for another
    /// state dtype. Nothing changes then.
    pub fn add_group_with_state(
        &mut self,
        config: A,
        sizes: &[usize],
        state_dtype: Dtype,
    ) -> Result<Vec<usize>, Error> {
        config.validate()?;
        check_state_dtype(state_dtype)?;
        let names = config.state_names();
        let mut slots = Vec::with_capacity(sizes.len());
        for &len in sizes {
            let state = names
                .iter()
                .enumerate()
                .map(|(i, name)| Owned::new(state_dtype, len, config.state_init(i), name))
                .collect::<Result<Vec<_>, _>>()?;
            slots.push(Slot { group: self.groups.len(), len, t: 0, aux: config.aux_init(), state });
        }
        let first = self.tensors.len();
        self.tensors.extend(slots);
        self.groups.push(config);
        self.dtypes.push(state_dtype);
        Ok((first..self.tensors.len()).collect())
    }

    // The controls; clipping uses the global norm over every present gradient.
    crate::optim::controls!(exec; guards);

    /// Number of tensors.
    pub fn num_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// Number of groups.
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    fn slot(&self, tensor: usize) -> Result<&Slot<A>, Error> {
        self.tensors.get(tensor).ok_or(Error::LengthMismatch {
            what: "tensor index",
            expected: self.tensors.len(),
            actual: tensor,
        })
    }

    /// A tensor's element count.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] for an index past the last tensor.
    pub fn len_of(&self, tensor: usize) -> Result<usize, Error> {
        Ok(self.slot(tensor)?.len)
    }

    /// A tensor's own step count (steps in which it had a gradient).
    ///
    /// # Errors
    /// As [`len_of`](Self::len_of).
    pub fn step_count(&self, tensor: usize) -> Result<u64, Error> {
        Ok(self.slot(tensor)?.t)
    }

    /// A tensor's `f32` state buffer by torch name; `Ok(None)` if its group
    /// keeps no such buffer.
    ///
    /// # Errors
    /// As [`len_of`](Self::len_of); [`Error::Storage`] for a group whose
    /// state is not `f32` (see [`state_f32`](Self::state_f32)).
    pub fn state(&self, tensor: usize, name: &str) -> Result<Option<&[f32]>, Error> {
        let s = self.slot(tensor)?;
        let names = self.groups[s.group].state_names();
        match names.iter().position(|n| *n == name).map(|i| &s.state[i]) {
            None => Ok(None),
            Some(Owned::F32(x)) => Ok(Some(x.as_slice())),
            Some(other) => Err(Error::Storage {
                what: "state",
                dtype: other.dtype(),
                reason: "this group's state is not f32: read it with state_f32",
            }),
        }
    }

    /// A tensor's state buffer by torch name as `f32` values (a copy,
    /// widened from `bf16` or dequantized from 8-bit); `Ok(None)` if its
    /// group keeps no such buffer.
    ///
    /// # Errors
    /// As [`len_of`](Self::len_of).
    pub fn state_f32(&self, tensor: usize, name: &str) -> Result<Option<Vec<f32>>, Error> {
        let s = self.slot(tensor)?;
        let names = self.groups[s.group].state_names();
        Ok(names.iter().position(|n| *n == name).map(|i| s.state[i].to_f32()))
    }

    /// A tensor's 8-bit state in bitsandbytes' `state_dict` form
    /// (`state{i}`, `absmax{i}`, `qmap{i}` for its `i`-th state, 1-based),
    /// or `None` if its group's state is not 8-bit.
    ///
    /// # Errors
    /// As [`len_of`](Self::len_of).
    pub fn q8_parts(&self, tensor: usize) -> Result<Option<Vec<Q8Parts<'_>>>, Error> {
        let s = self.slot(tensor)?;
        Ok(if self.dtypes[s.group] == Dtype::Q8 { s.state.iter().map(Owned::q8_parts).collect() } else { None })
    }

    /// Moves a group's state into another storage ([`Dtype::F32`],
    /// [`Dtype::Bf16`] or [`Dtype::Q8`]): each buffer's values as they are
    /// now, widened, rounded to nearest `bf16` or quantized block-wise (a
    /// fresh group's state comes out as
    /// [`add_group_with_state`](Self::add_group_with_state) makes it). For a
    /// framework adapter that made its groups before it knew the storage,
    /// or a run that moves to 8-bit state midway.
    ///
    /// # Errors
    /// [`Error::IncompatibleConfig`] for no such group; [`Error::Storage`]
    /// for another dtype; [`Error::TooLarge`] where a buffer cannot be
    /// allocated. Nothing changes then.
    pub fn set_state_dtype(&mut self, group: usize, state_dtype: Dtype) -> Result<(), Error> {
        if group >= self.groups.len() {
            return Err(Error::IncompatibleConfig { reason: "no such group" });
        }
        self.move_state(|g| g == group, state_dtype)
    }

    /// [`set_state_dtype`](Self::set_state_dtype) for every group at once.
    ///
    /// # Errors
    /// As [`set_state_dtype`](Self::set_state_dtype); nothing changes then
    /// (no group moved).
    pub fn set_state_dtype_all(&mut self, state_dtype: Dtype) -> Result<(), Error> {
        self.move_state(|_| true, state_dtype)
    }

    /// Moves the state of the groups `which` picks into `state_dtype`.
    fn move_state(&mut self, which: impl Fn(usize) -> bool, state_dtype: Dtype) -> Result<(), Error> {
        check_state_dtype(state_dtype)?;
        let moving = |g: usize| which(g) && self.dtypes[g] != state_dtype;
        // Every new buffer first, so that a failed allocation changes nothing.
        let mut moved = Vec::new();
        for (i, slot) in self.tensors.iter().enumerate().filter(|(_, s)| moving(s.group)) {
            let names = self.groups[slot.group].state_names();
            let bufs = slot
                .state
                .iter()
                .zip(names)
                .map(|(b, name)| Owned::from_f32(state_dtype, &b.to_f32(), name))
                .collect::<Result<Vec<_>, _>>()?;
            moved.push((i, bufs));
        }
        for (i, bufs) in moved {
            self.tensors[i].state = bufs;
        }
        for (g, d) in self.dtypes.iter_mut().enumerate() {
            if which(g) {
                *d = state_dtype;
            }
        }
        Ok(())
    }

    /// A group's state storage ([`Dtype::F32`], [`Dtype::Bf16`] or [`Dtype::Q8`]).
    pub fn state_dtype(&self, group: usize) -> Option<Dtype> {
        self.dtypes.get(group).copied()
    }

    /// A tensor's group.
    ///
    /// # Errors
    /// As [`len_of`](Self::len_of).
    pub fn group_of(&self, tensor: usize) -> Result<usize, Error> {
        Ok(self.slot(tensor)?.group)
    }

    /// A group's configuration.
    pub fn group_config(&self, group: usize) -> Option<&A> {
        self.groups.get(group)
    }

    /// Replaces a group's configuration (a new learning rate from a
    /// schedule, say); its state buffers must stay the same.
    ///
    /// # Errors
    /// Invalid hyperparameters, another state layout, or no such group;
    /// nothing changes then.
    pub fn set_group_config(&mut self, group: usize, config: A) -> Result<(), Error> {
        config.validate()?;
        let g = self.groups.get_mut(group).ok_or(Error::IncompatibleConfig { reason: "no such group" })?;
        if config.state_names() != g.state_names() {
            return Err(Error::IncompatibleConfig { reason: "a group must keep its state buffers" });
        }
        *g = config;
        Ok(())
    }

    /// Sets every group's learning rate.
    ///
    /// # Errors
    /// Unless `lr` is finite and `>= 0`; nothing changes then.
    pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
        crate::error::non_negative("lr", lr)?;
        self.groups.iter_mut().for_each(|g| g.set_lr_unchecked(lr));
        Ok(())
    }

    /// Stochastic rounding of `bf16` parameters in
    /// [`step_mixed`](Self::step_mixed) (`None`, the default: round to
    /// nearest, ties to even). Tensor `i` rounds with the core's stream
    /// ([`ParamRounding::Stochastic`](crate::storage::ParamRounding)) of seed
    /// [`stochastic_key`]`(seed, i)` at its own step count, so each tensor
    /// has its own stream and the bits are the same for any thread count and
    /// chunk size; `f32` parameters are not rounded, and an `f16` tensor
    /// with a gradient is an [`Error::Storage`] at the step (nothing
    /// modified). A control, like the execution policy: checkpoints do not
    /// hold it (they hold the step counts the streams continue from).
    pub fn set_stochastic_rounding(&mut self, seed: Option<u64>) {
        self.sr_seed = seed;
    }

    /// The stochastic-rounding seed, if set.
    pub fn stochastic_rounding(&self) -> Option<u64> {
        self.sr_seed
    }

    /// One step over every tensor, in the order they were added. Tensors
    /// whose `grads` is `None` are skipped (nothing of theirs changes).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] for another number of tensors, or a tensor
    /// or gradient of another length; [`Error::StepLimit`] for a tensor at
    /// [`MAX_STEP`](crate::MAX_STEP); an unavailable forced backend; the
    /// non-finite policy's error. Nothing is modified on error.
    pub fn step(&mut self, tensors: &mut [TensorStep<'_>]) -> Result<StepReport, Error> {
        let mut mixed: Vec<MixedTensorStep<'_>> =
            tensors.iter_mut().map(|t| TensorStep::new(&mut *t.params, t.grads).into()).collect();
        self.step_mixed(&mut mixed)
    }

    /// [`step`](Self::step) over parameters and gradients in any storage
    /// ([`MixedTensorStep`]): `bf16` or `f16` parameters, `bf16` or `f16` gradients,
    /// beside `f32` ones, all in the same parallel region, the state in its
    /// group's storage. Each tensor's update is the bits of
    /// [`step_mixed`](crate::step_mixed) over it with state buffers in that
    /// storage (a lone `f32` tensor's with `f32` state: those of
    /// [`step`](Self::step)); the guards and
    /// the global clipping norm read every present gradient, widened
    /// exactly.
    ///
    /// # Errors
    /// As [`step`](Self::step). Nothing is modified on error.
    pub fn step_mixed(&mut self, tensors: &mut [MixedTensorStep<'_>]) -> Result<StepReport, Error> {
        if tensors.len() != self.tensors.len() {
            return Err(Error::LengthMismatch { what: "tensors", expected: self.tensors.len(), actual: tensors.len() });
        }
        let mut present = 0usize;
        for (ts, slot) in tensors.iter().zip(&self.tensors) {
            crate::error::check_len("params", slot.len, ts.params.len())?;
            if let Some(g) = ts.grads {
                crate::error::check_len("grads", slot.len, g.len())?;
                next_step(slot.t)?;
                present += slot.len;
                if self.sr_seed.is_some() && ts.params.dtype() == Dtype::F16 {
                    return Err(Error::Storage {
                        what: "params",
                        dtype: Dtype::F16,
                        reason: "stochastic rounding applies to bf16 (and leaves f32) parameters, not f16",
                    });
                }
            }
        }
        let mut plan = self.guards.plan(&self.exec)?;
        let (skipped, norm) = self.guard(&mut plan, tensors)?;
        if let Some(skipped) = skipped {
            self.guards.last_grad_norm = norm;
            return Ok(skipped);
        }
        let serial = Plan { exec: Exec { parallel: Parallel::Serial, ..plan.exec }, ..plan };
        let chunk = plan.exec.chunk_for(present);
        let mut pieces = Vec::new();
        for (i, (ts, slot)) in tensors.iter_mut().zip(self.tensors.iter_mut()).enumerate() {
            let Some(mut g) = ts.grads else { continue };
            let k = slot.state.len();
            let key = match (self.sr_seed, ts.params.dtype()) {
                (Some(seed), Dtype::Bf16) => Some(stochastic_key(stochastic_key(seed, i as u64), slot.t + 1)),
                _ => None,
            };
            let mut p: Params<'_> = ts.params.reborrow();
            let mut it = slot.state.iter_mut();
            let mut s: [StateBuf<'_>; MAX_STATE] =
                std::array::from_fn(|_| it.next().map_or(StateBuf::F32(&mut []), Owned::buf));
            let step = chunk.unwrap_or(usize::MAX).max(1);
            // a stochastically rounded tensor splits at multiples of TILE
            // (where its stream's index arithmetic starts), an 8-bit state
            // at multiples of its block Q8_BLOCK = TILE: same bits
            let step = if key.is_some() || self.dtypes[slot.group] == Dtype::Q8 {
                step.checked_next_multiple_of(TILE).unwrap_or(step)
            } else {
                step
            };
            let mut base = 0u64;
            loop {
                let mid = p.len().min(step);
                let (p0, p1) = std::mem::replace(&mut p, Params::F32(&mut [])).split_at(mid);
                let (g0, g1) = g.split_at(mid);
                let mut s0: [StateBuf<'_>; MAX_STATE] = std::array::from_fn(|_| StateBuf::F32(&mut []));
                for (a, b) in s0.iter_mut().zip(s.iter_mut()).take(k) {
                    let (x, y) = std::mem::replace(b, StateBuf::F32(&mut [])).split_at(mid);
                    *a = x;
                    *b = y;
                }
                let sr = key.map(|k| (k, base));
                pieces.push(Piece { t: slot.t + 1, aux: slot.aux, group: slot.group, k, p: p0, g: g0, s: s0, sr });
                base += mid as u64;
                (p, g) = (p1, g1);
                if p.is_empty() {
                    break;
                }
            }
        }
        let ctx = Ctx { groups: &self.groups, plan: serial };
        let parallel = match chunk {
            Some(chunk) => {
                ctx.split(&mut pieces, chunk);
                true
            }
            None => {
                pieces.iter_mut().for_each(|piece| ctx.run(piece));
                false
            }
        };
        drop(pieces);
        // Each stepped tensor's count and scalar state advance once.
        for (ts, slot) in tensors.iter().zip(self.tensors.iter_mut()) {
            if ts.grads.is_some() {
                slot.t += 1;
                let mut empty: [&mut [f32]; MAX_STATE] = Default::default();
                let k = slot.state.len();
                self.groups[slot.group].run(slot.t, &mut slot.aux, serial, Bufs::dense(&mut [], &[], &mut empty[..k]));
            }
        }
        if norm.is_some() {
            self.guards.last_grad_norm = norm;
        }
        Ok(StepReport { backend: plan.backend, parallel, skipped: false })
    }

    /// The guards over every present gradient: the non-finite policy, and
    /// with clipping on the global norm, whose factor goes into `plan`.
    fn guard(
        &self,
        plan: &mut Plan,
        tensors: &[MixedTensorStep<'_>],
    ) -> Result<(Option<StepReport>, Option<f64>), Error> {
        let policy = self.guards.non_finite;
        let present = || tensors.iter().filter_map(|t| t.grads);
        let find = |plan: &Plan| -> Result<Option<StepReport>, Error> {
            let mut offset = 0;
            for g in present() {
                if let Some(skip) = non_finite_guard_grads(policy, plan, g, offset)? {
                    return Ok(Some(skip));
                }
                offset += g.len();
            }
            Ok(None)
        };
        if self.guards.max_grad_norm.is_none() {
            return Ok((find(plan)?, None));
        }
        let total = present().map(|g| crate::clip::grads_sum(plan, g)).sum::<f64>().sqrt();
        if !total.is_finite()
            && policy != NonFinitePolicy::Propagate
            && let Some(skip) = find(plan)?
        {
            return Ok((Some(skip), Some(total)));
        }
        // A finite total (or Propagate): the factor, as a caller-given norm.
        self.guards.check(plan, &[], 0, Some(total))
    }
}

struct Ctx<'a, A: Algorithm> {
    groups: &'a [A],
    plan: Plan,
}

impl<A: Algorithm> Ctx<'_, A> {
    /// Runs one piece with its tensor's step number and scalar state (a
    /// copy: the state advances once per step, in `step`).
    fn run(&self, piece: &mut Piece<'_, A>) {
        let mut aux = piece.aux;
        let k = piece.k;
        let group = &self.groups[piece.group];
        let mut bufs = Bufs::new(piece.p.reborrow(), piece.g, &mut piece.s[..k], None);
        bufs.sr = piece.sr;
        group.run(piece.t, &mut aux, self.plan, bufs);
    }

    /// Runs the pieces on the crate's split-and-join recursion, down to
    /// about `chunk` elements or one piece (see [`split_pieces`]).
    fn split(&self, pieces: &mut [Piece<'_, A>], chunk: usize) {
        split_join(pieces, chunk, &pieces_len, &split_pieces, &|ps| ps.iter_mut().for_each(|p| self.run(p)));
    }
}

/// The elements of `ps`, as the split points are counted; a single piece
/// cannot be split here and reports 0, a leaf.
fn pieces_len<A: Algorithm>(ps: &&mut [Piece<'_, A>]) -> usize {
    if ps.len() < 2 { 0 } else { ps.iter().map(|p| p.p.len()).sum() }
}

/// Splits `ps` after the piece where the running element count reaches
/// `mid` (pieces are never cut here; each piece's own step may split it
/// further), leaving at least one piece on each side.
fn split_pieces<'a, 'p, A: Algorithm>(
    ps: &'a mut [Piece<'p, A>],
    mid: usize,
) -> (&'a mut [Piece<'p, A>], &'a mut [Piece<'p, A>]) {
    let mut acc = 0;
    let mut at = ps.len() - 1;
    for (i, p) in ps.iter().enumerate() {
        acc += p.p.len();
        if acc >= mid {
            at = (i + 1).min(ps.len() - 1);
            break;
        }
    }
    ps.split_at_mut(at)
}
