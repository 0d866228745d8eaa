//! Differential fuzzing: every backend, serial and parallel, against the
//! scalar reference, with arbitrary valid hyperparameters, lengths, offsets
//! and values (NaN, inf, subnormals, extreme magnitudes included), loss
//! scales, gradient clipping and SkipStep. The crate
//! documents 0 ULP between backends, so results must match bit for bit, NaN
//! where the reference has NaN.
#![no_main]

mod common;

use adaoptim::{Backend, Exec, NonFinitePolicy};
use arbitrary::Arbitrary;
use common::{RawConfig, same};
use libfuzzer_sys::{Corpus, fuzz_target};

#[derive(Arbitrary, Debug)]
struct Input {
    config: RawConfig,
    len: u16,
    offset: u8,
    steps: u8,
    chunk: u16,
    grad_scale: Option<f32>,
    max_grad_norm: Option<f32>,
    skip: bool,
    values: Vec<u32>,
}

fuzz_target!(|input: Input| -> Corpus {
    let Some(cfg) = input.config.build(|_, x| x) else { return Corpus::Reject };
    if input.values.is_empty() {
        return Corpus::Reject;
    }
    let n = input.len as usize % 300;
    let off = input.offset as usize % 16;
    let steps = 1 + input.steps as usize % 4;
    let val = |i: usize| f32::from_bits(input.values[i % input.values.len()]);
    let p0: Vec<f32> = (0..n + off).map(val).collect();
    let grads: Vec<Vec<f32>> = (0..steps).map(|s| (0..n + off).map(|i| val(i * 7 + s * 13 + 1)).collect()).collect();

    let run = |exec: Exec| -> Option<(Vec<f32>, Vec<Vec<f32>>)> {
        let mut opt = cfg.build(n).ok()?;
        opt.set_exec(exec);
        if opt.set_grad_scale(input.grad_scale).is_err() {
            return None;
        }
        if opt.set_max_grad_norm(input.max_grad_norm.map(f64::from)).is_err() {
            return None;
        }
        if input.skip {
            opt.set_non_finite(NonFinitePolicy::SkipStep);
        }
        let mut p = p0.clone();
        for g in &grads {
            opt.step(&mut p[off..], &g[off..]).expect("valid step");
        }
        Some((p, opt.state_names().iter().map(|s| opt.state(s).unwrap().to_vec()).collect()))
    };
    let Some((p_ref, s_ref)) = run(Exec::scalar()) else { return Corpus::Reject };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for b in Backend::available() {
        for exec in [Exec::serial(b), Exec::parallel(b, input.chunk as usize % 200)] {
            let (p, s) = pool.install(|| run(exec)).expect("same config");
            for (i, (x, y)) in p.iter().zip(&p_ref).enumerate() {
                assert!(same(*x, *y), "{cfg:?} {exec:?} param {i}: {x:e} vs scalar {y:e}");
            }
            for (a, r) in s.iter().zip(&s_ref) {
                for (i, (x, y)) in a.iter().zip(r).enumerate() {
                    assert!(same(*x, *y), "{cfg:?} {exec:?} state {i}: {x:e} vs scalar {y:e}");
                }
            }
        }
    }
    Corpus::Keep
});
