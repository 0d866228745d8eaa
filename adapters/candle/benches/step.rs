//! One AdamW step over 25M parameters in 4 Vars: the adapter, candle's own
//! `candle_nn::AdamW`, and adaoptim on raw slices (the same sizes as plain
//! `Vec<f32>`s), in one run.
//!
//! `cargo bench -p adaoptim-candle` (the global rayon pool; set
//! `RAYON_NUM_THREADS` to change it). For ratios from alternated rounds, run
//! the `speed` example.

use std::hint::black_box;
use std::time::Duration;

use adaoptim::multi::{MultiOptimizer, TensorStep};
use adaoptim_candle::AdamWConfig;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// 25.2M parameters in 4 tensors, as a transformer block's largest ones.
pub const SHAPES: [&[usize]; 4] = [&[4096, 4096], &[4096, 1024], &[1024, 4096], &[4096]];

fn bench(c: &mut Criterion) {
    let dev = &Device::Cpu;
    let vars: Vec<Var> = SHAPES.iter().map(|s| Var::ones(*s, candle_core::DType::F32, dev).unwrap()).collect();
    let theirs: Vec<Var> = SHAPES.iter().map(|s| Var::ones(*s, candle_core::DType::F32, dev).unwrap()).collect();
    // A GradStore from candle's backprop: the gradient of sum(0.001 * v) is 0.001 everywhere.
    let grads_of = |vs: &[Var]| {
        let mut loss = Tensor::new(0f32, dev).unwrap();
        for v in vs {
            loss = (loss + (v.as_tensor() * 1e-3).unwrap().sum_all().unwrap()).unwrap();
        }
        loss.backward().unwrap()
    };
    let (g_ours, g_theirs) = (grads_of(&vars), grads_of(&theirs));
    let n: usize = SHAPES.iter().map(|s| s.iter().product::<usize>()).sum();
    let config = AdamWConfig { lr: 1e-4, ..Default::default() };
    let mut ours = adaoptim_candle::AdamW::new(vars, config).unwrap();
    let mut cn = candle_nn::AdamW::new(theirs, candle_nn::ParamsAdamW { lr: 1e-4, ..Default::default() }).unwrap();
    let sizes: Vec<usize> = SHAPES.iter().map(|s| s.iter().product()).collect();
    let mut raw = MultiOptimizer::new();
    raw.add_group(config, &sizes).unwrap();
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&k| vec![1.0; k]).collect();
    let grads: Vec<Vec<f32>> = sizes.iter().map(|&k| vec![1e-3; k]).collect();

    let mut g = c.benchmark_group("adamw_25M_4vars");
    g.throughput(Throughput::Elements(n as u64)).sample_size(10).measurement_time(Duration::from_secs(8));
    g.bench_function("adaoptim-candle", |b| b.iter(|| ours.step(black_box(&g_ours)).unwrap()));
    g.bench_function("raw-slices", |b| {
        b.iter(|| {
            let mut steps: Vec<TensorStep<'_>> =
                params.iter_mut().zip(&grads).map(|(p, g)| TensorStep::new(p, Some(g))).collect();
            raw.step(black_box(&mut steps)).unwrap()
        })
    });
    g.bench_function("candle_nn-AdamW", |b| b.iter(|| cn.step(black_box(&g_theirs)).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
