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

use crate::checkpoint::{Reader, Writer};
use crate::driver::{Kernel, Plan, Slices, StepReport, runner};
use crate::error::{non_negative, unit_half_open};
use crate::optim::pow_step;
use crate::simd::F32Vec;
use crate::{Error, Exec, NonFinitePolicy};

fn bad(reason: impl Into<String>) -> Error {
    Error::Checkpoint { reason: reason.into() }
}

use crate::memory::{Buffer, filled as zeros};

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
/// duplicates is O(n) with a per-row stamp (8 bytes per table row), with no
/// sort.
#[derive(Clone, Debug, Default)]
struct Coalescer {
    entries: Vec<Entry>,
    sums: Vec<f32>,
    /// `stamp[row] == epoch` if the row was seen in the current step ...
    stamp: Vec<u32>,
    /// ... at `entries[slot[row]]`.
    slot: Vec<u32>,
    epoch: u32,
}

/// A coalesced gradient: unique rows (in order of first appearance) and a
/// view of their values.
struct Coalesced<'a> {
    entries: &'a [Entry],
    values: &'a [f32],
    sums: &'a [f32],
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

impl Coalescer {
    /// Checks the gradient against the table before anything is written.
    fn check(table_rows: usize, dim: usize, table_len: usize, rows: &[usize], values: &[f32]) -> Result<(), Error> {
        if table_len != table_rows * dim {
            return Err(Error::LengthMismatch { what: "table", expected: table_rows * dim, actual: table_len });
        }
        if values.len() != rows.len() * dim {
            return Err(Error::LengthMismatch {
                what: "grad_values",
                expected: rows.len() * dim,
                actual: values.len(),
            });
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= table_rows) {
            return Err(Error::RowOutOfRange { row: r, rows: table_rows });
        }
        Ok(())
    }

    /// Unique rows in order of first appearance; a duplicated row's values
    /// are summed in the order given (torch's coalesce adds them up too).
    fn coalesce<'a>(&'a mut self, table_rows: usize, rows: &[usize], values: &'a [f32], dim: usize) -> Coalesced<'a> {
        let n = rows.len();
        self.entries.clear();
        self.entries.extend(rows.iter().enumerate().map(|(src, &row)| Entry { row, src }));
        if !rows.windows(2).all(|w| w[0] < w[1]) {
            if self.stamp.len() != table_rows {
                self.stamp = vec![0; table_rows];
                self.slot = vec![0; table_rows];
                self.epoch = 0;
            }
            self.epoch = self.epoch.wrapping_add(1);
            if self.epoch == 0 {
                self.stamp.fill(0);
                self.epoch = 1;
            }
            self.sums.clear();
            let mut out = 0usize;
            for i in 0..n {
                let Entry { row, src } = self.entries[i];
                if self.stamp[row] != self.epoch {
                    self.stamp[row] = self.epoch;
                    self.slot[row] = out as u32;
                    self.entries[out] = Entry { row, src };
                    out += 1;
                    continue;
                }
                let first = &mut self.entries[self.slot[row] as usize];
                if first.src < n {
                    // Second occurrence: start a sum from the first.
                    let k = self.sums.len() / dim.max(1);
                    self.sums.extend_from_slice(&values[first.src * dim..(first.src + 1) * dim]);
                    first.src = n + k;
                }
                let start = (first.src - n) * dim;
                let v = &values[src * dim..(src + 1) * dim];
                self.sums[start..start + dim].iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
            self.entries.truncate(out);
        }
        Coalesced { entries: &self.entries, values, sums: &self.sums, n, dim }
    }
}

/// A raw pointer to the start of a table or state buffer, shared across the
/// threads that update distinct rows.
#[derive(Clone, Copy)]
struct RowBase(*mut f32);
// SAFETY: only used to form `&mut` slices of distinct rows (the coalesced row
// list has no duplicates), so no two threads touch the same memory.
unsafe impl Send for RowBase {}
// SAFETY: as above.
unsafe impl Sync for RowBase {}

impl RowBase {
    /// # Safety
    /// `row * dim + dim` must be within the buffer, and no other live
    /// reference may cover that row.
    unsafe fn row<'a>(self, row: usize, dim: usize) -> &'a mut [f32] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(row * dim), dim) }
    }
}

/// Hints the CPU to fetch a row of a buffer (random rows defeat the
/// hardware prefetcher).
#[inline(always)]
fn prefetch_row(base: RowBase, row: usize, dim: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = base.0.wrapping_add(row * dim) as *const i8;
        let mut off = 0;
        while off < dim * 4 {
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

/// Applies `k` to every coalesced row, in parallel when there is enough work.
fn update_rows<K: Kernel<S>, const S: usize>(
    k: &K,
    plan: &Plan,
    parallel: bool,
    grad: &Coalesced<'_>,
    table: &mut [f32],
    state: [&mut [f32]; S],
) -> bool {
    let dim = grad.dim;
    let run = runner::<K, S>(plan.backend);
    let table_base = RowBase(table.as_mut_ptr());
    let bases: [RowBase; S] = state.map(|s| RowBase(s.as_mut_ptr()));
    let task = |chunk: &[Entry]| {
        for (i, &e) in chunk.iter().enumerate() {
            if let Some(ahead) = chunk.get(i + PREFETCH_AHEAD) {
                prefetch_row(table_base, ahead.row, dim);
                bases.iter().for_each(|&b| prefetch_row(b, ahead.row, dim));
            }
            // SAFETY: `e.row < rows` (checked before coalescing) so the row
            // lies in the table and in every state buffer (same shape); rows
            // are unique, so no other task forms a slice of the same row.
            let sl = unsafe {
                Slices { p: table_base.row(e.row, dim), g: grad.values(e), s: bases.map(|b| b.row(e.row, dim)) }
            };
            run(k, sl);
        }
    };
    if parallel {
        grad.entries.par_chunks(ROWS_PER_TASK).for_each(task);
    } else {
        grad.entries.chunks(ROWS_PER_TASK).for_each(task);
    }
    parallel
}

/// What every row-sparse optimizer keeps besides its state: the table shape,
/// the step count, the coalescing buffers and the execution policy.
#[derive(Clone, Debug)]
struct RowSteps {
    rows: usize,
    dim: usize,
    t: u64,
    scratch: Coalescer,
    exec: Exec,
    non_finite: NonFinitePolicy,
}

/// What [`RowSteps::prepare`] decided.
enum Prepared<'a> {
    /// Go on with this plan, parallel or not, and gradient.
    Go(Plan, bool, Coalesced<'a>),
    /// The policy skips this step; report it.
    Skip(StepReport),
}

impl RowSteps {
    /// A checkpoint writer holding the shape and step count.
    fn writer(&self, class: &str, options: serde_json::Value) -> Writer {
        let mut w = Writer::new(class, "sparse", self.t);
        w.meta("rows", self.rows);
        w.meta("dim", self.dim);
        w.meta("param_groups", serde_json::Value::Array(vec![options]));
        w
    }

    /// Opens a sparse checkpoint: the reader, its options, and the shape and
    /// step count it restores.
    fn reader<'a>(bytes: &'a [u8], class: &str) -> Result<(Reader<'a>, serde_json::Value, RowSteps), Error> {
        let r = Reader::open(bytes, class, "sparse")?;
        let (rows, dim): (usize, usize) = (r.parse("rows")?, r.parse("dim")?);
        let groups = r.json("param_groups")?;
        let g = groups.as_array().and_then(|g| g.first()).cloned().ok_or_else(|| bad("no param_groups entry"))?;
        let (mut steps, _) = RowSteps::new(rows, dim)?;
        steps.t = r.step;
        Ok((r, g, steps))
    }

    /// The shape and its element count.
    fn new(rows: usize, dim: usize) -> Result<(RowSteps, usize), Error> {
        let n =
            rows.checked_mul(dim).ok_or(Error::LengthMismatch { what: "table", expected: usize::MAX, actual: rows })?;
        let steps = RowSteps {
            rows,
            dim,
            t: 0,
            scratch: Coalescer::default(),
            exec: Exec::auto(),
            non_finite: NonFinitePolicy::Propagate,
        };
        Ok((steps, n))
    }

    /// One step of an element-wise row kernel: check, policy, coalesce,
    /// update the present rows, advance the step count.
    fn run<K: Kernel<S>, const S: usize>(
        &mut self,
        k: &K,
        table: &mut [f32],
        grad_rows: &[usize],
        grad_values: &[f32],
        state: [&mut [f32]; S],
    ) -> Result<StepReport, Error> {
        let t = self.t + 1;
        let (plan, parallel, grad) = match self.prepare(table.len(), grad_rows, grad_values)? {
            Prepared::Go(plan, parallel, grad) => (plan, parallel, grad),
            Prepared::Skip(report) => return Ok(report),
        };
        update_rows(k, &plan, parallel, &grad, table, state);
        self.t = t;
        Ok(StepReport { backend: plan.backend, parallel, skipped: false })
    }

    /// Checks the gradient against the table (before anything is written),
    /// applies the non-finite policy, resolves the plan and coalesces.
    fn prepare<'a>(
        &'a mut self,
        table_len: usize,
        grad_rows: &[usize],
        grad_values: &'a [f32],
    ) -> Result<Prepared<'a>, Error> {
        Coalescer::check(self.rows, self.dim, table_len, grad_rows, grad_values)?;
        let plan = Plan::new(&self.exec)?;
        if let Some(skipped) = crate::optim::non_finite_guard(self.non_finite, &plan, grad_values, 0)? {
            return Ok(Prepared::Skip(skipped));
        }
        let parallel = plan.exec.chunk_for(grad_values.len()).is_some();
        Ok(Prepared::Go(plan, parallel, self.scratch.coalesce(self.rows, grad_rows, grad_values, self.dim)))
    }
}

/// The accessors every row-sparse optimizer shares through its `RowSteps`.
macro_rules! row_steps_accessors {
    ($($t:ty),*) => {$(
        impl $t {
            /// Sets the execution policy (rows are split across threads when
            /// there is enough work).
            pub fn set_exec(&mut self, exec: Exec) {
                self.steps.exec = exec;
            }

            /// What a step does with NaN/inf gradient values (see
            /// [`NonFinitePolicy`]); with `SkipStep` nothing changes, the step
            /// count included.
            pub fn set_non_finite(&mut self, policy: NonFinitePolicy) {
                self.steps.non_finite = policy;
            }

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
        Self::from_kwargs(&crate::checkpoint::parse_kwargs(kwargs)?)
    }

    fn from_kwargs(kwargs: &serde_json::Value) -> Result<Self, Error> {
        let mut c = SparseAdamConfig::default();
        for (k, v) in crate::checkpoint::kwargs_from_json(kwargs, &[])? {
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

impl Kernel<2> for SparseAdamKernel {
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 2]) {
        let [m, v] = s;
        let g = if self.maximize { -g } else { g };
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
    config: SparseAdamConfig,
    steps: RowSteps,
    exp_avg: Buffer,
    exp_avg_sq: Buffer,
}

impl SparseAdam {
    /// State for a `rows x dim` table.
    ///
    /// # Errors
    /// Invalid hyperparameters.
    pub fn new(config: SparseAdamConfig, rows: usize, dim: usize) -> Result<Self, Error> {
        config.validate()?;
        let (steps, n) = RowSteps::new(rows, dim)?;
        Ok(SparseAdam { config, steps, exp_avg: zeros(n, 0.0), exp_avg_sq: zeros(n, 0.0) })
    }

    /// One step from the gradient rows `grad_rows` with values `grad_values`
    /// (`grad_rows.len() * dim` of them).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] or [`Error::RowOutOfRange`] before anything is written.
    pub fn step(&mut self, table: &mut [f32], grad_rows: &[usize], grad_values: &[f32]) -> Result<StepReport, Error> {
        let t = self.steps.t + 1;
        let (b1, b2) = self.config.betas;
        let k = SparseAdamKernel {
            maximize: self.config.maximize,
            omb1: (1.0 - b1) as f32,
            omb2: (1.0 - b2) as f32,
            eps: self.config.eps as f32,
            neg_step: (-(self.config.lr * (1.0 - pow_step(b2, t)).sqrt() / (1.0 - pow_step(b1, t)))) as f32,
        };
        self.steps.run(&k, table, grad_rows, grad_values, [&mut self.exp_avg, &mut self.exp_avg_sq])
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
    /// The optimizer as safetensors bytes (`exp_avg`, `exp_avg_sq` of shape
    /// `[rows, dim]`, `step`); see [`checkpoint`](crate::checkpoint).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let opts = serde_json::Value::Object(crate::checkpoint::options_json(self.config.options()));
        let mut w = self.steps.writer("SparseAdam", opts);
        let shape = vec![self.steps.rows, self.steps.dim];
        w.tensor("exp_avg", shape.clone(), &self.exp_avg);
        w.tensor("exp_avg_sq", shape, &self.exp_avg_sq);
        w.finish()
    }

    /// A SparseAdam from bytes written by [`to_safetensors`](Self::to_safetensors).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for anything truncated, corrupted or mismatched.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let (r, g, steps) = RowSteps::reader(bytes, "SparseAdam")?;
        let (rows, dim) = (steps.rows, steps.dim);
        let config = SparseAdamConfig::from_kwargs(&g).map_err(|e| bad(format!("hyperparameters: {e}")))?;
        r.expect_count(3)?;
        let (exp_avg, exp_avg_sq) = (r.buffer("exp_avg", &[rows, dim])?, r.buffer("exp_avg_sq", &[rows, dim])?);
        Ok(SparseAdam { config, steps, exp_avg, exp_avg_sq })
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

impl Kernel<1> for SparseAdagradKernel {
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; 1]) {
        let [sum] = s;
        let g = if self.maximize { -g } else { g };
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
    config: crate::AdagradConfig,
    steps: RowSteps,
    sum: Buffer,
}

impl SparseAdagrad {
    /// State for a `rows x dim` table (`sum` starts at
    /// `initial_accumulator_value`).
    ///
    /// # Errors
    /// Invalid hyperparameters; `weight_decay != 0` (torch: "weight_decay
    /// option is not compatible with sparse gradients"); `eps_inside_sqrt`.
    pub fn new(config: crate::AdagradConfig, rows: usize, dim: usize) -> Result<Self, Error> {
        crate::Algorithm::validate(&config)?;
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
        let (steps, n) = RowSteps::new(rows, dim)?;
        Ok(SparseAdagrad { config, steps, sum: zeros(n, config.initial_accumulator_value as f32) })
    }

    /// One step; see [`SparseAdam::step`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] or [`Error::RowOutOfRange`] before anything is written.
    pub fn step(&mut self, table: &mut [f32], grad_rows: &[usize], grad_values: &[f32]) -> Result<StepReport, Error> {
        let t = self.steps.t + 1;
        let k = SparseAdagradKernel {
            maximize: self.config.maximize,
            eps: self.config.eps as f32,
            neg_clr: self.config.neg_clr(t),
        };
        self.steps.run(&k, table, grad_rows, grad_values, [&mut self.sum])
    }

    /// The optimizer as safetensors bytes (`sum` of shape `[rows, dim]`,
    /// `step`; torch class `Adagrad`, layout `sparse`).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let opts = serde_json::Value::Object(crate::checkpoint::options_json(self.config.options()));
        let mut w = self.steps.writer("Adagrad", opts);
        w.tensor("sum", vec![self.steps.rows, self.steps.dim], &self.sum);
        w.finish()
    }

    /// A sparse Adagrad from bytes written by [`to_safetensors`](Self::to_safetensors).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for anything truncated, corrupted or mismatched.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let (r, g, steps) = RowSteps::reader(bytes, "Adagrad")?;
        let crate::AnyConfig::Adagrad(config) = crate::checkpoint::options_from_json("Adagrad", &g, &[])? else {
            return Err(bad("hyperparameters of another kind"));
        };
        r.expect_count(2)?;
        let sum = r.buffer("sum", &[steps.rows, steps.dim])?;
        let mut opt = SparseAdagrad::new(config, 0, 0).map_err(|e| bad(e.to_string()))?;
        opt.steps = steps;
        opt.sum = sum;
        Ok(opt)
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
    lr: f64,
    eps: f64,
    steps: RowSteps,
    acc: Vec<f32>,
}

impl RowWiseAdagrad {
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
        Ok(RowWiseAdagrad { lr, eps, steps, acc: vec![initial_accumulator_value as f32; rows] })
    }

    /// One step; see [`SparseAdam::step`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] or [`Error::RowOutOfRange`] before anything is written.
    pub fn step(&mut self, table: &mut [f32], grad_rows: &[usize], grad_values: &[f32]) -> Result<StepReport, Error> {
        let (lr, eps, dim) = (self.lr, self.eps as f32, self.steps.dim);
        let (parallel, grad) = match self.steps.prepare(table.len(), grad_rows, grad_values)? {
            Prepared::Go(_, parallel, grad) => (parallel, grad),
            Prepared::Skip(report) => return Ok(report),
        };
        let table_base = RowBase(table.as_mut_ptr());
        let acc_base = RowBase(self.acc.as_mut_ptr());
        let one = |e: &Entry| {
            let g = grad.values(*e);
            // SAFETY: e.row < rows (checked); rows are unique, so each thread
            // owns its table row and its accumulator.
            let (p, acc) = unsafe { (table_base.row(e.row, dim), &mut acc_base.row(e.row, 1)[0]) };
            let mean = if dim == 0 { 0.0 } else { g.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / dim as f64 };
            *acc += mean as f32;
            let mult = (-lr / (acc.sqrt() + eps) as f64) as f32;
            p.iter_mut().zip(g).for_each(|(p, g)| *p += mult * g);
        };
        if parallel {
            grad.entries.par_iter().with_min_len(ROWS_PER_TASK).for_each(one);
        } else {
            grad.entries.iter().for_each(one);
        }
        self.steps.t += 1;
        Ok(StepReport { backend: crate::Backend::Scalar, parallel, skipped: false })
    }

    /// The optimizer as safetensors bytes (per-row `sum` of shape `[rows]`,
    /// `step`; class `RowWiseAdagrad`, layout `sparse`).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let mut w = self.steps.writer("RowWiseAdagrad", serde_json::json!({"lr": self.lr, "eps": self.eps}));
        w.tensor("sum", vec![self.steps.rows], &self.acc);
        w.finish()
    }

    /// A row-wise AdaGrad from bytes written by [`to_safetensors`](Self::to_safetensors).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for anything truncated, corrupted or mismatched.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let (r, g, steps) = RowSteps::reader(bytes, "RowWiseAdagrad")?;
        let lr = g["lr"].as_f64().ok_or_else(|| bad("lr missing"))?;
        let eps = g["eps"].as_f64().ok_or_else(|| bad("eps missing"))?;
        r.expect_count(2)?;
        let acc = r.f32s("sum", &[steps.rows])?;
        let mut opt = RowWiseAdagrad::new(lr, eps, 0.0, 0, steps.dim).map_err(|e| bad(e.to_string()))?;
        opt.steps = steps;
        opt.acc = acc;
        Ok(opt)
    }

    /// The per-row accumulators.
    pub fn acc(&self) -> &[f32] {
        &self.acc
    }
}
