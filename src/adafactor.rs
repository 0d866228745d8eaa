//! Adafactor (Shazeer and Stern, *Adafactor: Adaptive Learning Rates with
//! Sublinear Memory Cost*, 2018), as `torch.optim.Adafactor` (torch 2.5 and
//! later) defines it: its names, defaults, `ValueError` conditions, state
//! names and arithmetic.
//!
//! Adafactor is not element-wise, so it is not one of the registry's
//! kernels ([`crate::optim`]): a parameter of two or more dimensions keeps a
//! *factored* second moment, one value per row (`row_var`, shape
//! `[.., rows, 1]`) and one per column (`col_var`, `[.., 1, cols]`) of its
//! last two dimensions, and every step needs whole-tensor reductions (the
//! parameter's RMS before the step, the update's RMS before it is applied).
//! So an [`Adafactor`] is made for one tensor *shape*; a vector (or a 0-d
//! tensor) keeps an unfactored `variance` like Adam's `exp_avg_sq`.
//!
//! One step, with `t` the step number and everything as torch evaluates it
//! (hyperparameter arithmetic in f64 as Python does, tensors in f32):
//! ```text
//! w      = t ^ beta2_decay                              (1 - beta2_t)
//! rho    = min(lr, 1 / sqrt(t))
//! alpha  = max(eps2, ||p|| / sqrt(numel)) * rho         ||p|| before the step
//! p      = p * (1 - lr * weight_decay)                  (only when weight_decay != 0)
//! matrix: row_var = lerp(row_var, ||g_row||^2 / cols, w)
//!         col_var = lerp(col_var, ||g_col||^2 / rows, w)
//!         v = row_var * col_var / max(mean(row_var), eps1)
//! vector: variance = lerp(variance, g * g, w);  v = variance
//! u      = g * (1 / sqrt(max(v, eps1^2)))
//! p      = fma(-alpha / max(1, ||u|| / (sqrt(numel) * d)), u, p)
//! ```
//! `eps1` defaults to f32's machine epsilon (torch's `finfo(dtype).eps` for
//! `eps = (None, 1e-3)`); `maximize` negates the gradient. torch squares each
//! row and column norm after rounding it to f32 (`vector_norm(..).square_()`),
//! and so does this; torch's `lerp_` and `add_(.., alpha=)` are fused
//! multiply-adds on CPU, as here. The norms are summed in f64 (torch sums
//! them in f32 in an order of its own), so a step can differ from torch's in
//! the last bit of a norm; the golden files measure the result (the
//! `optim_db` set in `tests/golden_adafactor`).
//!
//! Every reduction runs over a fixed partition of the tensor (blocks of rows,
//! blocks of columns, fixed-size chunks) whose partial sums are combined in
//! one order, so the result is bitwise the same serial or parallel, for any
//! rayon thread count. The per-element passes are lane kernels driven through
//! the crate's one backend `dispatch` (scalar, `wide`, AVX2), bitwise equal.
//!
//! A step makes three passes: the squares (parameters, rows, columns); the
//! update `u` and `sum(u^2)`; the parameter update. The last needs `u` again:
//! it is either stored by the second pass and read back, or recomputed (two
//! divisions and a square root per element), as [`UpdateBuffer`] says; the
//! same bits either way. By default tensors of up to [`AUTO_UPDATE_BUFFER`]
//! elements store it in a buffer of the calling thread's (1.2x to 1.4x
//! faster there), larger ones recompute (storing measured no faster at DRAM
//! sizes, and it would cost 4 bytes per parameter).
//!
//! A matrix of fewer rows than twice the threads, each longer than a task
//! (`1x1048576`), takes a piece of a row per task in the last two passes:
//! a row's updates in parallel pieces, then the row's sum of squares over
//! the stored updates in the row's one order (without an update buffer, a
//! window of a row at a time), so the bits do not change. A first-pass
//! task that holds a row's or a column's whole sum interpolates that
//! statistic itself. A matrix of one column takes a row per lane.
//!
//! Matrices of at most 256 rows and 16384 elements (a conv weight's 3x3
//! kernels, attention heads) are one task of each pass, so a batch of them
//! is stepped a group of whole matrices (about 16384 elements) per task:
//! the first two passes of a matrix back to back while it is in cache, no
//! allocation or dispatch per matrix, each matrix's sums kept apart and
//! added in batch order, as the general path does: the same bits.
//!
//! [`Adafactor`] has the guards of [`Optimizer`](crate::Optimizer) (the
//! non-finite policy, the loss scale, gradient clipping; all off by
//! default, as torch's Adafactor has none: a NaN in a gradient propagates as
//! in torch); [`step_slices`] has none. It is in [`AnyConfig`](crate::AnyConfig)
//! and [`AnyOptimizer`](crate::AnyOptimizer) by its torch name.
//!
//! `bf16` and `f16` parameters and gradients ([`Adafactor::step_mixed`],
//! [`step_slices_mixed`]) are stepped as `f32` with `f32` state (it is
//! sublinear for matrices), the parameters rounded to nearest even (or
//! `bf16` stochastically), so a half-precision step has the bits of the
//! `f32` step on the widened values. Without gradient scaling, clipping, a
//! non-finite scan or stochastic rounding, the passes read the 16-bit
//! values in place, widening them in registers, and the last pass rounds
//! each parameter as it writes it: 2 bytes per element read or written
//! instead of 4. Otherwise they are widened exactly into scratch buffers
//! first (two more passes and 4 bytes per element for each widened buffer:
//! a thread keeps its pair between steps up to [`KEPT_WIDENED`] elements
//! each, larger ones are made for the step) and rounded back after.
//! Not supported: `bf16` or 8-bit state, and the multi-tensor entry points
//! (one [`Adafactor`] per tensor).

use rayon::prelude::*;
use serde_json::{Value, json};

use crate::error::{finite, next_step};
use crate::math::Lerp;
use std::ops::Range;

use crate::optim::Guards;
use crate::simd::{F32Vec, LaneOp, dispatch};
use crate::storage::{
    Elem, Exact, Grads, ParamRounding, Params, TILE, bf16, f16, narrow, narrow_bf16_stochastic, widen,
};
use crate::{Backend, Error, Exec, StepOptions, StepReport};

/// Hyperparameters of [`Adafactor`], with `torch.optim.Adafactor`'s names
/// and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdafactorConfig {
    /// The maximum relative step size `rho` and the weight-decay factor.
    /// Default `1e-2`.
    pub lr: f64,
    /// The exponent of `1 - beta2_t = t ^ beta2_decay`; `<= 0`. Default `-0.8`.
    pub beta2_decay: f64,
    /// `(eps1, eps2)`: `eps1` floors the second-moment estimate (`None`:
    /// f32's machine epsilon, `2^-23`), `eps2` the parameter RMS that scales
    /// the step. Default `(None, 1e-3)`. An `eps1` whose square rounds to 0
    /// in f32 (below about `1e-19`, `0` included) lets an exactly zero
    /// gradient divide 0 by 0: NaN, as in torch.
    pub eps: (Option<f64>, f64),
    /// The update-clipping threshold: an update whose RMS exceeds `d` is
    /// scaled down to it. `>= 1`. Default `1`.
    pub d: f64,
    /// Decoupled weight decay: parameters shrink by `lr * weight_decay`
    /// before each step. Default `0`.
    pub weight_decay: f64,
    /// Maximize the objective (the gradient is negated). Default `false`.
    pub maximize: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        AdafactorConfig { lr: 1e-2, beta2_decay: -0.8, eps: (None, 1e-3), d: 1.0, weight_decay: 0.0, maximize: false }
    }
}

fn invalid(name: &'static str, value: f64, requirement: &'static str) -> Error {
    Error::InvalidHyperparameter { name, value, requirement }
}

impl AdafactorConfig {
    /// The torch class name, `"Adafactor"`.
    pub const TORCH_CLASS: &'static str = "Adafactor";

    /// Checks torch's conditions (`lr >= 0`, `beta2_decay <= 0`,
    /// `eps1 >= 0`, `eps2 >= 0`, `d >= 1`, `weight_decay >= 0`) and that
    /// every value is finite.
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`] naming the first bad field.
    pub fn validate(&self) -> Result<(), Error> {
        let check = |name, v: f64, ok: bool, req| if v.is_finite() && ok { Ok(()) } else { Err(invalid(name, v, req)) };
        check("lr", self.lr, self.lr >= 0.0, "finite and >= 0")?;
        check("beta2_decay", self.beta2_decay, self.beta2_decay <= 0.0, "finite and <= 0")?;
        if let Some(e1) = self.eps.0 {
            check("eps[0]", e1, e1 >= 0.0, "finite and >= 0")?;
        }
        check("eps[1]", self.eps.1, self.eps.1 >= 0.0, "finite and >= 0")?;
        check("d", self.d, self.d >= 1.0, "finite and >= 1")?;
        check("weight_decay", self.weight_decay, self.weight_decay >= 0.0, "finite and >= 0")
    }

    /// `eps1` as the step uses it: the configured value, or f32's machine
    /// epsilon for `None`.
    pub fn eps1(&self) -> f64 {
        self.eps.0.unwrap_or(f64::from(f32::EPSILON))
    }

    /// The configuration from torch's keyword arguments as a JSON object
    /// (`{"lr": 0.01, "eps": [null, 0.001], "d": 1.5}`), or one entry of a
    /// torch optimizer's `param_groups` as `json.dumps` writes it (its
    /// `params` and a scheduler's `initial_lr` are ignored); absent keys take
    /// torch's defaults. `foreach` (`null` or a flag) is accepted and
    /// ignored: it picks torch's implementation, not the arithmetic.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for an unknown key or a value of the wrong
    /// type, [`Error::InvalidHyperparameter`] for a value out of range.
    pub fn from_torch_kwargs(kwargs: &Value) -> Result<Self, Error> {
        let mut c = AdafactorConfig::default();
        // torch's `eps = (None, eps2)` has no `HyperValue`: read it here.
        let eps = kwargs.get("eps").filter(|e| e.get(0).is_some_and(Value::is_null));
        if let Some(e) = eps {
            let e2 = match e.as_array().map(Vec::as_slice) {
                Some([_, e2]) => e2.as_f64(),
                _ => None,
            };
            let reason = "must be [eps1 or null, eps2]";
            c.eps = (None, e2.ok_or(Error::InvalidOption { name: "eps".into(), reason })?);
        }
        let skip: &[&str] = if eps.is_some() { &["eps"] } else { &[] };
        for (k, v) in crate::keywords::kwargs_from_json(kwargs, skip)? {
            c.set_option(k, &v)?;
        }
        c.validate()?;
        Ok(c)
    }

    /// torch's keyword arguments for this configuration, as a JSON object.
    pub fn torch_kwargs(&self) -> Value {
        json!({
            "lr": self.lr,
            "beta2_decay": self.beta2_decay,
            "eps": [self.eps.0, self.eps.1],
            "d": self.d,
            "weight_decay": self.weight_decay,
            "maximize": self.maximize,
        })
    }
}

// `eps = (None, eps2)` is `HyperValue::Pair(f32::EPSILON, eps2)` in
// `options()` (the same arithmetic: `eps1()`); a pair sets `Some(eps1)`.
crate::keywords::torch_options!(AdafactorConfig { lr, beta2_decay, eps, d, weight_decay, maximize });

/// The sizes a tensor of `shape` needs: `(elements, row_var, col_var,
/// variance)` (`row_var`/`col_var` for two or more dimensions, else
/// `variance`; the unused ones 0), or `None` if a size overflows.
pub fn state_sizes(shape: &[usize]) -> Option<(usize, usize, usize, usize)> {
    let bytes = |n: usize| n.checked_mul(4).filter(|&b| b <= isize::MAX as usize).map(|_| n);
    let count = |dims: &[usize]| dims.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).and_then(bytes);
    let n = count(shape)?;
    // A tensor with a zero dimension is empty, but its factors need not be.
    Some(match shape.len() {
        k if k >= 2 => {
            let b = count(&shape[..k - 2])?;
            (n, bytes(b.checked_mul(shape[k - 2])?)?, bytes(b.checked_mul(shape[k - 1])?)?, 0)
        }
        _ => (n, 0, 0, n),
    })
}

/// torch's shapes of the state tensors of a tensor of `shape`, by state name:
/// `row_var` `[.., rows, 1]` and `col_var` `[.., 1, cols]`, or `variance`.
pub(crate) fn state_shapes(shape: &[usize]) -> Vec<(&'static str, Vec<usize>)> {
    let k = shape.len();
    if k >= 2 {
        let mut row = shape.to_vec();
        row[k - 1] = 1;
        let mut col = shape.to_vec();
        col[k - 2] = 1;
        vec![("row_var", row), ("col_var", col)]
    } else {
        vec![("variance", shape.to_vec())]
    }
}

/// The rows, columns and leading (batch) count of a factored shape, or
/// `None` for a vector or 0-d tensor.
fn factored(shape: &[usize]) -> Option<(usize, usize, usize)> {
    let k = shape.len();
    (k >= 2).then(|| (shape[..k - 2].iter().product(), shape[k - 2], shape[k - 1]))
}

/// Elements per reduction chunk: partial sums over chunks of this size are
/// combined in chunk order, whatever runs them.
const CHUNK: usize = 1 << 14;

/// `sum(x^2)` in f64 over fixed chunks (8 accumulators each, then chunk
/// partials in order): the same bits serial or parallel.
#[inline(always)]
fn sumsq<T: Elem + Exact>(x: &[T], par: bool, lanes: Lanes) -> f64 {
    let chunk = |c: &[T]| lanes.sq_sum(c);
    let parts: Vec<f64> =
        if par { x.par_chunks(CHUNK).map(chunk).collect() } else { x.chunks(CHUNK).map(chunk).collect() };
    parts.iter().sum()
}

/// An f32 tensor's 2-norm as torch returns it from `norm(2).item()`: the
/// norm rounded to f32, then widened.
fn norm(sumsq: f64) -> f64 {
    f64::from(sumsq.sqrt() as f32)
}

/// torch's `clamp_min` on f32: NaN stays NaN.
#[inline(always)]
fn clamp_min(x: f32, lo: f32) -> f32 {
    if x < lo { lo } else { x }
}

/// Python's `max(a, b)`: `b` only when it is greater (a NaN `b` gives `a`).
fn py_max(a: f64, b: f64) -> f64 {
    if b > a { b } else { a }
}

/// Python's `min(a, b)`: `b` only when it is smaller.
fn py_min(a: f64, b: f64) -> f64 {
    if b < a { b } else { a }
}

/// What every element's update needs besides its own values.
#[derive(Clone, Copy)]
struct Factors {
    neg: bool,
    eps1: f32,
    eps1_sq: f32,
}

/// `torch.optim.Adafactor` for one tensor of a given shape: owns the state
/// (`row_var`/`col_var` or `variance`) and the step count; parameters and
/// gradients are borrowed each step.
///
/// ```
/// use adaoptim::adafactor::{Adafactor, AdafactorConfig};
/// let mut opt = Adafactor::new(AdafactorConfig::default(), &[2, 3]).unwrap();
/// let mut w = vec![0.5f32; 6];
/// opt.step(&mut w, &[0.1, -0.2, 0.3, 0.0, 1.0, -1.0]).unwrap();
/// assert_eq!(opt.row_var().len(), 2);
/// assert_eq!(opt.col_var().len(), 3);
/// ```
///
/// The execution policy ([`set_exec`](Self::set_exec)). Threads:
/// [`Parallel::Auto`](crate::Parallel::Auto) (the default: rayon's pool from
/// [`PAR_THRESHOLD`](crate::PAR_THRESHOLD) elements), `Serial`, or `Chunks`
/// (always through rayon; the chunk size is not used, the partition is
/// fixed). Backend: `Scalar`, `Wide` and `Avx2` run the per-element passes
/// and the f64 reductions on their own lanes through the crate's one backend
/// dispatch; `Avx512` runs the AVX2 lanes (measured faster for these row
/// passes); a forced backend this CPU lacks fails the next step with
/// [`Error::BackendUnavailable`]. Every policy and thread count gives the
/// same bits.
///
/// The guards of [`Optimizer`](crate::Optimizer) apply as there (see
/// [`step`](Self::step)): the non-finite policy, the loss scale, clipping to a
/// total gradient norm; none is on by default, as in torch.
#[derive(Clone, Debug)]
pub struct Adafactor {
    pub(crate) config: AdafactorConfig,
    pub(crate) shape: Vec<usize>,
    n: usize,
    pub(crate) t: u64,
    pub(crate) row_var: Vec<f32>,
    pub(crate) col_var: Vec<f32>,
    pub(crate) variance: Vec<f32>,
    exec: Exec,
    guards: Guards,
    /// Stochastic rounding of `bf16` parameters in `step_mixed` (its seed).
    sr_seed: Option<u64>,
}

impl Adafactor {
    /// A fresh optimizer (step 0, zero state) for a tensor of `shape`
    /// (row-major; `[]` is a 0-d tensor of one element).
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`]; [`Error::TooLarge`] if the element
    /// count overflows.
    pub fn new(config: AdafactorConfig, shape: &[usize]) -> Result<Self, Error> {
        Self::with_state(config, shape, 0, Vec::new())
    }

    /// An optimizer at step `t` holding `state`, torch-named buffers
    /// (`row_var`, `col_var`, `variance`) of this shape's sizes, moved in;
    /// a buffer not given is zeros (what a checkpoint loader builds, with no
    /// zeroed copy of a loaded buffer allocated first).
    ///
    /// # Errors
    /// As [`new`](Self::new); [`Error::LengthMismatch`] for a buffer of
    /// another size.
    pub(crate) fn with_state(
        config: AdafactorConfig,
        shape: &[usize],
        t: u64,
        mut state: Vec<(&str, Vec<f32>)>,
    ) -> Result<Self, Error> {
        config.validate()?;
        let (n, rl, cl, vl) = state_sizes(shape).ok_or(Error::TooLarge { what: "params", elements: usize::MAX })?;
        let mut take = |name: &'static str, len: usize| match state.iter().position(|(k, _)| *k == name) {
            Some(i) => {
                let v = std::mem::take(&mut state[i].1);
                crate::error::check_len(name, len, v.len()).map(|()| v)
            }
            None => Ok(vec![0.0; len]),
        };
        let (row_var, col_var, variance) = (take("row_var", rl)?, take("col_var", cl)?, take("variance", vl)?);
        Ok(Adafactor {
            config,
            shape: shape.to_vec(),
            n,
            t,
            row_var,
            col_var,
            variance,
            exec: Exec::auto(),
            guards: Guards::default(),
            sr_seed: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AdafactorConfig {
        &self.config
    }

    /// Replaces the configuration (state and step count kept).
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`]; nothing changes then.
    pub fn set_config(&mut self, config: AdafactorConfig) -> Result<(), Error> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    crate::optim::controls!(exec; guards);

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Sets the learning rate (what a schedule writes).
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`] for a negative or non-finite value;
    /// nothing changes then.
    pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
        finite("lr", lr)?;
        self.set_config(AdafactorConfig { lr, ..self.config })
    }

    /// Rounds `bf16` parameters in [`step_mixed`](Self::step_mixed)
    /// stochastically with this seed (`None`: to nearest even, the
    /// default): the core's stream ([`ParamRounding::Stochastic`]) of this
    /// seed at the step being taken, so the bits are
    /// [`step_slices_mixed`]'s with `ParamRounding::Stochastic { seed,
    /// offset: 0 }` and the same for any thread count. `f32` and `f16`
    /// parameters round as before. A control, like the execution policy:
    /// checkpoints do not hold it (they hold the step count the stream
    /// continues from).
    pub fn set_stochastic_rounding(&mut self, seed: Option<u64>) {
        self.sr_seed = seed;
    }

    /// The stochastic-rounding seed, if set.
    pub fn stochastic_rounding(&self) -> Option<u64> {
        self.sr_seed
    }

    /// The tensor shape this optimizer was made for.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Elements of the tensor.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// Whether the second moment is factored (two or more dimensions).
    pub fn is_factored(&self) -> bool {
        factored(&self.shape).is_some()
    }

    /// The row factor (`[.., rows, 1]` flattened); empty for a vector.
    pub fn row_var(&self) -> &[f32] {
        &self.row_var
    }

    /// The column factor (`[.., 1, cols]` flattened); empty for a vector.
    pub fn col_var(&self) -> &[f32] {
        &self.col_var
    }

    /// The unfactored second moment of a vector; empty for a matrix.
    pub fn variance(&self) -> &[f32] {
        &self.variance
    }

    /// torch's shapes of the state tensors, by state name.
    pub(crate) fn state_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        state_shapes(&self.shape)
    }

    /// The buffer of state `name` (torch's name: `row_var` and `col_var`
    /// for a tensor of two or more dimensions, `variance` for a vector), or
    /// `None` if this tensor has no such state.
    pub fn state(&self, name: &str) -> Option<&[f32]> {
        match name {
            "row_var" | "col_var" if self.is_factored() => {
                Some(if name == "row_var" { &self.row_var } else { &self.col_var })
            }
            "variance" if !self.is_factored() => Some(&self.variance),
            _ => None,
        }
    }

    /// The names of this tensor's state buffers, torch's `state_dict` names.
    pub fn state_names(&self) -> &'static [&'static str] {
        if self.is_factored() { &["row_var", "col_var"] } else { &["variance"] }
    }

    /// One step of `torch.optim.Adafactor` on `params` with `grads` (both
    /// row-major, of the optimizer's shape), threads as
    /// [`set_exec`](Self::set_exec) says. The guards run first, as in
    /// [`Optimizer::step`](crate::Optimizer::step): the non-finite policy
    /// (torch's Adafactor has none; `Propagate`, the default, is its
    /// behaviour), then the loss scale and the clipping factor, which a step
    /// multiplies into a scaled copy of the gradients when either is set
    /// (Adafactor's passes read each gradient up to three times; the copy is
    /// one more pass and 4 bytes per parameter for that step).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`], [`Error::StepLimit`],
    /// [`Error::BackendUnavailable`], [`Error::NonFiniteGradient`] under
    /// [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error); nothing is
    /// modified then.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) -> Result<StepReport, Error> {
        self.step_mixed(Params::F32(params), Grads::F32(grads))
    }

    /// [`step`](Self::step) for parameters and gradients in any storage
    /// ([`Params`], [`Grads`]: `f32`, `bf16` or `f16`; the state stays
    /// `f32`): the values are widened exactly, stepped as `f32` (the bits
    /// [`step`](Self::step) gives on the widened values) and half-precision
    /// parameters rounded to nearest, ties to even (an `f16` past 65504
    /// becomes infinite). With the guards off and no stochastic rounding the
    /// passes read and write the storage in place; otherwise the values are
    /// widened into copies of 4 bytes per element each (see the
    /// [module](self) docs). A step that the non-finite policy skips leaves
    /// the parameters' bits as they were.
    ///
    /// # Errors
    /// As [`step`](Self::step); nothing is modified then.
    pub fn step_mixed(&mut self, params: Params<'_>, grads: Grads<'_>) -> Result<StepReport, Error> {
        self.step_mixed_inner(params, grads, None)
    }

    /// `sum(g^2)` of `grads` unscaled by the loss scale (f64, deterministic):
    /// this tensor's part of a global gradient norm over many tensors, for
    /// [`step_with_grad_norm`](Self::step_with_grad_norm).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`]; [`Error::BackendUnavailable`].
    pub fn grad_sum_of_squares(&self, grads: &[f32]) -> Result<f64, Error> {
        self.grad_sum_of_squares_mixed(Grads::F32(grads))
    }

    /// [`grad_sum_of_squares`](Self::grad_sum_of_squares) of gradients in
    /// any storage: the bits it gives on the exactly widened values.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`]; [`Error::BackendUnavailable`].
    pub fn grad_sum_of_squares_mixed(&self, grads: Grads<'_>) -> Result<f64, Error> {
        crate::error::check_len("grads", self.n, grads.len())?;
        let plan = self.guards.plan(&self.exec)?;
        Ok(crate::clip::grads_sum(&plan, grads))
    }

    /// [`step`](Self::step) for one tensor of a clipped model whose
    /// gradient norm is global: `total_norm` is the square root of the sum of
    /// every tensor's [`grad_sum_of_squares`](Self::grad_sum_of_squares),
    /// and the clipping factor comes from it instead of from this tensor's
    /// gradients (as `torch.nn.utils.clip_grad_norm_` over all parameters).
    /// A non-finite `total_norm` goes to the non-finite policy as in `step`.
    ///
    /// # Errors
    /// As [`step`](Self::step); [`Error::IncompatibleConfig`] if clipping is
    /// off. Nothing is modified then.
    pub fn step_with_grad_norm(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        total_norm: f64,
    ) -> Result<StepReport, Error> {
        self.step_mixed_with_grad_norm(Params::F32(params), Grads::F32(grads), total_norm)
    }

    /// [`step_with_grad_norm`](Self::step_with_grad_norm) for parameters and
    /// gradients in any storage, as [`step_mixed`](Self::step_mixed).
    ///
    /// # Errors
    /// As [`step_with_grad_norm`](Self::step_with_grad_norm); nothing is
    /// modified then.
    pub fn step_mixed_with_grad_norm(
        &mut self,
        params: Params<'_>,
        grads: Grads<'_>,
        total_norm: f64,
    ) -> Result<StepReport, Error> {
        if self.guards.max_grad_norm.is_none() {
            return Err(Error::IncompatibleConfig { reason: "a gradient norm was given but clipping is off" });
        }
        self.step_mixed_inner(params, grads, Some(total_norm))
    }

    fn step_mixed_inner(
        &mut self,
        mut params: Params<'_>,
        grads: Grads<'_>,
        given_norm: Option<f64>,
    ) -> Result<StepReport, Error> {
        crate::error::check_len("params", self.n, params.len())?;
        crate::error::check_len("grads", self.n, grads.len())?;
        if let (Params::F32(p), Grads::F32(g)) = (&mut params, grads) {
            return self.step_inner(p, g, given_norm);
        }
        let sr = match self.sr_seed {
            Some(seed) if params.dtype() == crate::storage::Dtype::Bf16 => {
                let rounding = ParamRounding::Stochastic { seed, offset: 0 };
                crate::optim::rounding_key(rounding, params.dtype(), next_step(self.t)?)?
            }
            _ => None,
        };
        let backend = self.exec.resolve_backend()?;
        let par = self.exec.chunk_for(self.n).is_some();
        if sr.is_none() && given_norm.is_none() && self.guards.is_off() {
            // Nothing to scan or scale: the passes read the storage in place.
            let t = next_step(self.t)?;
            let state = AdafactorState {
                row_var: &mut self.row_var,
                col_var: &mut self.col_var,
                variance: &mut self.variance,
                update: UpdateBuffer::Auto,
            };
            step_fused(&self.config, &self.shape, t, params, grads, state, self.exec)?;
            self.t = t;
            return Ok(StepReport { backend: lanes_backend(backend), parallel: self.n > 0 && par, skipped: false });
        }
        with_f32(params, grads, sr, backend, par, |p, g| {
            let report = self.step_inner(p, g, given_norm)?;
            Ok((report, !report.skipped))
        })
    }

    fn step_inner(&mut self, params: &mut [f32], grads: &[f32], given_norm: Option<f64>) -> Result<StepReport, Error> {
        crate::error::check_len("params", self.n, params.len())?;
        crate::error::check_len("grads", self.n, grads.len())?;
        let t = next_step(self.t)?;
        let plan = match self.guards.begin(&self.exec, grads, given_norm)? {
            Ok(plan) => plan,
            Err(skipped) => return Ok(skipped),
        };
        let state = AdafactorState {
            row_var: &mut self.row_var,
            col_var: &mut self.col_var,
            variance: &mut self.variance,
            update: UpdateBuffer::Auto,
        };
        let options = StepOptions {
            exec: self.exec,
            grad_scale: self.guards.grad_scale,
            clip_coef: plan.clip,
            ..Default::default()
        };
        step_slices_with(&self.config, &self.shape, t, params, grads, state, &options)?;
        self.t = t;
        let parallel = self.n > 0 && self.exec.chunk_for(self.n).is_some();
        Ok(StepReport { backend: lanes_backend(plan.backend), parallel, skipped: false })
    }
}

/// The backend whose lanes an Adafactor step runs: AVX-512 machines run the
/// AVX2 lanes (measured faster here for these short row passes: the
/// eight-lane accumulators match `accumulate`'s vectorized shape); every
/// backend gives the same bits.
fn lanes_backend(resolved: Backend) -> Backend {
    if resolved == Backend::Avx512 { Backend::Avx2 } else { resolved }
}

/// The state of one tensor, borrowed: `row_var` (`[.., rows, 1]` flattened)
/// and `col_var` (`[.., 1, cols]`) for two or more dimensions, else
/// `variance` (the tensor's size); the unused ones empty.
#[derive(Debug)]
pub struct AdafactorState<'a> {
    /// The row factor.
    pub row_var: &'a mut [f32],
    /// The column factor.
    pub col_var: &'a mut [f32],
    /// The unfactored second moment.
    pub variance: &'a mut [f32],
    /// Where the step keeps each element's update between its last two
    /// passes (scratch, not state; the same bits whichever).
    pub update: UpdateBuffer<'a>,
}

/// Where an Adafactor step keeps each element's update `u` between its
/// second pass (which needs `sum(u^2)`) and its last (which applies `u`).
/// Stored, the last pass reads it back instead of recomputing it: two
/// divisions and a square root per element fewer. Every choice gives the
/// same bits.
#[derive(Debug, Default)]
pub enum UpdateBuffer<'a> {
    /// A buffer of the calling thread's for tensors of up to
    /// [`AUTO_UPDATE_BUFFER`] elements, recomputed above (where storing
    /// measured no faster). The default.
    #[default]
    Auto,
    /// Recompute: no memory beyond the state.
    Recompute,
    /// This caller-owned scratch of the parameters' length; its contents
    /// before and after a step mean nothing.
    Given(&'a mut [f32]),
}

/// [`step_slices`] with a loss scale divided out of the gradients and a
/// clipping factor multiplied in (`options.grad_scale`,
/// `options.clip_coef`, as [`step_slices_with`](crate::step_slices_with)
/// applies them; the factor of a model's global norm comes from
/// [`clip::clip_coef`](crate::clip::clip_coef)), in `options.exec`: the bits
/// of an [`Adafactor`] with that `grad_scale` whose clipping produced that
/// factor. The gradients are unscaled and clipped into a temporary copy
/// first (the caller's are not written).
///
/// # Errors
/// As [`step_slices`]; [`Error::InvalidHyperparameter`] for a zero or
/// non-finite `grad_scale` or a negative or non-finite `clip_coef`;
/// [`Error::Storage`] for stochastic rounding (the parameters are `f32`).
/// Nothing is modified then.
pub fn step_slices_with(
    config: &AdafactorConfig,
    shape: &[usize],
    t: u64,
    params: &mut [f32],
    grads: &[f32],
    state: AdafactorState<'_>,
    options: &StepOptions,
) -> Result<(), Error> {
    crate::optim::check_options(options)?;
    let plan = crate::optim::options_plan(options)?;
    if options.param_rounding != crate::storage::ParamRounding::Nearest {
        return Err(Error::Storage {
            what: "params",
            dtype: crate::storage::Dtype::F32,
            reason: "stochastic rounding applies to bf16 parameters only",
        });
    }
    let pre = plan.pre(false);
    if pre.is_identity() {
        return step_slices(config, shape, t, params, grads, state, options.exec);
    }
    let mut g = grads.to_vec();
    let tile = |c: &mut [f32]| crate::driver::pre_tile(pre, c);
    if options.exec.chunk_for(g.len()).is_some() {
        g.par_chunks_mut(CHUNK).for_each(tile);
    } else {
        tile(&mut g);
    }
    step_slices(config, shape, t, params, &g, state, options.exec)
}

/// [`step_slices_with`] for parameters and gradients in any storage
/// ([`Params`], [`Grads`]: `f32`, `bf16` or `f16`; the state stays `f32`):
/// the values are widened exactly, stepped as `f32` (the bits
/// [`step_slices_with`] gives on the widened values) and half-precision
/// parameters rounded back as `options.param_rounding` says (to nearest,
/// ties to even, by default; `bf16` parameters may take stochastic
/// rounding, keyed by (seed, `t`, element index) as
/// [`step_mixed`](crate::step_mixed) keys it). Without `grad_scale`,
/// `clip_coef` or stochastic rounding the passes read and write the
/// storage in place; with them the values are widened into copies of 4
/// bytes per element each (see the [module](self) docs). `f32` parameters
/// and gradients are stepped in place.
///
/// # Errors
/// As [`step_slices_with`]; [`Error::Storage`] for stochastic rounding of
/// parameters that are not `bf16`. Nothing is modified then.
pub fn step_slices_mixed(
    config: &AdafactorConfig,
    shape: &[usize],
    t: u64,
    mut params: Params<'_>,
    grads: Grads<'_>,
    state: AdafactorState<'_>,
    options: &StepOptions,
) -> Result<(), Error> {
    let sr = crate::optim::rounding_key(options.param_rounding, params.dtype(), t)?;
    let n = state_sizes(shape).ok_or(Error::TooLarge { what: "params", elements: usize::MAX })?.0;
    crate::error::check_len("params", n, params.len())?;
    crate::error::check_len("grads", n, grads.len())?;
    let backend = options.exec.resolve_backend()?;
    let par = options.exec.chunk_for(n).is_some();
    let nearest = StepOptions { param_rounding: ParamRounding::Nearest, ..*options };
    if let (Params::F32(p), Grads::F32(g)) = (&mut params, grads) {
        return step_slices_with(config, shape, t, p, g, state, options);
    }
    crate::optim::check_options(options)?;
    if sr.is_none() && options.grad_scale.is_none() && options.clip_coef.is_none() {
        return step_fused(config, shape, t, params, grads, state, options.exec);
    }
    with_f32(params, grads, sr, backend, par, |p, g| {
        step_slices_with(config, shape, t, p, g, state, &nearest).map(|()| ((), true))
    })
}

/// The step on parameters and gradients in their storage, read and written
/// in place by the passes: no widened copies. The bits of the
/// `f32` step on the widened values, the parameters rounded to nearest even
/// once (what [`with_f32`] gives without stochastic rounding).
fn step_fused(
    config: &AdafactorConfig,
    shape: &[usize],
    t: u64,
    params: Params<'_>,
    grads: Grads<'_>,
    state: AdafactorState<'_>,
    exec: Exec,
) -> Result<(), Error> {
    fn with_grads<P: Elem + Exact>(
        config: &AdafactorConfig,
        shape: &[usize],
        t: u64,
        p: &mut [P],
        grads: Grads<'_>,
        state: AdafactorState<'_>,
        exec: Exec,
    ) -> Result<(), Error> {
        match grads {
            Grads::F32(g) => step_typed(config, shape, t, p, g, state, exec),
            Grads::Bf16(g) => step_typed(config, shape, t, p, g, state, exec),
            Grads::F16(g) => step_typed(config, shape, t, p, g, state, exec),
        }
    }
    match params {
        Params::F32(p) => with_grads(config, shape, t, p, grads, state, exec),
        Params::Bf16(p) => with_grads(config, shape, t, p, grads, state, exec),
        Params::F16(p) => with_grads(config, shape, t, p, grads, state, exec),
    }
}

/// Elements per piece of the whole-tensor conversions (a multiple of
/// [`TILE`], so each piece's stochastic-rounding stream starts at a tile).
const CONVERT_PIECE: usize = CHUNK;

/// Runs `step` on `f32` views of `params` and `grads` (`f32` ones as they
/// are, half-precision ones widened exactly into scratch buffers), then,
/// when `step` says so, rounds widened parameters back: to nearest even, or
/// stochastically with `sr` (the step's stream key and the tensor's first
/// element index).
fn with_f32<R>(
    mut params: Params<'_>,
    grads: Grads<'_>,
    sr: Option<(u64, u64)>,
    backend: Backend,
    par: bool,
    step: impl FnOnce(&mut [f32], &[f32]) -> Result<(R, bool), Error>,
) -> Result<R, Error> {
    let half_params = !matches!(params, Params::F32(_));
    let n_p = if half_params { params.len() } else { 0 };
    let n_g = if let Grads::F32(_) = grads { 0 } else { grads.len() };
    with_scratch(n_p, n_g, |pw, gw| {
        let g: &[f32] = match grads {
            Grads::F32(g) => g,
            Grads::Bf16(g) => {
                convert(g, gw, par, |s, d, _| dispatch(backend, Convert::WidenBf16(s, d)));
                gw
            }
            Grads::F16(g) => {
                convert(g, gw, par, |s, d, _| dispatch(backend, Convert::WidenF16(s, d)));
                gw
            }
        };
        let p: &mut [f32] = match &mut params {
            Params::F32(p) => p,
            Params::Bf16(p) => {
                convert(p, pw, par, |s, d, _| dispatch(backend, Convert::WidenBf16(s, d)));
                pw
            }
            Params::F16(p) => {
                convert(p, pw, par, |s, d, _| dispatch(backend, Convert::WidenF16(s, d)));
                pw
            }
        };
        let (out, stepped) = step(p, g)?;
        if stepped && half_params {
            narrow_params(pw, params, sr, backend, par);
        }
        Ok(out)
    })
}

/// The largest widened buffer (in elements, 16 MiB of `f32`) a thread keeps
/// between half-precision steps (two of them: the parameters', the
/// gradients'); larger ones are made for the step (on
/// huge pages where the system gives them) and freed after it.
pub const KEPT_WIDENED: usize = 1 << 22;

thread_local! {
    static WIDENED: std::cell::Cell<[Vec<f32>; 2]> = const { std::cell::Cell::new([Vec::new(), Vec::new()]) };
}

/// Runs `f` with scratch buffers of `a` and `b` elements (their contents
/// meaningless): this thread's kept pair, taken out of the thread's cell
/// for the call (so a step that waits inside a parallel region and runs
/// another tensor's step here meanwhile gets a pair of its own), or, above
/// [`KEPT_WIDENED`], a new pair freed after the call.
fn with_scratch<R>(a: usize, b: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    if a.max(b) > KEPT_WIDENED {
        let (mut x, mut y) = (crate::memory::buffer(a, 0f32), crate::memory::buffer(b, 0f32));
        return f(&mut x, &mut y);
    }
    let mut kept = WIDENED.take();
    let [x, y] = &mut kept;
    for (v, len) in [(&mut *x, a), (&mut *y, b)] {
        if v.len() < len {
            v.resize(len, 0.0);
        }
    }
    let out = f(&mut x[..a], &mut y[..b]);
    WIDENED.set(kept);
    out
}

/// Rounds the stepped `f32` values back into half-precision parameters: to
/// nearest, or stochastically with `sr` (the stream key of the step and
/// the tensor's first element index).
fn narrow_params(src: &[f32], params: Params<'_>, sr: Option<(u64, u64)>, backend: Backend, par: bool) {
    match (params, sr) {
        // Stepped in place, nothing to round.
        (Params::F32(_), _) => {}
        (Params::Bf16(p), None) => convert(src, p, par, |s, d, _| dispatch(backend, Convert::NarrowBf16(s, d))),
        (Params::Bf16(p), Some((key, offset))) => convert(src, p, par, |s, d, at| {
            dispatch(backend, Convert::NarrowBf16Stochastic(s, d, key, offset + at as u64))
        }),
        (Params::F16(p), _) => convert(src, p, par, |s, d, _| dispatch(backend, Convert::NarrowF16(s, d))),
    }
}

/// Applies `f(src piece, dst piece, index of the piece's first element)`
/// over pieces of [`CONVERT_PIECE`], in parallel when `par`.
fn convert<S: Sync, D: Send>(src: &[S], dst: &mut [D], par: bool, f: impl Fn(&[S], &mut [D], usize) + Sync) {
    let piece = |(k, (s, d)): (usize, (&[S], &mut [D]))| f(s, d, k * CONVERT_PIECE);
    if par {
        src.par_chunks(CONVERT_PIECE).zip(dst.par_chunks_mut(CONVERT_PIECE)).enumerate().for_each(piece);
    } else {
        src.chunks(CONVERT_PIECE).zip(dst.chunks_mut(CONVERT_PIECE)).enumerate().for_each(piece);
    }
}

/// The conversions of a half-precision step, on a backend's lanes (every
/// backend gives the same bits).
enum Convert<'a> {
    WidenBf16(&'a [bf16], &'a mut [f32]),
    WidenF16(&'a [f16], &'a mut [f32]),
    NarrowBf16(&'a [f32], &'a mut [bf16]),
    NarrowF16(&'a [f32], &'a mut [f16]),
    /// Stochastic rounding with the step's stream key; the piece starts at
    /// element `base` of the tensor (a multiple of [`TILE`]).
    NarrowBf16Stochastic(&'a [f32], &'a mut [bf16], u64, u64),
}

impl LaneOp for Convert<'_> {
    type Out = ();
    #[inline(always)]
    fn run<V: F32Vec>(self) {
        match self {
            Convert::WidenBf16(s, d) => widen::<V, bf16>(s, d),
            Convert::WidenF16(s, d) => widen::<V, f16>(s, d),
            Convert::NarrowBf16(s, d) => narrow::<V, bf16>(s, d),
            Convert::NarrowF16(s, d) => narrow::<V, f16>(s, d),
            Convert::NarrowBf16Stochastic(s, d, key, base) => {
                for (k, (s, d)) in s.chunks(TILE).zip(d.chunks_mut(TILE)).enumerate() {
                    narrow_bf16_stochastic::<V>(s, d, key, base + (k * TILE) as u64);
                }
            }
        }
    }
}

/// Step number `t` (1 for the first step) of `torch.optim.Adafactor` on one
/// tensor of `shape`, with caller-owned state: what [`Adafactor::step`]
/// runs, for callers that keep the state themselves (the Python package
/// keeps it in torch tensors). The caller counts steps.
///
/// # Errors
/// [`Error::InvalidHyperparameter`], [`Error::InvalidStep`] for `t = 0` or
/// past [`MAX_STEP`](crate::MAX_STEP), [`Error::LengthMismatch`] for a
/// parameter, gradient or state slice of the wrong length for `shape`;
/// nothing is modified then.
pub fn step_slices(
    config: &AdafactorConfig,
    shape: &[usize],
    t: u64,
    params: &mut [f32],
    grads: &[f32],
    state: AdafactorState<'_>,
    exec: Exec,
) -> Result<(), Error> {
    step_typed(config, shape, t, params, grads, state, exec)
}

/// [`step_slices`] on parameters and gradients of any storage type, read
/// and written in place (half-precision values widened in registers).
fn step_typed<P: Elem + Exact, G: Exact>(
    config: &AdafactorConfig,
    shape: &[usize],
    t: u64,
    params: &mut [P],
    grads: &[G],
    state: AdafactorState<'_>,
    exec: Exec,
) -> Result<(), Error> {
    config.validate()?;
    let backend = exec.resolve_backend()?;
    if t == 0 || t > crate::MAX_STEP {
        return Err(Error::InvalidStep { step: t });
    }
    let (n, rows_len, cols_len, var_len) =
        state_sizes(shape).ok_or(Error::TooLarge { what: "params", elements: usize::MAX })?;
    for (what, expected, actual) in [
        ("params", n, params.len()),
        ("grads", n, grads.len()),
        ("row_var", rows_len, state.row_var.len()),
        ("col_var", cols_len, state.col_var.len()),
        ("variance", var_len, state.variance.len()),
        ("update", n, if let UpdateBuffer::Given(u) = &state.update { u.len() } else { n }),
    ] {
        if expected != actual {
            return Err(Error::LengthMismatch { what, expected, actual });
        }
    }
    if n == 0 {
        return Ok(());
    }
    let par = exec.chunk_for(n).is_some();
    let lanes = Lanes(lanes_backend(backend));
    let AdafactorState { row_var, col_var, variance, update } = state;
    let state = (row_var, col_var, variance);
    match update {
        UpdateBuffer::Given(u) => run(config, shape, t, n, params, grads, state, Some(u), par, lanes),
        UpdateBuffer::Auto if n <= AUTO_UPDATE_BUFFER && factored(shape).is_some() => {
            UPDATE_BUFFER.with(|cell| match cell.try_borrow_mut() {
                Ok(mut buf) => {
                    if buf.len() < n {
                        buf.resize(n, 0.0);
                    }
                    run(config, shape, t, n, params, grads, state, Some(&mut buf[..n]), par, lanes);
                }
                // Already lent out on this thread (a step that waits inside a
                // parallel region can run another tensor's step here): recompute.
                Err(_) => run(config, shape, t, n, params, grads, state, None, par, lanes),
            })
        }
        UpdateBuffer::Auto | UpdateBuffer::Recompute => {
            run(config, shape, t, n, params, grads, state, None, par, lanes)
        }
    }
    Ok(())
}

/// The largest tensor (in elements, 8 MiB of f32) whose step stores its
/// updates in a buffer of the calling thread's when the caller gives none
/// ([`AdafactorState::update`]): measured here (2 threads,
/// `cargo run --release --example adafactor_speed`), storing is 1.2x to
/// 1.4x faster up to 1M elements, where the tensor stays in cache, and
/// 0.99x to 1.07x at 4M, 16M and 64M (the extra 4 bytes per parameter cost
/// what the saved divisions gain). The buffer stays with the thread (at
/// most this many floats per thread).
pub const AUTO_UPDATE_BUFFER: usize = 1 << 21;

thread_local! {
    static UPDATE_BUFFER: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The step after every check: reductions, state update, parameter update.
#[allow(clippy::too_many_arguments)]
fn run<P: Elem + Exact, G: Exact>(
    config: &AdafactorConfig,
    shape: &[usize],
    t: u64,
    n: usize,
    params: &mut [P],
    grads: &[G],
    (row_var, col_var, variance): (&mut [f32], &mut [f32], &mut [f32]),
    mut upd: Option<&mut [f32]>,
    par: bool,
    lanes: Lanes,
) {
    let c = *config;
    let tf = t as f64;
    let w = Lerp::new(tf.powf(c.beta2_decay));
    let rho = py_min(c.lr, 1.0 / tf.powf(0.5));
    let sqrt_n = (n as f64).powf(0.5);
    // The matrix path reads the parameters' squares in its first pass.
    let mut p_sumsq = 0.0;
    let eps1 = c.eps1();
    let f = Factors { neg: c.maximize, eps1: eps1 as f32, eps1_sq: (eps1 * eps1) as f32 };
    let decay = (c.weight_decay != 0.0).then_some((1.0 - c.lr * c.weight_decay) as f32);

    // The general matrix path's row means, from its second pass to its last.
    let mut rmeans: Vec<f32> = Vec::new();
    let upd_sumsq = match factored(shape) {
        Some((batches, rows, cols)) if small(rows, cols) => {
            // Whole matrices a group at a time: both passes of a matrix
            // while it is in cache, each matrix's two sums into its own
            // slot, then added in batch order.
            let (mm, per) = (rows * cols, matrices_per_task(rows, cols));
            let mut sums = vec![(0f64, 0f64); batches];
            let ubs = buffer_parts(upd.as_deref_mut(), batches.div_ceil(per), per * mm);
            type Group<'a, P, G> =
                (((&'a mut [(f64, f64)], &'a [P]), &'a [G]), ((&'a mut [f32], &'a mut [f32]), &'a mut [f32]));
            let body = |(((sums, p), g), ((rv, cv), u)): Group<'_, P, G>| {
                dispatch(lanes.0, Pass::SmallUsq { p, g, rows, cols, rv, cv, w, f, sums, u });
            };
            if par {
                let st = row_var.par_chunks_mut(per * rows).zip(col_var.par_chunks_mut(per * cols)).zip(ubs);
                sums.par_chunks_mut(per)
                    .zip(params.par_chunks(per * mm))
                    .zip(grads.par_chunks(per * mm))
                    .zip(st)
                    .for_each(body);
            } else {
                let st = row_var.chunks_mut(per * rows).zip(col_var.chunks_mut(per * cols)).zip(ubs);
                sums.chunks_mut(per).zip(params.chunks(per * mm)).zip(grads.chunks(per * mm)).zip(st).for_each(body);
            }
            for &(x, _) in &sums {
                p_sumsq += x;
            }
            let mut total = 0.0;
            for &(_, x) in &sums {
                total += x;
            }
            total
        }
        Some((batches, rows, cols)) => {
            let mm = rows * cols;
            let (by_batch, inner) = by_batch(par, batches, mm);
            // Per matrix, in batch order: the parameters' sum of squares.
            type First<'a, P, G> = ((&'a [P], &'a [G]), (&'a mut [f32], &'a mut [f32]));
            let first = |((p, g), (rv, cv)): First<'_, P, G>| factor_update(p, g, rows, cols, rv, cv, w, inner, lanes);
            let (pm, gm) = (params.chunks(mm), grads.chunks(mm));
            let parts: Vec<f64> = if by_batch {
                let st = row_var.par_chunks_mut(rows).zip(col_var.par_chunks_mut(cols));
                params.par_chunks(mm).zip(grads.par_chunks(mm)).zip(st).map(first).collect()
            } else {
                pm.zip(gm).zip(row_var.chunks_mut(rows).zip(col_var.chunks_mut(cols))).map(first).collect()
            };
            for x in parts {
                p_sumsq += x;
            }
            // Per matrix, in batch order: `sum(u^2)` (and `u` stored).
            let ubs: Vec<Option<&mut [f32]>> = match upd.as_deref_mut() {
                Some(u) => u.chunks_mut(mm).map(Some).collect(),
                None => (0..batches).map(|_| None).collect(),
            };
            // Per matrix: the mean of its row factor (a serial sum over its
            // rows), once for both passes that need it.
            rmeans = if by_batch {
                row_var.par_chunks(rows).map(|rv| row_mean(rv, f)).collect()
            } else {
                row_var.chunks(rows).map(|rv| row_mean(rv, f)).collect()
            };
            type Usq<'a, G> = ((((&'a [G], &'a [f32]), &'a [f32]), &'a f32), Option<&'a mut [f32]>);
            let usq = |((((g, rv), cv), &rmean), u): Usq<'_, G>| rows_usq(g, cols, rv, cv, rmean, f, inner, lanes, u);
            let parts: Vec<f64> = if by_batch {
                grads
                    .par_chunks(mm)
                    .zip(row_var.par_chunks(rows))
                    .zip(col_var.par_chunks(cols))
                    .zip(&rmeans)
                    .zip(ubs)
                    .map(usq)
                    .collect()
            } else {
                let (rvs, cvs) = (row_var.chunks(rows), col_var.chunks(cols));
                grads.chunks(mm).zip(rvs).zip(cvs).zip(&rmeans).zip(ubs).map(usq).collect()
            };
            let mut total = 0.0;
            for x in parts {
                total += x;
            }
            total
        }
        None => {
            p_sumsq = sumsq(params, par, lanes);
            let v = &mut *variance;
            let ubs = buffer_parts(upd.as_deref_mut(), n.div_ceil(CHUNK), CHUNK);
            let body = |((v, g), u): ((&mut [f32], &[G]), &mut [f32])| lanes.vec_usq(v, g, w, f, u);
            let parts: Vec<f64> = if par {
                v.par_chunks_mut(CHUNK).zip(grads.par_chunks(CHUNK)).zip(ubs).map(body).collect()
            } else {
                v.chunks_mut(CHUNK).zip(grads.chunks(CHUNK)).zip(ubs).map(body).collect()
            };
            parts.iter().sum()
        }
    };
    let alpha = py_max(c.eps.1, norm(p_sumsq) / sqrt_n) * rho;
    let denom = py_max(1.0, norm(upd_sumsq) / (sqrt_n * c.d));
    let a = (-alpha / denom) as f32;
    let ap = Apply { a, decay: decay.unwrap_or(1.0), f };
    if let Some(u) = upd {
        // The updates are stored: one element-wise pass, whatever the shape.
        let body = |(p, u): (&mut [P], &[f32])| lanes.apply_stored(u, p, ap);
        if par {
            params.par_chunks_mut(CHUNK).zip(u.par_chunks(CHUNK)).for_each(body);
        } else {
            params.chunks_mut(CHUNK).zip(u.chunks(CHUNK)).for_each(body);
        }
        return;
    }
    match factored(shape) {
        Some((_, rows, cols)) if small(rows, cols) => {
            let (mm, per) = (rows * cols, matrices_per_task(rows, cols));
            type Group<'a, P, G> = ((&'a mut [P], &'a [G]), (&'a [f32], &'a [f32]));
            let body = |((p, g), (rv, cv)): Group<'_, P, G>| {
                dispatch(lanes.0, Pass::SmallApply { rv, cv, g, p, rows, cols, ap });
            };
            if par {
                let st = row_var.par_chunks(per * rows).zip(col_var.par_chunks(per * cols));
                params.par_chunks_mut(per * mm).zip(grads.par_chunks(per * mm)).zip(st).for_each(body);
            } else {
                let st = row_var.chunks(per * rows).zip(col_var.chunks(per * cols));
                params.chunks_mut(per * mm).zip(grads.chunks(per * mm)).zip(st).for_each(body);
            }
        }
        Some((batches, rows, cols)) => {
            let mm = rows * cols;
            let (by_batch, inner) = by_batch(par, batches, mm);
            type One<'a, P, G> = (((&'a mut [P], &'a [G]), (&'a [f32], &'a [f32])), &'a f32);
            let one = |(((p, g), (rv, cv)), &rmean): One<'_, P, G>| {
                if inner && long_rows(rows, cols) {
                    // A piece of a row per task (element-wise: the same bits).
                    p.par_chunks_mut(cols).zip(g.par_chunks(cols)).zip(rv.par_iter()).for_each(|((pr, gr), r)| {
                        let pieces = pr.par_chunks_mut(CHUNK).zip(gr.par_chunks(CHUNK)).zip(cv.par_chunks(CHUNK));
                        pieces.for_each(|((pb, gb), cb)| {
                            lanes.rows_apply(std::slice::from_ref(r), cb, rmean, gb, pb, gb.len(), ap);
                        });
                    });
                    return;
                }
                let per = rows_per_task(cols);
                let body = |(k, (pb, gb)): (usize, (&mut [P], &[G]))| {
                    lanes.rows_apply(&rv[k * per..], cv, rmean, gb, pb, cols, ap)
                };
                if inner {
                    p.par_chunks_mut(per * cols).zip(g.par_chunks(per * cols)).enumerate().for_each(body);
                } else {
                    p.chunks_mut(per * cols).zip(g.chunks(per * cols)).enumerate().for_each(body);
                }
            };
            let st = (row_var.chunks(rows), col_var.chunks(cols));
            if by_batch {
                let st = row_var.par_chunks(rows).zip(col_var.par_chunks(cols));
                params.par_chunks_mut(mm).zip(grads.par_chunks(mm)).zip(st).zip(&rmeans).for_each(one);
            } else {
                params.chunks_mut(mm).zip(grads.chunks(mm)).zip(st.0.zip(st.1)).zip(&rmeans).for_each(one);
            }
        }
        None => {
            let v = &*variance;
            let body = |((p, g), v): ((&mut [P], &[G]), &[f32])| lanes.vec_apply(v, g, p, ap);
            if par {
                params.par_chunks_mut(CHUNK).zip(grads.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(body);
            } else {
                params.chunks_mut(CHUNK).zip(grads.chunks(CHUNK)).zip(v.chunks(CHUNK)).for_each(body);
            }
        }
    }
}

/// The update buffer cut into the tasks' parts (`len` elements each, the
/// last shorter), or `tasks` empty slices without a buffer (the passes then
/// store nothing).
fn buffer_parts(upd: Option<&mut [f32]>, tasks: usize, len: usize) -> Vec<&mut [f32]> {
    match upd {
        Some(u) => u.chunks_mut(len).collect(),
        None => (0..tasks).map(|_| &mut [][..]).collect(),
    }
}

/// Whether a batch of matrices is shared out matrix by matrix (each then
/// stepped serially: one parallel region, not one per matrix, for batches
/// of small matrices such as a conv weight's 3x3 kernels), and whether each
/// matrix is split inside. Each matrix's partition is the same either way,
/// so are its bits.
fn by_batch(par: bool, batches: usize, matrix: usize) -> (bool, bool) {
    let by_batch = par && batches > 1 && matrix <= CHUNK;
    (by_batch, par && !by_batch)
}

/// Whether each matrix of a factored shape is a single task of every pass
/// of the general path (at most [`ROW_GROUP`] rows and [`CHUNK`] elements).
/// Such matrices (a conv weight's 3x3 kernels, a transformer's small
/// projections) are stepped a group at a time, both reduction passes of a
/// matrix back to back, with the general path's operations in its order:
/// the same bits, without a dispatch and its allocations per matrix.
fn small(rows: usize, cols: usize) -> bool {
    rows <= ROW_GROUP && rows * cols <= CHUNK
}

/// Whole matrices per task (and per dispatch) of the small-matrix path:
/// about [`CHUNK`] elements, at least one matrix.
fn matrices_per_task(rows: usize, cols: usize) -> usize {
    (CHUNK / (rows * cols).max(1)).max(1)
}

/// `max(mean(row_var), eps1)`, the mean over the rows as torch's
/// `mean(dim=-2)` gives it (rounded to f32).
#[inline(always)]
fn row_mean(rv: &[f32], f: Factors) -> f32 {
    let s: f64 = rv.iter().map(|&x| f64::from(x)).sum();
    clamp_min((s / rv.len() as f64) as f32, f.eps1)
}

/// Rows per task (and per backend dispatch) of the row passes: about
/// [`CHUNK`] elements, at least one row.
fn rows_per_task(cols: usize) -> usize {
    (CHUNK / cols.max(1)).max(1)
}

/// `sum(u^2)` over one matrix: each row's sum into its own slot, tasks of
/// [`rows_per_task`] rows in parallel or not, the rows' sums then added in
/// row order (the same for any thread count).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rows_usq<G: Exact>(
    g: &[G],
    cols: usize,
    rv: &[f32],
    cv: &[f32],
    rmean: f32,
    f: Factors,
    par: bool,
    lanes: Lanes,
    upd: Option<&mut [f32]>,
) -> f64 {
    if par && long_rows(rv.len(), cols) {
        return long_rows_usq(g, cols, rv, cv, rmean, f, lanes, upd);
    }
    let per = rows_per_task(cols);
    let mut parts = vec![0f64; rv.len()];
    type Task<'a, G> = (usize, ((&'a mut [f64], &'a [G]), &'a mut [f32]));
    let body = |(k, ((out, gb), ub)): Task<'_, G>| lanes.rows_usq(&rv[k * per..], cv, rmean, gb, cols, f, out, ub);
    let ubs = buffer_parts(upd, rv.len().div_ceil(per), per * cols);
    if par {
        parts.par_chunks_mut(per).zip(g.par_chunks(per * cols)).zip(ubs).enumerate().for_each(body);
    } else {
        parts.chunks_mut(per).zip(g.chunks(per * cols)).zip(ubs).enumerate().for_each(body);
    }
    parts.iter().sum()
}

/// Whether a matrix has too few rows, each longer than a task, to share
/// its row passes out a row per task: the passes then take pieces of
/// [`CHUNK`] columns of a row per task (element-wise work only, so the
/// bits do not depend on it).
fn long_rows(rows: usize, cols: usize) -> bool {
    cols > CHUNK && rows < 2 * rayon::current_num_threads()
}

/// Columns of a row per window of [`long_rows_usq`] without a stored
/// update (the scratch it allocates: 512 KiB).
const WINDOW: usize = 8 * CHUNK;

/// `sum(u^2)` over a matrix of [`long_rows`], a row at a time: the row's
/// updates in parallel pieces of [`CHUNK`] columns, stored in `upd` (the
/// whole row at once) or, without it, in a scratch window of [`WINDOW`]
/// columns at a time; after each, its squares are added on into the row's
/// 8 accumulators in element order (a window starts at a multiple of 8),
/// folded at the row's end. That is [`row_usq`]'s sum (element `j` into
/// accumulator `j % 8`, in element order, folded pairwise), so the bits are
/// [`rows_usq`]'s.
#[allow(clippy::too_many_arguments)]
fn long_rows_usq<G: Exact>(
    g: &[G],
    cols: usize,
    rv: &[f32],
    cv: &[f32],
    rmean: f32,
    f: Factors,
    lanes: Lanes,
    mut upd: Option<&mut [f32]>,
) -> f64 {
    let window = if upd.is_some() { cols } else { WINDOW };
    let mut scratch = if upd.is_some() { Vec::new() } else { vec![0f32; WINDOW.min(cols)] };
    let mut parts = vec![0f64; rv.len()];
    for (i, (&r, part)) in rv.iter().zip(&mut parts).enumerate() {
        let mut acc = [0f64; 8];
        for j0 in (0..cols).step_by(window) {
            let j1 = (j0 + window).min(cols);
            let dst = match upd.as_deref_mut() {
                Some(u) => &mut u[i * cols + j0..i * cols + j1],
                None => &mut scratch[..j1 - j0],
            };
            let pieces = dst.par_chunks_mut(CHUNK).zip(g[i * cols + j0..i * cols + j1].par_chunks(CHUNK));
            pieces.zip(cv[j0..j1].par_chunks(CHUNK)).for_each(|((ub, gb), cb)| {
                lanes.rows_usq(std::slice::from_ref(&r), cb, rmean, gb, gb.len(), f, &mut [0.0], ub);
            });
            lanes.sq_acc(dst, &mut acc);
        }
        *part = fold8(acc);
    }
    parts.iter().sum()
}

/// Rows per task of the first pass (a fixed partition: each column's sum
/// is the sum of the groups' partial sums, in group order).
const ROW_GROUP: usize = 256;

/// The first pass over one matrix: the parameters' sum of squares
/// (returned), and each row's and each column's mean square (the norm
/// rounded to f32, squared in f32, divided in f32, as torch's
/// `vector_norm(..).square_().div_(..)`), interpolated into `rv` and `cv`.
/// Tasks are (group of [`ROW_GROUP`] rows) x (block of [`CHUNK`] columns);
/// each walks its rows in order, so the partial sums and their combination
/// are the same for any thread count.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn factor_update<P: Elem + Exact, G: Exact>(
    p: &[P],
    g: &[G],
    rows: usize,
    cols: usize,
    rv: &mut [f32],
    cv: &mut [f32],
    w: Lerp,
    par: bool,
    lanes: Lanes,
) -> f64 {
    let (groups, blocks) = (rows.div_ceil(ROW_GROUP), cols.div_ceil(CHUNK));
    // A row whose columns are all in one block has its whole sum in one
    // task, and a column of a matrix of one group of rows likewise: such a
    // task interpolates those statistics itself (the combination below adds
    // its sum to 0, which changes no bit), so no tensor-sized array of
    // partial sums is written, zeroed and read back (a matrix of one row
    // and a million columns spent a third of its step there).
    let (rows_done, cols_done) = (blocks == 1, groups == 1);
    type Slot<'a> = (Option<&'a mut [f32]>, Option<&'a mut [f32]>);
    let slots: Vec<Slot<'_>> = match (rows_done, cols_done) {
        (true, true) => vec![(Some(&mut *rv), Some(&mut *cv))],
        (true, false) => rv.chunks_mut(ROW_GROUP).map(|r| (Some(r), None)).collect(),
        (false, true) => cv.chunks_mut(CHUNK).map(|c| (None, Some(c))).collect(),
        (false, false) => (0..groups * blocks).map(|_| (None, None)).collect(),
    };
    // Per task: the parameters' partial, each row's partial, each column's
    // (the last two empty where the task interpolated them).
    let task = |(k, (rvs, cvs)): (usize, Slot<'_>)| -> (f64, Vec<f64>, Vec<f64>) {
        let (gi, bi) = (k / blocks, k % blocks);
        let (r0, r1) = (gi * ROW_GROUP, ((gi + 1) * ROW_GROUP).min(rows));
        let (j0, j1) = (bi * CHUNK, ((bi + 1) * CHUNK).min(cols));
        let mut row_sq = vec![0f64; r1 - r0];
        let mut col_sq = vec![0f64; j1 - j0];
        let span = r0 * cols..r1 * cols;
        let psq = lanes.first_pass(&p[span.clone()], &g[span], cols, j0..j1, &mut row_sq, &mut col_sq);
        if let Some(rvs) = rvs {
            lanes.stats(rvs, &row_sq, cols, w);
            row_sq = Vec::new();
        }
        if let Some(cvs) = cvs {
            lanes.stats(cvs, &col_sq, rows, w);
            col_sq = Vec::new();
        }
        (psq, row_sq, col_sq)
    };
    let parts: Vec<(f64, Vec<f64>, Vec<f64>)> = if par {
        slots.into_par_iter().enumerate().map(task).collect()
    } else {
        slots.into_iter().enumerate().map(task).collect()
    };
    let mut psq = 0.0;
    for (p_part, _, _) in &parts {
        psq += p_part;
    }
    let mut rest = [(rv, rows_done, cols), (cv, cols_done, rows)];
    for (side, (var, done, count)) in rest.iter_mut().enumerate() {
        if *done {
            continue;
        }
        let mut sum_sq = vec![0f64; var.len()];
        for (k, part) in parts.iter().enumerate() {
            let (at, x) = if side == 0 { ((k / blocks) * ROW_GROUP, &part.1) } else { ((k % blocks) * CHUNK, &part.2) };
            for (acc, x) in sum_sq[at..].iter_mut().zip(x) {
                *acc += x;
            }
        }
        // Through the backend dispatch so the lerp's fused multiply-add is
        // the instruction, not a library call per element; element-wise, so
        // in parallel pieces with the same bits.
        if par && var.len() > CHUNK {
            let pieces = var.par_chunks_mut(CHUNK).zip(sum_sq.par_chunks(CHUNK));
            pieces.for_each(|(v, s)| lanes.stats(v, s, *count, w));
        } else {
            lanes.stats(var, &sum_sq, *count, w);
        }
    }
    psq
}

/// The parameter update of the last pass: `p = fma(a, u, p * decay)`
/// (`decay` 1 without weight decay: a multiply by 1 is exact).
#[derive(Clone, Copy)]
struct Apply {
    a: f32,
    decay: f32,
    f: Factors,
}

/// The backend the per-element passes run on (through the crate's one
/// [`dispatch`]). Every one evaluates the same IEEE operations in the same
/// order, so they give the same bits.
#[derive(Clone, Copy)]
struct Lanes(Backend);

/// `g / sqrt(max(v, eps1^2))` with torch's `rsqrt` (an f32 square root,
/// then an f32 division), negated gradient for `maximize`.
#[inline(always)]
fn u_of<V: F32Vec>(v: V, g: V, f: Factors) -> V {
    let g = if f.neg { -g } else { g };
    let lo = V::splat(f.eps1_sq);
    (V::splat(1.0) / v.lt_select(lo, lo, v).sqrt()) * g
}

/// One row of a factored update: `v = (r * c) / rmean`.
#[inline(always)]
fn factored_v<V: F32Vec>(r: f32, c: V, rmean: f32) -> V {
    (V::splat(r) * c) / V::splat(rmean)
}

/// Adds `u^2` for `LANES` elements starting at element `j` into the 8
/// accumulators (element `j` into accumulator `j % 8`), widened to f64.
#[inline(always)]
fn accumulate<V: F32Vec>(acc: &mut [f64; 8], j: usize, u: V) {
    if V::LANES == 8 && j.is_multiple_of(8) {
        // SAFETY: `acc` holds 8 = LANES f64.
        unsafe { u.add_squares_f64(acc.as_mut_ptr()) };
        return;
    }
    let mut tmp = [0f32; 16];
    // SAFETY: `tmp` holds 16 >= LANES floats.
    unsafe { u.store(tmp.as_mut_ptr()) };
    for (l, &x) in tmp[..V::LANES].iter().enumerate() {
        let x = f64::from(x);
        acc[(j + l) % 8] += x * x;
    }
}

#[inline(always)]
fn fold8(acc: [f64; 8]) -> f64 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// [`fold8`] of the 8 accumulators after fewer than 8 elements (element `i`
/// alone in accumulator `i`, `0 + sq(i)`, the rest 0), in registers: the
/// same sums (adding `+0` to a square, never `-0`, changes no bit) without
/// the array, whose scalar stores followed by a vector load stall on short
/// rows (a 3x3 kernel's).
#[inline(always)]
fn fold_short(n: usize, sq: impl Fn(usize) -> f64) -> f64 {
    debug_assert!(n < 8);
    let a = |i: usize| if i < n { sq(i) } else { 0.0 };
    ((a(0) + a(1)) + (a(2) + a(3))) + ((a(4) + a(5)) + (a(6) + a(7)))
}

/// The lane kernels. Each walks its slices in `V::LANES` steps and finishes
/// the tail with plain `f32`, the same operations.
/// `STORE`: also write each update into `s` (then at least `g.len()` long).
#[inline(always)]
fn row_usq<V: F32Vec, G: Exact, const STORE: bool>(
    r: f32,
    cv: &[f32],
    rmean: f32,
    g: &[G],
    f: Factors,
    s: &mut [f32],
) -> f64 {
    let n = g.len();
    let cv = &cv[..n];
    let s = if STORE { &mut s[..n] } else { s };
    if n < 8 {
        let mut us = [0f64; 8];
        for j in 0..n {
            let u = u_of(factored_v(r, cv[j], rmean), g[j].exact(), f);
            if STORE {
                s[j] = u;
            }
            us[j] = f64::from(u);
        }
        return fold_short(n, |j| us[j] * us[j]);
    }
    let mut acc = [0f64; 8];
    let full = n / V::LANES * V::LANES;
    let mut j = 0;
    while j < full {
        // SAFETY: `j + LANES <= n`, the length of both slices (and of `s`
        // when storing).
        unsafe {
            let (c, gj) = (V::load(cv.as_ptr().add(j)), G::exact_lanes::<V>(g.as_ptr().add(j)));
            let u = u_of(factored_v(r, c, rmean), gj, f);
            if STORE {
                u.store(s.as_mut_ptr().add(j));
            }
            accumulate(&mut acc, j, u);
        }
        j += V::LANES;
    }
    for j in full..n {
        let u = u_of(factored_v(r, cv[j], rmean), g[j].exact(), f);
        if STORE {
            s[j] = u;
        }
        accumulate(&mut acc, j, u);
    }
    fold8(acc)
}

/// The last pass with stored updates: `p = fma(a, u, p * decay)`, as
/// [`row_apply`] and [`vec_apply`] evaluate it.
#[inline(always)]
fn apply_stored<V: F32Vec, P: Elem + Exact>(u: &[f32], p: &mut [P], ap: Apply) {
    let n = p.len();
    let u = &u[..n];
    let full = n / V::LANES * V::LANES;
    let mut j = 0;
    while j < full {
        // SAFETY: `j + LANES <= n`, the length of both slices.
        unsafe {
            let (uj, pj) = (V::load(u.as_ptr().add(j)), P::exact_lanes::<V>(p.as_ptr().add(j)));
            P::put(V::splat(ap.a).mul_add(uj, pj * V::splat(ap.decay)), p.as_mut_ptr().add(j));
        }
        j += V::LANES;
    }
    for j in full..n {
        p[j] = P::put_one(ap.a.mul_add(u[j], p[j].exact() * ap.decay));
    }
}

#[inline(always)]
fn row_apply<V: F32Vec, P: Elem + Exact, G: Exact>(r: f32, cv: &[f32], rmean: f32, g: &[G], p: &mut [P], ap: Apply) {
    let n = g.len();
    let (cv, p) = (&cv[..n], &mut p[..n]);
    let full = n / V::LANES * V::LANES;
    let mut j = 0;
    while j < full {
        // SAFETY: `j + LANES <= n`, the length of all three slices.
        unsafe {
            let c = V::load(cv.as_ptr().add(j));
            let (gj, pj) = (G::exact_lanes::<V>(g.as_ptr().add(j)), P::exact_lanes::<V>(p.as_ptr().add(j)));
            let u = u_of(factored_v(r, c, rmean), gj, ap.f);
            P::put(V::splat(ap.a).mul_add(u, pj * V::splat(ap.decay)), p.as_mut_ptr().add(j));
        }
        j += V::LANES;
    }
    for j in full..n {
        let u = u_of(factored_v(r, cv[j], rmean), g[j].exact(), ap.f);
        p[j] = P::put_one(ap.a.mul_add(u, p[j].exact() * ap.decay));
    }
}

/// The vector path: the state update `v = lerp(v, g^2, w)`, then `sum(u^2)`;
/// `STORE`: each update also into `s`.
#[inline(always)]
fn vec_usq<V: F32Vec, G: Exact, const STORE: bool>(v: &mut [f32], g: &[G], w: Lerp, f: Factors, s: &mut [f32]) -> f64 {
    let n = g.len();
    let v = &mut v[..n];
    let s = if STORE { &mut s[..n] } else { s };
    let mut acc = [0f64; 8];
    let full = n / V::LANES * V::LANES;
    let mut j = 0;
    while j < full {
        // SAFETY: `j + LANES <= n`, the length of both slices (and of `s`
        // when storing).
        unsafe {
            let gj = G::exact_lanes::<V>(g.as_ptr().add(j));
            let vj = w.apply(V::load(v.as_ptr().add(j)), gj * gj);
            vj.store(v.as_mut_ptr().add(j));
            let u = u_of(vj, gj, f);
            if STORE {
                u.store(s.as_mut_ptr().add(j));
            }
            accumulate(&mut acc, j, u);
        }
        j += V::LANES;
    }
    for j in full..n {
        let gj = g[j].exact();
        v[j] = w.apply(v[j], gj * gj);
        let u = u_of(v[j], gj, f);
        if STORE {
            s[j] = u;
        }
        accumulate(&mut acc, j, u);
    }
    fold8(acc)
}

#[inline(always)]
fn vec_apply<V: F32Vec, P: Elem + Exact, G: Exact>(v: &[f32], g: &[G], p: &mut [P], ap: Apply) {
    let n = g.len();
    let (v, p) = (&v[..n], &mut p[..n]);
    let full = n / V::LANES * V::LANES;
    let mut j = 0;
    while j < full {
        // SAFETY: `j + LANES <= n`, the length of all three slices.
        unsafe {
            let vj = V::load(v.as_ptr().add(j));
            let (gj, pj) = (G::exact_lanes::<V>(g.as_ptr().add(j)), P::exact_lanes::<V>(p.as_ptr().add(j)));
            P::put(V::splat(ap.a).mul_add(u_of(vj, gj, ap.f), pj * V::splat(ap.decay)), p.as_mut_ptr().add(j));
        }
        j += V::LANES;
    }
    for j in full..n {
        p[j] = P::put_one(ap.a.mul_add(u_of(v[j], g[j].exact(), ap.f), p[j].exact() * ap.decay));
    }
}

/// `acc[j] += g[j]^2` in f64: one column block of one row.
#[inline(always)]
fn col_acc<V: F32Vec, G: Exact>(acc: &mut [f64], g: &[G]) {
    let n = g.len().min(acc.len());
    let full = n / V::LANES * V::LANES;
    let mut j = 0;
    while j < full {
        // SAFETY: `j + LANES <= n`, within both slices.
        unsafe { G::exact_lanes::<V>(g.as_ptr().add(j)).add_squares_f64(acc.as_mut_ptr().add(j)) };
        j += V::LANES;
    }
    for (a, &x) in acc[full..n].iter_mut().zip(&g[full..n]) {
        let x = f64::from(x.exact());
        *a += x * x;
    }
}

/// `sum(x^2)` over one chunk in f64 with 8 accumulators (element `i` into
/// accumulator `i % 8`), added pairwise at the end: one fixed order, and
/// independent chains, on the lanes (`add_squares_f64`).
#[inline(always)]
fn sq_sum<V: F32Vec, T: Exact>(x: &[T]) -> f64 {
    if x.len() < 8 {
        return fold_short(x.len(), |i| f64::from(x[i].exact()) * f64::from(x[i].exact()));
    }
    let mut acc = [0f64; 8];
    sq_acc::<V, T>(x, &mut acc);
    fold8(acc)
}

/// Adds `x[i]^2` (in f64) into accumulator `i % 8`, in element order:
/// [`sq_sum`] before its fold, and a window of a row's updates
/// ([`long_rows_usq`]) when `x` starts at a multiple of 8 of the row.
#[inline(always)]
fn sq_acc<V: F32Vec, T: Exact>(x: &[T], acc: &mut [f64; 8]) {
    let full = x.len() / 8 * 8;
    let mut i = 0;
    while i < full {
        if V::LANES == 8 {
            // SAFETY: `i + 8 <= full <= x.len()`; `acc` holds 8 f64.
            unsafe { T::exact_lanes::<V>(x.as_ptr().add(i)).add_squares_f64(acc.as_mut_ptr()) };
        } else {
            for (a, &v) in acc.iter_mut().zip(&x[i..i + 8]) {
                let v = f64::from(v.exact());
                *a += v * v;
            }
        }
        i += 8;
    }
    for (a, &v) in acc.iter_mut().zip(&x[full..]) {
        let v = f64::from(v.exact());
        *a += v * v;
    }
}

/// `var = lerp(var, norm^2 / count, w)` per row or column, with the norm
/// rounded to f32, squared in f32 and divided in f32, as torch's
/// `vector_norm(..).square_().div_(..)`.
#[inline(always)]
fn stats(var: &mut [f32], sum_sq: &[f64], count: usize, w: Lerp) {
    if count == 1 {
        // Rows (or columns) of one element: each sum is one f32's square,
        // exact in f64, so its square root is the element's magnitude
        // exactly, and `nrm * nrm` (over 1) is that square rounded once to
        // f32: `s as f32`, the same bits without a square root per element.
        for (x, &s) in var.iter_mut().zip(sum_sq) {
            *x = w.apply::<f32>(*x, s as f32);
        }
        return;
    }
    for (x, &s) in var.iter_mut().zip(sum_sq) {
        let nrm = s.sqrt() as f32;
        *x = w.apply::<f32>(*x, (nrm * nrm) / count as f32);
    }
}

/// The first pass's task over whole rows (`p` and `g` hold `cols` per row),
/// columns `j` of each: the parameters' squares (returned, summed in row
/// order), each row's gradient squares into `row_sq`, each column's added
/// into `col_sq`.
#[inline(always)]
fn squares<V: F32Vec, P: Elem + Exact, G: Exact>(
    p: &[P],
    g: &[G],
    cols: usize,
    j: Range<usize>,
    row_sq: &mut [f64],
    col_sq: &mut [f64],
) -> f64 {
    let mut psq = 0.0;
    if cols == 1 && !col_sq.is_empty() {
        // Rows of one element: each row's sum of squares is its one square
        // (`sq_sum` folds zeros into it, which changes no bit), added to
        // the parameters' sum and to the column's in row order as below.
        // The column's sum is held in a register meanwhile (the same
        // additions; through memory each one waited on the last store).
        let mut col = col_sq[0];
        for ((&x, &y), rs) in p.iter().zip(g).zip(row_sq) {
            let (x, y) = (f64::from(x.exact()), f64::from(y.exact()));
            psq += x * x;
            *rs = y * y;
            col += y * y;
        }
        col_sq[0] = col;
        return psq;
    }
    for ((pr, gr), rs) in p.chunks(cols).zip(g.chunks(cols)).zip(row_sq) {
        let (pr, gr) = (&pr[j.clone()], &gr[j.clone()]);
        psq += sq_sum::<V, P>(pr);
        *rs = sq_sum::<V, G>(gr);
        col_acc::<V, G>(col_sq, gr);
    }
    psq
}

/// Per row (`g` holds `cols` per row) `sum(u^2)` into `out`; each `u` also
/// into `u` unless empty.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rows_usq_lanes<V: F32Vec, G: Exact>(
    rv: &[f32],
    cv: &[f32],
    rmean: f32,
    g: &[G],
    cols: usize,
    f: Factors,
    out: &mut [f64],
    u: &mut [f32],
) {
    if cols == 1 {
        let n = out.len().min(g.len());
        return column_usq::<V, G>(&rv[..n], cv[0], rmean, &g[..n], f, &mut out[..n], u);
    }
    if u.is_empty() {
        for ((o, gr), &r) in out.iter_mut().zip(g.chunks(cols)).zip(rv) {
            *o = row_usq::<V, G, false>(r, cv, rmean, gr, f, &mut []);
        }
    } else {
        for (((o, gr), &r), ur) in out.iter_mut().zip(g.chunks(cols)).zip(rv).zip(u.chunks_mut(cols)) {
            *o = row_usq::<V, G, true>(r, cv, rmean, gr, f, ur);
        }
    }
}

/// Rows of one element each (a matrix of one column): [`row_usq`] of each
/// row, a row per lane. A row's sum is its one square (the fold of
/// [`fold_short`] adds zeros to it, which changes no bit).
#[inline(always)]
fn column_usq<V: F32Vec, G: Exact>(
    rv: &[f32],
    c: f32,
    rmean: f32,
    g: &[G],
    f: Factors,
    out: &mut [f64],
    s: &mut [f32],
) {
    let n = g.len();
    let (rv, out) = (&rv[..n], &mut out[..n]);
    let store = !s.is_empty();
    let s = if store { &mut s[..n] } else { s };
    let full = n / V::LANES * V::LANES;
    let mut tmp = [0f32; 16];
    let mut j = 0;
    while j < full {
        // SAFETY: `j + LANES <= n`, the length of `rv`, `g` (and `s` when
        // storing); `tmp` holds 16 >= LANES floats.
        unsafe {
            // `r * c` with `r` first, as `factored_v`.
            let v = (V::load(rv.as_ptr().add(j)) * V::splat(c)) / V::splat(rmean);
            let u = u_of(v, G::exact_lanes::<V>(g.as_ptr().add(j)), f);
            if store {
                u.store(s.as_mut_ptr().add(j));
            }
            u.store(tmp.as_mut_ptr());
        }
        for (o, &x) in out[j..j + V::LANES].iter_mut().zip(&tmp) {
            *o = f64::from(x) * f64::from(x);
        }
        j += V::LANES;
    }
    for j in full..n {
        let u = u_of(factored_v(rv[j], c, rmean), g[j].exact(), f);
        if store {
            s[j] = u;
        }
        out[j] = f64::from(u) * f64::from(u);
    }
}

/// The last pass, recomputing `u`, over rows of one element each: as
/// [`row_apply`], a row per lane.
#[inline(always)]
fn column_apply<V: F32Vec, P: Elem + Exact, G: Exact>(rv: &[f32], c: f32, rmean: f32, g: &[G], p: &mut [P], ap: Apply) {
    let n = p.len();
    let (rv, g) = (&rv[..n], &g[..n]);
    let full = n / V::LANES * V::LANES;
    let mut j = 0;
    while j < full {
        // SAFETY: `j + LANES <= n`, the length of all three slices.
        unsafe {
            let v = (V::load(rv.as_ptr().add(j)) * V::splat(c)) / V::splat(rmean);
            let (gj, pj) = (G::exact_lanes::<V>(g.as_ptr().add(j)), P::exact_lanes::<V>(p.as_ptr().add(j)));
            let u = u_of(v, gj, ap.f);
            P::put(V::splat(ap.a).mul_add(u, pj * V::splat(ap.decay)), p.as_mut_ptr().add(j));
        }
        j += V::LANES;
    }
    for j in full..n {
        let u = u_of(factored_v(rv[j], c, rmean), g[j].exact(), ap.f);
        p[j] = P::put_one(ap.a.mul_add(u, p[j].exact() * ap.decay));
    }
}

/// The last pass, recomputing `u`, over whole rows.
#[inline(always)]
fn rows_apply_lanes<V: F32Vec, P: Elem + Exact, G: Exact>(
    rv: &[f32],
    cv: &[f32],
    rmean: f32,
    g: &[G],
    p: &mut [P],
    cols: usize,
    ap: Apply,
) {
    if cols == 1 {
        let n = p.len().min(g.len()).min(rv.len());
        return column_apply::<V, P, G>(rv, cv[0], rmean, g, &mut p[..n], ap);
    }
    for ((pr, gr), &r) in p.chunks_mut(cols).zip(g.chunks(cols)).zip(rv) {
        row_apply::<V, P, G>(r, cv, rmean, gr, pr, ap);
    }
}

/// The first two passes over a group of whole [`small`] matrices (`p`, `g`
/// and `u` hold `rows * cols` per matrix, `rv` `rows`, `cv` `cols`): per
/// matrix, the general path's single first-pass task (the parameters'
/// squares row by row, each row's and each column's gradient squares), its
/// row and column statistics, then its single `sum(u^2)` task (each row's
/// sum, then the rows' in order), both sums into the matrix's slot of
/// `sums`; each `u` also into `u` unless empty.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn small_usq<V: F32Vec, P: Elem + Exact, G: Exact>(
    p: &[P],
    g: &[G],
    rows: usize,
    cols: usize,
    rv: &mut [f32],
    cv: &mut [f32],
    w: Lerp,
    f: Factors,
    sums: &mut [(f64, f64)],
    u: &mut [f32],
) {
    let mm = rows * cols;
    let (mut row_sq, mut col_sq, mut parts) = (vec![0f64; rows], vec![0f64; cols], vec![0f64; rows]);
    for (m, s) in sums.iter_mut().enumerate() {
        let (pm, gm) = (&p[m * mm..][..mm], &g[m * mm..][..mm]);
        let (rvm, cvm) = (&mut rv[m * rows..][..rows], &mut cv[m * cols..][..cols]);
        col_sq.fill(0.0);
        let psq = squares::<V, P, G>(pm, gm, cols, 0..cols, &mut row_sq, &mut col_sq);
        stats(rvm, &row_sq, cols, w);
        stats(cvm, &col_sq, rows, w);
        let um = if u.is_empty() { &mut [][..] } else { &mut u[m * mm..][..mm] };
        rows_usq_lanes::<V, G>(rvm, cvm, row_mean(rvm, f), gm, cols, f, &mut parts, um);
        *s = (psq, parts.iter().sum());
    }
}

/// One per-element pass over one row or chunk, as a [`LaneOp`] (the f64
/// reductions are compiled with the backend's instructions too: the compiler
/// vectorizes them without reordering any sum).
/// The row passes take several whole rows (`g` and `p` hold `cols` per row,
/// `rv` at least one entry per row) per dispatch.
enum Pass<'a, P, G> {
    /// The parameters' sum of squares.
    SqSum(&'a [P]),
    SqAcc(&'a [f32], &'a mut [f64; 8]),
    /// [`factor_update`]'s task: per row, the columns `j` of the params'
    /// squares (returned, summed in row order), the gradients' (into
    /// `row_sq`) and the gradients' column squares (into `col_sq`).
    Squares {
        p: &'a [P],
        g: &'a [G],
        cols: usize,
        j: Range<usize>,
        row_sq: &'a mut [f64],
        col_sq: &'a mut [f64],
    },
    /// Per row `sum(u^2)` into `out`; each `u` also into `u` unless empty.
    RowsUsq {
        rv: &'a [f32],
        cv: &'a [f32],
        rmean: f32,
        g: &'a [G],
        cols: usize,
        f: Factors,
        out: &'a mut [f64],
        u: &'a mut [f32],
    },
    RowsApply {
        rv: &'a [f32],
        cv: &'a [f32],
        rmean: f32,
        g: &'a [G],
        p: &'a mut [P],
        cols: usize,
        ap: Apply,
    },
    /// `sum(u^2)`; each `u` also into `u` unless empty.
    VecUsq {
        v: &'a mut [f32],
        g: &'a [G],
        w: Lerp,
        f: Factors,
        u: &'a mut [f32],
    },
    ApplyStored {
        u: &'a [f32],
        p: &'a mut [P],
        ap: Apply,
    },
    /// [`small_usq`] over a group of whole matrices.
    SmallUsq {
        p: &'a [P],
        g: &'a [G],
        rows: usize,
        cols: usize,
        rv: &'a mut [f32],
        cv: &'a mut [f32],
        w: Lerp,
        f: Factors,
        sums: &'a mut [(f64, f64)],
        u: &'a mut [f32],
    },
    /// The last pass, recomputing `u`, over a group of whole small matrices.
    SmallApply {
        rv: &'a [f32],
        cv: &'a [f32],
        g: &'a [G],
        p: &'a mut [P],
        rows: usize,
        cols: usize,
        ap: Apply,
    },
    /// `var = lerp(var, mean_sq(sum_sq, count), w)` per row or column.
    Stats {
        var: &'a mut [f32],
        sum_sq: &'a [f64],
        count: usize,
        w: Lerp,
    },
    VecApply {
        v: &'a [f32],
        g: &'a [G],
        p: &'a mut [P],
        ap: Apply,
    },
}

impl<P: Elem + Exact, G: Exact> LaneOp for Pass<'_, P, G> {
    type Out = f64;
    #[inline(always)]
    fn run<V: F32Vec>(self) -> f64 {
        match self {
            Pass::SqSum(x) => sq_sum::<V, P>(x),
            Pass::SqAcc(x, acc) => {
                sq_acc::<V, f32>(x, acc);
                0.0
            }
            Pass::Squares { p, g, cols, j, row_sq, col_sq } => squares::<V, P, G>(p, g, cols, j, row_sq, col_sq),
            Pass::RowsUsq { rv, cv, rmean, g, cols, f, out, u } => {
                rows_usq_lanes::<V, G>(rv, cv, rmean, g, cols, f, out, u);
                0.0
            }
            Pass::RowsApply { rv, cv, rmean, g, p, cols, ap } => {
                rows_apply_lanes::<V, P, G>(rv, cv, rmean, g, p, cols, ap);
                0.0
            }
            Pass::VecUsq { v, g, w, f, u } if u.is_empty() => vec_usq::<V, G, false>(v, g, w, f, u),
            Pass::VecUsq { v, g, w, f, u } => vec_usq::<V, G, true>(v, g, w, f, u),
            Pass::ApplyStored { u, p, ap } => {
                apply_stored::<V, P>(u, p, ap);
                0.0
            }
            Pass::Stats { var, sum_sq, count, w } => {
                stats(var, sum_sq, count, w);
                0.0
            }
            Pass::SmallUsq { p, g, rows, cols, rv, cv, w, f, sums, u } => {
                small_usq::<V, P, G>(p, g, rows, cols, rv, cv, w, f, sums, u);
                0.0
            }
            Pass::SmallApply { rv, cv, g, p, rows, cols, ap } => {
                let mm = rows * cols;
                let mats = p.chunks_mut(mm).zip(g.chunks(mm)).zip(rv.chunks(rows).zip(cv.chunks(cols)));
                for ((pm, gm), (rvm, cvm)) in mats {
                    rows_apply_lanes::<V, P, G>(rvm, cvm, row_mean(rvm, ap.f), gm, pm, cols, ap);
                }
                0.0
            }
            Pass::VecApply { v, g, p, ap } => {
                vec_apply::<V, P, G>(v, g, p, ap);
                0.0
            }
        }
    }
}

impl Lanes {
    fn sq_sum<T: Elem + Exact>(self, x: &[T]) -> f64 {
        dispatch(self.0, Pass::<'_, T, f32>::SqSum(x))
    }
    fn sq_acc(self, x: &[f32], acc: &mut [f64; 8]) {
        dispatch(self.0, Pass::<'_, f32, f32>::SqAcc(x, acc));
    }
    fn first_pass<P: Elem + Exact, G: Exact>(
        self,
        p: &[P],
        g: &[G],
        cols: usize,
        j: Range<usize>,
        row_sq: &mut [f64],
        col_sq: &mut [f64],
    ) -> f64 {
        dispatch(self.0, Pass::Squares { p, g, cols, j, row_sq, col_sq })
    }
    #[allow(clippy::too_many_arguments)]
    fn rows_usq<G: Exact>(
        self,
        rv: &[f32],
        cv: &[f32],
        rmean: f32,
        g: &[G],
        cols: usize,
        f: Factors,
        out: &mut [f64],
        u: &mut [f32],
    ) {
        let op: Pass<'_, f32, G> = Pass::RowsUsq { rv, cv, rmean, g, cols, f, out, u };
        dispatch(self.0, op);
    }
    #[allow(clippy::too_many_arguments)]
    fn rows_apply<P: Elem + Exact, G: Exact>(
        self,
        rv: &[f32],
        cv: &[f32],
        rmean: f32,
        g: &[G],
        p: &mut [P],
        cols: usize,
        ap: Apply,
    ) {
        dispatch(self.0, Pass::RowsApply { rv, cv, rmean, g, p, cols, ap });
    }
    fn vec_usq<G: Exact>(self, v: &mut [f32], g: &[G], w: Lerp, f: Factors, u: &mut [f32]) -> f64 {
        let op: Pass<'_, f32, G> = Pass::VecUsq { v, g, w, f, u };
        dispatch(self.0, op)
    }
    fn stats(self, var: &mut [f32], sum_sq: &[f64], count: usize, w: Lerp) {
        let op: Pass<'_, f32, f32> = Pass::Stats { var, sum_sq, count, w };
        dispatch(self.0, op);
    }
    fn apply_stored<P: Elem + Exact>(self, u: &[f32], p: &mut [P], ap: Apply) {
        let op: Pass<'_, P, f32> = Pass::ApplyStored { u, p, ap };
        dispatch(self.0, op);
    }
    fn vec_apply<P: Elem + Exact, G: Exact>(self, v: &[f32], g: &[G], p: &mut [P], ap: Apply) {
        dispatch(self.0, Pass::VecApply { v, g, p, ap });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `stats` over rows of one element takes `s as f32` for the norm's
    /// rounded square: for every f32 bit pattern of every 97th (all
    /// exponents, both signs, subnormals, infinities, NaN) and the edges,
    /// the general formula on its exact f64 square gives the same bits.
    #[test]
    fn one_element_rows_need_no_square_root() {
        let general = |s: f64| {
            let nrm = s.sqrt() as f32;
            (nrm * nrm) / 1.0
        };
        let edges = [0.0, -0.0, f32::MIN_POSITIVE, 1e-45, f32::MAX, f32::INFINITY, f32::NAN, 1.0, 3.0e19, 1.9e-23];
        let all = (0..=u32::MAX).step_by(97).map(f32::from_bits).chain(edges);
        for y in all {
            let s = f64::from(y) * f64::from(y);
            let (want, got) = (general(s), s as f32);
            assert!(want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()), "{y:e}: {got:e} want {want:e}");
        }
        // And through `stats` itself against the general path's formula.
        let ys = [0.5f32, -3.0e-20, 7.0e18, 1e-45, 0.0];
        let sums: Vec<f64> = ys.iter().map(|&y| f64::from(y) * f64::from(y)).collect();
        let w = Lerp::new(0.3);
        let mut got = vec![0.25f32; ys.len()];
        stats(&mut got, &sums, 1, w);
        for ((g, &s), y) in got.iter().zip(&sums).zip(ys) {
            assert_eq!(g.to_bits(), w.apply::<f32>(0.25, general(s)).to_bits(), "{y:e}");
        }
    }
}
