//! The row-sparse optimizers on arbitrary row lists (duplicates, out of
//! range, unsorted), values (NaN, inf, huge) and policies: a typed error
//! that changes nothing, or a step that is the same bits on every backend,
//! serial and parallel, and the same bits as the pre-summed gradient; under
//! SkipStep a step whose coalesced gradient is not finite changes nothing.
//! SparseAdam and sparse Adagrad also run over tables in `bf16`, `f16` or
//! `f32` and states in `f32`, `bf16` or 8-bit (rows of 256): every path the
//! same bits as the scalar serial one, and the same errors, which change
//! nothing.
#![no_main]

mod common;

use adaoptim::sparse::{
    RowWiseAdagrad, SparseAdagrad, SparseAdam, SparseAdamConfig, sparse_adagrad_step_mixed, sparse_adam_step_mixed,
};
use adaoptim::storage::{Params, Q8State, QMap, StateBuf, bf16, f16};
use adaoptim::{AdagradConfig, Backend, Error, Exec, NonFinitePolicy, StepReport};
use arbitrary::Arbitrary;
use common::same;
use libfuzzer_sys::{Corpus, fuzz_target};

#[derive(Arbitrary, Debug)]
struct Input {
    kind: u8,
    rows: u8,
    dim: u8,
    policy: u8,
    lr: u8,
    steps: Vec<(Vec<u8>, u8)>,
    values: Vec<u32>,
}

enum Opt {
    Adam(SparseAdam),
    Adagrad(SparseAdagrad),
    RowWise(RowWiseAdagrad),
}

impl Opt {
    fn new(kind: u8, lr: f64, rows: usize, dim: usize) -> Opt {
        match kind % 3 {
            0 => Opt::Adam(SparseAdam::new(SparseAdamConfig { lr, ..Default::default() }, rows, dim).unwrap()),
            1 => Opt::Adagrad(SparseAdagrad::new(AdagradConfig { lr, ..Default::default() }, rows, dim).unwrap()),
            _ => Opt::RowWise(RowWiseAdagrad::new(lr, 1e-10, 0.0, rows, dim).unwrap()),
        }
    }
    fn set(&mut self, exec: Exec, policy: NonFinitePolicy) {
        match self {
            Opt::Adam(o) => (o.set_exec(exec), o.set_non_finite(policy)),
            Opt::Adagrad(o) => (o.set_exec(exec), o.set_non_finite(policy)),
            Opt::RowWise(o) => (o.set_exec(exec), o.set_non_finite(policy)),
        };
    }
    fn step(&mut self, table: &mut [f32], rows: &[usize], values: &[f32]) -> Result<StepReport, Error> {
        match self {
            Opt::Adam(o) => o.step(table, rows, values),
            Opt::Adagrad(o) => o.step(table, rows, values),
            Opt::RowWise(o) => o.step(table, rows, values),
        }
    }
    fn snapshot(&self) -> (u64, Vec<Vec<f32>>) {
        match self {
            Opt::Adam(o) => (o.step_count(), vec![o.exp_avg().to_vec(), o.exp_avg_sq().to_vec()]),
            Opt::Adagrad(o) => (o.step_count(), vec![o.sum().to_vec()]),
            Opt::RowWise(o) => (o.step_count(), vec![o.acc().to_vec()]),
        }
    }
}

fn same_all(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(*x, *y))
}

/// The gradient with duplicate rows summed in the order given, each row at
/// its first appearance, as torch's coalesce adds them.
fn presummed(rows: &[usize], values: &[f32], dim: usize) -> (Vec<usize>, Vec<f32>) {
    let (mut out_rows, mut out_vals): (Vec<usize>, Vec<f32>) = (Vec::new(), Vec::new());
    for (i, &r) in rows.iter().enumerate() {
        let v = &values[i * dim..(i + 1) * dim];
        match out_rows.iter().position(|&x| x == r) {
            Some(k) => out_vals[k * dim..(k + 1) * dim].iter_mut().zip(v).for_each(|(a, b)| *a += b),
            None => {
                out_rows.push(r);
                out_vals.extend_from_slice(v);
            }
        }
    }
    (out_rows, out_vals)
}

/// A table or state in one storage.
#[derive(Clone, Debug)]
enum Buf {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Q8(Vec<u8>, Vec<f32>, &'static QMap),
}

impl Buf {
    fn params(&mut self) -> Params<'_> {
        match self {
            Buf::F32(x) => Params::F32(x),
            Buf::Bf16(x) => Params::Bf16(x),
            Buf::F16(x) => Params::F16(x),
            Buf::Q8(..) => unreachable!("no 8-bit tables"),
        }
    }
    fn state(&mut self) -> StateBuf<'_> {
        match self {
            Buf::F32(x) => StateBuf::F32(x),
            Buf::Bf16(x) => StateBuf::Bf16(x),
            Buf::F16(_) => unreachable!("no f16 states"),
            Buf::Q8(c, a, map) => StateBuf::Q8(Q8State { codes: c, absmax: a, map }),
        }
    }
    /// Equal bits (`f32` NaNs equal to any NaN: `f32` buffers may hold any;
    /// narrowed and quantized ones hold one NaN each).
    fn same(&self, other: &Buf) -> bool {
        match (self, other) {
            (Buf::F32(a), Buf::F32(b)) => same_all(a, b),
            (Buf::Bf16(a), Buf::Bf16(b)) => a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            (Buf::F16(a), Buf::F16(b)) => a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            (Buf::Q8(c, a, _), Buf::Q8(d, b, _)) => c == d && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            _ => false,
        }
    }
}

/// The mixed-storage row steps: every backend, serial and parallel, against
/// the scalar serial run, bit for bit, with the same outcomes.
fn mixed_storage(input: &Input, val: &dyn Fn(usize) -> f32, lr: f64, pool: &rayon::ThreadPool) {
    let sel = input.kind as usize / 3;
    let (table_dtype, state_dtype) = (sel % 3, sel / 3 % 3);
    // Adam, Adagrad or the row-wise Adagrad (its own f32 accumulators;
    // the state buffers then stay as they start).
    let (adam, rowwise) = (input.kind.is_multiple_of(3), input.kind % 3 == 2);
    let dim = if state_dtype == 2 { 256 } else { input.dim as usize % 20 };
    let rows = 1 + input.rows as usize % 8;
    let n = rows * dim;
    let steps: Vec<(Vec<usize>, Vec<f32>)> = input
        .steps
        .iter()
        .take(3)
        .enumerate()
        .map(|(s, (idx, extra))| {
            let mut r: Vec<usize> =
                idx.iter().take(12).map(|&x| x as usize % (rows + usize::from(*extra == 7))).collect();
            if r.is_empty() {
                r.push(0);
            }
            let v = (0..r.len() * dim).map(|i| val(i * 7 + s * 13 + 2)).collect();
            (r, v)
        })
        .collect();
    let x: Vec<f32> = (0..n).map(|i| val(i * 3 + 1)).collect();
    let table0 = match table_dtype {
        0 => Buf::Bf16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
        1 => Buf::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
        _ => Buf::F32(x),
    };
    let state0 = |map: &'static QMap| match state_dtype {
        0 => Buf::F32(vec![0.0; n]),
        1 => Buf::Bf16(vec![bf16::ZERO; n]),
        _ => Buf::Q8(vec![map.quantize(0.0); n], vec![0.0; n / 256], map),
    };
    let run = |exec: Exec| {
        let (mut table, mut m, mut v) = (table0.clone(), state0(QMap::signed()), state0(QMap::unsigned()));
        let mut rw = RowWiseAdagrad::new(lr, 1e-10, 0.0, rows, dim).unwrap();
        rw.set_exec(exec);
        let mut t = 0u64;
        let mut outcomes = Vec::new();
        for (r, g) in &steps {
            let before = (table.clone(), m.clone(), v.clone());
            let out = pool.install(|| {
                if rowwise {
                    rw.step_mixed(table.params(), r, g)
                } else if adam {
                    let config = SparseAdamConfig { lr, ..Default::default() };
                    let state = [m.state(), v.state()];
                    sparse_adam_step_mixed(&config, t + 1, dim, table.params(), state, r, g, exec)
                } else {
                    let config = AdagradConfig { lr, ..Default::default() };
                    sparse_adagrad_step_mixed(&config, t + 1, dim, table.params(), m.state(), r, g, exec)
                }
            });
            match &out {
                Ok(_) => t += 1,
                Err(e) => {
                    assert!(matches!(e, Error::RowOutOfRange { .. }), "unexpected error {e:?}");
                    assert!(table.same(&before.0) && m.same(&before.1) && v.same(&before.2), "an error wrote");
                }
            }
            outcomes.push(out.is_ok());
        }
        (table, m, v, outcomes, Buf::F32(rw.acc().to_vec()))
    };
    let reference = run(Exec::scalar());
    for b in Backend::available() {
        for exec in [Exec::serial(b), Exec::parallel(b, 16)] {
            let got = run(exec);
            assert_eq!(got.3, reference.3, "{exec:?}: outcomes");
            assert!(got.0.same(&reference.0), "{exec:?}: table differs from the scalar reference");
            assert!(got.1.same(&reference.1) && got.2.same(&reference.2), "{exec:?}: state differs");
            assert!(got.4.same(&reference.4), "{exec:?}: row-wise accumulators differ");
        }
    }
}

fuzz_target!(|input: Input| -> Corpus {
    if input.values.is_empty() || input.steps.is_empty() {
        return Corpus::Reject;
    }
    let rows = 1 + input.rows as usize % 40;
    let dim = input.dim as usize % 20;
    let lr = [1e-3, 0.1, 1.0, 0.0][input.lr as usize % 4];
    let policy =
        [NonFinitePolicy::Propagate, NonFinitePolicy::SkipStep, NonFinitePolicy::Error][input.policy as usize % 3];
    let val = |i: usize| f32::from_bits(input.values[i % input.values.len()]);
    let table0: Vec<f32> = (0..rows * dim).map(|i| val(i * 3)).collect();
    let steps: Vec<(Vec<usize>, Vec<f32>)> = input
        .steps
        .iter()
        .take(4)
        .enumerate()
        .map(|(s, (idx, extra))| {
            // Mostly in range; `extra` sometimes adds a row past the end.
            let mut r: Vec<usize> =
                idx.iter().take(32).map(|&x| x as usize % (rows + usize::from(*extra == 7))).collect();
            if r.is_empty() {
                r.push(0);
            }
            let v = (0..r.len() * dim).map(|i| val(i * 5 + s * 11 + 1)).collect();
            (r, v)
        })
        .collect();

    // Reference: scalar, serial.
    let mut reference = Opt::new(input.kind, lr, rows, dim);
    reference.set(Exec::scalar(), policy);
    let mut t_ref = table0.clone();
    let mut outcomes = Vec::new();
    for (r, v) in &steps {
        let before = (t_ref.clone(), reference.snapshot());
        let out = reference.step(&mut t_ref, r, v);
        match &out {
            Err(e) => {
                assert!(
                    matches!(e, Error::RowOutOfRange { .. } | Error::NonFiniteGradient { .. }),
                    "unexpected error {e:?}"
                );
                assert!(same_all(&t_ref, &before.0), "an error changed the table");
                assert_eq!(reference.snapshot().0, before.1.0, "an error changed the step count");
            }
            Ok(rep) if rep.skipped => {
                assert!(same_all(&t_ref, &before.0), "a skipped step changed the table");
                assert_eq!(reference.snapshot().0, before.1.0);
            }
            Ok(_) => {}
        }
        // SkipStep and Error never let a non-finite coalesced gradient through.
        if policy != NonFinitePolicy::Propagate && r.iter().all(|&x| x < rows) {
            let (_, sums) = presummed(r, v, dim);
            if sums.iter().any(|x| !x.is_finite()) {
                assert!(out.is_err() || out.as_ref().unwrap().skipped, "a non-finite gradient was applied");
            }
        }
        outcomes.push(out.map(|rep| rep.skipped));
    }

    // Every backend, serial and parallel, and the pre-summed gradient.
    // One pool for the whole run: a pool per input would leave exiting
    // worker threads' memory for the leak checker to see.
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap());
    for b in Backend::available() {
        for (exec, presum) in [(Exec::serial(b), false), (Exec::parallel(b, 16), false), (Exec::serial(b), true)] {
            let mut opt = Opt::new(input.kind, lr, rows, dim);
            opt.set(exec, policy);
            let mut t = table0.clone();
            for ((r, v), want) in steps.iter().zip(&outcomes) {
                let got = if presum && r.iter().all(|&x| x < rows) {
                    let (pr, pv) = presummed(r, v, dim);
                    pool.install(|| opt.step(&mut t, &pr, &pv))
                } else {
                    pool.install(|| opt.step(&mut t, r, v))
                };
                assert_eq!(got.is_ok(), want.is_ok(), "{exec:?} presum={presum}: {got:?} vs {want:?}");
            }
            assert!(same_all(&t, &t_ref), "{exec:?} presum={presum}: table differs from the scalar reference");
            let (sa, sb) = (opt.snapshot(), reference.snapshot());
            assert_eq!(sa.0, sb.0);
            for (x, y) in sa.1.iter().zip(&sb.1) {
                assert!(same_all(x, y), "{exec:?} presum={presum}: state differs");
            }
        }
    }
    if input.kind % 3 != 2 {
        mixed_storage(&input, &val, lr, pool);
    }
    Corpus::Keep
});
