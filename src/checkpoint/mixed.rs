//! Checkpoints of one mixed-precision optimizer ([`MixedOptimizer`]): the
//! state in its own storage, bit for bit (layout `mixed`, metadata `n`,
//! `param_groups` and `state_dtype` = `F32`, `BF16` or `U8`). `F32`/`BF16`
//! state is stored under torch's names; 8-bit state under bitsandbytes'
//! `state_dict` names: the `i`-th state (1-based) as `state{i}` (`U8`),
//! `absmax{i}` (`F32`, `ceil(n / 256)`) and `qmap{i}` (`F32`, 256).

use std::path::Path;

use serde_json::Value;

use super::{Reader, Writer, bad, config_from_json, options_json, read, write_atomic};
use crate::memory::Raw;
use crate::mixed::{MixedOptimizer, Owned};
use crate::storage::{Dtype, Q8_BLOCK, QMap};
use crate::{Algorithm, Error};

impl<A: Algorithm> MixedOptimizer<A> {
    /// The whole optimizer as safetensors bytes (see the
    /// [module docs](crate::checkpoint) and [`MixedOptimizer`]).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails (it does not for valid state).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let mut w = Writer::new(A::TORCH_CLASS, "mixed", self.t);
        w.meta("n", self.n);
        w.meta("state_dtype", self.dtype.name());
        w.meta("param_groups", Value::Array(vec![Value::Object(options_json(self.config.torch_options()))]));
        for (i, (name, buf)) in self.config.state_names().iter().zip(&self.state).enumerate() {
            write_state(&mut w, "", i, name, buf);
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
    /// default and it rounds to nearest.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming what is wrong: not safetensors, wrong
    /// format, another optimizer kind or layout, bad hyperparameters, an
    /// unknown state dtype, a missing, extra or mis-sized tensor, a wrong
    /// dtype, a code map other than bitsandbytes' dynamic map for that state.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let r = Reader::open(bytes, A::TORCH_CLASS, "mixed")?;
        let n: usize = r.parse("n")?;
        let dtype = state_dtype(r.meta("state_dtype")?)?;
        let group = &super::one_group(&r)?;
        let config: A = config_from_json(group, &[])?;
        let names = config.state_names();
        let per_state = tensors_per_state(dtype);
        r.expect_count(names.len() * per_state + 1 + A::AUX_NAMES.len())?;
        let aux = super::read_aux::<A>("", |name| r.scalar(name))?.unwrap_or_else(|| config.aux_init());
        let mut state = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            state.push(read_state(&r, "", i, name, n, dtype)?);
        }
        let mut opt = MixedOptimizer::new(config, 0, dtype).map_err(|e| bad(e.to_string()))?;
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
}

/// The state dtype a checkpoint names: `F32`, `BF16` or `U8` (8-bit
/// block-wise).
pub(crate) fn state_dtype(name: &str) -> Result<Dtype, Error> {
    match name {
        "F32" => Ok(Dtype::F32),
        "BF16" => Ok(Dtype::Bf16),
        "U8" => Ok(Dtype::Q8),
        other => Err(bad(format!("state_dtype {other:?} is not F32, BF16 or U8"))),
    }
}

/// Writes the `i`-th state buffer (0-based), named `name`, under `prefix`:
/// `F32`/`BF16` as `{prefix}{name}`; 8-bit as bitsandbytes names it,
/// `{prefix}state{i+1}` (`U8`), `{prefix}absmax{i+1}`, `{prefix}qmap{i+1}`.
pub(crate) fn write_state<'a>(w: &mut Writer<'a>, prefix: &str, i: usize, name: &str, buf: &'a Owned) {
    match buf {
        Owned::F32(x) => w.tensor(format!("{prefix}{name}"), vec![x.len()], x),
        Owned::Bf16(x) => w.tensor_bf16(format!("{prefix}{name}"), vec![x.len()], x),
        Owned::Q8 { codes, absmax, map } => {
            w.tensor_u8(format!("{prefix}state{}", i + 1), vec![codes.len()], codes);
            w.tensor(format!("{prefix}absmax{}", i + 1), vec![absmax.len()], absmax);
            w.tensor(format!("{prefix}qmap{}", i + 1), vec![256], map.code());
        }
    }
}

/// The tensors [`write_state`] writes for one buffer of `dtype`.
pub(crate) fn tensors_per_state(dtype: Dtype) -> usize {
    if dtype == Dtype::Q8 { 3 } else { 1 }
}

/// Reads what [`write_state`] wrote for a buffer of `n` elements in
/// `dtype`, checking each tensor's dtype and shape and an 8-bit state's map.
pub(crate) fn read_state(
    r: &Reader<'_>,
    prefix: &str,
    i: usize,
    name: &str,
    n: usize,
    dtype: Dtype,
) -> Result<Owned, Error> {
    Ok(match dtype {
        Dtype::F32 => Owned::F32(Raw::from_slice(64, &r.f32s(&format!("{prefix}{name}"), &[n])?)),
        Dtype::Bf16 => Owned::Bf16(r.bf16s(&format!("{prefix}{name}"), &[n])?),
        _ => {
            let map = QMap::for_state(name);
            let qmap = r.f32s(&format!("{prefix}qmap{}", i + 1), &[256])?;
            if qmap.iter().zip(map.code()).any(|(a, b)| a.to_bits() != b.to_bits()) {
                return Err(bad(format!("{prefix}qmap{} is not bitsandbytes' dynamic map for {name}", i + 1)));
            }
            let codes = r.u8s(&format!("{prefix}state{}", i + 1), &[n])?;
            let absmax = r.f32s(&format!("{prefix}absmax{}", i + 1), &[n.div_ceil(Q8_BLOCK)])?;
            Owned::Q8 { codes, absmax, map }
        }
    })
}
