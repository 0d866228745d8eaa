//! Row-sparse updates: coalescing, laziness, typed errors, every path.

mod common;

use adaoptim::sparse::{RowWiseAdagrad, SparseAdagrad, SparseAdam, SparseAdamConfig};
use adaoptim::*;
use common::{Rng, all_paths, assert_same_bits};

#[test]
fn duplicates_add_up_and_untouched_rows_stay() {
    let (rows, dim) = (50, 19);
    let mut rng = Rng::new(31);
    let t0 = rng.vec(rows * dim, 1.0);
    let g1 = rng.vec(dim, 1.0);
    let g2 = rng.vec(dim, 1.0);
    let summed: Vec<f32> = g1.iter().zip(&g2).map(|(a, b)| a + b).collect();
    let dup: Vec<f32> = g1.iter().chain(&g2).copied().collect();
    for (path, exec) in all_paths() {
        let mut a = SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap();
        let mut b = a.clone();
        a.set_exec(exec);
        b.set_exec(exec);
        let (mut ta, mut tb) = (t0.clone(), t0.clone());
        a.step(&mut ta, &[7, 7], &dup).unwrap();
        b.step(&mut tb, &[7], &summed).unwrap();
        assert_same_bits(&format!("{path} duplicate rows"), &ta, &tb);
        assert_eq!(&ta[..7 * dim], &t0[..7 * dim], "{path}: rows before 7 untouched");
        assert_eq!(&ta[8 * dim..], &t0[8 * dim..], "{path}: rows after 7 untouched");
        assert!(a.exp_avg()[..7 * dim].iter().all(|&x| x == 0.0), "{path}: lazy state");
    }
}

#[test]
fn every_path_gives_the_same_bits() {
    let (rows, dim) = (3000, 33);
    let mut rng = Rng::new(32);
    let t0 = rng.vec(rows * dim, 1.0);
    let steps: Vec<(Vec<usize>, Vec<f32>)> = (0..4)
        .map(|_| {
            let idx: Vec<usize> = (0..900).map(|_| (rng.next_u64() % rows as u64) as usize).collect();
            let vals = rng.vec(idx.len() * dim, 1.0);
            (idx, vals)
        })
        .collect();
    let run = |exec: Exec| {
        let mut a = SparseAdam::new(SparseAdamConfig { lr: 0.01, ..Default::default() }, rows, dim).unwrap();
        let mut g = SparseAdagrad::new(AdagradConfig { lr_decay: 0.01, ..Default::default() }, rows, dim).unwrap();
        let mut r = RowWiseAdagrad::new(0.1, 1e-10, 0.0, rows, dim).unwrap();
        a.set_exec(exec);
        g.set_exec(exec);
        r.set_exec(exec);
        let (mut ta, mut tg, mut tr) = (t0.clone(), t0.clone(), t0.clone());
        for (idx, vals) in &steps {
            a.step(&mut ta, idx, vals).unwrap();
            g.step(&mut tg, idx, vals).unwrap();
            r.step(&mut tr, idx, vals).unwrap();
        }
        (ta, tg, tr, r.acc().to_vec())
    };
    let reference = run(Exec::scalar());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut paths = all_paths();
    paths.push(("auto".into(), Exec::auto()));
    for (path, exec) in paths {
        let got = pool.install(|| run(exec));
        assert_same_bits(&format!("{path} SparseAdam"), &got.0, &reference.0);
        assert_same_bits(&format!("{path} sparse Adagrad"), &got.1, &reference.1);
        assert_same_bits(&format!("{path} row-wise"), &got.2, &reference.2);
        assert_same_bits(&format!("{path} row-wise acc"), &got.3, &reference.3);
    }
}

#[test]
fn bad_gradients_are_typed_errors_before_any_write() {
    let (rows, dim) = (10, 4);
    let mut a = SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap();
    let mut g = SparseAdagrad::new(AdagradConfig::default(), rows, dim).unwrap();
    let mut r = RowWiseAdagrad::new(0.1, 1e-10, 0.0, rows, dim).unwrap();
    let mut table = vec![1.0f32; rows * dim];
    // Row 10 is out of range; it comes after a valid row, which must not move.
    let e = a.step(&mut table, &[2, 10], &[0.5; 8]).unwrap_err();
    assert_eq!(e, Error::RowOutOfRange { row: 10, rows: 10 });
    assert!(matches!(g.step(&mut table, &[2, 99], &[0.5; 8]), Err(Error::RowOutOfRange { .. })));
    assert!(matches!(r.step(&mut table, &[2, 11], &[0.5; 8]), Err(Error::RowOutOfRange { .. })));
    assert!(matches!(a.step(&mut table, &[2, 3], &[0.5; 7]), Err(Error::LengthMismatch { what: "grad_values", .. })));
    assert!(matches!(a.step(&mut table[..39], &[2], &[0.5; 4]), Err(Error::LengthMismatch { what: "table", .. })));
    assert!(table.iter().all(|&x| x == 1.0));
    assert!(a.exp_avg().iter().all(|&x| x == 0.0) && g.sum().iter().all(|&x| x == 0.0));
    assert!(r.acc().iter().all(|&x| x == 0.0));
    assert_eq!((a.step_count(), g.step_count()), (0, 0));
    // torch refuses weight decay with sparse gradients.
    assert!(SparseAdagrad::new(AdagradConfig { weight_decay: 0.1, ..Default::default() }, 2, 2).is_err());
    assert!(SparseAdam::new(SparseAdamConfig { betas: (1.0, 0.9), ..Default::default() }, 2, 2).is_err());
    // An empty gradient is a valid step that changes no row.
    a.step(&mut table, &[], &[]).unwrap();
    assert_eq!(a.step_count(), 1);
    assert!(table.iter().all(|&x| x == 1.0));
}

#[test]
fn rowwise_adagrad_follows_its_formula() {
    // One row, dim 2, g = (3, 4): mean(g^2) = 12.5; acc = 0.5 + 12.5 = 13;
    // p -= lr / (sqrt(13) + eps) * g.
    let mut r = RowWiseAdagrad::new(0.1, 1e-10, 0.5, 3, 2).unwrap();
    let mut table = vec![1.0f32; 6];
    r.step(&mut table, &[1], &[3.0, 4.0]).unwrap();
    assert_eq!(r.acc(), &[0.5, 13.0, 0.5]);
    let m = 0.1 / (13f64.sqrt() + 1e-10);
    assert!((table[2] as f64 - (1.0 - m * 3.0)).abs() < 1e-6);
    assert!((table[3] as f64 - (1.0 - m * 4.0)).abs() < 1e-6);
    assert_eq!([table[0], table[1], table[4], table[5]], [1.0; 4]);
}

/// `RowWiseAdagrad` over `f32`, `bf16` and `f16` tables on every path: the
/// `f32` step is its formula, written out here, bit for bit; a half table's
/// step is the `f32` step on the widened table rounded to nearest-even by
/// the `half` crate, with the same accumulators; rows not named keep their
/// bits.
#[test]
fn rowwise_adagrad_steps_half_tables_as_its_f32_formula_rounded() {
    use storage::{Params, bf16, f16};
    let (rows, dim, lr, eps) = (12, 9, 0.05, 1e-8);
    // Duplicates summed in the order given, then per present row: the mean
    // square in f64 rounded once, the multiplier, `p + mult * g` in f32.
    let formula = |table: &mut [f32], acc: &mut [f32], idx: &[usize], vals: &[f32]| {
        let mut rows_seen: Vec<usize> = Vec::new();
        let mut sums: Vec<Vec<f32>> = Vec::new();
        for (i, &r) in idx.iter().enumerate() {
            let v = &vals[i * dim..(i + 1) * dim];
            match rows_seen.iter().position(|&u| u == r) {
                Some(k) => sums[k].iter_mut().zip(v).for_each(|(a, b)| *a += b),
                None => {
                    rows_seen.push(r);
                    sums.push(v.to_vec());
                }
            }
        }
        for (&r, g) in rows_seen.iter().zip(&sums) {
            let mean = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / dim as f64;
            acc[r] += mean as f32;
            let mult = (-lr / f64::from(acc[r].sqrt() + eps as f32)) as f32;
            table[r * dim..(r + 1) * dim].iter_mut().zip(g).for_each(|(p, &g)| *p += mult * g);
        }
    };
    for (path, exec) in all_paths() {
        let mut rng = Rng::new(35);
        let start = rng.vec(rows * dim, 1.0);
        let mut t32 = start.clone();
        let mut tb: Vec<bf16> = start.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut th: Vec<f16> = start.iter().map(|&x| f16::from_f32(x)).collect();
        let (tb0, th0) = (tb.clone(), th.clone());
        let new = || {
            let mut r = RowWiseAdagrad::new(lr, eps, 0.25, rows, dim).unwrap();
            r.set_exec(exec);
            r
        };
        let (mut r32, mut rb, mut rh) = (new(), new(), new());
        let (mut want32, mut acc32) = (start.clone(), vec![0.25f32; rows]);
        let (mut wantb, mut wanth) = (tb.clone(), th.clone());
        let (mut accb, mut acch) = (acc32.clone(), acc32.clone());
        for _ in 0..4 {
            let idx = [7, 2, 7, 11, 0, 7];
            let vals = rng.vec(idx.len() * dim, 2.0);
            r32.step(&mut t32, &idx, &vals).unwrap();
            rb.step_mixed(Params::Bf16(&mut tb), &idx, &vals).unwrap();
            rh.step_mixed(Params::F16(&mut th), &idx, &vals).unwrap();
            formula(&mut want32, &mut acc32, &idx, &vals);
            let mut wb: Vec<f32> = wantb.iter().map(|x| x.to_f32()).collect();
            formula(&mut wb, &mut accb, &idx, &vals);
            wantb = wb.iter().map(|&x| bf16::from_f32(x)).collect();
            let mut wh: Vec<f32> = wanth.iter().map(|x| x.to_f32()).collect();
            formula(&mut wh, &mut acch, &idx, &vals);
            wanth = wh.iter().map(|&x| f16::from_f32(x)).collect();
        }
        assert_same_bits(&format!("{path} f32 table"), &t32, &want32);
        assert_same_bits(&format!("{path} f32 acc"), r32.acc(), &acc32);
        assert!(tb.iter().zip(&wantb).all(|(a, b)| a.to_bits() == b.to_bits()), "{path}: bf16 table");
        assert!(th.iter().zip(&wanth).all(|(a, b)| a.to_bits() == b.to_bits()), "{path}: f16 table");
        assert_same_bits(&format!("{path} bf16 acc"), rb.acc(), &acc32);
        assert_same_bits(&format!("{path} f16 acc"), rh.acc(), &acc32);
        assert!(tb.iter().zip(&tb0).any(|(a, b)| a != b), "{path}: the bf16 table moved");
        assert_eq!(tb[dim..2 * dim], tb0[dim..2 * dim], "{path}: rows not named keep their bits");
        assert_eq!(th[3 * dim..7 * dim], th0[3 * dim..7 * dim], "{path}: rows not named keep their bits");
        // A half table of another size or a row past the end: typed errors, nothing written.
        let (before, acc_before) = (tb.clone(), rb.acc().to_vec());
        let vals = vec![1.0f32; dim];
        let short = rb.step_mixed(Params::Bf16(&mut tb[..dim * 3]), &[0], &vals);
        assert!(matches!(short, Err(Error::LengthMismatch { what: "table", .. })), "{path}: {short:?}");
        assert_eq!(rb.step_mixed(Params::Bf16(&mut tb), &[rows], &vals), Err(Error::RowOutOfRange { row: rows, rows }));
        assert_eq!((&tb, rb.acc()), (&before, &acc_before[..]));
    }
}

#[test]
fn non_finite_policies_on_row_sparse_steps() {
    let (rows, dim) = (20, 5);
    let mut a = SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap();
    let mut g = SparseAdagrad::new(AdagradConfig::default(), rows, dim).unwrap();
    let mut r = RowWiseAdagrad::new(0.1, 1e-10, 0.0, rows, dim).unwrap();
    a.set_non_finite(NonFinitePolicy::SkipStep);
    g.set_non_finite(NonFinitePolicy::SkipStep);
    r.set_non_finite(NonFinitePolicy::Error);
    let mut table = vec![1.0f32; rows * dim];
    let mut vals = vec![0.5f32; 2 * dim];
    vals[dim + 2] = f32::INFINITY;
    assert!(a.step(&mut table, &[3, 4], &vals).unwrap().skipped);
    assert!(g.step(&mut table, &[3, 4], &vals).unwrap().skipped);
    assert_eq!(r.step(&mut table, &[3, 4], &vals).unwrap_err(), Error::NonFiniteGradient { index: dim + 2 });
    assert!(table.iter().all(|&x| x == 1.0));
    assert!(a.exp_avg().iter().all(|&x| x == 0.0) && g.sum().iter().all(|&x| x == 0.0));
    assert_eq!((a.step_count(), g.step_count()), (0, 0));
    vals[dim + 2] = 0.5;
    assert!(!a.step(&mut table, &[3, 4], &vals).unwrap().skipped);
    assert_eq!(a.step_count(), 1);
}

/// Loss scaling and clipping reach the row-sparse optimizers through the
/// driver: a scaled gradient with `grad_scale` is the unscaled one, and a
/// clipped step is the step on the gradient multiplied by torch's factor for
/// the coalesced gradient's norm.
#[test]
fn sparse_optimizers_take_loss_scale_and_clipping() {
    let (rows, dim) = (6, 5);
    let idx = [4usize, 1, 4, 0];
    let mut rng = common::Rng::new(41);
    let vals = rng.vec(idx.len() * dim, 3.0);
    let scaled: Vec<f32> = vals.iter().map(|x| x * 1024.0).collect();
    // The coalesced gradient (row 4 summed in the order given) and its norm.
    let mut coalesced: Vec<(usize, Vec<f32>)> = Vec::new();
    for (k, &r) in idx.iter().enumerate() {
        let v = &vals[k * dim..(k + 1) * dim];
        match coalesced.iter_mut().find(|(row, _)| *row == r) {
            Some((_, acc)) => acc.iter_mut().zip(v).for_each(|(a, b)| *a += b),
            None => coalesced.push((r, v.to_vec())),
        }
    }
    let sq: f64 = coalesced.iter().map(|(_, v)| clip::sum_of_squares(v, &Exec::scalar()).unwrap()).sum();
    let coef = clip::clip_coef(sq.sqrt(), 0.5);
    assert!(coef < 1.0, "test setup: clipping is active");
    let (c_rows, c_vals): (Vec<usize>, Vec<f32>) = (
        coalesced.iter().map(|(r, _)| *r).collect(),
        coalesced.iter().flat_map(|(_, v)| v.iter().map(|x| x * coef)).collect(),
    );
    macro_rules! check {
        ($make:expr, $what:literal) => {{
            let mut plain = $make;
            let mut with_scale = $make;
            with_scale.set_grad_scale(Some(1024.0)).unwrap();
            let (mut t0, mut t1) = (vec![0.5f32; rows * dim], vec![0.5f32; rows * dim]);
            plain.step(&mut t0, &idx, &vals).unwrap();
            with_scale.step(&mut t1, &idx, &scaled).unwrap();
            common::assert_same_bits(concat!($what, " grad_scale"), &t1, &t0);
            let mut clipped = $make;
            clipped.set_max_grad_norm(Some(0.5)).unwrap();
            let mut reference = $make;
            let (mut t2, mut t3) = (vec![0.5f32; rows * dim], vec![0.5f32; rows * dim]);
            clipped.step(&mut t2, &idx, &vals).unwrap();
            reference.step(&mut t3, &c_rows, &c_vals).unwrap();
            common::assert_same_bits(concat!($what, " clipped"), &t2, &t3);
            assert_eq!(clipped.last_grad_norm(), Some(sq.sqrt()));
            assert!(matches!(clipped.set_grad_scale(Some(0.0)), Err(Error::InvalidHyperparameter { .. })));
        }};
    }
    check!(SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap(), "SparseAdam");
    check!(SparseAdagrad::new(AdagradConfig::default(), rows, dim).unwrap(), "SparseAdagrad");
    check!(RowWiseAdagrad::new(0.1, 1e-10, 0.0, rows, dim).unwrap(), "RowWiseAdagrad");
}

#[test]
fn sparse_adam_over_caller_owned_state_is_the_owning_step() {
    use adaoptim::sparse::sparse_adam_step_slices;
    let (rows, dim) = (9, 5);
    let cfg = SparseAdamConfig { lr: 0.05, betas: (0.8, 0.99), maximize: true, ..Default::default() };
    let mut rng = Rng::new(21);
    let mut t_own = rng.vec(rows * dim, 1.0);
    let mut t_bor = t_own.clone();
    let (mut m, mut v) = (vec![0.0f32; rows * dim], vec![0.0f32; rows * dim]);
    let mut own = SparseAdam::new(cfg, rows, dim).unwrap();
    for t in 1..=5u64 {
        let grad_rows = [t as usize % rows, 3, (2 * t as usize) % rows, 3];
        let values = rng.vec(grad_rows.len() * dim, 1.0);
        own.step(&mut t_own, &grad_rows, &values).unwrap();
        sparse_adam_step_slices(&cfg, t, dim, &mut t_bor, &mut m, &mut v, &grad_rows, &values, Exec::auto()).unwrap();
        assert_same_bits("table", &t_bor, &t_own);
        assert_same_bits("exp_avg", &m, own.exp_avg());
        assert_same_bits("exp_avg_sq", &v, own.exp_avg_sq());
    }
    // Errors before any write.
    let (t0, m0) = (t_bor.clone(), m.clone());
    let values = vec![1.0f32; dim];
    let mut run = |t, rows_: &[usize], vals: &[f32], m: &mut [f32]| {
        sparse_adam_step_slices(&cfg, t, dim, &mut t_bor, m, &mut v, rows_, vals, Exec::auto())
    };
    assert_eq!(run(0, &[1], &values, &mut m), Err(Error::InvalidStep { step: 0 }));
    assert_eq!(run(6, &[rows], &values, &mut m), Err(Error::RowOutOfRange { row: rows, rows }));
    assert!(matches!(run(6, &[1], &values, &mut m[..10]), Err(Error::LengthMismatch { what: "exp_avg", .. })));
    assert!(matches!(run(6, &[1, 2], &values, &mut m), Err(Error::LengthMismatch { .. })));
    assert_eq!((&t_bor, &m), (&t0, &m0));
}

/// The caller-counted steps reuse this thread's coalescing buffers between
/// calls: a step after a larger gradient with many duplicates (and another
/// row length) gives the bits of the same step on a fresh thread.
#[test]
fn caller_counted_steps_keep_no_trace_of_an_earlier_gradient() {
    use adaoptim::sparse::{sparse_adagrad_step_slices, sparse_adam_step_slices};
    let (rows, dim) = (40, 7);
    let step = move || {
        let mut rng = Rng::new(31);
        let mut table = rng.vec(rows * dim, 1.0);
        let mut m = rng.vec(rows * dim, 0.1);
        let mut v: Vec<f32> = rng.vec(rows * dim, 0.01).iter().map(|x| x.abs()).collect();
        let mut sum = rng.vec(rows * dim, 0.1).iter().map(|x| x.abs()).collect::<Vec<f32>>();
        let grad_rows = [5, 17, 5, 39, 0, 17, 5];
        let values = rng.vec(grad_rows.len() * dim, 1.0);
        let cfg = SparseAdamConfig::default();
        sparse_adam_step_slices(&cfg, 3, dim, &mut table, &mut m, &mut v, &grad_rows, &values, Exec::auto()).unwrap();
        let acfg = AdagradConfig::default();
        sparse_adagrad_step_slices(&acfg, 2, dim, &mut table, &mut sum, &grad_rows, &values, Exec::auto()).unwrap();
        [table, m, v, sum]
    };
    let fresh = std::thread::spawn(step).join().unwrap();
    // Leave larger buffers with other contents on this thread first.
    let (big_rows, big_dim) = (300, 11);
    let mut rng = Rng::new(32);
    let grad_rows: Vec<usize> = (0..2000).map(|i| (i * 7 + i / 3) % big_rows).collect();
    let values = rng.vec(grad_rows.len() * big_dim, 3.0);
    let mut table = vec![0.5f32; big_rows * big_dim];
    let (mut m, mut v) = (vec![0.0f32; big_rows * big_dim], vec![0.0f32; big_rows * big_dim]);
    let cfg = SparseAdamConfig::default();
    sparse_adam_step_slices(&cfg, 1, big_dim, &mut table, &mut m, &mut v, &grad_rows, &values, Exec::auto()).unwrap();
    let after = step();
    for (name, (a, b)) in ["table", "exp_avg", "exp_avg_sq", "sum"].iter().zip(after.iter().zip(&fresh)) {
        assert_same_bits(name, a, b);
    }
}

#[test]
fn sparse_adagrad_over_caller_owned_state_is_the_owning_step() {
    use adaoptim::sparse::sparse_adagrad_step_slices;
    let (rows, dim) = (9, 5);
    let cfg = AdagradConfig {
        lr: 0.05,
        lr_decay: 0.01,
        initial_accumulator_value: 0.1,
        maximize: true,
        ..Default::default()
    };
    let mut rng = Rng::new(22);
    let mut t_own = rng.vec(rows * dim, 1.0);
    let mut t_bor = t_own.clone();
    let mut sum = vec![0.1f32; rows * dim];
    let mut own = SparseAdagrad::new(cfg, rows, dim).unwrap();
    for t in 1..=5u64 {
        let grad_rows = [t as usize % rows, 3, (2 * t as usize) % rows, 3];
        let values = rng.vec(grad_rows.len() * dim, 1.0);
        own.step(&mut t_own, &grad_rows, &values).unwrap();
        sparse_adagrad_step_slices(&cfg, t, dim, &mut t_bor, &mut sum, &grad_rows, &values, Exec::auto()).unwrap();
        assert_same_bits("table", &t_bor, &t_own);
        assert_same_bits("sum", &sum, own.sum());
    }
    // Errors before any write.
    let (t0, s0) = (t_bor.clone(), sum.clone());
    let values = vec![1.0f32; dim];
    let run = |cfg: &AdagradConfig, t, rows_: &[usize], vals: &[f32], table: &mut [f32], sum: &mut [f32]| {
        sparse_adagrad_step_slices(cfg, t, dim, table, sum, rows_, vals, Exec::auto())
    };
    let mut tb = t_bor.clone();
    assert_eq!(run(&cfg, 0, &[1], &values, &mut tb, &mut sum), Err(Error::InvalidStep { step: 0 }));
    assert_eq!(run(&cfg, 6, &[rows], &values, &mut tb, &mut sum), Err(Error::RowOutOfRange { row: rows, rows }));
    assert!(matches!(
        run(&cfg, 6, &[1], &values, &mut tb, &mut sum[..10]),
        Err(Error::LengthMismatch { what: "sum", .. })
    ));
    assert!(matches!(run(&cfg, 6, &[1, 2], &values, &mut tb, &mut sum), Err(Error::LengthMismatch { .. })));
    let wd = AdagradConfig { weight_decay: 0.1, ..cfg };
    assert!(matches!(
        run(&wd, 6, &[1], &values, &mut tb, &mut sum),
        Err(Error::InvalidHyperparameter { name: "weight_decay", .. })
    ));
    let exact = AdagradConfig { torch_exact: true, ..cfg };
    assert!(matches!(
        run(&exact, 6, &[1], &values, &mut tb, &mut sum),
        Err(Error::InvalidHyperparameter { name: "torch_exact", .. })
    ));
    assert_eq!((&tb, &sum), (&t0, &s0));
}

/// A table or state buffer of a row-sparse step held in one storage.
#[derive(Clone)]
enum Buf {
    F32(Vec<f32>),
    Bf16(Vec<storage::bf16>),
    F16(Vec<storage::f16>),
    Q8(Vec<u8>, Vec<f32>, &'static storage::QMap),
}

impl Buf {
    /// `x` in `dtype` (`Q8` with `map`): rounded by the `half` crate,
    /// quantized by the public block quantizer.
    fn new(dtype: &str, x: &[f32], map: &'static storage::QMap) -> Buf {
        match dtype {
            "f32" => Buf::F32(x.to_vec()),
            "bf16" => Buf::Bf16(x.iter().map(|&v| storage::bf16::from_f32(v)).collect()),
            "f16" => Buf::F16(x.iter().map(|&v| storage::f16::from_f32(v)).collect()),
            _ => {
                let (mut c, mut a) = (vec![0u8; x.len()], vec![0f32; x.len().div_ceil(256)]);
                storage::quantize_blockwise(x, map, &mut c, &mut a).unwrap();
                Buf::Q8(c, a, map)
            }
        }
    }
    fn f32s(&self) -> Vec<f32> {
        match self {
            Buf::F32(x) => x.clone(),
            Buf::Bf16(x) => x.iter().map(|v| v.to_f32()).collect(),
            Buf::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
            Buf::Q8(c, a, m) => {
                let mut out = vec![0f32; c.len()];
                storage::dequantize_blockwise(c, a, m, &mut out).unwrap();
                out
            }
        }
    }
    /// The raw bits, for exact comparison (codes and scales for 8-bit).
    fn bits(&self) -> Vec<u32> {
        match self {
            Buf::F32(x) => x.iter().map(|v| v.to_bits()).collect(),
            Buf::Bf16(x) => x.iter().map(|v| u32::from(v.to_bits())).collect(),
            Buf::F16(x) => x.iter().map(|v| u32::from(v.to_bits())).collect(),
            Buf::Q8(c, a, _) => c.iter().map(|&v| u32::from(v)).chain(a.iter().map(|v| v.to_bits())).collect(),
        }
    }
    fn params(&mut self) -> storage::Params<'_> {
        match self {
            Buf::F32(x) => storage::Params::F32(x),
            Buf::Bf16(x) => storage::Params::Bf16(x),
            Buf::F16(x) => storage::Params::F16(x),
            Buf::Q8(..) => unreachable!("no 8-bit tables"),
        }
    }
    fn state(&mut self) -> storage::StateBuf<'_> {
        match self {
            Buf::F32(x) => storage::StateBuf::F32(x),
            Buf::Bf16(x) => storage::StateBuf::Bf16(x),
            Buf::F16(_) => unreachable!("no f16 states"),
            Buf::Q8(c, a, m) => storage::StateBuf::Q8(storage::Q8State { codes: c, absmax: a, map: m }),
        }
    }
    /// The buffer after an `f32` step that left `x`, only rows `rows` of
    /// `dim` having moved: rounded (the `half` crate) or requantized per
    /// row (the public quantizer; rows are whole blocks) in those rows.
    fn stepped(&self, x: &[f32], rows: &[usize], dim: usize) -> Buf {
        let mut out = self.clone();
        for &r in rows {
            let span = r * dim..(r + 1) * dim;
            match &mut out {
                Buf::F32(b) => b[span.clone()].copy_from_slice(&x[span]),
                Buf::Bf16(b) => {
                    b[span.clone()].iter_mut().zip(&x[span]).for_each(|(d, &v)| *d = storage::bf16::from_f32(v))
                }
                Buf::F16(b) => {
                    b[span.clone()].iter_mut().zip(&x[span]).for_each(|(d, &v)| *d = storage::f16::from_f32(v))
                }
                Buf::Q8(c, a, m) => {
                    let blocks = r * dim / 256..(r + 1) * dim / 256;
                    storage::quantize_blockwise(&x[span.clone()], m, &mut c[span], &mut a[blocks]).unwrap()
                }
            }
        }
        out
    }
}

/// Row-sparse SparseAdam and sparse Adagrad over every table storage
/// (`f32`, `bf16`, `f16`) and state storage (`f32`, `bf16`, 8-bit): each
/// step is the `f32` step (`*_step_slices`, checked against torch by the
/// golden tests) on the widened buffers, with the moved rows rounded by the
/// `half` crate or requantized by the public block quantizer; rows not
/// named keep their bits in every buffer; every path gives those bits.
#[test]
fn mixed_storage_rows_are_the_f32_step_rounded() {
    use storage::QMap;
    let rows = 24;
    let mut rng = Rng::new(33);
    let adam = sparse::SparseAdamConfig { lr: 0.01, ..Default::default() };
    let adagrad = AdagradConfig { lr: 0.05, lr_decay: 0.01, initial_accumulator_value: 0.1, ..Default::default() };
    let mut combos = 0;
    for (table_dtype, state_dtype) in [
        ("bf16", "f32"),
        ("f16", "f32"),
        ("bf16", "bf16"),
        ("f32", "bf16"),
        ("f32", "q8"),
        ("bf16", "q8"),
        ("f16", "q8"),
    ] {
        // 8-bit state rows are whole blocks; the others take any width.
        let dim = if state_dtype == "q8" { 256 } else { 37 };
        let n = rows * dim;
        let t0 = Buf::new(table_dtype, &rng.vec(n, 1.0), QMap::signed());
        let m0 = Buf::new(state_dtype, &rng.vec(n, 0.01), QMap::signed());
        let v0 = Buf::new(state_dtype, &rng.vec(n, 1e-4).iter().map(|x| x.abs()).collect::<Vec<_>>(), QMap::unsigned());
        let s0 = Buf::new(state_dtype, &vec![0.1; n], QMap::unsigned());
        let steps: Vec<(Vec<usize>, Vec<f32>)> = (0..3)
            .map(|_| {
                let mut idx: Vec<usize> = (0..9).map(|_| (rng.next_u64() % rows as u64) as usize).collect();
                idx.push(idx[0]); // a duplicate: its two gradients add up
                let vals = rng.vec(idx.len() * dim, 0.1);
                (idx, vals)
            })
            .collect();
        // The reference: expected buffers built step by step from the f32 step.
        let (mut want_t, mut want_m, mut want_v) = (t0.clone(), m0.clone(), v0.clone());
        let (mut want_ta, mut want_s) = (t0.clone(), s0.clone());
        let mut wants = Vec::new();
        for (t, (idx, vals)) in steps.iter().enumerate() {
            let t = t as u64 + 1;
            let (mut p, mut m, mut v) = (want_t.f32s(), want_m.f32s(), want_v.f32s());
            sparse::sparse_adam_step_slices(&adam, t, dim, &mut p, &mut m, &mut v, idx, vals, Exec::scalar()).unwrap();
            (want_t, want_m, want_v) =
                (want_t.stepped(&p, idx, dim), want_m.stepped(&m, idx, dim), want_v.stepped(&v, idx, dim));
            let (mut p, mut s) = (want_ta.f32s(), want_s.f32s());
            sparse::sparse_adagrad_step_slices(&adagrad, t, dim, &mut p, &mut s, idx, vals, Exec::scalar()).unwrap();
            (want_ta, want_s) = (want_ta.stepped(&p, idx, dim), want_s.stepped(&s, idx, dim));
            wants.push([want_t.bits(), want_m.bits(), want_v.bits(), want_ta.bits(), want_s.bits()]);
        }
        let before = [t0.bits(), m0.bits(), v0.bits(), t0.bits(), s0.bits()];
        assert!((0..5).all(|k| wants[0][k] != before[k]), "every buffer moves in the first step");
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut paths = all_paths();
        paths.push(("auto".into(), Exec::auto()));
        paths.push(("parallel-tiny-chunks".into(), Exec::parallel(Backend::best(), 1)));
        for (path, exec) in paths {
            let what = format!("{path}: {table_dtype} table, {state_dtype} state");
            let (mut tt, mut m, mut v, mut ta, mut s) = (t0.clone(), m0.clone(), v0.clone(), t0.clone(), s0.clone());
            for (t, ((idx, vals), want)) in steps.iter().zip(&wants).enumerate() {
                let t = t as u64 + 1;
                pool.install(|| {
                    let state = [m.state(), v.state()];
                    sparse::sparse_adam_step_mixed(&adam, t, dim, tt.params(), state, idx, vals, exec).unwrap();
                    sparse::sparse_adagrad_step_mixed(&adagrad, t, dim, ta.params(), s.state(), idx, vals, exec)
                        .unwrap();
                });
                let got = [tt.bits(), m.bits(), v.bits(), ta.bits(), s.bits()];
                for (k, name) in
                    ["SparseAdam table", "exp_avg", "exp_avg_sq", "Adagrad table", "sum"].iter().enumerate()
                {
                    assert!(got[k] == want[k], "{what}, step {t}: {name} differs from the f32 step rounded");
                }
            }
        }
        combos += 1;
    }
    assert_eq!(combos, 7);
}

/// The owning row-sparse optimizers step a half-precision table with their
/// `f32` state as the caller-owned step does.
#[test]
fn owning_sparse_optimizers_step_half_tables() {
    let (rows, dim) = (30, 21);
    let mut rng = Rng::new(34);
    let t0: Vec<storage::bf16> = rng.vec(rows * dim, 1.0).iter().map(|&x| storage::bf16::from_f32(x)).collect();
    let config = SparseAdamConfig::default();
    let mut owned = SparseAdam::new(config, rows, dim).unwrap();
    let mut ada = SparseAdagrad::new(AdagradConfig::default(), rows, dim).unwrap();
    let (mut a, mut b, mut c, mut d) = (t0.clone(), t0.clone(), t0.clone(), t0.clone());
    let (mut m, mut v, mut s) = (vec![0f32; rows * dim], vec![0f32; rows * dim], vec![0f32; rows * dim]);
    for t in 1..=3u64 {
        let idx = [3, 29, 3, 0];
        let vals = rng.vec(idx.len() * dim, 1.0);
        owned.step_mixed(storage::Params::Bf16(&mut a), &idx, &vals).unwrap();
        let state = [storage::StateBuf::F32(&mut m), storage::StateBuf::F32(&mut v)];
        sparse::sparse_adam_step_mixed(
            &config,
            t,
            dim,
            storage::Params::Bf16(&mut b),
            state,
            &idx,
            &vals,
            Exec::auto(),
        )
        .unwrap();
        ada.step_mixed(storage::Params::Bf16(&mut c), &idx, &vals).unwrap();
        let sum = storage::StateBuf::F32(&mut s);
        let cfg = AdagradConfig::default();
        sparse::sparse_adagrad_step_mixed(&cfg, t, dim, storage::Params::Bf16(&mut d), sum, &idx, &vals, Exec::auto())
            .unwrap();
    }
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(c.iter().zip(&d).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert_same_bits("exp_avg", owned.exp_avg(), &m);
    assert_same_bits("sum", ada.sum(), &s);
    assert!(a.iter().zip(&t0).any(|(x, y)| x != y), "the table moved");
    assert_eq!(a[5 * dim..29 * dim], t0[5 * dim..29 * dim], "rows not named keep their bits");
}

/// Bad storage is a typed error before anything is written: 8-bit state
/// whose rows are not whole blocks, scales of the wrong count, a state of
/// another size, a bad row in a half table.
#[test]
fn mixed_sparse_storage_errors_write_nothing() {
    use storage::{Dtype, Params, Q8State, QMap, StateBuf, bf16};
    let config = SparseAdamConfig::default();
    let step = |dim: usize, table: &mut [bf16], m: StateBuf<'_>, v: StateBuf<'_>, rows: &[usize]| {
        let vals = vec![0.5f32; rows.len() * dim];
        sparse::sparse_adam_step_mixed(&config, 1, dim, Params::Bf16(table), [m, v], rows, &vals, Exec::auto())
    };
    let one = bf16::from_f32(1.0);
    // dim 128: a row is not a whole block of 256.
    let (mut table, mut codes, mut absmax, mut v) = (vec![one; 512], vec![7u8; 512], vec![2.0f32; 2], vec![0f32; 512]);
    let q = StateBuf::Q8(Q8State { codes: &mut codes, absmax: &mut absmax, map: QMap::signed() });
    let e = step(128, &mut table[..], q, StateBuf::F32(&mut v), &[1]).unwrap_err();
    assert!(matches!(e, Error::Storage { what: "exp_avg", dtype: Dtype::Q8, .. }), "{e:?}");
    // one scale where two blocks need two
    let q = StateBuf::Q8(Q8State { codes: &mut codes, absmax: &mut absmax[..1], map: QMap::signed() });
    let e = step(256, &mut table[..], q, StateBuf::F32(&mut v), &[1]).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "absmax", .. }), "{e:?}");
    // a state of another size
    let e =
        step(256, &mut table[..], StateBuf::F32(&mut v[..256]), StateBuf::F32(&mut vec![0f32; 512]), &[0]).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "exp_avg", .. }), "{e:?}");
    // a row past the end, after a valid one
    let mut m = vec![0f32; 512];
    let e = step(256, &mut table[..], StateBuf::F32(&mut m), StateBuf::F32(&mut v), &[0, 2]).unwrap_err();
    assert_eq!(e, Error::RowOutOfRange { row: 2, rows: 2 });
    assert!(table.iter().all(|x| *x == one) && codes.iter().all(|&c| c == 7) && absmax == [2.0, 2.0]);
    assert!(m.iter().chain(&v).all(|&x| x == 0.0));
    // and a good step on the same buffers moves row 1 only
    let q = StateBuf::Q8(Q8State { codes: &mut codes, absmax: &mut absmax, map: QMap::signed() });
    step(256, &mut table[..], q, StateBuf::F32(&mut v), &[1]).unwrap();
    assert!(table[..256].iter().all(|x| *x == one) && table[256..].iter().all(|x| *x != one));
    assert!(codes[..256].iter().all(|&c| c == 7) && absmax[0] == 2.0);
}
