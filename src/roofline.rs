//! The bandwidth ceiling: a kernel that reads and writes exactly the arrays an
//! optimizer step touches (read params, grads and `S` state buffers; write
//! params and state) with trivial arithmetic, through the same driver,
//! backends and thread split. Benches and the throughput report measure it in
//! the same run as the optimizers, so a ratio to it says how close a step is
//! to the machine's memory bandwidth.

use crate::driver::{Kernel, Plan, Slices, drive};
use crate::optim::check_len;
use crate::simd::F32Vec;
use crate::{Error, Exec, StepReport};

struct Roofline;

impl<const S: usize> Kernel<S> for Roofline {
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
    let (p, g) = (params, grads);
    Ok(match state {
        [] => drive::<_, 0>(&Roofline, plan, Slices { p, g, s: [] }),
        [a] => drive::<_, 1>(&Roofline, plan, Slices { p, g, s: [a] }),
        [a, b] => drive::<_, 2>(&Roofline, plan, Slices { p, g, s: [a, b] }),
        [a, b, c] => drive::<_, 3>(&Roofline, plan, Slices { p, g, s: [a, b, c] }),
        _ => return Err(Error::StateCount { expected: 3, actual: state.len() }),
    })
}
