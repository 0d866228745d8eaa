//! Non-finite gradient policies, loss scaling, and the numerical hazards the
//! crate fixes where torch has them.

mod common;

use adaoptim::*;
use common::configs::variety;
use common::{Rng, all_paths, assert_same_bits};

fn snapshot(opt: &AnyOptimizer) -> Vec<Vec<f32>> {
    opt.state_names().iter().map(|n| opt.state(n).unwrap().to_vec()).collect()
}

#[test]
fn skip_step_changes_nothing_and_reports_it() {
    let mut rng = Rng::new(7);
    for (name, cfg) in variety() {
        for (path, exec) in all_paths() {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let n = 300_017; // large enough for the parallel scan, with a tail
                let mut opt = cfg.build(n).unwrap();
                opt.set_exec(exec);
                opt.set_non_finite(NonFinitePolicy::SkipStep);
                let mut p = rng.vec(n, 1.0);
                let g = rng.vec(n, 1.0);
                assert!(!opt.step(&mut p, &g).unwrap().skipped, "{name} {path}: finite step runs");
                let (p0, s0, t0) = (p.clone(), snapshot(&opt), opt.step_count());
                // One position in each quarter the scan streams, and the tail.
                for at in [0, 7, n / 4 + 3, n / 2 + 3, 3 * n / 4 + 1, n - 5, n - 1] {
                    let mut g2 = g.clone();
                    g2[at] = bad;
                    let r = opt.step(&mut p, &g2).unwrap();
                    assert!(r.skipped, "{name} {path}: {bad} at {at} must skip");
                    assert_same_bits(&format!("{name} {path} params"), &p, &p0);
                    assert_eq!(snapshot(&opt), s0, "{name} {path}: state untouched");
                    assert_eq!(opt.step_count(), t0, "{name} {path}: step count untouched");
                }
                opt.set_non_finite(NonFinitePolicy::Error);
                let mut g3 = g.clone();
                g3[12345] = bad;
                assert_eq!(opt.step(&mut p, &g3).unwrap_err(), Error::NonFiniteGradient { index: 12345 });
                assert_same_bits(&format!("{name} {path} params after error"), &p, &p0);
                assert_eq!(opt.step_count(), t0);
            }
        }
    }
}

#[test]
fn grad_scale_equals_dividing_the_gradients_first() {
    let mut rng = Rng::new(8);
    for (name, cfg) in variety() {
        for scale in [65536.0f32, 0.125, 3.0, 1e-3] {
            for (path, exec) in all_paths() {
                let n = 1003;
                let p0 = rng.vec(n, 1.0);
                let g: Vec<f32> = rng.vec(n, 1e3);
                let unscaled: Vec<f32> = g.iter().map(|x| x / scale).collect();
                let mut a = cfg.build(n).unwrap();
                let mut b = cfg.build(n).unwrap();
                a.set_exec(exec);
                b.set_exec(exec);
                a.set_grad_scale(Some(scale)).unwrap();
                let (mut pa, mut pb) = (p0.clone(), p0.clone());
                for _ in 0..3 {
                    a.step(&mut pa, &g).unwrap();
                    b.step(&mut pb, &unscaled).unwrap();
                }
                assert_same_bits(&format!("{name} {path} scale {scale}"), &pa, &pb);
            }
        }
    }
    let mut opt = Adam::new(AdamConfig::default(), 4).unwrap();
    for bad in [0.0, f32::NAN, f32::INFINITY] {
        assert!(opt.set_grad_scale(Some(bad)).is_err());
    }
    assert_eq!(opt.grad_scale(), None);
}

#[test]
fn skip_step_sees_overflow_from_unscaling() {
    // A finite gradient that overflows when divided by a tiny scale counts as
    // non-finite, like torch's found_inf after unscale_.
    let mut opt = Adam::new(AdamConfig::default(), 3).unwrap().with_non_finite(NonFinitePolicy::SkipStep);
    opt.set_grad_scale(Some(1e-30)).unwrap();
    let mut p = [1.0f32; 3];
    assert!(opt.step(&mut p, &[1.0, 1e10, 1.0]).unwrap().skipped);
    assert_eq!(p, [1.0; 3]);
}

#[test]
fn centered_rmsprop_never_takes_sqrt_of_a_negative() {
    // With alpha tiny, square_avg ~ g^2 and grad_avg ~ g, and rounding makes
    // square_avg - grad_avg^2 negative for some elements: torch's formula
    // gives NaN there. The crate clamps at zero.
    let n = 20_000;
    let mut rng = Rng::new(9);
    let cfg = RmsPropConfig { alpha: 1e-3, centered: true, ..Default::default() };
    for (path, exec) in all_paths() {
        let mut opt = RmsProp::new(cfg, n).unwrap().with_exec(exec);
        let mut p = rng.vec(n, 1.0);
        let mut negative_seen = 0;
        for _ in 0..5 {
            let g = rng.vec(n, 1.0);
            opt.step(&mut p, &g).unwrap();
            let (sq, ga) = (opt.state("square_avg").unwrap(), opt.state("grad_avg").unwrap());
            negative_seen += sq.iter().zip(ga).filter(|(s, a)| **s - **a * **a < 0.0).count();
            assert!(p.iter().all(|x| x.is_finite()), "{path}: NaN from a negative variance");
        }
        assert!(negative_seen > 0, "{path}: the hazard was not exercised");
    }
}

#[test]
fn zero_eps_with_zero_denominator_gives_zero_update() {
    // torch: eps = 0 with zero state and a zero gradient computes 0/0 = NaN.
    let configs: Vec<AnyConfig> = vec![
        AdamConfig { eps: 0.0, ..Default::default() }.into(),
        AdamConfig { eps: 0.0, amsgrad: true, ..Default::default() }.into(),
        AdagradConfig { eps: 0.0, ..Default::default() }.into(),
        RmsPropConfig { eps: 0.0, ..Default::default() }.into(),
        RmsPropConfig { eps: 0.0, momentum: 0.9, centered: true, ..Default::default() }.into(),
        AdadeltaConfig { eps: 0.0, ..Default::default() }.into(),
        AdamaxConfig { eps: 0.0, ..Default::default() }.into(),
        NAdamConfig { eps: 0.0, ..Default::default() }.into(),
    ];
    for cfg in configs {
        for (path, exec) in all_paths() {
            let mut opt = cfg.build(20).unwrap();
            opt.set_exec(exec);
            let mut p = vec![0.5f32; 20];
            let mut g = vec![0.0f32; 20];
            g[3] = 1e-30; // second moment underflows to 0 while the first does not
            for _ in 0..3 {
                opt.step(&mut p, &g).unwrap();
            }
            assert!(p.iter().all(|x| x.is_finite()), "{} {path}: {p:?}", cfg.torch_class());
            assert_eq!(p[0], 0.5, "{} {path}: zero gradient, zero update", cfg.torch_class());
        }
    }
}

#[test]
fn huge_gradients_freeze_rather_than_poison() {
    // |g| > 1.8e19 overflows g*g to inf. As in torch, the second moment
    // becomes inf and the update 0: the parameter stays finite.
    for cfg in [
        AnyConfig::from(AdamConfig::default()),
        AdagradConfig::default().into(),
        RmsPropConfig::default().into(),
        NAdamConfig::default().into(),
    ] {
        let mut opt = cfg.build(2).unwrap();
        let mut p = [1.0f32, 1.0];
        opt.step(&mut p, &[1e20, -1e20]).unwrap();
        assert!(p.iter().all(|x| x.is_finite()), "{}: {p:?}", cfg.torch_class());
    }
}
