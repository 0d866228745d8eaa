//! Trains an MLP classifier (64 -> 64 -> 10, ReLU) on the handwritten
//! digits in `adapters/data/digits.csv` (see its README) twice from the same
//! initialization: with `adaoptim_candle::AdamW` and with candle's own
//! `candle_nn::AdamW`, full batch, and prints both loss curves, their
//! largest relative difference and both test accuracies. The weights start
//! from a fixed pseudo-random initialization (candle's own initializer is
//! not seeded), so every run prints the same numbers.
//!
//! `cargo run --release -p adaoptim-candle --example digits [-- STEPS]`
//! (default 120 steps). The two optimizers round differently (adaoptim
//! evaluates torch's formula, candle its own), by about an ulp per step;
//! training amplifies such differences, and past about 150 steps at this
//! learning rate the curves drift apart by more than 1e-5 relative.

use adaoptim_candle::AdamWConfig;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap, linear, loss, ops};

const LR: f64 = 1e-2;

struct Data {
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
}

fn load() -> Result<Data> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/digits.csv");
    let text = std::fs::read_to_string(path).map_err(|e| candle_core::Error::msg(format!("{path}: {e}")))?;
    let (mut trx, mut tr_y, mut tex, mut te_y) = (vec![], vec![], vec![], vec![]);
    for (i, line) in text.lines().enumerate() {
        let v: Vec<u32> = line.split(',').map(|s| s.trim().parse().unwrap_or(0)).collect();
        let (x, y) = (v[..64].iter().map(|&p| p as f32 / 16.0), v[64]);
        if i % 6 == 0 {
            tex.extend(x);
            te_y.push(y);
        } else {
            trx.extend(x);
            tr_y.push(y);
        }
    }
    let dev = &Device::Cpu;
    Ok(Data {
        train_x: Tensor::from_vec(trx, (tr_y.len(), 64), dev)?,
        train_y: Tensor::new(tr_y.as_slice(), dev)?,
        test_x: Tensor::from_vec(tex, (te_y.len(), 64), dev)?,
        test_y: Tensor::new(te_y.as_slice(), dev)?,
    })
}

struct Mlp {
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> Result<Mlp> {
        Ok(Mlp { fc1: linear(64, 64, vb.pp("fc1"))?, fc2: linear(64, 10, vb.pp("fc2"))? })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)
    }
    fn accuracy(&self, x: &Tensor, y: &Tensor) -> Result<f32> {
        let pred = ops::softmax(&self.forward(x)?, 1)?.argmax(1)?;
        let right = pred.eq(y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        Ok(right / y.dim(0)? as f32)
    }
}

fn train<O: Optimizer>(data: &Data, model: &Mlp, opt: &mut O, steps: usize) -> Result<Vec<f32>> {
    let mut curve = Vec::with_capacity(steps);
    for _ in 0..steps {
        let l = loss::cross_entropy(&model.forward(&data.train_x)?, &data.train_y)?;
        curve.push(l.to_scalar::<f32>()?);
        opt.backward_step(&l)?;
    }
    Ok(curve)
}

fn main() -> Result<()> {
    let data = load()?;
    let dev = &Device::Cpu;
    let (ours_map, theirs_map) = (VarMap::new(), VarMap::new());
    let ours = Mlp::new(VarBuilder::from_varmap(&ours_map, DType::F32, dev))?;
    let theirs = Mlp::new(VarBuilder::from_varmap(&theirs_map, DType::F32, dev))?;
    // The same initialization for both: uniform in +-1/sqrt(fan_in), as
    // candle's and torch's default, from a fixed 64-bit LCG.
    {
        let a = ours_map.data().lock().unwrap();
        let b = theirs_map.data().lock().unwrap();
        let mut names: Vec<&String> = a.keys().collect();
        names.sort();
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for name in names {
            let var = &a[name];
            let fan_in = if var.rank() == 2 { var.dim(1)? } else { 64 };
            let bound = 1.0 / (fan_in as f32).sqrt();
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
                })
                .collect();
            let t = Tensor::from_vec(v, var.shape(), dev)?;
            var.set(&t)?;
            b[name].set(&t)?;
        }
    }
    let steps: usize = match std::env::args().nth(1) {
        Some(s) => s.parse().map_err(|e| candle_core::Error::msg(format!("STEPS {s:?}: {e}")))?,
        None => 120,
    };

    // With the adapter: this line is all that changes in a candle program.
    let mut opt = adaoptim_candle::AdamW::new(ours_map.all_vars(), AdamWConfig { lr: LR, ..Default::default() })?;
    let t = std::time::Instant::now();
    let ours_curve = train(&data, &ours, &mut opt, steps)?;
    let ours_time = t.elapsed();

    let mut cn = candle_nn::AdamW::new(theirs_map.all_vars(), candle_nn::ParamsAdamW { lr: LR, ..Default::default() })?;
    let t = std::time::Instant::now();
    let theirs_curve = train(&data, &theirs, &mut cn, steps)?;
    let theirs_time = t.elapsed();

    println!("step  loss (adaoptim-candle)  loss (candle_nn::AdamW)");
    for s in (0..steps).step_by(20).chain([steps - 1]) {
        println!("{s:4}  {:.7}              {:.7}", ours_curve[s], theirs_curve[s]);
    }
    let worst = ours_curve.iter().zip(&theirs_curve).map(|(a, b)| ((a - b) / b).abs()).fold(0f32, f32::max);
    let first_above = ours_curve.iter().zip(&theirs_curve).position(|(a, b)| ((a - b) / b).abs() > 1e-5);
    println!("largest relative difference of the loss curves: {worst:.2e} (first above 1e-5 at step {first_above:?})");
    println!(
        "test accuracy: adaoptim-candle {:.2}%, candle_nn::AdamW {:.2}% ({} test images)",
        100.0 * ours.accuracy(&data.test_x, &data.test_y)?,
        100.0 * theirs.accuracy(&data.test_x, &data.test_y)?,
        data.test_y.dim(0)?
    );
    println!("training time (forward, backward and step; {steps} steps): {:.2?} vs {:.2?}", ours_time, theirs_time);
    Ok(())
}
