//! One AdamW step over 25M parameters in 4 tensors on burn's ndarray CPU
//! backend, alternated in rounds: the adapter through burn's
//! `ModuleOptimizer`, burn's own AdamW, and adaoptim on raw slices. Prints
//! each one's median time and the ratios of medians (what the README
//! quotes; absolute times on a shared machine drift).
//!
//! `cargo run --release -p adaoptim-burn --example speed [-- ROUNDS]`

use std::time::Instant;

use adaoptim_burn::AdamWConfig;
use burn::module::{Module, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};

/// 25.2M parameters in 4 tensors, as a transformer block's largest ones.
#[derive(Module, Debug)]
struct Block {
    a: Param<Tensor<2>>,
    b: Param<Tensor<2>>,
    c: Param<Tensor<2>>,
    d: Param<Tensor<1>>,
}

fn block(dev: &Device) -> Block {
    Block {
        a: Param::from_tensor(Tensor::ones([4096, 4096], dev)),
        b: Param::from_tensor(Tensor::ones([4096, 1024], dev)),
        c: Param::from_tensor(Tensor::ones([1024, 4096], dev)),
        d: Param::from_tensor(Tensor::ones([4096], dev)),
    }
}

/// A gradient of 0.001 for every parameter (fresh tensors, as backprop
/// hands over).
fn grads(m: &Block, dev: &Device) -> GradientsParams {
    let mut g = GradientsParams::new();
    g.register(m.a.id, Tensor::<2>::full([4096, 4096], 1e-3, dev));
    g.register(m.b.id, Tensor::<2>::full([4096, 1024], 1e-3, dev));
    g.register(m.c.id, Tensor::<2>::full([1024, 4096], 1e-3, dev));
    g.register(m.d.id, Tensor::<1>::full([4096], 1e-3, dev));
    g
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(7);
    let dev = Device::default().autodiff();
    let config = AdamWConfig { lr: 1e-4, eps: 1e-8, weight_decay: 0.01, ..Default::default() };
    let mut ours: ModuleOptimizer = adaoptim_burn::AdamW::new(config).into();
    let mut theirs = burn::optim::AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.01).init();
    let (mut ma, mut mb) = (Some(block(&dev)), Some(block(&dev)));
    let sizes = [4096 * 4096, 4096 * 1024, 1024 * 4096, 4096];
    let n: usize = sizes.iter().sum();
    let mut raw = adaoptim::multi::MultiOptimizer::new();
    raw.add_group(config, &sizes).unwrap();
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&k| vec![1.0; k]).collect();
    let g_raw: Vec<Vec<f32>> = sizes.iter().map(|&k| vec![1e-3; k]).collect();
    let (mut t_ours, mut t_theirs, mut t_raw, mut t_grads, mut t_drop) = (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..=rounds {
        // Making the gradients is timed apart: it is the same for both.
        let t = Instant::now();
        let ga = grads(ma.as_ref().unwrap(), &dev);
        let tg = t.elapsed().as_secs_f64();
        let t = Instant::now();
        ma = Some(ours.step(1e-4, ma.take().unwrap(), ga));
        let a = t.elapsed().as_secs_f64();
        let gb = grads(mb.as_ref().unwrap(), &dev);
        let t = Instant::now();
        mb = Some(theirs.step(1e-4, mb.take().unwrap(), gb));
        let b = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut steps: Vec<adaoptim::multi::TensorStep<'_>> =
            params.iter_mut().zip(&g_raw).map(|(p, g)| adaoptim::multi::TensorStep::new(p, Some(g))).collect();
        raw.step(&mut steps).unwrap();
        let c = t.elapsed().as_secs_f64();
        // What burn's step also does with the gradients it consumes: free them.
        let gd = grads(ma.as_ref().unwrap(), &dev);
        let t = Instant::now();
        drop(gd);
        let d = t.elapsed().as_secs_f64();
        if round > 0 {
            t_drop.push(d);
            t_ours.push(a);
            t_theirs.push(b);
            t_raw.push(c);
            t_grads.push(tg);
        }
    }
    let (a, b, c, g) = (median(&mut t_ours), median(&mut t_theirs), median(&mut t_raw), median(&mut t_grads));
    println!("AdamW step, {n} parameters in 4 tensors, burn 0.22.1 (ndarray), median of {rounds} alternated rounds:");
    println!("  adaoptim-burn      {:8.2} ms  {:.3} Gparam/s", a * 1e3, n as f64 / a / 1e9);
    println!("  burn AdamW         {:8.2} ms  {:.3} Gparam/s", b * 1e3, n as f64 / b / 1e9);
    println!("  raw slices         {:8.2} ms  {:.3} Gparam/s", c * 1e3, n as f64 / c / 1e9);
    println!("  (making the gradients, untimed above: {:.2} ms)", g * 1e3);
    println!("  freeing the gradients (part of both burn steps): {:.2} ms", median(&mut t_drop) * 1e3);
    println!("  adapter vs burn's AdamW: {:.1}x faster; adapter / raw slices: {:.2}", b / a, a / c);
}
