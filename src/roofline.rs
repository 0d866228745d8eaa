//! The bandwidth ceiling: a kernel that reads and writes exactly the arrays an
//! optimizer step touches (read params, grads and `S` state buffers; write
//! params and state) with trivial arithmetic, through the same driver,
//! backends and thread split. Benches and the throughput report measure it in
//! the same run as the optimizers, so a ratio to it says how close a step is
//! to the machine's memory bandwidth.
//!
//! Public on purpose: it is the yardstick a user runs on their own machine
//! (the throughput example and the criterion benches do exactly that), and
//! its byte counts ([`bytes_per_param`], [`bytes_per_param_of`]) say what a
//! step of each storage combination must move.

use crate::driver::{Bufs, Kernel, Plan, drive};
use crate::error::check_len;
use crate::simd::F32Vec;
use crate::storage::{Dtype, Grads, ParamCopy, Params, StateBuf};
use crate::{Error, Exec, StepReport};

struct Roofline;

impl<const S: usize> Kernel<S> for Roofline {
    fn maximize(&self) -> bool {
        false
    }
    #[inline(always)]
    fn apply<V: F32Vec>(&self, p: &mut V, g: V, s: &mut [V; S]) {
        *p = *p + g;
        for x in s.iter_mut() {
            *x = *x + g;
        }
    }
}

/// Bytes one optimizer step touches per parameter with `state_buffers`
/// buffers: read params, grads and state, write params and state.
pub fn bytes_per_param(state_buffers: usize) -> usize {
    4 * (3 + 2 * state_buffers)
}

/// One roofline pass: `p += g` and `s += g` for every state buffer.
///
/// # Errors
/// [`Error::LengthMismatch`], [`Error::StateCount`] (more than 3 buffers), or
/// an unavailable forced backend.
pub fn step(params: &mut [f32], grads: &[f32], state: &mut [&mut [f32]], exec: &Exec) -> Result<StepReport, Error> {
    let n = params.len();
    check_len("grads", n, grads.len())?;
    for s in state.iter() {
        check_len("state", n, s.len())?;
    }
    let plan = Plan::new(exec)?;
    if state.len() > 3 {
        return Err(Error::StateCount { expected: 3, actual: state.len() });
    }
    let bufs = Bufs::dense(params, grads, state);
    Ok(match bufs.states() {
        0 => drive::<_, 0>(&Roofline, plan, bufs),
        1 => drive::<_, 1>(&Roofline, plan, bufs),
        2 => drive::<_, 2>(&Roofline, plan, bufs),
        _ => drive::<_, 3>(&Roofline, plan, bufs),
    })
}

/// Bytes one step touches per parameter with these storage types: read and
/// write the params and every state buffer, read the grads, write the
/// parameter copy if there is one.
pub fn bytes_per_param_of(params: Dtype, grads: Dtype, state: &[Dtype], param_copy: Option<Dtype>) -> usize {
    2 * params.size()
        + grads.size()
        + state.iter().map(|d| 2 * d.size()).sum::<usize>()
        + param_copy.map_or(0, Dtype::size)
}

/// The roofline pass over buffers in their storage types, through the same
/// tiled driver as [`step_mixed`](crate::step_mixed): what the memory system
/// gives a step that moves these bytes.
///
/// # Errors
/// As [`step`], and [`Error::Storage`] for a copy next to non-`f32` params.
pub fn step_mixed(
    params: Params<'_>,
    grads: Grads<'_>,
    state: &mut [StateBuf<'_>],
    param_copy: Option<ParamCopy<'_>>,
    exec: &Exec,
) -> Result<StepReport, Error> {
    if state.len() > 3 {
        return Err(Error::StateCount { expected: 3, actual: state.len() });
    }
    crate::optim::check_storage(&params, &grads, &["state"; 3][..state.len()], state, param_copy.as_ref())?;
    let plan = Plan::new(exec)?;
    let bufs = Bufs::new(params, grads, state, param_copy);
    Ok(match bufs.states() {
        0 => drive::<_, 0>(&Roofline, plan, bufs),
        1 => drive::<_, 1>(&Roofline, plan, bufs),
        2 => drive::<_, 2>(&Roofline, plan, bufs),
        _ => drive::<_, 3>(&Roofline, plan, bufs),
    })
}
