//! Checkpoints in the safetensors format, readable from PyTorch.
//!
//! A checkpoint holds the whole optimizer: its kind, hyperparameters, step
//! count and every state buffer. Tensors carry torch's `state_dict` names
//! (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`, `sum`, `square_avg`,
//! `acc_delta`, `grad_avg`, `momentum_buffer`, `exp_inf`, `prev`, `step_size`, `ax`, `mu_product`, `eta`, `mu`,
//! `step`), all `F32` (`step` and the scalar states `mu_product`, `eta`, `mu` as 0-d tensors, as torch keeps
//! them). The metadata holds:
//!
//! | key | value |
//! |---|---|
//! | `format` | `adaoptim-optimizer` |
//! | `format_version` | `1` |
//! | `torch_class` | `Adam`, `SGD`, ... |
//! | `n` | parameter count |
//! | `step` | the exact step count (the `step` tensor is f32, as in torch) |
//! | `param_groups` | JSON, torch's `param_groups` entry: `[{"lr": 0.001, "betas": [0.9, 0.999], ...}]`; `eps_inside_sqrt` and `torch_exact` (not torch options) appear only when on |
//! | `layout` | `dense` ([`Optimizer`](crate::Optimizer)), `grouped` ([`GroupedOptimizer`](crate::groups::GroupedOptimizer)), `sparse` ([`sparse`](crate::sparse) optimizers) or `mixed` ([`MixedOptimizer`](crate::mixed::MixedOptimizer): state in `F32`, `BF16` or bitsandbytes' 8-bit `state{i}`/`absmax{i}`/`qmap{i}`, `state_dtype` in the metadata) |
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
//! [`Optimizer::restore`](crate::Optimizer::restore) keeps the ones already set.
//!
//! # What a checkpoint guarantees
//! - **Atomic saves.** The bytes go to a fresh, exclusively created
//!   temporary file in the same folder, which is flushed to disk (`fsync`)
//!   and renamed over the target, and the folder is synced: a crash at any
//!   point leaves the previous checkpoint intact (and at most a temporary
//!   file, which the next save to that path removes).
//! - **Concurrent saves** to one path each either succeed atomically (the
//!   file is one complete checkpoint, from the `Ok` save that renamed last)
//!   or fail and leave nothing behind. No save writes through a planted
//!   file or symlink.
//! - **The same state gives the same bytes** (metadata and tensors in name
//!   order).
//! - **Corruption is detected.** Every tensor's CRC-32 is stored in the
//!   metadata (`crc32`, a JSON object from tensor name to checksum) and
//!   checked on load: a flipped bit in the data, or two tensors' data
//!   offsets swapped, is [`Error::Checkpoint`]. A file without checksums
//!   (written by torch's `safetensors.torch.save_file`) still loads, with
//!   only the structural checks.
//! - **Loading is bounded.** Only regular files are read (a FIFO or device
//!   is an error, not a hang), never more than the file's length; format,
//!   version, kind, sizes, dtypes, the step count (at most
//!   [`MAX_STEP`](crate::MAX_STEP)) and that the tensors tile the data are
//!   checked before anything is allocated for them; an optimizer being
//!   restored is unchanged on error.
//!
//! Not guaranteed: durability against power loss beyond what `fsync` of the
//! file and its folder gives on the file system at hand, or detection of a
//! corruption that also rewrites the stored checksums.
//!
//! # Layers
//! [`format`](mod@format) writes and reads the safetensors bytes (header, checksums,
//! checks); `file` does the atomic write and the bounded read; the torch keyword
//! vocabulary (options to and from JSON) lives below every optimizer, in the
//! crate's `keywords` module, and this layer only uses it; `dense`,
//! `grouped`, `multi`, `sparse`, `adafactor` and `any` hold each owner's
//! tensors. Nothing below this layer imports from it.
mod adafactor;
mod any;
mod dense;
mod file;
pub mod format;
mod grouped;
mod mixed;
mod multi;
mod sparse;

pub(crate) use crate::keywords::options_json;
pub(crate) use file::read;
pub use file::write_atomic;
pub use format::{CHECKSUM_KEY, FORMAT, FORMAT_VERSION, torch_class_of};
pub(crate) use format::{Reader, Writer};

use crate::Error;

/// [`Error::Checkpoint`] with this reason.
pub(crate) fn bad(reason: impl Into<String>) -> Error {
    Error::Checkpoint { reason: reason.into() }
}

/// The one entry of a single-tensor checkpoint's `param_groups`.
pub(crate) fn one_group(r: &Reader<'_>) -> Result<serde_json::Value, Error> {
    match r.json("param_groups")? {
        serde_json::Value::Array(mut g) if g.len() == 1 => Ok(g.swap_remove(0)),
        _ => Err(bad("param_groups must hold exactly one group")),
    }
}

/// The configuration of one `param_groups` entry of a checkpoint: torch's
/// defaults with the entry's options (keys in `skip` ignored), validated.
pub(crate) fn config_from_json<A: crate::Algorithm>(group: &serde_json::Value, skip: &[&str]) -> Result<A, Error> {
    crate::keywords::kwargs_from_json(group, skip)
        .and_then(|opts| A::with_torch_options(&opts))
        .and_then(|c| c.validate().map(|()| c))
        .map_err(|e| bad(format!("hyperparameters: {e}")))
}

/// Reads an optimizer's scalar states through `scalar` (by torch name), or
/// `None` for an optimizer without any.
pub(crate) fn read_aux<A: crate::Algorithm>(
    what: &str,
    mut scalar: impl FnMut(&'static str) -> Result<f32, Error>,
) -> Result<Option<<A as crate::optim::sealed::Sealed>::Aux>, Error> {
    if A::AUX_NAMES.is_empty() {
        return Ok(None);
    }
    let mut x = [0.0; crate::MAX_AUX];
    for (k, name) in A::AUX_NAMES.iter().enumerate() {
        x[k] = scalar(name)?;
    }
    A::aux_from_f32(x).map(Some).ok_or_else(|| bad(format!("{what}bad {}", A::AUX_NAMES.join(", "))))
}
