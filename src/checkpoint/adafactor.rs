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
        let mut opt = Adafactor::new(config, &shape).map_err(|e| bad(format!("shape {shape:?}: {e}")))?;
        let names = opt.state_shapes();
        r.expect_count(names.len() + 1)?;
        for (name, shape) in names {
            let out = match name {
                "row_var" => &mut opt.row_var,
                "col_var" => &mut opt.col_var,
                _ => &mut opt.variance,
            };
            r.read_into(name, &shape, out)?;
        }
        opt.t = r.step;
        Ok(opt)
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
