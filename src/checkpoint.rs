//! Checkpoints in the safetensors format, readable from PyTorch.
//!
//! A checkpoint holds the whole optimizer: its kind, hyperparameters, step
//! count and every state buffer. Tensors carry torch's `state_dict` names
//! (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`, `sum`, `square_avg`,
//! `acc_delta`, `grad_avg`, `momentum_buffer`, `exp_inf`, `mu_product`,
//! `step`), all `F32` (`step` and `mu_product` as 0-d tensors, as torch keeps
//! them). The metadata holds:
//!
//! | key | value |
//! |---|---|
//! | `format` | `adaoptim-optimizer` |
//! | `format_version` | `1` |
//! | `torch_class` | `Adam`, `SGD`, ... |
//! | `n` | parameter count |
//! | `step` | the exact step count (the `step` tensor is f32, as in torch) |
//! | `param_groups` | JSON, torch's `param_groups` entry: `[{"lr": 0.001, "betas": [0.9, 0.999], ...}]` |
//!
//! From Python: `safetensors.torch.load_file(path)` gives the tensors and
//! `safe_open(path, "pt").metadata()` the rest.
//!
//! Writes are atomic: the bytes go to a temporary file in the same folder,
//! which is flushed to disk (`fsync`) and renamed over the target, and the
//! folder is synced; a crash at any point leaves the previous checkpoint
//! intact. Loading checks format, version, kind, sizes and dtypes and
//! returns [`Error::Checkpoint`] for anything truncated, corrupted or
//! mismatched; an optimizer being restored is unchanged on error.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Map, Value};

use crate::{Algorithm, AnyConfig, Error, HyperValue, Optimizer};

/// The `format` metadata value.
pub const FORMAT: &str = "adaoptim-optimizer";
/// The `format_version` this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

fn bad(reason: impl Into<String>) -> Error {
    Error::Checkpoint { reason: reason.into() }
}

fn io(e: std::io::Error) -> Error {
    Error::Io { kind: e.kind(), message: e.to_string() }
}

fn le_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn options_json(config: &AnyConfig) -> Value {
    let mut m = Map::new();
    for (k, v) in config.options() {
        let j = match v {
            HyperValue::Number(x) => Value::from(x),
            HyperValue::Bool(b) => Value::from(b),
            HyperValue::Pair(a, b) => Value::from(vec![a, b]),
        };
        m.insert(k.to_string(), j);
    }
    Value::Array(vec![Value::Object(m)])
}

fn options_from_json(class: &str, v: &Value) -> Result<AnyConfig, Error> {
    let group = match v {
        Value::Array(groups) if groups.len() == 1 => &groups[0],
        _ => return Err(bad("param_groups must hold exactly one group")),
    };
    let obj = group.as_object().ok_or_else(|| bad("param_groups[0] is not an object"))?;
    let mut opts = Vec::with_capacity(obj.len());
    for (k, v) in obj {
        let h = match v {
            Value::Bool(b) => HyperValue::Bool(*b),
            Value::Number(x) => HyperValue::Number(x.as_f64().ok_or_else(|| bad(format!("{k}: not a number")))?),
            Value::Array(a) if a.len() == 2 => match (a[0].as_f64(), a[1].as_f64()) {
                (Some(x), Some(y)) => HyperValue::Pair(x, y),
                _ => return Err(bad(format!("{k}: not a pair of numbers"))),
            },
            _ => return Err(bad(format!("{k}: unsupported value {v}"))),
        };
        opts.push((k.as_str(), h));
    }
    AnyConfig::from_torch(class, &opts).map_err(|e| bad(format!("hyperparameters: {e}")))
}

fn read_f32s(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
    let t = st.tensor(name).map_err(|_| bad(format!("missing tensor {name:?}")))?;
    if t.dtype() != Dtype::F32 {
        return Err(bad(format!("tensor {name:?} has dtype {:?}, expected F32", t.dtype())));
    }
    if t.shape() != shape {
        return Err(bad(format!("tensor {name:?} has shape {:?}, expected {shape:?}", t.shape())));
    }
    let data = t.data();
    let count: usize = shape.iter().product();
    if data.len() != count * 4 {
        return Err(bad(format!("tensor {name:?} holds {} bytes, expected {}", data.len(), count * 4)));
    }
    Ok(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// The `torch_class` a checkpoint holds.
///
/// # Errors
/// [`Error::Checkpoint`] if the bytes are not a checkpoint of this format.
pub fn torch_class_of(bytes: &[u8]) -> Result<String, Error> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
    let meta = metadata.metadata().as_ref().ok_or_else(|| bad("no metadata"))?;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("not an {FORMAT} checkpoint")));
    }
    meta.get("torch_class").cloned().ok_or_else(|| bad("metadata has no \"torch_class\""))
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync
/// of the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| bad("checkpoint path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        // Make the rename itself durable. Opening a folder is not possible on
        // every platform; where it fails the rename still happened.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl<A: Algorithm> Optimizer<A> {
    /// The whole optimizer as safetensors bytes (see the [module docs](self)).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails (it does not for valid state).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        meta.insert("torch_class".to_string(), A::TORCH_CLASS.to_string());
        meta.insert("n".to_string(), self.n.to_string());
        meta.insert("step".to_string(), self.t.to_string());
        meta.insert("param_groups".to_string(), options_json(&self.config.to_any()).to_string());
        let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .config
            .state_names()
            .iter()
            .zip(&self.state)
            .map(|(name, buf)| (name.to_string(), vec![self.n], le_bytes(buf)))
            .collect();
        blobs.push(("step".to_string(), vec![], (self.t as f32).to_le_bytes().to_vec()));
        if let Some(name) = A::AUX_NAME {
            blobs.push((name.to_string(), vec![], A::aux_to_f32(&self.aux).to_le_bytes().to_vec()));
        }
        let views = blobs
            .iter()
            .map(|(name, shape, data)| Ok((name.as_str(), TensorView::new(Dtype::F32, shape.clone(), data)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| bad(e.to_string()))?;
        safetensors::serialize(views, Some(meta)).map_err(|e| bad(e.to_string()))
    }

    /// Saves the optimizer to `path` atomically.
    ///
    /// # Errors
    /// [`Error::Io`]; the previous file at `path`, if any, is intact then.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        write_atomic(path.as_ref(), &self.to_safetensors()?)
    }

    /// A new optimizer from safetensors bytes written by
    /// [`to_safetensors`](Self::to_safetensors). Its execution policy is the
    /// default ([`Exec::auto`](crate::Exec::auto)).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming what is wrong: not safetensors, wrong
    /// format or version, another optimizer kind, bad hyperparameters, a
    /// missing, extra or mis-sized tensor, a wrong dtype.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
        let meta = metadata.metadata().as_ref().ok_or_else(|| bad("no metadata"))?;
        let get = |k: &str| meta.get(k).map(String::as_str).ok_or_else(|| bad(format!("metadata has no {k:?}")));
        if get("format")? != FORMAT {
            return Err(bad(format!("format is {:?}, expected {FORMAT:?}", get("format")?)));
        }
        if get("format_version")? != FORMAT_VERSION.to_string() {
            return Err(bad(format!(
                "format_version {:?} is not supported (this crate reads {FORMAT_VERSION})",
                get("format_version")?
            )));
        }
        let class = get("torch_class")?;
        if class != A::TORCH_CLASS {
            return Err(bad(format!("checkpoint holds {class}, expected {}", A::TORCH_CLASS)));
        }
        let n: usize = get("n")?.parse().map_err(|_| bad("n is not a count"))?;
        let t: u64 = get("step")?.parse().map_err(|_| bad("step is not a count"))?;
        let groups: Value =
            serde_json::from_str(get("param_groups")?).map_err(|e| bad(format!("param_groups: {e}")))?;
        let any = options_from_json(class, &groups)?;
        let config = A::from_any(&any).ok_or_else(|| bad("hyperparameters of another kind"))?;
        let names = config.state_names();
        let expected = names.len() + 1 + usize::from(A::AUX_NAME.is_some());
        if st.len() != expected {
            let found: Vec<&str> = st.names();
            return Err(bad(format!("tensors {found:?} do not match the state {names:?} + step")));
        }
        let step_tensor = read_f32s(&st, "step", &[])?[0];
        if step_tensor != t as f32 {
            return Err(bad(format!("step tensor {step_tensor} disagrees with metadata step {t}")));
        }
        let aux = match A::AUX_NAME {
            Some(name) => {
                let x = read_f32s(&st, name, &[])?[0];
                A::aux_from_f32(x).ok_or_else(|| bad(format!("bad {name}")))?
            }
            None => config.aux_init(),
        };
        // Sizes are checked against `n` before anything is allocated for it.
        let mut opt = Optimizer::new(config, 0)?;
        let mut state = Vec::with_capacity(names.len());
        for name in names {
            let v = read_f32s(&st, name, &[n])?;
            state.push(aligned_vec::AVec::from_slice(64, &v));
        }
        opt.n = n;
        opt.t = t;
        opt.aux = aux;
        opt.state = state;
        Ok(opt)
    }

    /// Loads an optimizer saved with [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Checkpoint`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(io)?;
        Self::from_safetensors(&bytes)
    }

    /// Replaces this optimizer's configuration, step count and state with a
    /// checkpoint's, keeping the execution policy, non-finite policy and loss
    /// scale. The checkpoint must be of the same kind and size.
    ///
    /// # Errors
    /// As [`from_safetensors`](Self::from_safetensors), and
    /// [`Error::Checkpoint`] for another parameter count. `self` is unchanged
    /// on error.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let loaded = Self::from_safetensors(bytes)?;
        if loaded.n != self.n {
            return Err(bad(format!("checkpoint has {} parameters, this optimizer {}", loaded.n, self.n)));
        }
        self.config = loaded.config;
        self.t = loaded.t;
        self.aux = loaded.aux;
        self.state = loaded.state;
        Ok(())
    }
}
