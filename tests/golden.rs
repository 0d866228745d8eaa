//! Checks the crate against real PyTorch trajectories.
//!
//! Reads every `*.json` file in `ADAOPTIM_GOLDEN_DIR` (default: the
//! repository's copy in `tests/golden`), dispatches on `kind`, `torch_class`
//! and `options`, and fails on any file it cannot interpret. A second test
//! does the same for `tests/golden_wide` (more option combinations, written
//! by torch through `tests/golden_wide/generate.py`). Tolerance, from
//! the golden README: `|p - expected| <= 1e-5 * |expected| + 1e-6`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use adaoptim::schedule::*;
use common::{all_paths, config_from_json, f32s};
use serde_json::Value;

const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-6;

fn golden_dir() -> PathBuf {
    match std::env::var_os("ADAOPTIM_GOLDEN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden"),
    }
}

fn load_all(dir: PathBuf) -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read golden dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden files in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect()
}

/// Worst `|p - e| / (rtol |e| + atol)` over a trajectory; NaN must match NaN.
fn worst_fraction(name: &str, path: &str, step: usize, got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst: f64 = 0.0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() || g.is_nan() {
            assert!(w.is_nan() && g.is_nan(), "{name} [{path}] step {step} element {i}: got {g}, torch {w}");
            continue;
        }
        let (g, w) = (*g as f64, *w as f64);
        let frac = (g - w).abs() / (RTOL * w.abs() + ATOL);
        assert!(
            frac <= 1.0,
            "{name} [{path}] step {} element {i}: got {g:e}, torch {w:e} ({frac:.2} x tolerance)",
            step + 1
        );
        worst = worst.max(frac);
    }
    worst
}

/// An optimizer file's start, gradients and torch's parameters.
struct Trajectory {
    n: usize,
    steps: usize,
    p0: Vec<f32>,
    grads: Vec<Vec<f32>>,
    want: Vec<Vec<f32>>,
}

impl Trajectory {
    fn of(name: &str, v: &Value) -> Self {
        let n = v["n"].as_u64().expect("n") as usize;
        let steps = v["steps"].as_u64().expect("steps") as usize;
        let p0 = f32s(&v["params0"]);
        let grads: Vec<Vec<f32>> = v["grads"].as_array().expect("grads").iter().map(f32s).collect();
        let want: Vec<Vec<f32>> = v["params"].as_array().expect("params").iter().map(f32s).collect();
        assert_eq!(p0.len(), n, "{name}: params0 length");
        assert!(grads.len() == steps && want.len() == steps, "{name}: steps");
        Trajectory { n, steps, p0, grads, want }
    }
}

/// The file's `shape` (absent: a vector of `n`); its element count must be `n`.
fn shape_of(name: &str, v: &Value, n: usize) -> Vec<usize> {
    let shape: Vec<usize> = match v.get("shape") {
        None => vec![n],
        Some(s) => s
            .as_array()
            .unwrap_or_else(|| panic!("{name}: shape must be an array"))
            .iter()
            .map(|d| d.as_u64().unwrap_or_else(|| panic!("{name}: shape entries must be integers")) as usize)
            .collect(),
    };
    assert_eq!(shape.iter().product::<usize>(), n, "{name}: shape {shape:?} does not hold n = {n} elements");
    shape
}

/// torch.optim.Adafactor (shape-aware, not a registry kernel): every
/// backend, serial and through a 3-thread pool.
fn check_adafactor(name: &str, v: &Value) -> f64 {
    let cfg = adaoptim::AdafactorConfig::from_torch_kwargs(&v["options"])
        .unwrap_or_else(|e| panic!("{name}: cannot build Adafactor: {e}"));
    let Trajectory { n, steps, p0, grads, want } = Trajectory::of(name, v);
    let shape = shape_of(name, v, n);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut worst: f64 = 0.0;
    for b in adaoptim::Backend::available() {
        for (path, exec) in [("serial", adaoptim::Exec::serial(b)), ("pool-3", adaoptim::Exec::parallel(b, 0))] {
            let path = format!("{path}-{}", b.name());
            let mut opt = adaoptim::Adafactor::new(cfg, &shape).unwrap();
            opt.set_exec(exec);
            let mut p = p0.clone();
            for t in 0..steps {
                pool.install(|| opt.step(&mut p, &grads[t])).unwrap();
                worst = worst.max(worst_fraction(name, &path, t, &p, &want[t]));
            }
        }
    }
    worst
}

fn check_optimizer(name: &str, v: &Value) -> f64 {
    let class = v["torch_class"].as_str().expect("torch_class");
    if class == "Adafactor" {
        return check_adafactor(name, v);
    }
    let cfg = config_from_json(class, &v["options"]).unwrap_or_else(|e| panic!("{name}: cannot build {class}: {e}"));
    let Trajectory { n, steps, p0, grads, want } = Trajectory::of(name, v);
    // Element-wise optimizers ignore the shape, but it must be coherent.
    shape_of(name, v, n);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut worst: f64 = 0.0;
    for (path, exec) in all_paths() {
        let mut opt = cfg.build(n).unwrap();
        opt.set_exec(exec);
        let mut p = p0.clone();
        for t in 0..steps {
            let report = pool.install(|| opt.step(&mut p, &grads[t])).unwrap();
            assert_eq!(report.backend.name(), path.trim_start_matches("parallel-"), "{name}: backend that ran");
            worst = worst.max(worst_fraction(name, &path, t, &p, &want[t]));
        }
    }
    worst
}

#[test]
fn golden() {
    check_dir(golden_dir());
}

#[test]
fn golden_wide() {
    check_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden_wide"));
}

/// torch's own test matrix (`optim_db`), written by
/// `tests/golden_optimdb/generate.py`.
#[test]
fn golden_optim_db() {
    check_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden_optimdb"));
}

/// torch.optim.Adafactor on its `optim_db` configurations, for vector,
/// matrix and 3-d shapes, written by `tests/golden_adafactor/generate.py`.
#[test]
fn golden_adafactor() {
    check_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden_adafactor"));
}

/// Checks every file of `dir`, printing per-file and per-class worst errors.
fn check_dir(dir: PathBuf) {
    println!("golden: {}", dir.display());
    let mut checked: BTreeMap<&str, usize> = BTreeMap::new();
    let mut worst_by_class: BTreeMap<String, f64> = BTreeMap::new();
    let mut worst_schedule: BTreeMap<String, f64> = BTreeMap::new();
    for (name, v) in load_all(dir) {
        let kind = v["kind"].as_str().unwrap_or_else(|| panic!("{name}: no kind"));
        match kind {
            "optimizer" => {
                let w = check_optimizer(&name, &v);
                println!("golden: {name}: worst error {:.4} of tolerance", w);
                let class = v["torch_class"].as_str().unwrap().to_string();
                let e = worst_by_class.entry(class).or_insert(0.0);
                *e = e.max(w);
                *checked.entry("optimizer").or_default() += 1;
            }
            "schedule" => {
                let w = check_schedule(&name, &v);
                println!("golden: {name}: worst relative error {w:.3e}");
                let class = v["torch_class"].as_str().unwrap().to_string();
                let e = worst_schedule.entry(class).or_insert(0.0);
                *e = e.max(w);
                *checked.entry("schedule").or_default() += 1;
            }
            "sparse_optimizer" => {
                let w = check_sparse(&name, &v);
                println!("golden: {name}: worst error {w:.4} of tolerance");
                let class = format!("sparse {}", v["torch_class"].as_str().unwrap());
                let e = worst_by_class.entry(class).or_insert(0.0);
                *e = e.max(w);
                *checked.entry("sparse").or_default() += 1;
            }
            other => panic!("{name}: unknown kind {other:?}"),
        }
    }
    for (class, w) in &worst_by_class {
        println!("golden: worst {class}: {w:.4} of tolerance");
    }
    for (class, w) in &worst_schedule {
        println!("golden: worst {class}: relative error {w:.3e}");
    }
    println!("golden: {} optimizer files checked", checked.get("optimizer").copied().unwrap_or(0));
    println!("golden: {} schedule files checked", checked.get("schedule").copied().unwrap_or(0));
    println!("golden: {} sparse files checked", checked.get("sparse").copied().unwrap_or(0));
    assert!(checked.values().sum::<usize>() > 0, "no golden files checked");
}

/// Keyword options of one scheduler; every key must be used.
struct Opts<'a> {
    name: &'a str,
    map: serde_json::Map<String, Value>,
}

impl<'a> Opts<'a> {
    fn new(name: &'a str, v: &Value) -> Self {
        let mut map = v.as_object().unwrap_or_else(|| panic!("{name}: options must be an object")).clone();
        map.remove("torch_class");
        if let Some(le) = map.remove("last_epoch") {
            assert_eq!(le.as_i64(), Some(-1), "{name}: only last_epoch = -1 is interpretable");
        }
        map.remove("verbose");
        Opts { name, map }
    }
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }
    fn f64_or(&mut self, key: &str, default: f64) -> f64 {
        self.take(key).map_or(default, |v| v.as_f64().unwrap_or_else(|| panic!("{}: {key} not a number", self.name)))
    }
    fn u64_req(&mut self, key: &str) -> u64 {
        let v = self.take(key).unwrap_or_else(|| panic!("{}: {key} missing", self.name));
        as_u64(self.name, key, &v)
    }
    fn u64_or(&mut self, key: &str, default: u64) -> u64 {
        self.take(key).map_or(default, |v| as_u64(self.name, key, &v))
    }
    fn str_or(&mut self, key: &str, default: &str) -> String {
        self.take(key).map_or(default.to_string(), |v| v.as_str().expect("string").to_string())
    }
    fn bool_or(&mut self, key: &str, default: bool) -> bool {
        self.take(key).map_or(default, |v| v.as_bool().expect("bool"))
    }
    fn finish(self) {
        // A null option is torch's `None`, the default; anything else left over
        // was not understood.
        let left: Vec<&String> = self.map.iter().filter(|(_, v)| !v.is_null()).map(|(k, _)| k).collect();
        assert!(left.is_empty(), "{}: cannot interpret options {left:?}", self.name);
    }
}

fn as_u64(name: &str, key: &str, v: &Value) -> u64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{name}: {key} not a number"));
    assert!(x >= 0.0 && x.fract() == 0.0, "{name}: {key} = {x} is not a step count");
    x as u64
}

/// Builds a schedule from a torch class and its keyword options.
fn build_schedule(name: &str, class: &str, base_lr: f64, options: &Value) -> Schedule {
    let mut o = Opts::new(name, options);
    let s: Schedule = match class {
        "ConstantLR" => {
            ConstantLR::new(base_lr, o.f64_or("factor", 1.0 / 3.0), o.u64_or("total_iters", 5)).unwrap().into()
        }
        "StepLR" => StepLR::new(base_lr, o.u64_req("step_size"), o.f64_or("gamma", 0.1)).unwrap().into(),
        "MultiStepLR" => {
            let ms = o.take("milestones").expect("milestones");
            let ms = ms.as_array().expect("milestones list").iter().map(|m| as_u64(name, "milestones", m)).collect();
            MultiStepLR::new(base_lr, ms, o.f64_or("gamma", 0.1)).unwrap().into()
        }
        "ExponentialLR" => ExponentialLR::new(base_lr, o.f64_or("gamma", f64::NAN)).unwrap().into(),
        "LinearLR" => LinearLR::new(
            base_lr,
            o.f64_or("start_factor", 1.0 / 3.0),
            o.f64_or("end_factor", 1.0),
            o.u64_or("total_iters", 5),
        )
        .unwrap()
        .into(),
        "PolynomialLR" => {
            PolynomialLR::new(base_lr, o.u64_or("total_iters", 5), o.f64_or("power", 1.0)).unwrap().into()
        }
        "CosineAnnealingLR" => {
            CosineAnnealingLR::new(base_lr, o.u64_req("T_max"), o.f64_or("eta_min", 0.0)).unwrap().into()
        }
        "CosineAnnealingWarmRestarts" => {
            CosineAnnealingWarmRestarts::new(base_lr, o.u64_req("T_0"), o.u64_or("T_mult", 1), o.f64_or("eta_min", 0.0))
                .unwrap()
                .into()
        }
        "CyclicLR" => {
            let base = o.f64_or("base_lr", f64::NAN);
            let max = o.f64_or("max_lr", f64::NAN);
            let up = o.u64_or("step_size_up", 2000);
            let down = o.take("step_size_down").map(|v| as_u64(name, "step_size_down", &v));
            let mode_name = o.str_or("mode", "triangular");
            let gamma = o.f64_or("gamma", 1.0);
            let mode = match mode_name.as_str() {
                "triangular" => CyclicMode::Triangular,
                "triangular2" => CyclicMode::Triangular2,
                "exp_range" => CyclicMode::ExpRange { gamma },
                other => panic!("{name}: unknown CyclicLR mode {other}"),
            };
            let default_scale = if mode_name == "exp_range" { "iterations" } else { "cycle" };
            assert_eq!(o.str_or("scale_mode", default_scale), default_scale, "{name}: custom scale_mode");
            let cm = o.bool_or("cycle_momentum", true);
            let (bm, mm) = (o.f64_or("base_momentum", 0.8), o.f64_or("max_momentum", 0.9));
            CyclicLR::new(base, max, up, down, mode, cm.then_some((bm, mm))).unwrap().into()
        }
        "OneCycleLR" => {
            let max_lr = o.f64_or("max_lr", f64::NAN);
            let total = match o.take("total_steps") {
                Some(v) => as_u64(name, "total_steps", &v),
                None => o.u64_req("epochs") * o.u64_req("steps_per_epoch"),
            };
            let anneal = match o.str_or("anneal_strategy", "cos").as_str() {
                "cos" => Anneal::Cos,
                "linear" => Anneal::Linear,
                other => panic!("{name}: unknown anneal_strategy {other}"),
            };
            let pct = o.f64_or("pct_start", 0.3);
            let (div, fdiv) = (o.f64_or("div_factor", 25.0), o.f64_or("final_div_factor", 1e4));
            let three = o.bool_or("three_phase", false);
            let cm = o.bool_or("cycle_momentum", true);
            let (bm, mm) = (o.f64_or("base_momentum", 0.85), o.f64_or("max_momentum", 0.95));
            OneCycleLR::new(max_lr, total, pct, anneal, div, fdiv, three, cm.then_some((bm, mm))).unwrap().into()
        }
        "SequentialLR" | "ChainedScheduler" => {
            let children: Vec<Schedule> = o
                .take("schedulers")
                .expect("schedulers")
                .as_array()
                .expect("schedulers list")
                .iter()
                .map(|c| build_schedule(name, c["torch_class"].as_str().expect("child torch_class"), base_lr, c))
                .collect();
            if class == "SequentialLR" {
                let ms = o.take("milestones").expect("milestones");
                let ms =
                    ms.as_array().expect("milestones list").iter().map(|m| as_u64(name, "milestones", m)).collect();
                SequentialLR::new(children, ms).unwrap().into()
            } else {
                ChainedScheduler::new(base_lr, children).unwrap().into()
            }
        }
        other => panic!("{name}: unknown schedule class {other}"),
    };
    o.finish();
    s
}

/// Worst relative error over the file; fails beyond rtol 1e-9 (floor 1e-12).
fn check_schedule(name: &str, v: &Value) -> f64 {
    let class = v["torch_class"].as_str().expect("torch_class");
    let base_lr = v["base_lr"].as_f64().expect("base_lr");
    let sched = build_schedule(name, class, base_lr, &v["options"]);
    let lrs: Vec<f64> = v["lrs"].as_array().expect("lrs").iter().map(|x| x.as_f64().expect("number")).collect();
    if let Some(steps) = v["steps"].as_u64() {
        assert_eq!(lrs.len() as u64, steps, "{name}: steps");
    }
    let mut worst: f64 = 0.0;
    for (t, want) in lrs.iter().enumerate() {
        let got = sched.lr_at(t as u64);
        let err = (got - want).abs();
        assert!(err <= 1e-9 * want.abs().max(1e-12 / 1e-9), "{name} step {t}: got {got:e}, torch {want:e}");
        worst = worst.max(err / want.abs().max(1e-300));
    }
    worst
}

/// One row-sparse step: table, rows, values.
type SparseStep = Box<dyn FnMut(&mut [f32], &[usize], &[f32]) + Send>;

fn check_sparse(name: &str, v: &Value) -> f64 {
    use adaoptim::sparse::{SparseAdagrad, SparseAdam, SparseAdamConfig};
    use adaoptim::{AdagradConfig, AnyConfig, Exec};
    let class = v["torch_class"].as_str().expect("torch_class");
    let rows = v["rows"].as_u64().expect("rows") as usize;
    let dim = v["dim"].as_u64().expect("dim") as usize;
    let steps = v["steps"].as_u64().expect("steps") as usize;
    let p0 = f32s(&v["params0"]);
    let grad_rows: Vec<Vec<usize>> = v["grad_rows"]
        .as_array()
        .expect("grad_rows")
        .iter()
        .map(|r| r.as_array().expect("rows").iter().map(|x| x.as_u64().expect("row") as usize).collect())
        .collect();
    let grad_values: Vec<Vec<f32>> = v["grad_values"].as_array().expect("grad_values").iter().map(f32s).collect();
    let want: Vec<Vec<f32>> = v["params"].as_array().expect("params").iter().map(f32s).collect();
    assert!(grad_rows.len() == steps && grad_values.len() == steps && want.len() == steps, "{name}: steps");
    let opts = v["options"].as_object().expect("options");
    let mut worst: f64 = 0.0;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut paths = all_paths();
    paths
        .push(("parallel-auto-rows".into(), Exec { backend: None, parallel: adaoptim::Parallel::Chunks { chunk: 1 } }));
    for (path, exec) in paths {
        let mut p = p0.clone();
        let mut step: SparseStep = match class {
            "SparseAdam" => {
                let mut c = SparseAdamConfig::default();
                for (k, x) in opts.iter().filter(|(_, x)| !x.is_null()) {
                    match k.as_str() {
                        "lr" => c.lr = x.as_f64().unwrap(),
                        "eps" => c.eps = x.as_f64().unwrap(),
                        "betas" => c.betas = (x[0].as_f64().unwrap(), x[1].as_f64().unwrap()),
                        "maximize" => c.maximize = x.as_bool().unwrap(),
                        "foreach" | "fused" | "differentiable" | "capturable" => {}
                        other => panic!("{name}: cannot interpret SparseAdam option {other}"),
                    }
                }
                let mut o = SparseAdam::new(c, rows, dim).unwrap();
                o.set_exec(exec);
                Box::new(move |p, r, g| {
                    o.step(p, r, g).unwrap();
                })
            }
            "Adagrad" => {
                let cfg = config_from_json("Adagrad", &v["options"]).unwrap();
                let AnyConfig::Adagrad(c) = cfg else { unreachable!() };
                let mut o = SparseAdagrad::new(c as AdagradConfig, rows, dim).unwrap();
                o.set_exec(exec);
                Box::new(move |p, r, g| {
                    o.step(p, r, g).unwrap();
                })
            }
            other => panic!("{name}: unknown sparse class {other}"),
        };
        for t in 0..steps {
            pool.install(|| step(&mut p, &grad_rows[t], &grad_values[t]));
            worst = worst.max(worst_fraction(name, &path, t, &p, &want[t]));
        }
    }
    worst
}
