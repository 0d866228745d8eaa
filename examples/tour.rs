//! The lecture's experiment: a sigmoid neuron with two weights, one fed by a
//! sparse feature (nonzero in 5% of the examples) and one by a dense feature,
//! trained full-batch from the same start with every optimizer of the crate.
//!
//! Run: `cargo run --release --example tour`

use adaoptim::{AnyConfig, AnyOptimizer, HyperValue};

/// Two-weight sigmoid neuron data: `x = (sparse, dense)`, `y` in (0, 1).
struct Data {
    x: Vec<[f32; 2]>,
    y: Vec<f32>,
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl Data {
    fn new(n: usize, seed: u64) -> Data {
        let mut s = seed;
        let mut unit = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let w_true = [2.0f32, 1.0];
        let mut x = Vec::with_capacity(n);
        let mut y = Vec::with_capacity(n);
        for _ in 0..n {
            let sparse = if unit() < 0.05 { 1.0 + unit() as f32 } else { 0.0 };
            let dense = (unit() * 2.0 - 1.0) as f32;
            x.push([sparse, dense]);
            y.push(sigmoid(w_true[0] * sparse + w_true[1] * dense));
        }
        Data { x, y }
    }

    /// Mean squared error and its gradient.
    fn loss_grad(&self, w: &[f32]) -> (f32, [f32; 2]) {
        let mut loss = 0.0;
        let mut g = [0.0f32; 2];
        for (x, y) in self.x.iter().zip(&self.y) {
            let f = sigmoid(w[0] * x[0] + w[1] * x[1]);
            loss += 0.5 * (f - y) * (f - y);
            let d = (f - y) * f * (1.0 - f);
            g[0] += d * x[0];
            g[1] += d * x[1];
        }
        let n = self.x.len() as f32;
        (loss / n, [g[0] / n, g[1] / n])
    }
}

/// The optimizers of the lecture, with learning rates in the lecture's spirit.
fn contenders() -> Vec<(&'static str, AnyConfig)> {
    let num = HyperValue::Number;
    let mk = |class: &str, opts: &[(&str, HyperValue)]| AnyConfig::from_torch(class, opts).expect("valid config");
    vec![
        ("GD", mk("SGD", &[("lr", num(1.0))])),
        ("Momentum", mk("SGD", &[("lr", num(1.0)), ("momentum", num(0.9))])),
        ("Nesterov", mk("SGD", &[("lr", num(1.0)), ("momentum", num(0.9)), ("nesterov", HyperValue::Bool(true))])),
        ("AdaGrad", mk("Adagrad", &[("lr", num(0.1))])),
        ("RMSprop", mk("RMSprop", &[("lr", num(0.01)), ("alpha", num(0.9))])),
        ("AdaDelta", mk("Adadelta", &[("lr", num(1.0))])),
        ("Adam", mk("Adam", &[("lr", num(0.05))])),
        ("AdaMax", mk("Adamax", &[("lr", num(0.05))])),
        ("NAdam", mk("NAdam", &[("lr", num(0.05))])),
    ]
}

fn main() -> Result<(), adaoptim::Error> {
    let data = Data::new(500, 0x5EED);
    let start = [-2.0f32, -2.0];
    let steps = 500;
    let threshold = 0.005f32;
    println!("Sigmoid neuron, 2 weights: w[0] sees a sparse feature (5% nonzero), w[1] a dense one.");
    println!("{} examples, full-batch, {} steps from w = {:?}.\n", data.x.len(), steps, start);
    println!(
        "{:<10} {:>11} {:>16} {:>12} {:>12} {:>10}",
        "optimizer",
        "final loss",
        format!("steps<{threshold}"),
        "moved w[0]",
        "moved w[1]",
        "backend"
    );
    for (name, cfg) in contenders() {
        let mut opt: AnyOptimizer = cfg.build(2)?;
        let mut w = start;
        let mut reached = None;
        let mut backend = String::new();
        let mut loss = data.loss_grad(&w).0;
        for t in 0..steps {
            let (l, g) = data.loss_grad(&w);
            loss = l;
            if reached.is_none() && l < threshold {
                reached = Some(t);
            }
            backend = opt.step(&mut w, &g)?.backend.to_string();
        }
        println!(
            "{:<10} {:>11.5} {:>16} {:>12.3} {:>12.3} {:>10}",
            name,
            loss,
            reached.map_or("never".to_string(), |t| t.to_string()),
            w[0] - start[0],
            w[1] - start[1],
            backend
        );
    }
    Ok(())
}
