//! Schedules: bounds and finiteness over 10^6 steps, exact periodicity,
//! torch's values at hand-checked points, typed errors, and driving optimizers.

use adaoptim::schedule::*;
use adaoptim::{Adagrad, AdagradConfig, Adam, AdamConfig, Error, Sgd, SgdConfig};

fn zoo() -> Vec<(&'static str, Schedule)> {
    let lr = 0.1;
    vec![
        ("constant", ConstantLR::new(lr, 0.5, 10).unwrap().into()),
        ("step", StepLR::new(lr, 7, 0.5).unwrap().into()),
        ("multistep", MultiStepLR::new(lr, vec![30, 5, 12, 12], 0.3).unwrap().into()),
        ("exponential", ExponentialLR::from_decay_rate(lr, 0.05).unwrap().into()),
        ("linear", LinearLR::new(lr, 0.1, 1.0, 8).unwrap().into()),
        ("linear-down", LinearLR::new(lr, 1.0, 0.0, 100).unwrap().into()),
        ("polynomial", PolynomialLR::new(lr, 30, 2.0).unwrap().into()),
        ("cosine", CosineAnnealingLR::new(lr, 25, 1e-3).unwrap().into()),
        ("restarts", CosineAnnealingWarmRestarts::new(lr, 10, 2, 5e-4).unwrap().into()),
        ("restarts-1", CosineAnnealingWarmRestarts::new(lr, 7, 1, 0.0).unwrap().into()),
        ("triangular", CyclicLR::new(1e-3, lr, 5, None, CyclicMode::Triangular, Some((0.8, 0.9))).unwrap().into()),
        ("triangular2", CyclicLR::new(1e-3, lr, 4, Some(6), CyclicMode::Triangular2, None).unwrap().into()),
        ("exp_range", CyclicLR::new(1e-3, lr, 5, None, CyclicMode::ExpRange { gamma: 0.97 }, None).unwrap().into()),
        ("onecycle", OneCycleLR::new(lr, 50, 0.3, Anneal::Cos, 25.0, 1e4, false, Some((0.85, 0.95))).unwrap().into()),
        ("onecycle-3", OneCycleLR::new(lr, 1000, 0.25, Anneal::Linear, 25.0, 1e4, true, None).unwrap().into()),
        ("warmup-cosine", warmup_cosine(lr, 5, 40, 0.01, 0.0).unwrap()),
        (
            "chained",
            ChainedScheduler::new(
                lr,
                vec![LinearLR::new(lr, 0.1, 1.0, 10).unwrap().into(), StepLR::new(lr, 20, 0.5).unwrap().into()],
            )
            .unwrap()
            .into(),
        ),
    ]
}

#[test]
fn finite_and_within_bounds_for_a_million_steps() {
    for (name, s) in zoo() {
        let (lo, hi) = s.bounds();
        assert!(lo.is_finite() && hi.is_finite() && lo <= hi, "{name}: bounds {lo} {hi}");
        let slack = 1e-12 * hi.abs();
        let check = |t: u64| {
            let lr = s.lr_at(t);
            assert!(lr.is_finite(), "{name} step {t}: {lr}");
            assert!(lr >= lo - slack && lr <= hi + slack, "{name} step {t}: {lr} outside [{lo}, {hi}]");
            if let Some(m) = s.momentum_at(t) {
                assert!(m.is_finite() && (0.0..1.0).contains(&m), "{name} step {t}: momentum {m}");
            }
        };
        (0..1_000_000).for_each(check);
        [u64::MAX / 2, u64::MAX - 1, u64::MAX].into_iter().for_each(check);
    }
}

#[test]
fn periodic_schedules_repeat_exactly() {
    let cos = CosineAnnealingLR::new(0.1, 25, 1e-3).unwrap();
    let restarts = CosineAnnealingWarmRestarts::new(0.1, 7, 1, 0.0).unwrap();
    let tri = CyclicLR::new(1e-3, 0.1, 4, Some(6), CyclicMode::Triangular, Some((0.8, 0.9))).unwrap();
    for t in 0..10_000u64 {
        assert_eq!(cos.lr_at(t).to_bits(), cos.lr_at(t + 50).to_bits(), "cosine period 2 T_max at {t}");
        assert_eq!(cos.lr_at(t).to_bits(), cos.lr_at(t + 50 * 1_000_000_007).to_bits(), "cosine far out");
        assert_eq!(restarts.lr_at(t).to_bits(), restarts.lr_at(t + 7).to_bits(), "restarts period T_0 at {t}");
        // Triangular: period step_size_up + step_size_down.
        assert_eq!(tri.lr_at(t).to_bits(), tri.lr_at(t + 10).to_bits(), "triangular at {t}");
        assert_eq!(tri.lr_at(t).to_bits(), tri.lr_at(t + 10 * 3_000_000_019).to_bits(), "triangular far out");
        assert_eq!(tri.momentum_at(t), tri.momentum_at(t + 10));
    }
    // Warm restarts with T_mult = 2: restarts at 10, 30, 70, 150.
    let r = CosineAnnealingWarmRestarts::new(1.0, 10, 2, 0.0).unwrap();
    for start in [0u64, 10, 30, 70, 150] {
        assert_eq!(r.lr_at(start), 1.0, "restart at {start}");
    }
    assert!(r.lr_at(29) < 0.01 && r.lr_at(69) < 0.01);
}

#[test]
fn values_at_hand_checked_points() {
    // Worked by hand from torch's formulas.
    let s = StepLR::new(1.0, 3, 0.5).unwrap();
    assert_eq!([0, 2, 3, 5, 6, 9].map(|t| s.lr_at(t)), [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]);
    let m = MultiStepLR::new(1.0, vec![2, 4, 4], 0.1).unwrap();
    assert_eq!(m.lr_at(1), 1.0);
    assert!((m.lr_at(2) - 0.1).abs() < 1e-15);
    assert!((m.lr_at(4) - 0.001).abs() < 1e-15, "a repeated milestone decays twice");
    let e = ExponentialLR::from_decay_rate(2.0, 0.5).unwrap();
    assert!((e.lr_at(4) - 2.0 * (-2.0f64).exp()).abs() < 1e-15, "lecture: eta_0 e^(-lambda t)");
    let c = CosineAnnealingLR::new(1.0, 10, 0.0).unwrap();
    assert!((c.lr_at(5) - 0.5).abs() < 1e-15 && c.lr_at(10).abs() < 1e-15 && (c.lr_at(20) - 1.0).abs() < 1e-15);
    let l = LinearLR::new(1.0, 0.5, 1.0, 4).unwrap();
    assert_eq!([0, 2, 4, 100].map(|t| l.lr_at(t)), [0.5, 0.75, 1.0, 1.0]);
    let p = PolynomialLR::new(1.0, 4, 2.0).unwrap();
    assert_eq!([0, 2, 4, 9].map(|t| p.lr_at(t)), [1.0, 0.25, 0.0, 0.0]);
    let k = ConstantLR::new(1.0, 0.25, 2).unwrap();
    assert_eq!([0, 1, 2].map(|t| k.lr_at(t)), [0.25, 0.25, 1.0]);
    // Triangular 0 -> 1 in 2 steps and back in 2: 0, .5, 1, .5, 0, ...
    let tri = CyclicLR::new(0.0, 1.0, 2, None, CyclicMode::Triangular, Some((0.8, 0.9))).unwrap();
    assert_eq!([0, 1, 2, 3, 4, 5].map(|t| tri.lr_at(t)), [0.0, 0.5, 1.0, 0.5, 0.0, 0.5]);
    assert_eq!(tri.momentum_at(2), Some(0.8), "momentum moves opposite to the rate");
    let tri2 = CyclicLR::new(0.0, 1.0, 2, None, CyclicMode::Triangular2, None).unwrap();
    assert_eq!([2, 6, 10].map(|t| tri2.lr_at(t)), [1.0, 0.5, 0.25]);
    assert_eq!(tri2.momentum_at(2), None);
    // One cycle: starts at max/div, peaks at max at pct*total - 1, ends at
    // max/div/final_div; momentum opposite.
    let oc = OneCycleLR::new(1.0, 11, 0.1, Anneal::Linear, 10.0, 100.0, false, Some((0.85, 0.95))).unwrap();
    assert!((oc.lr_at(0) - 0.1).abs() < 1e-15);
    assert!((oc.lr_at(10) - 0.001).abs() < 1e-15);
    assert_eq!(oc.lr_at(1000), oc.lr_at(10), "past total_steps the final rate holds");
    assert_eq!(oc.momentum_at(0), Some(0.95));
    let w = warmup_cosine(1.0, 4, 14, 0.25, 0.0).unwrap();
    assert_eq!(w.lr_at(0), 0.25);
    assert_eq!(w.lr_at(4), 1.0, "cosine starts at base after the warmup");
    assert!((w.lr_at(9) - 0.5).abs() < 1e-15);
}

#[test]
fn reduce_on_plateau_follows_torch() {
    // patience 2, factor 0.5, cooldown 1, abs threshold 0.1.
    let mut r = ReduceLROnPlateau::new(1.0, PlateauMode::Min, 0.5, 2, 0.1, false, 1, 0.2, 1e-8).unwrap();
    let metrics = [5.0, 4.0, 3.95, 3.95, 3.95, 3.95, 3.95, 3.95, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0];
    let lrs: Vec<f64> = metrics.iter().map(|&m| r.step(m).unwrap()).collect();
    // bad epochs after 4.0: 1, 2, 3 -> cut at the 3rd (index 4); cooldown 1
    // swallows index 5; bad again 1, 2, 3 -> cut at index 8? No: 3.0 improves
    // at index 8 (best 3.95 - 0.1 > 3.0), then bad 1, 2, 3 -> cut at index 11,
    // cooldown at 12, bad 1, 2, 3 at 13..15 -> cut at 15 to max(0.125, 0.2) = 0.2.
    assert_eq!(
        lrs,
        [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.2, 0.2],
        "{lrs:?}"
    );
    assert!(r.step(f64::NAN).is_err());
    assert_eq!(r.lr(), 0.2);
    let mut up = ReduceLROnPlateau::new(1.0, PlateauMode::Max, 0.1, 0, 1e-4, true, 0, 0.0, 1e-8).unwrap();
    assert_eq!(up.step(0.5).unwrap(), 1.0);
    assert!((up.step(0.4).unwrap() - 0.1).abs() < 1e-15, "accuracy fell: cut at once with patience 0");
}

#[test]
fn invalid_configurations_are_typed_errors() {
    fn field<T: std::fmt::Debug>(r: Result<T, Error>) -> &'static str {
        match r {
            Err(Error::InvalidHyperparameter { name, .. }) => name,
            other => panic!("expected InvalidHyperparameter, got {other:?}"),
        }
    }
    assert_eq!(field(CosineAnnealingLR::new(0.1, 0, 0.0)), "T_max");
    assert_eq!(field(StepLR::new(0.1, 0, 0.1)), "step_size");
    assert_eq!(field(StepLR::new(f64::NAN, 1, 0.1)), "base_lr");
    assert_eq!(field(StepLR::new(0.1, 1, 1.5)), "gamma");
    assert_eq!(field(ExponentialLR::new(0.1, f64::INFINITY)), "gamma");
    assert_eq!(field(ExponentialLR::from_decay_rate(0.1, -1.0)), "lambda");
    assert_eq!(field(MultiStepLR::new(0.1, vec![1], f64::NAN)), "gamma");
    assert_eq!(field(LinearLR::new(0.1, 0.0, 1.0, 5)), "start_factor");
    assert_eq!(field(LinearLR::new(0.1, 0.5, 1.5, 5)), "end_factor");
    assert_eq!(field(LinearLR::new(0.1, 0.5, 1.0, 0)), "total_iters");
    assert_eq!(field(ConstantLR::new(0.1, 2.0, 5)), "factor");
    assert_eq!(field(PolynomialLR::new(0.1, 5, -1.0)), "power");
    assert_eq!(field(PolynomialLR::new(0.1, 0, 1.0)), "total_iters");
    assert_eq!(field(CosineAnnealingWarmRestarts::new(0.1, 0, 1, 0.0)), "T_0");
    assert_eq!(field(CosineAnnealingWarmRestarts::new(0.1, 1, 0, 0.0)), "T_mult");
    assert_eq!(field(CosineAnnealingWarmRestarts::new(0.1, 1, 1, -1.0)), "eta_min");
    assert_eq!(field(CyclicLR::new(0.1, 1.0, 0, None, CyclicMode::Triangular, None)), "step_size_up");
    assert_eq!(field(CyclicLR::new(0.1, 1.0, 1, Some(0), CyclicMode::Triangular, None)), "step_size_down");
    assert_eq!(field(CyclicLR::new(0.1, 1.0, 1, None, CyclicMode::ExpRange { gamma: 1.5 }, None)), "gamma");
    assert_eq!(field(CyclicLR::new(0.1, f64::NAN, 1, None, CyclicMode::Triangular, None)), "max_lr");
    assert_eq!(field(CyclicLR::new(0.1, 1.0, 1, None, CyclicMode::Triangular, Some((0.8, 1.0)))), "max_momentum");
    for pct in [0.0, 1.0, -0.5, f64::NAN] {
        assert_eq!(field(OneCycleLR::new(0.1, 10, pct, Anneal::Cos, 25.0, 1e4, false, None)), "pct_start");
    }
    assert_eq!(field(OneCycleLR::new(0.1, 0, 0.3, Anneal::Cos, 25.0, 1e4, false, None)), "total_steps");
    assert_eq!(field(OneCycleLR::new(0.1, 10, 0.3, Anneal::Cos, 0.0, 1e4, false, None)), "div_factor");
    assert_eq!(field(OneCycleLR::new(0.1, 10, 0.3, Anneal::Cos, 25.0, f64::INFINITY, false, None)), "final_div_factor");
    let c = || -> Schedule { StepLR::new(0.1, 1, 0.5).unwrap().into() };
    assert_eq!(field(SequentialLR::new(vec![c(), c()], vec![])), "milestones");
    assert_eq!(field(SequentialLR::new(vec![c(), c(), c()], vec![5, 5])), "milestones");
    assert_eq!(field(SequentialLR::new(vec![], vec![])), "schedulers");
    assert_eq!(field(ChainedScheduler::new(0.0, vec![c()])), "base_lr");
    assert_eq!(field(warmup_cosine(0.1, 10, 10, 0.1, 0.0)), "total_steps");
    assert_eq!(field(ReduceLROnPlateau::new(0.1, PlateauMode::Min, 1.0, 1, 0.0, true, 0, 0.0, 0.0)), "factor");
}

#[test]
fn step_scheduled_drives_lr_and_momentum() {
    let sched: Schedule =
        OneCycleLR::new(0.01, 20, 0.3, Anneal::Cos, 25.0, 1e4, false, Some((0.85, 0.95))).unwrap().into();
    let mut adam = Adam::new(AdamConfig::default(), 8).unwrap();
    let mut sgd = Sgd::new(SgdConfig { momentum: 0.9, ..Default::default() }, 8).unwrap();
    let (mut p, mut q, g) = ([0.5f32; 8], [0.5f32; 8], [0.1f32; 8]);
    for t in 0..20u64 {
        adam.step_scheduled(&sched, &mut p, &g).unwrap();
        sgd.step_scheduled(&sched, &mut q, &g).unwrap();
        assert_eq!(adam.lr(), sched.lr_at(t));
        assert_eq!(adam.config().betas.0, sched.momentum_at(t).unwrap(), "beta1 cycles");
        assert_eq!(sgd.config().momentum, sched.momentum_at(t).unwrap(), "SGD momentum cycles");
    }
    // An optimizer without momentum refuses a momentum-cycling schedule and
    // changes nothing.
    let mut ada = Adagrad::new(AdagradConfig::default(), 8).unwrap();
    let before = p;
    let e = ada.step_scheduled(&sched, &mut p, &g).unwrap_err();
    assert!(matches!(e, Error::IncompatibleConfig { .. }));
    assert_eq!((p, ada.step_count(), ada.lr()), (before, 0, 1e-2));
    // SGD without a momentum buffer cannot start cycling one.
    let mut plain = Sgd::new(SgdConfig::default(), 8).unwrap();
    assert!(plain.step_scheduled(&sched, &mut p, &g).is_err());
    // A length error leaves the learning rate as it was.
    let cos = CosineAnnealingLR::new(0.1, 10, 0.0).unwrap();
    let mut a2 = Adam::new(AdamConfig { lr: 0.5, ..Default::default() }, 8).unwrap();
    assert!(a2.step_scheduled(&cos, &mut p[..4], &g).is_err());
    assert_eq!(a2.lr(), 0.5);
    a2.step_scheduled(&cos, &mut p, &g).unwrap();
    assert_eq!(a2.lr(), 0.1);
}

/// Found by `cargo fuzz run schedules` (crash-34cd8eb0...): a tiny positive
/// `div_factor` made the initial rate overflow to infinity, so the schedule
/// yielded `inf`. Now a typed error.
#[test]
fn regression_onecycle_tiny_div_factor() {
    let r = OneCycleLR::new(
        7.4e-68,
        71_468_255_805_440,
        2.05e-289,
        Anneal::Cos,
        8.07e-308,
        1.89e-312,
        true,
        Some((0.0, 0.0)),
    );
    assert!(matches!(r, Err(Error::InvalidHyperparameter { name: "final_div_factor", .. })), "{r:?}");
    let r = OneCycleLR::new(1e300, 10, 0.3, Anneal::Cos, 1e-10, 1.0, false, None);
    assert!(matches!(r, Err(Error::InvalidHyperparameter { name: "div_factor", .. })), "{r:?}");
    let r = OneCycleLR::new(1.0, 10, 0.3, Anneal::Cos, 1.0, 1e-320, false, None);
    assert!(matches!(r, Err(Error::InvalidHyperparameter { name: "final_div_factor", .. })), "{r:?}");
}

/// Found by `cargo fuzz run schedules`: `T_max > u64::MAX / 2` overflowed the
/// period `2 T_max` (a panic in debug builds).
#[test]
fn regression_cosine_huge_t_max() {
    let c = CosineAnnealingLR::new(1.0, u64::MAX - 5, 0.0).unwrap();
    for t in [0, 1, u64::MAX / 2, u64::MAX] {
        assert!(c.lr_at(t).is_finite());
    }
    assert_eq!(c.lr_at(0), 1.0);
}

/// Found by `cargo fuzz run schedules`: `step_size_up + step_size_down`
/// overflowed u64.
#[test]
fn regression_cyclic_step_sizes_overflow() {
    let r = CyclicLR::new(0.1, 1.0, u64::MAX, Some(2), CyclicMode::Triangular, None);
    assert!(matches!(r, Err(Error::InvalidHyperparameter { name: "step_size_down", .. })), "{r:?}");
    let c = CyclicLR::new(0.1, 1.0, u64::MAX - 2, Some(2), CyclicMode::Triangular2, None).unwrap();
    assert!(c.lr_at(u64::MAX).is_finite());
}

/// Found by `cargo fuzz run schedules`: a subnormal `base_lr` in a
/// `ChainedScheduler` turned child rates into infinite factors.
#[test]
fn regression_chained_tiny_base() {
    let child = || -> Schedule { CosineAnnealingWarmRestarts::new(2.1e-314, 3, 2, 6.5e303).unwrap().into() };
    let r = ChainedScheduler::new(2.1e-314, vec![child()]);
    assert!(matches!(r, Err(Error::InvalidHyperparameter { name: "base_lr", .. })), "{r:?}");
    let big = || -> Schedule { ConstantLR::new(1e300, 1.0, 0).unwrap().into() };
    let r = ChainedScheduler::new(1e-300, vec![big(), big()]);
    assert!(matches!(r, Err(Error::InvalidHyperparameter { name: "schedulers", .. })), "{r:?}");
}

/// Found by the CI run of `cargo fuzz run schedules` (crash-b6f43faf...): a
/// subnormal `max_lr` whose initial rate underflows to 0 gave `-5e-324` at
/// step 0 (halving a subnormal loses its last bit, so
/// `end + (start - end) / 2 * 2` overshot below `start = 0`). Interpolations
/// are now kept between their endpoints.
#[test]
fn regression_onecycle_subnormal_max_lr() {
    for anneal in [Anneal::Cos, Anneal::Linear] {
        for three_phase in [false, true] {
            let s = OneCycleLR::new(
                3.2505e-319,
                4_557_430_888_798_830_399,
                0.000476792279410887,
                anneal,
                134205095743.24706,
                0.0004767887869521099,
                three_phase,
                Some((0.0004767922794117647, 0.0004767922794117647)),
            )
            .unwrap();
            let (lo, hi) = s.bounds();
            for t in [0, 1, 2, 1 << 40, 1 << 52, 4_557_430_888_798_830_398, u64::MAX] {
                let lr = s.lr_at(t);
                assert!(lr >= lo && lr <= hi, "{anneal:?} {three_phase} step {t}: {lr:e} outside [{lo:e}, {hi:e}]");
            }
        }
    }
    // Subnormal endpoints everywhere else too.
    let c = CosineAnnealingLR::new(3.2505e-319, 7, 1e-320).unwrap();
    let w = CosineAnnealingWarmRestarts::new(3.2505e-319, 3, 2, 1e-320).unwrap();
    let y = CyclicLR::new(1e-320, 3.2505e-319, 3, Some(5), CyclicMode::Triangular2, None).unwrap();
    for t in 0..40 {
        for (name, lr) in [("cosine", c.lr_at(t)), ("restarts", w.lr_at(t)), ("cyclic", y.lr_at(t))] {
            assert!((1e-320..=3.2505e-319).contains(&lr), "{name} step {t}: {lr:e}");
        }
    }
}

/// Found while fixing the above: `(base_lr - eta_min) * (1 + cos)` overflowed
/// for a rate near `f64::MAX`, giving `inf`. Halving first is the same number
/// in range and finite at the top.
#[test]
fn regression_cosine_rate_near_max() {
    let c = CosineAnnealingLR::new(f64::MAX, 10, 0.0).unwrap();
    let w = CosineAnnealingWarmRestarts::new(f64::MAX, 10, 1, 0.0).unwrap();
    let o = OneCycleLR::new(f64::MAX, 100, 0.3, Anneal::Cos, 25.0, 1e4, true, None).unwrap();
    for t in 0..120 {
        for lr in [c.lr_at(t), w.lr_at(t), o.lr_at(t)] {
            assert!(lr.is_finite() && lr >= 0.0, "step {t}: {lr}");
        }
    }
    assert_eq!(c.lr_at(0), f64::MAX);
}

/// The config structs carry torch's names and defaults and build the same
/// schedule as the positional constructors.
#[test]
fn config_structs_match_the_positional_constructors() {
    let c = OneCycleLRConfig { max_lr: 0.1, total_steps: 100, ..Default::default() };
    assert_eq!(
        OneCycleLR::from_config(&c).unwrap(),
        OneCycleLR::new(0.1, 100, 0.3, Anneal::Cos, 25.0, 1e4, false, Some((0.85, 0.95))).unwrap()
    );
    let c = OneCycleLRConfig { three_phase: true, cycle_momentum: false, anneal_strategy: Anneal::Linear, ..c };
    assert_eq!(
        OneCycleLR::from_config(&c).unwrap(),
        OneCycleLR::new(0.1, 100, 0.3, Anneal::Linear, 25.0, 1e4, true, None).unwrap()
    );
    // torch has no default for max_lr or total_steps: the placeholders are refused.
    assert!(matches!(OneCycleLR::from_config(&OneCycleLRConfig::default()), Err(Error::InvalidHyperparameter { .. })));
    assert_eq!(
        ReduceLROnPlateau::from_config(&ReduceLROnPlateauConfig::default()).unwrap(),
        ReduceLROnPlateau::with_defaults(1e-3).unwrap()
    );
    let c = ReduceLROnPlateauConfig {
        lr: 0.5,
        mode: PlateauMode::Max,
        patience: 2,
        threshold_mode_rel: false,
        ..Default::default()
    };
    assert_eq!(
        ReduceLROnPlateau::from_config(&c).unwrap(),
        ReduceLROnPlateau::new(0.5, PlateauMode::Max, 0.1, 2, 1e-4, false, 0, 0.0, 1e-8).unwrap()
    );
    assert!(ReduceLROnPlateau::from_config(&ReduceLROnPlateauConfig { factor: 1.0, ..Default::default() }).is_err());
}
