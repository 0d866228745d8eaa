//! The candle adapter against adaoptim on raw slices (bit for bit),
//! against candle's own AdamW (within tolerance), and its errors.

use adaoptim::multi::{MixedTensorStep, MultiOptimizer, TensorStep};
use adaoptim::storage::{Dtype, Grads, Params, bf16, f16};
use adaoptim::{Algorithm, NonFinitePolicy};
use adaoptim_candle::{AdamW, AdamWConfig, Optim, Sgd, SgdConfig};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};

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

fn var(shape: &[usize], seed: u64) -> Var {
    let n = shape.iter().product();
    Var::from_tensor(&Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A two-layer MLP's loss on fixed data, for gradients that come from
/// candle's backprop.
fn mlp_loss(w1: &Var, b1: &Var, w2: &Var, x: &Tensor, y: &Tensor) -> Tensor {
    let h = x.matmul(&w1.t().unwrap()).unwrap().broadcast_add(b1).unwrap().tanh().unwrap();
    let out = h.matmul(&w2.t().unwrap()).unwrap();
    (out - y).unwrap().sqr().unwrap().mean_all().unwrap()
}

struct Model {
    vars: Vec<Var>,
    x: Tensor,
    y: Tensor,
}

impl Model {
    fn new(seed: u64) -> Model {
        let vars = vec![var(&[16, 8], seed), var(&[16], seed + 1), var(&[3, 16], seed + 2)];
        let x = Tensor::from_vec(values(32 * 8, seed + 3), (32, 8), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(values(32 * 3, seed + 4), (32, 3), &Device::Cpu).unwrap();
        Model { vars, x, y }
    }
    fn loss(&self) -> Tensor {
        mlp_loss(&self.vars[0], &self.vars[1], &self.vars[2], &self.x, &self.y)
    }
    fn grads(&self) -> Vec<Vec<f32>> {
        let g = self.loss().backward().unwrap();
        self.vars.iter().map(|v| flat(g.get(v).unwrap())).collect()
    }
    fn params(&self) -> Vec<Vec<f32>> {
        self.vars.iter().map(|v| flat(v.as_tensor())).collect()
    }
}

/// Steps `raw` over copies of the parameters with the given gradients.
fn raw_step<C: Algorithm>(raw: &mut MultiOptimizer<C>, params: &mut [Vec<f32>], grads: &[Option<Vec<f32>>]) {
    let mut steps: Vec<TensorStep<'_>> =
        params.iter_mut().zip(grads).map(|(p, g)| TensorStep::new(p, g.as_deref())).collect();
    raw.step(&mut steps).unwrap();
}

#[test]
fn backward_step_is_adaoptim_on_raw_slices_bit_for_bit() {
    let m = Model::new(1);
    let config = AdamWConfig { lr: 1e-2, weight_decay: 0.1, amsgrad: true, ..Default::default() };
    let mut opt = AdamW::new(m.vars.clone(), config).unwrap();
    let mut raw = MultiOptimizer::new();
    raw.add_group(config, &[128, 16, 48]).unwrap();
    let mut params = m.params();
    for _ in 0..5 {
        let g = m.grads();
        opt.backward_step(&m.loss()).unwrap();
        raw_step(&mut raw, &mut params, &g.into_iter().map(Some).collect::<Vec<_>>());
        for (p, v) in params.iter().zip(&m.vars) {
            assert_eq!(bits(p), bits(&flat(v.as_tensor())));
        }
    }
    for i in 0..3 {
        assert_eq!(opt.inner().step_count(i).unwrap(), 5);
        assert_eq!(opt.inner().state(i, "exp_avg").unwrap(), raw.state(i, "exp_avg").unwrap());
    }
}

#[test]
fn bf16_and_8bit_state_is_adaoptim_on_raw_slices_bit_for_bit_and_checkpoints() {
    for dtype in [Dtype::Q8, Dtype::Bf16] {
        let m = Model::new(21);
        let config = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::new(m.vars.clone(), config).unwrap();
        opt.set_state_dtype(dtype).unwrap();
        opt.set_stochastic_rounding(Some(3));
        let mut raw = MultiOptimizer::new();
        raw.add_group_with_state(config, &[128, 16, 48], dtype).unwrap();
        let mut params = m.params();
        let mut saved = None;
        for s in 0..6 {
            if s == 3 {
                saved = Some(opt.to_safetensors().unwrap());
            }
            let g = m.grads();
            opt.backward_step(&m.loss()).unwrap();
            raw_step(&mut raw, &mut params, &g.into_iter().map(Some).collect::<Vec<_>>());
            for (p, v) in params.iter().zip(&m.vars) {
                assert_eq!(bits(p), bits(&flat(v.as_tensor())), "{dtype:?} step {s}");
            }
        }
        for i in 0..3 {
            for name in ["exp_avg", "exp_avg_sq"] {
                let (a, b) = (opt.inner().state_f32(i, name).unwrap(), raw.state_f32(i, name).unwrap());
                assert_eq!(bits(&a.unwrap()), bits(&b.unwrap()), "{dtype:?} {i} {name}");
            }
        }
        // A fresh optimizer over the same Vars loads the storage with the state.
        let bytes = saved.unwrap();
        let mut back = AdamW::new(m.vars.clone(), config).unwrap();
        back.set_stochastic_rounding(Some(3));
        back.load_safetensors(&bytes).unwrap();
        assert_eq!(back.inner().state_dtype(0), Some(dtype));
        assert_eq!(back.inner().stochastic_rounding(), Some(3), "a control stays across a load");
        assert_eq!(back.inner().q8_parts(1).unwrap().is_some(), dtype == Dtype::Q8);
    }
    let mut opt = AdamW::new(Model::new(22).vars, AdamWConfig::default()).unwrap();
    assert!(opt.set_state_dtype(Dtype::F16).is_err());
    assert_eq!(opt.inner().state_dtype(0), Some(Dtype::F32));
}

#[test]
fn var_without_gradient_is_left_untouched() {
    let m = Model::new(2);
    let unused = var(&[5], 99);
    let before = flat(unused.as_tensor());
    let mut vars = m.vars.clone();
    vars.push(unused.clone());
    let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
    for _ in 0..3 {
        opt.backward_step(&m.loss()).unwrap();
    }
    assert_eq!(bits(&flat(unused.as_tensor())), bits(&before));
    assert_eq!(opt.inner().step_count(3).unwrap(), 0);
    assert_eq!(opt.inner().step_count(0).unwrap(), 3);
    assert!(opt.inner().state(3, "exp_avg").unwrap().unwrap().iter().all(|&x| x == 0.0));
}

#[test]
fn step_with_skips_a_none_gradient_per_step() {
    let m = Model::new(3);
    let config = SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() };
    let mut opt = Sgd::new(m.vars.clone(), config).unwrap();
    let mut raw = MultiOptimizer::new();
    raw.add_group(config, &[128, 16, 48]).unwrap();
    let mut params = m.params();
    for step in 0..4 {
        let g = m.grads();
        let present: Vec<Option<Vec<f32>>> =
            g.iter().enumerate().map(|(i, g)| if i == step % 3 { None } else { Some(g.clone()) }).collect();
        let tensors: Vec<Option<Tensor>> = present
            .iter()
            .zip(&m.vars)
            .map(|(g, v)| g.as_ref().map(|g| Tensor::from_vec(g.clone(), v.shape(), &Device::Cpu).unwrap()))
            .collect();
        opt.step_with(&tensors.iter().map(Option::as_ref).collect::<Vec<_>>()).unwrap();
        raw_step(&mut raw, &mut params, &present);
        for (p, v) in params.iter().zip(&m.vars) {
            assert_eq!(bits(p), bits(&flat(v.as_tensor())));
        }
    }
    assert_eq!((0..3).map(|i| opt.inner().step_count(i).unwrap()).collect::<Vec<_>>(), [2, 3, 3]);
}

#[test]
fn strided_gradient_is_copied_and_gives_the_same_bits() {
    let a = var(&[4, 6], 5);
    let b = var(&[4, 6], 5);
    let g = Tensor::from_vec(values(24, 6), (6, 4), &Device::Cpu).unwrap();
    let strided = g.t().unwrap();
    assert!(!strided.is_contiguous());
    let contiguous = strided.contiguous().unwrap();
    let mut oa = AdamW::new(vec![a.clone()], AdamWConfig::default()).unwrap();
    let mut ob = AdamW::new(vec![b.clone()], AdamWConfig::default()).unwrap();
    oa.step_with(&[Some(&strided)]).unwrap();
    ob.step_with(&[Some(&contiguous)]).unwrap();
    assert_eq!(bits(&flat(a.as_tensor())), bits(&flat(b.as_tensor())));
    assert_ne!(bits(&flat(a.as_tensor())), bits(&values(24, 5)));
}

#[test]
fn adamw_matches_candle_nn_adamw() {
    let (ours, theirs) = (Model::new(4), Model::new(4));
    let mut opt = AdamW::new(ours.vars.clone(), AdamWConfig { lr: 1e-2, ..Default::default() }).unwrap();
    let mut cn =
        candle_nn::AdamW::new(theirs.vars.clone(), candle_nn::ParamsAdamW { lr: 1e-2, ..Default::default() }).unwrap();
    for _ in 0..50 {
        let (l1, l2) = (ours.loss(), theirs.loss());
        let (a, b) = (l1.to_scalar::<f32>().unwrap(), l2.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() <= 1e-5 * b.abs(), "loss {a} vs {b}");
        opt.backward_step(&l1).unwrap();
        cn.backward_step(&l2).unwrap();
    }
    for (p, q) in ours.params().iter().zip(theirs.params()) {
        for (x, y) in p.iter().zip(q) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }
}

#[test]
fn varmap_groups_by_name_pattern() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let l1 = candle_nn::linear(8, 16, vb.pp("fc1")).unwrap();
    let l2 = candle_nn::linear(16, 3, vb.pp("fc2")).unwrap();
    let decay = AdamWConfig { lr: 1e-2, weight_decay: 0.5, ..Default::default() };
    let no_decay = AdamWConfig { lr: 1e-2, weight_decay: 0.0, ..Default::default() };
    let mut opt = AdamW::from_varmap(&varmap, decay, &[("*.bias", no_decay)]).unwrap();
    assert_eq!(opt.names().unwrap(), ["fc1.weight", "fc2.weight", "fc1.bias", "fc2.bias"]);
    assert_eq!((0..4).map(|i| opt.inner().group_of(i).unwrap()).collect::<Vec<_>>(), [0, 0, 1, 1]);
    let x = Tensor::from_vec(values(32 * 8, 7), (32, 8), &Device::Cpu).unwrap();
    let loss = l2.forward(&l1.forward(&x).unwrap().relu().unwrap()).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let vars = opt.vars().to_vec();
    let mut params: Vec<Vec<f32>> = vars.iter().map(|v| flat(v.as_tensor())).collect();
    let g: Vec<Option<Vec<f32>>> = vars.iter().map(|v| Some(flat(grads.get(v).unwrap()))).collect();
    opt.step(&grads).unwrap();
    let mut raw = MultiOptimizer::new();
    raw.add_group(decay, &[128, 48]).unwrap();
    raw.add_group(no_decay, &[16, 3]).unwrap();
    raw_step(&mut raw, &mut params, &g);
    for (p, v) in params.iter().zip(&vars) {
        assert_eq!(bits(p), bits(&flat(v.as_tensor())));
    }
}

#[test]
fn pattern_matching() {
    use adaoptim_candle::matches;
    assert!(matches("*.bias", "fc1.bias"));
    assert!(!matches("*.bias", "fc1.bias_extra"));
    assert!(matches("*norm*", "layer.0.layernorm.weight"));
    assert!(matches("fc1.*", "fc1.weight"));
    assert!(!matches("fc1.*", "fc10"));
    assert!(matches("*", ""));
    assert!(matches("a*b*c", "aXXbYYc"));
    assert!(!matches("a*b*c", "aXXbYY"));
}

#[test]
fn global_norm_clipping_matches_raw_slices() {
    let m = Model::new(8);
    let config = SgdConfig { lr: 0.5, ..Default::default() };
    let mut opt = Sgd::new(m.vars.clone(), config).unwrap();
    opt.set_max_grad_norm(Some(0.01)).unwrap();
    let mut raw = MultiOptimizer::new();
    raw.add_group(config, &[128, 16, 48]).unwrap();
    raw.set_max_grad_norm(Some(0.01)).unwrap();
    let mut params = m.params();
    let g = m.grads();
    let norm = g.iter().flatten().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    assert!(norm > 0.01, "the test must clip: norm {norm}");
    opt.backward_step(&m.loss()).unwrap();
    raw_step(&mut raw, &mut params, &g.into_iter().map(Some).collect::<Vec<_>>());
    for (p, v) in params.iter().zip(&m.vars) {
        assert_eq!(bits(p), bits(&flat(v.as_tensor())));
    }
    let last = opt.last_grad_norm().unwrap();
    assert!((last - norm).abs() <= 1e-6 * norm, "{last} vs {norm}");
}

#[test]
fn attached_schedule_is_set_learning_rate_by_hand() {
    use adaoptim::schedule::{LrSchedule, StepLR};
    let (a, b) = (Model::new(9), Model::new(9));
    let config = AdamWConfig { lr: 1e-2, ..Default::default() };
    let sched = StepLR::new(1e-2, 2, 0.5).unwrap();
    let mut oa = AdamW::new(a.vars.clone(), config).unwrap();
    oa.set_schedule(Some(Box::new(sched.clone())));
    let mut ob = AdamW::new(b.vars.clone(), config).unwrap();
    for t in 0..6 {
        oa.backward_step(&a.loss()).unwrap();
        ob.set_learning_rate(sched.lr_at(t));
        ob.backward_step(&b.loss()).unwrap();
        assert_eq!(oa.learning_rate(), sched.lr_at(t));
    }
    assert_eq!(oa.steps(), 6);
    for (p, q) in a.params().iter().zip(b.params()) {
        assert_eq!(bits(p), bits(&q));
    }
}

#[test]
fn checkpoint_round_trip_resumes_bit_for_bit() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let layer = candle_nn::linear(6, 4, vb.pp("fc")).unwrap();
    let x = Tensor::from_vec(values(10 * 6, 11), (10, 6), &Device::Cpu).unwrap();
    let loss = |l: &candle_nn::Linear| l.forward(&x).unwrap().sqr().unwrap().mean_all().unwrap();
    let config = AdamWConfig { lr: 1e-2, ..Default::default() };
    let mut opt = AdamW::from_varmap(&varmap, config, &[]).unwrap();
    opt.set_schedule(Some(Box::new(adaoptim::schedule::ExponentialLR::new(1e-2, 0.9).unwrap())));
    for _ in 0..3 {
        opt.backward_step(&loss(&layer)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    opt.save(&path).unwrap();
    let saved: Vec<Vec<f32>> = opt.vars().iter().map(|v| flat(v.as_tensor())).collect();
    for _ in 0..2 {
        opt.backward_step(&loss(&layer)).unwrap();
    }
    let after: Vec<Vec<f32>> = opt.vars().iter().map(|v| flat(v.as_tensor())).collect();
    // Back to the saved weights, a fresh optimizer loads the checkpoint and
    // takes the same two steps.
    for (v, s) in opt.vars().iter().zip(&saved) {
        v.set(&Tensor::from_vec(s.clone(), v.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    let mut fresh = AdamW::from_varmap(&varmap, config, &[]).unwrap();
    fresh.set_schedule(Some(Box::new(adaoptim::schedule::ExponentialLR::new(1e-2, 0.9).unwrap())));
    fresh.load(&path).unwrap();
    assert_eq!(fresh.steps(), 3);
    for _ in 0..2 {
        fresh.backward_step(&loss(&layer)).unwrap();
    }
    for (v, a) in fresh.vars().iter().zip(&after) {
        assert_eq!(bits(&flat(v.as_tensor())), bits(a));
    }
}

#[test]
fn checkpoint_of_other_vars_is_refused_and_changes_nothing() {
    let m = Model::new(12);
    let mut opt = AdamW::new(m.vars.clone(), AdamWConfig::default()).unwrap();
    opt.backward_step(&m.loss()).unwrap();
    let bytes = opt.to_safetensors().unwrap();
    // Other shapes.
    let mut other = AdamW::new(vec![var(&[128], 1), var(&[16], 2), var(&[48], 3)], AdamWConfig::default()).unwrap();
    let before = other.to_safetensors().unwrap();
    assert!(other.load_safetensors(&bytes).is_err());
    assert_eq!(other.to_safetensors().unwrap(), before);
    // Another optimizer class.
    let mut sgd = Sgd::new(m.vars.clone(), SgdConfig::default()).unwrap();
    assert!(sgd.load_safetensors(&bytes).is_err());
    // Corrupted bytes.
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x40;
    let mut same = AdamW::new(m.vars.clone(), AdamWConfig::default()).unwrap();
    assert!(same.load_safetensors(&bad).is_err());
    assert_eq!(same.inner().step_count(0).unwrap(), 0);
    // Other names.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let _ = candle_nn::linear(6, 4, vb.pp("a")).unwrap();
    let named = AdamW::from_varmap(&varmap, AdamWConfig::default(), &[]).unwrap();
    let varmap2 = VarMap::new();
    let vb2 = VarBuilder::from_varmap(&varmap2, DType::F32, &Device::Cpu);
    let _ = candle_nn::linear(6, 4, vb2.pp("b")).unwrap();
    let mut renamed = AdamW::from_varmap(&varmap2, AdamWConfig::default(), &[]).unwrap();
    let err = renamed.load_safetensors(&named.to_safetensors().unwrap()).unwrap_err();
    assert!(err.to_string().contains("named"), "{err}");
}

#[test]
fn bad_vars_are_refused() {
    let f64_var = Var::zeros(4, DType::F64, &Device::Cpu).unwrap();
    let err = AdamW::new(vec![f64_var], AdamWConfig::default()).unwrap_err();
    assert!(err.to_string().contains("F64") && err.to_string().contains("only f32, bf16 and f16"), "{err}");
    let v = var(&[3], 1);
    let err = AdamW::new(vec![v.clone(), v.clone()], AdamWConfig::default()).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    // An integer Var is not optimized, as candle's optimizers skip it.
    let ints = Var::zeros(4, DType::U32, &Device::Cpu).unwrap();
    let opt = AdamW::new(vec![ints, v], AdamWConfig::default()).unwrap();
    assert_eq!(opt.vars().len(), 1);
    // torch's ValueError conditions, as adaoptim's typed error.
    let err = AdamW::new(vec![var(&[3], 2)], AdamWConfig { lr: -1.0, ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("lr"), "{err}");
}

#[test]
fn bad_gradients_are_refused_and_change_nothing() {
    let v = var(&[2, 3], 1);
    let mut opt = AdamW::new(vec![v.clone()], AdamWConfig::default()).unwrap();
    let before = bits(&flat(v.as_tensor()));
    let wrong_shape = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(opt.step_with(&[Some(&wrong_shape)]).is_err());
    let f64_grad = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
    assert!(opt.step_with(&[Some(&f64_grad)]).is_err());
    assert!(opt.step_with(&[]).is_err());
    // A gradient that is the Var itself: refused, not a deadlock.
    let err = opt.step_with(&[Some(v.as_tensor())]).unwrap_err();
    assert!(err.to_string().contains("shares its storage"), "{err}");
    // NaN under the Error policy.
    opt.set_non_finite(NonFinitePolicy::Error);
    let nan = Tensor::from_vec(vec![0.0f32, f32::NAN, 0.0, 0.0, 0.0, 0.0], (2, 3), &Device::Cpu).unwrap();
    assert!(opt.step_with(&[Some(&nan)]).is_err());
    assert_eq!(bits(&flat(v.as_tensor())), before);
    assert_eq!(opt.inner().step_count(0).unwrap(), 0);
    assert!(opt.inner().state(0, "exp_avg").unwrap().unwrap().iter().all(|&x| x == 0.0));
}

#[test]
fn invalid_learning_rate_is_not_applied_and_fails_the_next_step() {
    let v = var(&[3], 1);
    let g = Tensor::from_vec(vec![0.1f32, 0.2, 0.3], 3, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(vec![v.clone()], AdamWConfig { lr: 1e-3, ..Default::default() }).unwrap();
    let before = bits(&flat(v.as_tensor()));
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        opt.set_learning_rate(bad);
        assert_eq!(opt.learning_rate(), 1e-3);
        let err = opt.step_with(&[Some(&g)]).unwrap_err();
        assert!(err.to_string().contains("lr"), "{err}");
        assert_eq!(bits(&flat(v.as_tensor())), before);
    }
    opt.set_learning_rate(2e-3);
    opt.step_with(&[Some(&g)]).unwrap();
    assert_ne!(bits(&flat(v.as_tensor())), before);
}

#[test]
fn every_alias_steps() {
    fn one<C: Algorithm + Default>() {
        let v = var(&[7], 3);
        let before = flat(v.as_tensor());
        let g = Tensor::from_vec(values(7, 4), 7, &Device::Cpu).unwrap();
        let mut opt = Optim::<C>::new(vec![v.clone()], C::default()).unwrap();
        opt.step_with(&[Some(&g)]).unwrap();
        assert_ne!(bits(&flat(v.as_tensor())), bits(&before), "{}", C::TORCH_CLASS);
    }
    one::<adaoptim_candle::SgdConfig>();
    one::<adaoptim_candle::AdagradConfig>();
    one::<adaoptim_candle::RmsPropConfig>();
    one::<adaoptim_candle::AdadeltaConfig>();
    one::<adaoptim_candle::AdamConfig>();
    one::<adaoptim_candle::AdamWConfig>();
    one::<adaoptim_candle::AdamaxConfig>();
    one::<adaoptim_candle::NAdamConfig>();
    one::<adaoptim_candle::RAdamConfig>();
    one::<adaoptim_candle::RpropConfig>();
    one::<adaoptim_candle::LionConfig>();
    one::<adaoptim_candle::AsgdConfig>();
}

#[test]
fn parallel_step_over_many_vars_is_the_serial_bits() {
    use adaoptim::{Exec, Parallel};
    let shapes: [&[usize]; 4] = [&[300, 200], &[200], &[1000, 70], &[5]];
    let vars: Vec<Var> = shapes.iter().enumerate().map(|(i, s)| var(s, 40 + i as u64)).collect();
    let copies: Vec<Var> = vars.iter().map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()).collect();
    let grads: Vec<Tensor> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| Tensor::from_vec(values(v.elem_count(), 50 + i as u64), v.shape(), &Device::Cpu).unwrap())
        .collect();
    let config = AdamWConfig { lr: 1e-2, ..Default::default() };
    let mut par = AdamW::new(vars.clone(), config).unwrap();
    par.set_exec(Exec { parallel: Parallel::Chunks { chunk: 4096 }, ..Exec::auto() });
    let mut ser = AdamW::new(copies.clone(), config).unwrap();
    ser.set_exec(Exec { parallel: Parallel::Serial, ..Exec::auto() });
    let g: Vec<Option<&Tensor>> = grads.iter().map(Some).collect();
    for _ in 0..3 {
        par.step_with(&g).unwrap();
        ser.step_with(&g).unwrap();
    }
    for (a, b) in vars.iter().zip(&copies) {
        assert_eq!(bits(&flat(a.as_tensor())), bits(&flat(b.as_tensor())));
    }
}

/// The bf16 model: the f32 one's values rounded to bf16, the data too.
fn bf16_model(seed: u64) -> Model {
    let m = Model::new(seed);
    let to = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    Model {
        vars: m.vars.iter().map(|v| Var::from_tensor(&to(v.as_tensor())).unwrap()).collect(),
        x: to(&m.x),
        y: to(&m.y),
    }
}

fn halves(t: &Tensor) -> Vec<bf16> {
    t.flatten_all().unwrap().to_vec1::<bf16>().unwrap()
}

#[test]
fn bf16_vars_are_adaoptims_mixed_step_on_raw_slices_bit_for_bit() {
    let nearest = bf16_vars_against_raw_slices(None);
    let stochastic = bf16_vars_against_raw_slices(Some(11));
    let differ = nearest.iter().zip(&stochastic).filter(|(a, b)| a != b).count();
    assert!(differ > 10, "stochastic rounding changed only {differ} of the bf16 weights");
}

/// Two bf16 Vars and one f32 Var in one step: the bf16 ones with their
/// bf16 gradients from candle's backprop, the state f32, rounded as `sr`
/// says; against `MultiOptimizer::step_mixed` on raw slices, bit for bit.
/// Returns the first Var's final weights.
fn bf16_vars_against_raw_slices(sr: Option<u64>) -> Vec<bf16> {
    let m = bf16_model(7);
    let w2 = Var::from_tensor(&m.vars[2].as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
    let vars = vec![m.vars[0].clone(), m.vars[1].clone(), w2.clone()];
    let loss = |x: &Tensor, y: &Tensor| {
        let h = x.matmul(&vars[0].t().unwrap()).unwrap().broadcast_add(&vars[1]).unwrap().tanh().unwrap();
        let out = h.to_dtype(DType::F32).unwrap().matmul(&w2.t().unwrap()).unwrap();
        (out - y.to_dtype(DType::F32).unwrap()).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let config = AdamWConfig { lr: 2e-2, weight_decay: 0.1, ..Default::default() };
    let mut opt = AdamW::new(vars.clone(), config).unwrap();
    opt.set_max_grad_norm(Some(0.5)).unwrap();
    opt.set_stochastic_rounding(sr);
    let mut raw = MultiOptimizer::new();
    raw.add_group(config, &[128, 16, 48]).unwrap();
    raw.set_max_grad_norm(Some(0.5)).unwrap();
    raw.set_stochastic_rounding(sr);
    let (mut w1, mut b1, mut w2r) = (halves(&vars[0]), halves(&vars[1]), flat(&vars[2]));
    let start = w1.clone();
    for _ in 0..6 {
        let l = loss(&m.x, &m.y);
        let g = l.backward().unwrap();
        let gw1 = halves(g.get(&vars[0]).unwrap());
        let gb1 = halves(g.get(&vars[1]).unwrap());
        let gw2 = flat(g.get(&vars[2]).unwrap());
        assert_eq!(g.get(&vars[0]).unwrap().dtype(), DType::BF16);
        opt.step(&g).unwrap();
        raw.step_mixed(&mut [
            MixedTensorStep::new(Params::Bf16(&mut w1), Some(Grads::Bf16(&gw1))),
            MixedTensorStep::new(Params::Bf16(&mut b1), Some(Grads::Bf16(&gb1))),
            MixedTensorStep::new(Params::F32(&mut w2r), Some(Grads::F32(&gw2))),
        ])
        .unwrap();
        assert_eq!(halves(&vars[0]), w1);
        assert_eq!(halves(&vars[1]), b1);
        assert_eq!(bits(&flat(&vars[2])), bits(&w2r));
        assert_eq!(opt.last_grad_norm(), raw.last_grad_norm());
    }
    assert!(w1.iter().zip(&start).filter(|(a, b)| a != b).count() > 100, "the bf16 weights moved");
    assert_eq!(opt.inner().state(0, "exp_avg_sq").unwrap(), raw.state(0, "exp_avg_sq").unwrap());
    w1
}

#[test]
fn bf16_vars_follow_candle_nn_adamw_on_f32_within_bf16_rounding() {
    // candle's AdamW on f32 copies of the bf16 Vars (the same gradients, from
    // the bf16 model) against ours on the bf16 Vars: each step rounds the
    // parameters once to bf16, so after T steps they are at most about
    // T/2 bf16 ulps apart (plus the gradient's own difference, small here).
    let m = bf16_model(8);
    let mut opt = AdamW::new(m.vars.clone(), AdamWConfig { lr: 1e-2, ..Default::default() }).unwrap();
    let f32_vars: Vec<Var> =
        m.vars.iter().map(|v| Var::from_tensor(&v.as_tensor().to_dtype(DType::F32).unwrap()).unwrap()).collect();
    let mut cn =
        candle_nn::AdamW::new(f32_vars.clone(), candle_nn::ParamsAdamW { lr: 1e-2, ..Default::default() }).unwrap();
    let steps = 8;
    for _ in 0..steps {
        let g = m.loss().backward().unwrap();
        // sum(var * g) has the gradient g exactly: candle's AdamW gets the
        // bf16 model's gradients, widened.
        let mut surrogate = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (v, f) in m.vars.iter().zip(&f32_vars) {
            let gf = g.get(v).unwrap().to_dtype(DType::F32).unwrap();
            surrogate = (surrogate + (f.as_tensor() * gf).unwrap().sum_all().unwrap()).unwrap();
        }
        opt.step(&g).unwrap();
        cn.backward_step(&surrogate).unwrap();
    }
    let mut worst = 0f32;
    for (v, f) in m.vars.iter().zip(&f32_vars) {
        for (x, y) in halves(v.as_tensor()).iter().zip(flat(f.as_tensor())) {
            let ulp = (y.abs().max(1e-3) * 2f32.powi(-7)).max(f32::MIN_POSITIVE);
            worst = worst.max((x.to_f32() - y).abs() / ulp);
        }
    }
    assert!(worst <= steps as f32 / 2.0 + 1.0, "{worst} bf16 ulps apart after {steps} steps");
    assert!(worst > 0.0, "bf16 rounding shows");
}

#[test]
fn half_gradients_are_checked_and_change_nothing() {
    let v =
        Var::from_tensor(&Tensor::from_vec(values(6, 3), (2, 3), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap())
            .unwrap();
    let mut opt = AdamW::new(vec![v.clone()], AdamWConfig::default()).unwrap();
    let before = halves(v.as_tensor());
    opt.set_non_finite(NonFinitePolicy::Error);
    let nan = Tensor::from_vec(vec![0.0f32, 0.0, f32::NAN, 0.0, 0.0, 0.0], (2, 3), &Device::Cpu).unwrap();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let err = opt.step_with(&[Some(&nan.to_dtype(dtype).unwrap())]).unwrap_err();
        assert!(err.to_string().contains("element 2 is NaN"), "{dtype:?}: {err}");
    }
    let wrong = Tensor::zeros((3, 2), DType::BF16, &Device::Cpu).unwrap();
    assert!(opt.step_with(&[Some(&wrong)]).is_err());
    let f64_grad = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
    assert!(opt.step_with(&[Some(&f64_grad)]).is_err());
    assert_eq!(halves(v.as_tensor()), before);
    assert_eq!(opt.inner().step_count(0).unwrap(), 0);
    // An f16 gradient of a bf16 Var steps (widened exactly).
    let g = Tensor::from_vec(values(6, 4), (2, 3), &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
    opt.step_with(&[Some(&g)]).unwrap();
    assert_ne!(halves(v.as_tensor()), before);
}

#[test]
fn adafactor_is_adaoptims_adafactor_on_raw_slices_bit_for_bit() {
    // A matrix (factored), a vector and a 3-d Var (factored over its last
    // two dimensions), one of them without a gradient on odd steps.
    let m = Model::new(9);
    let cube = var(&[2, 3, 4], 77);
    let mut vars = m.vars.clone();
    vars.push(cube.clone());
    let config = adaoptim_candle::AdafactorConfig { lr: 2e-2, weight_decay: 0.1, ..Default::default() };
    let mut opt = adaoptim_candle::Adafactor::new(vars.clone(), config).unwrap();
    let mut raw: Vec<adaoptim::Adafactor> = vars
        .iter()
        .map(|v| {
            let mut o = adaoptim::Adafactor::new(config, v.dims()).unwrap();
            o.set_exec(adaoptim::Exec::scalar());
            o
        })
        .collect();
    let mut params: Vec<Vec<f32>> = vars.iter().map(|v| flat(v.as_tensor())).collect();
    let start = params.clone();
    for s in 0..6 {
        let loss = (m.loss() + cube.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
        let g = loss.backward().unwrap();
        let grads: Vec<Option<Tensor>> =
            vars.iter().enumerate().map(|(i, v)| (i != 1 || s % 2 == 0).then(|| g.get(v).unwrap().clone())).collect();
        opt.step_with(&grads.iter().map(Option::as_ref).collect::<Vec<_>>()).unwrap();
        for ((o, p), g) in raw.iter_mut().zip(&mut params).zip(&grads) {
            if let Some(g) = g {
                o.step(p, &flat(g)).unwrap();
            }
        }
        for (p, v) in params.iter().zip(&vars) {
            assert_eq!(bits(p), bits(&flat(v.as_tensor())));
        }
    }
    for (i, o) in raw.iter().enumerate() {
        let mine = opt.inner(i).unwrap();
        assert_eq!(mine.steps(), o.steps(), "Var {i}");
        assert_eq!(bits(mine.row_var()), bits(o.row_var()));
        assert_eq!(bits(mine.col_var()), bits(o.col_var()));
        assert_eq!(bits(mine.variance()), bits(o.variance()));
        assert_ne!(bits(&params[i]), bits(&start[i]), "Var {i} moved");
    }
    assert_eq!(opt.inner(1).unwrap().steps(), 3);
    assert!(opt.inner(0).unwrap().is_factored() && !opt.inner(1).unwrap().is_factored());
}

/// bf16 and f16 `Var`s beside an f32 one, with gradients of their own
/// dtype from candle's backprop and one f16 gradient given to a bf16 `Var`:
/// each `Var` is adaoptim's `Adafactor::step_mixed` on raw slices of the
/// same storage, bit for bit; the `Var`s move.
#[test]
fn adafactor_half_precision_vars_are_adaoptims_mixed_step_on_raw_slices() {
    let h = var(&[6, 5], 41).as_tensor().to_dtype(DType::BF16).unwrap();
    let e = var(&[7], 42).as_tensor().to_dtype(DType::F16).unwrap();
    let c = var(&[2, 3, 4], 43).as_tensor().to_dtype(DType::F16).unwrap();
    let vars = vec![
        Var::from_tensor(&h).unwrap(),
        Var::from_tensor(&e).unwrap(),
        Var::from_tensor(&c).unwrap(),
        var(&[3, 4], 44),
    ];
    let config = adaoptim_candle::AdafactorConfig { lr: 2e-2, weight_decay: 0.1, ..Default::default() };
    let mut opt = adaoptim_candle::Adafactor::new(vars.clone(), config).unwrap();
    let mut raw: Vec<adaoptim::Adafactor> =
        vars.iter().map(|v| adaoptim::Adafactor::new(config, v.dims()).unwrap()).collect();
    // Raw copies of each Var's storage.
    let mut b0: Vec<bf16> = halves(vars[0].as_tensor());
    let mut f1: Vec<f16> = vars[1].as_tensor().to_vec1::<f16>().unwrap();
    let mut f2: Vec<f16> = vars[2].as_tensor().flatten_all().unwrap().to_vec1::<f16>().unwrap();
    let mut p3: Vec<f32> = flat(vars[3].as_tensor());
    let start = (b0.clone(), f1.clone(), f2.clone());
    for s in 0..4 {
        let loss = vars
            .iter()
            .map(|v| v.as_tensor().to_dtype(DType::F32).unwrap().sqr().unwrap().sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        let g = loss.backward().unwrap();
        let mut grads: Vec<Tensor> = vars.iter().map(|v| g.get(v).unwrap().clone()).collect();
        assert_eq!((grads[0].dtype(), grads[1].dtype()), (DType::BF16, DType::F16));
        if s == 2 {
            grads[0] = grads[0].to_dtype(DType::F16).unwrap();
        }
        opt.step_with(&grads.iter().map(Some).collect::<Vec<_>>()).unwrap();
        let g0 = grads[0].flatten_all().unwrap();
        let g0 = if s == 2 {
            raw[0].step_mixed(Params::Bf16(&mut b0), Grads::F16(&g0.to_vec1::<f16>().unwrap())).unwrap()
        } else {
            raw[0].step_mixed(Params::Bf16(&mut b0), Grads::Bf16(&g0.to_vec1::<bf16>().unwrap())).unwrap()
        };
        let _ = g0;
        let g1 = grads[1].to_vec1::<f16>().unwrap();
        raw[1].step_mixed(Params::F16(&mut f1), Grads::F16(&g1)).unwrap();
        let g2 = grads[2].flatten_all().unwrap().to_vec1::<f16>().unwrap();
        raw[2].step_mixed(Params::F16(&mut f2), Grads::F16(&g2)).unwrap();
        raw[3].step(&mut p3, &flat(&grads[3])).unwrap();
        assert_eq!(halves(vars[0].as_tensor()), b0, "step {s}");
        assert_eq!(vars[1].as_tensor().to_vec1::<f16>().unwrap(), f1, "step {s}");
        assert_eq!(vars[2].as_tensor().flatten_all().unwrap().to_vec1::<f16>().unwrap(), f2, "step {s}");
        assert_eq!(bits(&flat(vars[3].as_tensor())), bits(&p3), "step {s}");
    }
    for (i, o) in raw.iter().enumerate() {
        let mine = opt.inner(i).unwrap();
        assert_eq!(mine.steps(), 4, "Var {i}");
        assert_eq!(bits(mine.row_var()), bits(o.row_var()));
        assert_eq!(bits(mine.col_var()), bits(o.col_var()));
        assert_eq!(bits(mine.variance()), bits(o.variance()));
    }
    assert!(b0 != start.0 && f1 != start.1 && f2 != start.2, "the half-precision Vars moved");
}

/// Stochastic rounding of Adafactor's bf16 `Var`s: each `Var` `i` is
/// `adaoptim::Adafactor` on raw slices with the seed
/// `stochastic_key(seed, i)`, bit for bit, also after the optimizer loads
/// a checkpoint (the seed is kept); an f16 `Var` beside them rounds to
/// nearest; the weights differ from a round-to-nearest run.
#[test]
fn adafactor_bf16_vars_round_stochastically_as_raw_slices() {
    use adaoptim::storage::stochastic_key;
    let make = |i: u64| {
        let h = var(&[64, 300], 50 + i).as_tensor().to_dtype(DType::BF16).unwrap();
        let b = var(&[300], 51 + i).as_tensor().to_dtype(DType::BF16).unwrap();
        let e = var(&[5], 52 + i).as_tensor().to_dtype(DType::F16).unwrap();
        vec![Var::from_tensor(&h).unwrap(), Var::from_tensor(&b).unwrap(), Var::from_tensor(&e).unwrap()]
    };
    let config = adaoptim_candle::AdafactorConfig { lr: 1e-3, weight_decay: 0.1, ..Default::default() };
    let (vars, near_vars) = (make(0), make(0));
    let mut opt = adaoptim_candle::Adafactor::new(vars.clone(), config).unwrap();
    opt.set_stochastic_rounding(Some(9));
    assert_eq!(opt.stochastic_rounding(), Some(9));
    let mut near = adaoptim_candle::Adafactor::new(near_vars.clone(), config).unwrap();
    let mut raw: Vec<adaoptim::Adafactor> =
        vars.iter().map(|v| adaoptim::Adafactor::new(config, v.dims()).unwrap()).collect();
    for (i, o) in raw.iter_mut().enumerate() {
        o.set_stochastic_rounding(Some(stochastic_key(9, i as u64)));
    }
    let (mut w, mut b) = (halves(vars[0].as_tensor()), halves(vars[1].as_tensor()));
    let mut e: Vec<f16> = vars[2].as_tensor().to_vec1::<f16>().unwrap();
    let start = w.clone();
    let loss = |vs: &[Var]| {
        vs.iter()
            .map(|v| v.as_tensor().to_dtype(DType::F32).unwrap().sin().unwrap().sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap()
    };
    for s in 0..5 {
        if s == 3 {
            // Its own checkpoint loaded back: the seed stays set.
            let bytes = opt.to_safetensors().unwrap();
            opt.load_safetensors(&bytes).unwrap();
        }
        let g = loss(&vars).backward().unwrap();
        let gs: Vec<Tensor> = vars.iter().map(|v| g.get(v).unwrap().flatten_all().unwrap()).collect();
        opt.step(&g).unwrap();
        near.step(&loss(&near_vars).backward().unwrap()).unwrap();
        raw[0].step_mixed(Params::Bf16(&mut w), Grads::Bf16(&gs[0].to_vec1::<bf16>().unwrap())).unwrap();
        raw[1].step_mixed(Params::Bf16(&mut b), Grads::Bf16(&gs[1].to_vec1::<bf16>().unwrap())).unwrap();
        raw[2].step_mixed(Params::F16(&mut e), Grads::F16(&gs[2].to_vec1::<f16>().unwrap())).unwrap();
        assert_eq!(halves(vars[0].as_tensor()), w, "step {s}");
        assert_eq!(halves(vars[1].as_tensor()), b, "step {s}");
        assert_eq!(vars[2].as_tensor().to_vec1::<f16>().unwrap(), e, "step {s}");
    }
    assert!(w.iter().zip(&start).filter(|(a, b)| a != b).count() > 1000, "the bf16 weights moved");
    let differ = w.iter().zip(&halves(near_vars[0].as_tensor())).filter(|(a, b)| a != b).count();
    assert!(differ > 100, "stochastic rounding changed only {differ} of the bf16 weights");
    // The f16 Var rounds to nearest: the same as the round-to-nearest run.
    assert_eq!(near_vars[2].as_tensor().to_vec1::<f16>().unwrap(), e);
}

#[test]
fn adafactor_bad_input_is_refused_and_changes_nothing() {
    use adaoptim_candle::{Adafactor, AdafactorConfig};
    let wide = Var::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
    let err = Adafactor::new(vec![wide], AdafactorConfig::default()).unwrap_err();
    assert!(err.to_string().contains("only f32, bf16 and f16"), "{err}");
    let v = var(&[2, 3], 5);
    assert!(Adafactor::new(vec![v.clone(), v.clone()], AdafactorConfig::default()).is_err());
    let err = Adafactor::new(vec![v.clone()], AdafactorConfig { lr: f64::NAN, ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("lr"), "{err}");
    let w = var(&[4], 6);
    let mut opt = Adafactor::new(vec![v.clone(), w.clone()], AdafactorConfig::default()).unwrap();
    let before = (flat(v.as_tensor()), flat(w.as_tensor()));
    let good = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    // An f64 gradient for the second Var: the first is not stepped either.
    let f64_grad = Tensor::ones(4, DType::F64, &Device::Cpu).unwrap();
    let err = opt.step_with(&[Some(&good), Some(&f64_grad)]).unwrap_err();
    assert!(err.to_string().contains("expected f32, bf16 or f16"), "{err}");
    let wrong = Tensor::ones(5, DType::F32, &Device::Cpu).unwrap();
    assert!(opt.step_with(&[Some(&good), Some(&wrong)]).is_err());
    assert!(opt.step_with(&[Some(&good)]).is_err());
    let err = opt.step_with(&[Some(&good), Some(w.as_tensor())]).unwrap_err();
    assert!(err.to_string().contains("shares its storage"), "{err}");
    opt.set_learning_rate(-1.0);
    assert!(opt.step_with(&[Some(&good), None]).is_err());
    assert_eq!((flat(v.as_tensor()), flat(w.as_tensor())), before);
    assert_eq!((opt.inner(0).unwrap().steps(), opt.inner(1).unwrap().steps()), (0, 0));
    opt.set_learning_rate(1e-2);
    assert_eq!(opt.learning_rate(), 1e-2);
    opt.step_with(&[Some(&good), None]).unwrap();
    assert_ne!(flat(v.as_tensor()), before.0);
    assert_eq!(flat(w.as_tensor()), before.1);
}

#[test]
fn adafactor_clips_by_the_global_norm_as_raw_slices_with_clipped_grads() {
    use adaoptim_candle::{Adafactor, AdafactorConfig};
    let (a, b, c) = (var(&[6, 5], 31), var(&[7], 32), var(&[2, 3, 4], 33));
    let vars = vec![a.clone(), b.clone(), c.clone()];
    let config = AdafactorConfig { lr: 3e-2, ..Default::default() };
    let mut opt = Adafactor::new(vars.clone(), config).unwrap();
    let max_norm = 0.5;
    opt.set_max_grad_norm(Some(max_norm)).unwrap();
    let mut raw: Vec<adaoptim::Adafactor> =
        vars.iter().map(|v| adaoptim::Adafactor::new(config, v.dims()).unwrap()).collect();
    let mut params: Vec<Vec<f32>> = vars.iter().map(|v| flat(v.as_tensor())).collect();
    for s in 0..4u64 {
        // The vector has no gradient on odd steps: it is out of the norm too.
        let grads: Vec<Option<Tensor>> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                (i != 1 || s % 2 == 0).then(|| {
                    Tensor::from_vec(values(v.elem_count(), 100 + 10 * s + i as u64), v.shape(), &Device::Cpu).unwrap()
                })
            })
            .collect();
        opt.step_with(&grads.iter().map(Option::as_ref).collect::<Vec<_>>()).unwrap();
        // The norm, summed here in f64 element by element.
        let flats: Vec<Option<Vec<f32>>> = grads.iter().map(|g| g.as_ref().map(flat)).collect();
        let direct = flats.iter().flatten().flatten().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        let norm = opt.last_grad_norm().unwrap();
        assert!((norm - direct).abs() <= 1e-12 * direct, "{norm} vs {direct}");
        let coef = adaoptim::clip::clip_coef(norm, max_norm);
        assert!(coef < 0.5, "clipping is on: {coef}");
        for ((o, p), g) in raw.iter_mut().zip(&mut params).zip(&flats) {
            if let Some(g) = g {
                let clipped: Vec<f32> = g.iter().map(|&x| x * coef).collect();
                o.step(p, &clipped).unwrap();
            }
        }
        for (p, v) in params.iter().zip(&vars) {
            assert_eq!(bits(p), bits(&flat(v.as_tensor())));
        }
    }
    assert_eq!(opt.inner(1).unwrap().steps(), 2);
    // An invalid max_norm is refused and the old one kept.
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(opt.set_max_grad_norm(Some(bad)).is_err());
    }
    let g =
        [Tensor::ones((6, 5), DType::F32, &Device::Cpu).unwrap(), Tensor::ones(7, DType::F32, &Device::Cpu).unwrap()];
    opt.step_with(&[Some(&g[0]), Some(&g[1]), None]).unwrap();
    assert_eq!(opt.last_grad_norm(), Some(37f64.sqrt()));
}

#[test]
fn adafactor_non_finite_gradients_skip_or_fail_and_change_nothing() {
    use adaoptim_candle::{Adafactor, AdafactorConfig};
    let (a, b) = (var(&[3, 4], 41), var(&[5], 42));
    let mut opt = Adafactor::new(vec![a.clone(), b.clone()], AdafactorConfig::default()).unwrap();
    let ga = Tensor::from_vec(values(12, 43), (3, 4), &Device::Cpu).unwrap();
    let mut vb = values(5, 44);
    vb[3] = f32::INFINITY;
    let gb = Tensor::from_vec(vb, 5, &Device::Cpu).unwrap();
    let before = (flat(a.as_tensor()), flat(b.as_tensor()));
    opt.set_non_finite(NonFinitePolicy::SkipStep);
    opt.step_with(&[Some(&ga), Some(&gb)]).unwrap();
    opt.set_non_finite(NonFinitePolicy::Error);
    let err = opt.step_with(&[Some(&ga), Some(&gb)]).unwrap_err();
    // Counted through the present gradients: 12 of the matrix, then 3.
    assert!(err.to_string().contains("gradient element 15 "), "{err}");
    // Clipping on as well: the same.
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    assert!(opt.step_with(&[Some(&ga), Some(&gb)]).is_err());
    assert_eq!((flat(a.as_tensor()), flat(b.as_tensor())), before);
    assert_eq!((opt.inner(0).unwrap().steps(), opt.inner(1).unwrap().steps()), (0, 0));
    assert_eq!(bits(opt.inner(0).unwrap().row_var()), vec![0; 3]);
    // Without the faulty gradient the step runs; under Propagate (torch's
    // behaviour) the infinite one is stepped and its element is no longer
    // finite.
    opt.step_with(&[Some(&ga), None]).unwrap();
    assert_ne!(flat(a.as_tensor()), before.0);
    opt.set_max_grad_norm(None).unwrap();
    opt.set_non_finite(NonFinitePolicy::Propagate);
    opt.step_with(&[None, Some(&gb)]).unwrap();
    assert!(!flat(b.as_tensor())[3].is_finite());
}

#[test]
fn f16_vars_are_adaoptims_mixed_step_on_raw_slices_bit_for_bit() {
    let v = Var::from_tensor(
        &Tensor::from_vec(values(600, 12), (20, 30), &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap(),
    )
    .unwrap();
    let config = AdamWConfig { lr: 1e-2, ..Default::default() };
    let mut opt = AdamW::new(vec![v.clone()], config).unwrap();
    let mut raw = MultiOptimizer::new();
    raw.add_group(config, &[600]).unwrap();
    let mut p: Vec<f16> = v.as_tensor().flatten_all().unwrap().to_vec1::<f16>().unwrap();
    let start = p.clone();
    for s in 0..4 {
        let g = Tensor::from_vec(values(600, 20 + s), (20, 30), &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
        let gh: Vec<f16> = g.flatten_all().unwrap().to_vec1::<f16>().unwrap();
        opt.step_with(&[Some(&g)]).unwrap();
        raw.step_mixed(&mut [MixedTensorStep::new(Params::F16(&mut p), Some(Grads::F16(&gh)))]).unwrap();
        let got: Vec<f16> = v.as_tensor().flatten_all().unwrap().to_vec1::<f16>().unwrap();
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            p.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    assert!(p.iter().zip(&start).filter(|(a, b)| a != b).count() > 500, "the f16 Var moved");
}

/// The whole Adafactor in one checkpoint: loaded into an optimizer over
/// other Vars of the same shapes, it steps them to the same bits; a file of
/// other shapes, a damaged one or one of another optimizer is refused and
/// changes nothing.
#[test]
fn adafactor_checkpoints_resume_bitwise() {
    use adaoptim_candle::{Adafactor, AdafactorConfig};
    use candle_nn::Optimizer;
    let shapes: [&[usize]; 3] = [&[4, 5], &[6], &[2, 3, 4]];
    let a: Vec<Var> = shapes.iter().enumerate().map(|(i, s)| var(s, 40 + i as u64)).collect();
    let config = AdafactorConfig { lr: 2e-2, weight_decay: 0.1, ..Default::default() };
    let mut opt = Adafactor::new(a.clone(), config).unwrap();
    let loss = |vs: &[Var]| {
        let mut l = vs[0].as_tensor().sqr().unwrap().sum_all().unwrap();
        for v in &vs[1..] {
            l = (l + v.as_tensor().powf(4.0).unwrap().sum_all().unwrap()).unwrap();
        }
        l
    };
    for _ in 0..3 {
        opt.backward_step(&loss(&a)).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("adaoptim-candle-adafactor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("opt.safetensors");
    opt.save(&path).unwrap();
    // Other Vars with the same values, a fresh optimizer with another lr.
    let b: Vec<Var> = a.iter().map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()).collect();
    let mut opt2 = Adafactor::new(b.clone(), AdafactorConfig { lr: 0.5, ..Default::default() }).unwrap();
    opt2.load(&path).unwrap();
    assert_eq!(opt2.learning_rate(), 2e-2);
    assert_eq!(opt2.to_safetensors().unwrap(), opt.to_safetensors().unwrap());
    for _ in 0..3 {
        opt.backward_step(&loss(&a)).unwrap();
        opt2.backward_step(&loss(&b)).unwrap();
    }
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(bits(&flat(x.as_tensor())), bits(&flat(y.as_tensor())));
    }
    assert_eq!(opt2.inner(2).unwrap().steps(), 6);
    // Refused, nothing changed.
    let before = opt2.to_safetensors().unwrap();
    let other = Adafactor::new(vec![var(&[4, 5], 1), var(&[7], 2)], config).unwrap();
    let err = opt2.load_safetensors(&other.to_safetensors().unwrap()).unwrap_err();
    assert!(err.to_string().contains("shapes"), "{err}");
    let mut damaged = before.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert!(opt2.load_safetensors(&damaged).is_err());
    assert!(opt2.load_safetensors(&opt2.inner(0).unwrap().to_safetensors().unwrap()).is_err());
    assert!(opt2.load(dir.join("missing.safetensors")).is_err());
    assert_eq!(opt2.to_safetensors().unwrap(), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Adafactor over groups from a `VarMap`, with an attached schedule and a
/// loss scale: each `Var` is adaoptim's Adafactor on raw slices with its
/// group's options, the schedule's learning rate set by hand and the
/// gradients divided by the scale; a checkpoint carries the groups and the
/// schedule's step count.
#[test]
fn adafactor_groups_schedule_and_loss_scale_are_raw_slices_by_hand() {
    use adaoptim::schedule::{LrSchedule, StepLR};
    use adaoptim_candle::{Adafactor, AdafactorConfig};
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let _l1 = candle_nn::linear(6, 5, vb.pp("l1")).unwrap();
    let _l2 = candle_nn::linear(5, 3, vb.pp("l2")).unwrap();
    let decay = AdafactorConfig { lr: 3e-2, weight_decay: 0.1, ..Default::default() };
    let no_decay = AdafactorConfig { lr: 3e-2, weight_decay: 0.0, ..Default::default() };
    let mut opt = Adafactor::from_varmap(&varmap, decay, &[("*.bias", no_decay)]).unwrap();
    // Group by group, each in name order.
    assert_eq!(opt.names().unwrap(), ["l1.weight", "l2.weight", "l1.bias", "l2.bias"]);
    assert_eq!((0..4).map(|i| opt.group_of(i).unwrap()).collect::<Vec<_>>(), [0, 0, 1, 1]);
    let sched = StepLR::new(3e-2, 2, 0.5).unwrap();
    opt.set_schedule(Some(Box::new(sched.clone())));
    let vars = opt.vars().to_vec();
    let mut raw: Vec<adaoptim::Adafactor> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let c = if opt.group_of(i) == Some(1) { no_decay } else { decay };
            adaoptim::Adafactor::new(c, v.dims()).unwrap()
        })
        .collect();
    let mut params: Vec<Vec<f32>> = vars.iter().map(|v| flat(v.as_tensor())).collect();
    for t in 0..5u64 {
        // A power-of-two scale is removed exactly, another one by division.
        let scale = if t < 3 { 1024.0f32 } else { 3.0 };
        opt.set_grad_scale(Some(scale)).unwrap();
        let g: Vec<Vec<f32>> =
            vars.iter().enumerate().map(|(i, v)| values(v.elem_count(), 200 + 10 * t + i as u64)).collect();
        let scaled: Vec<Tensor> = g
            .iter()
            .zip(&vars)
            .map(|(g, v)| {
                let s: Vec<f32> = g.iter().map(|x| if scale == 1024.0 { x * scale } else { *x }).collect();
                Tensor::from_vec(s, v.shape(), &Device::Cpu).unwrap()
            })
            .collect();
        opt.step_with(&scaled.iter().map(Some).collect::<Vec<_>>()).unwrap();
        for (i, o) in raw.iter_mut().enumerate() {
            o.set_lr(sched.lr_at(t)).unwrap();
            let gi: Vec<f32> = if scale == 1024.0 { g[i].clone() } else { g[i].iter().map(|x| x / scale).collect() };
            o.step(&mut params[i], &gi).unwrap();
            assert_eq!(bits(&params[i]), bits(&flat(vars[i].as_tensor())), "step {t}, Var {i}");
        }
        assert_eq!(opt.learning_rate(), sched.lr_at(t));
    }
    assert_eq!(opt.steps(), 5);

    // The checkpoint carries groups, options and the schedule's count: an
    // optimizer over a copy of the VarMap resumes with the same bits.
    let bytes = opt.to_safetensors().unwrap();
    let varmap2 = VarMap::new();
    let vb2 = VarBuilder::from_varmap(&varmap2, DType::F32, &Device::Cpu);
    let _l1 = candle_nn::linear(6, 5, vb2.pp("l1")).unwrap();
    let _l2 = candle_nn::linear(5, 3, vb2.pp("l2")).unwrap();
    // The same shapes in one group where the file has two: refused,
    // nothing changed.
    let mut other = Adafactor::with_groups(vec![(vars.clone(), no_decay)]).unwrap();
    let before = other.to_safetensors().unwrap();
    let err = other.load_safetensors(&bytes).unwrap_err();
    assert!(err.to_string().contains("groups"), "{err}");
    assert_eq!(other.to_safetensors().unwrap(), before);
    let mut opt2 = Adafactor::from_varmap(&varmap2, no_decay, &[("*.bias", decay)]).unwrap();
    for (v2, v) in opt2.vars().iter().zip(&vars) {
        v2.set(v.as_tensor()).unwrap();
    }
    // The controls are not in the file: this optimizer's stay.
    opt2.set_schedule(Some(Box::new(sched.clone())));
    opt2.set_grad_scale(Some(3.0)).unwrap();
    opt2.load_safetensors(&bytes).unwrap();
    assert_eq!(opt2.steps(), 5);
    assert_eq!(opt2.group_config(0), Some(&AdafactorConfig { lr: sched.lr_at(4), ..decay }));
    assert_eq!(opt2.group_config(1), Some(&AdafactorConfig { lr: sched.lr_at(4), ..no_decay }));
    assert_eq!(opt2.to_safetensors().unwrap(), bytes);
    for t in 5..8u64 {
        let g: Vec<Tensor> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                Tensor::from_vec(values(v.elem_count(), 300 + 10 * t + i as u64), v.shape(), &Device::Cpu).unwrap()
            })
            .collect();
        opt.step_with(&g.iter().map(Some).collect::<Vec<_>>()).unwrap();
        opt2.step_with(&g.iter().map(Some).collect::<Vec<_>>()).unwrap();
    }
    for (v2, v) in opt2.vars().iter().zip(&vars) {
        assert_eq!(bits(&flat(v2.as_tensor())), bits(&flat(v.as_tensor())));
    }
    assert_eq!(opt2.learning_rate(), sched.lr_at(7));

    // Refused and changing nothing: a schedule that cycles momentum, a bad
    // group configuration or group, a bad loss scale.
    let before = (opt.to_safetensors().unwrap(), flat(vars[0].as_tensor()));
    let cycling = adaoptim::schedule::OneCycleLR::new(
        1e-2,
        50,
        0.3,
        adaoptim::schedule::Anneal::Cos,
        25.0,
        1e4,
        false,
        Some((0.85, 0.95)),
    )
    .unwrap();
    opt.set_schedule(Some(Box::new(cycling)));
    let g: Vec<Tensor> = vars.iter().map(|v| Tensor::ones(v.shape(), DType::F32, &Device::Cpu).unwrap()).collect();
    let err = opt.step_with(&g.iter().map(Some).collect::<Vec<_>>()).unwrap_err();
    assert!(err.to_string().contains("momentum"), "{err}");
    opt.set_schedule(None);
    assert!(opt.set_group_config(0, AdafactorConfig { lr: -1.0, ..decay }).is_err());
    assert!(opt.set_group_config(2, decay).is_err());
    assert!(opt.set_grad_scale(Some(0.0)).is_err());
    assert!(opt.set_grad_scale(Some(f32::NAN)).is_err());
    assert_eq!((opt.to_safetensors().unwrap(), flat(vars[0].as_tensor())), before);
    // A valid group configuration applies to that group's Vars only.
    opt.set_group_config(1, AdafactorConfig { weight_decay: 0.5, ..no_decay }).unwrap();
    assert_eq!(opt.inner(2).unwrap().config().weight_decay, 0.5);
    assert_eq!(opt.inner(0).unwrap().config().weight_decay, 0.1);
}
