//! The burn adapter against adaoptim on raw slices (bit for bit), against
//! burn's own AdamW (within tolerance), and its errors.

use adaoptim::Algorithm;
use adaoptim_burn::{AdamW, AdamWConfig, Optim, Sgd, SgdConfig};
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Tensor, TensorData};

/// Deterministic values in [-1, 1) (a 64-bit LCG).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 23) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn flat<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    /// Not used by `forward`: it never has a gradient.
    unused: Linear,
}

fn device() -> Device {
    Device::default().autodiff()
}

fn mlp(seed: u64) -> Mlp {
    let dev = device();
    let mut m = Mlp {
        fc1: LinearConfig::new(8, 16).init(&dev),
        fc2: LinearConfig::new(16, 3).init(&dev),
        unused: LinearConfig::new(2, 2).init(&dev),
    };
    // A fixed initialization (burn's own is not seeded).
    let set = |p: Param<Tensor<2>>, s: u64| {
        let dims = p.val().dims();
        p.map(|_| Tensor::from_data(TensorData::new(values(dims[0] * dims[1], s), dims), &device()).require_grad())
    };
    let set1 = |p: Param<Tensor<1>>, s: u64| {
        let dims = p.val().dims();
        p.map(|_| Tensor::from_data(TensorData::new(values(dims[0], s), dims), &device()).require_grad())
    };
    m.fc1.weight = set(m.fc1.weight, seed);
    m.fc1.bias = m.fc1.bias.map(|b| set1(b, seed + 1));
    m.fc2.weight = set(m.fc2.weight, seed + 2);
    m.fc2.bias = m.fc2.bias.map(|b| set1(b, seed + 3));
    m
}

impl Mlp {
    fn loss(&self, x: &Tensor<2>, y: &Tensor<2>) -> Tensor<1> {
        let h = burn::tensor::activation::tanh(self.fc1.forward(x.clone()));
        (self.fc2.forward(h) - y.clone()).powi_scalar(2).mean()
    }
    /// The four trained parameters, flattened, in a fixed order.
    fn params(&self) -> Vec<Vec<f32>> {
        vec![
            flat(self.fc1.weight.val()),
            flat(self.fc1.bias.as_ref().unwrap().val()),
            flat(self.fc2.weight.val()),
            flat(self.fc2.bias.as_ref().unwrap().val()),
        ]
    }
    fn grads(&self, g: &GradientsParams) -> Vec<Vec<f32>> {
        vec![
            flat(g.get::<2>(self.fc1.weight.id).unwrap()),
            flat(g.get::<1>(self.fc1.bias.as_ref().unwrap().id).unwrap()),
            flat(g.get::<2>(self.fc2.weight.id).unwrap()),
            flat(g.get::<1>(self.fc2.bias.as_ref().unwrap().id).unwrap()),
        ]
    }
}

fn data() -> (Tensor<2>, Tensor<2>) {
    let dev = device();
    (
        Tensor::from_data(TensorData::new(values(32 * 8, 90), [32, 8]), &dev),
        Tensor::from_data(TensorData::new(values(32 * 3, 91), [32, 3]), &dev),
    )
}

#[test]
fn module_step_is_adaoptim_on_raw_slices_bit_for_bit() {
    let (x, y) = data();
    let mut m = mlp(1);
    let config = AdamWConfig { weight_decay: 0.1, amsgrad: true, ..Default::default() };
    let mut optim: ModuleOptimizer = AdamW::new(config).into();
    let mut raw: Vec<adaoptim::AdamW> =
        m.params().iter().map(|p| adaoptim::AdamW::new(config, p.len()).unwrap()).collect();
    let mut params = m.params();
    let unused_before = flat(m.unused.weight.val());
    let lr = 1e-2;
    for _ in 0..5 {
        let grads = GradientsParams::from_grads(m.loss(&x, &y).backward(), &m);
        for ((o, p), g) in raw.iter_mut().zip(&mut params).zip(m.grads(&grads)) {
            o.set_lr(lr).unwrap();
            o.step(p, &g).unwrap();
        }
        m = optim.step(lr, m, grads);
        for (p, q) in params.iter().zip(m.params()) {
            assert_eq!(bits(p), bits(&q));
        }
    }
    // A parameter without a gradient is left untouched.
    assert_eq!(bits(&flat(m.unused.weight.val())), bits(&unused_before));
}

#[test]
fn adamw_matches_burns_adamw() {
    let (x, y) = data();
    let (mut a, mut b) = (mlp(2), mlp(2));
    let mut ours: ModuleOptimizer =
        AdamW::new(AdamWConfig { eps: 1e-8, weight_decay: 0.01, ..Default::default() }).into();
    let mut theirs = burn::optim::AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.01).init();
    for _ in 0..50 {
        let (la, lb) = (a.loss(&x, &y), b.loss(&x, &y));
        let (va, vb) = (flat(la.clone())[0], flat(lb.clone())[0]);
        assert!((va - vb).abs() <= 1e-5 * vb.abs(), "loss {va} vs {vb}");
        let ga = GradientsParams::from_grads(la.backward(), &a);
        let gb = GradientsParams::from_grads(lb.backward(), &b);
        a = ours.step(1e-2, a, ga);
        b = theirs.step(1e-2, b, gb);
    }
    for (p, q) in a.params().iter().zip(b.params()) {
        for (u, v) in p.iter().zip(&q) {
            assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()), "{u} vs {v}");
        }
    }
}

#[test]
fn groups_through_burns_module_optimizer() {
    use burn::module::ParamGroup;
    let (x, y) = data();
    let mut m = mlp(3);
    let decay = AdamWConfig { weight_decay: 0.5, ..Default::default() };
    let no_decay = AdamWConfig { weight_decay: 0.0, ..Default::default() };
    let mut optim: ModuleOptimizer = ModuleOptimizer::from(AdamW::new(decay)).with_group(
        ParamGroup::from_predicate("bias"),
        AdamW::new(no_decay),
        None,
    );
    let mut params = m.params();
    let configs = [decay, no_decay, decay, no_decay];
    let mut raw: Vec<adaoptim::AdamW> =
        params.iter().zip(configs).map(|(p, c)| adaoptim::AdamW::new(c, p.len()).unwrap()).collect();
    for _ in 0..3 {
        let grads = GradientsParams::from_grads(m.loss(&x, &y).backward(), &m);
        for ((o, p), g) in raw.iter_mut().zip(&mut params).zip(m.grads(&grads)) {
            o.set_lr(1e-2).unwrap();
            o.step(p, &g).unwrap();
        }
        m = optim.step(1e-2, m, grads);
    }
    for (p, q) in params.iter().zip(m.params()) {
        assert_eq!(bits(p), bits(&q));
    }
}

#[test]
fn record_round_trip_resumes_bit_for_bit() {
    let (x, y) = data();
    let mut m = mlp(4);
    let config = AdamWConfig::default();
    let mut optim: ModuleOptimizer = AdamW::new(config).into();
    for _ in 0..3 {
        let g = GradientsParams::from_grads(m.loss(&x, &y).backward(), &m);
        m = optim.step(1e-2, m, g);
    }
    let bytes = optim.into_bytes().unwrap();
    let mut restored: ModuleOptimizer = ModuleOptimizer::from(AdamW::new(config)).from_bytes(bytes).unwrap();
    let (mut a, mut b) = (m.clone(), m);
    for _ in 0..2 {
        let ga = GradientsParams::from_grads(a.loss(&x, &y).backward(), &a);
        let gb = GradientsParams::from_grads(b.loss(&x, &y).backward(), &b);
        a = optim.step(1e-2, a, ga);
        b = restored.step(1e-2, b, gb);
    }
    for (p, q) in a.params().iter().zip(b.params()) {
        assert_eq!(bits(p), bits(&q));
    }
}

#[test]
fn a_step_that_cannot_run_changes_nothing_and_is_recorded() {
    let dev = Device::default();
    let opt = AdamW::new(AdamWConfig::default());
    let errors = opt.errors();
    let p = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0], [3]), &dev);
    let g = Tensor::<1>::from_data(TensorData::new(vec![0.1f32, 0.2, 0.3], [3]), &dev);
    // A first good step makes a state.
    let (p, state) = opt.step(1e-2, p, g.clone(), None);
    let after_one = flat(p.clone());
    let state = state.unwrap();
    assert_eq!(state.steps(), 1);
    assert!(errors.is_empty());
    // An invalid learning rate: nothing moves, the reason is recorded.
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        let (p2, s2) = opt.step(bad, p.clone(), g.clone(), Some(state.clone()));
        assert_eq!(bits(&flat(p2)), bits(&after_one));
        assert_eq!(s2.unwrap().steps(), 1);
        let e = errors.take();
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("lr"), "{e:?}");
    }
    // A state of another length (not this parameter's).
    let other = Tensor::<1>::from_data(TensorData::new(vec![1.0f32; 5], [5]), &dev);
    let (o2, s2) =
        opt.step(1e-2, other, Tensor::from_data(TensorData::new(vec![0.1f32; 5], [5]), &dev), Some(state.clone()));
    assert_eq!(flat(o2), vec![1.0; 5]);
    assert_eq!(s2.unwrap().steps(), 1);
    assert!(!errors.take().is_empty());
    // An f64 parameter.
    let p64 = Tensor::<1>::from_data(TensorData::new(vec![1.0f64, 2.0], [2]), &dev);
    let g64 = Tensor::<1>::from_data(TensorData::new(vec![0.5f64, 0.5], [2]), &dev);
    if p64.dtype() != burn::tensor::DType::F32 {
        let (q, s) = opt.step(1e-2, p64, g64, None);
        assert!(s.is_none());
        assert_eq!(q.into_data().try_to_vec::<f64>().unwrap(), vec![1.0, 2.0]);
        let e = errors.take();
        assert!(e[0].contains("only f32"), "{e:?}");
    }
    // Invalid hyperparameters are refused when the first state is made.
    let bad = AdamW::new(AdamWConfig { eps: -1.0, ..Default::default() });
    let (q, s) = bad.step(
        1e-2,
        Tensor::<1>::from_data(TensorData::new(vec![1.0f32], [1]), &dev),
        Tensor::from_data(TensorData::new(vec![1.0f32], [1]), &dev),
        None,
    );
    assert!(s.is_none());
    assert_eq!(flat(q), vec![1.0]);
    assert!(bad.errors().take()[0].contains("eps"));
}

#[test]
fn every_alias_steps() {
    fn one<C: Algorithm + Default>() {
        let dev = Device::default();
        let opt = Optim::<C>::default();
        let p = Tensor::<1>::from_data(TensorData::new(values(7, 3), [7]), &dev);
        let g = Tensor::<1>::from_data(TensorData::new(values(7, 4), [7]), &dev);
        let (q, s) = opt.step(1e-2, p, g, None);
        assert!(s.is_some() && opt.errors().is_empty(), "{}", C::TORCH_CLASS);
        assert_ne!(bits(&flat(q)), bits(&values(7, 3)), "{}", C::TORCH_CLASS);
    }
    one::<adaoptim_burn::SgdConfig>();
    one::<adaoptim_burn::AdagradConfig>();
    one::<adaoptim_burn::RmsPropConfig>();
    one::<adaoptim_burn::AdadeltaConfig>();
    one::<adaoptim_burn::AdamConfig>();
    one::<adaoptim_burn::AdamWConfig>();
    one::<adaoptim_burn::AdamaxConfig>();
    one::<adaoptim_burn::NAdamConfig>();
    one::<adaoptim_burn::RAdamConfig>();
    one::<adaoptim_burn::RpropConfig>();
    one::<adaoptim_burn::LionConfig>();
    one::<adaoptim_burn::AsgdConfig>();
    let _ = Sgd::new(SgdConfig::default());
}

/// Why the adapter's loss curve parts from burn's AdamW's (README, "burn"):
/// against the AdamW formula evaluated in f64, burn's AdamW drifts further
/// than adaoptim over 30 steps of fixed gradients (measured: mean 22 ulps
/// against 4.6, largest 1310 against 58).
#[test]
fn adaoptim_is_nearer_the_f64_formula_than_burns_adamw() {
    use burn::optim::Optimizer as _;
    let (n, steps, lr) = (256usize, 30usize, 1e-2f64);
    let (b1, b2, eps, wd) = (0.9f64, 0.999f64, 1e-8f64, 0.01f64);
    let p0 = values(n, 7);
    let grads: Vec<Vec<f32>> = (0..steps).map(|t| values(n, 100 + t as u64)).collect();
    // f64 reference (torch's AdamW formula).
    let (mut p, mut m, mut v) = (p0.iter().map(|&x| x as f64).collect::<Vec<_>>(), vec![0f64; n], vec![0f64; n]);
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        for i in 0..n {
            let gi = g[i] as f64;
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let (mh, vh) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
            p[i] -= lr * mh / (vh.sqrt() + eps);
        }
    }
    // adaoptim.
    let mut ours = p0.clone();
    let mut opt =
        adaoptim::AdamW::new(AdamWConfig { lr, betas: (b1, b2), eps, weight_decay: wd, ..Default::default() }, n)
            .unwrap();
    for g in &grads {
        opt.step(&mut ours, g).unwrap();
    }
    // burn's AdamW, one parameter through its per-parameter trait.
    let dev = Device::default();
    let burn_opt = burn::optim::AdamWConfig::new().with_epsilon(eps as f32).with_weight_decay(wd as f32).build();
    let mut t = Tensor::<1>::from_data(TensorData::new(p0.clone(), [n]), &dev);
    let mut state = None;
    for g in &grads {
        let (t2, s2) = burn_opt.step(lr, t, Tensor::from_data(TensorData::new(g.clone(), [n]), &dev), state);
        t = t2;
        state = s2;
    }
    let theirs = flat(t);
    // Error in units of the f32 ulp of each parameter: mean and largest.
    let ulps = |x: &[f32]| -> (f64, f64) {
        let e: Vec<f64> =
            (0..n).map(|i| (x[i] as f64 - p[i]).abs() / ((p[i] as f32).abs() * f32::EPSILON) as f64).collect();
        (e.iter().sum::<f64>() / n as f64, e.iter().copied().fold(0.0, f64::max))
    };
    let (ours_mean, ours_max) = ulps(&ours);
    let (burn_mean, burn_max) = ulps(&theirs);
    eprintln!(
        "error against the f64 formula after {steps} steps, in ulps of the parameter: adaoptim mean {ours_mean:.1} \
         max {ours_max:.0}; burn AdamW mean {burn_mean:.1} max {burn_max:.0}"
    );
    assert!(ours_mean < 10.0, "adaoptim {ours_mean:.1} ulps");
    assert!(burn_mean > 2.0 * ours_mean, "burn {burn_mean:.1} vs adaoptim {ours_mean:.1} ulps");
}

/// torch's `clip_grad_norm_` over every parameter, written out here: the
/// norm in f64, torch's f32 factor `min(1, max / (norm + 1e-6))` evaluated
/// as `reciprocal * max`, each gradient multiplied in f32.
fn torch_clip(grads: &[Vec<f32>], max_norm: f64) -> (f64, Vec<Vec<f32>>) {
    let total = grads.iter().flatten().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    let coef = ((1.0 / (total as f32 + 1e-6_f32)) * max_norm as f32).min(1.0);
    let clipped = grads.iter().map(|g| g.iter().map(|&x| if coef < 1.0 { x * coef } else { x }).collect()).collect();
    (total, clipped)
}

#[test]
fn clip_grad_norm_is_torchs_over_all_parameters() {
    let (x, y) = data();
    let m = mlp(7);
    let grads = GradientsParams::from_grads(m.loss(&x, &y).backward(), &m);
    let before = m.grads(&grads);
    let (norm, _) = torch_clip(&before, 1.0);
    // Clipping: to a tenth of the norm, so every gradient is scaled.
    for max_norm in [norm / 10.0, norm * 10.0] {
        let mut g = GradientsParams::from_grads(m.loss(&x, &y).backward(), &m);
        let got = adaoptim_burn::clip_grad_norm(&m, &mut g, max_norm).unwrap();
        let (want_norm, want) = torch_clip(&before, max_norm);
        assert!((got - want_norm).abs() <= 1e-12 * want_norm, "{got} vs {want_norm}");
        for (a, b) in m.grads(&g).iter().zip(&want) {
            assert_eq!(bits(a), bits(b), "max_norm {max_norm}");
        }
        // The unused layer has no gradient and gets none.
        assert!(g.get::<2>(m.unused.weight.id).is_none());
    }
    // A bad max_norm changes nothing.
    let mut g = GradientsParams::from_grads(m.loss(&x, &y).backward(), &m);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            adaoptim_burn::clip_grad_norm(&m, &mut g, bad),
            Err(adaoptim::Error::InvalidHyperparameter { name: "max_norm", .. })
        ));
        for (a, b) in m.grads(&g).iter().zip(&before) {
            assert_eq!(bits(a), bits(b));
        }
    }
}

#[test]
fn clipped_training_is_adaoptims_fused_clipping_on_raw_slices() {
    // The clipped module step against adaoptim's own global-norm clipping
    // (a MultiOptimizer with max_grad_norm over the four raw slices).
    let (x, y) = data();
    let mut m = mlp(8);
    let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    let mut optim: ModuleOptimizer = AdamW::new(config).into();
    let mut params = m.params();
    let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
    let mut raw = adaoptim::multi::MultiOptimizer::new();
    raw.add_group(config, &sizes).unwrap();
    let lr = 1e-2;
    raw.set_lr(lr).unwrap();
    raw.set_max_grad_norm(Some(0.05)).unwrap();
    for _ in 0..5 {
        let mut grads = GradientsParams::from_grads(m.loss(&x, &y).backward(), &m);
        let g = m.grads(&grads);
        let mut tensors: Vec<adaoptim::multi::TensorStep<'_>> =
            params.iter_mut().zip(&g).map(|(p, g)| adaoptim::multi::TensorStep::new(p, Some(g))).collect();
        raw.step(&mut tensors).unwrap();
        adaoptim_burn::clip_grad_norm(&m, &mut grads, 0.05).unwrap();
        m = optim.step(lr, m, grads);
        for (p, q) in params.iter().zip(m.params()) {
            assert_eq!(bits(p), bits(&q));
        }
    }
}

#[test]
fn bf16_and_8bit_state_is_adaoptims_mixed_optimizer_bit_for_bit() {
    use adaoptim::mixed::MixedOptimizer;
    use adaoptim::storage::{Dtype, Grads, Params};
    for dtype in [Dtype::Bf16, Dtype::Q8] {
        let (x, y) = data();
        let mut m = mlp(9);
        let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let optim = AdamW::new(config).with_state_dtype(dtype);
        let errors = optim.errors();
        let mut optim: ModuleOptimizer = optim.into();
        let mut raw: Vec<MixedOptimizer<AdamWConfig>> =
            m.params().iter().map(|p| MixedOptimizer::new(config, p.len(), dtype).unwrap()).collect();
        let mut params = m.params();
        let lr = 1e-2;
        for _ in 0..4 {
            let grads = GradientsParams::from_grads(m.loss(&x, &y).backward(), &m);
            for ((o, p), g) in raw.iter_mut().zip(&mut params).zip(m.grads(&grads)) {
                o.set_lr(lr).unwrap();
                o.step(Params::F32(p), Grads::F32(&g), None).unwrap();
            }
            m = optim.step(lr, m, grads);
            for (p, q) in params.iter().zip(m.params()) {
                assert_eq!(bits(p), bits(&q), "{dtype:?}");
            }
        }
        assert!(errors.is_empty(), "{:?}", errors.take());
        // The record keeps the state in its storage: a restored optimizer
        // continues bit for bit; one set to f32 refuses it, changing nothing.
        let bytes = optim.into_bytes().unwrap();
        let mut restored: ModuleOptimizer =
            ModuleOptimizer::from(AdamW::new(config).with_state_dtype(dtype)).from_bytes(bytes.clone()).unwrap();
        let plain = AdamW::new(config);
        let plain_errors = plain.errors();
        let mut wrong: ModuleOptimizer = ModuleOptimizer::from(plain).from_bytes(bytes).unwrap();
        let (mut a, mut b, c) = (m.clone(), m.clone(), m);
        let before = c.params();
        for _ in 0..2 {
            let ga = GradientsParams::from_grads(a.loss(&x, &y).backward(), &a);
            let gb = GradientsParams::from_grads(b.loss(&x, &y).backward(), &b);
            a = optim.step(lr, a, ga);
            b = restored.step(lr, b, gb);
        }
        for (p, q) in a.params().iter().zip(b.params()) {
            assert_eq!(bits(p), bits(&q));
        }
        let gc = GradientsParams::from_grads(c.loss(&x, &y).backward(), &c);
        let c = wrong.step(lr, c, gc);
        for (p, q) in before.iter().zip(c.params()) {
            assert_eq!(bits(p), bits(&q));
        }
        let reasons = plain_errors.take();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons[0].contains("not stepped by an optimizer set to F32"), "{reasons:?}");
    }
}

#[test]
fn f16_is_not_a_state_storage() {
    let dev = Device::default();
    let opt = AdamW::new(AdamWConfig::default()).with_state_dtype(adaoptim::storage::Dtype::F16);
    let errors = opt.errors();
    let p = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &dev);
    let g = Tensor::<1>::from_data(TensorData::new(vec![0.1f32, 0.2], [2]), &dev);
    let (p, state) = opt.step(1e-2, p, g, None);
    assert!(state.is_none());
    assert_eq!(flat(p), vec![1.0, 2.0]);
    let e = errors.take();
    assert!(e.len() == 1 && e[0].contains("not a state storage"), "{e:?}");
}

#[test]
fn adafactor_is_adaoptims_adafactor_per_parameter_shape_bit_for_bit() {
    use adaoptim_burn::{Adafactor, AdafactorConfig};
    let (x, y) = data();
    let mut m = mlp(6);
    let lr = 1e-2;
    let config = AdafactorConfig { lr, weight_decay: 0.1, ..Default::default() };
    let mut optim: ModuleOptimizer = Adafactor::new(config).into();
    // burn's Linear weight is [d_input, d_output]: the matrices are factored.
    let shapes: [&[usize]; 4] = [&[8, 16], &[16], &[16, 3], &[3]];
    let mut raw: Vec<adaoptim::Adafactor> =
        shapes.iter().map(|s| adaoptim::Adafactor::new(config, s).unwrap()).collect();
    let mut params = m.params();
    let unused_before = flat(m.unused.weight.val());
    for _ in 0..5 {
        let grads = GradientsParams::from_grads(m.loss(&x, &y).backward(), &m);
        for ((o, p), g) in raw.iter_mut().zip(&mut params).zip(m.grads(&grads)) {
            o.step(p, &g).unwrap();
        }
        m = optim.step(lr, m, grads);
        for (p, q) in params.iter().zip(m.params()) {
            assert_eq!(bits(p), bits(&q));
        }
    }
    assert_eq!((raw[0].row_var().len(), raw[0].col_var().len()), (8, 16));
    assert_eq!(bits(&flat(m.unused.weight.val())), bits(&unused_before));

    // The record round trip resumes bit for bit.
    let bytes = optim.into_bytes().unwrap();
    let mut restored: ModuleOptimizer = ModuleOptimizer::from(Adafactor::new(config)).from_bytes(bytes).unwrap();
    let (mut a, mut b) = (m.clone(), m);
    for _ in 0..2 {
        let ga = GradientsParams::from_grads(a.loss(&x, &y).backward(), &a);
        let gb = GradientsParams::from_grads(b.loss(&x, &y).backward(), &b);
        a = optim.step(lr, a, ga);
        b = restored.step(lr, b, gb);
    }
    for (p, q) in a.params().iter().zip(b.params()) {
        assert_eq!(bits(p), bits(&q));
    }
}

#[test]
fn an_adafactor_step_that_cannot_run_changes_nothing_and_is_recorded() {
    use adaoptim_burn::{Adafactor, AdafactorConfig};
    let dev = Device::default();
    let opt = Adafactor::new(AdafactorConfig::default());
    let errors = opt.errors();
    let p = Tensor::<2>::from_data(TensorData::new(values(6, 1), [2, 3]), &dev);
    let g = Tensor::<2>::from_data(TensorData::new(values(6, 2), [2, 3]), &dev);
    let (p, state) = opt.step(1e-2, p, g.clone(), None);
    let after_one = flat(p.clone());
    let state = state.unwrap();
    assert_eq!((state.0.steps(), state.0.shape()), (1, &[2usize, 3][..]));
    assert!(errors.is_empty());
    // An invalid learning rate: nothing moves, the reason is recorded.
    for bad in [-1.0, f64::NAN] {
        let (p2, s2) = opt.step(bad, p.clone(), g.clone(), Some(state.clone()));
        assert_eq!(bits(&flat(p2)), bits(&after_one));
        let s2 = s2.unwrap();
        assert_eq!((s2.0.steps(), s2.0.lr()), (1, 1e-2));
        assert!(errors.take()[0].contains("lr"));
    }
    // A state made for another shape (the same element count).
    let other = Tensor::<2>::from_data(TensorData::new(values(6, 3), [3, 2]), &dev);
    let og = Tensor::<2>::from_data(TensorData::new(values(6, 4), [3, 2]), &dev);
    let (o2, s2) = opt.step(1e-2, other, og, Some(state.clone()));
    assert_eq!(bits(&flat(o2)), bits(&values(6, 3)));
    assert_eq!(s2.unwrap().0.steps(), 1);
    assert!(errors.take()[0].contains("shape"));
    // Invalid hyperparameters are refused when the first state is made.
    let bad = Adafactor::new(AdafactorConfig { d: 0.5, ..Default::default() });
    let (q, s) = bad.step(1e-2, p.clone(), g, None);
    assert!(s.is_none());
    assert_eq!(bits(&flat(q)), bits(&after_one));
    assert!(bad.errors().take()[0].contains('d'));
}
