//! Borrowed multi-tensor steps: each tensor gets the bits a lone optimizer
//! over it gives, on every path; a tensor without a gradient keeps its
//! state and step count; guards act on the step as a whole; errors change
//! nothing; checkpoints resume bit for bit.

mod common;

use adaoptim::multi::{MixedTensorStep, MultiOptimizer, TensorStep};
use adaoptim::storage::{
    Dtype, Grads, ParamRounding, Params, Q8_BLOCK, Q8State, QMap, StateBuf, bf16, dequantize_blockwise, f16,
    quantize_blockwise, stochastic_key,
};
use adaoptim::*;
use common::{Rng, all_paths, assert_same_bits};

const SIZES_A: [usize; 6] = [4096, 0, 1, 17, 1000, 3];
const SIZES_B: [usize; 4] = [255, 5000, 16, 2];

/// Which tensors have a gradient at step `s` (some skip some steps).
fn has_grad(k: usize, s: usize) -> bool {
    let skipped = (k % 3 == 1 && s.is_multiple_of(2)) || (k == 4 && s == 1);
    !skipped
}

fn check<A: Algorithm + Copy>(ga: A, gb: A, exec: Exec, what: &str) {
    let mut rng = Rng::new(31);
    let mut opt = MultiOptimizer::new();
    opt.set_exec(exec);
    let ids_a = opt.add_group(ga, &SIZES_A).unwrap();
    let ids_b = opt.add_group(gb, &SIZES_B).unwrap();
    assert_eq!(ids_a, (0..6).collect::<Vec<_>>());
    assert_eq!(ids_b, (6..10).collect::<Vec<_>>());
    let cfgs: Vec<A> = SIZES_A.iter().map(|_| ga).chain(SIZES_B.iter().map(|_| gb)).collect();
    let sizes: Vec<usize> = SIZES_A.iter().chain(&SIZES_B).copied().collect();
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let mut lone: Vec<(Optimizer<A>, Vec<f32>)> = params
        .iter()
        .zip(&cfgs)
        .map(|(p, &c)| (Optimizer::new(c, p.len()).unwrap().with_exec(Exec::scalar()), p.clone()))
        .collect();
    for s in 0..5 {
        let grads: Vec<Option<Vec<f32>>> =
            sizes.iter().enumerate().map(|(k, &n)| has_grad(k, s).then(|| rng.vec(n, 1.0))).collect();
        for (k, g) in grads.iter().enumerate() {
            if let Some(g) = g {
                let (o, p) = &mut lone[k];
                o.step(p, g).unwrap();
            }
        }
        let mut steps: Vec<TensorStep<'_>> =
            params.iter_mut().zip(&grads).map(|(p, g)| TensorStep::new(p, g.as_deref())).collect();
        let report = opt.step(&mut steps).unwrap();
        if matches!(exec.parallel, Parallel::Chunks { .. }) {
            assert!(report.parallel, "{what}: a forced parallel step ran through rayon");
        }
    }
    for (k, (o, p)) in lone.iter().enumerate() {
        assert_same_bits(&format!("{what} tensor {k}"), &params[k], p);
        assert_eq!(opt.step_count(k).unwrap(), o.step_count(), "{what} tensor {k}: own step count");
        for name in o.state_names() {
            assert_same_bits(
                &format!("{what} tensor {k} {name}"),
                opt.state(k, name).unwrap().unwrap(),
                o.state(name).unwrap(),
            );
        }
        for name in ["exp_avg", "max_exp_avg_sq", "momentum_buffer", "mu_product"] {
            assert_eq!(opt.state(k, name).unwrap().is_some(), o.state_names().contains(&name), "{what} {k} {name}");
        }
    }
}

/// Runs `f` on every path this machine has, plus the automatic one and a
/// 16-element chunk, inside a 3-thread pool.
fn for_every_path(f: impl Fn(&str, Exec) + Sync) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut paths = all_paths();
    paths.push(("auto".into(), Exec::auto()));
    paths.push(("chunk-16".into(), Exec::parallel(Backend::best(), 16)));
    for (path, exec) in paths {
        pool.install(|| f(&path, exec));
    }
}

#[test]
fn each_tensor_gets_a_lone_optimizers_bits_and_no_grad_is_skipped() {
    for_every_path(|path, exec| {
        check(
            AdamConfig { weight_decay: 0.1, decoupled_weight_decay: true, ..Default::default() },
            AdamConfig { amsgrad: true, lr: 3e-3, ..Default::default() },
            exec,
            &format!("adam {path}"),
        );
        // NAdam: each tensor's own mu_product.
        check(
            NAdamConfig { momentum_decay: 0.01, ..Default::default() },
            NAdamConfig { lr: 1e-2, ..Default::default() },
            exec,
            &format!("nadam {path}"),
        );
        check(
            SgdConfig { lr: 0.1, ..Default::default() },
            SgdConfig { lr: 0.01, momentum: 0.5, nesterov: true, ..Default::default() },
            exec,
            &format!("sgd {path}"),
        );
    });
}

/// Two tensors, as a model of two parameters.
fn two() -> (MultiOptimizer<AdamConfig>, Vec<f32>, Vec<f32>) {
    let mut opt = MultiOptimizer::new();
    opt.add_group(AdamConfig::default(), &[5, 3]).unwrap();
    (opt, vec![1.0; 5], vec![2.0; 3])
}

#[test]
fn bad_steps_are_typed_errors_and_change_nothing() {
    let (mut opt, mut a, mut b) = two();
    let ga = vec![0.5f32; 5];
    let snapshot = |o: &MultiOptimizer<AdamConfig>| {
        (0..2).map(|k| (o.step_count(k).unwrap(), o.state(k, "exp_avg").unwrap().unwrap().to_vec())).collect::<Vec<_>>()
    };
    let before = snapshot(&opt);
    // Too few tensors.
    let r = opt.step(&mut [TensorStep::new(&mut a, Some(&ga))]);
    assert_eq!(r, Err(Error::LengthMismatch { what: "tensors", expected: 2, actual: 1 }));
    // A gradient of the wrong length in the second tensor: the first is not touched either.
    let r = opt.step(&mut [TensorStep::new(&mut a, Some(&ga)), TensorStep::new(&mut b, Some(&[0.5; 2]))]);
    assert_eq!(r, Err(Error::LengthMismatch { what: "grads", expected: 3, actual: 2 }));
    // Parameters of the wrong length.
    let mut short = vec![0.0f32; 4];
    let r = opt.step(&mut [TensorStep::new(&mut short, Some(&[0.5; 4])), TensorStep::new(&mut b, None)]);
    assert!(matches!(r, Err(Error::LengthMismatch { what: "params", .. })));
    // A non-finite gradient under Error: the index counts through the present gradients.
    opt.set_non_finite(NonFinitePolicy::Error);
    let gb = [0.5f32, f32::NAN, 0.5];
    let r = opt.step(&mut [TensorStep::new(&mut a, Some(&ga)), TensorStep::new(&mut b, Some(&gb))]);
    assert_eq!(r, Err(Error::NonFiniteGradient { index: 6 }));
    let r = opt.step(&mut [TensorStep::new(&mut a, None), TensorStep::new(&mut b, Some(&gb))]);
    assert_eq!(r, Err(Error::NonFiniteGradient { index: 1 }));
    assert_eq!((a, b), (vec![1.0; 5], vec![2.0; 3]));
    assert_eq!(snapshot(&opt), before);
    // Out-of-range queries are errors, not panics.
    assert!(opt.step_count(2).is_err() && opt.state(9, "exp_avg").is_err() && opt.len_of(2).is_err());
}

#[test]
fn guards_act_on_the_whole_step() {
    let mut rng = Rng::new(32);
    let (mut opt, mut a, mut b) = two();
    opt.set_max_grad_norm(Some(0.5)).unwrap();
    opt.set_grad_scale(Some(3.0)).unwrap();
    opt.set_non_finite(NonFinitePolicy::SkipStep);
    let (mut ra, mut rb) = (a.clone(), b.clone());
    let mut state = [vec![0.0f32; 5], vec![0.0f32; 5], vec![0.0f32; 3], vec![0.0f32; 3]];
    for t in 1..=3u64 {
        let (ga, gb) = (rng.vec(5, 4.0), rng.vec(3, 4.0));
        opt.step(&mut [TensorStep::new(&mut a, Some(&ga)), TensorStep::new(&mut b, Some(&gb))]).unwrap();
        // The reference: the free kernel with the global norm of the unscaled
        // gradients, composed from the public clipping functions.
        let unscaled = |g: &[f32]| g.iter().map(|x| x / 3.0).collect::<Vec<f32>>();
        let sq = clip::sum_of_squares(&unscaled(&ga), &Exec::scalar()).unwrap()
            + clip::sum_of_squares(&unscaled(&gb), &Exec::scalar()).unwrap();
        let options = StepOptions {
            exec: Exec::scalar(),
            grad_scale: Some(3.0),
            clip_coef: Some(clip::clip_coef(sq.sqrt(), 0.5)),
            ..StepOptions::default()
        };
        assert_eq!(opt.last_grad_norm(), Some(sq.sqrt()));
        let [m0, v0, m1, v1] = &mut state;
        step_slices_with(&AdamConfig::default(), t, &mut (), &mut ra, &ga, &mut [m0, v0], &options).unwrap();
        step_slices_with(&AdamConfig::default(), t, &mut (), &mut rb, &gb, &mut [m1, v1], &options).unwrap();
        assert_same_bits("clipped a", &a, &ra);
        assert_same_bits("clipped b", &b, &rb);
    }
    // An infinite gradient in one tensor skips the whole step.
    let before = (a.clone(), b.clone(), opt.step_count(0).unwrap());
    let r =
        opt.step(&mut [TensorStep::new(&mut a, Some(&[0.1; 5])), TensorStep::new(&mut b, Some(&[f32::INFINITY; 3]))]);
    assert!(r.unwrap().skipped);
    assert_eq!((a, b, opt.step_count(0).unwrap()), before);
}

#[test]
fn checkpoints_resume_bit_for_bit_with_per_tensor_steps() {
    let mut rng = Rng::new(33);
    let build = || {
        let mut o = MultiOptimizer::new();
        o.add_group(NAdamConfig::default(), &[7, 0]).unwrap();
        o.add_group(NAdamConfig { decoupled_weight_decay: true, weight_decay: 0.1, ..Default::default() }, &[33])
            .unwrap();
        o
    };
    let mut straight = build();
    let mut ps: Vec<Vec<f32>> = [7, 0, 33].iter().map(|&n| rng.vec(n, 1.0)).collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..6).map(|_| [7, 0, 33].iter().map(|&n| rng.vec(n, 1.0)).collect()).collect();
    let run = |o: &mut MultiOptimizer<NAdamConfig>, ps: &mut [Vec<f32>], range: std::ops::Range<usize>| {
        for s in range {
            let mut steps: Vec<TensorStep<'_>> = ps
                .iter_mut()
                .zip(&grads[s])
                .enumerate()
                .map(|(k, (p, g))| TensorStep::new(p, (k != 2 || s.is_multiple_of(2)).then_some(g.as_slice())))
                .collect();
            o.step(&mut steps).unwrap();
        }
    };
    let mut resumed_ps = ps.clone();
    run(&mut straight, &mut ps, 0..6);
    let mut first = build();
    run(&mut first, &mut resumed_ps, 0..3);
    let bytes = first.to_safetensors().unwrap();
    let mut resumed = MultiOptimizer::<NAdamConfig>::from_safetensors(&bytes).unwrap();
    assert_eq!((resumed.step_count(0).unwrap(), resumed.step_count(2).unwrap()), (3, 2));
    run(&mut resumed, &mut resumed_ps, 3..6);
    for k in 0..3 {
        assert_same_bits(&format!("resumed tensor {k}"), &resumed_ps[k], &ps[k]);
        assert_eq!(resumed.step_count(k).unwrap(), straight.step_count(k).unwrap());
    }
    // Torch's state names, each tensor's own step.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert!(names.contains(&"state.2.step") && names.contains(&"state.0.mu_product"));
    assert_eq!(st.tensor("state.2.step").unwrap().data(), 2.0f32.to_le_bytes());
    // Truncated or of another kind: typed errors.
    for cut in [0, 9, bytes.len() / 2, bytes.len() - 1] {
        assert!(matches!(
            MultiOptimizer::<NAdamConfig>::from_safetensors(&bytes[..cut]),
            Err(Error::Checkpoint { .. })
        ));
    }
    assert!(matches!(MultiOptimizer::<AdamConfig>::from_safetensors(&bytes), Err(Error::Checkpoint { .. })));
}

#[test]
fn extra_metadata_is_kept_and_may_not_replace_the_checkpoints_own() {
    let (opt, _, _) = two();
    let bytes = opt.to_safetensors_with(&[("adapter.names", "[\"w\",\"b\"]".to_string())]).unwrap();
    let meta = adaoptim::checkpoint::format::metadata(&bytes).unwrap();
    assert_eq!(meta["adapter.names"], "[\"w\",\"b\"]");
    assert_eq!(meta["torch_class"], "Adam");
    // The extra entry does not disturb loading, and the plain bytes lack it.
    let loaded = MultiOptimizer::<AdamConfig>::from_safetensors(&bytes).unwrap();
    assert_eq!(loaded.num_tensors(), opt.num_tensors());
    assert!(
        !adaoptim::checkpoint::format::metadata(&opt.to_safetensors().unwrap()).unwrap().contains_key("adapter.names")
    );
    for key in ["torch_class", "steps", "crc32", "param_groups", "state_dtypes"] {
        assert!(opt.to_safetensors_with(&[(key, "x".to_string())]).is_err(), "{key}");
    }
    assert!(adaoptim::checkpoint::format::metadata(b"not safetensors").is_err());
}

#[test]
fn bf16_and_8bit_groups_checkpoint_bit_for_bit_under_bitsandbytes_names() {
    let sizes = [[300, 7], [513, 0], [1000, 256]];
    let mut opt = MultiOptimizer::new();
    for (sz, d) in sizes.iter().zip([Dtype::F32, Dtype::Q8, Dtype::Bf16]) {
        opt.add_group_with_state(AdamConfig { amsgrad: true, ..Default::default() }, sz, d).unwrap();
    }
    let mut rng = Rng::new(5);
    let flat: Vec<usize> = sizes.concat();
    let mut ps: Vec<Vec<f32>> = flat.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let gs: Vec<Vec<Vec<f32>>> = (0..6).map(|_| flat.iter().map(|&n| rng.vec(n, 1.0)).collect()).collect();
    let run = |opt: &mut MultiOptimizer<AdamConfig>, ps: &mut [Vec<f32>], s: usize| {
        let mut ts: Vec<TensorStep<'_>> = ps
            .iter_mut()
            .zip(&gs[s])
            .enumerate()
            .map(|(k, (p, g))| TensorStep::new(p, has_grad(k, s).then_some(&g[..])))
            .collect();
        opt.step(&mut ts).unwrap();
    };
    for s in 0..3 {
        run(&mut opt, &mut ps, s);
    }
    let bytes = opt.to_safetensors().unwrap();
    let saved_codes = opt.q8_parts(2).unwrap().unwrap()[0].state.to_vec();
    let mut resumed = MultiOptimizer::<AdamConfig>::from_safetensors(&bytes).unwrap();
    assert_eq!(
        (0..3).map(|g| resumed.state_dtype(g).unwrap()).collect::<Vec<_>>(),
        [Dtype::F32, Dtype::Q8, Dtype::Bf16]
    );
    let mut resumed_ps = ps.clone();
    for s in 3..6 {
        run(&mut opt, &mut ps, s);
        run(&mut resumed, &mut resumed_ps, s);
    }
    for k in 0..flat.len() {
        assert_same_bits(&format!("resumed tensor {k}"), &resumed_ps[k], &ps[k]);
        for name in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] {
            let (a, b) = (resumed.state_f32(k, name).unwrap().unwrap(), opt.state_f32(k, name).unwrap().unwrap());
            assert_same_bits(&format!("resumed tensor {k} {name}"), &a, &b);
        }
    }
    // Tensor 2 is the 8-bit group's first: bitsandbytes' names and dtypes.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let codes = st.tensor("state.2.state1").unwrap();
    assert_eq!((codes.dtype(), codes.shape()), (safetensors::Dtype::U8, &[513][..]));
    assert_eq!(st.tensor("state.2.absmax3").unwrap().shape(), [3]);
    assert_eq!(st.tensor("state.2.qmap2").unwrap().shape(), [256]);
    assert_eq!(st.tensor("state.4.exp_avg").unwrap().dtype(), safetensors::Dtype::BF16);
    assert!(st.tensor("state.2.exp_avg").is_err());
    assert_eq!(saved_codes, codes.data());
    let meta = adaoptim::checkpoint::format::metadata(&bytes).unwrap();
    assert_eq!(meta["state_dtypes"], r#"["F32","U8","BF16"]"#);
    // A file without state_dtypes (written before groups had a storage) is
    // all f32; a wrong list is a typed error.
    let mut f32_only = MultiOptimizer::new();
    f32_only.add_group(AdamConfig::default(), &[4]).unwrap();
    let f32_bytes = f32_only.to_safetensors().unwrap();
    let (header, body) = split_header(&f32_bytes);
    let mut h: serde_json::Value = serde_json::from_slice(header).unwrap();
    h["__metadata__"].as_object_mut().unwrap().remove("state_dtypes");
    let old = MultiOptimizer::<AdamConfig>::from_safetensors(&join_header(&h, body)).unwrap();
    assert_eq!(old.state_dtype(0), Some(Dtype::F32));
    for bad in [r#"["F16"]"#, r#"["F32","U8"]"#, r#""U8""#, "[1]"] {
        h["__metadata__"]["state_dtypes"] = bad.into();
        let r = MultiOptimizer::<AdamConfig>::from_safetensors(&join_header(&h, body));
        assert!(matches!(r, Err(Error::Checkpoint { .. })), "{bad}: {r:?}");
    }
    // Truncated: typed errors.
    for cut in [9, bytes.len() / 2, bytes.len() - 1] {
        assert!(matches!(MultiOptimizer::<AdamConfig>::from_safetensors(&bytes[..cut]), Err(Error::Checkpoint { .. })));
    }
}

fn split_header(bytes: &[u8]) -> (&[u8], &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (&bytes[8..8 + n], &bytes[8 + n..])
}

fn join_header(h: &serde_json::Value, body: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(h).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
    out
}

#[test]
fn a_groups_state_moves_to_another_storage_as_its_values_round() {
    let config = AdagradConfig { initial_accumulator_value: 0.3, ..Default::default() };
    let sizes = [700, 5];
    let mut rng = Rng::new(8);
    let gs: Vec<Vec<Vec<f32>>> = (0..4).map(|_| sizes.iter().map(|&n| rng.vec(n, 1.0)).collect()).collect();
    let p0: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let run = |opt: &mut MultiOptimizer<AdagradConfig>, ps: &mut [Vec<f32>], s: usize| {
        let mut ts: Vec<TensorStep<'_>> =
            ps.iter_mut().zip(&gs[s]).map(|(p, g)| TensorStep::new(p, Some(&g[..]))).collect();
        opt.step(&mut ts).unwrap();
    };
    for to in [Dtype::Q8, Dtype::Bf16] {
        // A fresh group moved: as if made in that storage, step for step.
        let (mut moved, mut made) = (MultiOptimizer::new(), MultiOptimizer::new());
        moved.add_group(config, &sizes).unwrap();
        moved.set_state_dtype(0, to).unwrap();
        made.add_group_with_state(config, &sizes, to).unwrap();
        let (mut pa, mut pb) = (p0.clone(), p0.clone());
        for s in 0..2 {
            run(&mut moved, &mut pa, s);
            run(&mut made, &mut pb, s);
        }
        for k in 0..2 {
            assert_same_bits(&format!("{to:?} fresh {k}"), &pa[k], &pb[k]);
        }
        // Midway: the values as they are, rounded or quantized by the
        // public storage functions; then it steps on in the new storage.
        let sums: Vec<Vec<f32>> = (0..2).map(|k| moved.state_f32(k, "sum").unwrap().unwrap()).collect();
        let before = moved.clone();
        moved.set_state_dtype(0, Dtype::F32).unwrap();
        assert_eq!(moved.state_dtype(0), Some(Dtype::F32));
        for (k, sum) in sums.iter().enumerate() {
            assert_same_bits(&format!("{to:?} widened {k}"), moved.state(k, "sum").unwrap().unwrap(), sum);
        }
        moved.set_state_dtype(0, to).unwrap();
        for (k, sum) in sums.iter().enumerate() {
            let again = moved.state_f32(k, "sum").unwrap().unwrap();
            let want: Vec<f32> = match to {
                Dtype::Bf16 => sum.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
                _ => {
                    let (mut c, mut a) = (vec![0u8; sum.len()], vec![0f32; sum.len().div_ceil(Q8_BLOCK)]);
                    quantize_blockwise(sum, QMap::unsigned(), &mut c, &mut a).unwrap();
                    let mut out = vec![0.0; sum.len()];
                    dequantize_blockwise(&c, &a, QMap::unsigned(), &mut out).unwrap();
                    out
                }
            };
            assert_same_bits(&format!("{to:?} round trip {k}"), &again, &want);
        }
        run(&mut moved, &mut pa, 2);
        assert_eq!(moved.step_count(0).unwrap(), 3);
        // Refused: no such group, another dtype; nothing changes.
        let mut same = before.clone();
        assert!(matches!(same.set_state_dtype(1, Dtype::F32), Err(Error::IncompatibleConfig { .. })));
        assert!(matches!(same.set_state_dtype(0, Dtype::F16), Err(Error::Storage { .. })));
        assert!(matches!(same.set_state_dtype_all(Dtype::F16), Err(Error::Storage { .. })));
        assert_eq!(same.state_dtype(0), Some(to));
        for k in 0..2 {
            assert_same_bits(
                &format!("{to:?} refused {k}"),
                &same.state_f32(k, "sum").unwrap().unwrap(),
                &before.state_f32(k, "sum").unwrap().unwrap(),
            );
        }
    }
}

#[test]
fn every_group_moves_at_once() {
    let mut opt = MultiOptimizer::new();
    opt.add_group(AdamConfig::default(), &[300]).unwrap();
    opt.add_group_with_state(AdamConfig { lr: 0.1, ..Default::default() }, &[20, 1], Dtype::Bf16).unwrap();
    opt.add_group(AdamConfig::default(), &[]).unwrap();
    opt.set_state_dtype_all(Dtype::Q8).unwrap();
    assert_eq!((0..3).map(|g| opt.state_dtype(g).unwrap()).collect::<Vec<_>>(), [Dtype::Q8; 3]);
    assert!((0..3).all(|k| opt.q8_parts(k).unwrap().is_some()));
}

#[test]
fn a_state_storage_other_than_f32_bf16_and_8bit_is_refused_and_adds_nothing() {
    let mut opt = MultiOptimizer::new();
    opt.add_group(AdamConfig::default(), &[4]).unwrap();
    let r = opt.add_group_with_state(AdamConfig::default(), &[3], Dtype::F16);
    assert!(matches!(r, Err(Error::Storage { what: "state", dtype: Dtype::F16, .. })), "{r:?}");
    // Plain SGD keeps no state buffer, and still refuses the storage.
    let mut sgd = MultiOptimizer::new();
    assert!(matches!(sgd.add_group_with_state(SgdConfig::default(), &[3], Dtype::F16), Err(Error::Storage { .. })));
    assert_eq!((opt.num_groups(), opt.num_tensors(), sgd.num_groups()), (1, 1, 0));
    assert_eq!(opt.state_dtype(1), None);
}

/// The tensors of the mixed test: (length, params bf16?, grad dtype), the
/// gradient `None` on some steps.
const MIXED: [(usize, bool, Dtype); 6] = [
    (4096, false, Dtype::F32),
    (3000, true, Dtype::Bf16),
    (17, false, Dtype::F16),
    (1000, true, Dtype::F32),
    (0, true, Dtype::Bf16),
    (300, true, Dtype::F16),
];

/// Owned parameters and gradients of any storage, borrowed per step.
enum P {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}
enum G {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}
impl P {
    fn new(v: Vec<f32>, half: bool) -> P {
        if half { P::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()) } else { P::F32(v) }
    }
    fn as_params(&mut self) -> Params<'_> {
        match self {
            P::F32(x) => Params::F32(x),
            P::Bf16(x) => Params::Bf16(x),
        }
    }
    fn bits(&self) -> Vec<u32> {
        match self {
            P::F32(x) => x.iter().map(|v| v.to_bits()).collect(),
            P::Bf16(x) => x.iter().map(|v| v.to_bits() as u32).collect(),
        }
    }
}
impl G {
    fn new(v: Vec<f32>, dtype: Dtype) -> G {
        match dtype {
            Dtype::Bf16 => G::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            Dtype::F16 => G::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            _ => G::F32(v),
        }
    }
    fn as_grads(&self) -> Grads<'_> {
        match self {
            G::F32(x) => Grads::F32(x),
            G::Bf16(x) => Grads::Bf16(x),
            G::F16(x) => Grads::F16(x),
        }
    }
}

/// A reference state buffer in its storage, made and read through the
/// public storage functions.
enum S {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    Q8(Vec<u8>, Vec<f32>, &'static QMap),
}
impl S {
    fn new(dtype: Dtype, n: usize, x: f32, name: &str) -> S {
        match dtype {
            Dtype::F32 => S::F32(vec![x; n]),
            Dtype::Bf16 => S::Bf16(vec![bf16::from_f32(x); n]),
            _ => {
                let map = QMap::for_state(name);
                let (mut c, mut a) = (vec![0u8; n], vec![0f32; n.div_ceil(Q8_BLOCK)]);
                quantize_blockwise(&vec![x; n], map, &mut c, &mut a).unwrap();
                S::Q8(c, a, map)
            }
        }
    }
    fn buf(&mut self) -> StateBuf<'_> {
        match self {
            S::F32(x) => StateBuf::F32(x),
            S::Bf16(x) => StateBuf::Bf16(x),
            S::Q8(codes, absmax, map) => StateBuf::Q8(Q8State { codes, absmax, map }),
        }
    }
    fn values(&self) -> Vec<f32> {
        match self {
            S::F32(x) => x.clone(),
            S::Bf16(x) => x.iter().map(|v| v.to_f32()).collect(),
            S::Q8(c, a, map) => {
                let mut out = vec![0.0; c.len()];
                dequantize_blockwise(c, a, map, &mut out).unwrap();
                out
            }
        }
    }
}

fn check_mixed<A: Algorithm + Copy>(config: A, exec: Exec, clip: bool, sr: Option<u64>, state: Dtype, what: &str) {
    let what = &format!("{what} state={state:?}");
    let mut rng = Rng::new(34);
    let mut opt = MultiOptimizer::new();
    opt.set_exec(exec);
    opt.set_stochastic_rounding(sr);
    opt.add_group_with_state(config, &MIXED.map(|m| m.0), state).unwrap();
    assert_eq!(opt.state_dtype(0), Some(state));
    let scale = Some(2.0f32);
    opt.set_grad_scale(scale).unwrap();
    if clip {
        opt.set_max_grad_norm(Some(1.0)).unwrap();
    }
    let mut params: Vec<P> = MIXED.iter().map(|&(n, half, _)| P::new(rng.vec(n, 1.0), half)).collect();
    let initial: Vec<Vec<u32>> = params.iter().map(P::bits).collect();
    let mut lone: Vec<P> = MIXED.iter().map(|&(n, half, _)| P::new(vec![0.0; n], half)).collect();
    for (l, p) in lone.iter_mut().zip(&params) {
        *l = match p {
            P::F32(x) => P::F32(x.clone()),
            P::Bf16(x) => P::Bf16(x.clone()),
        };
    }
    let names = config.state_names();
    let mut states: Vec<Vec<S>> = MIXED
        .iter()
        .map(|m| names.iter().enumerate().map(|(i, name)| S::new(state, m.0, config.state_init(i), name)).collect())
        .collect();
    let mut steps = vec![0u64; MIXED.len()];
    let mut aux: Vec<_> = MIXED.iter().map(|_| config.aux_init()).collect();
    for s in 0..4 {
        let grads: Vec<Option<G>> = MIXED
            .iter()
            .enumerate()
            .map(|(i, &(n, _, d))| has_grad(i, s).then(|| G::new(rng.vec(n, 3.0), d)))
            .collect();
        // The reference: step_mixed per tensor, its own state, the global norm
        // composed from the public clipping functions.
        let sq: f64 = grads
            .iter()
            .flatten()
            .map(|g| clip::sum_of_squares_unscaled(g.as_grads(), scale, &Exec::scalar()).unwrap())
            .sum();
        let options = StepOptions {
            exec: Exec::scalar(),
            grad_scale: scale,
            clip_coef: clip.then(|| clip::clip_coef(sq.sqrt(), 1.0)),
            ..StepOptions::default()
        };
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            steps[i] += 1;
            // tensor i's own stream: the core's, seeded by stochastic_key(seed, i)
            let param_rounding = match (sr, &lone[i]) {
                (Some(seed), P::Bf16(_)) => {
                    ParamRounding::Stochastic { seed: stochastic_key(seed, i as u64), offset: 0 }
                }
                _ => ParamRounding::Nearest,
            };
            let options = StepOptions { param_rounding, ..options };
            let mut bufs: Vec<StateBuf<'_>> = states[i].iter_mut().map(S::buf).collect();
            step_mixed(&config, steps[i], &mut aux[i], lone[i].as_params(), g.as_grads(), &mut bufs, None, &options)
                .unwrap();
        }
        let mut ts: Vec<MixedTensorStep<'_>> = params
            .iter_mut()
            .zip(&grads)
            .map(|(p, g)| MixedTensorStep::new(p.as_params(), g.as_ref().map(G::as_grads)))
            .collect();
        let report = opt.step_mixed(&mut ts).unwrap();
        assert!(!report.skipped);
        if clip {
            assert_eq!(opt.last_grad_norm(), Some(sq.sqrt()), "{what}: the global norm");
        }
    }
    for i in 0..MIXED.len() {
        assert_eq!(params[i].bits(), lone[i].bits(), "{what} tensor {i}: params");
        let moved = params[i].bits().iter().zip(&initial[i]).filter(|(a, b)| a != b).count();
        assert!(moved * 2 >= MIXED[i].0, "{what} tensor {i}: only {moved} of {} parameters moved", MIXED[i].0);
        assert_eq!(opt.step_count(i).unwrap(), steps[i], "{what} tensor {i}: steps");
        for (j, name) in names.iter().enumerate() {
            let w = format!("{what} tensor {i} {name}");
            assert_same_bits(&w, &opt.state_f32(i, name).unwrap().unwrap(), &states[i][j].values());
            match (&states[i][j], opt.state(i, name)) {
                (S::F32(x), Ok(Some(y))) => assert_same_bits(&w, y, x),
                (S::F32(_), r) => panic!("{w}: f32 state read as {r:?}"),
                (_, r) => assert!(matches!(r, Err(Error::Storage { .. })), "{w}: {r:?}"),
            }
            if let (S::Q8(codes, absmax, map), Some(parts)) = (&states[i][j], opt.q8_parts(i).unwrap()) {
                assert_eq!(parts[j].state, &codes[..], "{w}: codes");
                assert_same_bits(&w, parts[j].absmax, absmax);
                assert_same_bits(&w, parts[j].qmap, map.code());
            }
        }
        assert_eq!(opt.q8_parts(i).unwrap().is_some(), state == Dtype::Q8 && !names.is_empty(), "{what} {i}");
    }
}

#[test]
fn mixed_storage_tensors_get_step_mixeds_bits_on_every_path() {
    for_every_path(|path, exec| {
        for (clip, sr, state) in [
            (false, None, Dtype::F32),
            (true, None, Dtype::F32),
            (false, Some(0x5eed), Dtype::F32),
            (true, Some(7), Dtype::F32),
            (false, None, Dtype::Bf16),
            (true, Some(7), Dtype::Bf16),
            (false, None, Dtype::Q8),
            (true, Some(7), Dtype::Q8),
        ] {
            let w = format!("{path} clip={clip} sr={sr:?}");
            check_mixed(
                AdamConfig { lr: 0.05, weight_decay: 0.1, decoupled_weight_decay: true, ..Default::default() },
                exec,
                clip,
                sr,
                state,
                &format!("adamw {w}"),
            );
            check_mixed(
                NAdamConfig { lr: 0.05, momentum_decay: 0.01, ..Default::default() },
                exec,
                clip,
                sr,
                state,
                &format!("nadam {w}"),
            );
            check_mixed(
                SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() },
                exec,
                clip,
                sr,
                state,
                &format!("sgd {w}"),
            );
            check_mixed(
                AdagradConfig { lr: 0.1, initial_accumulator_value: 0.1, ..Default::default() },
                exec,
                clip,
                sr,
                state,
                &format!("adagrad {w}"),
            );
        }
    });
}

#[test]
fn a_non_finite_half_gradient_is_found_and_changes_nothing() {
    let mut opt = MultiOptimizer::new();
    opt.add_group(AdamConfig::default(), &[5, 3]).unwrap();
    let mut a = vec![bf16::from_f32(1.0); 5];
    let mut b = vec![2.0f32; 3];
    let ga = vec![bf16::from_f32(0.5); 5];
    // Finite in bf16, infinite once unscaled by 0.5 (as the step unscales it).
    let gb = [f16::from_f32(0.5), f16::from_f32(0.5), f16::from_f32(0.5)];
    let huge = [bf16::from_f32(0.5), bf16::from_f32(3e38), bf16::from_f32(0.5), bf16::from_f32(0.5), bf16::NAN];
    opt.set_grad_scale(Some(0.5)).unwrap();
    for clip in [None, Some(1.0)] {
        opt.set_max_grad_norm(clip).unwrap();
        opt.set_non_finite(NonFinitePolicy::Error);
        let r = opt.step_mixed(&mut [
            MixedTensorStep::new(Params::Bf16(&mut a), Some(Grads::Bf16(&huge))),
            MixedTensorStep::new(Params::F32(&mut b), Some(Grads::F16(&gb))),
        ]);
        assert_eq!(r, Err(Error::NonFiniteGradient { index: 1 }), "clip {clip:?}");
        let r = opt.step_mixed(&mut [
            MixedTensorStep::new(Params::Bf16(&mut a), Some(Grads::Bf16(&ga))),
            MixedTensorStep::new(Params::F32(&mut b), Some(Grads::Bf16(&huge[..3]))),
        ]);
        assert_eq!(r, Err(Error::NonFiniteGradient { index: 6 }), "clip {clip:?}");
        opt.set_non_finite(NonFinitePolicy::SkipStep);
        let r = opt.step_mixed(&mut [
            MixedTensorStep::new(Params::Bf16(&mut a), Some(Grads::Bf16(&ga))),
            MixedTensorStep::new(Params::F32(&mut b), Some(Grads::Bf16(&huge[2..]))),
        ]);
        assert!(r.unwrap().skipped, "clip {clip:?}");
        // A gradient of another length in the second tensor.
        let r = opt.step_mixed(&mut [
            MixedTensorStep::new(Params::Bf16(&mut a), Some(Grads::Bf16(&ga))),
            MixedTensorStep::new(Params::F32(&mut b), Some(Grads::Bf16(&ga[..2]))),
        ]);
        assert_eq!(r, Err(Error::LengthMismatch { what: "grads", expected: 3, actual: 2 }));
    }
    assert!(a.iter().all(|x| x.to_f32() == 1.0) && b == vec![2.0; 3]);
    assert_eq!((opt.step_count(0).unwrap(), opt.step_count(1).unwrap()), (0, 0));
    assert!(opt.state(0, "exp_avg").unwrap().unwrap().iter().all(|&x| x == 0.0));
}

#[test]
fn stochastic_rounding_refuses_f16_params_and_changes_nothing() {
    let mut opt = MultiOptimizer::new();
    opt.add_group(AdamConfig::default(), &[5, 3]).unwrap();
    opt.set_stochastic_rounding(Some(1));
    assert_eq!(opt.stochastic_rounding(), Some(1));
    let mut a = vec![bf16::from_f32(1.0); 5];
    let mut b = vec![f16::from_f32(2.0); 3];
    let (ga, gb) = (vec![0.5f32; 5], vec![0.25f32; 3]);
    let err = opt
        .step_mixed(&mut [
            MixedTensorStep::new(Params::Bf16(&mut a), Some(Grads::F32(&ga))),
            MixedTensorStep::new(Params::F16(&mut b), Some(Grads::F32(&gb))),
        ])
        .unwrap_err();
    assert!(matches!(err, Error::Storage { dtype: Dtype::F16, .. }), "{err:?}");
    assert!(a.iter().all(|x| x.to_f32() == 1.0) && b.iter().all(|x| x.to_f32() == 2.0));
    assert_eq!((opt.step_count(0).unwrap(), opt.step_count(1).unwrap()), (0, 0));
    // an f16 tensor without a gradient is not stepped, so not refused
    opt.step_mixed(&mut [
        MixedTensorStep::new(Params::Bf16(&mut a), Some(Grads::F32(&ga))),
        MixedTensorStep::new(Params::F16(&mut b), None),
    ])
    .unwrap();
    assert_eq!((opt.step_count(0).unwrap(), opt.step_count(1).unwrap()), (1, 0));
}
