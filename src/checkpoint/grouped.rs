//! Checkpoints of a [`GroupedOptimizer`]: every tensor's parameters and
//! state by torch's `state_dict` index, each group's options and indices.

use serde_json::Value;

use super::{Reader, Writer, bad, config_from_json, options_json, read, write_atomic};
use crate::groups::GroupedOptimizer;
use crate::{Algorithm, Error};

impl<A: Algorithm> GroupedOptimizer<A> {
    /// The optimizer as safetensors bytes: every tensor's parameters
    /// (`params.{i}`) and state (`state.{i}.exp_avg`, ...), the step count, and
    /// each group's hyperparameters and tensor indices in `param_groups` (see
    /// [`checkpoint`](crate::checkpoint)). Schedules are code, not data: set
    /// them again after loading.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let mut w = Writer::new(A::TORCH_CLASS, "grouped", self.t);
        let groups: Vec<Value> = self
            .groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                let mut m = options_json(g.config.torch_options());
                let params: Vec<usize> = (0..self.tensors.len()).filter(|&i| self.tensors[i].group == gi).collect();
                m.insert("params".to_string(), Value::from(params));
                for (name, x) in A::AUX_NAMES.iter().zip(A::aux_to_f32(&g.aux)) {
                    m.insert(name.to_string(), Value::from(x as f64));
                }
                Value::Object(m)
            })
            .collect();
        w.meta("param_groups", Value::Array(groups));
        for (i, t) in self.tensors.iter().enumerate() {
            let r = t.offset..t.offset + t.len;
            w.tensor(format!("params.{i}"), vec![t.len], &self.params[r.clone()]);
            let group = &self.groups[t.group];
            for (name, &j) in group.config.state_names().iter().zip(&group.slots) {
                w.tensor(format!("state.{i}.{name}"), vec![t.len], &self.state[j][r.clone()]);
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

    /// A grouped optimizer from bytes written by
    /// [`to_safetensors`](Self::to_safetensors): same groups, tensors (and
    /// ids), parameters, state and step count; default execution policy.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for anything truncated, corrupted or mismatched.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let r = Reader::open(bytes, A::TORCH_CLASS, "grouped")?;
        let groups = r.json("param_groups")?;
        let groups = groups.as_array().ok_or_else(|| bad("param_groups is not a list"))?;
        let mut opt = GroupedOptimizer::new();
        let mut next = 0usize;
        let skip = A::AUX_NAMES;
        for (gi, g) in groups.iter().enumerate() {
            let config: A = config_from_json(g, skip)?;
            let ids: Vec<usize> = g["params"]
                .as_array()
                .ok_or_else(|| bad("a group has no params list"))?
                .iter()
                .map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| bad("a params entry is not an index")))
                .collect::<Result<_, _>>()?;
            if ids.iter().enumerate().any(|(k, &i)| i != next + k) {
                return Err(bad("tensor indices must run in order across the groups"));
            }
            next += ids.len();
            let mut sizes = Vec::with_capacity(ids.len());
            for &i in &ids {
                match r.shape(&format!("params.{i}"))?.as_slice() {
                    [len] => sizes.push(*len),
                    other => return Err(bad(format!("params.{i} has shape {other:?}"))),
                }
            }
            // Refuse absurd sizes before allocating for them: every tensor
            // must be backed by data in the file.
            if sizes.iter().try_fold(0usize, |a, &b| a.checked_add(b)).is_none_or(|total| total > bytes.len()) {
                return Err(bad("tensor sizes exceed the file"));
            }
            opt.add_group(config, &sizes).map_err(|e| bad(format!("group {gi}: {e}")))?;
            let group_scalar = |name: &'static str| {
                g[name].as_f64().map(|x| x as f32).ok_or_else(|| bad(format!("group {gi} has no {name}")))
            };
            if let Some(aux) = super::read_aux::<A>(&format!("group {gi}: "), group_scalar)? {
                opt.groups[gi].aux = aux;
            }
        }
        r.expect_count(1 + opt.tensors.iter().map(|t| 1 + opt.groups[t.group].slots.len()).sum::<usize>())?;
        for i in 0..next {
            let t = opt.tensors[i].clone();
            let range = t.offset..t.offset + t.len;
            r.read_into(&format!("params.{i}"), &[t.len], &mut opt.params[range.clone()])?;
            let group = &opt.groups[t.group];
            for (name, &j) in group.config.state_names().iter().zip(&group.slots) {
                r.read_into(&format!("state.{i}.{name}"), &[t.len], &mut opt.state[j][range.clone()])?;
            }
        }
        opt.t = r.step;
        Ok(opt)
    }

    /// Loads a grouped optimizer saved with [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Checkpoint`].
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, Error> {
        Self::from_safetensors(&read(path.as_ref())?)
    }
}
