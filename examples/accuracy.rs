//! Training accuracy of the storage combinations: the same two models
//! trained with AdamW in each precision of the throughput report, and the
//! test loss each reaches against the `f32` run.
//!
//! ```sh
//! cargo run --release --example accuracy
//! ```
//!
//! Models (synthetic data, fixed seeds, so every run prints the same table):
//! - **MLP**: 32 inputs, 64 tanh hidden units, one logistic output (2177
//!   parameters), on labels drawn from a random teacher network; batch 64,
//!   4 epochs of 20000 examples, lr 3e-3, weight decay 0.01.
//! - **click-through**: the tour's logistic regression over hashed sparse
//!   features (30 active of 2^18 ids, log-uniform, plus 4 dense features),
//!   here with one dense AdamW over the whole table every batch (so every
//!   element's state goes through the precision); batch 256, 2 epochs of
//!   200000 examples, lr 1e-2.
//!
//! Each precision: `f32`; `bf16-grads` (bf16 gradients, f32 master weights
//! and states; the forward pass reads the bf16 copy the step writes, as an
//! accelerator would); `bf16-f32states` (bf16 params and gradients, f32
//! states); `bf16` (bf16 params, gradients and states); `q8` (f32 params
//! and gradients, 8-bit block-wise states); `bf16-q8`. Rounding is
//! nearest-even everywhere (no stochastic rounding).

use adaoptim::storage::{Grads, ParamCopy, Params, Q8State, QMap, StateBuf, bf16};
use adaoptim::{AdamWConfig, StepOptions, step_mixed};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const PRECISIONS: [&str; 6] = ["f32", "bf16-grads", "bf16-f32states", "bf16", "q8", "bf16-q8"];

struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

fn log_loss(p: f32, y: f32) -> f64 {
    let p = p.clamp(1e-7, 1.0 - 1e-7) as f64;
    -(y as f64 * p.ln() + (1.0 - y as f64) * (1.0 - p).ln())
}

/// Parameters and AdamW state in one precision's storage.
struct Store {
    p32: Vec<f32>,
    p16: Vec<bf16>,
    copy: Vec<bf16>,
    s32: Vec<Vec<f32>>,
    s16: Vec<Vec<bf16>>,
    q8: Vec<(Vec<u8>, Vec<f32>, &'static QMap)>,
    g16: Vec<bf16>,
    view: Vec<f32>,
}

impl Store {
    fn new(precision: &'static str, init: &[f32]) -> Store {
        let n = init.len();
        let names = ["exp_avg", "exp_avg_sq"];
        let half_params = matches!(precision, "bf16-f32states" | "bf16" | "bf16-q8");
        let mut s = Store {
            p32: if half_params { Vec::new() } else { init.to_vec() },
            p16: if half_params { init.iter().map(|&x| bf16::from_f32(x)).collect() } else { Vec::new() },
            copy: if precision == "bf16-grads" {
                init.iter().map(|&x| bf16::from_f32(x)).collect()
            } else {
                Vec::new()
            },
            s32: Vec::new(),
            s16: Vec::new(),
            q8: Vec::new(),
            g16: vec![bf16::ZERO; if precision == "f32" || precision == "q8" { 0 } else { n }],
            view: vec![0.0; n],
        };
        match precision {
            "bf16" => s.s16 = vec![vec![bf16::ZERO; n]; 2],
            "q8" | "bf16-q8" => {
                s.q8 = names.iter().map(|m| (vec![0u8; n], vec![0.0f32; n.div_ceil(256)], QMap::for_state(m))).collect()
            }
            _ => s.s32 = vec![vec![0.0; n]; 2],
        }
        s.refresh();
        s
    }

    /// The weights the forward pass sees: the f32 params, or the bf16 ones
    /// (or the bf16 copy) widened.
    fn refresh(&mut self) {
        if !self.copy.is_empty() {
            self.view.iter_mut().zip(&self.copy).for_each(|(v, h)| *v = h.to_f32());
        } else if !self.p16.is_empty() {
            self.view.iter_mut().zip(&self.p16).for_each(|(v, h)| *v = h.to_f32());
        } else {
            self.view.copy_from_slice(&self.p32);
        }
    }

    fn step(&mut self, cfg: &AdamWConfig, t: u64, grads: &[f32]) -> Res<()> {
        let g = if self.g16.is_empty() {
            Grads::F32(grads)
        } else {
            self.g16.iter_mut().zip(grads).for_each(|(h, &x)| *h = bf16::from_f32(x));
            Grads::Bf16(&self.g16)
        };
        let params = if self.p16.is_empty() { Params::F32(&mut self.p32) } else { Params::Bf16(&mut self.p16) };
        let copy = if self.copy.is_empty() { None } else { Some(ParamCopy::Bf16(&mut self.copy)) };
        let mut state: Vec<StateBuf<'_>> = if !self.q8.is_empty() {
            self.q8.iter_mut().map(|(codes, absmax, map)| StateBuf::Q8(Q8State { codes, absmax, map })).collect()
        } else if !self.s16.is_empty() {
            self.s16.iter_mut().map(|s| StateBuf::Bf16(s)).collect()
        } else {
            self.s32.iter_mut().map(|s| StateBuf::F32(s)).collect()
        };
        step_mixed(cfg, t, &mut (), params, g, &mut state, copy, &StepOptions::default())?;
        self.refresh();
        Ok(())
    }
}

// ------------------------------------------------------------------ MLP

const IN: usize = 32;
const HID: usize = 64;
const MLP_PARAMS: usize = HID * IN + HID + HID + 1;

struct Data {
    x: Vec<f32>,
    y: Vec<f32>,
}

fn mlp_forward(w: &[f32], x: &[f32], h: &mut [f32]) -> f32 {
    let (w1, rest) = w.split_at(HID * IN);
    let (b1, rest) = rest.split_at(HID);
    let (w2, b2) = rest.split_at(HID);
    let mut z = b2[0];
    for j in 0..HID {
        let a: f32 = w1[j * IN..(j + 1) * IN].iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + b1[j];
        h[j] = a.tanh();
        z += w2[j] * h[j];
    }
    z
}

fn mlp_data(n: usize, seed: u64) -> Data {
    let mut teacher = Rng(77);
    let t: Vec<f32> = (0..MLP_PARAMS).map(|_| (teacher.normal() * 0.5) as f32).collect();
    let mut rng = Rng(seed);
    let mut d = Data { x: Vec::with_capacity(n * IN), y: Vec::with_capacity(n) };
    let mut h = [0.0f32; HID];
    for _ in 0..n {
        let x: Vec<f32> = (0..IN).map(|_| rng.normal() as f32).collect();
        let p = sigmoid(mlp_forward(&t, &x, &mut h));
        d.y.push(if rng.unit() < p as f64 { 1.0 } else { 0.0 });
        d.x.extend(x);
    }
    d
}

fn mlp_test_loss(w: &[f32], d: &Data) -> f64 {
    let mut h = [0.0f32; HID];
    let n = d.y.len();
    (0..n).map(|i| log_loss(sigmoid(mlp_forward(w, &d.x[i * IN..(i + 1) * IN], &mut h)), d.y[i])).sum::<f64>()
        / n as f64
}

fn train_mlp(precision: &'static str, train: &Data, test: &Data) -> Res<f64> {
    let mut rng = Rng(5);
    let init: Vec<f32> = (0..MLP_PARAMS)
        .map(|i| {
            if i < HID * IN || (HID * IN + HID..HID * IN + 2 * HID).contains(&i) {
                0.2 * rng.normal() as f32
            } else {
                0.0
            }
        })
        .collect();
    let mut store = Store::new(precision, &init);
    let cfg = AdamWConfig { lr: 3e-3, weight_decay: 0.01, ..Default::default() };
    let (batch, epochs) = (64, 4);
    let n = train.y.len();
    let mut g = vec![0.0f32; MLP_PARAMS];
    let mut h = [0.0f32; HID];
    let mut t = 0;
    for _ in 0..epochs {
        for b in 0..n / batch {
            g.iter_mut().for_each(|x| *x = 0.0);
            for i in b * batch..(b + 1) * batch {
                let x = &train.x[i * IN..(i + 1) * IN];
                let w = &store.view;
                let err = (sigmoid(mlp_forward(w, x, &mut h)) - train.y[i]) / batch as f32;
                let w2 = &w[HID * IN + HID..HID * IN + 2 * HID];
                for j in 0..HID {
                    let dz = err * w2[j] * (1.0 - h[j] * h[j]);
                    for k in 0..IN {
                        g[j * IN + k] += dz * x[k];
                    }
                    g[HID * IN + j] += dz;
                    g[HID * IN + HID + j] += err * h[j];
                }
                g[MLP_PARAMS - 1] += err;
            }
            t += 1;
            store.step(&cfg, t, &g)?;
        }
    }
    Ok(mlp_test_loss(&store.view, test))
}

// ---------------------------------------------------------- click-through

const FEATURES: usize = 1 << 18;
const ACTIVE: usize = 30;
const DENSE: usize = 4;

struct Ctr {
    ids: Vec<u32>,
    dense: Vec<f32>,
    y: Vec<f32>,
}

fn ctr_data(n: usize, seed: u64) -> Ctr {
    let mut truth = Rng(0xC0FFEE);
    let w_true: Vec<f32> = (0..FEATURES).map(|_| (truth.normal() * 0.8) as f32).collect();
    let wd_true = [0.8f32, -0.5, 0.3, 0.0];
    let mut rng = Rng(seed);
    let mut d = Ctr { ids: Vec::with_capacity(n * ACTIVE), dense: Vec::with_capacity(n * DENSE), y: Vec::new() };
    for _ in 0..n {
        let mut z = -0.5f32;
        for _ in 0..ACTIVE {
            let id = ((FEATURES as f64).powf(rng.unit()) as usize - 1).min(FEATURES - 1);
            d.ids.push(id as u32);
            z += w_true[id] / (ACTIVE as f32).sqrt();
        }
        for w in wd_true {
            let x = rng.normal() as f32;
            d.dense.push(x);
            z += w * x;
        }
        d.y.push(if rng.unit() < sigmoid(z) as f64 { 1.0 } else { 0.0 });
    }
    d
}

/// The logit: the table's weights of the active ids, then the dense weights
/// and the bias (the last DENSE + 1 parameters).
fn ctr_logit(w: &[f32], d: &Ctr, i: usize) -> f32 {
    let scale = 1.0 / (ACTIVE as f32).sqrt();
    let mut z = w[FEATURES + DENSE];
    for &id in &d.ids[i * ACTIVE..(i + 1) * ACTIVE] {
        z += w[id as usize] * scale;
    }
    for k in 0..DENSE {
        z += w[FEATURES + k] * d.dense[i * DENSE + k];
    }
    z
}

fn train_ctr(precision: &'static str, train: &Ctr, test: &Ctr) -> Res<f64> {
    let n_params = FEATURES + DENSE + 1;
    let mut store = Store::new(precision, &vec![0.0; n_params]);
    let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.0, ..Default::default() };
    let (batch, epochs) = (256, 2);
    let mut g = vec![0.0f32; n_params];
    let scale = 1.0 / (ACTIVE as f32).sqrt();
    let mut t = 0;
    for _ in 0..epochs {
        for b in 0..train.y.len() / batch {
            g.iter_mut().for_each(|x| *x = 0.0);
            for i in b * batch..(b + 1) * batch {
                let err = (sigmoid(ctr_logit(&store.view, train, i)) - train.y[i]) / batch as f32;
                for &id in &train.ids[i * ACTIVE..(i + 1) * ACTIVE] {
                    g[id as usize] += err * scale;
                }
                for k in 0..DENSE {
                    g[FEATURES + k] += err * train.dense[i * DENSE + k];
                }
                g[FEATURES + DENSE] += err;
            }
            t += 1;
            store.step(&cfg, t, &g)?;
        }
    }
    let n = test.y.len();
    Ok((0..n).map(|i| log_loss(sigmoid(ctr_logit(&store.view, test, i)), test.y[i])).sum::<f64>() / n as f64)
}

fn main() -> Res<()> {
    let (mlp_train, mlp_test) = (mlp_data(20_000, 1), mlp_data(5_000, 2));
    let (ctr_train, ctr_test) = (ctr_data(200_000, 1), ctr_data(20_000, 2));
    println!("AdamW test log loss per storage combination (round-to-nearest-even), and against f32:");
    println!("{:<16} {:>10} {:>9} {:>14} {:>9}", "precision", "MLP", "vs f32", "click-through", "vs f32");
    let (mut mlp_f32, mut ctr_f32) = (0.0, 0.0);
    for p in PRECISIONS {
        let mlp = train_mlp(p, &mlp_train, &mlp_test)?;
        let ctr = train_ctr(p, &ctr_train, &ctr_test)?;
        if p == "f32" {
            (mlp_f32, ctr_f32) = (mlp, ctr);
        }
        println!(
            "{:<16} {:>10.5} {:>+8.2}% {:>14.5} {:>+8.2}%",
            p,
            mlp,
            (mlp / mlp_f32 - 1.0) * 100.0,
            ctr,
            (ctr / ctr_f32 - 1.0) * 100.0
        );
    }
    Ok(())
}
