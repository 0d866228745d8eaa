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
//! (resume takes the parameters from the checkpoint). Modes `sparse-save` and
//! `sparse-resume` do it for `SparseAdam` and row-sparse `Adagrad`:
//! `{"torch_class", "options", "rows", "dim", "params0" (the flat table),
//! "grad_rows": [[...] per step], "grad_values": [[...] per step]}`.

use adaoptim::groups::GroupedOptimizer;
use adaoptim::*;
use serde_json::Value;

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

/// The run's torch keyword arguments as a configuration.
fn config(class: &str, options: &Value) -> Result<AnyConfig> {
    Ok(AnyConfig::from_torch_json(class, &options.to_string())?)
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The grouped modes, for one configuration type; `typed` unwraps it.
fn grouped<A: Algorithm>(mode: &str, run: &Value, ckpt: &str, typed: fn(AnyConfig) -> Option<A>) -> Result<Value> {
    let class = run["torch_class"].as_str().expect("torch_class");
    let mut opt = if mode == "grouped-save" {
        let mut opt = GroupedOptimizer::<A>::new();
        for g in run["groups"].as_array().expect("groups") {
            let sizes: Vec<usize> =
                g["sizes"].as_array().expect("sizes").iter().map(|x| x.as_u64().unwrap() as usize).collect();
            opt.add_group(typed(config(class, &g["options"])?).expect("class"), &sizes)?;
        }
        for (i, p0) in run["params0"].as_array().expect("params0").iter().enumerate() {
            opt.params_mut(opt.tensor_id(i).expect("tensor")).unwrap().copy_from_slice(&f32s(p0));
        }
        opt
    } else {
        GroupedOptimizer::<A>::from_safetensors(&std::fs::read(ckpt)?)?
    };
    for step in run["grads"].as_array().expect("grads") {
        for (i, g) in step.as_array().expect("per tensor").iter().enumerate() {
            opt.grads_mut(opt.tensor_id(i).expect("tensor")).unwrap().copy_from_slice(&f32s(g));
        }
        opt.step()?;
    }
    if mode == "grouped-save" {
        opt.save(ckpt)?;
    }
    Ok(Value::from(
        (0..opt.num_tensors())
            .map(|i| opt.params(opt.tensor_id(i).expect("tensor")).unwrap().to_vec())
            .collect::<Vec<_>>(),
    ))
}

/// What the sparse modes need of a row-sparse optimizer.
trait Rows {
    fn step_rows(&mut self, table: &mut [f32], rows: &[usize], values: &[f32]) -> Result<()>;
    fn bytes(&self) -> Result<Vec<u8>>;
}

macro_rules! rows_for {
    ($($t:ty),*) => {$(
        impl Rows for $t {
            fn step_rows(&mut self, table: &mut [f32], rows: &[usize], values: &[f32]) -> Result<()> {
                self.step(table, rows, values)?;
                Ok(())
            }
            fn bytes(&self) -> Result<Vec<u8>> {
                Ok(self.to_safetensors()?)
            }
        }
    )*};
}
rows_for!(adaoptim::sparse::SparseAdam, adaoptim::sparse::SparseAdagrad);

/// The sparse modes.
fn sparse(mode: &str, run: &Value, ckpt: &str) -> Result<Vec<f32>> {
    use adaoptim::sparse::{SparseAdagrad, SparseAdam, SparseAdamConfig};
    let class = run["torch_class"].as_str().expect("torch_class");
    let (rows, dim) = (run["rows"].as_u64().expect("rows") as usize, run["dim"].as_u64().expect("dim") as usize);
    let saving = mode == "sparse-save";
    let o = &run["options"];
    let mut opt: Box<dyn Rows> = match (class, saving) {
        ("SparseAdam", true) => {
            Box::new(SparseAdam::new(SparseAdamConfig::from_torch_json(&o.to_string())?, rows, dim)?)
        }
        ("SparseAdam", false) => Box::new(SparseAdam::from_safetensors(&std::fs::read(ckpt)?)?),
        ("Adagrad", true) => {
            let AnyConfig::Adagrad(c) = config("Adagrad", o)? else { unreachable!() };
            Box::new(SparseAdagrad::new(c, rows, dim)?)
        }
        ("Adagrad", false) => Box::new(SparseAdagrad::from_safetensors(&std::fs::read(ckpt)?)?),
        (other, _) => return Err(format!("no sparse {other}").into()),
    };
    let mut table = f32s(&run["params0"]);
    let values = run["grad_values"].as_array().expect("grad_values");
    for (r, v) in run["grad_rows"].as_array().expect("grad_rows").iter().zip(values) {
        let r: Vec<usize> = r.as_array().expect("rows").iter().map(|x| x.as_u64().unwrap() as usize).collect();
        opt.step_rows(&mut table, &r, &f32s(v))?;
    }
    if saving {
        adaoptim::checkpoint::write_atomic(std::path::Path::new(ckpt), &opt.bytes()?)?;
    }
    Ok(table)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, run, ckpt, out] = args.as_slice() else {
        return Err(
            "usage: interop save|resume|grouped-save|grouped-resume RUN.json CKPT.safetensors PARAMS.json".into()
        );
    };
    let run: Value = serde_json::from_str(&std::fs::read_to_string(run)?)?;
    if mode.starts_with("sparse-") {
        std::fs::write(out, serde_json::to_string(&sparse(mode, &run, ckpt)?)?)?;
        return Ok(());
    }
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
        "save" => config(run["torch_class"].as_str().expect("torch_class"), &run["options"])?.build(p.len())?,
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
