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
