//! `GroupedOptimizer` layouts: arbitrary groups (mixed AMSGrad, so groups
//! keep different state buffers), tensor sizes (zero, odd, impossible),
//! chunk sizes and shards. An impossible `add_group` is a typed error that
//! leaves the layout as it was; stepping the arena, whole or as two shards,
//! gives each tensor the bits a lone scalar `Optimizer` gives it.
#![no_main]

use adaoptim::groups::{GroupedOptimizer, TensorId, shard_range};
use adaoptim::{AdamConfig, Backend, Error, Exec, Optimizer};
use arbitrary::Arbitrary;
use libfuzzer_sys::{Corpus, fuzz_target};

#[derive(Arbitrary, Debug)]
struct Group {
    lr: u8,
    weight_decay: u8,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    sizes: Vec<u16>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    groups: Vec<Group>,
    chunk: u16,
    split: u16,
    steps: u8,
    values: Vec<u32>,
}

fn config(g: &Group) -> AdamConfig {
    AdamConfig {
        lr: [1e-3, 0.1, 0.0, 1.0][g.lr as usize % 4],
        weight_decay: [0.0, 0.01, 0.5][g.weight_decay as usize % 3],
        amsgrad: g.amsgrad,
        maximize: g.maximize,
        decoupled_weight_decay: g.decoupled,
        ..Default::default()
    }
}

fuzz_target!(|input: Input| -> Corpus {
    if input.values.is_empty() || input.groups.is_empty() {
        return Corpus::Reject;
    }
    let val = |i: usize| {
        let x = f32::from_bits(input.values[i % input.values.len()]);
        if x.is_finite() { x } else { 0.5 }
    };
    let steps = 1 + input.steps as usize % 3;
    let build = |exec: Exec| {
        let mut opt = GroupedOptimizer::new();
        opt.set_exec(exec);
        let mut all: Vec<(TensorId, AdamConfig)> = Vec::new();
        for g in input.groups.iter().take(6) {
            // A size of 0xFFFF stands for an impossible one.
            let sizes: Vec<usize> =
                g.sizes.iter().take(5).map(|&s| if s == 0xFFFF { usize::MAX - 3 } else { s as usize % 90 }).collect();
            let before = (opt.total_len(), opt.num_tensors());
            match opt.add_group(config(g), &sizes) {
                Ok(ids) => all.extend(ids.into_iter().map(|id| (id, config(g)))),
                Err(e) => {
                    assert!(matches!(e, Error::TooLarge { .. }), "unexpected {e:?}");
                    assert!(sizes.contains(&(usize::MAX - 3)));
                    assert_eq!((opt.total_len(), opt.num_tensors()), before, "a failed add_group changed the layout");
                }
            }
        }
        (opt, all)
    };
    let (mut whole, all) = build(Exec::parallel(Backend::best(), input.chunk as usize % 300));
    let mut lone: Vec<(Optimizer<AdamConfig>, Vec<f32>)> = Vec::new();
    for (k, &(id, cfg)) in all.iter().enumerate() {
        let n = whole.params(id).unwrap().len();
        let p: Vec<f32> = (0..n).map(|i| val(i * 3 + k)).collect();
        whole.params_mut(id).unwrap().copy_from_slice(&p);
        lone.push((Optimizer::new(cfg, n).unwrap().with_exec(Exec::scalar()), p));
    }
    // Two ranks of a sharded run: same layout (clones share their ids),
    // each steps its half, then the parameters are all-gathered.
    let mut rank0 = whole.clone();
    rank0.set_exec(Exec::serial(Backend::best()));
    let mut rank1 = rank0.clone();
    let total = whole.total_len();
    let cut = shard_range(total, 0, 2).end.min(input.split as usize % (total + 1));
    for s in 0..steps {
        for (k, &(id, _)) in all.iter().enumerate() {
            let n = lone[k].1.len();
            let g: Vec<f32> = (0..n).map(|i| val(i * 7 + s * 13 + k + 1)).collect();
            whole.grads_mut(id).unwrap().copy_from_slice(&g);
            rank0.grads_mut(id).unwrap().copy_from_slice(&g);
            rank1.grads_mut(id).unwrap().copy_from_slice(&g);
            let (o, p) = &mut lone[k];
            o.step(p, &g).unwrap();
        }
        whole.step().unwrap();
        rank0.step_range(0..cut).unwrap();
        rank1.step_range(cut..total).unwrap();
        let upper = rank1.params_flat()[cut..].to_vec();
        rank0.params_flat_mut()[cut..].copy_from_slice(&upper);
        let lower = rank0.params_flat()[..cut].to_vec();
        rank1.params_flat_mut()[..cut].copy_from_slice(&lower);
    }
    assert_eq!((rank0.step_count(), rank1.step_count()), (whole.step_count(), whole.step_count()));
    for (k, &(id, _)) in all.iter().enumerate() {
        let want = &lone[k].1;
        let same =
            |x: &[f32]| x.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        assert!(same(whole.params(id).unwrap()), "tensor {k}: grouped step differs from the lone optimizer");
        assert!(same(rank0.params(id).unwrap()), "tensor {k}: sharded step differs from the lone optimizer");
        assert!(same(rank1.params(id).unwrap()), "tensor {k}: sharded step differs (rank 1)");
    }
    Corpus::Keep
});
