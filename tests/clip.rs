//! Gradient clipping by global norm (`adaoptim::clip`,
//! `Optimizer::set_max_grad_norm`): against torch's `clip_grad_norm_`
//! trajectories, against the two-pass procedure bit for bit, the same bits on
//! every path, and the non-finite policies.

mod common;

use adaoptim::clip::{clip_coef, grad_norm, sum_of_squares};
use adaoptim::storage::{Grads, bf16};
use adaoptim::{Adam, AdamConfig, AnyConfig, Backend, Error, Exec, NonFinitePolicy, Sgd, SgdConfig};
use common::{Rng, all_paths, config_from_json, f32s, same_bits};
use serde_json::Value;

/// torch's trajectories with `clip_grad_norm_` before each step, to the
/// golden tolerance (`1e-5 |x| + 1e-6`), on every path.
#[test]
fn matches_torch_clip_grad_norm() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torch_clip");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["kind"], "clipped_optimizer", "{path:?}");
        let cfg = config_from_json(v["torch_class"].as_str().unwrap(), &v["options"]).unwrap();
        let p0 = f32s(&v["params0"]);
        let mut worst = 0.0f64;
        for (name, exec) in all_paths() {
            let mut opt = cfg.build(p0.len()).unwrap();
            opt.set_exec(exec);
            opt.set_max_grad_norm(Some(v["max_norm"].as_f64().unwrap())).unwrap();
            opt.set_grad_scale(v["grad_scale"].as_f64().map(|s| s as f32)).unwrap();
            let mut p = p0.clone();
            for (t, (g, want)) in v["grads"].as_array().unwrap().iter().zip(v["params"].as_array().unwrap()).enumerate()
            {
                opt.step(&mut p, &f32s(g)).unwrap();
                let norm = v["norms"][t].as_f64().unwrap();
                let got = opt.last_grad_norm().unwrap();
                assert!((got - norm).abs() <= 1e-6 * norm, "{path:?} {name} step {t}: norm {got} vs torch {norm}");
                for (i, (&x, w)) in p.iter().zip(f32s(want)).enumerate() {
                    let err = (f64::from(x) - f64::from(w)).abs();
                    let tol = 1e-5 * f64::from(w).abs() + 1e-6;
                    assert!(err <= tol, "{path:?} {name} step {t} element {i}: {x} vs torch {w}");
                    worst = worst.max(err / tol);
                }
            }
        }
        println!("clip golden: {}: worst error {worst:.4} of tolerance", path.file_name().unwrap().to_string_lossy());
        files += 1;
    }
    assert!(files >= 4, "expected the committed torch_clip files, found {files}");
}

/// The fused step equals torch's procedure done by hand (multiply the
/// gradients by the clip factor, then an unclipped step), bit for bit.
#[test]
fn fused_clip_equals_clip_then_step() {
    let mut rng = Rng::new(7);
    for class in AnyConfig::TORCH_CLASSES {
        let cfg = AnyConfig::default_for(class).unwrap();
        for n in [1usize, 33, 1003, 70_000] {
            let mut fused = cfg.build(n).unwrap();
            fused.set_max_grad_norm(Some(0.25)).unwrap();
            let mut plain = cfg.build(n).unwrap();
            let (mut p1, mut p2) = (rng.vec(n, 1.0), Vec::new());
            p2.clone_from(&p1);
            for step in 0..4 {
                let g = rng.vec(n, if step == 2 { 1e-4 } else { 2.0 });
                fused.step(&mut p1, &g).unwrap();
                let norm = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
                let coef = clip_coef(norm, 0.25);
                let clipped: Vec<f32> = g.iter().map(|&x| if coef == 1.0 { x } else { x * coef }).collect();
                plain.step(&mut p2, &clipped).unwrap();
                assert!(p1.iter().zip(&p2).all(|(a, b)| same_bits(*a, *b)), "{class} n={n} step {step}");
                let got = fused.last_grad_norm().unwrap();
                assert!((got - norm).abs() <= 1e-12 * norm, "{class} n={n}: {got} vs {norm}");
            }
        }
    }
}

/// The norm has the same bits on every backend, serial or parallel, any
/// chunk size, and agrees with a plain f64 sum.
#[test]
fn norm_same_bits_everywhere() {
    let mut rng = Rng::new(11);
    for n in [0usize, 1, 15, 16, 17, 16_383, 16_384, 16_385, 100_003, 1 << 20] {
        let mut g: Vec<f32> = (0..n).map(|_| rng.log_uniform(-20.0, 15.0)).collect();
        if n > 3 {
            g[n / 2] = 1e-40; // subnormal
        }
        let reference = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        let first = sum_of_squares(&g, &Exec::scalar()).unwrap();
        assert!((first - reference).abs() <= 1e-12 * reference, "n={n}: {first} vs {reference}");
        let mut execs = all_paths();
        for chunk in [1, 100, 4999] {
            execs.push((format!("chunks {chunk}"), Exec::parallel(Backend::best(), chunk)));
        }
        for (name, exec) in execs {
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let s = pool.install(|| sum_of_squares(&g, &exec).unwrap());
                assert_eq!(s.to_bits(), first.to_bits(), "n={n} {name} threads={threads}");
            }
        }
        assert_eq!(grad_norm(&g, &Exec::auto()).unwrap().to_bits(), first.sqrt().to_bits());
    }
}

/// Largest f32 gradients do not overflow the norm; NaN and inf make it
/// non-finite.
#[test]
fn norm_extremes() {
    let big = vec![f32::MAX; 4096];
    let n = grad_norm(&big, &Exec::auto()).unwrap();
    assert!(n.is_finite() && (n / (f64::from(f32::MAX) * 64.0) - 1.0).abs() < 1e-12);
    let mut g = vec![1.0f32; 50_000];
    g[49_999] = f32::INFINITY;
    assert_eq!(grad_norm(&g, &Exec::auto()).unwrap(), f64::INFINITY);
    g[12] = f32::NAN;
    assert!(grad_norm(&g, &Exec::auto()).unwrap().is_nan());
    // torch's factor: 0 for an infinite norm, NaN for NaN, at most 1.
    assert_eq!(clip_coef(f64::INFINITY, 1.0), 0.0);
    assert!(clip_coef(f64::NAN, 1.0).is_nan());
    assert_eq!(clip_coef(0.0, 1.0), 1.0);
    assert_eq!(clip_coef(2.0, 1.0), (1.0f32 / (2.0f32 + 1e-6)) * 1.0);
}

/// With clipping on, the norm pass is the non-finite check: SkipStep and
/// Error change nothing; Propagate does what torch does (NaN factor).
#[test]
fn non_finite_policies_with_clipping() {
    let n = 5000;
    let mut g = vec![0.5f32; n];
    g[4321] = f32::NAN;
    let p0 = vec![1.0f32; n];
    for policy in [NonFinitePolicy::SkipStep, NonFinitePolicy::Error] {
        let mut opt = Adam::new(AdamConfig::default(), n).unwrap();
        opt.set_max_grad_norm(Some(1.0)).unwrap();
        opt.step(&mut p0.clone(), &vec![0.1; n]).unwrap();
        let before = (opt.state("exp_avg").unwrap().to_vec(), opt.step_count(), opt.last_grad_norm());
        opt.set_non_finite(policy);
        let mut p = p0.clone();
        let r = opt.step(&mut p, &g);
        match policy {
            NonFinitePolicy::SkipStep => {
                assert!(r.unwrap().skipped);
                assert!(opt.last_grad_norm().unwrap().is_nan());
            }
            _ => {
                assert!(matches!(r, Err(Error::NonFiniteGradient { index: 4321 })), "{r:?}");
                assert_eq!(opt.last_grad_norm(), before.2);
            }
        }
        assert_eq!(p, p0);
        assert_eq!((opt.state("exp_avg").unwrap().to_vec(), opt.step_count()), (before.0, before.1));
    }
    // Propagate: the factor is NaN, so every parameter becomes NaN, as torch.
    let mut opt = Sgd::new(SgdConfig::default(), n).unwrap();
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    let mut p = p0.clone();
    opt.step(&mut p, &g).unwrap();
    assert!(p.iter().all(|x| x.is_nan()));
}

/// Invalid `max_norm` values are typed errors and leave the setting alone.
#[test]
fn invalid_max_norm() {
    let mut opt = Adam::new(AdamConfig::default(), 4).unwrap();
    opt.set_max_grad_norm(Some(2.0)).unwrap();
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = opt.set_max_grad_norm(Some(bad)).unwrap_err();
        assert!(matches!(e, Error::InvalidHyperparameter { name: "max_norm", .. }), "{e:?}");
        assert_eq!(opt.max_grad_norm(), Some(2.0));
    }
    opt.set_max_grad_norm(None).unwrap();
    assert_eq!(opt.max_grad_norm(), None);
}

/// The loss-scale-aware sum of squares is the plain one of the gradients
/// each unscaled in f32 (a multiply by the reciprocal for a power of two,
/// else a division, as the step unscales), on every path; a bad scale is a
/// typed error.
#[test]
fn sum_of_squares_unscaled_is_the_sum_of_the_unscaled_gradients() {
    let mut rng = common::Rng::new(8);
    let g = rng.vec(3 * (1 << 14) + 77, 100.0);
    let b: Vec<bf16> = g.iter().map(|&x| bf16::from_f32(x)).collect();
    for (path, exec) in common::all_paths() {
        for s in [2.0f32, 1024.0, 3.0, 0.7] {
            let unscaled: Vec<f32> = g.iter().map(|&x| x / s).collect();
            let want = sum_of_squares(&unscaled, &exec).unwrap();
            let got = adaoptim::clip::sum_of_squares_unscaled(Grads::F32(&g), Some(s), &exec).unwrap();
            assert_eq!(got.to_bits(), want.to_bits(), "scale {s}, {path}");
            // Half-precision gradients: widened exactly (by the `half`
            // crate), then unscaled as f32 ones are.
            let unscaled: Vec<f32> = b.iter().map(|&x| x.to_f32() / s).collect();
            let want = sum_of_squares(&unscaled, &exec).unwrap();
            let got = adaoptim::clip::sum_of_squares_unscaled(Grads::Bf16(&b), Some(s), &exec).unwrap();
            assert_eq!(got.to_bits(), want.to_bits(), "bf16, scale {s}, {path}");
        }
        let plain = sum_of_squares(&g, &exec).unwrap();
        let got = adaoptim::clip::sum_of_squares_unscaled(Grads::F32(&g), None, &exec).unwrap();
        assert_eq!(got.to_bits(), plain.to_bits());
    }
    for bad in [0.0f32, f32::INFINITY, f32::NAN] {
        assert!(matches!(
            adaoptim::clip::sum_of_squares_unscaled(Grads::F32(&g), Some(bad), &Exec::auto()),
            Err(Error::InvalidHyperparameter { name: "grad_scale", .. })
        ));
    }
}
