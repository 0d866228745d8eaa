//! Borrowed multi-tensor steps: each tensor gets the bits a lone optimizer
//! over it gives, on every path; a tensor without a gradient keeps its
//! state and step count; guards act on the step as a whole; errors change
//! nothing; checkpoints resume bit for bit.

mod common;

use adaoptim::multi::{MultiOptimizer, TensorStep};
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

#[test]
fn each_tensor_gets_a_lone_optimizers_bits_and_no_grad_is_skipped() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut paths = all_paths();
    paths.push(("auto".into(), Exec::auto()));
    paths.push(("chunk-16".into(), Exec::parallel(Backend::best(), 16)));
    for (path, exec) in paths {
        pool.install(|| {
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
    for key in ["torch_class", "steps", "crc32", "param_groups"] {
        assert!(opt.to_safetensors_with(&[(key, "x".to_string())]).is_err(), "{key}");
    }
    assert!(adaoptim::checkpoint::format::metadata(b"not safetensors").is_err());
}
