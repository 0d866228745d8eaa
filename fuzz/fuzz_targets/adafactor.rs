//! Adafactor: arbitrary hyperparameters (rejected with an error, never a
//! panic), shapes of rank 0 to 3 and values (NaN, inf, subnormals, extreme
//! magnitudes); every backend, serial and parallel, must give the scalar
//! reference's bits, also with `bf16`/`f16` parameters or gradients
//! (`step_mixed`); with moderate finite inputs everything stays finite and
//! the second moments non-negative; checkpoints round-trip to the same
//! bytes, and a corrupted one is refused without a panic.
#![no_main]

mod common;

use adaoptim::storage::{Grads, Params, bf16, f16};
use adaoptim::{Adafactor, AdafactorConfig, Backend, Exec};
use arbitrary::Arbitrary;
use common::same;
use libfuzzer_sys::{Corpus, fuzz_target};

#[derive(Arbitrary, Debug)]
struct Input {
    numbers: [f64; 6],
    /// Raw numbers as given (mostly rejected: the errors are checked), or
    /// folded into the valid ranges.
    raw: bool,
    eps1_default: bool,
    maximize: bool,
    rank: u8,
    dims: [u8; 3],
    steps: u8,
    flip: u16,
    /// The storages of the half-precision part: params `half / 3 % 3`,
    /// grads `half % 3` (0 f32, 1 bf16, 2 f16).
    half: u8,
    values: Vec<u32>,
}

fuzz_target!(|input: Input| -> Corpus {
    let [lr, beta2_decay, eps1, eps2, d, weight_decay] = if input.raw {
        input.numbers
    } else {
        let [a, b, c, e, f, g] = input.numbers.map(f64::abs);
        [a % 1.0, -(b % 2.0), c % 1e-3, e % 1e-2, 1.0 + f % 3.0, g % 0.5]
    };
    let cfg = AdafactorConfig {
        lr,
        beta2_decay,
        eps: (if input.eps1_default { None } else { Some(eps1) }, eps2),
        d,
        weight_decay,
        maximize: input.maximize,
    };
    let shape: Vec<usize> = input.dims[..input.rank as usize % 4].iter().map(|&x| 1 + x as usize % 40).collect();
    let Ok(probe) = Adafactor::new(cfg, &shape) else { return Corpus::Reject };
    if input.values.is_empty() {
        return Corpus::Reject;
    }
    let n = probe.len();
    let steps = 1 + input.steps as usize % 4;
    let val = |i: usize| f32::from_bits(input.values[i % input.values.len()]);
    let p0: Vec<f32> = (0..n).map(val).collect();
    let grads: Vec<Vec<f32>> = (0..steps).map(|s| (0..n).map(|i| val(i * 7 + s * 13 + 1)).collect()).collect();

    // The steps with parameters and gradients stored as `kinds` (0 f32, 1
    // bf16, 2 f16: the values rounded to them): the parameters' values after
    // them and the optimizer.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let run = |exec: Exec, (pk, gk): (u8, u8)| {
        let mut o = Adafactor::new(cfg, &shape).unwrap();
        o.set_exec(exec);
        let mut p = Half::of(pk, &p0);
        for g in &grads {
            let g = Half::of(gk, g);
            pool.install(|| o.step_mixed(p.params(), g.grads())).expect("valid step");
        }
        (p.values(), o)
    };
    // Every backend, serial and parallel, gives the scalar backend's bits:
    // f32, and the storages drawn for the half-precision part.
    let half = (input.half / 3 % 3, input.half % 3);
    let (p_ref, reference) = run(Exec::scalar(), (0, 0));
    let half_ref = run(Exec::scalar(), half);
    for b in Backend::available() {
        for exec in [Exec::serial(b), Exec::parallel(b, 0)] {
            for (kinds, (pr, r)) in [((0, 0), (&p_ref, &reference)), (half, (&half_ref.0, &half_ref.1))] {
                let (p, o) = run(exec, kinds);
                for (what, a, r) in [
                    ("param", &p[..], &pr[..]),
                    ("row_var", o.row_var(), r.row_var()),
                    ("col_var", o.col_var(), r.col_var()),
                    ("variance", o.variance(), r.variance()),
                ] {
                    for (i, (x, y)) in a.iter().zip(r).enumerate() {
                        assert!(same(*x, *y), "{cfg:?} {shape:?} {exec:?} {kinds:?} {what} {i}: {x:e} vs scalar {y:e}");
                    }
                }
            }
        }
    }

    // Stability: moderate hyperparameters and finite values whose squares
    // stay in f32's range give finite parameters and non-negative moments.
    // (An eps1 whose square rounds to 0 in f32 gives 0/0 on a zero gradient,
    // NaN, exactly as in torch: left out.)
    let moderate = |x: f32| x == 0.0 || (x.is_finite() && (1e-30..1e15).contains(&x.abs()));
    let eps1_ok = input.eps1_default || (eps1 * eps1) as f32 > 0.0;
    if eps1_ok
        && lr <= 1.0
        && weight_decay <= 1.0
        && eps2 <= 1e3
        && p0.iter().chain(grads.iter().flatten()).all(|&x| moderate(x))
    {
        assert!(p_ref.iter().all(|x| x.is_finite()), "{cfg:?} {shape:?}: non-finite parameter");
        for s in [reference.row_var(), reference.col_var(), reference.variance()] {
            assert!(s.iter().all(|x| x.is_finite() && *x >= 0.0), "{cfg:?} {shape:?}: bad second moment");
        }
    }

    // Checkpoints: the same bytes after a round trip; a flipped byte is an
    // error or a valid optimizer, never a panic.
    let bytes = reference.to_safetensors().expect("serializes");
    let back = Adafactor::from_safetensors(&bytes).expect("round trip");
    let again = back.to_safetensors().unwrap();
    assert!(
        again == bytes,
        "{}\n{}",
        String::from_utf8_lossy(&again[..again.len().min(600)]),
        String::from_utf8_lossy(&bytes[..bytes.len().min(600)])
    );
    let mut bad = bytes.clone();
    let i = input.flip as usize % bad.len();
    bad[i] ^= 0x5a;
    let _ = Adafactor::from_safetensors(&bad);
    Corpus::Keep
});

/// Values in one storage (0 `f32`, 1 `bf16`, 2 `f16`), rounded to nearest.
enum Half {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Half {
    fn of(kind: u8, x: &[f32]) -> Half {
        match kind {
            1 => Half::Bf16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
            2 => Half::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
            _ => Half::F32(x.to_vec()),
        }
    }
    fn values(&self) -> Vec<f32> {
        match self {
            Half::F32(x) => x.clone(),
            Half::Bf16(x) => x.iter().map(|v| v.to_f32()).collect(),
            Half::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
        }
    }
    fn params(&mut self) -> Params<'_> {
        match self {
            Half::F32(x) => Params::F32(x),
            Half::Bf16(x) => Params::Bf16(x),
            Half::F16(x) => Params::F16(x),
        }
    }
    fn grads(&self) -> Grads<'_> {
        match self {
            Half::F32(x) => Grads::F32(x),
            Half::Bf16(x) => Grads::Bf16(x),
            Half::F16(x) => Grads::F16(x),
        }
    }
}
