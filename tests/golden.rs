//! Checks the crate against real PyTorch trajectories.
//!
//! Reads every `*.json` file in `ADAOPTIM_GOLDEN_DIR` (default: the
//! repository's copy in `tests/golden`), dispatches on `kind`, `torch_class`
//! and `options`, and fails on any file it cannot interpret. Tolerance, from
//! the golden README: `|p - expected| <= 1e-5 * |expected| + 1e-6`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

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

fn load_all() -> Vec<(String, Value)> {
    let dir = golden_dir();
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

fn check_optimizer(name: &str, v: &Value) -> f64 {
    let class = v["torch_class"].as_str().expect("torch_class");
    let cfg = config_from_json(class, &v["options"]).unwrap_or_else(|e| panic!("{name}: cannot build {class}: {e}"));
    let n = v["n"].as_u64().expect("n") as usize;
    let steps = v["steps"].as_u64().expect("steps") as usize;
    let p0 = f32s(&v["params0"]);
    let grads: Vec<Vec<f32>> = v["grads"].as_array().expect("grads").iter().map(f32s).collect();
    let want: Vec<Vec<f32>> = v["params"].as_array().expect("params").iter().map(f32s).collect();
    assert_eq!(p0.len(), n, "{name}: params0 length");
    assert!(grads.len() == steps && want.len() == steps, "{name}: steps");
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
    let mut checked: BTreeMap<&str, usize> = BTreeMap::new();
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    let mut worst_by_class: BTreeMap<String, f64> = BTreeMap::new();
    for (name, v) in load_all() {
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
            "schedule" | "sparse_optimizer" => *skipped.entry(kind.to_string()).or_default() += 1,
            other => panic!("{name}: unknown kind {other:?}"),
        }
    }
    for (class, w) in &worst_by_class {
        println!("golden: worst {class}: {w:.4} of tolerance");
    }
    println!("golden: {} optimizer files checked", checked.get("optimizer").copied().unwrap_or(0));
    for (kind, n) in &skipped {
        println!("golden: {n} {kind} files skipped");
    }
    assert!(checked.get("optimizer").copied().unwrap_or(0) > 0, "no optimizer files found");
}
