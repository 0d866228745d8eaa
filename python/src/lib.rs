//! `adaoptim._core`: the Rust side of the Python package.
//!
//! The Python layer (`adaoptim/torch.py`) owns every tensor: parameters,
//! gradients and optimizer state all live in torch tensors, so a `state_dict`
//! is plain torch. It checks each tensor (CPU, contiguous, float32, the
//! parameter's shape, no two tensors sharing memory) and then hands this
//! module the tensors' data pointers; [`step`] updates them all in place in
//! one parallel region with the GIL released. From the second step on, the
//! per-parameter loop runs here too ([`step_cached`]: the cache's conditions
//! compared in Rust, the Python loop only where one fails). A step's small
//! pieces are shared out with the calling thread working from the start
//! (`share`), which cut a 194-tensor step's fixed cost by about 200 µs on
//! this project's 2-core machine. No optimizer math lives here or in Python:
//! every element goes through the crate's free kernel
//! ([`AnyConfig::step_slices_with`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

mod share;

use adaoptim::adafactor::{self, AdafactorConfig, AdafactorState, UpdateBuffer};
use adaoptim::sparse::{self, SparseAdamConfig};
use adaoptim::storage::{Grads, ParamCopy, ParamRounding, Params, Q8_BLOCK, Q8State, QMap, StateBuf, bf16, f16};
use adaoptim::{AnyConfig, AuxState, Backend, Exec, MAX_AUX, MAX_STATE, MAX_STEP, StepOptions, clip};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyTuple};
use rayon::prelude::*;

/// Integers per tensor in [`step`]'s flat list: parameter, gradient, element
/// count, storage bits (see [`PARAM_BF16`]), `MAX_STATE` state pointers, the
/// step tensor (or 0), the step to use when there is no step tensor,
/// `MAX_AUX` scalar-state pointers, `MAX_STATE` absmax pointers (the 8-bit
/// states' per-block scales, else 0), the parameter copy (or 0).
const STRIDE: usize = 4 + MAX_STATE + 2 + MAX_AUX + MAX_STATE + 1;

/// The storage bits of a tensor in [`step`]'s list (a clear bit is float32):
/// bit 0 a bfloat16 parameter; bit 1 a bfloat16 gradient, bit 2 a float16
/// one (torch's `grad_dtype` lets a gradient differ from its parameter);
/// bit `STATE_BITS + i` a bfloat16 state buffer `i`; bit `Q8_BITS + i` an
/// 8-bit block-wise state buffer `i` (uint8 codes, float32 absmax per block
/// of 256) with bitsandbytes' signed dynamic map, or its unsigned one when
/// bit `UNSIGNED_BITS + i` is set too; `COPY_BF16`/`COPY_F16` a bfloat16 or
/// float16 copy of the float32 parameter (its master weights) written in the
/// same pass.
const PARAM_BF16: usize = 1;
const GRAD_BF16: usize = 1 << 1;
const GRAD_F16: usize = 1 << 2;
const STATE_BITS: usize = 3;
const Q8_BITS: usize = STATE_BITS + MAX_STATE;
const UNSIGNED_BITS: usize = Q8_BITS + MAX_STATE;
const COPY_BF16: usize = 1 << (UNSIGNED_BITS + MAX_STATE);
const COPY_F16: usize = COPY_BF16 << 1;
/// Every storage bit a tensor may carry.
const ALL_BITS: usize = (COPY_F16 << 1) - 1;

/// Elements per piece of work: mid-sized tensors are cut so that every
/// thread gets a share, small ones go whole. Element-wise kernels give the
/// same bits for any cut.
const PIECE: usize = 1 << 16;
// An 8-bit state's blocks must not straddle two pieces.
const _: () = assert!(PIECE.is_multiple_of(Q8_BLOCK));

/// A tensor this large is stepped on its own by the crate's parallel driver
/// (which splits it by thread), before the pieces of the others.
const BIG: usize = 1 << 21;

/// A lock that a panic elsewhere does not poison for us.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

fn config(class: &str, options: &str) -> PyResult<AnyConfig> {
    let cfg = AnyConfig::from_torch_json(class, options).map_err(|e| PyValueError::new_err(e.to_string()))?;
    cfg.validate().map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(cfg)
}

/// The torch keyword options `class` takes.
#[pyfunction]
fn option_names(class: &str) -> PyResult<Vec<&'static str>> {
    let cfg = AnyConfig::default_for(class).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(cfg.options().into_iter().map(|(k, _)| k).collect())
}

/// State names, their initial values, scalar-state names, their initial values.
type Layout = (Vec<&'static str>, Vec<f32>, Vec<&'static str>, Vec<f32>);

/// `(state names, initial values, scalar-state names, their initial values)`
/// for a configuration given as torch keyword JSON; `ValueError` for an
/// invalid one (torch's message where torch has one).
#[pyfunction]
fn layout(class: &str, options: &str) -> PyResult<Layout> {
    let cfg = config(class, options)?;
    let names = cfg.state_names();
    let init = (0..names.len()).map(|i| cfg.state_init(i)).collect();
    let aux_names = cfg.aux_names();
    let aux_init = cfg.aux_init()[..aux_names.len()].to_vec();
    Ok((names.to_vec(), init, aux_names.to_vec(), aux_init))
}

/// The torch class names this build implements.
#[pyfunction]
fn torch_classes() -> Vec<&'static str> {
    AnyConfig::TORCH_CLASSES.to_vec()
}

/// Uses `n` threads for every later step (0: rayon's default, one per core).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    let pool = if n == 0 {
        None
    } else {
        let p = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Some(Arc::new(p))
    };
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = pool;
    Ok(())
}

/// The backend steps run on (`avx512`, `avx2`, `wide` or `scalar`).
#[pyfunction]
fn backend() -> &'static str {
    Backend::best().name()
}

/// One tensor's work: a piece of its elements and its own copies of the step
/// count and scalar state.
struct Piece {
    group: usize,
    tensor: usize,
    t: u64,
    aux: AuxState,
    p: Params<'static>,
    g: Grads<'static>,
    s: Vec<StateBuf<'static>>,
    /// The half-precision copy of float32 master parameters, if any.
    copy: Option<ParamCopy<'static>>,
    /// How bf16 parameters round (stochastic rounding: seed = the tensor's
    /// index, offset = the piece's start).
    rounding: ParamRounding,
    /// A whole tensor of at least `BIG` elements.
    big: bool,
}

/// Steps every tensor of every group once.
///
/// `groups` holds, per parameter group, its hyperparameters as torch keyword
/// JSON and a flat list of `STRIDE` integers per tensor (see the constant).
/// A bfloat16 parameter, a bfloat16 or float16 gradient and bfloat16 state
/// are widened, stepped in float32 and rounded back to nearest-even in the
/// same pass ([`adaoptim::step_mixed`]); all-float32 tensors take the f32
/// step.
/// Everything is checked before any memory is touched: hyperparameters
/// (`ValueError`), step counts (`ValueError` past torch's float32 step
/// limit). Returns nothing; steps and scalar states are written through their
/// pointers.
///
/// # Safety contract (Python side)
/// Every pointer is the data pointer of a live, contiguous CPU tensor of the
/// stated length, of the dtype its storage bits say (0-d float32
/// for the step and scalar states; uint8 codes and `n.div_ceil(256)` float32
/// absmax for an 8-bit state; the copy bfloat16 or float16), no two
/// tensors overlap, and none is touched by another thread during the call.
/// `adaoptim.torch` checks all of this before calling; this module is
/// private (`_core`).
///
/// The fused controls (the Python constructor's options): `grad_scale`
/// divides every gradient by a loss scale inside the step; `max_norm` clips
/// by the global L2 norm of all the (unscaled) gradients, torch's
/// `clip_grad_norm_` factor multiplied in inside the step; with
/// `skip_non_finite`, a NaN or infinite gradient anywhere skips the whole
/// step (nothing written, steps not counted), as `GradScaler` skips it.
/// With `stochastic_round` (one counter per group: how many steps the
/// group has taken with stochastic rounding), bfloat16 parameters round
/// stochastically ([`ParamRounding::Stochastic`], seed = the group's counter
/// in the high 32 bits and the tensor's index in the call, counting across
/// groups, in the low; offset = the piece's start), float32 ones as always.
/// The counter keys the stream for classes without a step count (SGD).
/// Returns whether the step ran.
#[pyfunction]
#[pyo3(signature = (class, groups, grad_scale=None, max_norm=None, skip_non_finite=false, stochastic_round=None))]
fn step(
    py: Python<'_>,
    class: &str,
    groups: Vec<(String, Vec<usize>)>,
    grad_scale: Option<f32>,
    max_norm: Option<f64>,
    skip_non_finite: bool,
    stochastic_round: Option<Vec<u64>>,
) -> PyResult<bool> {
    run_step(py, class, &groups, grad_scale, max_norm, skip_non_finite, stochastic_round)
}

/// `ValueError` for a fused control out of range.
fn check_controls(grad_scale: Option<f32>, max_norm: Option<f64>) -> PyResult<()> {
    if let Some(s) = grad_scale.filter(|s| !(s.is_finite() && *s != 0.0)) {
        return Err(PyValueError::new_err(format!("grad_scale {s} must be finite and nonzero")));
    }
    if let Some(m) = max_norm.filter(|m| !(m.is_finite() && *m > 0.0)) {
        return Err(PyValueError::new_err(format!("max_grad_norm {m} must be finite and > 0")));
    }
    Ok(())
}

/// [`step`]'s body, shared with [`step_cached`].
fn run_step(
    py: Python<'_>,
    class: &str,
    groups: &[(String, Vec<usize>)],
    grad_scale: Option<f32>,
    max_norm: Option<f64>,
    skip_non_finite: bool,
    stochastic_round: Option<Vec<u64>>,
) -> PyResult<bool> {
    if stochastic_round.as_ref().is_some_and(|c| c.len() != groups.len()) {
        return Err(PyValueError::new_err("internal: one stochastic-rounding counter per group"));
    }
    check_controls(grad_scale, max_norm)?;
    let mut configs = Vec::with_capacity(groups.len());
    let mut pieces: Vec<Piece> = Vec::new();
    // Where each tensor writes back: (step pointer, aux pointers, aux count).
    let mut writeback: Vec<(usize, [usize; MAX_AUX], usize)> = Vec::new();
    for (gi, (options, flat)) in groups.iter().enumerate() {
        let cfg = config(class, options)?;
        if flat.len() % STRIDE != 0 {
            return Err(PyValueError::new_err("internal: tensor list of the wrong stride"));
        }
        let k = cfg.state_names().len();
        let n_aux = cfg.aux_names().len();
        for e in flat.chunks_exact(STRIDE) {
            let (p_ptr, g_ptr, n, dtypes) = (e[0], e[1], e[2], e[3]);
            let state_ptrs = &e[4..4 + MAX_STATE];
            let (step_ptr, step_given) = (e[4 + MAX_STATE], e[5 + MAX_STATE]);
            let aux_ptrs: [usize; MAX_AUX] = std::array::from_fn(|i| e[6 + MAX_STATE + i]);
            let absmax_ptrs = &e[6 + MAX_STATE + MAX_AUX..6 + 2 * MAX_STATE + MAX_AUX];
            let copy_ptr = e[6 + 2 * MAX_STATE + MAX_AUX];
            let q8 = |i: usize| dtypes & (1 << (Q8_BITS + i)) != 0;
            let copy = dtypes & (COPY_BF16 | COPY_F16) != 0;
            if aux_ptrs[..n_aux].contains(&0)
                || (n > 0
                    && (p_ptr == 0
                        || g_ptr == 0
                        || state_ptrs[..k].contains(&0)
                        || (0..k).any(|i| q8(i) && absmax_ptrs[i] == 0)
                        || (copy && copy_ptr == 0)))
            {
                return Err(PyValueError::new_err("internal: null tensor pointer"));
            }
            // Per state: at most one of bf16 and 8-bit, the map bit only on
            // an 8-bit one, nothing past the class's state count; one copy
            // at most, beside float32 parameters.
            let per_state = |base: usize| (dtypes >> base) & ((1 << MAX_STATE) - 1);
            let (bf16s, q8s, unsigned) = (per_state(STATE_BITS), per_state(Q8_BITS), per_state(UNSIGNED_BITS));
            if dtypes & !ALL_BITS != 0
                || (bf16s | q8s) >> k != 0
                || bf16s & q8s != 0
                || unsigned & !q8s != 0
                || dtypes & (GRAD_BF16 | GRAD_F16) == GRAD_BF16 | GRAD_F16
                || dtypes & (COPY_BF16 | COPY_F16) == COPY_BF16 | COPY_F16
                || (copy && dtypes & PARAM_BF16 != 0)
            {
                return Err(PyValueError::new_err("internal: bad storage bits"));
            }
            // An empty tensor's data pointer may be null; its slices are empty.
            // (A dangling pointer aligned for f32 is aligned for bf16 too.)
            let dangling = std::ptr::NonNull::<f32>::dangling().as_ptr() as usize;
            let fix = |ptr: usize| if n == 0 { dangling } else { ptr };
            let (p_ptr, g_ptr, copy_ptr) = (fix(p_ptr), fix(g_ptr), fix(copy_ptr));
            let state_ptrs: [usize; MAX_STATE] = std::array::from_fn(|i| fix(state_ptrs[i]));
            let absmax_ptrs: [usize; MAX_STATE] = std::array::from_fn(|i| fix(absmax_ptrs[i]));
            // SAFETY: the step tensor is a live 0-d float32 tensor (contract above).
            let t_old = if step_ptr != 0 { f64::from(unsafe { *(step_ptr as *const f32) }) } else { step_given as f64 };
            // torch keeps the step in float32; past 2^24 its count stops
            // moving. A given count (bitsandbytes keeps a Python int) has
            // the crate's limit only.
            let limit = if step_ptr != 0 { (1u64 << 24) as f64 } else { MAX_STEP as f64 };
            if !(t_old >= 0.0 && t_old < limit && t_old.fract() == 0.0) || t_old as u64 >= MAX_STEP {
                let range = if step_ptr != 0 {
                    "a float32 integer in [0, 2^24)".to_string()
                } else {
                    format!("below {MAX_STEP}")
                };
                return Err(PyValueError::new_err(format!("step count {t_old} is not {range}")));
            }
            let mut aux: AuxState = [0.0; MAX_AUX];
            for i in 0..n_aux {
                // SAFETY: a live 0-d float32 tensor (contract above).
                aux[i] = unsafe { *(aux_ptrs[i] as *const f32) };
            }
            let tensor = writeback.len();
            writeback.push((step_ptr, aux_ptrs, n_aux));
            let t = t_old as u64 + 1;
            let mut off = 0;
            let cut = if n >= BIG { n } else { PIECE };
            loop {
                let len = cut.min(n - off);
                // SAFETY: each pointer addresses `n` f32 of a tensor no other
                // tensor overlaps; the pieces of one tensor are disjoint ranges
                // `off..off + len`, so every `&mut` slice is unique. The
                // `'static` lifetime never escapes this call: the pieces are
                // dropped before it returns, while Python keeps the tensors alive.
                // Each pointer's element type is the one its storage bit
                // names (checked by the Python side against the tensor's dtype).
                // An 8-bit state's absmax holds `n.div_ceil(256)` float32;
                // `off` is a multiple of 256 (`PIECE` is), so a piece's
                // blocks are its own.
                let piece = unsafe {
                    Piece {
                        group: gi,
                        tensor,
                        t,
                        aux,
                        p: if dtypes & PARAM_BF16 != 0 {
                            Params::Bf16(part_mut(p_ptr, off, len))
                        } else {
                            Params::F32(part_mut(p_ptr, off, len))
                        },
                        g: if dtypes & GRAD_BF16 != 0 {
                            Grads::Bf16(part(g_ptr, off, len))
                        } else if dtypes & GRAD_F16 != 0 {
                            Grads::F16(part(g_ptr, off, len))
                        } else {
                            Grads::F32(part(g_ptr, off, len))
                        },
                        s: state_ptrs[..k]
                            .iter()
                            .enumerate()
                            .map(|(i, &s)| {
                                if dtypes & (1 << (STATE_BITS + i)) != 0 {
                                    StateBuf::Bf16(part_mut(s, off, len))
                                } else if q8(i) {
                                    StateBuf::Q8(Q8State {
                                        codes: part_mut(s, off, len),
                                        absmax: part_mut(absmax_ptrs[i], off / Q8_BLOCK, len.div_ceil(Q8_BLOCK)),
                                        map: if unsigned & (1 << i) != 0 { QMap::unsigned() } else { QMap::signed() },
                                    })
                                } else {
                                    StateBuf::F32(part_mut(s, off, len))
                                }
                            })
                            .collect(),
                        copy: if dtypes & COPY_BF16 != 0 {
                            Some(ParamCopy::Bf16(part_mut(copy_ptr, off, len)))
                        } else if dtypes & COPY_F16 != 0 {
                            Some(ParamCopy::F16(part_mut(copy_ptr, off, len)))
                        } else {
                            None
                        },
                        rounding: match &stochastic_round {
                            Some(counts) if dtypes & PARAM_BF16 != 0 => ParamRounding::Stochastic {
                                seed: counts[gi] << 32 | (tensor as u64 & 0xffff_ffff),
                                offset: off as u64,
                            },
                            _ => ParamRounding::Nearest,
                        },
                        big: n >= BIG,
                    }
                };
                pieces.push(piece);
                off += len;
                if off >= n {
                    break;
                }
            }
        }
        configs.push(cfg);
    }
    let pool = POOL.read().unwrap_or_else(|e| e.into_inner()).clone();
    let pool = pool.as_deref();
    // A tensor of at least `BIG` elements is one piece, stepped by the
    // crate's parallel driver inside the pool; the others' pieces are
    // shared out (`share`), each stepped serially.
    let in_pool = |f: &mut (dyn FnMut() + Send)| match pool {
        Some(pool) => pool.install(f),
        None => f(),
    };
    // The global sum of squares when clipping or guarding: per piece (each
    // over the crate's fixed tree), then the pieces in order, so the bits do
    // not depend on the thread count.
    let mut clip_coef = None;
    if max_norm.is_some() || skip_non_finite {
        let sums: Vec<Mutex<Result<f64, String>>> = pieces.iter().map(|_| Mutex::new(Ok(0.0))).collect();
        let sum = |i: usize, exec: &Exec| {
            *lock(&sums[i]) = clip::sum_of_squares_unscaled(pieces[i].g, grad_scale, exec).map_err(|e| e.to_string());
        };
        let (big, small): (Vec<usize>, Vec<usize>) = (0..pieces.len()).partition(|&i| pieces[i].big);
        py.detach(|| {
            if !big.is_empty() {
                in_pool(&mut || big.iter().for_each(|&i| sum(i, &Exec::parallel(Backend::best(), 0))));
            }
            share::share(pool, small.len(), &|j| sum(small[j], &Exec::serial(Backend::best())));
        });
        let mut total = 0.0;
        for s in sums {
            total += s.into_inner().unwrap_or_else(|e| e.into_inner()).map_err(PyRuntimeError::new_err)?;
        }
        if skip_non_finite && !total.is_finite() {
            return Ok(false);
        }
        // A factor of 1 changes no bits; skip the multiply, as the crate does.
        clip_coef = max_norm.map(|m| clip::clip_coef(total.sqrt(), m)).filter(|&c| c != 1.0);
    }
    let serial = StepOptions { exec: Exec::serial(Backend::best()), grad_scale, clip_coef, ..Default::default() };
    let parallel =
        StepOptions { exec: Exec::parallel(Backend::best(), 0), grad_scale, clip_coef, ..Default::default() };
    let one = |pc: &mut Piece, options: &StepOptions| -> Result<(), String> {
        let mut state: Vec<StateBuf<'_>> = pc.s.iter_mut().map(StateBuf::reborrow).collect();
        let options = StepOptions { param_rounding: pc.rounding, ..*options };
        configs[pc.group]
            .step_mixed(
                pc.t,
                &mut pc.aux,
                pc.p.reborrow(),
                pc.g,
                &mut state,
                pc.copy.as_mut().map(ParamCopy::reborrow),
                &options,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let (big, small): (Vec<&mut Piece>, Vec<&mut Piece>) = pieces.iter_mut().partition(|pc| pc.big);
    // Each piece is claimed once; its lock is never contended.
    let small: Vec<Mutex<&mut Piece>> = small.into_iter().map(Mutex::new).collect();
    let mut big = big;
    py.detach(|| {
        if !big.is_empty() {
            in_pool(&mut || {
                for pc in big.iter_mut() {
                    if let Err(e) = one(pc, &parallel) {
                        lock(&failed).get_or_insert(e);
                    }
                }
            });
        }
        let f = |i: usize| {
            if let Err(e) = one(&mut lock(&small[i]), &serial) {
                lock(&failed).get_or_insert(e);
            }
        };
        share::share(pool, small.len(), &f);
    });
    let result = match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    };
    // Only a length mismatch could fail here, and lengths are built above;
    // an error would mean a bug, reported rather than hidden.
    result.map_err(PyRuntimeError::new_err)?;
    // Every piece of a tensor left the same step and scalar state; the first
    // piece of each tensor writes them back.
    let mut done = vec![false; writeback.len()];
    for pc in &pieces {
        if std::mem::replace(&mut done[pc.tensor], true) {
            continue;
        }
        let (step_ptr, aux_ptrs, n_aux) = writeback[pc.tensor];
        // SAFETY: live 0-d float32 tensors (contract above); `t < 2^24 + 1`
        // converts exactly.
        unsafe {
            if step_ptr != 0 {
                *(step_ptr as *mut f32) = pc.t as f32;
            }
            for (&ptr, &x) in aux_ptrs[..n_aux].iter().zip(&pc.aux) {
                *(ptr as *mut f32) = x;
            }
        }
    }
    Ok(true)
}

/// What [`cached_tensor`] found for one parameter.
enum Cached {
    /// No gradient: the parameter is skipped, as torch skips it.
    NoGrad,
    /// Not stepped from the cache: the Python loop must run.
    Miss,
}

/// Index of the step count given in a tensor's integers (used when the
/// state keeps no step tensor: bitsandbytes' integer `step`).
const STEP_GIVEN: usize = 5 + MAX_STATE;

/// The integers of one parameter in [`step`]'s list, from the cache entry
/// `adaoptim.torch` made for it, if every one of that entry's conditions
/// still holds (the same conditions as the Python loop's): a strided,
/// contiguous gradient of the cached dtype and element count; the same
/// parameter object, memory and dtype; the group's state keys; the same
/// state dict and the same state tensors in it. Anything else, or any
/// Python error on the way, is a [`Cached::Miss`]: the Python loop then
/// redoes the whole step with its checks and messages.
///
/// An entry is the tuple `(p, keys, ints, numel, st, held, data_ptr,
/// grad dtype, param dtype, packed, dtensor)`: `packed` is the tensor's
/// `STRIDE` integers as native-endian 64-bit ones, the gradient pointer
/// left 0; with `dtensor` (a DTensor parameter, as FSDP2 hands over) the
/// pointer, size and dtypes are the local parts' (`_local_tensor`) of the
/// parameter and its gradient. With 8-bit state or master weights
/// (`cx.lowbit`), two more: the state keys `held` follows (instead of the
/// group's keys) and the code maps with their version counters; the state's `step` must be a Python int (it is
/// given in the integers and counted back by [`step_cached`]), and a
/// half-precision parameter with a float32 master must not have been
/// written since the last step (that reseeds its master: the Python loop's
/// work).
fn cached_tensor<'py>(
    py: Python<'py>,
    p: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyAny>,
    cx: &CacheContext<'_, 'py>,
    flat: &mut Vec<usize>,
    counted: &mut Vec<Counted<'py>>,
) -> Result<(), Cached> {
    let miss = |_| Cached::Miss;
    let g = p.getattr(pyo3::intern!(py, "grad")).map_err(miss)?;
    if g.is_none() {
        return Err(Cached::NoGrad);
    }
    let entry = cx.cache.get_item(p.as_ptr() as usize).map_err(miss)?.ok_or(Cached::Miss)?;
    let entry = entry.cast_into::<PyTuple>().map_err(|_| Cached::Miss)?;
    if entry.len() != if cx.lowbit.is_some() { 13 } else { 11 } {
        return Err(Cached::Miss);
    }
    let item = |i: usize| entry.get_item(i).map_err(miss);
    if !item(0)?.is(p) || !item(1)?.is(keys) {
        return Err(Cached::Miss);
    }
    // A DTensor parameter (FSDP2) is stepped through its local part, and so
    // is its gradient.
    let (pl, gl) = if item(10)?.is_truthy().map_err(miss)? {
        let local = pyo3::intern!(py, "_local_tensor");
        (p.getattr(local).map_err(miss)?, g.getattr(local).map_err(miss)?)
    } else {
        (p.clone(), g.clone())
    };
    let ptr: usize = pl.call_method0(pyo3::intern!(py, "data_ptr")).and_then(|x| x.extract()).map_err(miss)?;
    let p_dtype = pl.getattr(pyo3::intern!(py, "dtype")).map_err(miss)?;
    let same = gl.getattr(pyo3::intern!(py, "layout")).map_err(miss)?.is(cx.strided)
        && gl.getattr(pyo3::intern!(py, "dtype")).map_err(miss)?.is(&item(7)?)
        && p_dtype.is(&item(8)?)
        && item(6)?.extract::<usize>().map_err(miss)? == ptr
        && gl.call_method0(pyo3::intern!(py, "numel")).map_err(miss)?.eq(item(3)?).map_err(miss)?
        && gl.call_method0(pyo3::intern!(py, "is_contiguous")).map_err(miss)?.is_truthy().map_err(miss)?;
    if !same {
        return Err(Cached::Miss);
    }
    // The parameter's state dict, by identity (`None` in `state` is the
    // shared empty dict of a class without state).
    let st = item(4)?;
    match cx.state_of.get(&(p.as_ptr() as usize)) {
        Some(now) if now.is(&st) => {}
        None if st.is(cx.no_state) => {}
        _ => return Err(Cached::Miss),
    }
    let st = st.cast_into::<PyDict>().map_err(|_| Cached::Miss)?;
    let held = item(5)?.cast_into::<PyTuple>().map_err(|_| Cached::Miss)?;
    let held_keys = if cx.lowbit.is_some() { item(11)? } else { keys.clone() };
    let held_keys = held_keys.cast_into::<PyTuple>().map_err(|_| Cached::Miss)?;
    if held.len() != held_keys.len() {
        return Err(Cached::Miss);
    }
    for (k, h) in held_keys.iter().zip(held.iter()) {
        match st.get_item(k).map_err(miss)? {
            Some(now) if now.is(&h) => {}
            _ => return Err(Cached::Miss),
        }
    }
    let packed = item(9)?;
    let packed = packed.cast::<PyBytes>().map_err(|_| Cached::Miss)?.as_bytes();
    if packed.len() != STRIDE * 8 {
        return Err(Cached::Miss);
    }
    let start = flat.len();
    flat.extend(packed.chunks_exact(8).map(|b| u64::from_ne_bytes(b.try_into().unwrap()) as usize));
    flat[start + 1] = gl.call_method0(pyo3::intern!(py, "data_ptr")).and_then(|x| x.extract()).map_err(miss)?;
    if let Some(low) = &cx.lowbit {
        // The code maps, also by version (an in-place change of a map is a
        // new map to check).
        let maps = item(12)?.cast_into::<PyTuple>().map_err(|_| Cached::Miss)?;
        for pair in maps.iter() {
            let (q, v): (Bound<'_, PyAny>, i64) = pair.extract().map_err(miss)?;
            if q.getattr(pyo3::intern!(py, "_version")).and_then(|x| x.extract::<i64>()).map_err(miss)? != v {
                return Err(Cached::Miss);
            }
        }
        let step = st.get_item(pyo3::intern!(py, "step")).map_err(miss)?.ok_or(Cached::Miss)?;
        if !step.is_exact_instance_of::<PyInt>() {
            return Err(Cached::Miss);
        }
        let step: u64 = step.extract().map_err(miss)?;
        flat[start + STEP_GIVEN] = usize::try_from(step).map_err(|_| Cached::Miss)?;
        let mut master = false;
        if !p_dtype.is(low.f32) && st.get_item(pyo3::intern!(py, "master_param")).map_err(miss)?.is_some() {
            master = true;
            if let Some(seen) = low.written.get_item(p.as_ptr() as usize).map_err(miss)? {
                let (q, version, at): (Bound<'_, PyAny>, i64, usize) = seen.extract().map_err(miss)?;
                let now: i64 = p.getattr(pyo3::intern!(py, "_version")).and_then(|x| x.extract()).map_err(miss)?;
                if q.is(p) && (version != now || at != ptr) {
                    return Err(Cached::Miss);
                }
            }
        }
        counted.push(Counted { p: p.clone(), st, step, master, ptr });
    }
    Ok(())
}

/// A parameter stepped with 8-bit state or master weights, for the
/// bookkeeping after the step: its state's `step` (counted when the step
/// ran) and, with a master, the parameter as the step left it.
struct Counted<'py> {
    p: Bound<'py, PyAny>,
    st: Bound<'py, PyDict>,
    step: u64,
    master: bool,
    ptr: usize,
}

/// What [`cached_tensor`] compares against, besides the entry.
struct CacheContext<'a, 'py> {
    cache: &'a Bound<'py, PyDict>,
    /// The optimizer's `state`, by the address of each key: read once per
    /// step in the dict's order, with no hashing (torch's `Tensor.__hash__`
    /// is a Python function; one call per parameter cost more than the
    /// rest of a lookup).
    state_of: HashMap<usize, Bound<'py, PyAny>>,
    no_state: &'a Bound<'py, PyAny>,
    strided: &'a Bound<'py, PyAny>,
    /// For 8-bit state or master weights: `(written, torch.float32)`, the
    /// optimizer's record of each half-precision parameter as the last
    /// step left it (`id(p) -> (p, p._version, p.data_ptr())`).
    lowbit: Option<LowbitContext<'a, 'py>>,
}

/// See [`CacheContext::lowbit`].
struct LowbitContext<'a, 'py> {
    written: &'a Bound<'py, PyDict>,
    f32: &'a Bound<'py, PyAny>,
}

/// [`step`] for the parameters `adaoptim.torch` has cached: the same call,
/// with the per-parameter loop in Rust instead of Python. `groups` holds,
/// per group, its options JSON, its parameter list and its state keys
/// (the tuple the cache entries hold); `cache` maps `id(p)` to the entry
/// described at [`cached_tensor`], `state` is the optimizer's state,
/// `no_state` the shared empty dict of a class without state, `strided`
/// torch's `torch.strided`.
///
/// Returns `None`, having touched nothing, when any parameter with a
/// gradient is not stepped from its cache entry (a first step, a sparse or
/// non-contiguous gradient, replaced state, a moved parameter, ...): the
/// caller then runs its Python loop, which checks everything and names what
/// is wrong. Otherwise it returns what [`step`] returns.
///
/// # Safety contract (Python side)
/// [`step`]'s: a cache entry is made only after its tensors were checked,
/// and holds every state tensor alive; the conditions compared here are the
/// ones under which the Python loop reuses an entry.
#[pyfunction]
#[pyo3(signature = (class, groups, cache, state, no_state, strided, grad_scale=None, max_norm=None, skip_non_finite=false, stochastic_round=None, lowbit=None))]
#[allow(clippy::too_many_arguments)]
fn step_cached(
    py: Python<'_>,
    class: &str,
    groups: Vec<(String, Bound<'_, PyList>, Bound<'_, PyAny>)>,
    cache: Bound<'_, PyDict>,
    state: Bound<'_, PyDict>,
    no_state: Bound<'_, PyAny>,
    strided: Bound<'_, PyAny>,
    grad_scale: Option<f32>,
    max_norm: Option<f64>,
    skip_non_finite: bool,
    stochastic_round: Option<Vec<u64>>,
    lowbit: Option<(Bound<'_, PyDict>, Bound<'_, PyAny>)>,
) -> PyResult<Option<bool>> {
    let state_of = state.iter().map(|(k, v)| (k.as_ptr() as usize, v)).collect();
    let lowbit_cx = lowbit.as_ref().map(|(written, f32)| LowbitContext { written, f32 });
    let cx = CacheContext { cache: &cache, state_of, no_state: &no_state, strided: &strided, lowbit: lowbit_cx };
    let mut flat_groups = Vec::with_capacity(groups.len());
    let mut counted = Vec::new();
    for (options, params, keys) in groups {
        let mut flat = Vec::with_capacity(params.len() * STRIDE);
        for p in params.iter() {
            match cached_tensor(py, &p, &keys, &cx, &mut flat, &mut counted) {
                Ok(()) | Err(Cached::NoGrad) => {}
                Err(Cached::Miss) => return Ok(None),
            }
        }
        flat_groups.push((options, flat));
    }
    let ran = run_step(py, class, &flat_groups, grad_scale, max_norm, skip_non_finite, stochastic_round)?;
    // The Python loop's bookkeeping after a step with 8-bit state or master
    // weights: a half-precision parameter as the step left it (its version
    // counter does not move: the step writes through its pointer), and the
    // state's integer step counted when the step ran.
    if let Some((written, _)) = &lowbit {
        for c in counted {
            if c.master {
                let version = c.p.getattr(pyo3::intern!(py, "_version"))?;
                written.set_item(c.p.as_ptr() as usize, (&c.p, version, c.ptr))?;
            }
            if ran {
                c.st.set_item(pyo3::intern!(py, "step"), c.step + 1)?;
            }
        }
    }
    Ok(Some(ran))
}

/// Quantizes `n` float32 values at `src` into an 8-bit block-wise state:
/// `n` uint8 codes at `codes` and `n.div_ceil(256)` float32 absmax at
/// `absmax`, with bitsandbytes' signed dynamic map, or its unsigned one
/// (`unsigned`), rounding as a step does. How the package creates an 8-bit
/// state with a nonzero initial value and converts a float32 one.
///
/// # Safety contract (Python side)
/// Live contiguous CPU tensors of those dtypes and lengths, `src` not
/// overlapping the others, none touched by another thread during the call.
#[pyfunction]
fn q8_quantize(src: usize, n: usize, codes: usize, absmax: usize, unsigned: bool) -> PyResult<()> {
    if n == 0 {
        return Ok(());
    }
    if src == 0 || codes == 0 || absmax == 0 {
        return Err(PyValueError::new_err("internal: null tensor pointer"));
    }
    let map = if unsigned { QMap::unsigned() } else { QMap::signed() };
    // SAFETY: the contract above: three live, disjoint tensors of these lengths.
    let (src, codes, absmax) = unsafe {
        (part::<f32>(src, 0, n), part_mut::<u8>(codes, 0, n), part_mut::<f32>(absmax, 0, n.div_ceil(Q8_BLOCK)))
    };
    adaoptim::storage::quantize_blockwise(src, map, codes, absmax).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The float32 values of an 8-bit block-wise state (`q8_quantize`'s
/// layout) written to `n` float32 at `dst`.
///
/// # Safety contract (Python side)
/// As [`q8_quantize`]'s, with `dst` the tensor written.
#[pyfunction]
fn q8_dequantize(codes: usize, absmax: usize, n: usize, dst: usize, unsigned: bool) -> PyResult<()> {
    if n == 0 {
        return Ok(());
    }
    if dst == 0 || codes == 0 || absmax == 0 {
        return Err(PyValueError::new_err("internal: null tensor pointer"));
    }
    let map = if unsigned { QMap::unsigned() } else { QMap::signed() };
    // SAFETY: the contract above: three live, disjoint tensors of these lengths.
    let (codes, absmax, dst) =
        unsafe { (part::<u8>(codes, 0, n), part::<f32>(absmax, 0, n.div_ceil(Q8_BLOCK)), part_mut::<f32>(dst, 0, n)) };
    adaoptim::storage::dequantize_blockwise(codes, absmax, map, dst).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// bitsandbytes' dynamic code map (`create_dynamic_map(signed)`), the 256
/// values an 8-bit state's codes stand for.
#[pyfunction]
fn q8_map(signed: bool) -> Vec<f32> {
    let map = if signed { QMap::signed() } else { QMap::unsigned() };
    map.code().to_vec()
}

/// The code map adaoptim gives a state of this torch name (`True`: the
/// signed map; `False`: the unsigned one, for states never negative).
#[pyfunction]
fn q8_signed_for(name: &str) -> bool {
    std::ptr::eq(QMap::for_state(name), QMap::signed())
}

/// `len` elements of type `T` at element `off` of the tensor at `ptr`.
///
/// # Safety
/// `ptr` addresses a live tensor of at least `off + len` elements of `T`
/// (aligned, as torch's storage is), which nothing else reads or writes
/// while the slice lives.
unsafe fn part_mut<T>(ptr: usize, off: usize, len: usize) -> &'static mut [T] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut((ptr as *mut T).add(off), len) }
}

/// The shared-slice form of [`part_mut`].
///
/// # Safety
/// As [`part_mut`], except that others may read the elements too.
unsafe fn part<T>(ptr: usize, off: usize, len: usize) -> &'static [T] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts((ptr as *const T).add(off), len) }
}

/// Pointers per tensor in [`adafactor_step`]: parameter, gradient,
/// `row_var`, `col_var`, `variance` (0 where unused or empty), step.
const ADAFACTOR_PTRS: usize = 6;

/// One tensor of [`adafactor_step`]: its shape, pointers and dtype (0
/// float32, 1 bfloat16, 2 float16: the parameter's, its gradient's and its
/// state's; the step count is float32).
type AdafactorTensor = (Vec<usize>, [usize; ADAFACTOR_PTRS], u8);

/// One tensor's parameter, gradient and `row_var`/`col_var`/`variance` in
/// their dtype.
enum AdafactorBufs {
    F32 { p: &'static mut [f32], g: &'static [f32], s: [&'static mut [f32]; 3] },
    Bf16 { p: &'static mut [bf16], g: &'static [bf16], s: [&'static mut [bf16]; 3] },
    F16 { p: &'static mut [f16], g: &'static [f16], s: [&'static mut [f16]; 3] },
}

impl AdafactorBufs {
    /// # Safety
    /// As [`adafactor_step`]'s contract: each pointer addresses `lens[i]`
    /// elements of `dtype` of a live tensor no other overlaps, left alone
    /// by every other thread while the slices live.
    unsafe fn new(dtype: u8, ptrs: [usize; 5], lens: [usize; 5]) -> PyResult<Self> {
        // SAFETY: the caller's contract (a zero length takes no pointer).
        unsafe {
            Ok(match dtype {
                0 => AdafactorBufs::F32 {
                    p: part_mut(ptrs[0], 0, lens[0]),
                    g: part(ptrs[1], 0, lens[1]),
                    s: [part_mut(ptrs[2], 0, lens[2]), part_mut(ptrs[3], 0, lens[3]), part_mut(ptrs[4], 0, lens[4])],
                },
                1 => AdafactorBufs::Bf16 {
                    p: part_mut(ptrs[0], 0, lens[0]),
                    g: part(ptrs[1], 0, lens[1]),
                    s: [part_mut(ptrs[2], 0, lens[2]), part_mut(ptrs[3], 0, lens[3]), part_mut(ptrs[4], 0, lens[4])],
                },
                2 => AdafactorBufs::F16 {
                    p: part_mut(ptrs[0], 0, lens[0]),
                    g: part(ptrs[1], 0, lens[1]),
                    s: [part_mut(ptrs[2], 0, lens[2]), part_mut(ptrs[3], 0, lens[3]), part_mut(ptrs[4], 0, lens[4])],
                },
                other => return Err(PyValueError::new_err(format!("internal: Adafactor dtype code {other}"))),
            })
        }
    }

    fn grads(&self) -> Grads<'_> {
        match self {
            AdafactorBufs::F32 { g, .. } => Grads::F32(g),
            AdafactorBufs::Bf16 { g, .. } => Grads::Bf16(g),
            AdafactorBufs::F16 { g, .. } => Grads::F16(g),
        }
    }

    /// Steps with `step_slices_mixed`; half-precision state is widened into
    /// `f32` first and rounded back to nearest after the step (torch keeps
    /// Adafactor's state in the parameter's dtype).
    fn step(
        &mut self,
        cfg: &AdafactorConfig,
        shape: &[usize],
        t: u64,
        options: &StepOptions,
    ) -> Result<(), adaoptim::Error> {
        let run = |p: Params<'_>, g: Grads<'_>, s: [&mut [f32]; 3]| {
            let [row_var, col_var, variance] = s;
            let state = AdafactorState { row_var, col_var, variance, update: UpdateBuffer::Auto };
            adafactor::step_slices_mixed(cfg, shape, t, p, g, state, options)
        };
        match self {
            AdafactorBufs::F32 { p, g, s: [r, c, v] } => run(Params::F32(p), Grads::F32(g), [r, c, v]),
            AdafactorBufs::Bf16 { p, g, s } => {
                half_state(s, bf16::to_f32, bf16::from_f32, |w| run(Params::Bf16(p), Grads::Bf16(g), w))
            }
            AdafactorBufs::F16 { p, g, s } => {
                half_state(s, f16::to_f32, f16::from_f32, |w| run(Params::F16(p), Grads::F16(g), w))
            }
        }
    }
}

/// Runs `step` on `f32` copies of half-precision state buffers and, if it
/// succeeds, rounds them back.
fn half_state<H: Copy>(
    s: &mut [&'static mut [H]; 3],
    widen: fn(H) -> f32,
    narrow: fn(f32) -> H,
    step: impl FnOnce([&mut [f32]; 3]) -> Result<(), adaoptim::Error>,
) -> Result<(), adaoptim::Error> {
    let mut wide: [Vec<f32>; 3] = std::array::from_fn(|i| s[i].iter().map(|&x| widen(x)).collect());
    let [r, c, v] = &mut wide;
    step([r, c, v])?;
    for (dst, src) in s.iter_mut().zip(&wide) {
        dst.iter_mut().zip(src).for_each(|(d, &x)| *d = narrow(x));
    }
    Ok(())
}

fn adafactor_config(options: &str) -> PyResult<AdafactorConfig> {
    let v: serde_json::Value = serde_json::from_str(options).map_err(|e| PyValueError::new_err(e.to_string()))?;
    AdafactorConfig::from_torch_kwargs(&v).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Checks Adafactor's torch keyword JSON (`ValueError` naming the field).
#[pyfunction]
fn adafactor_check(options: &str) -> PyResult<()> {
    adafactor_config(options).map(|_| ())
}

/// One `torch.optim.Adafactor` step of every tensor of every group: per
/// group its keyword JSON and, per tensor, its shape and
/// [`ADAFACTOR_PTRS`] data pointers. Everything (hyperparameters, step
/// counts) is checked before any memory is touched; the tensors then run
/// in parallel over the pool, each also split inside, with the GIL released.
/// The fused controls are [`step`]'s: `grad_scale` divided out of every
/// gradient, clipping by the global norm over every gradient (each tensor's
/// sum of squares in the crate's fixed order, added in tensor order), and
/// with `skip_non_finite` a non-finite norm skips the step before anything
/// is written; `stochastic_round` (one counter per group) rounds bfloat16
/// parameters stochastically, keyed as [`step`] keys them (the group's
/// counter in the high 32 bits, the tensor's index in the call in the low;
/// the tensor's step count). Returns whether the step ran.
///
/// # Safety contract (Python side)
/// As [`step`]'s: live, contiguous CPU tensors of the sizes the shape gives
/// (`row_var` `[.., rows, 1]`, `col_var` `[.., 1, cols]` for two or more
/// dimensions, else `variance` of the parameter's size; the step 0-d
/// float32), the parameter, gradient and state of the tensor's dtype code,
/// none overlapping, none touched by another thread during the call.
#[pyfunction]
#[pyo3(signature = (groups, grad_scale=None, max_norm=None, skip_non_finite=false, stochastic_round=None))]
fn adafactor_step(
    py: Python<'_>,
    groups: Vec<(String, Vec<AdafactorTensor>)>,
    grad_scale: Option<f32>,
    max_norm: Option<f64>,
    skip_non_finite: bool,
    stochastic_round: Option<Vec<u64>>,
) -> PyResult<bool> {
    check_controls(grad_scale, max_norm)?;
    if stochastic_round.as_ref().is_some_and(|c| c.len() != groups.len()) {
        return Err(PyValueError::new_err("internal: one stochastic-rounding counter per group"));
    }
    struct Work {
        cfg: AdafactorConfig,
        shape: Vec<usize>,
        t: u64,
        bufs: AdafactorBufs,
        step_ptr: usize,
        rounding: ParamRounding,
    }
    let mut work = Vec::new();
    for (gi, (options, tensors)) in groups.iter().enumerate() {
        let cfg = adafactor_config(options)?;
        for (shape, ptrs, dtype) in tensors {
            let (n, rl, cl, vl) =
                adafactor::state_sizes(shape).ok_or_else(|| PyValueError::new_err("shape overflows"))?;
            let lens = [n, n, rl, cl, vl];
            if ptrs[5] == 0 || lens.iter().zip(ptrs).any(|(&len, &ptr)| len > 0 && ptr == 0) {
                return Err(PyValueError::new_err("internal: null tensor pointer"));
            }
            // SAFETY: a live 0-d float32 tensor (contract above).
            let t_old = f64::from(unsafe { *(ptrs[5] as *const f32) });
            if !(t_old >= 0.0 && t_old < (1u64 << 24) as f64 && t_old.fract() == 0.0) {
                return Err(PyValueError::new_err(format!("step count {t_old} is not a float32 integer in [0, 2^24)")));
            }
            // A dangling (aligned, non-null) pointer for an empty buffer.
            let dangling = std::ptr::NonNull::<f32>::dangling().as_ptr() as usize;
            let at: [usize; 5] = std::array::from_fn(|i| if lens[i] == 0 { dangling } else { ptrs[i] });
            // SAFETY: each pointer addresses the stated number of elements
            // of `dtype` of a live tensor no other overlaps (contract
            // above); the `'static` slices are dropped before this call
            // returns.
            let bufs = unsafe { AdafactorBufs::new(*dtype, at, lens)? };
            let rounding = match &stochastic_round {
                Some(counts) if matches!(bufs, AdafactorBufs::Bf16 { .. }) => {
                    ParamRounding::Stochastic { seed: counts[gi] << 32 | (work.len() as u64 & 0xffff_ffff), offset: 0 }
                }
                _ => ParamRounding::Nearest,
            };
            work.push(Work { cfg, shape: shape.clone(), t: t_old as u64 + 1, bufs, step_ptr: ptrs[5], rounding });
        }
    }
    let pool = POOL.read().unwrap_or_else(|e| e.into_inner()).clone();
    let in_pool = |f: &mut (dyn FnMut() -> Result<f64, String> + Send)| match &pool {
        Some(pool) => pool.install(f),
        None => f(),
    };
    let mut clip_coef = None;
    if max_norm.is_some() || skip_non_finite {
        // Each tensor's sum over the crate's fixed tree (the same for any
        // thread count), added in tensor order.
        let total = py.detach(|| {
            in_pool(&mut || {
                let sums: Vec<Result<f64, String>> = work
                    .par_iter()
                    .map(|w| {
                        clip::sum_of_squares_unscaled(w.bufs.grads(), grad_scale, &Exec::auto())
                            .map_err(|e| e.to_string())
                    })
                    .collect();
                sums.into_iter().sum()
            })
        });
        let total = total.map_err(PyRuntimeError::new_err)?;
        if skip_non_finite && !total.is_finite() {
            return Ok(false);
        }
        clip_coef = max_norm.map(|m| clip::clip_coef(total.sqrt(), m));
    }
    let options = StepOptions { exec: Exec::auto(), grad_scale, clip_coef, ..Default::default() };
    let run = |work: &mut Vec<Work>| -> Result<(), String> {
        // Tensors side by side, each also split inside (its result does not
        // depend on how: Adafactor's reductions use a fixed partition).
        work.par_iter_mut().try_for_each(|w| {
            let options = StepOptions { param_rounding: w.rounding, ..options };
            w.bufs.step(&w.cfg, &w.shape, w.t, &options).map_err(|e| e.to_string())
        })
    };
    let result = py.detach(|| match &pool {
        Some(pool) => pool.install(|| run(&mut work)),
        None => run(&mut work),
    });
    // Everything the crate checks was checked above; an error is a bug.
    result.map_err(PyRuntimeError::new_err)?;
    for w in &work {
        // SAFETY: a live 0-d float32 tensor; `t < 2^24 + 1` converts exactly.
        unsafe { *(w.step_ptr as *mut f32) = w.t as f32 };
    }
    Ok(true)
}

/// One tensor of [`sparse_adam_step`]: elements per row, element count,
/// the table, `exp_avg` and `exp_avg_sq` pointers, the step number to take,
/// the coalesced gradient's row indices (int64) pointer, their count, its
/// values pointer (`count * dim` elements), and the storage bits: which of
/// the three tensors (table, first state, second state: bits 0, 1, 2) are
/// bfloat16, the others float32, and whether the values are bfloat16
/// (bit 3) or float16 (bit 4) rather than float32.
type SparseTensor = (usize, usize, [usize; 3], u64, usize, usize, usize, u32);

/// A sparse gradient's values in their dtype, widened (exactly) to float32
/// inside the step's parallel region rather than by torch (whose parallel
/// copy leaves its OpenMP threads spinning beside the step's threads).
#[derive(Clone, Copy)]
enum SparseValues {
    F32(&'static [f32]),
    Bf16(&'static [bf16]),
    F16(&'static [f16]),
}

/// The table of a sparse step: bfloat16 when `bf16`, else float32.
///
/// # Safety
/// As [`part_mut`]: `ptr` addresses `n` live elements of that type that
/// nothing else touches while the result lives.
unsafe fn sparse_table(ptr: usize, n: usize, bf16: bool) -> Params<'static> {
    // SAFETY: the caller's contract.
    unsafe { if bf16 { Params::Bf16(part_mut(ptr, 0, n)) } else { Params::F32(part_mut(ptr, 0, n)) } }
}

/// A state of a sparse step: bfloat16 when `bf16`, else float32.
///
/// # Safety
/// As [`sparse_table`].
unsafe fn sparse_state(ptr: usize, n: usize, bf16: bool) -> StateBuf<'static> {
    // SAFETY: the caller's contract.
    unsafe { if bf16 { StateBuf::Bf16(part_mut(ptr, 0, n)) } else { StateBuf::F32(part_mut(ptr, 0, n)) } }
}

fn sparse_adam_config(options: &str) -> PyResult<SparseAdamConfig> {
    SparseAdamConfig::from_torch_json(options).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Checks SparseAdam's torch keyword JSON (`ValueError` naming the field).
#[pyfunction]
fn sparse_adam_check(options: &str) -> PyResult<()> {
    sparse_adam_config(options).map(|_| ())
}

/// The optimizer of a sparse step: its config, parsed from a group's JSON.
#[derive(Clone, Copy)]
enum SparseConfig {
    Adam(SparseAdamConfig),
    Adagrad(adaoptim::AdagradConfig),
}

/// One `torch.optim.SparseAdam` step of every tensor of every group (per
/// group its keyword JSON and its tensors, see [`SparseTensor`]). Every
/// hyperparameter, step number and row index is checked before any memory
/// is touched; the tensors then run in parallel over the pool with the GIL
/// released.
///
/// # Safety contract (Python side)
/// Every pointer is the data pointer of a live, contiguous CPU tensor of the
/// stated size (of the dtype its bits name: bfloat16, float16 or float32;
/// the gradient's indices int64), no two written tensors
/// overlap, and none is touched by another thread during the call.
#[pyfunction]
fn sparse_adam_step(py: Python<'_>, groups: Vec<(String, Vec<SparseTensor>)>) -> PyResult<()> {
    sparse_step(py, groups, |options| sparse_adam_config(options).map(SparseConfig::Adam))
}

/// Checks the torch keyword JSON of an `Adagrad` group stepped with sparse
/// gradients (`ValueError` naming the field; a nonzero `weight_decay` gets
/// torch's message; `torch_exact` and `eps_inside_sqrt` are refused).
#[pyfunction]
fn sparse_adagrad_check(options: &str) -> PyResult<()> {
    sparse_adagrad_config(options).map(|_| ())
}

fn sparse_adagrad_config(options: &str) -> PyResult<SparseConfig> {
    match config("Adagrad", options)? {
        AnyConfig::Adagrad(c) if c.weight_decay != 0.0 => {
            Err(PyRuntimeError::new_err("weight_decay option is not compatible with sparse gradients"))
        }
        // The crate's sparse step refuses these too; said here, before the step.
        AnyConfig::Adagrad(c) if c.torch_exact || c.eps_inside_sqrt => Err(PyValueError::new_err(
            "torch_exact and eps_inside_sqrt must be False for sparse gradients (torch's sparse update is taken)",
        )),
        AnyConfig::Adagrad(c) => Ok(SparseConfig::Adagrad(c)),
        _ => Err(PyRuntimeError::new_err("internal: Adagrad options parsed as another class")),
    }
}

/// [`sparse_adam_step`] for `torch.optim.Adagrad` with sparse gradients: the
/// same tensors, the first state pointer the accumulator `sum` (the others
/// 0).
#[pyfunction]
fn sparse_adagrad_step(py: Python<'_>, groups: Vec<(String, Vec<SparseTensor>)>) -> PyResult<()> {
    sparse_step(py, groups, sparse_adagrad_config)
}

/// The sparse step of either class: check everything, then run every
/// tensor in parallel with the GIL released (see [`sparse_adam_step`]).
fn sparse_step(
    py: Python<'_>,
    groups: Vec<(String, Vec<SparseTensor>)>,
    parse: impl Fn(&str) -> PyResult<SparseConfig>,
) -> PyResult<()> {
    struct Work {
        cfg: SparseConfig,
        t: u64,
        dim: usize,
        p: Params<'static>,
        m: StateBuf<'static>,
        v: StateBuf<'static>,
        rows: Vec<usize>,
        values: SparseValues,
    }
    let mut work = Vec::new();
    for (options, tensors) in &groups {
        let cfg = parse(options)?;
        let states = match cfg {
            SparseConfig::Adam(_) => 2,
            SparseConfig::Adagrad(_) => 1,
        };
        for &(dim, n, [p_ptr, m_ptr, v_ptr], t, rows_ptr, nnz, values_ptr, bits) in tensors {
            // Bits 0..3: which of table and states are bfloat16; bits 3..5:
            // the values' dtype.
            let (half, values_bits) = (bits & 7, bits >> 3);
            if half >> (1 + states) != 0 || values_bits > 2 {
                return Err(PyValueError::new_err("internal: bad storage bits"));
            }
            if t == 0 || t > MAX_STEP {
                return Err(PyValueError::new_err(format!("step count {} is out of range", t.saturating_sub(1))));
            }
            let table_rows = n.checked_div(dim).unwrap_or(0);
            let values_len = nnz.checked_mul(dim).ok_or_else(|| PyValueError::new_err("gradient too large"))?;
            if (n > 0 && [p_ptr, m_ptr, v_ptr][..=states].contains(&0))
                || (nnz > 0 && rows_ptr == 0)
                || (values_len > 0 && values_ptr == 0)
            {
                return Err(PyValueError::new_err("internal: null tensor pointer"));
            }
            let mut rows = Vec::with_capacity(nnz);
            for i in 0..nnz {
                // SAFETY: `nnz` live int64 values at `rows_ptr` (contract above).
                let r = unsafe { *(rows_ptr as *const i64).add(i) };
                if r < 0 || r as u64 >= table_rows as u64 {
                    return Err(PyValueError::new_err(format!("gradient row {r} is outside the {table_rows} rows")));
                }
                rows.push(r as usize);
            }
            let dangling = std::ptr::NonNull::<f32>::dangling().as_ptr() as usize;
            let at = |ptr: usize, len: usize| if len == 0 || ptr == 0 { dangling } else { ptr };
            // The second state of Adagrad is absent: an empty slice.
            let v_len = if states == 2 { n } else { 0 };
            // SAFETY: each pointer addresses the stated number of elements (of
            // the type its bit names) of a live tensor no written one
            // overlaps (contract above); the dangling pointer of an empty
            // slice is aligned for each of these types; the `'static` slices are
            // dropped before this call returns.
            let w = unsafe {
                Work {
                    cfg,
                    t,
                    dim,
                    p: sparse_table(at(p_ptr, n), n, half & 1 != 0),
                    m: sparse_state(at(m_ptr, n), n, half & 2 != 0),
                    v: sparse_state(at(v_ptr, v_len), v_len, half & 4 != 0),
                    rows,
                    values: match values_bits {
                        0 => SparseValues::F32(part(at(values_ptr, values_len), 0, values_len)),
                        1 => SparseValues::Bf16(part(at(values_ptr, values_len), 0, values_len)),
                        _ => SparseValues::F16(part(at(values_ptr, values_len), 0, values_len)),
                    },
                }
            };
            work.push(w);
        }
    }
    let pool = POOL.read().unwrap_or_else(|e| e.into_inner()).clone();
    let run = |work: &mut Vec<Work>| -> Result<(), String> {
        work.par_iter_mut().try_for_each(|w| {
            // Half-precision values are widened into this thread's kept
            // buffer: a fresh one would be allocated and page-faulted in
            // every step (2 MiB for 8192 rows of 64).
            let mut widened = WIDENED.take();
            widened.clear();
            let values = match w.values {
                SparseValues::F32(v) => v,
                SparseValues::Bf16(v) => {
                    widened.extend(v.iter().map(|x| x.to_f32()));
                    &widened[..]
                }
                SparseValues::F16(v) => {
                    widened.extend(v.iter().map(|x| x.to_f32()));
                    &widened[..]
                }
            };
            let result = match &w.cfg {
                SparseConfig::Adam(cfg) => sparse::sparse_adam_step_mixed(
                    cfg,
                    w.t,
                    w.dim,
                    w.p.reborrow(),
                    [w.m.reborrow(), w.v.reborrow()],
                    &w.rows,
                    values,
                    Exec::auto(),
                ),
                SparseConfig::Adagrad(cfg) => sparse::sparse_adagrad_step_mixed(
                    cfg,
                    w.t,
                    w.dim,
                    w.p.reborrow(),
                    w.m.reborrow(),
                    &w.rows,
                    values,
                    Exec::auto(),
                ),
            };
            if widened.capacity() <= KEPT_WIDENED {
                WIDENED.set(widened);
            }
            result.map(|_| ()).map_err(|e| e.to_string())
        })
    };
    let result = py.detach(|| match &pool {
        Some(pool) => pool.install(|| run(&mut work)),
        None => run(&mut work),
    });
    // Everything the crate checks was checked above; an error is a bug.
    result.map_err(PyRuntimeError::new_err)
}

thread_local! {
    /// [`sparse_step`]'s widened half-precision gradient values on this
    /// thread, kept between steps.
    static WIDENED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The most widened values a thread keeps between sparse steps (32 MiB).
const KEPT_WIDENED: usize = 8 << 20;

/// The compiled part of `adaoptim`.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(option_names, m)?)?;
    m.add_function(wrap_pyfunction!(layout, m)?)?;
    m.add_function(wrap_pyfunction!(torch_classes, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(backend, m)?)?;
    m.add_function(wrap_pyfunction!(step, m)?)?;
    m.add_function(wrap_pyfunction!(step_cached, m)?)?;
    m.add_function(wrap_pyfunction!(adafactor_check, m)?)?;
    m.add_function(wrap_pyfunction!(adafactor_step, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_adam_check, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_adam_step, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_adagrad_check, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_adagrad_step, m)?)?;
    m.add_function(wrap_pyfunction!(q8_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(q8_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(q8_map, m)?)?;
    m.add_function(wrap_pyfunction!(q8_signed_for, m)?)?;
    m.add("STRIDE", STRIDE)?;
    m.add("MAX_STATE", MAX_STATE)?;
    m.add("MAX_AUX", MAX_AUX)?;
    m.add("Q8_BITS", Q8_BITS)?;
    m.add("UNSIGNED_BITS", UNSIGNED_BITS)?;
    m.add("COPY_BF16", COPY_BF16)?;
    m.add("COPY_F16", COPY_F16)?;
    m.add("Q8_BLOCK", Q8_BLOCK)?;
    Ok(())
}
