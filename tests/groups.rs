//! Parameter groups: stepping a mixed model as groups in one arena equals
//! stepping each tensor alone, bit for bit; shards equal the unsharded step.

mod common;

use adaoptim::groups::{GroupedOptimizer, TensorId, shard_range};
use adaoptim::schedule::{CosineAnnealingLR, Schedule};
use adaoptim::*;
use common::{Rng, all_paths, assert_same_bits};

const SIZES_A: [usize; 7] = [4096, 0, 1, 17, 1000, 64, 3];
const SIZES_B: [usize; 5] = [1, 255, 0, 5000, 16];

/// Builds a two-group model with random params; steps it `steps` times with
/// random grads, and checks each tensor against a lone `Optimizer`.
fn check_groups<A: Algorithm + Copy>(ga: A, gb: A, exec: Exec, what: &str)
where
    Optimizer<A>: Clone,
{
    let mut rng = Rng::new(21);
    let mut opt = GroupedOptimizer::new();
    opt.set_exec(exec);
    let ids_a = opt.add_group(ga, &SIZES_A).unwrap();
    let ids_b = opt.add_group(gb, &SIZES_B).unwrap();
    let all: Vec<(TensorId, A)> = ids_a.iter().map(|&i| (i, ga)).chain(ids_b.iter().map(|&i| (i, gb))).collect();
    let mut lone: Vec<(Optimizer<A>, Vec<f32>)> = Vec::new();
    for &(id, cfg) in &all {
        let p = rng.vec(opt.params(id).unwrap().len(), 1.0);
        opt.params_mut(id).unwrap().copy_from_slice(&p);
        lone.push((Optimizer::new(cfg, p.len()).unwrap().with_exec(Exec::scalar()), p));
    }
    for _ in 0..4 {
        for (k, &(id, _)) in all.iter().enumerate() {
            let g = rng.vec(opt.params(id).unwrap().len(), 1.0);
            opt.grads_mut(id).unwrap().copy_from_slice(&g);
            let (o, p) = &mut lone[k];
            o.step(p, &g).unwrap();
        }
        opt.step().unwrap();
    }
    for (k, &(id, _)) in all.iter().enumerate() {
        assert_same_bits(&format!("{what} tensor {k}"), opt.params(id).unwrap(), &lone[k].1);
        // A tensor has exactly its own group's state buffers.
        for name in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "momentum_buffer", "grad_avg", "sum"] {
            let own = lone[k].0.state_names().contains(&name);
            assert_eq!(opt.state(name, id).unwrap().is_some(), own, "{what} tensor {k} {name}");
        }
        for name in lone[k].0.state_names() {
            assert_same_bits(
                &format!("{what} tensor {k} {name}"),
                opt.state(name, id).unwrap().unwrap(),
                lone[k].0.state(name).unwrap(),
            );
        }
    }
    assert_eq!(opt.step_count(), 4);
}

#[test]
fn groups_equal_each_tensor_alone() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut paths = all_paths();
    paths.push(("auto".into(), Exec::auto()));
    for (path, exec) in paths {
        pool.install(|| {
            check_groups(
                AdamWConfig { weight_decay: 0.1, ..Default::default() },
                AdamWConfig { weight_decay: 0.0, lr: 3e-3, ..Default::default() },
                exec,
                &format!("adamw {path}"),
            );
            check_groups(
                NAdamConfig { momentum_decay: 0.01, ..Default::default() },
                NAdamConfig { lr: 1e-2, ..Default::default() },
                exec,
                &format!("nadam {path}"),
            );
            check_groups(
                SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() },
                SgdConfig { lr: 0.01, momentum: 0.5, nesterov: true, ..Default::default() },
                exec,
                &format!("sgd {path}"),
            );
            check_groups(
                AdagradConfig { initial_accumulator_value: 0.1, ..Default::default() },
                AdagradConfig { lr_decay: 0.01, ..Default::default() },
                exec,
                &format!("adagrad {path}"),
            );
            // Groups with different state buffers, as torch allows; the
            // second order adds a buffer after tensors exist.
            let ams = AdamConfig { amsgrad: true, lr: 1e-2, ..Default::default() };
            check_groups(ams, AdamConfig::default(), exec, &format!("adam amsgrad+plain {path}"));
            check_groups(AdamConfig::default(), ams, exec, &format!("adam plain+amsgrad {path}"));
            let centered = RmsPropConfig { centered: true, momentum: 0.9, ..Default::default() };
            check_groups(RmsPropConfig::default(), centered, exec, &format!("rmsprop plain+centered {path}"));
            let only_centered = RmsPropConfig { centered: true, ..Default::default() };
            let only_momentum = RmsPropConfig { momentum: 0.5, ..Default::default() };
            check_groups(only_centered, only_momentum, exec, &format!("rmsprop centered+momentum {path}"));
            let plain_sgd = SgdConfig { lr: 0.1, ..Default::default() };
            check_groups(
                plain_sgd,
                SgdConfig { momentum: 0.9, ..plain_sgd },
                exec,
                &format!("sgd plain+momentum {path}"),
            );
        });
    }
}

#[test]
fn group_hyperparameters_stay_in_their_group() {
    let mut opt = GroupedOptimizer::new();
    let a = opt.add_group(SgdConfig { lr: 1.0, ..Default::default() }, &[8]).unwrap();
    let b = opt.add_group(SgdConfig { lr: 0.0, ..Default::default() }, &[8]).unwrap();
    opt.grads_mut(a[0]).unwrap().fill(1.0);
    opt.grads_mut(b[0]).unwrap().fill(1.0);
    opt.step().unwrap();
    assert!(opt.params(a[0]).unwrap().iter().all(|&x| x == -1.0));
    assert!(opt.params(b[0]).unwrap().iter().all(|&x| x == 0.0));
    opt.set_group_config(1, SgdConfig { lr: 0.5, ..Default::default() }).unwrap();
    opt.step().unwrap();
    assert!(opt.params(a[0]).unwrap().iter().all(|&x| x == -2.0));
    assert!(opt.params(b[0]).unwrap().iter().all(|&x| x == -0.5));
}

#[test]
fn shards_equal_the_unsharded_step() {
    let mut rng = Rng::new(22);
    let build = || {
        let mut o = GroupedOptimizer::new();
        o.add_group(AdamConfig { weight_decay: 0.01, ..Default::default() }, &SIZES_A).unwrap();
        o.add_group(AdamConfig::default(), &SIZES_B).unwrap();
        o
    };
    let mut whole = build();
    let total = whole.total_len();
    let p0 = rng.vec(total, 1.0);
    whole.params_flat_mut().copy_from_slice(&p0);
    let mut shards: Vec<GroupedOptimizer<AdamConfig>> = (0..3).map(|_| build()).collect();
    for s in &mut shards {
        s.params_flat_mut().copy_from_slice(&p0);
    }
    for _ in 0..3 {
        let g = rng.vec(total, 1.0);
        whole.grads_flat_mut().copy_from_slice(&g);
        whole.step().unwrap();
        for (w, s) in shards.iter_mut().enumerate() {
            s.grads_flat_mut().copy_from_slice(&g);
            s.step_range(shard_range(total, w, 3)).unwrap();
        }
    }
    let mut gathered = vec![0.0f32; total];
    for (w, s) in shards.iter().enumerate() {
        let r = shard_range(total, w, 3);
        gathered[r.clone()].copy_from_slice(&s.params_flat()[r]);
    }
    assert_same_bits("sharded", &gathered, whole.params_flat());
    assert_eq!(shard_range(total, 2, 3).end, total);
}

#[test]
fn group_schedules_and_errors() {
    let mut opt = GroupedOptimizer::new();
    let a = opt.add_group(AdamConfig::default(), &[10]).unwrap();
    let _b = opt.add_group(AdamConfig::default(), &[10]).unwrap();
    let cos: Schedule = CosineAnnealingLR::new(0.1, 10, 0.0).unwrap().into();
    opt.set_group_schedule(0, Some(cos.clone())).unwrap();
    for t in 0..5 {
        opt.grads_mut(a[0]).unwrap().fill(1.0);
        opt.step().unwrap();
        use adaoptim::schedule::LrSchedule;
        assert_eq!(opt.group_config(0).unwrap().lr, cos.lr_at(t));
        assert_eq!(opt.group_config(1).unwrap().lr, 1e-3, "the other group keeps its rate");
    }
    // A group cannot change its state layout; a range past the arena is refused.
    let e = opt.set_group_config(1, AdamConfig { amsgrad: true, ..Default::default() }).unwrap_err();
    assert!(matches!(e, Error::IncompatibleConfig { .. }));
    assert!(!opt.group_config(1).unwrap().amsgrad);
    let before = opt.params_flat().to_vec();
    assert!(opt.step_range(0..opt.total_len() + 1).is_err());
    assert_eq!(opt.params_flat(), &before[..]);
    assert_eq!(opt.step_count(), 5);
    assert!(opt.set_group_schedule(7, None).is_err());
}

#[test]
fn group_skip_step_and_grad_scale() {
    let mut rng = Rng::new(23);
    let build = || {
        let mut o = GroupedOptimizer::new();
        let mut ids = o.add_group(AdamConfig::default(), &[300, 5]).unwrap();
        ids.extend(o.add_group(AdamConfig { lr: 0.1, ..Default::default() }, &[77]).unwrap());
        (o, ids)
    };
    let (mut a, ids) = build();
    let (mut b, ids_b) = build();
    let p0 = rng.vec(a.total_len(), 1.0);
    a.params_flat_mut().copy_from_slice(&p0);
    b.params_flat_mut().copy_from_slice(&p0);
    a.set_grad_scale(Some(1024.0)).unwrap();
    a.set_non_finite(NonFinitePolicy::SkipStep);
    for _ in 0..3 {
        for (&id, &id_b) in ids.iter().zip(&ids_b) {
            let g = rng.vec(a.params(id).unwrap().len(), 100.0);
            let scaled: Vec<f32> = g.iter().map(|x| x / 1024.0).collect();
            a.grads_mut(id).unwrap().copy_from_slice(&g);
            b.grads_mut(id_b).unwrap().copy_from_slice(&scaled);
        }
        assert!(!a.step().unwrap().skipped);
        b.step().unwrap();
    }
    for (&id, &id_b) in ids.iter().zip(&ids_b) {
        assert_same_bits("grad_scale in groups", a.params(id).unwrap(), b.params(id_b).unwrap());
    }
    // A NaN in the last group's tensor: nothing changes, the step count included.
    let before: Vec<Vec<f32>> = ids.iter().map(|&id| a.params(id).unwrap().to_vec()).collect();
    a.grads_mut(ids[2]).unwrap()[10] = f32::NAN;
    assert!(a.step().unwrap().skipped);
    assert_eq!(a.step_count(), 3);
    for (k, &id) in ids.iter().enumerate() {
        assert_eq!(a.params(id).unwrap(), &before[k][..]);
    }
    a.set_non_finite(NonFinitePolicy::Error);
    assert!(matches!(a.step(), Err(Error::NonFiniteGradient { .. })));
    assert!(a.set_grad_scale(Some(0.0)).is_err());
}

/// Clipping over a grouped model: the global norm over every tensor, the
/// factor applied to each, equal to each tensor stepped alone on gradients
/// clipped by hand; on every path.
#[test]
fn group_clipping_equals_clipping_each_tensor_by_hand() {
    let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    for (path, exec) in all_paths() {
        let mut rng = Rng::new(33);
        let mut opt = GroupedOptimizer::new();
        opt.set_exec(exec);
        opt.set_max_grad_norm(Some(0.5)).unwrap();
        let ids: Vec<TensorId> =
            [opt.add_group(cfg, &SIZES_A).unwrap(), opt.add_group(cfg, &SIZES_B).unwrap()].concat();
        let mut lone: Vec<(AdamW, Vec<f32>)> = Vec::new();
        for &id in &ids {
            let p = rng.vec(opt.params(id).unwrap().len(), 1.0);
            opt.params_mut(id).unwrap().copy_from_slice(&p);
            lone.push((AdamW::new(cfg, p.len()).unwrap(), p));
        }
        for step in 0..3 {
            let grads: Vec<Vec<f32>> = ids
                .iter()
                .map(|&id| rng.vec(opt.params(id).unwrap().len(), if step == 1 { 1e-5 } else { 1.0 }))
                .collect();
            for (&id, g) in ids.iter().zip(&grads) {
                opt.grads_mut(id).unwrap().copy_from_slice(g);
            }
            opt.step().unwrap();
            let norm = opt.last_grad_norm().unwrap();
            let plain = grads.iter().flatten().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
            assert!((norm - plain).abs() <= 1e-12 * plain, "{path}: {norm} vs {plain}");
            let coef = adaoptim::clip::clip_coef(norm, 0.5);
            assert_eq!(coef == 1.0, step == 1, "{path}: the tiny step is not clipped, the others are");
            for ((o, p), g) in lone.iter_mut().zip(&grads) {
                let clipped: Vec<f32> = g.iter().map(|&x| if coef == 1.0 { x } else { x * coef }).collect();
                o.step(p, &clipped).unwrap();
            }
        }
        for (k, &id) in ids.iter().enumerate() {
            assert_same_bits(&format!("{path} tensor {k}"), opt.params(id).unwrap(), &lone[k].1);
        }
    }
}

/// Sharded clipping: each worker's partial sum of squares, all-reduced, gives
/// the global norm; shards stepped with it equal the unsharded clipped step.
/// A partial `step_range` under clipping is refused; a NaN global norm makes
/// every shard skip (SkipStep) or fail (Error) without changing anything.
#[test]
fn sharded_clipping() {
    let build = || {
        let mut rng = Rng::new(5);
        let mut opt = GroupedOptimizer::new();
        opt.set_max_grad_norm(Some(1.0)).unwrap();
        opt.add_group(AdamConfig::default(), &[3000, 17, 0, 40_000]).unwrap();
        let n = opt.total_len();
        opt.params_flat_mut().copy_from_slice(&rng.vec(n, 1.0));
        opt
    };
    let mut full = build();
    let workers = 3;
    let mut shards: Vec<_> = (0..workers).map(|_| build()).collect();
    let n = full.total_len();
    let mut rng = Rng::new(9);
    for _ in 0..3 {
        let g = rng.vec(n, 1.0);
        full.grads_flat_mut().copy_from_slice(&g);
        shards.iter_mut().for_each(|s| s.grads_flat_mut().copy_from_slice(&g));
        full.step().unwrap();
        let partial: f64 =
            (0..workers).map(|w| shards[w].grad_sum_of_squares(shard_range(n, w, workers)).unwrap()).sum();
        let whole = full.grad_sum_of_squares(0..n).unwrap();
        assert!((partial - whole).abs() <= 1e-12 * whole);
        assert_eq!(full.last_grad_norm().unwrap().to_bits(), whole.sqrt().to_bits());
        for (w, s) in shards.iter_mut().enumerate() {
            s.step_range_with_grad_norm(shard_range(n, w, workers), whole.sqrt()).unwrap();
        }
    }
    for (w, s) in shards.iter().enumerate() {
        let r = shard_range(n, w, workers);
        assert_same_bits(&format!("shard {w}"), &s.params_flat()[r.clone()], &full.params_flat()[r]);
    }
    // Refusals and non-finite global norms change nothing.
    let s = &mut shards[1];
    let before = (s.params_flat().to_vec(), s.step_count());
    let r = shard_range(n, 1, workers);
    assert!(matches!(s.step_range(r.clone()), Err(Error::IncompatibleConfig { .. })));
    s.set_non_finite(NonFinitePolicy::SkipStep);
    assert!(s.step_range_with_grad_norm(r.clone(), f64::NAN).unwrap().skipped);
    assert!(s.last_grad_norm().unwrap().is_nan());
    s.set_non_finite(NonFinitePolicy::Error);
    let e = s.step_range_with_grad_norm(r.clone(), f64::INFINITY).unwrap_err();
    assert!(matches!(e, Error::NonFiniteGradNorm { norm } if norm == f64::INFINITY), "{e:?}");
    assert_eq!((s.params_flat().to_vec(), s.step_count()), before);
    let mut plain = GroupedOptimizer::<AdamConfig>::new();
    plain.add_group(AdamConfig::default(), &[8]).unwrap();
    assert!(matches!(plain.step_range_with_grad_norm(0..8, 1.0), Err(Error::IncompatibleConfig { .. })));
}

#[test]
fn tensor_ids_follow_torch_state_dict_order() {
    let mut opt = GroupedOptimizer::<AdamConfig>::new();
    let a = opt.add_group(AdamConfig::default(), &[3, 5]).unwrap();
    let b = opt.add_group(AdamConfig { lr: 0.1, ..Default::default() }, &[2]).unwrap();
    let ids: Vec<_> = a.into_iter().chain(b).collect();
    for (k, id) in ids.iter().enumerate() {
        assert_eq!(opt.tensor_id(k), Some(*id));
        assert_eq!(id.index(), k);
    }
    assert_eq!(opt.tensor_id(3), None);
    // and after a round trip through a checkpoint, the same index finds the same tensor
    opt.params_mut(ids[1]).unwrap().copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
    let loaded = GroupedOptimizer::<AdamConfig>::from_safetensors(&opt.to_safetensors().unwrap()).unwrap();
    assert_eq!(loaded.params(loaded.tensor_id(1).unwrap()).unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0]);
}
