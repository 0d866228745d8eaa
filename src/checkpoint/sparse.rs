//! Checkpoints of the row-sparse optimizers: `rows x dim` state tensors
//! (row-wise AdaGrad's per-row `sum` is `rows` long), the shape in the
//! metadata.

use serde_json::Value;

use super::{Reader, Writer, bad, config_from_json, options_json};
use crate::Error;
use crate::sparse::{RowSteps, RowWiseAdagrad, SparseAdagrad, SparseAdam, SparseAdamConfig};

impl RowSteps {
    /// A checkpoint writer holding the shape and step count.
    fn writer<'a>(&self, class: &str, options: Value) -> Writer<'a> {
        let mut w = Writer::new(class, "sparse", self.t);
        w.meta("rows", self.rows);
        w.meta("dim", self.dim);
        w.meta("param_groups", Value::Array(vec![options]));
        w
    }

    /// Opens a sparse checkpoint: the reader, its options, and the shape and
    /// step count it restores.
    fn reader<'a>(bytes: &'a [u8], class: &str) -> Result<(Reader<'a>, Value, RowSteps), Error> {
        let r = Reader::open(bytes, class, "sparse")?;
        let (rows, dim): (usize, usize) = (r.parse("rows")?, r.parse("dim")?);
        let groups = r.json("param_groups")?;
        let g = groups.as_array().and_then(|g| g.first()).cloned().ok_or_else(|| bad("no param_groups entry"))?;
        let (mut steps, _) = RowSteps::new(rows, dim).map_err(|e| bad(e.to_string()))?;
        steps.t = r.step;
        Ok((r, g, steps))
    }
}

impl SparseAdam {
    /// The optimizer as safetensors bytes (`exp_avg`, `exp_avg_sq` of shape
    /// `[rows, dim]`, `step`); see [`checkpoint`](crate::checkpoint).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let opts = Value::Object(options_json(self.config.options()));
        let mut w = self.steps.writer("SparseAdam", opts);
        let shape = vec![self.steps.rows, self.steps.dim];
        w.tensor("exp_avg", shape.clone(), &self.exp_avg);
        w.tensor("exp_avg_sq", shape, &self.exp_avg_sq);
        w.finish()
    }

    /// A SparseAdam from bytes written by [`to_safetensors`](Self::to_safetensors).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for anything truncated, corrupted or mismatched.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let (r, g, steps) = RowSteps::reader(bytes, "SparseAdam")?;
        let (rows, dim) = (steps.rows, steps.dim);
        let config = SparseAdamConfig::from_kwargs(&g).map_err(|e| bad(format!("hyperparameters: {e}")))?;
        r.expect_count(3)?;
        let (exp_avg, exp_avg_sq) = (r.buffer("exp_avg", &[rows, dim])?, r.buffer("exp_avg_sq", &[rows, dim])?);
        Ok(SparseAdam { config, steps, exp_avg, exp_avg_sq })
    }
}

impl SparseAdagrad {
    /// The optimizer as safetensors bytes (`sum` of shape `[rows, dim]`,
    /// `step`; torch class `Adagrad`, layout `sparse`).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let opts = Value::Object(options_json(self.config.options()));
        let mut w = self.steps.writer("Adagrad", opts);
        w.tensor("sum", vec![self.steps.rows, self.steps.dim], &self.sum);
        w.finish()
    }

    /// A sparse Adagrad from bytes written by [`to_safetensors`](Self::to_safetensors).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for anything truncated, corrupted or mismatched.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let (r, g, steps) = RowSteps::reader(bytes, "Adagrad")?;
        let config: crate::AdagradConfig = config_from_json(&g, &[])?;
        r.expect_count(2)?;
        let sum = r.buffer("sum", &[steps.rows, steps.dim])?;
        let mut opt = SparseAdagrad::new(config, 0, 0).map_err(|e| bad(e.to_string()))?;
        opt.steps = steps;
        opt.sum = sum;
        Ok(opt)
    }
}

impl RowWiseAdagrad {
    /// The optimizer as safetensors bytes (per-row `sum` of shape `[rows]`,
    /// `step`; class `RowWiseAdagrad`, layout `sparse`).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if serialization fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let mut w = self.steps.writer("RowWiseAdagrad", serde_json::json!({"lr": self.lr, "eps": self.eps}));
        w.tensor("sum", vec![self.steps.rows], &self.acc);
        w.finish()
    }

    /// A row-wise AdaGrad from bytes written by [`to_safetensors`](Self::to_safetensors).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for anything truncated, corrupted or mismatched.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let (r, g, steps) = RowSteps::reader(bytes, "RowWiseAdagrad")?;
        let lr = g["lr"].as_f64().ok_or_else(|| bad("lr missing"))?;
        let eps = g["eps"].as_f64().ok_or_else(|| bad("eps missing"))?;
        r.expect_count(2)?;
        let acc = r.buffer("sum", &[steps.rows])?;
        let mut opt = RowWiseAdagrad::new(lr, eps, 0.0, 0, steps.dim).map_err(|e| bad(e.to_string()))?;
        opt.steps = steps;
        opt.acc = acc;
        Ok(opt)
    }
}
