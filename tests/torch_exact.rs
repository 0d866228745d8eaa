//! The torch-exact evaluation (`torch_exact: true`) against real torch
//! bits: Adam, AdamW, RMSprop, Adagrad, Adadelta, RAdam and NAdam
//! trajectories written by torch 2.15's single-tensor
//! CPU path where its MKL takes the AVX-512 path
//! (`tests/torch_exact/generate.py`), reproduced bit for bit on every step,
//! by every backend of this machine, serial and parallel. The default
//! evaluation stays within the golden tolerance but is not bit-identical on
//! these files, which shows the data tells the two apart.

mod common;

use std::path::PathBuf;

use common::{all_paths, config_from_json, f32s, same_bits};
use serde_json::Value;

fn cases() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/torch_exact");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 28, "the torch-exact trajectories are in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect()
}

/// Steps of the file on which `exec` gives torch's bits, each step started
/// from torch's parameters; panics on a NaN where torch has none.
fn identical_steps(name: &str, v: &Value, torch_exact: bool, exec: adaoptim::Exec) -> usize {
    let mut options = v["options"].clone();
    options["torch_exact"] = Value::Bool(torch_exact);
    let class = v["torch_class"].as_str().unwrap();
    let cfg = config_from_json(class, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
    let n = v["n"].as_u64().unwrap() as usize;
    let grads: Vec<Vec<f32>> = v["grads"].as_array().unwrap().iter().map(f32s).collect();
    let want: Vec<Vec<f32>> = v["params"].as_array().unwrap().iter().map(f32s).collect();
    let mut opt = cfg.build(n).unwrap();
    opt.set_exec(exec);
    let mut p = f32s(&v["params0"]);
    let mut same = 0;
    for (g, w) in grads.iter().zip(&want) {
        opt.step(&mut p, g).unwrap();
        same += usize::from(p.iter().zip(w).all(|(a, b)| same_bits(*a, *b)));
        p.clone_from(w);
    }
    same
}

#[test]
fn torch_exact_gives_torchs_bits() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for (name, v) in cases() {
        let steps = v["steps"].as_u64().unwrap() as usize;
        for (path, exec) in all_paths() {
            let same = pool.install(|| identical_steps(&name, &v, true, exec));
            assert_eq!(same, steps, "{name} [{path}]: {same} of {steps} steps bit-identical to torch");
        }
    }
}

#[test]
fn default_evaluation_is_not_bit_identical_on_these_files() {
    let (mut same, mut total) = (0, 0);
    for (name, v) in cases() {
        same += identical_steps(&name, &v, false, adaoptim::Exec::default());
        total += v["steps"].as_u64().unwrap() as usize;
    }
    eprintln!("default evaluation: {same} of {total} steps bit-identical to torch");
    assert!(same < total, "default evaluation: all {total} steps bit-identical");
}
