//! Parameter groups over many tensors, in one flat arena.
//!
//! A real model is hundreds of tensors of mixed sizes with per-group
//! hyperparameters (no weight decay on biases and norms, say). A
//! [`GroupedOptimizer`] keeps every tensor's parameters, gradients and state
//! in one 64-byte-aligned buffer each — the flat layout ZeRO-style training
//! uses — with a view per tensor. A step over all of them is **one** parallel
//! region: the arena is cut into equal chunks (balanced by bytes, since every
//! element moves the same bytes), and each chunk applies, to the pieces of
//! the tensors it covers, the kernel of their group. Stepping the groups
//! gives exactly the bits stepping each tensor alone would.
//!
//! Each tensor starts at a multiple of 16 elements (64 bytes); the padding
//! between tensors belongs to no tensor and is never touched.
//!
//! # Sharding (data parallel, ZeRO stage 1/2)
//! Every worker builds the same layout (same groups, same tensor sizes, in
//! the same order), so offsets agree everywhere. Worker `w` of `W` owns the
//! element range `shard_range(w, W)` (or any partition) and calls
//! [`step_range`](GroupedOptimizer::step_range) with it after the gradient
//! reduce-scatter: it updates only its range of parameters and state — the
//! same bits the unsharded step gives that range — and then all-gathers the
//! parameters. Every worker calls `step_range` once per step, so step counts
//! (and NAdam's `mu_product`) agree.
//!
//! ```
//! use adaoptim::groups::GroupedOptimizer;
//! use adaoptim::AdamWConfig;
//!
//! let mut opt = GroupedOptimizer::new();
//! let decay = opt.add_group(AdamWConfig { weight_decay: 0.1, ..Default::default() }, &[64 * 64, 256 * 64])?;
//! let no_decay = opt.add_group(AdamWConfig { weight_decay: 0.0, ..Default::default() }, &[64, 64])?;
//! opt.params_mut(decay[0])?.fill(0.02);
//! opt.grads_mut(no_decay[1])?.fill(0.5);
//! opt.step()?;
//! assert!(opt.params(no_decay[1])?[0] < 0.0);
//! # Ok::<(), adaoptim::Error>(())
//! ```

use std::ops::Range;

use aligned_vec::AVec;

use crate::driver::{Bufs, Plan, StepReport, split_join};
use crate::exec::Parallel;
use crate::optim::sealed::Sealed;
use crate::optim::{Guards, MAX_STATE, scheduled};
use crate::schedule::Schedule;
use crate::{Algorithm, Error, Exec};

use crate::memory::{self, Raw};

/// A tensor of a [`GroupedOptimizer`]. It names the optimizer that made it
/// (and its clones): handed to another optimizer it is
/// [`Error::ForeignTensor`], never another tensor's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorId {
    owner: u64,
    index: usize,
}

impl TensorId {
    /// The tensor's index: its place in the order tensors were added, across
    /// groups, as torch's `state_dict` numbers parameters.
    pub fn index(self) -> usize {
        self.index
    }
}

/// A fresh owner token per optimizer (clones share theirs: same layout).
fn next_owner() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[derive(Clone, Debug)]
pub(crate) struct Tensor {
    pub(crate) group: usize,
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct Group<A: Algorithm> {
    pub(crate) config: A,
    pub(crate) aux: <A as Sealed>::Aux,
    schedule: Option<Schedule>,
    /// Where each of the config's state buffers (in `state_names()` order)
    /// lives among the optimizer's buffers.
    pub(crate) slots: Vec<usize>,
}

/// Many tensors in groups with their own hyperparameters (and schedules),
/// stepped in one parallel region over a flat arena. See the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct GroupedOptimizer<A: Algorithm> {
    pub(crate) groups: Vec<Group<A>>,
    pub(crate) tensors: Vec<Tensor>,
    pub(crate) params: Raw,
    grads: Raw,
    /// One arena-wide buffer per state name any group keeps (a group that
    /// lacks a name leaves its range of that buffer unused, at 0).
    pub(crate) state: Vec<Raw>,
    state_names: Vec<&'static str>,
    pub(crate) t: u64,
    exec: Exec,
    guards: Guards,
    owner: u64,
}

impl<A: Algorithm> Default for GroupedOptimizer<A> {
    fn default() -> Self {
        GroupedOptimizer {
            groups: Vec::new(),
            tensors: Vec::new(),
            params: AVec::new(64),
            grads: AVec::new(64),
            state: Vec::new(),
            state_names: Vec::new(),
            t: 0,
            exec: Exec::auto(),
            guards: Guards::default(),
            owner: next_owner(),
        }
    }
}

/// Elements of the arena a worker owns: `[total * w / workers, total * (w + 1) / workers)`,
/// rounded to multiples of 16.
pub fn shard_range(total: usize, worker: usize, workers: usize) -> Range<usize> {
    let cut = |w: usize| ((total as u128 * w as u128 / workers.max(1) as u128) as usize).div_ceil(16) * 16;
    cut(worker).min(total)..cut(worker + 1).min(total)
}

impl<A: Algorithm> GroupedOptimizer<A> {
    /// An optimizer with no groups yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a group of tensors of the given element counts (zero allowed),
    /// with parameters and gradients zeroed and state initialised; returns
    /// their ids.
    ///
    /// Groups may keep different state buffers, as torch allows (for
    /// example `amsgrad` in one Adam group only): each state name gets one
    /// arena-wide buffer, and a group without it leaves its range unused.
    /// That range still takes memory, so a buffer kept by a small group
    /// costs as much as one kept by all.
    ///
    /// # Errors
    /// Invalid hyperparameters; [`Error::TooLarge`] for sizes whose arena
    /// offsets overflow or whose buffers cannot be allocated. Nothing changes
    /// then.
    pub fn add_group(&mut self, config: A, sizes: &[usize]) -> Result<Vec<TensorId>, Error> {
        config.validate()?;
        let mut names = self.state_names.clone();
        let slots: Vec<usize> = config
            .state_names()
            .iter()
            .map(|name| {
                names.iter().position(|n| n == name).unwrap_or_else(|| {
                    names.push(name);
                    names.len() - 1
                })
            })
            .collect();
        if names.len() > MAX_STATE {
            return Err(Error::IncompatibleConfig { reason: "the groups together keep too many state buffers" });
        }
        // Every offset first, with checked arithmetic, and every buffer's
        // room reserved before any length changes: an error leaves the
        // optimizer as it was.
        let mut placed = Vec::with_capacity(sizes.len());
        let mut end = self.params.len();
        for &len in sizes {
            let offset = end.checked_next_multiple_of(16).ok_or(Error::TooLarge { what: "params", elements: len })?;
            end = offset.checked_add(len).ok_or(Error::TooLarge { what: "params", elements: len })?;
            placed.push((offset, len));
        }
        if end > isize::MAX as usize / size_of::<f32>() {
            return Err(Error::TooLarge { what: "params", elements: end });
        }
        let mut new_state = Vec::new();
        for _ in self.state_names.len()..names.len() {
            let mut b = AVec::new(64);
            memory::reserve_total("state", &mut b, end)?;
            new_state.push(b);
        }
        memory::reserve_total("params", &mut self.params, end)?;
        memory::reserve_total("grads", &mut self.grads, end)?;
        for s in &mut self.state {
            memory::reserve_total("state", s, end)?;
        }
        // From here on nothing allocates beyond the reserved room, so nothing fails.
        for mut b in new_state {
            memory::grow("state", &mut b, self.params.len(), 0.0)?;
            self.state.push(b);
        }
        self.state_names = names;
        let group = self.groups.len();
        let mut ids = Vec::with_capacity(sizes.len());
        for (offset, len) in placed {
            let end = offset + len;
            memory::grow("params", &mut self.params, end, 0.0)?;
            memory::grow("grads", &mut self.grads, end, 0.0)?;
            for (j, s) in self.state.iter_mut().enumerate() {
                memory::grow("state", s, offset, 0.0)?;
                let init = slots.iter().position(|&x| x == j).map_or(0.0, |i| config.state_init(i));
                memory::grow("state", s, end, init)?;
            }
            ids.push(TensorId { owner: self.owner, index: self.tensors.len() });
            self.tensors.push(Tensor { group, offset, len });
        }
        self.groups.push(Group { aux: config.aux_init(), config, schedule: None, slots });
        Ok(ids)
    }

    // The controls (exec, non-finite policy, loss scale, clipping). With
    // clipping on, `step` measures the norm over the whole gradient arena; a
    // shard needs the global norm: see `step_range_with_grad_norm`.
    crate::optim::controls!(exec; guards);

    /// `sum(g^2)` (f64, deterministic, gradients unscaled by the loss scale)
    /// over the arena elements in `range`: a worker's part of the global norm.
    ///
    /// # Errors
    /// A range outside the arena; an unavailable forced backend.
    pub fn grad_sum_of_squares(&self, range: Range<usize>) -> Result<f64, Error> {
        self.check_range(&range)?;
        let plan = self.guards.plan(&self.exec)?;
        Ok(crate::driver::sum_of_squares(&plan, &self.grads[range]))
    }

    fn check_range(&self, range: &Range<usize>) -> Result<(), Error> {
        if range.start > range.end || range.end > self.params.len() {
            return Err(Error::LengthMismatch { what: "range end", expected: self.params.len(), actual: range.end });
        }
        Ok(())
    }

    fn tensor(&self, id: TensorId) -> Result<&Tensor, Error> {
        match self.tensors.get(id.index) {
            Some(t) if id.owner == self.owner => Ok(t),
            _ => Err(Error::ForeignTensor { index: id.index }),
        }
    }

    fn range(&self, id: TensorId) -> Result<Range<usize>, Error> {
        self.tensor(id).map(|t| t.offset..t.offset + t.len)
    }

    /// A tensor's parameters.
    ///
    /// # Errors
    /// [`Error::ForeignTensor`] for an id made by another optimizer.
    pub fn params(&self, id: TensorId) -> Result<&[f32], Error> {
        Ok(&self.params[self.range(id)?])
    }

    /// A tensor's parameters, to write.
    ///
    /// # Errors
    /// As [`params`](Self::params).
    pub fn params_mut(&mut self, id: TensorId) -> Result<&mut [f32], Error> {
        let r = self.range(id)?;
        Ok(&mut self.params[r])
    }

    /// A tensor's gradient buffer, to fill before a step.
    ///
    /// # Errors
    /// As [`params`](Self::params).
    pub fn grads_mut(&mut self, id: TensorId) -> Result<&mut [f32], Error> {
        let r = self.range(id)?;
        Ok(&mut self.grads[r])
    }

    /// A tensor's state buffer by torch name; `Ok(None)` if its group keeps
    /// no such buffer.
    ///
    /// # Errors
    /// As [`params`](Self::params).
    pub fn state(&self, name: &str, id: TensorId) -> Result<Option<&[f32]>, Error> {
        let t = self.tensor(id)?;
        let group = &self.groups[t.group];
        Ok(group
            .config
            .state_names()
            .iter()
            .position(|s| *s == name)
            .map(|i| &self.state[group.slots[i]][t.offset..t.offset + t.len]))
    }

    /// The whole parameter arena (including padding between tensors).
    pub fn params_flat(&self) -> &[f32] {
        &self.params
    }

    /// The whole parameter arena, to write (an all-gather target).
    pub fn params_flat_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    /// The whole gradient arena, to write (a reduce-scatter target).
    pub fn grads_flat_mut(&mut self) -> &mut [f32] {
        &mut self.grads
    }

    /// Elements in the arena.
    pub fn total_len(&self) -> usize {
        self.params.len()
    }

    /// Number of tensors.
    pub fn num_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// The id of the tensor added `index`-th (counting across groups from 0),
    /// which is the index torch's `state_dict` gives it; `None` past the last.
    /// This is how tensors are found again in an optimizer loaded from a
    /// checkpoint.
    pub fn tensor_id(&self, index: usize) -> Option<TensorId> {
        (index < self.tensors.len()).then_some(TensorId { owner: self.owner, index })
    }

    /// A group's configuration.
    pub fn group_config(&self, group: usize) -> Option<&A> {
        self.groups.get(group).map(|g| &g.config)
    }

    /// Replaces a group's configuration (the group's state buffers must stay
    /// the same).
    ///
    /// # Errors
    /// Invalid hyperparameters, another state layout, or no such group;
    /// nothing changes then.
    pub fn set_group_config(&mut self, group: usize, config: A) -> Result<(), Error> {
        config.validate()?;
        let g = self.groups.get_mut(group).ok_or(Error::IncompatibleConfig { reason: "no such group" })?;
        if config.state_names() != g.config.state_names() {
            return Err(Error::IncompatibleConfig { reason: "a group must keep its state buffers" });
        }
        g.config = config;
        Ok(())
    }

    /// Gives a group a schedule: before each step its learning rate (and, for
    /// momentum-cycling schedules, its momentum / `beta1`) is set from
    /// `schedule.lr_at(step_count())`. `None` removes it.
    ///
    /// # Errors
    /// No such group.
    pub fn set_group_schedule(&mut self, group: usize, schedule: Option<Schedule>) -> Result<(), Error> {
        let g = self.groups.get_mut(group).ok_or(Error::IncompatibleConfig { reason: "no such group" })?;
        g.schedule = schedule;
        Ok(())
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.t
    }

    /// One step over every tensor.
    ///
    /// # Errors
    /// As [`step_range`](Self::step_range).
    pub fn step(&mut self) -> Result<StepReport, Error> {
        self.step_range(0..self.params.len())
    }

    /// One step over the arena elements in `range` only (a shard): the same
    /// bits the full step gives those elements. Advances the step count
    /// (and scalar state) as a full step does.
    ///
    /// # Errors
    /// A range outside the arena, an unavailable forced backend, or a
    /// schedule value a group's configuration rejects (or momentum cycling on
    /// an optimizer without momentum); with clipping on, a range that is not
    /// the whole arena ([`Error::IncompatibleConfig`]: use
    /// [`step_range_with_grad_norm`](Self::step_range_with_grad_norm)).
    /// Nothing changes on error.
    pub fn step_range(&mut self, range: Range<usize>) -> Result<StepReport, Error> {
        if self.guards.max_grad_norm.is_some() && range != (0..self.params.len()) {
            self.check_range(&range)?;
            return Err(Error::IncompatibleConfig {
                reason: "clipping a shard needs the global gradient norm: use step_range_with_grad_norm",
            });
        }
        self.step_inner(range, None)
    }

    /// [`step_range`](Self::step_range) for a shard of a clipped model:
    /// `total_norm` is the global gradient norm (the square root of the sum
    /// of every worker's [`grad_sum_of_squares`](Self::grad_sum_of_squares)).
    /// A non-finite `total_norm` is handled by the non-finite policy on
    /// every worker alike (all skip, or all fail with
    /// [`Error::NonFiniteGradNorm`] unless the bad gradient is local).
    ///
    /// # Errors
    /// As [`step_range`](Self::step_range); [`Error::IncompatibleConfig`] if
    /// clipping is off. Nothing changes on error.
    pub fn step_range_with_grad_norm(&mut self, range: Range<usize>, total_norm: f64) -> Result<StepReport, Error> {
        if self.guards.max_grad_norm.is_none() {
            return Err(Error::IncompatibleConfig { reason: "a gradient norm was given but clipping is off" });
        }
        self.step_inner(range, Some(total_norm))
    }

    fn step_inner(&mut self, range: Range<usize>, given_norm: Option<f64>) -> Result<StepReport, Error> {
        self.check_range(&range)?;
        let t = crate::error::next_step(self.t)?;
        let mut plan = self.guards.plan(&self.exec)?;
        let (skipped, norm) = self.guards.check(&mut plan, &self.grads[range.clone()], range.start, given_norm)?;
        if let Some(skipped) = skipped {
            self.guards.last_grad_norm = norm;
            return Ok(skipped);
        }
        // Scheduled hyperparameters, checked for every group before any is set.
        for g in &self.groups {
            if let Some(s) = &g.schedule {
                scheduled(&g.config, s, self.t)?;
            }
        }
        for g in &mut self.groups {
            if let Some(s) = &g.schedule {
                g.config = scheduled(&g.config, s, self.t)?;
            }
        }
        let serial = Plan { exec: Exec { parallel: Parallel::Serial, ..plan.exec }, ..plan };
        let k = self.state_names.len();
        let (lo, hi) = (range.start, range.end);
        let mut refs: [&mut [f32]; MAX_STATE] = Default::default();
        for (r, s) in refs.iter_mut().zip(self.state.iter_mut()) {
            *r = &mut s[lo..hi];
        }
        let arena = Arena { offset: lo, p: &mut self.params[lo..hi], g: &self.grads[lo..hi], s: refs, k };
        let ctx = Ctx { tensors: &self.tensors, groups: &self.groups, t, plan: serial };
        let parallel = match plan.exec.chunk_for(hi - lo) {
            Some(chunk) => {
                split_join(arena, chunk, &|a: &Arena<'_>| a.p.len(), &|a: Arena<'_>, mid| a.split_at(mid), &|a| {
                    ctx.leaf(a)
                });
                true
            }
            None => {
                ctx.leaf(arena);
                false
            }
        };
        // Advance each group's scalar state once (a zero-length run).
        for g in &mut self.groups {
            let mut empty: [&mut [f32]; MAX_STATE] = Default::default();
            g.config.run(t, &mut g.aux, serial, Bufs::dense(&mut [], &[], &mut empty[..g.slots.len()]));
        }
        self.t = t;
        if norm.is_some() {
            self.guards.last_grad_norm = norm;
        }
        Ok(StepReport { backend: plan.backend, parallel, skipped: false })
    }
}

/// A contiguous piece of the arenas starting at arena element `offset`.
struct Arena<'a> {
    offset: usize,
    p: &'a mut [f32],
    g: &'a [f32],
    s: [&'a mut [f32]; MAX_STATE],
    k: usize,
}

impl<'a> Arena<'a> {
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.p.split_at_mut(mid);
        let (g0, g1) = self.g.split_at(mid);
        let mut lo: [&'a mut [f32]; MAX_STATE] = Default::default();
        let mut hi: [&'a mut [f32]; MAX_STATE] = Default::default();
        for (i, s) in self.s.into_iter().enumerate().take(self.k) {
            let (a, b) = s.split_at_mut(mid);
            lo[i] = a;
            hi[i] = b;
        }
        (
            Arena { offset: self.offset, p: p0, g: g0, s: lo, k: self.k },
            Arena { offset: self.offset + mid, p: p1, g: g1, s: hi, k: self.k },
        )
    }
}

struct Ctx<'a, A: Algorithm> {
    tensors: &'a [Tensor],
    groups: &'a [Group<A>],
    t: u64,
    plan: Plan,
}

impl<A: Algorithm> Ctx<'_, A> {
    /// Applies each covered tensor's group kernel to its piece of `a`.
    fn leaf(&self, a: Arena<'_>) {
        let (lo, hi) = (a.offset, a.offset + a.p.len());
        let first = self.tensors.partition_point(|t| t.offset + t.len <= lo);
        let Arena { p, g, mut s, k, .. } = a;
        for t in self.tensors[first..].iter().take_while(|t| t.offset < hi) {
            let (start, end) = (t.offset.max(lo) - lo, (t.offset + t.len).min(hi) - lo);
            if start >= end {
                continue;
            }
            let group = &self.groups[t.group];
            let mut pieces: [&mut [f32]; MAX_STATE] = Default::default();
            for (j, buf) in s.iter_mut().enumerate().take(k) {
                if let Some(i) = group.slots.iter().position(|&x| x == j) {
                    pieces[i] = &mut buf[start..end];
                }
            }
            // The kernel's scalars come from the group's scalar state before
            // this step; each piece works on a copy, the state advances once
            // per step in `step_range`.
            let mut aux = group.aux;
            let own = group.slots.len();
            group.config.run(
                self.t,
                &mut aux,
                self.plan,
                Bufs::dense(&mut p[start..end], &g[start..end], &mut pieces[..own]),
            );
        }
    }
}
