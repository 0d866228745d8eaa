//! A tour of adaoptim in one command: `cargo run --release --example tour`.
//!
//! 1. The lecture's experiment: a sigmoid neuron with two weights, one fed by
//!    a sparse feature (nonzero in 5% of the examples) and one by a dense
//!    feature, trained full-batch from the same start with GD, momentum,
//!    Nesterov, AdaGrad, RMSprop, AdaDelta, Adam, AdaMax and NAdam. A table,
//!    the trajectories over the loss surface and the loss curves.
//! 2. Every learning-rate schedule's curve, side by side.
//! 3. A real training run: logistic regression on a synthetic click-through
//!    dataset with 2^20 hashed sparse features (30 active per example) and a
//!    few dense ones, trained with row-sparse AdaGrad, SparseAdam and dense
//!    Adam; loss, accuracy and updates per second for each.
//!
//! The plots are SVG files written to `target/tour/` (or the folder given as
//! the first argument); the command prints where.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use adaoptim::schedule::*;
use adaoptim::sparse::{SparseAdagrad, SparseAdam, SparseAdamConfig};
use adaoptim::{AdagradConfig, Adam, AdamConfig, AnyConfig, AnyOptimizer, HyperValue};
use plotters::prelude::*;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// xorshift64*: a small deterministic generator.
struct Rng(u64);
impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

// ---------------------------------------------------------------- part 1

/// Two-weight sigmoid neuron data: `x = (sparse, dense)`.
struct Neuron {
    x: Vec<[f32; 2]>,
    y: Vec<f32>,
}

impl Neuron {
    fn new(n: usize) -> Neuron {
        let mut rng = Rng(0x5EED_1234);
        let w_true = [2.0f32, 1.0];
        let (mut x, mut y) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let sparse = if rng.unit() < 0.05 { 1.0 + rng.unit() as f32 } else { 0.0 };
            let dense = (rng.unit() * 2.0 - 1.0) as f32;
            x.push([sparse, dense]);
            y.push(sigmoid(w_true[0] * sparse + w_true[1] * dense));
        }
        Neuron { x, y }
    }

    /// Mean squared error (the lecture's loss) and its gradient.
    fn loss_grad(&self, w: &[f32]) -> (f32, [f32; 2]) {
        let (mut loss, mut g) = (0.0f32, [0.0f32; 2]);
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

/// The lecture's optimizers, with learning rates in its spirit.
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

struct Run {
    name: &'static str,
    path: Vec<(f64, f64)>,
    losses: Vec<f64>,
}

const START: [f32; 2] = [-2.0, -2.0];
const STEPS: usize = 400;
const THRESHOLD: f32 = 0.005;

fn lecture(out: &Path) -> Res<()> {
    let data = Neuron::new(500);
    println!("== 1. The lecture's experiment");
    println!("Sigmoid neuron, 2 weights: w[0] sees a sparse feature (5% nonzero), w[1] a dense one.");
    println!("{} examples, full batch, {STEPS} steps from w = {START:?}; true w = [2, 1].\n", data.x.len());
    println!(
        "{:<10} {:>11} {:>16} {:>12} {:>12} {:>8}",
        "optimizer",
        "final loss",
        format!("steps to <{THRESHOLD}"),
        "moved w[0]",
        "moved w[1]",
        "backend"
    );
    let mut runs = Vec::new();
    for (name, cfg) in contenders() {
        let mut opt: AnyOptimizer = cfg.build(2)?;
        let mut w = START;
        let mut run = Run { name, path: vec![(w[0] as f64, w[1] as f64)], losses: Vec::new() };
        let mut reached = None;
        let mut backend = String::new();
        for t in 0..=STEPS {
            let (l, g) = data.loss_grad(&w);
            run.losses.push(l as f64);
            if reached.is_none() && l < THRESHOLD {
                reached = Some(t);
            }
            if t < STEPS {
                backend = opt.step(&mut w, &g)?.backend.to_string();
                run.path.push((w[0] as f64, w[1] as f64));
            }
        }
        println!(
            "{:<10} {:>11.5} {:>16} {:>12.3} {:>12.3} {:>8}",
            name,
            run.losses[STEPS],
            reached.map_or("never".to_string(), |t| t.to_string()),
            w[0] - START[0],
            w[1] - START[1],
            backend
        );
        runs.push(run);
    }
    println!(
        "\nGD crawls along w[0]: the sparse feature's gradient is small. AdaGrad divides by its own history,\n\
         so it moves w[0] as readily as w[1] -- then slows as that history grows. RMSprop and Adam\n\
         forget old gradients (decaying averages) and do not slow down."
    );
    plot_trajectories(&data, &runs, &out.join("trajectories.svg"))?;
    plot_losses(&runs, &out.join("loss_curves.svg"))?;
    Ok(())
}

const PALETTE: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

/// Loss surface as shaded cells (darker = lower loss) with each optimizer's
/// path on its own panel.
fn plot_trajectories(data: &Neuron, runs: &[Run], file: &Path) -> Res<()> {
    let root = SVGBackend::new(file, (1200, 1200)).into_drawing_area();
    root.fill(&WHITE)?;
    let root =
        root.titled("Trajectories over the loss surface (w[0]: sparse feature, w[1]: dense)", ("sans-serif", 22))?;
    let (x0, x1, y0, y1) = (-2.5f64, 4.5f64, -2.5f64, 3.5f64);
    let cells = 60;
    let mut grid = vec![0.0f64; cells * cells];
    for i in 0..cells {
        for j in 0..cells {
            let w = [
                (x0 + (x1 - x0) * (i as f64 + 0.5) / cells as f64) as f32,
                (y0 + (y1 - y0) * (j as f64 + 0.5) / cells as f64) as f32,
            ];
            grid[i * cells + j] = (data.loss_grad(&w).0 as f64).max(1e-6).ln();
        }
    }
    let (lo, hi) = grid.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    for (panel, run) in root.split_evenly((3, 3)).iter().zip(runs) {
        let mut chart = ChartBuilder::on(panel)
            .caption(run.name, ("sans-serif", 18))
            .margin(6)
            .x_label_area_size(32)
            .y_label_area_size(44)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart.configure_mesh().disable_mesh().x_desc("w[0] sparse").y_desc("w[1] dense").draw()?;
        chart.draw_series((0..cells * cells).map(|k| {
            let (i, j) = (k / cells, k % cells);
            let t = (grid[k] - lo) / (hi - lo);
            let shade = (90.0 + 165.0 * t) as u8;
            let (cx, cy) = ((x1 - x0) / cells as f64, (y1 - y0) / cells as f64);
            let (ax, ay) = (x0 + cx * i as f64, y0 + cy * j as f64);
            Rectangle::new([(ax, ay), (ax + cx, ay + cy)], RGBColor(shade, shade, 255).filled())
        }))?;
        let color = PALETTE[runs.iter().position(|r| r.name == run.name).unwrap_or(0)];
        let path: Vec<(f64, f64)> = run.path.iter().map(|&(a, b)| (a.clamp(x0, x1), b.clamp(y0, y1))).collect();
        chart.draw_series(LineSeries::new(path.clone(), color.stroke_width(2)))?;
        chart.draw_series(path.iter().step_by(10).map(|&p| Circle::new(p, 2, color.filled())))?;
        chart.draw_series(std::iter::once(Circle::new(path[0], 5, BLACK.filled())))?;
        chart.draw_series(std::iter::once(Cross::new((2.0, 1.0), 6, RED.stroke_width(2))))?;
    }
    root.present()?;
    Ok(())
}

fn plot_losses(runs: &[Run], file: &Path) -> Res<()> {
    let root = SVGBackend::new(file, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let min = runs.iter().flat_map(|r| r.losses.iter()).fold(f64::INFINITY, |a, &b| a.min(b)).max(1e-9);
    let max = runs.iter().flat_map(|r| r.losses.iter()).fold(0.0f64, |a, &b| a.max(b));
    let mut chart = ChartBuilder::on(&root)
        .caption("Loss per step (log scale)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..STEPS, (min..max * 1.5).log_scale())?;
    chart.configure_mesh().x_desc("step").y_desc("loss").y_label_formatter(&|v| format!("{v:.0e}")).draw()?;
    for (k, run) in runs.iter().enumerate() {
        let color = PALETTE[k];
        chart
            .draw_series(LineSeries::new(
                run.losses.iter().enumerate().map(|(t, &l)| (t, l.max(min))),
                color.stroke_width(2),
            ))?
            .label(run.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------- part 2

fn schedules() -> Res<Vec<(&'static str, Schedule)>> {
    let lr = 0.1;
    Ok(vec![
        ("StepLR (step 30, gamma 0.5)", StepLR::new(lr, 30, 0.5)?.into()),
        ("ExponentialLR (lambda 0.02)", ExponentialLR::from_decay_rate(lr, 0.02)?.into()),
        ("CosineAnnealingLR (T_max 100)", CosineAnnealingLR::new(lr, 100, 0.0)?.into()),
        ("Warm restarts (T_0 20, T_mult 2)", CosineAnnealingWarmRestarts::new(lr, 20, 2, 0.0)?.into()),
        ("CyclicLR triangular", CyclicLR::new(0.01, lr, 25, None, CyclicMode::Triangular, None)?.into()),
        ("CyclicLR triangular2", CyclicLR::new(0.01, lr, 25, None, CyclicMode::Triangular2, None)?.into()),
        ("OneCycleLR (cos)", OneCycleLR::new(lr, 200, 0.3, Anneal::Cos, 25.0, 1e4, false, None)?.into()),
        ("Warmup 20 + cosine", warmup_cosine(lr, 20, 200, 0.01, 0.0)?),
        ("PolynomialLR (power 2)", PolynomialLR::new(lr, 150, 2.0)?.into()),
    ])
}

fn plot_schedules(file: &Path) -> Res<()> {
    println!("\n== 2. Learning-rate schedules (base lr 0.1, 200 steps)");
    let all = schedules()?;
    let steps = 200u64;
    let root = SVGBackend::new(file, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root =
        root.titled("Learning-rate schedules (lr_at(step), torch.optim.lr_scheduler values)", ("sans-serif", 22))?;
    for ((name, s), (k, panel)) in all.iter().zip(root.split_evenly((3, 3)).iter().enumerate()) {
        let mut chart = ChartBuilder::on(panel)
            .caption(*name, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(44)
            .build_cartesian_2d(0u64..steps, 0.0f64..0.105)?;
        chart.configure_mesh().x_labels(5).y_labels(5).draw()?;
        chart.draw_series(LineSeries::new((0..steps).map(|t| (t, s.lr_at(t))), PALETTE[k].stroke_width(2)))?;
        let (lo, hi) = s.bounds();
        println!(
            "{name:<34} lr(0) = {:.4}  lr(100) = {:.5}  lr(199) = {:.6}  bounds [{lo:.2e}, {hi:.2e}]",
            s.lr_at(0),
            s.lr_at(100),
            s.lr_at(199)
        );
    }
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------- part 3

const FEATURES: usize = 1 << 20;
const ACTIVE: usize = 30;
const DENSE: usize = 4;

/// Synthetic click-through data: 30 hashed categorical features per example
/// (ids log-uniform over 2^20, so a few are frequent and most are rare), 4
/// dense features, labels drawn from a true logistic model.
struct Ctr {
    ids: Vec<u32>,
    dense: Vec<f32>,
    y: Vec<f32>,
}

impl Ctr {
    fn new(n: usize, seed: u64) -> (Ctr, Vec<f32>) {
        let mut rng = Rng(seed);
        let mut truth = Rng(0xC0FFEE);
        let w_true: Vec<f32> = (0..FEATURES).map(|_| (truth.normal() * 0.8) as f32).collect();
        let wd_true = [0.8f32, -0.5, 0.3, 0.0];
        let mut d =
            Ctr { ids: Vec::with_capacity(n * ACTIVE), dense: Vec::with_capacity(n * DENSE), y: Vec::with_capacity(n) };
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
        (d, w_true)
    }
    fn len(&self) -> usize {
        self.y.len()
    }
}

/// The model: a weight per hashed feature (a 2^20 x 1 table), dense weights and a bias.
struct Model {
    table: Vec<f32>,
    dense: Vec<f32>, // DENSE weights + bias
}

impl Model {
    fn new() -> Model {
        Model { table: vec![0.0; FEATURES], dense: vec![0.0; DENSE + 1] }
    }
    fn logit(&self, d: &Ctr, i: usize) -> f32 {
        let scale = 1.0 / (ACTIVE as f32).sqrt();
        let mut z = self.dense[DENSE];
        for &id in &d.ids[i * ACTIVE..(i + 1) * ACTIVE] {
            z += self.table[id as usize] * scale;
        }
        for k in 0..DENSE {
            z += self.dense[k] * d.dense[i * DENSE + k];
        }
        z
    }
    /// Log loss and accuracy.
    fn evaluate(&self, d: &Ctr) -> (f64, f64) {
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for i in 0..d.len() {
            let p = sigmoid(self.logit(d, i)).clamp(1e-7, 1.0 - 1e-7) as f64;
            let y = d.y[i] as f64;
            loss -= y * p.ln() + (1.0 - y) * (1.0 - p).ln();
            correct += usize::from((p > 0.5) == (y > 0.5));
        }
        (loss / d.len() as f64, correct as f64 / d.len() as f64)
    }
}

enum SparseOpt {
    Adagrad(SparseAdagrad),
    Adam(SparseAdam),
    /// Dense Adam over the whole table every batch.
    Dense(Adam, Vec<f32>),
}

fn train_ctr(out: &Path) -> Res<()> {
    println!("\n== 3. Logistic regression on synthetic click-through data");
    let (train, _) = Ctr::new(400_000, 1);
    let (test, _) = Ctr::new(40_000, 2);
    let batch = 256;
    let epochs = 3;
    println!(
        "{} training / {} test examples, {FEATURES} hashed sparse features ({ACTIVE} active per example) + {DENSE} dense; batch {batch}, {epochs} epochs",
        train.len(),
        test.len()
    );
    let mut curves: Vec<(&str, Vec<f64>)> = Vec::new();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>10} {:>13}",
        "optimizer (table)", "test loss", "accuracy", "time (s)", "steps/s", "grad rows/s"
    );
    for name in ["row-sparse AdaGrad", "SparseAdam", "dense Adam (whole table)"] {
        let mut model = Model::new();
        let mut table_opt = match name {
            "row-sparse AdaGrad" => {
                SparseOpt::Adagrad(SparseAdagrad::new(AdagradConfig { lr: 0.1, ..Default::default() }, FEATURES, 1)?)
            }
            "SparseAdam" => {
                SparseOpt::Adam(SparseAdam::new(SparseAdamConfig { lr: 0.01, ..Default::default() }, FEATURES, 1)?)
            }
            _ => SparseOpt::Dense(
                Adam::new(AdamConfig { lr: 0.01, ..Default::default() }, FEATURES)?,
                vec![0.0; FEATURES],
            ),
        };
        let mut dense_opt = Adam::new(AdamConfig { lr: 0.01, ..Default::default() }, DENSE + 1)?;
        let (mut rows, mut vals) = (Vec::new(), Vec::new());
        let mut dgrad = vec![0.0f32; DENSE + 1];
        let batches = train.len() / batch;
        let total = batches * epochs;
        let mut curve = Vec::new();
        let start = Instant::now();
        let mut optimizer_time = 0.0;
        for step in 0..total {
            let b = step % batches;
            rows.clear();
            vals.clear();
            dgrad.iter_mut().for_each(|g| *g = 0.0);
            let scale = 1.0 / (ACTIVE as f32).sqrt();
            for i in b * batch..(b + 1) * batch {
                let err = (sigmoid(model.logit(&train, i)) - train.y[i]) / batch as f32;
                for &id in &train.ids[i * ACTIVE..(i + 1) * ACTIVE] {
                    rows.push(id as usize);
                    vals.push(err * scale);
                }
                for (g, x) in dgrad.iter_mut().zip(&train.dense[i * DENSE..(i + 1) * DENSE]) {
                    *g += err * x;
                }
                dgrad[DENSE] += err;
            }
            let t = Instant::now();
            match &mut table_opt {
                SparseOpt::Adagrad(o) => drop(o.step(&mut model.table, &rows, &vals)?),
                SparseOpt::Adam(o) => drop(o.step(&mut model.table, &rows, &vals)?),
                SparseOpt::Dense(o, g) => {
                    g.iter_mut().for_each(|x| *x = 0.0);
                    rows.iter().zip(&vals).for_each(|(&r, &v)| g[r] += v);
                    o.step(&mut model.table, g)?;
                }
            }
            dense_opt.step(&mut model.dense, &dgrad)?;
            optimizer_time += t.elapsed().as_secs_f64();
            if step % (total / 40) == 0 || step + 1 == total {
                curve.push(model.evaluate(&test).0);
                if tty {
                    let done = (step + 1) * 30 / total;
                    eprint!(
                        "\r  {name:<26} [{}{}] {:>3}%",
                        "#".repeat(done),
                        " ".repeat(30 - done),
                        (step + 1) * 100 / total
                    );
                    let _ = std::io::stderr().flush();
                }
            }
        }
        if tty {
            eprint!("\r{}\r", " ".repeat(72));
        }
        let elapsed = start.elapsed().as_secs_f64();
        let (loss, acc) = model.evaluate(&test);
        println!(
            "{:<26} {:>9.4} {:>8.2}% {:>9.2} {:>10.0} {:>13.3e}",
            name,
            loss,
            acc * 100.0,
            elapsed,
            total as f64 / optimizer_time,
            (total * batch * ACTIVE) as f64 / optimizer_time
        );
        curves.push((name, curve));
    }
    println!("(steps/s: optimizer steps per second of optimizer time, table and dense weights together;");
    println!(" grad rows/s: sparse gradient rows, duplicates included, consumed per second of that time)");
    let file = out.join("ctr_loss.svg");
    let root = SVGBackend::new(&file, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = curves.iter().flat_map(|c| c.1.iter()).fold(0.0f64, |a, &b| a.max(b));
    let min = curves.iter().flat_map(|c| c.1.iter()).fold(f64::INFINITY, |a, &b| a.min(b));
    let mut chart = ChartBuilder::on(&root)
        .caption("Click-through logistic regression: test log loss during training", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..curves[0].1.len(), min * 0.98..max * 1.02)?;
    chart.configure_mesh().x_desc("evaluation (every 1/40 of training)").y_desc("test log loss").draw()?;
    for (k, (name, c)) in curves.iter().enumerate() {
        let color = PALETTE[k * 3];
        chart
            .draw_series(LineSeries::new(c.iter().copied().enumerate(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Res<()> {
    let out: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join("tour"));
    std::fs::create_dir_all(&out)?;
    let t = Instant::now();
    lecture(&out)?;
    plot_schedules(&out.join("schedules.svg"))?;
    train_ctr(&out)?;
    println!("\nPlots written to {}: trajectories.svg, loss_curves.svg, schedules.svg, ctr_loss.svg", out.display());
    println!("Total time {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}
