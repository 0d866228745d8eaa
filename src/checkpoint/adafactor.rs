//! Checkpoints of [`Adafactor`]: torch's state names and shapes, the
//! configuration as torch's keyword arguments, the tensor shape.

use serde_json::Value;

use super::{Reader, Writer, bad, read, write_atomic};
use crate::Error;
use crate::adafactor::{Adafactor, AdafactorConfig};

impl Adafactor {
    /// The optimizer as safetensors bytes: torch's state names and shapes
    /// (`step`, `row_var`/`col_var` or `variance`), the configuration as
    /// torch's keyword arguments, the tensor shape, per-tensor checksums
    /// (the crate's checkpoint format, layout `"adafactor"`).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails (it does not for valid
    /// state).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let mut w = Writer::new(AdafactorConfig::TORCH_CLASS, "adafactor", self.t);
        w.meta("shape", Value::from(self.shape.clone()));
        w.meta("param_groups", Value::Array(vec![self.config.torch_kwargs()]));
        self.write_state(&mut w, "");
        w.finish()
    }

    /// An optimizer from bytes written by [`to_safetensors`](Self::to_safetensors).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming what is wrong (format, kind, shape, a
    /// missing, extra or mis-sized tensor, bad hyperparameters).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let r = Reader::open(bytes, AdafactorConfig::TORCH_CLASS, "adafactor")?;
        let shape: Vec<usize> = serde_json::from_str(r.meta("shape")?).map_err(|e| bad(format!("shape: {e}")))?;
        let group = &super::one_group(&r)?;
        let config = AdafactorConfig::from_torch_kwargs(group).map_err(|e| bad(format!("param_groups: {e}")))?;
        // The state tensors are read (and their sizes checked against the
        // file) before anything of the claimed shape is allocated.
        r.expect_count(crate::adafactor::state_shapes(&shape).len() + 1)?;
        let state = read_state(&r, "", &shape)?;
        assemble(config, &shape, r.step, state)
    }

    /// Replaces this optimizer's configuration, step count and state with a
    /// checkpoint's, keeping its execution policy and guards. The checkpoint
    /// must be of an Adafactor of the same shape.
    ///
    /// # Errors
    /// As [`from_safetensors`](Self::from_safetensors), and
    /// [`Error::Checkpoint`] for another shape. `self` is unchanged on error.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let loaded = Self::from_safetensors(bytes)?;
        if loaded.shape != self.shape {
            return Err(bad(format!("checkpoint has shape {:?}, this optimizer {:?}", loaded.shape, self.shape)));
        }
        self.config = loaded.config;
        self.t = loaded.t;
        self.row_var = loaded.row_var;
        self.col_var = loaded.col_var;
        self.variance = loaded.variance;
        Ok(())
    }

    /// Saves the optimizer to `path` atomically.
    ///
    /// # Errors
    /// [`Error::Io`]; the previous file at `path`, if any, is intact then.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), Error> {
        write_atomic(path.as_ref(), &self.to_safetensors()?)
    }

    /// Loads an optimizer saved with [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Checkpoint`].
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, Error> {
        Self::from_safetensors(&read(path.as_ref())?)
    }
}

/// Several tensors' [`Adafactor`]s in one checkpoint (a framework adapter's
/// optimizer over many parameters): torch's `state_dict` layout, each
/// tensor `i`'s state as `state.{i}.row_var`/`state.{i}.col_var` or
/// `state.{i}.variance` and its step count as `state.{i}.step` (a 0-d f32;
/// the exact counts are the `steps` metadata list); `param_groups` with one
/// group per run of consecutive tensors of equal configuration and its
/// tensor indices; `shapes` the tensors' shapes (layout
/// `"adafactor-multi"`).
impl Adafactor {
    /// The checkpoint of `opts`, in order, with extra metadata entries for
    /// the caller's own use (read back with
    /// [`format::metadata`](crate::checkpoint::format::metadata)).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for an extra key the checkpoint itself uses, or
    /// if serialization fails.
    pub fn many_to_safetensors(opts: &[Adafactor], extra: &[(&str, String)]) -> Result<Vec<u8>, Error> {
        let max_t = opts.iter().map(|o| o.t).max().unwrap_or(0);
        let mut w = Writer::new(AdafactorConfig::TORCH_CLASS, "adafactor-multi", max_t);
        let mut groups: Vec<Value> = Vec::new();
        let mut last: Option<AdafactorConfig> = None;
        for (i, o) in opts.iter().enumerate() {
            if last != Some(o.config) {
                let mut g = o.config.torch_kwargs();
                g["params"] = Value::from(Vec::<usize>::new());
                groups.push(g);
                last = Some(o.config);
            }
            if let Some(Value::Array(ids)) = groups.last_mut().and_then(|g| g.get_mut("params")) {
                ids.push(Value::from(i));
            }
        }
        w.meta("param_groups", Value::Array(groups));
        w.meta("shapes", Value::from(opts.iter().map(|o| o.shape.clone()).collect::<Vec<_>>()));
        w.meta("steps", Value::from(opts.iter().map(|o| o.t).collect::<Vec<_>>()));
        w.extra_meta(extra)?;
        for (i, o) in opts.iter().enumerate() {
            o.write_state(&mut w, &format!("state.{i}."));
            w.scalar(format!("state.{i}.step"), o.t as f32);
        }
        w.finish()
    }

    /// The optimizers of a checkpoint written by
    /// [`many_to_safetensors`](Self::many_to_safetensors), in order: same
    /// shapes, configurations, state and step counts; default execution
    /// policy and guards.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for anything truncated, corrupted or
    /// mismatched. Every tensor is read (its size checked against the file)
    /// before any state of the claimed shapes is allocated.
    pub fn many_from_safetensors(bytes: &[u8]) -> Result<Vec<Adafactor>, Error> {
        let r = Reader::open(bytes, AdafactorConfig::TORCH_CLASS, "adafactor-multi")?;
        let shapes: Vec<Vec<usize>> =
            serde_json::from_str(r.meta("shapes")?).map_err(|e| bad(format!("shapes: {e}")))?;
        let steps: Vec<u64> = serde_json::from_str(r.meta("steps")?).map_err(|e| bad(format!("steps: {e}")))?;
        if steps.len() != shapes.len() {
            return Err(bad("shapes and steps differ in length"));
        }
        let groups = r.json("param_groups")?;
        let groups = groups.as_array().ok_or_else(|| bad("param_groups is not a list"))?;
        let mut configs = Vec::with_capacity(shapes.len());
        for (gi, g) in groups.iter().enumerate() {
            let ids = g.get("params").and_then(Value::as_array).ok_or_else(|| bad("a group has no params list"))?;
            if ids.is_empty() || ids.iter().enumerate().any(|(k, v)| v.as_u64() != Some((configs.len() + k) as u64)) {
                return Err(bad("tensor indices must run in order across the groups"));
            }
            let mut kwargs = g.clone();
            if let Some(m) = kwargs.as_object_mut() {
                m.remove("params");
            }
            let config =
                AdafactorConfig::from_torch_kwargs(&kwargs).map_err(|e| bad(format!("param_groups {gi}: {e}")))?;
            configs.extend(std::iter::repeat_n(config, ids.len()));
        }
        if configs.len() != shapes.len() {
            return Err(bad("param_groups and shapes name different numbers of tensors"));
        }
        r.expect_count(1 + shapes.iter().map(|s| crate::adafactor::state_shapes(s).len() + 1).sum::<usize>())?;
        let mut states = Vec::with_capacity(shapes.len());
        for (i, (shape, &t)) in shapes.iter().zip(&steps).enumerate() {
            if t > crate::MAX_STEP || r.scalar(&format!("state.{i}.step"))? != t as f32 {
                return Err(bad(format!("tensor {i}: step {t} is out of range or disagrees with its step tensor")));
            }
            states.push(read_state(&r, &format!("state.{i}."), shape)?);
        }
        let parts = shapes.iter().zip(configs).zip(states).zip(steps);
        parts.map(|(((shape, config), state), t)| assemble(config, shape, t, state)).collect()
    }

    /// Adds this optimizer's state tensors under `prefix` + torch's names.
    fn write_state<'a>(&'a self, w: &mut Writer<'a>, prefix: &str) {
        for (name, shape) in self.state_shapes() {
            w.tensor(format!("{prefix}{name}"), shape, self.state(name).unwrap_or(&[]));
        }
    }
}

/// The state tensors of a tensor of `shape` under `prefix` + torch's names,
/// each read (its size checked against the file) before any state of the
/// claimed shape is allocated.
fn read_state(r: &Reader<'_>, prefix: &str, shape: &[usize]) -> Result<Vec<(&'static str, Vec<f32>)>, Error> {
    let names = crate::adafactor::state_shapes(shape);
    names.into_iter().map(|(name, tshape)| Ok((name, r.f32s(&format!("{prefix}{name}"), &tshape)?))).collect()
}

/// An optimizer of `shape` at step `t` holding state tensors that
/// [`read_state`] read.
fn assemble(
    config: AdafactorConfig,
    shape: &[usize],
    t: u64,
    state: Vec<(&str, Vec<f32>)>,
) -> Result<Adafactor, Error> {
    Adafactor::with_state(config, shape, t, state).map_err(|e| bad(format!("shape {shape:?}: {e}")))
}
