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
        for (name, shape) in self.state_shapes() {
            let data = match name {
                "row_var" => &self.row_var,
                "col_var" => &self.col_var,
                _ => &self.variance,
            };
            w.tensor(name, shape, data);
        }
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
        let names = crate::adafactor::state_shapes(&shape);
        r.expect_count(names.len() + 1)?;
        let mut state = Vec::with_capacity(names.len());
        for (name, tshape) in &names {
            state.push((*name, r.f32s(name, tshape)?));
        }
        let mut opt = Adafactor::new(config, &shape).map_err(|e| bad(format!("shape {shape:?}: {e}")))?;
        for (name, data) in state {
            match name {
                "row_var" => opt.row_var = data,
                "col_var" => opt.col_var = data,
                _ => opt.variance = data,
            }
        }
        opt.t = r.step;
        Ok(opt)
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
