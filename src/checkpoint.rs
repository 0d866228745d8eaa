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
//! | `param_groups` | JSON, torch's `param_groups` entry: `[{"lr": 0.001, "betas": [0.9, 0.999], ...}]`; `eps_inside_sqrt` (not a torch option) appears only when on |
//! | `layout` | `dense` ([`Optimizer`]), `grouped` ([`GroupedOptimizer`](crate::groups::GroupedOptimizer)) or `sparse` ([`sparse`](crate::sparse) optimizers) |
//!
//! A grouped checkpoint names each tensor's state `state.{i}.exp_avg`, ...
//! (torch's `state_dict()["state"][i]`), lists each group's tensor indices under
//! `"params"` in `param_groups` as torch does, and also holds the parameters
//! themselves as `params.{i}` (the arena owns them; torch keeps them in the
//! model's `state_dict`). A sparse checkpoint holds `rows x dim` state tensors
//! (`exp_avg`, `exp_avg_sq` for SparseAdam, `sum` for Adagrad; row-wise
//! AdaGrad's per-row `sum` is `rows` long) and `rows`, `dim` in the metadata.
//!
//! From Python: `safetensors.torch.load_file(path)` gives the tensors and
//! `safe_open(path, "pt").metadata()` the rest.
//!
//! Not saved, as torch's `state_dict` does not save them either: the
//! execution policy, the guards (non-finite policy, loss scale, clipping
//! norm; torch keeps these in `GradScaler` and the training loop) and
//! schedules (code, not data). A loaded optimizer starts with the defaults;
//! [`Optimizer::restore`] keeps the ones already set.
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

/// Options of ours that torch's constructors do not take. They are written
/// only when set, so that torch can take a `param_groups` entry as keyword
/// arguments whenever the configuration is one torch has.
const EXTENSION_KEYS: [&str; 1] = ["eps_inside_sqrt"];

pub(crate) fn options_json(options: Vec<(&'static str, HyperValue)>) -> Map<String, Value> {
    let mut m = Map::new();
    for (k, v) in options {
        if EXTENSION_KEYS.contains(&k) && v == HyperValue::Bool(false) {
            continue;
        }
        let j = match v {
            HyperValue::Number(x) => Value::from(x),
            HyperValue::Bool(b) => Value::from(b),
            HyperValue::Pair(a, b) => Value::from(vec![a, b]),
        };
        m.insert(k.to_string(), j);
    }
    m
}

/// Keys of a torch `param_groups` entry that are not optimizer options:
/// the parameter indices, and the rate an `lr_scheduler` records at its start.
const GROUP_KEYS: [&str; 2] = ["params", "initial_lr"];

/// torch keyword arguments from JSON (see [`AnyConfig::from_torch_json`]) as
/// option pairs; keys in `skip` and [`GROUP_KEYS`] are ignored, and torch's
/// `None` (JSON `null`) is accepted for the implementation switches
/// (`foreach`, `fused`, ...), which torch writes so.
pub(crate) fn kwargs_from_json<'a>(kwargs: &'a Value, skip: &[&str]) -> Result<Vec<(&'a str, HyperValue)>, Error> {
    let invalid = |name: &str, reason| Error::InvalidOption { name: name.to_string(), reason };
    let obj = kwargs.as_object().ok_or_else(|| invalid("kwargs", "not a JSON object"))?;
    let mut opts = Vec::with_capacity(obj.len());
    let ignored = |k: &str, v: &Value| {
        skip.contains(&k) || GROUP_KEYS.contains(&k) || (v.is_null() && crate::any::IMPLEMENTATION_KEYS.contains(&k))
    };
    for (k, v) in obj.iter().filter(|(k, v)| !ignored(k, v)) {
        let h = match v {
            Value::Bool(b) => HyperValue::Bool(*b),
            Value::Number(x) => HyperValue::Number(x.as_f64().ok_or_else(|| invalid(k, "not a number"))?),
            Value::Array(a) if a.len() == 2 => match (a[0].as_f64(), a[1].as_f64()) {
                (Some(x), Some(y)) => HyperValue::Pair(x, y),
                _ => return Err(invalid(k, "not a pair of numbers")),
            },
            _ => return Err(invalid(k, "not a number, flag or pair of numbers")),
        };
        opts.push((k.as_str(), h));
    }
    Ok(opts)
}

/// JSON text parsed as a value, or [`Error::InvalidOption`].
pub(crate) fn parse_kwargs(kwargs: &str) -> Result<Value, Error> {
    serde_json::from_str(kwargs)
        .map_err(|_| Error::InvalidOption { name: "kwargs".to_string(), reason: "not valid JSON" })
}

/// The configuration of one `param_groups` entry of a checkpoint.
pub(crate) fn options_from_json(class: &str, group: &Value, skip: &[&str]) -> Result<AnyConfig, Error> {
    kwargs_from_json(group, skip)
        .and_then(|opts| AnyConfig::from_torch(class, &opts))
        .map_err(|e| bad(format!("hyperparameters: {e}")))
}

/// Builds a checkpoint: metadata and `F32` tensors.
pub(crate) struct Writer {
    meta: HashMap<String, String>,
    tensors: Vec<(String, Vec<usize>, Vec<u8>)>,
}

impl Writer {
    pub(crate) fn new(torch_class: &str, layout: &str, step: u64) -> Writer {
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        meta.insert("torch_class".to_string(), torch_class.to_string());
        meta.insert("layout".to_string(), layout.to_string());
        meta.insert("step".to_string(), step.to_string());
        let mut w = Writer { meta, tensors: Vec::new() };
        w.scalar("step", step as f32);
        w
    }
    pub(crate) fn meta(&mut self, key: &str, value: impl ToString) {
        self.meta.insert(key.to_string(), value.to_string());
    }
    pub(crate) fn tensor(&mut self, name: impl Into<String>, shape: Vec<usize>, data: &[f32]) {
        self.tensors.push((name.into(), shape, data.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    pub(crate) fn scalar(&mut self, name: impl Into<String>, x: f32) {
        self.tensor(name, vec![], &[x]);
    }
    pub(crate) fn finish(self) -> Result<Vec<u8>, Error> {
        let views = self
            .tensors
            .iter()
            .map(|(name, shape, data)| Ok((name.as_str(), TensorView::new(Dtype::F32, shape.clone(), data)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| bad(e.to_string()))?;
        safetensors::serialize(views, Some(self.meta)).map_err(|e| bad(e.to_string()))
    }
}

/// Reads and checks a checkpoint.
pub(crate) struct Reader<'a> {
    st: SafeTensors<'a>,
    meta: HashMap<String, String>,
    /// The exact step count.
    pub(crate) step: u64,
}

impl<'a> Reader<'a> {
    /// Parses `bytes` and checks format, version, kind and layout.
    pub(crate) fn open(bytes: &'a [u8], torch_class: &str, layout: &str) -> Result<Reader<'a>, Error> {
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
        let meta = metadata.metadata().clone().ok_or_else(|| bad("no metadata"))?;
        let mut r = Reader { st, meta, step: 0 };
        if r.meta("format")? != FORMAT {
            return Err(bad(format!("format is {:?}, expected {FORMAT:?}", r.meta("format")?)));
        }
        if r.meta("format_version")? != FORMAT_VERSION.to_string() {
            return Err(bad(format!(
                "format_version {:?} is not supported (this crate reads {FORMAT_VERSION})",
                r.meta("format_version")?
            )));
        }
        if r.meta("torch_class")? != torch_class {
            return Err(bad(format!("checkpoint holds {}, expected {torch_class}", r.meta("torch_class")?)));
        }
        if r.meta("layout")? != layout {
            return Err(bad(format!("checkpoint layout is {}, expected {layout}", r.meta("layout")?)));
        }
        r.step = r.parse("step")?;
        let step_tensor = r.scalar("step")?;
        if step_tensor != r.step as f32 {
            return Err(bad(format!("step tensor {step_tensor} disagrees with metadata step {}", r.step)));
        }
        Ok(r)
    }

    pub(crate) fn meta(&self, key: &str) -> Result<&str, Error> {
        self.meta.get(key).map(String::as_str).ok_or_else(|| bad(format!("metadata has no {key:?}")))
    }

    pub(crate) fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<T, Error> {
        self.meta(key)?.parse().map_err(|_| bad(format!("metadata {key:?} is not a number")))
    }

    pub(crate) fn json(&self, key: &str) -> Result<Value, Error> {
        serde_json::from_str(self.meta(key)?).map_err(|e| bad(format!("{key}: {e}")))
    }

    /// Exactly this many tensors (so nothing unexpected is silently ignored).
    pub(crate) fn expect_count(&self, n: usize) -> Result<(), Error> {
        if self.st.len() != n {
            return Err(bad(format!("{} tensors, expected {n}", self.st.len())));
        }
        Ok(())
    }

    pub(crate) fn f32s(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        let t = self.st.tensor(name).map_err(|_| bad(format!("missing tensor {name:?}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!("tensor {name:?} has dtype {:?}, expected F32", t.dtype())));
        }
        if t.shape() != shape {
            return Err(bad(format!("tensor {name:?} has shape {:?}, expected {shape:?}", t.shape())));
        }
        let data = t.data();
        let count = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).ok_or_else(|| bad("shape overflows"))?;
        if count.checked_mul(4) != Some(data.len()) {
            return Err(bad(format!("tensor {name:?} holds {} bytes, expected {count} floats", data.len())));
        }
        Ok(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// The shape of an `F32` tensor.
    pub(crate) fn shape(&self, name: &str) -> Result<Vec<usize>, Error> {
        let t = self.st.tensor(name).map_err(|_| bad(format!("missing tensor {name:?}")))?;
        Ok(t.shape().to_vec())
    }

    pub(crate) fn buffer(&self, name: &str, shape: &[usize]) -> Result<crate::memory::Buffer, Error> {
        Ok(crate::memory::copied(&self.f32s(name, shape)?))
    }

    pub(crate) fn scalar(&self, name: &str) -> Result<f32, Error> {
        Ok(self.f32s(name, &[])?[0])
    }
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

/// Reads a whole file.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(io)
}

impl<A: Algorithm> Optimizer<A> {
    /// The whole optimizer as safetensors bytes (see the [module docs](self)).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails (it does not for valid state).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let mut w = Writer::new(A::TORCH_CLASS, "dense", self.t);
        w.meta("n", self.n);
        w.meta("param_groups", Value::Array(vec![Value::Object(options_json(self.config.to_any().options()))]));
        for (name, buf) in self.config.state_names().iter().zip(&self.state) {
            w.tensor(*name, vec![self.n], buf);
        }
        if let Some(name) = A::AUX_NAME {
            w.scalar(name, A::aux_to_f32(&self.aux));
        }
        w.finish()
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
        let r = Reader::open(bytes, A::TORCH_CLASS, "dense")?;
        let n: usize = r.parse("n")?;
        let groups = r.json("param_groups")?;
        let group = match &groups {
            Value::Array(g) if g.len() == 1 => &g[0],
            _ => return Err(bad("param_groups must hold exactly one group")),
        };
        let any = options_from_json(A::TORCH_CLASS, group, &[])?;
        let config = A::from_any(&any).ok_or_else(|| bad("hyperparameters of another kind"))?;
        let names = config.state_names();
        r.expect_count(names.len() + 1 + usize::from(A::AUX_NAME.is_some()))?;
        let aux = match A::AUX_NAME {
            Some(name) => A::aux_from_f32(r.scalar(name)?).ok_or_else(|| bad(format!("bad {name}")))?,
            None => config.aux_init(),
        };
        // Sizes are checked against the tensors before anything is allocated for them.
        let state = names.iter().map(|name| r.buffer(name, &[n])).collect::<Result<Vec<_>, _>>()?;
        let mut opt = Optimizer::new(config, 0)?;
        opt.n = n;
        opt.t = r.step;
        opt.aux = aux;
        opt.state = state;
        Ok(opt)
    }

    /// Loads an optimizer saved with [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Checkpoint`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::from_safetensors(&read(path.as_ref())?)
    }

    /// Replaces this optimizer's configuration, step count and state with a
    /// checkpoint's, keeping its execution policy and guards (non-finite
    /// policy, loss scale, clipping norm). The checkpoint must be of the same
    /// kind and size.
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
