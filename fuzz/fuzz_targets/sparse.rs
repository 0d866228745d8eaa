//! The row-sparse optimizers on arbitrary row lists (duplicates, out of
//! range, unsorted), values (NaN, inf, huge) and policies: a typed error
//! that changes nothing, or a step that is the same bits on every backend,
//! serial and parallel, and the same bits as the pre-summed gradient; under
//! SkipStep a step whose coalesced gradient is not finite changes nothing.
#![no_main]

mod common;

use adaoptim::sparse::{RowWiseAdagrad, SparseAdagrad, SparseAdam, SparseAdamConfig};
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
    Corpus::Keep
});
