//! One AdamW step over 25M parameters in 4 tensors on burn's ndarray
//! backend: the adapter through burn's `ModuleOptimizer`, burn's own AdamW,
//! and adaoptim on raw slices, in one run. Making the (consumed) gradients
//! is criterion's untimed setup.
//!
//! `cargo bench -p adaoptim-burn`. For ratios from alternated rounds, run
//! the `speed` example.

use std::cell::RefCell;
use std::hint::black_box;
use std::time::Duration;

use adaoptim::multi::{MultiOptimizer, TensorStep};
use adaoptim_burn::AdamWConfig;
use burn::module::{Module, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

#[derive(Module, Debug)]
struct Block {
    a: Param<Tensor<2>>,
    b: Param<Tensor<2>>,
    c: Param<Tensor<2>>,
    d: Param<Tensor<1>>,
}

const SIZES: [usize; 4] = [4096 * 4096, 4096 * 1024, 1024 * 4096, 4096];

fn block(dev: &Device) -> Block {
    Block {
        a: Param::from_tensor(Tensor::ones([4096, 4096], dev)),
        b: Param::from_tensor(Tensor::ones([4096, 1024], dev)),
        c: Param::from_tensor(Tensor::ones([1024, 4096], dev)),
        d: Param::from_tensor(Tensor::ones([4096], dev)),
    }
}

fn grads(m: &Block, dev: &Device) -> GradientsParams {
    let mut g = GradientsParams::new();
    g.register(m.a.id, Tensor::<2>::full([4096, 4096], 1e-3, dev));
    g.register(m.b.id, Tensor::<2>::full([4096, 1024], 1e-3, dev));
    g.register(m.c.id, Tensor::<2>::full([1024, 4096], 1e-3, dev));
    g.register(m.d.id, Tensor::<1>::full([4096], 1e-3, dev));
    g
}

fn bench(c: &mut Criterion) {
    let dev = Device::default().autodiff();
    let config = AdamWConfig { lr: 1e-4, eps: 1e-8, weight_decay: 0.01, ..Default::default() };
    let mut g = c.benchmark_group("adamw_25M_4tensors");
    g.throughput(Throughput::Elements(SIZES.iter().sum::<usize>() as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let mut run = |name: &str, mut optim: ModuleOptimizer| {
        let model = RefCell::new(Some(block(&dev)));
        g.bench_function(name, |b| {
            b.iter_batched(
                || grads(model.borrow().as_ref().unwrap(), &dev),
                |gr| {
                    let m = model.borrow_mut().take().unwrap();
                    *model.borrow_mut() = Some(optim.step(1e-4, m, black_box(gr)));
                },
                BatchSize::PerIteration,
            )
        });
    };
    run("adaoptim-burn", adaoptim_burn::AdamW::new(config).into());
    run("burn-AdamW", burn::optim::AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.01).init());
    let mut raw = MultiOptimizer::new();
    raw.add_group(config, &SIZES).unwrap();
    let mut params: Vec<Vec<f32>> = SIZES.iter().map(|&k| vec![1.0; k]).collect();
    let gs: Vec<Vec<f32>> = SIZES.iter().map(|&k| vec![1e-3; k]).collect();
    g.bench_function("raw-slices", |b| {
        b.iter(|| {
            let mut steps: Vec<TensorStep<'_>> =
                params.iter_mut().zip(&gs).map(|(p, g)| TensorStep::new(p, Some(g))).collect();
            raw.step(black_box(&mut steps)).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
