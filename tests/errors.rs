//! Every invalid-hyperparameter case torch rejects, length mismatches, and
//! the promise that a failed call modifies nothing.

mod common;

use adaoptim::*;
use common::configs::variety;

fn rejects<A: Algorithm>(cfg: A, field: &str) {
    match Optimizer::new(cfg.clone(), 4) {
        Err(Error::InvalidHyperparameter { name, .. }) => assert_eq!(name, field, "{cfg:?}"),
        other => panic!("{cfg:?}: expected InvalidHyperparameter({field}), got {other:?}"),
    }
    // The free-kernel layer checks too.
    let mut p = [0.0f32; 4];
    let mut bufs = vec![vec![0.0f32; 4]; cfg.state_names().len()];
    let mut refs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    let mut aux = cfg.aux_init();
    assert!(matches!(
        step_slices(&cfg, 1, &mut aux, &mut p, &[1.0; 4], &mut refs, &Exec::auto()),
        Err(Error::InvalidHyperparameter { .. })
    ));
    assert_eq!(p, [0.0; 4]);
}

const NAN: f64 = f64::NAN;
const INF: f64 = f64::INFINITY;

#[test]
fn sgd_rejects_what_torch_rejects() {
    let d = SgdConfig::default;
    rejects(SgdConfig { lr: -1e-3, ..d() }, "lr");
    rejects(SgdConfig { momentum: -0.1, ..d() }, "momentum");
    rejects(SgdConfig { weight_decay: -0.1, ..d() }, "weight_decay");
    rejects(SgdConfig { nesterov: true, ..d() }, "nesterov");
    rejects(SgdConfig { nesterov: true, momentum: 0.9, dampening: 0.1, ..d() }, "nesterov");
    rejects(SgdConfig { lr: NAN, ..d() }, "lr");
    rejects(SgdConfig { dampening: NAN, ..d() }, "dampening");
    rejects(SgdConfig { momentum: INF, ..d() }, "momentum");
}

#[test]
fn adagrad_rejects_what_torch_rejects() {
    let d = AdagradConfig::default;
    rejects(AdagradConfig { lr: -0.1, ..d() }, "lr");
    rejects(AdagradConfig { lr_decay: -0.1, ..d() }, "lr_decay");
    rejects(AdagradConfig { weight_decay: -0.1, ..d() }, "weight_decay");
    rejects(AdagradConfig { initial_accumulator_value: -0.1, ..d() }, "initial_accumulator_value");
    rejects(AdagradConfig { eps: -1e-10, ..d() }, "eps");
    rejects(AdagradConfig { eps: NAN, ..d() }, "eps");
}

#[test]
fn rmsprop_rejects_what_torch_rejects() {
    let d = RmsPropConfig::default;
    rejects(RmsPropConfig { lr: -0.1, ..d() }, "lr");
    rejects(RmsPropConfig { eps: -0.1, ..d() }, "eps");
    rejects(RmsPropConfig { momentum: -0.1, ..d() }, "momentum");
    rejects(RmsPropConfig { weight_decay: -0.1, ..d() }, "weight_decay");
    rejects(RmsPropConfig { alpha: -0.1, ..d() }, "alpha");
    rejects(RmsPropConfig { alpha: NAN, ..d() }, "alpha");
}

#[test]
fn adadelta_rejects_what_torch_rejects() {
    let d = AdadeltaConfig::default;
    rejects(AdadeltaConfig { lr: -0.1, ..d() }, "lr");
    rejects(AdadeltaConfig { rho: -0.1, ..d() }, "rho");
    rejects(AdadeltaConfig { rho: 1.1, ..d() }, "rho");
    rejects(AdadeltaConfig { eps: -0.1, ..d() }, "eps");
    rejects(AdadeltaConfig { weight_decay: -0.1, ..d() }, "weight_decay");
    rejects(AdadeltaConfig { rho: NAN, ..d() }, "rho");
    // torch accepts rho in [0, 1], both ends included.
    assert!(Optimizer::new(AdadeltaConfig { rho: 1.0, ..d() }, 1).is_ok());
    assert!(Optimizer::new(AdadeltaConfig { rho: 0.0, ..d() }, 1).is_ok());
}

#[test]
fn adam_family_rejects_what_torch_rejects() {
    let d = AdamConfig::default;
    rejects(AdamConfig { lr: -0.1, ..d() }, "lr");
    rejects(AdamConfig { eps: -0.1, ..d() }, "eps");
    rejects(AdamConfig { betas: (1.0, 0.999), ..d() }, "betas[0]");
    rejects(AdamConfig { betas: (-0.1, 0.999), ..d() }, "betas[0]");
    rejects(AdamConfig { betas: (0.9, 1.0), ..d() }, "betas[1]");
    rejects(AdamConfig { betas: (0.9, NAN), ..d() }, "betas[1]");
    rejects(AdamConfig { weight_decay: -0.1, ..d() }, "weight_decay");
    rejects(AdamWConfig { lr: NAN, ..Default::default() }, "lr");
    rejects(AdamWConfig { weight_decay: -1.0, ..Default::default() }, "weight_decay");
    rejects(AdamaxConfig { betas: (0.9, 1.5), ..Default::default() }, "betas[1]");
    rejects(AdamaxConfig { eps: -1.0, ..Default::default() }, "eps");
    rejects(AdamaxConfig { lr: -1.0, ..Default::default() }, "lr");
    rejects(AdamaxConfig { weight_decay: -1.0, ..Default::default() }, "weight_decay");
    rejects(NAdamConfig { momentum_decay: -1.0, ..Default::default() }, "momentum_decay");
    rejects(NAdamConfig { betas: (1.0, 0.9), ..Default::default() }, "betas[0]");
    rejects(NAdamConfig { lr: -1.0, ..Default::default() }, "lr");
    rejects(NAdamConfig { eps: INF, ..Default::default() }, "eps");
    rejects(NAdamConfig { weight_decay: -1.0, ..Default::default() }, "weight_decay");
    // torch.optim.RAdam's ValueErrors: lr, eps, betas, weight_decay.
    rejects(RAdamConfig { lr: -1.0, ..Default::default() }, "lr");
    rejects(RAdamConfig { eps: -1e-8, ..Default::default() }, "eps");
    rejects(RAdamConfig { betas: (1.0, 0.999), ..Default::default() }, "betas[0]");
    rejects(RAdamConfig { betas: (0.9, -0.5), ..Default::default() }, "betas[1]");
    rejects(RAdamConfig { weight_decay: -1.0, ..Default::default() }, "weight_decay");
    rejects(RAdamConfig { lr: NAN, ..Default::default() }, "lr");
}

#[test]
fn length_mismatch_modifies_nothing() {
    for (name, cfg) in variety() {
        let n = 33;
        let mut opt = cfg.build(n).unwrap();
        let mut p: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
        let g = vec![0.5f32; n];
        opt.step(&mut p, &g).unwrap();
        let before_p = p.clone();
        let before_state: Vec<Vec<f32>> = opt.state_names().iter().map(|s| opt.state(s).unwrap().to_vec()).collect();
        let t = opt.step_count();

        let e = opt.step(&mut p, &g[..n - 1]).unwrap_err();
        assert_eq!(e, Error::LengthMismatch { what: "grads", expected: n, actual: n - 1 }, "{name}");
        let e = opt.step(&mut p[..n - 1], &g[..n - 1]).unwrap_err();
        assert!(matches!(e, Error::LengthMismatch { what: "params", .. }), "{name}");
        let mut longer = p.clone();
        longer.push(1.0);
        assert!(opt.step(&mut longer, &[0.0; 34]).is_err());
        assert!(opt.set_lr(-1.0).is_err());
        assert!(opt.set_lr(f64::NAN).is_err());

        assert_eq!(p, before_p, "{name}: params untouched");
        assert_eq!(&longer[..n], &before_p[..], "{name}: params untouched");
        let after: Vec<Vec<f32>> = opt.state_names().iter().map(|s| opt.state(s).unwrap().to_vec()).collect();
        assert_eq!(after, before_state, "{name}: state untouched");
        assert_eq!(opt.step_count(), t, "{name}: step count untouched");
        assert_eq!(opt.lr(), cfg.build(1).unwrap().lr(), "{name}: lr untouched");
    }
}

#[test]
fn free_kernel_checks_state_count_and_lengths() {
    let cfg = AdamConfig { amsgrad: true, ..Default::default() };
    let mut p = vec![1.0f32; 8];
    let g = vec![1.0f32; 8];
    let (mut m, mut v, mut vmax, mut short) = (vec![0.0f32; 8], vec![0.0f32; 8], vec![0.0f32; 8], vec![0.0f32; 7]);
    let exec = Exec::auto();
    let e = step_slices(&cfg, 1, &mut (), &mut p, &g, &mut [&mut m, &mut v], &exec).unwrap_err();
    assert_eq!(e, Error::StateCount { expected: 3, actual: 2 });
    let e = step_slices(&cfg, 1, &mut (), &mut p, &g, &mut [&mut m, &mut v, &mut short], &exec).unwrap_err();
    assert_eq!(e, Error::LengthMismatch { what: "max_exp_avg_sq", expected: 8, actual: 7 });
    let e = step_slices(&cfg, 0, &mut (), &mut p, &g, &mut [&mut m, &mut v, &mut vmax], &exec).unwrap_err();
    assert_eq!(e, Error::InvalidStep { step: 0 });
    let e = step_slices(&cfg, 1, &mut (), &mut p, &g[..3], &mut [&mut m, &mut v, &mut vmax], &exec).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "grads", .. }));
    assert!(p.iter().all(|&x| x == 1.0));
    assert!(m.iter().chain(&v).chain(&vmax).chain(&short).all(|&x| x == 0.0));
    // And the same call with the right buffers works.
    step_slices(&cfg, 1, &mut (), &mut p, &g, &mut [&mut m, &mut v, &mut vmax], &exec).unwrap();
    assert!(p.iter().all(|&x| x < 1.0));
}

#[test]
fn set_config_keeps_state_layout() {
    let mut opt = Adam::new(AdamConfig::default(), 4).unwrap();
    let e = opt.set_config(AdamConfig { amsgrad: true, ..Default::default() }).unwrap_err();
    assert!(matches!(e, Error::IncompatibleConfig { .. }));
    assert!(!opt.config().amsgrad);
    assert!(opt.set_config(AdamConfig { betas: (2.0, 0.9), ..Default::default() }).is_err());
    opt.set_config(AdamConfig { betas: (0.85, 0.99), ..Default::default() }).unwrap();
    assert_eq!(opt.config().betas, (0.85, 0.99));
}

#[test]
fn unknown_names_and_options_are_typed_errors() {
    assert!(matches!(AnyConfig::from_torch("LBFGS", &[]), Err(Error::UnknownOptimizer { .. })));
    let e = AnyConfig::from_torch("Adam", &[("momentum", HyperValue::Number(0.9))]).unwrap_err();
    assert!(matches!(e, Error::InvalidOption { .. }));
    let e = AnyConfig::from_torch("Adam", &[("amsgrad", HyperValue::Number(1.0))]).unwrap_err();
    assert!(matches!(e, Error::InvalidOption { .. }));
    let e = AnyConfig::from_torch("Adam", &[("lr", HyperValue::Number(-1.0))]).unwrap_err();
    assert!(matches!(e, Error::InvalidHyperparameter { name: "lr", .. }));
    // Implementation switches are accepted and change nothing.
    let c = AnyConfig::from_torch("Adam", &[("foreach", HyperValue::Bool(true))]).unwrap();
    assert_eq!(c, AnyConfig::Adam(AdamConfig::default()));
    for e in [
        Error::InvalidHyperparameter { name: "lr", value: -1.0, requirement: "finite and >= 0" },
        Error::BackendUnavailable { backend: Backend::Avx512 },
    ] {
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn free_kernel_rejects_bad_scale_and_clip_factor_and_changes_nothing() {
    let cfg = AdamConfig::default();
    for (scale, coef, field) in [
        (Some(0.0f32), None, "grad_scale"),
        (Some(f32::NAN), None, "grad_scale"),
        (Some(f32::INFINITY), None, "grad_scale"),
        (None, Some(-0.5f32), "clip_coef"),
        (None, Some(f32::NAN), "clip_coef"),
        (None, Some(f32::INFINITY), "clip_coef"),
    ] {
        let mut p = [0.5f32; 4];
        let mut bufs = vec![vec![0.25f32; 4]; 2];
        let mut refs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        let o = StepOptions { grad_scale: scale, clip_coef: coef, ..StepOptions::default() };
        match step_slices_with(&cfg, 1, &mut (), &mut p, &[1.0; 4], &mut refs, &o) {
            Err(Error::InvalidHyperparameter { name, .. }) => assert_eq!(name, field),
            other => panic!("{scale:?} {coef:?}: {other:?}"),
        }
        assert_eq!(p, [0.5; 4]);
        assert!(bufs.iter().all(|b| b == &[0.25; 4]));
    }
}

#[test]
fn torch_kwargs_from_json() {
    let json = r#"{"lr": 0.01, "betas": [0.8, 0.99], "amsgrad": true, "foreach": null, "fused": null,
                   "differentiable": false, "params": [0, 1], "initial_lr": 0.1}"#;
    let want = AnyConfig::from(AdamConfig { lr: 0.01, betas: (0.8, 0.99), amsgrad: true, ..Default::default() });
    assert_eq!(AnyConfig::from_torch_json("Adam", json).unwrap(), want);
    for (text, field) in [
        ("not json", "kwargs"),
        ("[0.01]", "kwargs"),
        (r#"{"lr": "fast"}"#, "lr"),
        (r#"{"lr": null}"#, "lr"),
        (r#"{"betas": [0.9]}"#, "betas"),
        (r#"{"bogus": 1}"#, "bogus"),
    ] {
        match AnyConfig::from_torch_json("Adam", text) {
            Err(Error::InvalidOption { name, .. }) => assert_eq!(name, field, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    assert!(matches!(AnyConfig::from_torch_json("Adam", r#"{"lr": -1}"#), Err(Error::InvalidHyperparameter { .. })));
    assert!(matches!(AnyConfig::from_torch_json("Adamm", "{}"), Err(Error::UnknownOptimizer { .. })));
}

#[test]
fn sparse_adam_kwargs_from_json() {
    use adaoptim::sparse::SparseAdamConfig;
    let json = r#"{"lr": 0.05, "betas": [0.8, 0.99], "eps": 1e-6, "maximize": true, "params": [0]}"#;
    let want = SparseAdamConfig { lr: 0.05, betas: (0.8, 0.99), eps: 1e-6, maximize: true };
    assert_eq!(SparseAdamConfig::from_torch_json(json).unwrap(), want);
    assert_eq!(SparseAdamConfig::from_torch_json("{}").unwrap(), SparseAdamConfig::default());
    for (text, field) in [("[1]", "kwargs"), (r#"{"weight_decay": 0.1}"#, "weight_decay"), (r#"{"lr": true}"#, "lr")] {
        match SparseAdamConfig::from_torch_json(text) {
            Err(Error::InvalidOption { name, .. }) => assert_eq!(name, field, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    assert!(matches!(
        SparseAdamConfig::from_torch_json(r#"{"betas": [1.0, 0.9]}"#),
        Err(Error::InvalidHyperparameter { .. })
    ));
}

/// An I/O error keeps the operating system's error as its `source()`.
#[test]
fn io_errors_keep_their_source() {
    let e = Adam::load("/nonexistent/dir/x.safetensors").unwrap_err();
    assert!(matches!(e, Error::Io { kind: std::io::ErrorKind::NotFound, .. }));
    let source = std::error::Error::source(&e).expect("a source");
    let io = source.downcast_ref::<std::io::Error>().expect("an io::Error");
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    // Still Clone and comparable.
    assert_eq!(e.clone(), e);
    assert!(std::error::Error::source(&Error::StepLimit { step: 1 }).is_none());
}

/// Row-wise AdaGrad from its config struct: torch Adagrad's names and
/// defaults, the same optimizer as the positional constructor.
#[test]
fn row_wise_adagrad_config() {
    use adaoptim::sparse::{RowWiseAdagrad, RowWiseAdagradConfig};
    let a = RowWiseAdagrad::with_config(RowWiseAdagradConfig::default(), 4, 3).unwrap();
    let b = RowWiseAdagrad::new(0.01, 1e-10, 0.0, 4, 3).unwrap();
    assert_eq!(a.to_safetensors().unwrap(), b.to_safetensors().unwrap());
    let bad = RowWiseAdagradConfig { lr: -1.0, ..Default::default() };
    assert!(matches!(RowWiseAdagrad::with_config(bad, 4, 3), Err(Error::InvalidHyperparameter { name: "lr", .. })));
}
