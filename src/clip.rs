//! Gradient clipping by global L2 norm: torch's
//! `torch.nn.utils.clip_grad_norm_(params, max_norm)`, fused into the step.
//!
//! torch makes three passes before the optimizer runs: the norm (a read of
//! every gradient), a multiply of every gradient by
//! `min(max_norm / (norm + 1e-6), 1)` (a read and a write), then the step.
//! [`Optimizer::set_max_grad_norm`](crate::Optimizer::set_max_grad_norm) does
//! the norm pass, then multiplies inside the fused step: one pass over the
//! gradients fewer, and nothing written to them.
//!
//! The norm pass also answers the non-finite question (a gradient is NaN or
//! infinite exactly when the sum of squares is: f32 squares summed in f64
//! cannot overflow), so with clipping on, [`NonFinitePolicy::SkipStep`]
//! costs nothing more.
//!
//! The sum of squares is taken in f64 (as torch's CPU norm accumulates
//! float in double) over a fixed tree of 16K-element leaves, so it has the
//! same bits for any backend, thread count and chunk size.
//!
//! [`NonFinitePolicy::SkipStep`]: crate::NonFinitePolicy::SkipStep

use crate::driver::{Plan, Unscale, sum_of_squares as tree_sum};
use crate::storage::Grads;
use crate::{Error, Exec};

/// `sum(g^2)` over `grads`, in f64, deterministic (the same bits on every
/// backend and thread count). For a sharded norm, each worker's partial sum
/// is this over its shard; the sum of the partials equals the unsharded
/// value up to f64 rounding, not bit for bit.
///
/// # Errors
/// [`Error::BackendUnavailable`] for a forced backend this CPU lacks.
pub fn sum_of_squares(grads: &[f32], exec: &Exec) -> Result<f64, Error> {
    Ok(tree_sum(&Plan::new(exec)?, grads))
}

/// [`sum_of_squares`] of gradients in any storage ([`Grads`]: `f32`, `bf16`
/// or `f16`, as [`step_mixed`](crate::step_mixed) takes them): each value
/// widened exactly, so the result has the bits [`sum_of_squares`] gives on
/// the widened `f32` values, on every backend and thread count. Infinite or
/// NaN exactly when a gradient is, so one pass gives both the clipping norm
/// and the non-finite check of a half-precision step. The loss scale is
/// not divided out: for a scale `s`, the unscaled sum is this over `s^2`
/// (exact for a power of two).
///
/// # Errors
/// [`Error::BackendUnavailable`] for a forced backend this CPU lacks.
pub fn sum_of_squares_mixed(grads: Grads<'_>, exec: &Exec) -> Result<f64, Error> {
    Ok(grads_sum(&Plan::new(exec)?, grads))
}

/// [`sum_of_squares_mixed`] of `grads` divided by a loss scale first (each
/// gradient widened exactly and unscaled in `f32` as the step unscales it,
/// then squared in f64): the norm an [`Optimizer`](crate::Optimizer) or a
/// [`step_mixed`](crate::step_mixed) with that `grad_scale` clips by, for
/// callers that run the pieces themselves (the Python package).
///
/// # Errors
/// [`Error::InvalidHyperparameter`] for a `grad_scale` that is zero or not
/// finite; [`Error::BackendUnavailable`] for a forced backend this CPU lacks.
pub fn sum_of_squares_unscaled(grads: Grads<'_>, grad_scale: Option<f32>, exec: &Exec) -> Result<f64, Error> {
    crate::error::check_grad_scale(grad_scale)?;
    let mut plan = Plan::new(exec)?;
    plan.unscale = Unscale::new(grad_scale);
    Ok(grads_sum(&plan, grads))
}

pub(crate) fn grads_sum(plan: &Plan, grads: Grads<'_>) -> f64 {
    match grads {
        Grads::F32(g) => tree_sum(plan, g),
        Grads::Bf16(g) => tree_sum(plan, g),
        Grads::F16(g) => tree_sum(plan, g),
    }
}

/// The L2 norm of `grads`: `sqrt(`[`sum_of_squares`]`)`. NaN or infinite if
/// any gradient is.
///
/// # Errors
/// As [`sum_of_squares`].
pub fn grad_norm(grads: &[f32], exec: &Exec) -> Result<f64, Error> {
    sum_of_squares(grads, exec).map(f64::sqrt)
}

/// torch's clipping factor for a total norm, in f32 as torch computes it on
/// an f32 norm tensor: `clamp(max_norm / (norm + 1e-6), max = 1)`, where
/// torch evaluates `scalar / tensor` as `tensor.reciprocal() * scalar`.
/// An infinite norm gives 0 (`1 / inf`), a NaN norm NaN, as in torch.
pub fn clip_coef(total_norm: f64, max_norm: f64) -> f32 {
    let norm = total_norm as f32;
    let coef = (1.0 / (norm + 1e-6_f32)) * max_norm as f32;
    if coef.is_nan() { coef } else { coef.min(1.0) }
}

/// Checks a `max_norm`: finite and > 0.
pub(crate) fn check_max_norm(max_norm: Option<f64>) -> Result<(), Error> {
    match max_norm {
        Some(m) if !(m.is_finite() && m > 0.0) => {
            Err(Error::InvalidHyperparameter { name: "max_norm", value: m, requirement: "finite and > 0" })
        }
        _ => Ok(()),
    }
}
