//! Row-sparse updates of embedding tables: `SparseAdam`, sparse `Adagrad`
//! and row-wise AdaGrad.
//!
//! A table is `rows x dim` f32 values, flat and row-major. A gradient is a
//! list of row indices and, for each, `dim` values (row by row, in the order
//! of the indices). Duplicate indices are summed first, as torch coalesces a
//! sparse gradient. Only the rows present are updated, and only their state
//! moves (lazy updates); the step count is global. Rows are independent, so
//! they are updated in parallel, each with the SIMD kernels along `dim`, and
//! the result does not depend on the thread count.
//!
//! The table may also be held in `bf16` or `f16`, and the state of SparseAdam
//! and sparse Adagrad in `bf16` or 8-bit block-wise storage
//! ([`sparse_adam_step_mixed`], [`sparse_adagrad_step_mixed`],
//! [`SparseAdam::step_mixed`]): each present row runs as a piece of the
//! dense mixed-storage step (widened, stepped in `f32`, rounded back), so 8-bit
//! state needs rows of whole blocks of 256.
//!
//! ```
//! use adaoptim::sparse::{SparseAdam, SparseAdamConfig};
//! let (rows, dim) = (1000, 8);
//! let mut table = vec![0.5f32; rows * dim];
//! let mut opt = SparseAdam::new(SparseAdamConfig::default(), rows, dim)?;
//! // rows 3 and 42 (42 twice: its two gradients add up)
//! let values = vec![0.1f32; 3 * dim];
//! opt.step(&mut table, &[42, 3, 42], &values)?;
//! assert_ne!(table[3 * dim], 0.5);
//! assert_eq!(table[4 * dim], 0.5); // untouched row
//! # Ok::<(), adaoptim::Error>(())
//! ```

use rayon::prelude::*;

use crate::driver::{GradPre, Kernel, Lanes, Plan, Pre, Slices, StepReport, run_piece};
use crate::error::{check_len, non_negative, unit_half_open};
use crate::optim::Guards;
use crate::optim::pow_step;
use crate::simd::{F32Vec, LaneOp, dispatch};
use crate::storage::{Dtype, Params, Q8_BLOCK, Q8State, QMap, StateBuf, bf16, f16};
use crate::{Error, Exec, NonFinitePolicy};

use crate::memory::{Raw, try_filled};

/// One coalesced gradient row: the table row, and where its values are
/// (`src < n` is row `src` of the caller's values; otherwise row `src - n` of
/// the sums of duplicated rows).
#[derive(Clone, Copy, Debug)]
struct Entry {
    row: usize,
    src: usize,
}

/// Validates and coalesces row-sparse gradients into reusable buffers: the
/// caller's values are not copied, only duplicated rows are summed. Finding
/// duplicates is O(n) with an open-addressing table sized by the gradient
/// (twice its row count, rounded up to a power of two), so the bookkeeping
/// is bounded by the rows a gradient touches, never by the table's size.
#[derive(Clone, Debug, Default)]
pub(crate) struct Coalescer {
    entries: Vec<Entry>,
    sums: Vec<f32>,
    /// For each summed row (row `k` of `sums`), the position of its first
    /// occurrence in the caller's rows (to report a non-finite sum).
    sum_first: Vec<usize>,
    /// Hash table keys: a table row, or [`EMPTY`] ...
    keys: Vec<usize>,
    /// ... and where that row's entry is.
    slots: Vec<usize>,
}

/// No table row is `usize::MAX` (rows are `< rows <= usize::MAX`).
const EMPTY: usize = usize::MAX;

/// A coalesced gradient: unique rows and a view of their values.
struct Coalesced<'a> {
    entries: &'a [Entry],
    values: &'a [f32],
    sums: &'a [f32],
    sum_first: &'a [usize],
    n: usize,
    dim: usize,
}

impl Coalesced<'_> {
    #[inline]
    fn values(&self, e: Entry) -> &[f32] {
        let d = self.dim;
        if e.src < self.n {
            &self.values[e.src * d..(e.src + 1) * d]
        } else {
            &self.sums[(e.src - self.n) * d..(e.src - self.n + 1) * d]
        }
    }
}

thread_local! {
    /// The coalescing buffers of the caller-counted row-sparse steps
    /// ([`RowSteps::caller_counted`]) on this thread, kept between calls.
    static SCRATCH: std::cell::Cell<Coalescer> = std::cell::Cell::new(Coalescer::default());
}

/// The most coalescing-buffer bytes a thread keeps between caller-counted
/// steps (a gradient of about 400k rows without duplicates).
const KEPT_SCRATCH_BYTES: usize = 32 << 20;

impl Coalescer {
    /// Bytes held by the buffers.
    fn capacity_bytes(&self) -> usize {
        use std::mem::size_of;
        self.entries.capacity() * size_of::<Entry>()
            + self.sums.capacity() * size_of::<f32>()
            + (self.sum_first.capacity() + self.keys.capacity() + self.slots.capacity()) * size_of::<usize>()
    }

    /// Checks the gradient against the table before anything is written.
    fn check(table_rows: usize, dim: usize, table_len: usize, rows: &[usize], values: &[f32]) -> Result<(), Error> {
        if table_len != table_rows * dim {
            return Err(Error::LengthMismatch { what: "table", expected: table_rows * dim, actual: table_len });
        }
        let expected = rows.len().saturating_mul(dim);
        if values.len() != expected {
            return Err(Error::LengthMismatch { what: "grad_values", expected, actual: values.len() });
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= table_rows) {
            return Err(Error::RowOutOfRange { row: r, rows: table_rows });
        }
        Ok(())
    }

    /// Unique rows in order of first appearance; a duplicated row's values
    /// are summed in the order given (torch's coalesce adds them up too).
    fn coalesce<'a>(&'a mut self, rows: &[usize], values: &'a [f32], dim: usize) -> Coalesced<'a> {
        let n = rows.len();
        self.entries.clear();
        self.sums.clear();
        self.sum_first.clear();
        self.entries.extend(rows.iter().enumerate().map(|(src, &row)| Entry { row, src }));
        if !rows.windows(2).all(|w| w[0] < w[1]) {
            let cap = n.saturating_mul(2).next_power_of_two().max(16);
            let shift = 64 - cap.trailing_zeros();
            self.keys.clear();
            self.keys.resize(cap, EMPTY);
            self.slots.resize(cap, 0);
            let mut out = 0usize;
            for i in 0..n {
                let Entry { row, src } = self.entries[i];
                // Fibonacci hashing: the top bits of row * 2^64 / phi.
                let mut h = ((row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> shift) as usize;
                loop {
                    if self.keys[h] == EMPTY {
                        self.keys[h] = row;
                        self.slots[h] = out;
                        self.entries[out] = Entry { row, src };
                        out += 1;
                        break;
                    }
                    if self.keys[h] == row {
                        let first = &mut self.entries[self.slots[h]];
                        if first.src < n {
                            // Second occurrence: start a sum from the first.
                            self.sum_first.push(first.src);
                            self.sums.extend_from_slice(&values[first.src * dim..(first.src + 1) * dim]);
                            first.src = n + self.sum_first.len() - 1;
                        }
                        let start = (first.src - n) * dim;
                        let v = &values[src * dim..(src + 1) * dim];
                        self.sums[start..start + dim].iter_mut().zip(v).for_each(|(a, b)| *a += b);
                        break;
                    }
                    h = (h + 1) & (cap - 1);
                }
            }
            self.entries.truncate(out);
        }
        Coalesced { entries: &self.entries, values, sums: &self.sums, sum_first: &self.sum_first, n, dim }
    }
}

/// A raw pointer to the start of a table or state buffer, shared across the
/// threads that update distinct rows.
struct RowBase<T>(*mut T);
impl<T> Clone for RowBase<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for RowBase<T> {}
// SAFETY: only used to form `&mut` slices of distinct rows (the coalesced row
// list has no duplicates), so no two threads touch the same memory; the
// element types (`f32`, `bf16`, `f16`, `u8`) are plain data.
unsafe impl<T: Send> Send for RowBase<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for RowBase<T> {}

impl<T> RowBase<T> {
    fn of(buf: &mut [T]) -> Self {
        RowBase(buf.as_mut_ptr())
    }

    /// # Safety
    /// `row * dim + dim` must be within the buffer, and no other live
    /// reference may cover that row.
    unsafe fn row<'a>(self, row: usize, dim: usize) -> &'a mut [T] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(row * dim), dim) }
    }
}

/// Hints the CPU to fetch a row of a buffer (random rows defeat the
/// hardware prefetcher).
#[inline(always)]
fn prefetch_row<T>(base: RowBase<T>, row: usize, dim: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = base.0.wrapping_add(row * dim) as *const i8;
        let mut off = 0;
        while off < dim * std::mem::size_of::<T>() {
            // SAFETY: prefetching is a hint: it never faults and has no
            // visible effect, whatever the address (SSE is baseline on x86-64).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (base, row, dim);
}

/// Rows handed to one task, and how far ahead rows are prefetched.
const ROWS_PER_TASK: usize = 64;
const PREFETCH_AHEAD: usize = 4;

/// A task's rows of a row-sparse update as a [`LaneOp`]: the rows loop runs
/// inside [`dispatch`], on the plan's lanes.
struct Rows<'a, 'k, K, const S: usize> {
    k: &'k K,
    pre: GradPre,
    grad: &'a Coalesced<'a>,
    rows: &'a [Entry],
    table: RowBase<f32>,
    state: [RowBase<f32>; S],
}

impl<K: Kernel<S>, const S: usize> LaneOp for Rows<'_, '_, K, S> {
    type Out = ();
    #[inline(always)]
    fn run<V: F32Vec>(self) {
        let dim = self.grad.dim;
        for (i, &e) in self.rows.iter().enumerate() {
            if let Some(ahead) = self.rows.get(i + PREFETCH_AHEAD) {
                prefetch_row(self.table, ahead.row, dim);
                self.state.iter().for_each(|&b| prefetch_row(b, ahead.row, dim));
            }
            // SAFETY: `e.row < rows` (checked before coalescing) so the row
            // lies in the table and in every state buffer (same shape); rows
            // are unique, so no other task forms a slice of the same row.
            let sl = unsafe {
                Slices {
                    p: self.table.row(e.row, dim),
                    g: self.grad.values(e),
                    s: self.state.map(|b| b.row(e.row, dim)),
                }
            };
            sl.run::<V>(self.k, self.pre);
        }
    }
}

/// A table in its storage, shared across the threads that update its rows.
#[derive(Clone, Copy)]
enum TableBase {
    F32(RowBase<f32>),
    Bf16(RowBase<bf16>),
    F16(RowBase<f16>),
}

impl TableBase {
    fn of(table: Params<'_>) -> Self {
        match table {
            Params::F32(x) => TableBase::F32(RowBase::of(x)),
            Params::Bf16(x) => TableBase::Bf16(RowBase::of(x)),
            Params::F16(x) => TableBase::F16(RowBase::of(x)),
        }
    }

    fn prefetch(self, row: usize, dim: usize) {
        match self {
            TableBase::F32(b) => prefetch_row(b, row, dim),
            TableBase::Bf16(b) => prefetch_row(b, row, dim),
            TableBase::F16(b) => prefetch_row(b, row, dim),
        }
    }

    /// # Safety
    /// As [`RowBase::row`].
    unsafe fn row<'a>(self, row: usize, dim: usize) -> Params<'a> {
        // SAFETY: guaranteed by the caller.
        unsafe {
            match self {
                TableBase::F32(b) => Params::F32(b.row(row, dim)),
                TableBase::Bf16(b) => Params::Bf16(b.row(row, dim)),
                TableBase::F16(b) => Params::F16(b.row(row, dim)),
            }
        }
    }
}

/// A state buffer in its storage, shared across the threads that update its
/// rows. An 8-bit buffer's rows are whole blocks (checked before a step).
#[derive(Clone, Copy)]
enum StateBase<'m> {
    F32(RowBase<f32>),
    Bf16(RowBase<bf16>),
    Q8 { codes: RowBase<u8>, absmax: RowBase<f32>, map: &'m QMap },
}

impl<'m> StateBase<'m> {
    fn of(state: StateBuf<'m>) -> Self {
        match state {
            StateBuf::F32(x) => StateBase::F32(RowBase::of(x)),
            StateBuf::Bf16(x) => StateBase::Bf16(RowBase::of(x)),
            StateBuf::Q8(q) => StateBase::Q8 { codes: RowBase::of(q.codes), absmax: RowBase::of(q.absmax), map: q.map },
        }
    }

    fn prefetch(self, row: usize, dim: usize) {
        match self {
            StateBase::F32(b) => prefetch_row(b, row, dim),
            StateBase::Bf16(b) => prefetch_row(b, row, dim),
            StateBase::Q8 { codes, .. } => prefetch_row(codes, row, dim),
        }
    }

    /// # Safety
    /// As [`RowBase::row`]; an 8-bit buffer's `dim` is a multiple of
    /// [`Q8_BLOCK`].
    unsafe fn row<'a>(self, row: usize, dim: usize) -> StateBuf<'a>
    where
        'm: 'a,
    {
        // SAFETY: guaranteed by the caller; row `row` of the codes covers
        // exactly the blocks `row * dim / Q8_BLOCK ..` of the scales.
        unsafe {
            match self {
                StateBase::F32(b) => StateBuf::F32(b.row(row, dim)),
                StateBase::Bf16(b) => StateBuf::Bf16(b.row(row, dim)),
                StateBase::Q8 { codes, absmax, map } => {
                    StateBuf::Q8(Q8State { codes: codes.row(row, dim), absmax: absmax.row(row, dim / Q8_BLOCK), map })
                }
            }
        }
    }
}

/// A task's rows of a row-sparse update over buffers in any storage: each
/// row runs as a piece of a mixed-storage step ([`run_piece`]).
struct MixedRows<'a, 'k, 'm, K, const S: usize> {
    k: &'k K,
    pre: GradPre,
    grad: &'a Coalesced<'a>,
    rows: &'a [Entry],
    table: TableBase,
    state: [StateBase<'m>; S],
}

impl<K: Kernel<S>, const S: usize> LaneOp for MixedRows<'_, '_, '_, K, S> {
    type Out = ();
    #[inline(always)]
    fn run<V: F32Vec>(self) {
        let dim = self.grad.dim;
        for (i, &e) in self.rows.iter().enumerate() {
            if let Some(ahead) = self.rows.get(i + PREFETCH_AHEAD) {
                self.table.prefetch(ahead.row, dim);
                self.state.iter().for_each(|b| b.prefetch(ahead.row, dim));
            }
            // SAFETY: as in `Rows`: the row lies in the table and in every
            // state buffer, no other task forms a slice of it, and 8-bit
            // rows are whole blocks (checked by `check_row_states`).
            let (p, s) = unsafe { (self.table.row(e.row, dim), self.state.map(|b| b.row(e.row, dim))) };
            run_piece::<V, K, S>(self.k, p, self.grad.values(e), s, self.pre);
        }
    }
}

/// Applies `k` to every coalesced row, in parallel when there is enough work.
fn update_rows<K: Kernel<S>, const S: usize>(
    k: &K,
    plan: &Plan,
    parallel: bool,
    grad: &Coalesced<'_>,
    table: Params<'_>,
    state: [StateBuf<'_>; S],
) -> bool {
    let (backend, pre) = (plan.backend, plan.pre(k.maximize()));
    let all_f32 = matches!(table, Params::F32(_)) && state.iter().all(|s| matches!(s, StateBuf::F32(_)));
    let run = |task: &(dyn Fn(&[Entry]) + Sync)| {
        if parallel {
            grad.entries.par_chunks(ROWS_PER_TASK).for_each(task);
        } else {
            grad.entries.chunks(ROWS_PER_TASK).for_each(task);
        }
    };
    if all_f32 {
        // The f32 rows run the lane loop directly (no per-row storage match).
        let Params::F32(table) = table else { unreachable!("checked above") };
        let table = RowBase::of(table);
        let state: [RowBase<f32>; S] = state.map(|s| match s {
            StateBuf::F32(s) => RowBase::of(s),
            _ => unreachable!("checked above"),
        });
        run(&|rows| dispatch(backend, Rows { k, pre, grad, rows, table, state }));
    } else {
        let table = TableBase::of(table);
        let state = state.map(StateBase::of);
        run(&|rows| dispatch(backend, MixedRows { k, pre, grad, rows, table, state }));
    }
    parallel
}

/// The length and storage checks of a row-sparse step's state buffers
/// (named by `names`) for a table of `n` elements in rows of `dim`: each the
/// table's size; an 8-bit buffer's rows whole blocks of [`Q8_BLOCK`] (a
/// row's update requantizes its blocks, so a block may not hold two rows,
/// one of which does not move) with one scale per block.
fn check_row_states(n: usize, dim: usize, names: &[&'static str], state: &[StateBuf<'_>]) -> Result<(), Error> {
    for (&name, s) in names.iter().zip(state) {
        check_len(name, n, s.len())?;
        if let StateBuf::Q8(q) = s {
            if !dim.is_multiple_of(Q8_BLOCK) {
                return Err(Error::Storage {
                    what: name,
                    dtype: Dtype::Q8,
                    reason: "8-bit row-sparse state needs rows of whole blocks (dim a multiple of 256)",
                });
            }
            check_len("absmax", n / Q8_BLOCK, q.absmax.len())?;
        }
    }
    Ok(())
}

/// What every row-sparse optimizer keeps besides its state: the table shape,
/// the step count, the coalescing buffers and the execution policy.
#[derive(Clone, Debug)]
pub(crate) struct RowSteps {
    pub(crate) rows: usize,
    pub(crate) dim: usize,
    pub(crate) t: u64,
    scratch: Coalescer,
    exec: Exec,
    guards: Guards,
}

/// What [`RowSteps::prepare`] decided.
enum Prepared<'a> {
    /// Go on with this plan, parallel or not, and gradient.
    Go(Plan, bool, Coalesced<'a>),
    /// The policy skips this step; report it.
    Skip(StepReport),
}

impl RowSteps {
    /// The shape and its element count.
    pub(crate) fn new(rows: usize, dim: usize) -> Result<(RowSteps, usize), Error> {
        let n = rows.checked_mul(dim).ok_or(Error::TooLarge { what: "table", elements: usize::MAX })?;
        let steps =
            RowSteps { rows, dim, t: 0, scratch: Coalescer::default(), exec: Exec::auto(), guards: Guards::default() };
        Ok((steps, n))
    }

    /// Runs `f` on the steps of a caller-counted row-sparse step (the free
    /// functions: the caller keeps the state and counts steps; `t` is the
    /// step about to be taken), with this thread's kept coalescing buffers.
    /// A fresh set per call would be allocated and page-faulted in every
    /// step (about 80 bytes per gradient row); the owning optimizers keep
    /// theirs in their `RowSteps`. Buffers past [`KEPT_SCRATCH_BYTES`] are
    /// dropped after the call rather than kept.
    fn caller_counted<R>(rows: usize, dim: usize, t: u64, exec: Exec, f: impl FnOnce(&mut RowSteps) -> R) -> R {
        let scratch = SCRATCH.take();
        let mut steps = RowSteps { rows, dim, t: t - 1, scratch, exec, guards: Guards::default() };
        let out = f(&mut steps);
        if steps.scratch.capacity_bytes() <= KEPT_SCRATCH_BYTES {
            SCRATCH.set(steps.scratch);
        }
        out
    }

    /// One step of an element-wise row kernel: check, policy, coalesce,
    /// update the present rows, advance the step count. The states are
    /// named by `names` in errors.
    fn run<K: Kernel<S>, const S: usize>(
        &mut self,
        k: &K,
        table: Params<'_>,
        grad_rows: &[usize],
        grad_values: &[f32],
        names: [&'static str; S],
        state: [StateBuf<'_>; S],
    ) -> Result<StepReport, Error> {
        let t = crate::error::next_step(self.t)?;
        check_row_states(self.rows * self.dim, self.dim, &names, &state)?;
        let (plan, parallel, grad) = match self.prepare(table.len(), grad_rows, grad_values)? {
            Prepared::Go(plan, parallel, grad) => (plan, parallel, grad),
            Prepared::Skip(report) => return Ok(report),
        };
        update_rows(k, &plan, parallel, &grad, table, state);
        self.t = t;
        Ok(StepReport { backend: plan.backend, parallel, skipped: false })
    }

    /// Checks the gradient against the table (before anything is written),
    /// resolves the plan (with the loss scale), coalesces, and applies the
    /// guards to the coalesced gradient: the non-finite policy (duplicate
    /// rows of large values can sum to infinity; torch's `GradScaler`
    /// coalesces before its check too) and clipping by the norm of the
    /// coalesced gradient, the gradient torch's sparse tensor holds.
    fn prepare<'a>(
        &'a mut self,
        table_len: usize,
        grad_rows: &[usize],
        grad_values: &'a [f32],
    ) -> Result<Prepared<'a>, Error> {
        Coalescer::check(self.rows, self.dim, table_len, grad_rows, grad_values)?;
        crate::error::next_step(self.t)?;
        let mut plan = self.guards.plan(&self.exec)?;
        let policy = self.guards.non_finite;
        let dim = self.dim;
        if let Some(skipped) = crate::optim::non_finite_guard(policy, &plan, grad_values, 0)? {
            return Ok(Prepared::Skip(skipped));
        }
        let grad = self.scratch.coalesce(grad_rows, grad_values, dim);
        if policy != NonFinitePolicy::Propagate && crate::driver::any_non_finite(&plan, grad.sums) {
            if policy == NonFinitePolicy::Error {
                let at = grad.sums.iter().position(|&x| !plan.unscale.apply(x).is_finite()).unwrap_or(0);
                let index = grad.sum_first[at / dim.max(1)] * dim + at % dim.max(1);
                return Err(Error::NonFiniteGradient { index });
            }
            return Ok(Prepared::Skip(StepReport { backend: plan.backend, parallel: false, skipped: true }));
        }
        if self.guards.max_grad_norm.is_some() {
            // Row by row, in the coalesced order: deterministic for any
            // thread count.
            let total = grad.entries.iter().map(|&e| crate::driver::sum_of_squares(&plan, grad.values(e))).sum::<f64>();
            let (skip, norm) = self.guards.check(&mut plan, &[], 0, Some(total.sqrt()))?;
            self.guards.last_grad_norm = norm;
            if let Some(skip) = skip {
                return Ok(Prepared::Skip(skip));
            }
        }
        let parallel = plan.exec.chunk_for(grad_values.len()).is_some();
        Ok(Prepared::Go(plan, parallel, grad))
    }
}

/// The accessors every row-sparse optimizer shares through its `RowSteps`.
macro_rules! row_steps_accessors {
    ($($t:ty),*) => {$(
        impl $t {
            // The controls. The non-finite check and the clipping norm see the
            // coalesced gradient (duplicate rows summed). Duplicates are summed
            // before the loss scale is divided out; for a power-of-two scale
            // (`GradScaler`'s) that gives torch's bits, which unscales first.
            crate::optim::controls!(steps.exec; steps.guards);

            /// Steps taken.
            pub fn step_count(&self) -> u64 {
                self.steps.t
            }
        }
    )*};
}

row_steps_accessors!(SparseAdam, SparseAdagrad, RowWiseAdagrad);

/// Hyperparameters of [`SparseAdam`], with `torch.optim.SparseAdam`'s names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseAdamConfig {
    /// Learning rate. Default `1e-3`.
    pub lr: f64,
    /// Moment decay rates. Default `(0.9, 0.999)`.
    pub betas: (f64, f64),
    /// Added to the denominator. Default `1e-8`.
    pub eps: f64,
    /// Maximize the objective. Default `false`.
    pub maximize: bool,
}

impl Default for SparseAdamConfig {
    fn default() -> Self {
        SparseAdamConfig { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, maximize: false }
    }
}

impl SparseAdamConfig {
    /// A configuration from torch keyword arguments written as JSON, as
    /// [`AnyConfig::from_torch_json`](crate::AnyConfig::from_torch_json)
    /// reads them: `{"lr": 0.01, "betas": [0.9, 0.99]}` or a `param_groups`
    /// entry of `torch.optim.SparseAdam`. Options not given keep the defaults.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for text that is not a JSON object, an
    /// unknown option or a value of the wrong type;
    /// [`Error::InvalidHyperparameter`] for a value out of its domain.
    pub fn from_torch_json(kwargs: &str) -> Result<Self, Error> {
        Self::from_kwargs(&crate::keywords::parse_kwargs(kwargs)?)
    }

    pub(crate) fn from_kwargs(kwargs: &serde_json::Value) -> Result<Self, Error> {
        let mut c = SparseAdamConfig::default();
        for (k, v) in crate::keywords::kwargs_from_json(kwargs, &[])? {
            c.set_option(k, &v)?;
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), Error> {
        non_negative("lr", self.lr)?;
        non_negative("eps", self.eps)?;
        unit_half_open("betas[0]", self.betas.0)?;
        unit_half_open("betas[1]", self.betas.1)
    }
}

/// torch's SparseAdam per element of a present row:
/// ```text
/// exp_avg    += (g - exp_avg) * (1 - beta1)
/// exp_avg_sq += (g * g - exp_avg_sq) * (1 - beta2)
/// p += -(lr * sqrt(1 - beta2^t) / (1 - beta1^t)) * (exp_avg / (sqrt(exp_avg_sq) + eps))
/// ```
struct SparseAdamKernel {
    maximize: bool,
    omb1: f32,
    omb2: f32,
    eps: f32,
    neg_step: f32,
}

impl SparseAdamKernel {
    /// The kernel of step number `t` (bias corrections folded into the step size).
    fn new(c: &SparseAdamConfig, t: u64) -> Self {
        let (b1, b2) = c.betas;
        SparseAdamKernel {
            maximize: c.maximize,
            omb1: (1.0 - b1) as f32,
            omb2: (1.0 - b2) as f32,
            eps: c.eps as f32,
            neg_step: (-(c.lr * (1.0 - pow_step(b2, t)).sqrt() / (1.0 - pow_step(b1, t)))) as f32,
        }
    }
}

/// Step number `t` (1 for the first) of `torch.optim.SparseAdam` on a
/// `table` of rows of `dim` elements with caller-owned state (`exp_avg`,
/// `exp_avg_sq`, the table's size): what [`SparseAdam::step`] runs, for
/// callers that keep the state themselves (the Python package keeps it in
/// torch tensors). Duplicate rows are summed first, as torch coalesces; the
/// rows not named keep their values and state. The caller counts steps.
///
/// # Errors
/// [`Error::InvalidHyperparameter`], [`Error::InvalidStep`] for `t = 0` or
/// past [`MAX_STEP`](crate::MAX_STEP), [`Error::LengthMismatch`] (a table
/// that is not whole rows, a state of another size, values that are not
/// `grad_rows.len() * dim`), [`Error::RowOutOfRange`]; nothing is written
/// then.
#[allow(clippy::too_many_arguments)]
pub fn sparse_adam_step_slices(
    config: &SparseAdamConfig,
    t: u64,
    dim: usize,
    table: &mut [f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    grad_rows: &[usize],
    grad_values: &[f32],
    exec: Exec,
) -> Result<StepReport, Error> {
    let (table, state) = (Params::F32(table), [StateBuf::F32(exp_avg), StateBuf::F32(exp_avg_sq)]);
    sparse_adam_step_mixed(config, t, dim, table, state, grad_rows, grad_values, exec)
}

/// [`sparse_adam_step_slices`] with the table and the state in any
/// [`storage`](crate::storage): an `f32`, `bf16` or `f16` table; each state
/// (`[exp_avg, exp_avg_sq]`) `f32`, `bf16` or 8-bit block-wise
/// ([`QMap::signed`] for `exp_avg`, [`QMap::unsigned`] for `exp_avg_sq`, as
/// bitsandbytes). The gradient values are `f32` (duplicates are summed in
/// `f32`).
///
/// Each present row is stepped in `f32` on its widened (or dequantized)
/// values and rounded back to nearest-even (or requantized, block by
/// block): the bits of [`sparse_adam_step_slices`] on the widened buffers,
/// rounded. Rows not named keep their bits in every buffer, so an 8-bit
/// state needs rows of whole blocks: `dim` a multiple of 256 (a block shared
/// by two rows would be requantized by one row's step, moving the other's
/// values). Every backend, thread count and chunk size gives the same bits.
///
/// # Errors
/// As [`sparse_adam_step_slices`], and [`Error::Storage`] for an 8-bit
/// state whose `dim` is not a multiple of 256, [`Error::LengthMismatch`]
/// for an 8-bit state's `absmax` not one per block; nothing is written then.
#[allow(clippy::too_many_arguments)]
pub fn sparse_adam_step_mixed(
    config: &SparseAdamConfig,
    t: u64,
    dim: usize,
    table: Params<'_>,
    state: [StateBuf<'_>; 2],
    grad_rows: &[usize],
    grad_values: &[f32],
    exec: Exec,
) -> Result<StepReport, Error> {
    config.validate()?;
    let rows = check_caller_table(t, dim, table.len())?;
    let k = SparseAdamKernel::new(config, t);
    RowSteps::caller_counted(rows, dim, t, exec, |steps| {
        steps.run(&k, table, grad_rows, grad_values, ["exp_avg", "exp_avg_sq"], state)
    })
}

impl Kernel<2> for SparseAdamKernel {
    fn maximize(&self) -> bool {
        self.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [m, v] = s;
        *m = *m + (g - *m) * V::splat(self.omb1);
        *v = *v + (g * g - *v) * V::splat(self.omb2);
        let denom = v.sqrt() + V::splat(self.eps);
        *p = *p + V::splat(self.neg_step) * (*m / denom);
    }
}

/// Lazy Adam for embedding tables (`torch.optim.SparseAdam`): only the rows
/// present in a gradient update their moments; bias correction uses the
/// global step count.
#[derive(Clone, Debug)]
pub struct SparseAdam {
    pub(crate) config: SparseAdamConfig,
    pub(crate) steps: RowSteps,
    pub(crate) exp_avg: Raw,
    pub(crate) exp_avg_sq: Raw,
}

impl SparseAdam {
    /// State for a `rows x dim` table.
    ///
    /// # Errors
    /// Invalid hyperparameters.
    pub fn new(config: SparseAdamConfig, rows: usize, dim: usize) -> Result<Self, Error> {
        config.validate()?;
        let (steps, n) = RowSteps::new(rows, dim)?;
        Ok(SparseAdam {
            config,
            steps,
            exp_avg: try_filled("exp_avg", n, 0.0)?,
            exp_avg_sq: try_filled("exp_avg_sq", n, 0.0)?,
        })
    }

    /// One step from the gradient rows `grad_rows` with values `grad_values`
    /// (`grad_rows.len() * dim` of them).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] or [`Error::RowOutOfRange`] before anything is written.
    pub fn step(&mut self, table: &mut [f32], grad_rows: &[usize], grad_values: &[f32]) -> Result<StepReport, Error> {
        self.step_mixed(Params::F32(table), grad_rows, grad_values)
    }

    /// [`step`](Self::step) on a table in any storage (`f32`, `bf16` or
    /// `f16`; the state stays `f32`): each present row is stepped in `f32`
    /// on its widened values and rounded back to nearest-even, as
    /// [`sparse_adam_step_mixed`].
    ///
    /// # Errors
    /// As [`step`](Self::step).
    pub fn step_mixed(
        &mut self,
        table: Params<'_>,
        grad_rows: &[usize],
        grad_values: &[f32],
    ) -> Result<StepReport, Error> {
        let t = crate::error::next_step(self.steps.t)?;
        let k = SparseAdamKernel::new(&self.config, t);
        let state = [StateBuf::F32(&mut self.exp_avg), StateBuf::F32(&mut self.exp_avg_sq)];
        self.steps.run(&k, table, grad_rows, grad_values, ["exp_avg", "exp_avg_sq"], state)
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }
    /// Sets the learning rate.
    ///
    /// # Errors
    /// Unless finite and `>= 0`.
    pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
        non_negative("lr", lr)?;
        self.config.lr = lr;
        Ok(())
    }
    /// First moments, `rows x dim`.
    pub fn exp_avg(&self) -> &[f32] {
        &self.exp_avg
    }
    /// Second moments, `rows x dim`.
    pub fn exp_avg_sq(&self) -> &[f32] {
        &self.exp_avg_sq
    }
}

/// torch's Adagrad on a sparse gradient, per element of a present row:
/// `sum += g * g; p += -clr * (g / (sqrt(sum) + eps))`.
struct SparseAdagradKernel {
    maximize: bool,
    eps: f32,
    neg_clr: f32,
}

impl SparseAdagradKernel {
    fn new(config: &crate::AdagradConfig, t: u64) -> Self {
        SparseAdagradKernel { maximize: config.maximize, eps: config.eps as f32, neg_clr: config.neg_clr(t) }
    }
}

/// The hyperparameters `torch.optim.Adagrad` accepts with sparse gradients.
fn check_sparse_adagrad(config: &crate::AdagradConfig) -> Result<(), Error> {
    crate::Algorithm::validate(config)?;
    if config.weight_decay != 0.0 {
        return Err(Error::InvalidHyperparameter {
            name: "weight_decay",
            value: config.weight_decay,
            requirement: "0 with sparse gradients (as in torch)",
        });
    }
    if config.eps_inside_sqrt {
        return Err(Error::InvalidHyperparameter {
            name: "eps_inside_sqrt",
            value: 1.0,
            requirement: "false for sparse gradients",
        });
    }
    if config.torch_exact {
        return Err(Error::InvalidHyperparameter {
            name: "torch_exact",
            value: 1.0,
            requirement: "false for sparse gradients",
        });
    }
    Ok(())
}

/// The step number and table a caller-owned sparse step is given: `t` in
/// range, a table of whole rows (the states are checked by
/// [`check_row_states`]); the table's row count.
fn check_caller_table(t: u64, dim: usize, n: usize) -> Result<usize, Error> {
    if t == 0 || t > crate::MAX_STEP {
        return Err(Error::InvalidStep { step: t });
    }
    let rows = n.checked_div(dim).unwrap_or(0);
    if rows * dim != n {
        return Err(Error::LengthMismatch { what: "table", expected: rows * dim, actual: n });
    }
    Ok(rows)
}

/// Step number `t` of `torch.optim.Adagrad` fed a sparse gradient, on a
/// `table` of rows of `dim` elements with a caller-owned accumulator `sum`
/// (the table's size): what [`SparseAdagrad::step`] runs, for callers that
/// keep the state themselves (the Python package). Duplicate rows are summed
/// first, as torch coalesces; the rows not named keep their values and
/// state. The caller counts steps.
///
/// # Errors
/// As [`sparse_adam_step_slices`], and the hyperparameters
/// [`SparseAdagrad::new`] refuses (`weight_decay != 0`, as torch).
#[allow(clippy::too_many_arguments)]
pub fn sparse_adagrad_step_slices(
    config: &crate::AdagradConfig,
    t: u64,
    dim: usize,
    table: &mut [f32],
    sum: &mut [f32],
    grad_rows: &[usize],
    grad_values: &[f32],
    exec: Exec,
) -> Result<StepReport, Error> {
    sparse_adagrad_step_mixed(config, t, dim, Params::F32(table), StateBuf::F32(sum), grad_rows, grad_values, exec)
}

/// [`sparse_adagrad_step_slices`] with the table and the accumulator in any
/// [`storage`](crate::storage): an `f32`, `bf16` or `f16` table; `sum` in
/// `f32`, `bf16` or 8-bit block-wise ([`QMap::unsigned`]), as
/// [`sparse_adam_step_mixed`] (8-bit needs `dim` a multiple of 256).
///
/// # Errors
/// As [`sparse_adam_step_mixed`], and the hyperparameters
/// [`SparseAdagrad::new`] refuses.
#[allow(clippy::too_many_arguments)]
pub fn sparse_adagrad_step_mixed(
    config: &crate::AdagradConfig,
    t: u64,
    dim: usize,
    table: Params<'_>,
    sum: StateBuf<'_>,
    grad_rows: &[usize],
    grad_values: &[f32],
    exec: Exec,
) -> Result<StepReport, Error> {
    check_sparse_adagrad(config)?;
    let rows = check_caller_table(t, dim, table.len())?;
    let k = SparseAdagradKernel::new(config, t);
    RowSteps::caller_counted(rows, dim, t, exec, |steps| steps.run(&k, table, grad_rows, grad_values, ["sum"], [sum]))
}

impl Kernel<1> for SparseAdagradKernel {
    fn maximize(&self) -> bool {
        self.maximize
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 1]) {
        let [sum] = s;
        *sum = *sum + g * g;
        let std = sum.sqrt() + V::splat(self.eps);
        *p = *p + V::splat(self.neg_clr) * (g / std);
    }
}

/// `torch.optim.Adagrad` fed sparse (row) gradients: the accumulator and
/// parameters of the present rows update; the learning-rate decay uses the
/// global step count. As in torch, `weight_decay` must be 0 with sparse
/// gradients.
#[derive(Clone, Debug)]
pub struct SparseAdagrad {
    pub(crate) config: crate::AdagradConfig,
    pub(crate) steps: RowSteps,
    pub(crate) sum: Raw,
}

impl SparseAdagrad {
    /// State for a `rows x dim` table (`sum` starts at
    /// `initial_accumulator_value`).
    ///
    /// # Errors
    /// Invalid hyperparameters; `weight_decay != 0` (torch: "weight_decay
    /// option is not compatible with sparse gradients"); `eps_inside_sqrt`.
    pub fn new(config: crate::AdagradConfig, rows: usize, dim: usize) -> Result<Self, Error> {
        check_sparse_adagrad(&config)?;
        let (steps, n) = RowSteps::new(rows, dim)?;
        let sum = try_filled("sum", n, config.initial_accumulator_value as f32)?;
        Ok(SparseAdagrad { config, steps, sum })
    }

    /// One step; see [`SparseAdam::step`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] or [`Error::RowOutOfRange`] before anything is written.
    pub fn step(&mut self, table: &mut [f32], grad_rows: &[usize], grad_values: &[f32]) -> Result<StepReport, Error> {
        self.step_mixed(Params::F32(table), grad_rows, grad_values)
    }

    /// [`step`](Self::step) on a table in any storage (the accumulator
    /// stays `f32`); see [`SparseAdam::step_mixed`].
    ///
    /// # Errors
    /// As [`step`](Self::step).
    pub fn step_mixed(
        &mut self,
        table: Params<'_>,
        grad_rows: &[usize],
        grad_values: &[f32],
    ) -> Result<StepReport, Error> {
        let t = crate::error::next_step(self.steps.t)?;
        let k = SparseAdagradKernel::new(&self.config, t);
        self.steps.run(&k, table, grad_rows, grad_values, ["sum"], [StateBuf::F32(&mut self.sum)])
    }

    /// The accumulator, `rows x dim`.
    pub fn sum(&self) -> &[f32] {
        &self.sum
    }
}

/// Row-wise AdaGrad: one accumulator per row instead of per element (`dim`
/// times less state), the variant recommendation models use for huge
/// embedding tables (FBGEMM's `rowwise_adagrad`). For each present row `r`
/// with coalesced gradient `g_r` (a `dim`-vector):
/// ```text
/// acc[r] += mean(g_r * g_r)          (the mean summed in f64, rounded once)
/// p_r    -= (lr / (sqrt(acc[r]) + eps)) * g_r
/// ```
#[derive(Clone, Debug)]
pub struct RowWiseAdagrad {
    pub(crate) lr: f64,
    pub(crate) eps: f64,
    pub(crate) steps: RowSteps,
    pub(crate) acc: Raw,
}

/// [`RowWiseAdagrad`]'s hyperparameters, with `torch.optim.Adagrad`'s
/// names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowWiseAdagradConfig {
    /// Learning rate. Default `1e-2`.
    pub lr: f64,
    /// Added to the root of the accumulator. Default `1e-10`.
    pub eps: f64,
    /// The accumulators' start. Default `0`.
    pub initial_accumulator_value: f64,
}

impl Default for RowWiseAdagradConfig {
    fn default() -> Self {
        RowWiseAdagradConfig { lr: 1e-2, eps: 1e-10, initial_accumulator_value: 0.0 }
    }
}

impl RowWiseAdagrad {
    /// State for a `rows x dim` table from named hyperparameters.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn with_config(config: RowWiseAdagradConfig, rows: usize, dim: usize) -> Result<Self, Error> {
        Self::new(config.lr, config.eps, config.initial_accumulator_value, rows, dim)
    }

    /// State for a `rows x dim` table: `rows` accumulators starting at
    /// `initial_accumulator_value`.
    ///
    /// # Errors
    /// A negative or non-finite `lr`, `eps` or initial value.
    pub fn new(lr: f64, eps: f64, initial_accumulator_value: f64, rows: usize, dim: usize) -> Result<Self, Error> {
        non_negative("lr", lr)?;
        non_negative("eps", eps)?;
        non_negative("initial_accumulator_value", initial_accumulator_value)?;
        let (steps, _) = RowSteps::new(rows, dim)?;
        let acc = try_filled("sum", rows, initial_accumulator_value as f32)?;
        Ok(RowWiseAdagrad { lr, eps, steps, acc })
    }

    /// One step; see [`SparseAdam::step`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] or [`Error::RowOutOfRange`] before anything is written.
    pub fn step(&mut self, table: &mut [f32], grad_rows: &[usize], grad_values: &[f32]) -> Result<StepReport, Error> {
        self.step_mixed(Params::F32(table), grad_rows, grad_values)
    }

    /// [`step`](Self::step) on a table in any storage (`f32`, `bf16` or
    /// `f16`; the accumulators stay `f32`): each present row is stepped in
    /// `f32` on its widened values and rounded back to nearest-even, as
    /// [`SparseAdam::step_mixed`]. The accumulator sees the gradient only,
    /// so it takes the same bits whatever the table's storage.
    ///
    /// # Errors
    /// As [`step`](Self::step).
    pub fn step_mixed(
        &mut self,
        table: Params<'_>,
        grad_rows: &[usize],
        grad_values: &[f32],
    ) -> Result<StepReport, Error> {
        let (lr, eps, dim) = (self.lr, self.eps as f32, self.steps.dim);
        let (pre, parallel, grad) = match self.steps.prepare(table.len(), grad_rows, grad_values)? {
            Prepared::Go(plan, parallel, grad) => (plan.pre(false), parallel, grad),
            Prepared::Skip(report) => return Ok(report),
        };
        let table_base = TableBase::of(table);
        let acc_base = RowBase(self.acc.as_mut_ptr());
        // `p += mult * g` on a row, each element widened to `f32` and rounded
        // back (the identity for an `f32` table).
        fn update<P: Copy>(
            p: &mut [P],
            g: &[f32],
            mult: f32,
            pre: GradPre,
            widen: impl Fn(P) -> f32,
            narrow: impl Fn(f32) -> P,
        ) {
            p.iter_mut().zip(g).for_each(|(p, &g)| *p = narrow(widen(*p) + mult * pre.apply(g)));
        }
        let one = |e: &Entry| {
            let g = grad.values(*e);
            // SAFETY: e.row < rows (checked); rows are unique, so each thread
            // owns its table row and its accumulator.
            let (p, acc) = unsafe { (table_base.row(e.row, dim), &mut acc_base.row(e.row, 1)[0]) };
            let mean = if dim == 0 {
                0.0
            } else {
                g.iter().map(|&x| f64::from(pre.apply(x)) * f64::from(pre.apply(x))).sum::<f64>() / dim as f64
            };
            *acc += mean as f32;
            let mult = (-lr / (acc.sqrt() + eps) as f64) as f32;
            match p {
                Params::F32(p) => update(p, g, mult, pre, |x| x, |x| x),
                Params::Bf16(p) => update(p, g, mult, pre, bf16::to_f32, bf16::from_f32),
                Params::F16(p) => update(p, g, mult, pre, f16::to_f32, f16::from_f32),
            }
        };
        if parallel {
            grad.entries.par_iter().with_min_len(ROWS_PER_TASK).for_each(one);
        } else {
            grad.entries.iter().for_each(one);
        }
        self.steps.t += 1;
        Ok(StepReport { backend: crate::Backend::Scalar, parallel, skipped: false })
    }

    /// The per-row accumulators.
    pub fn acc(&self) -> &[f32] {
        &self.acc
    }
}

// The torch keyword options: the fields torch's constructor takes.
crate::keywords::torch_options!(SparseAdamConfig { lr, betas, eps, maximize });
