//! Adafactor beyond the golden files (`tests/golden_adafactor`, checked in
//! `tests/golden.rs`): serial and parallel give the same bits for any thread
//! count, bad input changes nothing, checkpoints round-trip, extreme
//! magnitudes stay finite.

mod common;

use adaoptim::{Adafactor, AdafactorConfig, Backend, Error, Exec, Parallel};
use common::{Rng, assert_same_bits};
use serde_json::json;

fn trajectory(shape: &[usize], cfg: AdafactorConfig, exec: Exec, threads: usize, seed: u64) -> (Vec<f32>, Adafactor) {
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(seed);
    let mut p = rng.vec(n, 1.0);
    let mut opt = Adafactor::new(cfg, shape).unwrap();
    opt.set_exec(exec);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    for _ in 0..3 {
        let g: Vec<f32> = (0..n).map(|_| rng.log_uniform(-6.0, 2.0)).collect();
        pool.install(|| opt.step(&mut p, &g)).unwrap();
    }
    (p, opt)
}

#[test]
fn every_backend_and_thread_count_gives_the_scalar_bits() {
    for d in [1.5, 1.0] {
        every_backend_and_thread_count_gives_the_scalar_bits_with(d);
    }
}

/// At `d = 1.5` the updates' RMS stays below `d` here, so `sum(u^2)` is
/// only compared with a bound; at `d = 1` it is above it on some steps
/// (`||u|| / (sqrt(numel) * d) > 1`), so the sum's bits reach the
/// parameters (a sum that leaves out a window of a long row fails here).
fn every_backend_and_thread_count_gives_the_scalar_bits_with(d: f64) {
    let cfg = AdafactorConfig { weight_decay: 0.1, d, ..Default::default() };
    // Past PAR_THRESHOLD, so Auto runs in parallel too; odd sizes leave
    // partial chunks and column blocks; a few long rows (`[1, 262_145]`,
    // `[5, 16_390]`: fewer than two per thread at 3 threads, not at 2) are
    // split into pieces of columns; matrices of one column take a row per
    // lane. Batches of small matrices (3x3
    // kernels, rows of 7, the largest single-task matrix and one row past
    // it) leave partial groups of whole matrices.
    let shapes = [
        &[613, 457][..],
        &[3, 211, 433],
        &[300_007],
        &[1, 262_145],
        &[5, 16_390],
        &[8209, 3, 3],
        &[300, 7, 40],
        &[5, 256, 64],
        &[3, 257, 63],
        &[70_001, 1],
        &[3, 20, 1],
    ];
    for shape in shapes {
        let (p0, o0) = trajectory(shape, cfg, Exec::scalar(), 1, 7);
        let mut runs = vec![(Exec::auto(), 2), (Exec::auto(), 1)];
        for b in Backend::available() {
            runs.push((Exec::serial(b), 1));
            runs.push((Exec::parallel(b, 0), 3));
            runs.push((Exec { backend: Some(b), parallel: Parallel::Auto }, 2));
        }
        for (exec, threads) in runs {
            let (p, o) = trajectory(shape, cfg, exec, threads, 7);
            let what = format!("{shape:?} {exec:?} {threads} threads");
            assert_same_bits(&what, &p, &p0);
            assert_same_bits(&what, o.row_var(), o0.row_var());
            assert_same_bits(&what, o.col_var(), o0.col_var());
            assert_same_bits(&what, o.variance(), o0.variance());
        }
    }
}

/// The update stored between the last two passes (a caller's buffer, the
/// thread's buffer of `Auto`) or recomputed: the same bits, on every backend,
/// serial and parallel, for vectors, matrices and batches of matrices (odd
/// sizes: partial chunks, rows and lanes), over steps, `maximize` included.
#[test]
fn stored_and_recomputed_updates_give_the_same_bits() {
    for d in [1.5, 1.0] {
        stored_and_recomputed_updates_give_the_same_bits_with(d);
    }
}

fn stored_and_recomputed_updates_give_the_same_bits_with(d: f64) {
    use adaoptim::adafactor::{state_sizes, step_slices};
    use adaoptim::{AdafactorState, UpdateBuffer};
    let cfg = AdafactorConfig { weight_decay: 0.1, d, maximize: true, ..Default::default() };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    // A few long rows (`[1, 40_003]`, `[2, 262_150]`) are split into pieces
    // of columns, without a buffer a window of 131072 columns at a time
    // (three windows a row for `[2, 262_150]`, the last of 6 columns).
    // Matrices of one column (`[70_001, 1]`, `[30, 9, 1]`) take a row per lane.
    let shapes = [
        &[613, 457][..],
        &[3, 21, 43],
        &[300_007],
        &[7],
        &[1, 40_003],
        &[2, 262_150],
        &[1001, 3, 3],
        &[40, 5, 9],
        &[70_001, 1],
        &[30, 9, 1],
    ];
    for shape in shapes {
        let (n, rl, cl, vl) = state_sizes(shape).unwrap();
        let mut results: Vec<(String, [Vec<f32>; 4])> = Vec::new();
        for b in Backend::available() {
            for exec in [Exec::serial(b), Exec::parallel(b, 0)] {
                for mode in 0..3 {
                    let mut rng = Rng::new(11);
                    let mut p = rng.vec(n, 1.0);
                    let (mut r, mut c, mut v) = (vec![0f32; rl], vec![0f32; cl], vec![0f32; vl]);
                    // A buffer holding garbage: its contents must not matter.
                    let mut u = vec![f32::NAN; n];
                    for t in 1..=3 {
                        let g: Vec<f32> = (0..n).map(|_| rng.log_uniform(-6.0, 2.0)).collect();
                        let update = match mode {
                            0 => UpdateBuffer::Recompute,
                            1 => UpdateBuffer::Auto,
                            _ => UpdateBuffer::Given(&mut u),
                        };
                        let state = AdafactorState { row_var: &mut r, col_var: &mut c, variance: &mut v, update };
                        pool.install(|| step_slices(&cfg, shape, t, &mut p, &g, state, exec)).unwrap();
                    }
                    results.push((format!("{shape:?} {exec:?} mode {mode}"), [p, r, c, v]));
                }
            }
        }
        let (_, want) = &results[0];
        for (what, got) in &results[1..] {
            for (g, w) in got.iter().zip(want) {
                assert_same_bits(what, g, w);
            }
        }
    }
}

#[test]
fn state_layout_follows_torch() {
    let o = Adafactor::new(AdafactorConfig::default(), &[2, 3, 4]).unwrap();
    assert!(o.is_factored());
    assert_eq!((o.row_var().len(), o.col_var().len(), o.variance().len()), (6, 8, 0));
    for shape in [&[5][..], &[]] {
        let o = Adafactor::new(AdafactorConfig::default(), shape).unwrap();
        assert!(!o.is_factored());
        assert_eq!(o.variance().len(), shape.iter().product::<usize>());
    }
}

#[test]
fn first_step_matches_the_formula() {
    // A vector of 4, default config, step 1: w = 1, so variance = g^2 and
    // u = g / |g| = sign(g); ||u|| / sqrt(4) = 1 = d, so no clipping; alpha =
    // max(1e-3, RMS(p)) * min(0.01, 1) = 0.01 * RMS(p).
    let mut p = vec![3.0f32, -4.0, 0.0, 0.0]; // RMS 2.5
    let g = [0.5f32, -2.0, 1e-3, -7.0];
    let mut o = Adafactor::new(AdafactorConfig::default(), &[4]).unwrap();
    o.step(&mut p, &g).unwrap();
    let a = 0.025f32;
    assert_eq!(p, vec![3.0 - a, -4.0 + a, -a, a]);
    assert_eq!(o.variance(), &[0.25, 4.0, 1e-3 * 1e-3, 49.0]);
}

#[test]
fn bad_input_changes_nothing() {
    let mut o = Adafactor::new(AdafactorConfig::default(), &[3, 4]).unwrap();
    let mut p = vec![1.0f32; 12];
    o.step(&mut p, &[0.5; 12]).unwrap();
    let (p1, snap) = (p.clone(), o.to_safetensors().unwrap());
    assert_eq!(o.step(&mut p, &[0.5; 11]), Err(Error::LengthMismatch { what: "grads", expected: 12, actual: 11 }));
    assert_eq!(
        o.step(&mut p[..10], &[0.5; 12]),
        Err(Error::LengthMismatch { what: "params", expected: 12, actual: 10 })
    );
    assert!(matches!(o.set_lr(-1.0), Err(Error::InvalidHyperparameter { name: "lr", .. })));
    assert!(matches!(o.set_lr(f64::NAN), Err(Error::InvalidHyperparameter { name: "lr", .. })));
    assert_eq!(p, p1);
    assert_eq!(o.to_safetensors().unwrap(), snap);
    assert_eq!(o.steps(), 1);
}

#[test]
fn borrowed_state_is_checked_before_anything_moves() {
    use adaoptim::adafactor::step_slices;
    use adaoptim::{AdafactorState, UpdateBuffer};
    let cfg = AdafactorConfig::default();
    let (mut p, g) = (vec![1.0f32; 6], vec![0.5f32; 6]);
    let (mut r, mut c, mut v) = (vec![0.0f32; 2], vec![0.0f32; 3], Vec::<f32>::new());
    let run = |t, r: &mut [f32], c: &mut [f32], v: &mut [f32], p: &mut [f32]| {
        let state = AdafactorState { row_var: r, col_var: c, variance: v, update: UpdateBuffer::Auto };
        step_slices(&cfg, &[2, 3], t, p, &g, state, Exec::auto())
    };
    assert_eq!(run(0, &mut r, &mut c, &mut v, &mut p), Err(Error::InvalidStep { step: 0 }));
    assert_eq!(
        run(1, &mut r[..1], &mut c, &mut v, &mut p),
        Err(Error::LengthMismatch { what: "row_var", expected: 2, actual: 1 })
    );
    let mut v6 = vec![0.0f32; 6];
    assert_eq!(
        run(1, &mut r, &mut c, &mut v6, &mut p),
        Err(Error::LengthMismatch { what: "variance", expected: 0, actual: 6 })
    );
    let mut u5 = vec![0.0f32; 5];
    let state =
        AdafactorState { row_var: &mut r, col_var: &mut c, variance: &mut v, update: UpdateBuffer::Given(&mut u5) };
    assert_eq!(
        step_slices(&cfg, &[2, 3], 1, &mut p, &g, state, Exec::auto()),
        Err(Error::LengthMismatch { what: "update", expected: 6, actual: 5 })
    );
    assert_eq!((&p, &r, &c), (&vec![1.0; 6], &vec![0.0; 2], &vec![0.0; 3]));
    // The owning optimizer runs the same function: same bits.
    run(1, &mut r, &mut c, &mut v, &mut p).unwrap();
    let mut o = Adafactor::new(cfg, &[2, 3]).unwrap();
    let mut q = vec![1.0f32; 6];
    o.step(&mut q, &g).unwrap();
    assert_eq!((q, o.row_var(), o.col_var()), (p, &r[..], &c[..]));
}

#[test]
fn hyperparameters_are_checked_as_torch_does() {
    let bad = |c: AdafactorConfig, field: &str| match Adafactor::new(c, &[2]) {
        Err(Error::InvalidHyperparameter { name, .. }) => assert_eq!(name, field),
        other => panic!("{field}: {other:?}"),
    };
    let d = AdafactorConfig::default();
    bad(AdafactorConfig { lr: -1e-3, ..d }, "lr");
    bad(AdafactorConfig { beta2_decay: 0.1, ..d }, "beta2_decay");
    bad(AdafactorConfig { eps: (Some(-1e-30), 1e-3), ..d }, "eps[0]");
    bad(AdafactorConfig { eps: (None, -1.0), ..d }, "eps[1]");
    bad(AdafactorConfig { d: 0.5, ..d }, "d");
    bad(AdafactorConfig { weight_decay: -0.1, ..d }, "weight_decay");
    bad(AdafactorConfig { lr: f64::INFINITY, ..d }, "lr");
    // torch accepts the boundaries.
    Adafactor::new(AdafactorConfig { lr: 0.0, beta2_decay: 0.0, eps: (Some(0.0), 0.0), d: 1.0, ..d }, &[2]).unwrap();
}

#[test]
fn torch_keywords() {
    let c = AdafactorConfig::from_torch_kwargs(
        &json!({"lr": 0.02, "eps": [null, 0.01], "d": 1.5, "maximize": true, "foreach": null}),
    )
    .unwrap();
    assert_eq!(c, AdafactorConfig { lr: 0.02, eps: (None, 0.01), d: 1.5, maximize: true, ..Default::default() });
    assert_eq!(AdafactorConfig::from_torch_kwargs(&c.torch_kwargs()).unwrap(), c);
    for bad in [json!({"betas": [0.9, 0.99]}), json!({"eps": 1e-3}), json!({"lr": "x"}), json!([1])] {
        assert!(matches!(AdafactorConfig::from_torch_kwargs(&bad), Err(Error::InvalidOption { .. })), "{bad}");
    }
    assert!(matches!(
        AdafactorConfig::from_torch_kwargs(&json!({"d": 0.9})),
        Err(Error::InvalidHyperparameter { name: "d", .. })
    ));
}

/// Several tensors' optimizers in one file (what the framework adapters
/// save): torch's `state.{i}.*` names, one group per run of equal
/// configurations, resumed bitwise; damaged or foreign bytes refused.
#[test]
fn many_optimizers_checkpoint_together() {
    let shapes: [&[usize]; 4] = [&[5, 7], &[11], &[2, 3, 4], &[1]];
    let base = AdafactorConfig { weight_decay: 0.05, ..Default::default() };
    let other = AdafactorConfig { lr: 0.003, eps: (Some(1e-6), 1e-3), maximize: true, ..base };
    let configs = [base, base, other, base];
    let mut rng = Rng::new(21);
    let mut opts: Vec<Adafactor> = shapes.iter().zip(configs).map(|(s, c)| Adafactor::new(c, s).unwrap()).collect();
    let mut params: Vec<Vec<f32>> = opts.iter().map(|o| rng.vec(o.len(), 1.0)).collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..5).map(|_| opts.iter().map(|o| rng.vec(o.len(), 2.0)).collect()).collect();
    // Different step counts: the last tensor is stepped once only.
    for (k, gs) in grads[..3].iter().enumerate() {
        for (i, (o, p)) in opts.iter_mut().zip(&mut params).enumerate() {
            if i < 3 || k == 0 {
                o.step(p, &gs[i]).unwrap();
            }
        }
    }
    let extra = [("mine", "x".to_string())];
    let bytes = Adafactor::many_to_safetensors(&opts, &extra).unwrap();
    let meta = adaoptim::checkpoint::format::metadata(&bytes).unwrap();
    assert_eq!(meta["mine"], "x");
    let groups: serde_json::Value = serde_json::from_str(&meta["param_groups"]).unwrap();
    let ids: Vec<&serde_json::Value> = groups.as_array().unwrap().iter().map(|g| &g["params"]).collect();
    assert_eq!(ids, [&json!([0, 1]), &json!([2]), &json!([3])]);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<&str> = st.names();
    names.sort();
    let want = [
        "state.0.col_var",
        "state.0.row_var",
        "state.0.step",
        "state.1.step",
        "state.1.variance",
        "state.2.col_var",
        "state.2.row_var",
        "state.2.step",
        "state.3.step",
        "state.3.variance",
        "step",
    ];
    assert_eq!(names, want);
    assert_eq!(st.tensor("state.2.row_var").unwrap().shape(), [2, 3, 1]);
    let mut loaded = Adafactor::many_from_safetensors(&bytes).unwrap();
    assert_eq!(loaded.len(), 4);
    for (i, (a, b)) in opts.iter().zip(&loaded).enumerate() {
        assert_eq!((a.steps(), a.shape(), a.config()), (b.steps(), b.shape(), b.config()), "tensor {i}");
    }
    assert_eq!(loaded[3].steps(), 1);
    assert_eq!(Adafactor::many_to_safetensors(&loaded, &extra).unwrap(), bytes, "the same bytes again");
    let mut resumed = params.clone();
    for gs in &grads[3..] {
        for i in 0..4 {
            opts[i].step(&mut params[i], &gs[i]).unwrap();
            loaded[i].step(&mut resumed[i], &gs[i]).unwrap();
        }
    }
    for i in 0..4 {
        assert_same_bits(&format!("tensor {i} resumed"), &resumed[i], &params[i]);
    }
    // Refused: a key of the checkpoint's own, a flipped byte, a truncated
    // file, a single optimizer's checkpoint.
    assert!(matches!(Adafactor::many_to_safetensors(&opts, &[("shapes", "[]".into())]), Err(Error::Checkpoint { .. })));
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(Adafactor::many_from_safetensors(&bad), Err(Error::Checkpoint { .. })));
    assert!(matches!(Adafactor::many_from_safetensors(&bytes[..bytes.len() - 4]), Err(Error::Checkpoint { .. })));
    let single = opts[0].to_safetensors().unwrap();
    assert!(matches!(Adafactor::many_from_safetensors(&single), Err(Error::Checkpoint { .. })));
    assert!(Adafactor::many_from_safetensors(&Adafactor::many_to_safetensors(&[], &[]).unwrap()).unwrap().is_empty());
}

#[test]
fn checkpoints_round_trip_and_resume_bitwise() {
    for shape in [&[7, 9][..], &[2, 3, 5], &[11]] {
        let n: usize = shape.iter().product();
        let cfg = AdafactorConfig { weight_decay: 0.05, eps: (Some(1e-6), 1e-3), maximize: true, ..Default::default() };
        let mut rng = Rng::new(3);
        let grads: Vec<Vec<f32>> = (0..6).map(|_| rng.vec(n, 2.0)).collect();
        let mut a = Adafactor::new(cfg, shape).unwrap();
        let mut pa = rng.vec(n, 1.0);
        for g in &grads[..3] {
            a.step(&mut pa, g).unwrap();
        }
        let bytes = a.to_safetensors().unwrap();
        let mut b = Adafactor::from_safetensors(&bytes).unwrap();
        assert_eq!((b.steps(), b.shape(), b.config()), (3, shape, &cfg));
        assert_eq!(b.to_safetensors().unwrap(), bytes, "{shape:?}: the same bytes again");
        let mut pb = pa.clone();
        for g in &grads[3..] {
            a.step(&mut pa, g).unwrap();
            b.step(&mut pb, g).unwrap();
        }
        assert_same_bits(&format!("{shape:?} resumed"), &pb, &pa);
        // torch's state names and shapes.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<&str> = st.names();
        names.sort();
        if shape.len() >= 2 {
            assert_eq!(names, ["col_var", "row_var", "step"]);
            let k = shape.len();
            assert_eq!(st.tensor("row_var").unwrap().shape()[k - 1], 1);
            assert_eq!(st.tensor("col_var").unwrap().shape()[k - 2], 1);
        } else {
            assert_eq!(names, ["step", "variance"]);
        }
        // A flipped byte in a tensor is caught; nothing is built.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(Adafactor::from_safetensors(&bad), Err(Error::Checkpoint { .. })));
    }
    let adam = adaoptim::Adam::new(Default::default(), 4).unwrap().to_safetensors().unwrap();
    assert!(matches!(Adafactor::from_safetensors(&adam), Err(Error::Checkpoint { .. })));
}

#[test]
fn extreme_magnitudes_stay_finite() {
    let mut rng = Rng::new(11);
    for shape in [&[9, 13][..], &[117]] {
        let n: usize = shape.iter().product();
        // Squares of gradients past ~1.8e19 overflow f32 (in torch too), so the
        // top range stops at 1e18; the bottom one is subnormal.
        for (lo, hi) in [(-45.0f64, -38.0f64), (10.0, 18.0), (-30.0, 18.0)] {
            let mut o = Adafactor::new(AdafactorConfig { weight_decay: 0.01, ..Default::default() }, shape).unwrap();
            let mut p: Vec<f32> = (0..n).map(|_| rng.log_uniform(lo.max(-37.0), hi)).collect();
            for t in 0..20 {
                let mut g: Vec<f32> = (0..n).map(|_| rng.log_uniform(lo, hi)).collect();
                if t % 3 == 0 {
                    g.iter_mut().step_by(4).for_each(|x| *x = 0.0);
                }
                o.step(&mut p, &g).unwrap();
                assert!(p.iter().all(|x| x.is_finite()), "{shape:?} 1e{lo}..1e{hi} step {t}: params");
                for s in [o.row_var(), o.col_var(), o.variance()] {
                    assert!(s.iter().all(|x| x.is_finite() && *x >= 0.0), "{shape:?} 1e{lo}..1e{hi} step {t}: state");
                }
            }
        }
        // All-zero gradients move parameters only by weight decay.
        let mut o = Adafactor::new(AdafactorConfig { weight_decay: 0.5, ..Default::default() }, shape).unwrap();
        let mut p = vec![2.0f32; n];
        o.step(&mut p, &vec![0.0; n]).unwrap();
        assert!(p.iter().all(|&x| x == 2.0 * (1.0 - 0.01 * 0.5) as f32), "{shape:?}: zero gradient");
    }
}

#[test]
fn any_config_takes_adafactor_by_torch_name() {
    use adaoptim::{AnyConfig, HyperValue};
    assert!(AnyConfig::SHAPED_CLASSES.contains(&"Adafactor"));
    assert!(!AnyConfig::TORCH_CLASSES.contains(&"Adafactor"));
    // One entry of torch's `param_groups`, as `json.dumps` writes it.
    let group = r#"{"lr": 0.02, "beta2_decay": -0.7, "eps": [null, 0.01], "d": 1.5, "weight_decay": 0.1,
                    "foreach": null, "maximize": true, "params": [0, 1], "initial_lr": 0.02}"#;
    let want =
        AdafactorConfig { lr: 0.02, beta2_decay: -0.7, eps: (None, 0.01), d: 1.5, weight_decay: 0.1, maximize: true };
    assert_eq!(AnyConfig::from_torch_json("Adafactor", group).unwrap(), AnyConfig::Adafactor(want));
    assert_eq!(AdafactorConfig::from_torch_kwargs(&serde_json::from_str(group).unwrap()).unwrap(), want);
    let c =
        AnyConfig::from_torch("Adafactor", &[("eps", HyperValue::Pair(1e-30, 1e-3)), ("d", HyperValue::Number(2.0))])
            .unwrap();
    assert_eq!(c, AnyConfig::Adafactor(AdafactorConfig { eps: (Some(1e-30), 1e-3), d: 2.0, ..Default::default() }));
    assert_eq!(c.torch_class(), "Adafactor");
    let d = AnyConfig::default_for("Adafactor").unwrap();
    assert_eq!(d, AnyConfig::Adafactor(AdafactorConfig::default()));
    // `eps1 = None` reads back as the value the step uses for it.
    let eps = d.options().into_iter().find(|(k, _)| *k == "eps").unwrap().1;
    assert_eq!(eps, HyperValue::Pair(f64::from(f32::EPSILON), 1e-3));
    let again = AnyConfig::from_torch("Adafactor", &d.options()).unwrap();
    let AnyConfig::Adafactor(a) = again else { panic!("{again:?}") };
    assert_eq!(a.eps1(), AdafactorConfig::default().eps1());
    for (k, v) in
        [("betas", HyperValue::Pair(0.9, 0.99)), ("lr", HyperValue::Bool(true)), ("eps", HyperValue::Number(1.0))]
    {
        assert!(matches!(AnyConfig::from_torch("Adafactor", &[(k, v)]), Err(Error::InvalidOption { .. })), "{k}");
    }
    assert!(matches!(
        AnyConfig::from_torch_json("Adafactor", r#"{"d": 0.5}"#),
        Err(Error::InvalidHyperparameter { name: "d", .. })
    ));
    assert!(matches!(
        AnyConfig::from_torch_json("Adafactor", r#"{"eps": [null, "x"]}"#),
        Err(Error::InvalidOption { .. })
    ));
}

#[test]
fn any_optimizer_steps_adafactor_with_its_bits_and_checkpoints() {
    use adaoptim::{AnyConfig, AnyOptimizer};
    let cfg = AdafactorConfig { weight_decay: 0.05, d: 1.5, ..Default::default() };
    for shape in [&[7, 9][..], &[2, 3, 5], &[11], &[]] {
        let n: usize = shape.iter().product();
        let mut rng = Rng::new(5);
        let p0 = rng.vec(n, 1.0);
        let grads: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n, 2.0)).collect();
        let mut direct = Adafactor::new(cfg, shape).unwrap();
        let mut any = AnyConfig::from(cfg).build_shaped(shape).unwrap();
        let (mut pd, mut pa) = (p0.clone(), p0.clone());
        for g in &grads {
            direct.step(&mut pd, g).unwrap();
            let r = any.step(&mut pa, g).unwrap();
            assert!(!r.skipped);
        }
        assert_same_bits("pa, pd", &pa, &pd);
        assert_eq!((any.torch_class(), any.step_count(), any.len()), ("Adafactor", 3, n));
        assert_eq!(any.state_names(), direct.state_names());
        for name in ["row_var", "col_var", "variance"] {
            assert_eq!(any.state(name), direct.state(name), "{name}");
        }
        assert_eq!(any.state_names(), if shape.len() >= 2 { &["row_var", "col_var"][..] } else { &["variance"] });
        // The checkpoint is Adafactor's own, and comes back by its class.
        let bytes = any.to_safetensors().unwrap();
        assert_eq!(bytes, direct.to_safetensors().unwrap());
        let mut back = AnyOptimizer::from_safetensors(&bytes).unwrap();
        assert!(matches!(back, AnyOptimizer::Adafactor(_)));
        let mut fresh = AnyConfig::from(cfg).build_shaped(shape).unwrap();
        fresh.restore(&bytes).unwrap();
        let g = rng.vec(n, 1.0);
        let (mut p1, mut p2, mut p3) = (pa.clone(), pa.clone(), pa.clone());
        any.step(&mut p1, &g).unwrap();
        back.step(&mut p2, &g).unwrap();
        fresh.step(&mut p3, &g).unwrap();
        assert_same_bits("p2, p1", &p2, &p1);
        assert_same_bits("p3, p1", &p3, &p1);
    }
    // `build(n)` is a vector of n: unfactored.
    let mut v = AnyConfig::from(cfg).build(6).unwrap();
    let mut w = Adafactor::new(cfg, &[6]).unwrap();
    let (mut pv, mut pw) = (vec![0.5f32; 6], vec![0.5f32; 6]);
    v.step(&mut pv, &[0.1, -0.2, 0.3, 0.0, 1.0, -1.0]).unwrap();
    w.step(&mut pw, &[0.1, -0.2, 0.3, 0.0, 1.0, -1.0]).unwrap();
    assert_same_bits("pv, pw", &pv, &pw);
    assert_eq!(v.state("variance"), w.state("variance"));
    // A checkpoint of another shape, or the slice-only entry points, change nothing.
    let mut m = AnyConfig::from(cfg).build_shaped(&[2, 3]).unwrap();
    let snap = m.to_safetensors().unwrap();
    assert!(matches!(m.restore(&v.to_safetensors().unwrap()), Err(Error::Checkpoint { .. })));
    assert_eq!(m.to_safetensors().unwrap(), snap);
    let c = AnyConfig::from(cfg);
    let (mut p, mut s) = (vec![1.0f32; 6], vec![0.0f32; 6]);
    let mut aux = c.aux_init();
    let r = c.step_slices_with(1, &mut aux, &mut p, &[0.5; 6], &mut [&mut s[..]], &Default::default());
    assert!(matches!(r, Err(Error::IncompatibleConfig { .. })), "{r:?}");
    assert_eq!((p, s), (vec![1.0; 6], vec![0.0; 6]));
    // Another kind of configuration is refused.
    assert!(matches!(m.set_config(AnyConfig::default_for("Adam").unwrap()), Err(Error::IncompatibleConfig { .. })));
    assert!(matches!(AnyConfig::from(cfg).build_shaped(&[usize::MAX, 2]), Err(Error::TooLarge { .. })));
}

#[test]
fn guards_skip_scale_and_clip_as_the_element_wise_optimizers_do() {
    use adaoptim::NonFinitePolicy;
    let cfg = AdafactorConfig { weight_decay: 0.05, ..Default::default() };
    let shape = [9, 13];
    let n = 9 * 13;
    let mut rng = Rng::new(11);
    let p0 = rng.vec(n, 1.0);
    let g: Vec<f32> = (0..n).map(|_| rng.log_uniform(-4.0, 1.0)).collect();
    let stepped = |grads: &[f32], setup: &dyn Fn(&mut Adafactor)| {
        let mut o = Adafactor::new(cfg, &shape).unwrap();
        setup(&mut o);
        let mut p = p0.clone();
        o.step(&mut p, grads).unwrap();
        (p, o)
    };
    let (plain, _) = stepped(&g, &|_| {});

    // A non-finite gradient: SkipStep changes nothing, Error returns the index.
    let mut bad = g.clone();
    bad[40] = f32::NAN;
    for policy in [NonFinitePolicy::SkipStep, NonFinitePolicy::Error] {
        let mut o = Adafactor::new(cfg, &shape).unwrap();
        o.set_non_finite(policy);
        let mut p = p0.clone();
        o.step(&mut p, &g).unwrap();
        let (p1, snap) = (p.clone(), o.to_safetensors().unwrap());
        let r = o.step(&mut p, &bad);
        match policy {
            NonFinitePolicy::SkipStep => assert!(r.unwrap().skipped),
            _ => assert_eq!(r, Err(Error::NonFiniteGradient { index: 40 })),
        }
        assert_same_bits("p, p1", &p, &p1);
        assert_eq!(o.to_safetensors().unwrap(), snap);
        assert_eq!(o.steps(), 1);
    }
    // Propagate (torch's behaviour): the NaN reaches the parameters.
    let (p, _) = stepped(&bad, &|_| {});
    assert!(p.iter().any(|x| x.is_nan()));

    // A power-of-two loss scale is removed exactly; another one is a division.
    let scaled: Vec<f32> = g.iter().map(|x| x * 1024.0).collect();
    let (p, _) = stepped(&scaled, &|o| o.set_grad_scale(Some(1024.0)).unwrap());
    assert_same_bits("p, plain", &p, &plain);
    let divided: Vec<f32> = g.iter().map(|x| x / 3.0).collect();
    let (want, _) = stepped(&divided, &|_| {});
    let (p, _) = stepped(&g, &|o| o.set_grad_scale(Some(3.0)).unwrap());
    assert_same_bits("p, want", &p, &want);

    // Clipping: the total norm measured, the gradients multiplied by torch's factor.
    let norm = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    let coef = adaoptim::clip::clip_coef(norm, 0.5);
    assert!(coef < 1.0);
    let clipped: Vec<f32> = g.iter().map(|x| x * coef).collect();
    let (want, _) = stepped(&clipped, &|_| {});
    let (p, o) = stepped(&g, &|o| o.set_max_grad_norm(Some(0.5)).unwrap());
    assert_same_bits("p, want", &p, &want);
    let measured = o.last_grad_norm().unwrap();
    assert!((measured - norm).abs() <= 1e-12 * norm, "{measured} vs {norm}");
    // A norm under the limit leaves the gradients as they are.
    let (p, _) = stepped(&g, &|o| o.set_max_grad_norm(Some(1e9)).unwrap());
    assert_same_bits("p, plain", &p, &plain);

    // Bad settings are refused and change nothing.
    let mut o = Adafactor::new(cfg, &shape).unwrap();
    assert!(matches!(o.set_grad_scale(Some(0.0)), Err(Error::InvalidHyperparameter { .. })));
    assert!(matches!(o.set_max_grad_norm(Some(-1.0)), Err(Error::InvalidHyperparameter { .. })));
    assert_eq!((o.grad_scale(), o.max_grad_norm()), (None, None));
}

#[test]
fn a_global_gradient_norm_clips_many_tensors_as_one() {
    use adaoptim::NonFinitePolicy;
    let cfg = AdafactorConfig { weight_decay: 0.05, ..Default::default() };
    let shapes: [&[usize]; 2] = [&[9, 13], &[40]];
    let mut rng = Rng::new(17);
    let p0: Vec<Vec<f32>> = shapes.iter().map(|s| rng.vec(s.iter().product(), 1.0)).collect();
    let g: Vec<Vec<f32>> =
        shapes.iter().map(|s| (0..s.iter().product()).map(|_| rng.log_uniform(-4.0, 1.0)).collect()).collect();
    // The global norm, summed here in plain f64, and torch's factor from it.
    let norm = g.iter().flatten().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    let coef = adaoptim::clip::clip_coef(norm, 0.5);
    assert!(coef < 1.0);
    for scale in [None, Some(8.0f32)] {
        let mut total = 0.0;
        let mut opts = Vec::new();
        let grads: Vec<Vec<f32>> = g.iter().map(|g| g.iter().map(|x| x * scale.unwrap_or(1.0)).collect()).collect();
        for (shape, g) in shapes.iter().zip(&grads) {
            let mut o = Adafactor::new(cfg, shape).unwrap();
            o.set_max_grad_norm(Some(0.5)).unwrap();
            o.set_grad_scale(scale).unwrap();
            total += o.grad_sum_of_squares(g).unwrap();
            opts.push(o);
        }
        let total = total.sqrt();
        assert!((total - norm).abs() <= 1e-12 * norm, "{total} vs {norm}");
        for (i, (o, g)) in opts.iter_mut().zip(&grads).enumerate() {
            let mut p = p0[i].clone();
            assert!(!o.step_with_grad_norm(&mut p, g, total).unwrap().skipped);
            assert_eq!(o.last_grad_norm(), Some(total));
            // The same as an unclipped step on gradients multiplied by the factor.
            let mut plain = Adafactor::new(cfg, shapes[i]).unwrap();
            let mut want = p0[i].clone();
            plain.step(&mut want, &g_clipped(&g_unscaled(g, scale), coef)).unwrap();
            assert_same_bits("p, want", &p, &want);
        }
    }
    // A non-finite global norm (a bad gradient elsewhere): skipped here too.
    let mut o = Adafactor::new(cfg, shapes[0]).unwrap();
    o.set_max_grad_norm(Some(0.5)).unwrap();
    o.set_non_finite(NonFinitePolicy::SkipStep);
    let mut p = p0[0].clone();
    assert!(o.step_with_grad_norm(&mut p, &g[0], f64::NAN).unwrap().skipped);
    assert_same_bits("p, p0", &p, &p0[0]);
    assert_eq!(o.steps(), 0);
    // Without clipping, a given norm is refused and nothing moves.
    let mut o = Adafactor::new(cfg, shapes[0]).unwrap();
    assert!(matches!(o.step_with_grad_norm(&mut p, &g[0], 1.0), Err(Error::IncompatibleConfig { .. })));
    assert!(matches!(o.grad_sum_of_squares(&g[1]), Err(Error::LengthMismatch { .. })));
    assert_same_bits("p, p0", &p, &p0[0]);
    assert_eq!(o.steps(), 0);
}

#[test]
fn borrowed_steps_with_a_scale_and_a_factor_are_the_owners_bits() {
    use adaoptim::adafactor::{AdafactorState, UpdateBuffer, step_slices_with};
    use adaoptim::storage::ParamRounding;
    use adaoptim::{StepOptions, clip};
    let cfg = AdafactorConfig { weight_decay: 0.05, d: 1.0, ..Default::default() };
    let shape = [70, 300];
    let n = 70 * 300;
    let mut rng = Rng::new(23);
    let p0 = rng.vec(n, 1.0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for exec in [Exec::scalar(), Exec::auto(), Exec::parallel(Backend::best(), 1000)] {
        for scale in [None, Some(3.0f32)] {
            // The owner: loss scale and clipping by its own norm.
            let mut owner = Adafactor::new(cfg, &shape).unwrap();
            owner.set_exec(exec);
            owner.set_grad_scale(scale).unwrap();
            owner.set_max_grad_norm(Some(0.5)).unwrap();
            let (mut p, mut q) = (p0.clone(), p0.clone());
            let (mut r, mut c, mut v) = (vec![0.0; 70], vec![0.0; 300], vec![]);
            for t in 1..=3 {
                let g: Vec<f32> = (0..n).map(|_| rng.log_uniform(-4.0, 1.0)).collect();
                pool.install(|| owner.step(&mut p, &g)).unwrap();
                // Borrowed: the same scale, the factor of the same norm.
                let sq = clip::sum_of_squares_unscaled(adaoptim::storage::Grads::F32(&g), scale, &exec).unwrap();
                let coef = clip::clip_coef(sq.sqrt(), 0.5);
                assert!(coef < 1.0);
                let options = StepOptions { exec, grad_scale: scale, clip_coef: Some(coef), ..Default::default() };
                let state =
                    AdafactorState { row_var: &mut r, col_var: &mut c, variance: &mut v, update: UpdateBuffer::Auto };
                pool.install(|| step_slices_with(&cfg, &shape, t, &mut q, &g, state, &options)).unwrap();
                assert_same_bits(&format!("{exec:?} {scale:?} step {t}"), &q, &p);
            }
            assert_same_bits("row_var", &r, owner.row_var());
            assert_same_bits("col_var", &c, owner.col_var());
        }
    }
    // Bad options change nothing.
    let (mut q, g) = (p0.clone(), rng.vec(n, 1.0));
    let (mut r, mut c, mut v) = (vec![0.0; 70], vec![0.0; 300], vec![]);
    for options in [
        StepOptions { grad_scale: Some(0.0), ..Default::default() },
        StepOptions { clip_coef: Some(f32::NAN), ..Default::default() },
        StepOptions { param_rounding: ParamRounding::Stochastic { seed: 1, offset: 0 }, ..Default::default() },
    ] {
        let state = AdafactorState { row_var: &mut r, col_var: &mut c, variance: &mut v, update: UpdateBuffer::Auto };
        assert!(step_slices_with(&cfg, &shape, 1, &mut q, &g, state, &options).is_err(), "{options:?}");
    }
    assert_same_bits("q, p0", &q, &p0);
    assert!(r.iter().chain(&c).all(|&x| x == 0.0));
}

fn g_unscaled(g: &[f32], scale: Option<f32>) -> Vec<f32> {
    g.iter().map(|x| x / scale.unwrap_or(1.0)).collect()
}

fn g_clipped(g: &[f32], coef: f32) -> Vec<f32> {
    g.iter().map(|x| x * coef).collect()
}

#[test]
fn huge_shapes_are_refused_before_anything_is_allocated() {
    // A tensor with a zero dimension is empty, but its factors need not be.
    for shape in [&[1usize << 40, 1 << 30, 0][..], &[usize::MAX, 2, 0], &[3, usize::MAX / 2, 0]] {
        assert!(matches!(Adafactor::new(AdafactorConfig::default(), shape), Err(Error::TooLarge { .. })), "{shape:?}");
    }
    // A checkpoint whose metadata claims a huge shape: its tensors do not
    // match it, so it is refused without allocating the claimed state.
    let bytes = Adafactor::new(AdafactorConfig::default(), &[2, 3]).unwrap().to_safetensors().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    for huge in ["[1073741824, 268435456, 1]", "[1099511627776, 1048576, 0]", "[4611686018427387904, 2]"] {
        let mut meta = meta.metadata().clone().unwrap();
        meta.insert("shape".into(), huge.into());
        let forged = safetensors::serialize(st.tensors(), Some(meta)).unwrap();
        assert!(matches!(Adafactor::from_safetensors(&forged), Err(Error::Checkpoint { .. })), "{huge}");
        assert!(matches!(adaoptim::AnyOptimizer::from_safetensors(&forged), Err(Error::Checkpoint { .. })), "{huge}");
    }
}

/// A storage of the half-precision tests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    F32,
    Bf16,
    F16,
}

/// `x` rounded to `kind` by the `half` crate (to nearest, ties to even),
/// as `f32`.
fn rounded(kind: Kind, x: &[f32]) -> Vec<f32> {
    use adaoptim::storage::{bf16, f16};
    match kind {
        Kind::F32 => x.to_vec(),
        Kind::Bf16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        Kind::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
    }
}

/// Buffers of one storage, holding values that `kind` represents.
enum Store {
    F32(Vec<f32>),
    Bf16(Vec<adaoptim::storage::bf16>),
    F16(Vec<adaoptim::storage::f16>),
}

impl Store {
    fn of(kind: Kind, x: &[f32]) -> Store {
        use adaoptim::storage::{bf16, f16};
        match kind {
            Kind::F32 => Store::F32(x.to_vec()),
            Kind::Bf16 => Store::Bf16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
            Kind::F16 => Store::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
        }
    }
    fn values(&self) -> Vec<f32> {
        match self {
            Store::F32(x) => x.clone(),
            Store::Bf16(x) => x.iter().map(|v| v.to_f32()).collect(),
            Store::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
        }
    }
    fn params(&mut self) -> adaoptim::storage::Params<'_> {
        use adaoptim::storage::Params;
        match self {
            Store::F32(x) => Params::F32(x),
            Store::Bf16(x) => Params::Bf16(x),
            Store::F16(x) => Params::F16(x),
        }
    }
    fn grads(&self) -> adaoptim::storage::Grads<'_> {
        use adaoptim::storage::Grads;
        match self {
            Store::F32(x) => Grads::F32(x),
            Store::Bf16(x) => Grads::Bf16(x),
            Store::F16(x) => Grads::F16(x),
        }
    }
}

/// Half-precision parameters and gradients (`step_slices_mixed` and
/// `Adafactor::step_mixed`): each step is the `f32` step (the scalar
/// backend's, serial) on the widened values, the parameters then rounded by
/// the `half` crate to nearest even, or stochastically as the stream is
/// written out in `common::round_stochastic`. On every path, for each
/// shape class (general, a batch of small matrices, long rows, one column,
/// a vector), three steps with the state carried.
#[test]
fn half_precision_params_and_grads_are_the_widened_f32_step_rounded() {
    use adaoptim::adafactor::{state_sizes, step_slices, step_slices_mixed};
    use adaoptim::storage::ParamRounding;
    use adaoptim::{AdafactorState, StepOptions, UpdateBuffer};
    let cfg = AdafactorConfig { weight_decay: 0.1, d: 1.0, ..Default::default() };
    let shapes: [&[usize]; 5] = [&[37, 53], &[6, 5, 3, 3], &[2, 40_000], &[3001, 1], &[301]];
    let kinds = [Kind::F32, Kind::Bf16, Kind::F16];
    for shape in shapes {
        let (n, rl, cl, vl) = state_sizes(shape).unwrap();
        let mut rng = Rng::new(n as u64);
        let p0 = rng.vec(n, 1.0);
        let gs: Vec<Vec<f32>> = (0..3).map(|_| (0..n).map(|_| rng.log_uniform(-4.0, 2.0)).collect()).collect();
        for (pk, gk) in kinds.iter().flat_map(|&p| kinds.iter().map(move |&g| (p, g))) {
            let sr_seed = (pk == Kind::Bf16).then_some(n as u64 + 11);
            for rounding in
                [Some(ParamRounding::Nearest), sr_seed.map(|seed| ParamRounding::Stochastic { seed, offset: 0 })]
                    .into_iter()
                    .flatten()
            {
                // The reference: f32 steps on the widened values, rounded.
                let mut want = rounded(pk, &p0);
                let (mut r, mut c, mut v) = (vec![0f32; rl], vec![0f32; cl], vec![0f32; vl]);
                for (t, g) in (1..).zip(&gs) {
                    let state = AdafactorState {
                        row_var: &mut r,
                        col_var: &mut c,
                        variance: &mut v,
                        update: UpdateBuffer::Auto,
                    };
                    step_slices(&cfg, shape, t, &mut want, &rounded(gk, g), state, Exec::serial(Backend::Scalar))
                        .unwrap();
                    want = match rounding {
                        ParamRounding::Stochastic { seed, offset } => common::round_stochastic(&want, seed, t, offset),
                        ParamRounding::Nearest => rounded(pk, &want),
                    };
                }
                for (path, exec) in common::all_paths() {
                    let what = format!("{shape:?} params {pk:?} grads {gk:?} {rounding:?} {path}");
                    let mut p = Store::of(pk, &p0);
                    let (mut r2, mut c2, mut v2) = (vec![0f32; rl], vec![0f32; cl], vec![0f32; vl]);
                    let options = StepOptions { exec, param_rounding: rounding, ..Default::default() };
                    for (t, g) in (1..).zip(&gs) {
                        let g = Store::of(gk, g);
                        // Updates recomputed in the last pass (the owner
                        // below stores them: both last passes are checked).
                        let state = AdafactorState {
                            row_var: &mut r2,
                            col_var: &mut c2,
                            variance: &mut v2,
                            update: UpdateBuffer::Recompute,
                        };
                        step_slices_mixed(&cfg, shape, t, p.params(), g.grads(), state, &options).unwrap();
                    }
                    assert_same_bits(&format!("{what}: params"), &p.values(), &want);
                    assert_same_bits(&format!("{what}: row_var"), &r2, &r);
                    assert_same_bits(&format!("{what}: col_var"), &c2, &c);
                    assert_same_bits(&format!("{what}: variance"), &v2, &v);
                    {
                        // The owning optimizer's step_mixed: the same bits,
                        // its stochastic rounding the free step's stream (a
                        // seed beside f32 or f16 parameters is not used).
                        let mut o = Adafactor::new(cfg, shape).unwrap();
                        o.set_exec(exec);
                        o.set_stochastic_rounding(match rounding {
                            ParamRounding::Stochastic { seed, .. } => Some(seed),
                            ParamRounding::Nearest => (pk != Kind::Bf16).then_some(5),
                        });
                        let mut q = Store::of(pk, &p0);
                        for g in &gs {
                            let g = Store::of(gk, g);
                            o.step_mixed(q.params(), g.grads()).unwrap();
                        }
                        assert_same_bits(&format!("{what}: owner params"), &q.values(), &want);
                        assert_same_bits(
                            &format!("{what}: owner state"),
                            o.state(o.state_names()[0]).unwrap(),
                            if vl > 0 { &v } else { &r },
                        );
                    }
                }
            }
        }
    }
}

/// A half-precision step that fails writes nothing: parameters, state and
/// step count keep their bits; a step the non-finite policy skips leaves
/// the parameters' bits (no round trip through `f32`).
#[test]
fn half_precision_errors_and_skipped_steps_change_nothing() {
    use adaoptim::adafactor::step_slices_mixed;
    use adaoptim::storage::{Dtype, ParamRounding};
    use adaoptim::{AdafactorState, NonFinitePolicy, StepOptions, UpdateBuffer};
    let cfg = AdafactorConfig::default();
    let p0: Vec<f32> = (0..12).map(|i| i as f32 * 0.37 - 2.0).collect();
    let g0: Vec<f32> = (0..12).map(|i| 0.25 - i as f32 * 0.01).collect();
    let (mut r, mut c, mut v) = (vec![0.5f32; 3], vec![0.25f32; 4], Vec::<f32>::new());
    let mut run = |p: &mut Store, g: &Store, t: u64, rounding: ParamRounding| {
        let state = AdafactorState { row_var: &mut r, col_var: &mut c, variance: &mut v, update: UpdateBuffer::Auto };
        let options = StepOptions { param_rounding: rounding, ..Default::default() };
        step_slices_mixed(&cfg, &[3, 4], t, p.params(), g.grads(), state, &options)
    };
    let nearest = ParamRounding::Nearest;
    let mut p = Store::of(Kind::Bf16, &p0);
    let before = p.values();
    let g = Store::of(Kind::F16, &g0);
    let short = Store::of(Kind::F16, &g0[..11]);
    assert_eq!(run(&mut p, &short, 1, nearest), Err(Error::LengthMismatch { what: "grads", expected: 12, actual: 11 }));
    let mut p_short = Store::of(Kind::Bf16, &p0[..10]);
    assert_eq!(
        run(&mut p_short, &g, 1, nearest),
        Err(Error::LengthMismatch { what: "params", expected: 12, actual: 10 })
    );
    assert_eq!(run(&mut p, &g, 0, nearest), Err(Error::InvalidStep { step: 0 }));
    let mut p16 = Store::of(Kind::F16, &p0);
    let sr = ParamRounding::Stochastic { seed: 1, offset: 0 };
    assert!(matches!(run(&mut p16, &g, 1, sr), Err(Error::Storage { what: "params", dtype: Dtype::F16, .. })));
    assert!(matches!(
        run(&mut p, &g, 1, ParamRounding::Stochastic { seed: 1, offset: 3 }),
        Err(Error::InvalidOption { .. })
    ));
    assert_same_bits("params", &p.values(), &before);
    assert_same_bits("f16 params", &p16.values(), &rounded(Kind::F16, &p0));
    assert_eq!((&r, &c), (&vec![0.5; 3], &vec![0.25; 4]));

    // The owner: errors, then a skipped step.
    let mut o = Adafactor::new(cfg, &[3, 4]).unwrap();
    o.set_non_finite(NonFinitePolicy::SkipStep);
    assert_eq!(
        o.step_mixed(p.params(), short.grads()),
        Err(Error::LengthMismatch { what: "grads", expected: 12, actual: 11 })
    );
    let mut bad = g0.clone();
    bad[5] = f32::INFINITY;
    let report = o.step_mixed(p.params(), Store::of(Kind::Bf16, &bad).grads()).unwrap();
    assert!(report.skipped);
    assert_same_bits("skipped", &p.values(), &before);
    assert_eq!((o.steps(), o.row_var(), o.col_var()), (0, &[0.0f32; 3][..], &[0.0f32; 4][..]));
    // A NaN in a bf16 parameter stays NaN and its neighbours step.
    let mut with_nan = p0.clone();
    with_nan[2] = f32::NAN;
    let mut q = Store::of(Kind::Bf16, &with_nan);
    o.step_mixed(q.params(), g.grads()).unwrap();
    let after = q.values();
    assert!(after[2].is_nan());
    assert_eq!(o.steps(), 1);
}

/// Half-precision tensors stepped side by side from a rayon loop (as the
/// Python package steps a model), each also split inside, so a thread that
/// waits in one tensor's step may run another's with its own scratch; and
/// one tensor above the kept scratch size (`KEPT_WIDENED`), whose buffers
/// are made for the step. Each gives the bits of the same step alone.
#[test]
fn half_precision_steps_side_by_side_and_above_the_kept_scratch_size() {
    use adaoptim::adafactor::{KEPT_WIDENED, state_sizes, step_slices_mixed};
    use adaoptim::storage::{Grads, Params, bf16};
    use adaoptim::{AdafactorState, StepOptions, UpdateBuffer};
    use rayon::prelude::*;
    let cfg = AdafactorConfig { weight_decay: 0.1, ..Default::default() };
    let step = |shape: &[usize], seed: u64, exec: Exec| -> (Vec<bf16>, Vec<f32>) {
        let (n, rl, cl, vl) = state_sizes(shape).unwrap();
        let mut rng = Rng::new(seed);
        let mut p: Vec<bf16> = rng.vec(n, 1.0).into_iter().map(bf16::from_f32).collect();
        let g: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.log_uniform(-4.0, 1.0))).collect();
        let (mut r, mut c, mut v) = (vec![0f32; rl], vec![0f32; cl], vec![0f32; vl]);
        let options = StepOptions { exec, ..Default::default() };
        for t in 1..=2 {
            let state =
                AdafactorState { row_var: &mut r, col_var: &mut c, variance: &mut v, update: UpdateBuffer::Auto };
            step_slices_mixed(&cfg, shape, t, Params::Bf16(&mut p), Grads::Bf16(&g), state, &options).unwrap();
        }
        r.extend(c);
        r.extend(v);
        (p, r)
    };
    let shapes: Vec<Vec<usize>> = (0..12).map(|k| if k % 3 == 2 { vec![900 + k] } else { vec![30 + k, 70] }).collect();
    let alone: Vec<_> =
        shapes.iter().enumerate().map(|(k, s)| step(s, k as u64, Exec::serial(Backend::Scalar))).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let side_by_side: Vec<_> = pool.install(|| {
        shapes.par_iter().enumerate().map(|(k, s)| step(s, k as u64, Exec::parallel(Backend::best(), 64))).collect()
    });
    for (k, ((pa, sa), (pb, sb))) in alone.iter().zip(&side_by_side).enumerate() {
        assert_eq!(pa, pb, "tensor {k} params");
        assert_same_bits(&format!("tensor {k} state"), sa, sb);
    }
    // Above the kept size: fresh buffers, the bits of the f32 step on the
    // widened values, rounded by the `half` crate.
    let side = (KEPT_WIDENED as f64).sqrt() as usize + 1;
    let big = [side, side];
    assert!(side * side > KEPT_WIDENED);
    let (pb, sb) = step(&big, 99, Exec::auto());
    let (n, rl, cl, _) = state_sizes(&big).unwrap();
    let mut rng = Rng::new(99);
    let mut p: Vec<f32> = rounded(Kind::Bf16, &rng.vec(n, 1.0));
    let g: Vec<f32> = (0..n).map(|_| bf16::from_f32(rng.log_uniform(-4.0, 1.0)).to_f32()).collect();
    let (mut r, mut c) = (vec![0f32; rl], vec![0f32; cl]);
    for t in 1..=2 {
        let state = AdafactorState { row_var: &mut r, col_var: &mut c, variance: &mut [], update: UpdateBuffer::Auto };
        adaoptim::adafactor::step_slices(&cfg, &big, t, &mut p, &g, state, Exec::auto()).unwrap();
        p = rounded(Kind::Bf16, &p);
    }
    r.extend(c);
    assert_same_bits("large tensor params", &pb.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), &p);
    assert_same_bits("large tensor state", &sb, &r);
}
