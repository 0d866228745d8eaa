//! Trains an MLP classifier (64 -> 64 -> 10, ReLU) on the handwritten
//! digits in `adapters/data/digits.csv` (see its README) twice from the same
//! initialization on burn's ndarray backend: with `adaoptim_burn::AdamW`
//! and with burn's own AdamW (same hyperparameters), full batch, and prints
//! both loss curves, their largest relative difference and both test
//! accuracies. Fixed pseudo-random initial weights: every run prints the
//! same numbers.
//!
//! `cargo run --release -p adaoptim-burn --example digits [-- STEPS]`
//! (default 120 steps). The curves agree to about 1e-5 for the first
//! ~20 steps, then part by up to 7e-4 relative (same test accuracy). burn's
//! AdamW holds its hyperparameters in `f32` and computes the bias
//! corrections `1 - beta^t` in `f32`, where cancellation costs up to 5e-6
//! relative (numpy, t <= 120); adaoptim, like torch and candle, computes
//! them in `f64` (against candle_nn's AdamW the curves agree to 7e-7), and
//! stays nearer an f64 evaluation of the formula than burn's AdamW (test
//! `adaoptim_is_nearer_the_f64_formula_than_burns_adamw`). A
//! third run gives adaoptim burn's f32-rounded `betas` and `eps`, to show
//! that rounding the hyperparameters alone does not explain the gap.

use adaoptim_burn::AdamWConfig;
use burn::module::{Module, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};

const LR: f64 = 1e-2;

#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(burn::tensor::activation::relu(self.fc1.forward(x)))
    }
}

/// Uniform in +-1/sqrt(fan_in) (burn's and torch's default range) from a
/// fixed 64-bit LCG.
fn init(m: Mlp, dev: &Device) -> Mlp {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut draw = |n: usize, fan_in: usize| -> Vec<f32> {
        let bound = 1.0 / (fan_in as f32).sqrt();
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect()
    };
    let mut layer = |l: Linear| -> Linear {
        let [fan_in, out] = l.weight.val().dims();
        let w = draw(fan_in * out, fan_in);
        let b = draw(out, fan_in);
        Linear {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [fan_in, out]), dev)),
            bias: Some(Param::from_tensor(Tensor::from_data(TensorData::new(b, [out]), dev))),
        }
    };
    Mlp { fc1: layer(m.fc1), fc2: layer(m.fc2) }
}

struct Data {
    train: (Tensor<2>, Tensor<1, Int>),
    test: (Tensor<2>, Tensor<1, Int>),
}

fn load(dev: &Device) -> Data {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/digits.csv");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let (mut trx, mut tr_y, mut tex, mut te_y) = (vec![], vec![], vec![], vec![]);
    for (i, line) in text.lines().enumerate() {
        let v: Vec<i64> = line.split(',').map(|s| s.trim().parse().unwrap_or(0)).collect();
        let (x, y) = (v[..64].iter().map(|&p| p as f32 / 16.0), v[64]);
        if i % 6 == 0 {
            tex.extend(x);
            te_y.push(y);
        } else {
            trx.extend(x);
            tr_y.push(y);
        }
    }
    let (ntr, nte) = (tr_y.len(), te_y.len());
    Data {
        train: (
            Tensor::from_data(TensorData::new(trx, [ntr, 64]), dev),
            Tensor::from_data(TensorData::new(tr_y, [ntr]), dev),
        ),
        test: (
            Tensor::from_data(TensorData::new(tex, [nte, 64]), dev),
            Tensor::from_data(TensorData::new(te_y, [nte]), dev),
        ),
    }
}

fn train(data: &Data, mut model: Mlp, optim: &mut ModuleOptimizer, steps: usize, dev: &Device) -> (Mlp, Vec<f32>) {
    let ce = CrossEntropyLossConfig::new().init(dev);
    let mut curve = Vec::with_capacity(steps);
    for _ in 0..steps {
        let loss = ce.forward(model.forward(data.train.0.clone()), data.train.1.clone());
        curve.push(loss.clone().into_data().as_slice::<f32>().map(|s| s[0]).unwrap_or(f32::NAN));
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(LR, model, grads);
    }
    (model, curve)
}

fn accuracy(model: &Mlp, (x, y): &(Tensor<2>, Tensor<1, Int>)) -> f32 {
    let pred = model.forward(x.clone()).argmax(1).flatten::<1>(0, 1);
    let right = pred.equal(y.clone()).int().sum().into_scalar::<i64>() as f32;
    right / y.dims()[0] as f32
}

fn main() {
    let dev = Device::default().autodiff();
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(120);
    let data = load(&dev);
    let model =
        init(Mlp { fc1: LinearConfig::new(64, 64).init(&dev), fc2: LinearConfig::new(64, 10).init(&dev) }, &dev);

    // With the adapter: this line is all that changes in a burn program.
    let mut ours: ModuleOptimizer =
        adaoptim_burn::AdamW::new(AdamWConfig { eps: 1e-8, weight_decay: 0.01, ..Default::default() }).into();
    let mut theirs = burn::optim::AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.01).init();
    let t = std::time::Instant::now();
    let (m_ours, c_ours) = train(&data, model.clone(), &mut ours, steps, &dev);
    let t_ours = t.elapsed();
    let t = std::time::Instant::now();
    let (m_theirs, c_theirs) = train(&data, model.clone(), &mut theirs, steps, &dev);
    let t_theirs = t.elapsed();
    // adaoptim with burn's hyperparameters as burn holds them (f32).
    let f32_rounded = AdamWConfig {
        betas: (0.9f32 as f64, 0.999f32 as f64),
        eps: 1e-8f32 as f64,
        weight_decay: 0.01f32 as f64,
        ..Default::default()
    };
    let mut rounded: ModuleOptimizer = adaoptim_burn::AdamW::new(f32_rounded).into();
    let (_, c_rounded) = train(&data, model, &mut rounded, steps, &dev);

    println!("step  loss (adaoptim-burn)  loss (burn AdamW)");
    for s in (0..steps).step_by(20).chain([steps - 1]) {
        println!("{s:4}  {:.7}            {:.7}", c_ours[s], c_theirs[s]);
    }
    let worst = c_ours.iter().zip(&c_theirs).map(|(a, b)| ((a - b) / b).abs()).fold(0f32, f32::max);
    let first_above = c_ours.iter().zip(&c_theirs).position(|(a, b)| ((a - b) / b).abs() > 1e-5);
    println!("largest relative difference of the loss curves: {worst:.2e} (first above 1e-5 at step {first_above:?})");
    let worst_rounded = c_rounded.iter().zip(&c_theirs).map(|(a, b)| ((a - b) / b).abs()).fold(0f32, f32::max);
    println!("  with burn's f32-rounded betas and eps in adaoptim: {worst_rounded:.2e}");
    println!(
        "test accuracy: adaoptim-burn {:.2}%, burn AdamW {:.2}% ({} test images)",
        100.0 * accuracy(&m_ours, &data.test),
        100.0 * accuracy(&m_theirs, &data.test),
        data.test.1.dims()[0]
    );
    println!("training time (forward, backward and step; {steps} steps): {t_ours:.2?} vs {t_theirs:.2?}");
}
