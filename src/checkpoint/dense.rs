//! Checkpoints of one dense optimizer ([`Optimizer`]).

use std::path::Path;

use serde_json::Value;

use super::{Reader, Writer, bad, config_from_json, options_json, read, write_atomic};
use crate::{Algorithm, Error, Optimizer};

impl<A: Algorithm> Optimizer<A> {
    /// The whole optimizer as safetensors bytes (see the [module docs](crate::checkpoint)).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails (it does not for valid state).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let mut w = Writer::new(A::TORCH_CLASS, "dense", self.t);
        w.meta("n", self.n);
        w.meta("param_groups", Value::Array(vec![Value::Object(options_json(self.config.torch_options()))]));
        for (name, buf) in self.config.state_names().iter().zip(&self.state) {
            w.tensor(*name, vec![self.n], buf);
        }
        for (name, x) in A::AUX_NAMES.iter().zip(A::aux_to_f32(&self.aux)) {
            w.scalar(*name, x);
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
        let group = &super::one_group(&r)?;
        let config: A = config_from_json(group, &[])?;
        let names = config.state_names();
        r.expect_count(names.len() + 1 + A::AUX_NAMES.len())?;
        let aux = super::read_aux::<A>("", |name| r.scalar(name))?.unwrap_or_else(|| config.aux_init());
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
