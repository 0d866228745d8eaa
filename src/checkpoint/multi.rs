//! Checkpoints of a [`MultiOptimizer`]: torch's `state_dict` layout, each
//! tensor's state and its own step count (`state.{i}.exp_avg`, ...,
//! `state.{i}.step`), each group's options and tensor indices. A group
//! whose state is `bf16` stores it as `BF16` tensors under the same names;
//! an 8-bit group as bitsandbytes' `state_dict` holds a parameter's state
//! (`state.{i}.state1` codes, `state.{i}.absmax1`, `state.{i}.qmap1`, ...),
//! with the metadata `state_dtypes` (`F32`, `BF16` or `U8` per group; a
//! file without it, from before groups had a state storage, is all `F32`).

use serde_json::Value;

use super::mixed::{read_state, state_dtype, tensors_per_state, write_state};
use super::{Reader, Writer, bad, config_from_json, options_json, read, write_atomic};
use crate::mixed::Owned;
use crate::multi::MultiOptimizer;
use crate::storage::Dtype;
use crate::{Algorithm, Error};

impl<A: Algorithm> MultiOptimizer<A> {
    /// The optimizer's state as safetensors bytes: per tensor `i` its state
    /// buffers `state.{i}.{name}`, its step count `state.{i}.step` (a 0-d
    /// f32, as torch keeps it; the exact counts are the `steps` metadata
    /// list) and NAdam's `state.{i}.mu_product`; `param_groups` with each
    /// group's options and tensor indices; `sizes` the tensors' lengths
    /// (layout `multi`); a `bf16` or 8-bit group's state in its storage, bit
    /// for bit (an 8-bit one under bitsandbytes' names, `state.{i}.state1`,
    /// `state.{i}.absmax1`, `state.{i}.qmap1`, ..., and the metadata
    /// `state_dtypes`). The parameters are the caller's and are not saved.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        self.to_safetensors_with(&[])
    }

    /// As [`to_safetensors`](Self::to_safetensors), with extra metadata
    /// entries for the caller's own use (a framework adapter's tensor names
    /// and shapes, say), read back with
    /// [`format::metadata`](crate::checkpoint::format::metadata) and
    /// ignored by [`from_safetensors`](Self::from_safetensors).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for a key the checkpoint itself uses, or if
    /// serialization fails.
    pub fn to_safetensors_with(&self, extra: &[(&str, String)]) -> Result<Vec<u8>, Error> {
        let max_t = self.tensors.iter().map(|s| s.t).max().unwrap_or(0);
        let mut w = Writer::new(A::TORCH_CLASS, "multi", max_t);
        let groups: Vec<Value> = self
            .groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                let mut m = options_json(g.torch_options());
                let params: Vec<usize> = (0..self.tensors.len()).filter(|&i| self.tensors[i].group == gi).collect();
                m.insert("params".to_string(), Value::from(params));
                Value::Object(m)
            })
            .collect();
        w.meta("param_groups", Value::Array(groups));
        w.meta("sizes", Value::from(self.tensors.iter().map(|s| s.len).collect::<Vec<_>>()));
        w.meta("steps", Value::from(self.tensors.iter().map(|s| s.t).collect::<Vec<_>>()));
        w.meta("state_dtypes", Value::from(self.dtypes.iter().map(|d| d.name()).collect::<Vec<_>>()));
        w.extra_meta(extra)?;
        for (i, s) in self.tensors.iter().enumerate() {
            let names = self.groups[s.group].state_names();
            for (j, (name, buf)) in names.iter().zip(&s.state).enumerate() {
                write_state(&mut w, &format!("state.{i}."), j, name, buf);
            }
            w.scalar(format!("state.{i}.step"), s.t as f32);
            for (name, x) in A::AUX_NAMES.iter().zip(A::aux_to_f32(&s.aux)) {
                w.scalar(format!("state.{i}.{name}"), x);
            }
        }
        w.finish()
    }

    /// Saves atomically; see [`to_safetensors`](Self::to_safetensors).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Checkpoint`]; a previous file is intact then.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), Error> {
        write_atomic(path.as_ref(), &self.to_safetensors()?)
    }

    /// An optimizer from bytes written by
    /// [`to_safetensors`](Self::to_safetensors): same groups, tensors, state
    /// and step counts; default execution policy and guards.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for anything truncated, corrupted or mismatched.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let r = Reader::open(bytes, A::TORCH_CLASS, "multi")?;
        let list = |key: &str| -> Result<Vec<u64>, Error> {
            r.json(key)?
                .as_array()
                .ok_or_else(|| bad(format!("{key} is not a list")))?
                .iter()
                .map(|v| v.as_u64().ok_or_else(|| bad(format!("a {key} entry is not a count"))))
                .collect()
        };
        let (sizes, steps) = (list("sizes")?, list("steps")?);
        if steps.len() != sizes.len() {
            return Err(bad("sizes and steps differ in length"));
        }
        let groups = r.json("param_groups")?;
        let groups = groups.as_array().ok_or_else(|| bad("param_groups is not a list"))?;
        let dtypes = match r.meta("state_dtypes") {
            // Files from before state storages: all f32.
            Err(_) => vec![Dtype::F32; groups.len()],
            Ok(_) => r
                .json("state_dtypes")?
                .as_array()
                .filter(|l| l.len() == groups.len())
                .ok_or_else(|| bad("state_dtypes is not a list of one dtype per group"))?
                .iter()
                .map(|v| v.as_str().ok_or_else(|| bad("a state_dtypes entry is not a string")).and_then(state_dtype))
                .collect::<Result<_, _>>()?,
        };
        let mut opt = MultiOptimizer::new();
        let mut next = 0usize;
        for (gi, g) in groups.iter().enumerate() {
            let config: A = config_from_json(g, &[])?;
            let ids = g["params"].as_array().ok_or_else(|| bad("a group has no params list"))?;
            if ids.iter().enumerate().any(|(k, v)| v.as_u64() != Some((next + k) as u64)) {
                return Err(bad("tensor indices must run in order across the groups"));
            }
            let group_sizes: Vec<usize> = sizes
                .get(next..next + ids.len())
                .ok_or_else(|| bad("param_groups name more tensors than sizes"))?
                .iter()
                .map(|&x| usize::try_from(x).map_err(|_| bad("a size overflows")))
                .collect::<Result<_, _>>()?;
            // Every element of state must be backed by data in the file
            // before anything is allocated for it.
            let elements = group_sizes.iter().try_fold(0usize, |a, &b| a.checked_add(b));
            if !config.state_names().is_empty() && elements.is_none_or(|e| e / 4 > bytes.len()) {
                return Err(bad("tensor sizes exceed the file"));
            }
            next += ids.len();
            opt.add_group_with_state(config, &group_sizes, dtypes[gi]).map_err(|e| bad(format!("group {gi}: {e}")))?;
        }
        if next != sizes.len() {
            return Err(bad("sizes name tensors in no group"));
        }
        let per_tensor = |i: usize| {
            let g = opt.tensors[i].group;
            opt.groups[g].state_names().len() * tensors_per_state(opt.dtypes[g]) + 1
        };
        let aux = A::AUX_NAMES.len();
        r.expect_count(1 + (0..next).map(|i| per_tensor(i) + aux).sum::<usize>())?;
        for (i, &t) in steps.iter().enumerate() {
            if t > crate::MAX_STEP || r.scalar(&format!("state.{i}.step"))? != t as f32 {
                return Err(bad(format!("tensor {i}: step {t} is out of range or disagrees with its step tensor")));
            }
            let slot = &mut opt.tensors[i];
            slot.t = t;
            let names = opt.groups[slot.group].state_names();
            for (j, (name, buf)) in names.iter().zip(slot.state.iter_mut()).enumerate() {
                match buf {
                    Owned::F32(x) => r.read_into(&format!("state.{i}.{name}"), &[slot.len], x)?,
                    other => *other = read_state(&r, &format!("state.{i}."), j, name, slot.len, other.dtype())?,
                }
            }
            if let Some(aux) =
                super::read_aux::<A>(&format!("tensor {i}: "), |name| r.scalar(&format!("state.{i}.{name}")))?
            {
                slot.aux = aux;
            }
        }
        Ok(opt)
    }

    /// Loads an optimizer saved with [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Checkpoint`].
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, Error> {
        Self::from_safetensors(&read(path.as_ref())?)
    }
}
