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
//! Modes `grouped-save` and `grouped-resume` do the same for a
//! [`GroupedOptimizer`]: `{"torch_class", "groups": [{"options", "sizes"}],
//! "params0": [[...] per tensor], "grads": [[[...] per tensor] per step]}`
//! (resume takes the parameters from the checkpoint).

use adaoptim::groups::GroupedOptimizer;
use adaoptim::*;
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

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The grouped modes, for one configuration type; `typed` unwraps it.
fn grouped<A: Algorithm>(mode: &str, run: &Value, ckpt: &str, typed: fn(AnyConfig) -> Option<A>) -> Result<Value> {
    let class = run["torch_class"].as_str().expect("torch_class");
    let mut opt = if mode == "grouped-save" {
        let mut opt = GroupedOptimizer::<A>::new();
        for g in run["groups"].as_array().expect("groups") {
            let opts = options(&g["options"]);
            let opts: Vec<(&str, HyperValue)> = opts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let sizes: Vec<usize> =
                g["sizes"].as_array().expect("sizes").iter().map(|x| x.as_u64().unwrap() as usize).collect();
            opt.add_group(typed(AnyConfig::from_torch(class, &opts)?).expect("class"), &sizes)?;
        }
        for (i, p0) in run["params0"].as_array().expect("params0").iter().enumerate() {
            opt.params_mut(opt.tensor_id(i).expect("tensor")).copy_from_slice(&f32s(p0));
        }
        opt
    } else {
        GroupedOptimizer::<A>::from_safetensors(&std::fs::read(ckpt)?)?
    };
    for step in run["grads"].as_array().expect("grads") {
        for (i, g) in step.as_array().expect("per tensor").iter().enumerate() {
            opt.grads_mut(opt.tensor_id(i).expect("tensor")).copy_from_slice(&f32s(g));
        }
        opt.step()?;
    }
    if mode == "grouped-save" {
        opt.save(ckpt)?;
    }
    Ok(Value::from(
        (0..opt.num_tensors()).map(|i| opt.params(opt.tensor_id(i).expect("tensor")).to_vec()).collect::<Vec<_>>(),
    ))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, run, ckpt, out] = args.as_slice() else {
        return Err(
            "usage: interop save|resume|grouped-save|grouped-resume RUN.json CKPT.safetensors PARAMS.json".into()
        );
    };
    let run: Value = serde_json::from_str(&std::fs::read_to_string(run)?)?;
    if mode.starts_with("grouped-") {
        macro_rules! by_class {
            ($($variant:ident($cfg:ty)),*) => {
                match run["torch_class"].as_str().expect("torch_class") {
                    $(<$cfg as Algorithm>::TORCH_CLASS => grouped::<$cfg>(mode, &run, ckpt, |a| match a {
                        AnyConfig::$variant(c) => Some(c),
                        _ => None,
                    })?,)*
                    other => return Err(format!("unknown class {other}").into()),
                }
            };
        }
        let params = by_class!(
            Sgd(SgdConfig),
            Adagrad(AdagradConfig),
            RmsProp(RmsPropConfig),
            Adadelta(AdadeltaConfig),
            Adam(AdamConfig),
            AdamW(AdamWConfig),
            Adamax(AdamaxConfig),
            NAdam(NAdamConfig)
        );
        std::fs::write(out, serde_json::to_string(&params)?)?;
        return Ok(());
    }
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
