//! Checkpoint interchange with PyTorch, driven by
//! `tests/torch_interop/check.py` (which needs torch and safetensors):
//!
//! ```sh
//! # run the steps in RUN.json from its params0, save the optimizer, write the params
//! cargo run --release --example interop -- save RUN.json CKPT.safetensors PARAMS.json
//! # load CKPT (written by torch or by us), run the steps in RUN.json from its params0
//! cargo run --release --example interop -- resume RUN.json CKPT.safetensors PARAMS.json
//! ```
//! `RUN.json`: `{"torch_class", "options", "params0", "grads": [[...], ...]}`.

use adaoptim::{AnyConfig, AnyOptimizer, HyperValue};
use serde_json::Value;

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn options(v: &Value) -> Vec<(String, HyperValue)> {
    let obj = v.as_object().expect("options object");
    obj.iter()
        .map(|(k, x)| {
            let h = match x {
                Value::Bool(b) => HyperValue::Bool(*b),
                Value::Array(a) => HyperValue::Pair(a[0].as_f64().unwrap(), a[1].as_f64().unwrap()),
                _ => HyperValue::Number(x.as_f64().expect("number")),
            };
            (k.clone(), h)
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, run, ckpt, out] = args.as_slice() else {
        return Err("usage: interop save|resume RUN.json CKPT.safetensors PARAMS.json".into());
    };
    let run: Value = serde_json::from_str(&std::fs::read_to_string(run)?)?;
    let mut p = f32s(&run["params0"]);
    let grads: Vec<Vec<f32>> = run["grads"].as_array().expect("grads").iter().map(f32s).collect();
    let mut opt = match mode.as_str() {
        "save" => {
            let class = run["torch_class"].as_str().expect("torch_class");
            let opts = options(&run["options"]);
            let opts: Vec<(&str, HyperValue)> = opts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            AnyConfig::from_torch(class, &opts)?.build(p.len())?
        }
        "resume" => AnyOptimizer::from_safetensors(&std::fs::read(ckpt)?)?,
        other => return Err(format!("unknown mode {other}").into()),
    };
    for g in &grads {
        opt.step(&mut p, g)?;
    }
    if mode == "save" {
        opt.save(ckpt)?;
    }
    std::fs::write(out, serde_json::to_string(&p)?)?;
    Ok(())
}
