//! The crate's error type.

use crate::backend::Backend;

/// Everything that can go wrong. A call that returns an error has modified
/// nothing: parameters, state and step count are exactly as before.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A hyperparameter is out of its domain (torch's `ValueError`
    /// conditions) or not finite.
    InvalidHyperparameter {
        /// The field, with torch's name (`"lr"`, `"betas[0]"`, ...).
        name: &'static str,
        /// The rejected value.
        value: f64,
        /// What the field must satisfy.
        requirement: &'static str,
    },
    /// A slice has the wrong length.
    LengthMismatch {
        /// Which slice (`"grads"`, `"exp_avg"`, ...).
        what: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        actual: usize,
    },
    /// The wrong number of state buffers was passed to a free kernel.
    StateCount {
        /// Buffers this configuration needs.
        expected: usize,
        /// Buffers given.
        actual: usize,
    },
    /// A sparse gradient names a row outside the table.
    RowOutOfRange {
        /// The row given.
        row: usize,
        /// Rows in the table.
        rows: usize,
    },
    /// Step numbers start at 1.
    InvalidStep {
        /// The rejected step number.
        step: u64,
    },
    /// A backend was forced that this CPU cannot run.
    BackendUnavailable {
        /// The backend asked for.
        backend: Backend,
    },
    /// `ADAOPTIM_BACKEND` names no backend.
    UnknownBackend {
        /// The value found.
        name: String,
    },
    /// A gradient is NaN or infinite (under [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error)).
    NonFiniteGradient {
        /// The first such element.
        index: usize,
    },
    /// A global gradient norm handed to a sharded, clipped step is NaN or
    /// infinite (some worker's gradients are), under
    /// [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error).
    NonFiniteGradNorm {
        /// The norm given.
        norm: f64,
    },
    /// A checkpoint is truncated, corrupted, of another format or version,
    /// or does not match the optimizer.
    Checkpoint {
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a file failed.
    Io {
        /// The kind of I/O error.
        kind: std::io::ErrorKind,
        /// The operating system's message.
        message: String,
        /// The underlying error, also given by
        /// [`source`](std::error::Error::source).
        source: IoSource,
    },
    /// A torch class name this crate does not implement.
    UnknownOptimizer {
        /// The name given.
        name: String,
    },
    /// A keyword option that is unknown or has a value of the wrong type.
    InvalidOption {
        /// The option's name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A buffer of this many elements cannot be allocated, or its size or
    /// offset overflows.
    TooLarge {
        /// Which buffer (`"state"`, `"params"`, `"table"`, ...).
        what: &'static str,
        /// The element count asked for.
        elements: usize,
    },
    /// The step counter is at [`MAX_STEP`](MAX_STEP): one more step
    /// would leave the range where step counts (and the bias corrections
    /// computed from them) are exact.
    StepLimit {
        /// The step count reached.
        step: u64,
    },
    /// A [`TensorId`](crate::groups::TensorId) made by another
    /// [`GroupedOptimizer`](crate::groups::GroupedOptimizer).
    ForeignTensor {
        /// The id's index.
        index: usize,
    },
    /// A new configuration needs a different set of state buffers than the
    /// optimizer holds (for example turning `amsgrad` on after construction).
    IncompatibleConfig {
        /// Why.
        reason: &'static str,
    },
    /// A buffer's storage type is not accepted where it was given (for
    /// example a parameter copy next to `bf16` parameters).
    Storage {
        /// Which buffer (`"param_copy"`, `"exp_avg"`, ...).
        what: &'static str,
        /// Its storage type.
        dtype: crate::dtype::Dtype,
        /// What is accepted.
        reason: &'static str,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidHyperparameter { name, value, requirement } => {
                write!(f, "invalid hyperparameter {name} = {value}: must be {requirement}")
            }
            Error::LengthMismatch { what, expected, actual } => {
                write!(f, "{what} has length {actual}, expected {expected}")
            }
            Error::StateCount { expected, actual } => {
                write!(f, "{actual} state buffers given, this configuration needs {expected}")
            }
            Error::RowOutOfRange { row, rows } => write!(f, "row {row} is outside the table of {rows} rows"),
            Error::InvalidStep { step } => write!(f, "step number {step} is invalid: steps count from 1"),
            Error::BackendUnavailable { backend } => write!(f, "backend {backend} is not available on this CPU"),
            Error::UnknownBackend { name } => {
                write!(f, "unknown backend {name:?} (expected scalar, wide, avx2, avx512 or auto)")
            }
            Error::NonFiniteGradient { index } => write!(f, "gradient element {index} is NaN or infinite"),
            Error::NonFiniteGradNorm { norm } => write!(f, "the global gradient norm is {norm}"),
            Error::Checkpoint { reason } => write!(f, "checkpoint: {reason}"),
            Error::Io { kind, message, .. } => write!(f, "I/O error ({kind:?}): {message}"),
            Error::UnknownOptimizer { name } => write!(f, "unknown optimizer {name:?}"),
            Error::InvalidOption { name, reason } => write!(f, "option {name:?}: {reason}"),
            Error::TooLarge { what, elements } => {
                write!(f, "{what}: a buffer of {elements} elements cannot be allocated")
            }
            Error::StepLimit { step } => {
                write!(f, "step count {step} is at the limit of {}: no further step is taken", MAX_STEP)
            }
            Error::ForeignTensor { index } => {
                write!(f, "tensor id {index} was made by another GroupedOptimizer")
            }
            Error::IncompatibleConfig { reason } => write!(f, "incompatible configuration: {reason}"),
            Error::Storage { what, dtype, reason } => write!(f, "{what} in {dtype} storage: {reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(&*source.0),
            _ => None,
        }
    }
}

/// The `std::io::Error` behind an [`Error::Io`], shared so that `Error`
/// stays `Clone`. Two are equal when their kinds and messages are.
#[derive(Clone, Debug)]
pub struct IoSource(pub std::sync::Arc<std::io::Error>);

impl PartialEq for IoSource {
    fn eq(&self, other: &Self) -> bool {
        self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io { kind: e.kind(), message: e.to_string(), source: IoSource(std::sync::Arc::new(e)) }
    }
}

/// The step number after `t` steps, or [`Error::StepLimit`] at
/// [`MAX_STEP`](MAX_STEP).
pub(crate) fn next_step(t: u64) -> Result<u64, Error> {
    if t >= MAX_STEP { Err(Error::StepLimit { step: t }) } else { Ok(t + 1) }
}

/// `value` must be finite and `>= 0`.
pub(crate) fn non_negative(name: &'static str, value: f64) -> Result<(), Error> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidHyperparameter { name, value, requirement: "finite and >= 0" })
    }
}

/// `value` must be finite and in `[0, 1)`.
pub(crate) fn unit_half_open(name: &'static str, value: f64) -> Result<(), Error> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::InvalidHyperparameter { name, value, requirement: "in [0, 1)" })
    }
}

/// `value` must be finite and in `[0, 1]`.
pub(crate) fn unit_closed(name: &'static str, value: f64) -> Result<(), Error> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::InvalidHyperparameter { name, value, requirement: "in [0, 1]" })
    }
}

/// `value` must be finite.
pub(crate) fn finite(name: &'static str, value: f64) -> Result<(), Error> {
    if value.is_finite() { Ok(()) } else { Err(Error::InvalidHyperparameter { name, value, requirement: "finite" }) }
}

/// A buffer of `actual` elements where `expected` are needed.
pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), Error> {
    if expected == actual { Ok(()) } else { Err(Error::LengthMismatch { what, expected, actual }) }
}

/// A loss scale must be finite and nonzero.
pub(crate) fn check_grad_scale(grad_scale: Option<f32>) -> Result<(), Error> {
    match grad_scale {
        Some(s) if !(s.is_finite() && s != 0.0) => {
            Err(Error::InvalidHyperparameter { name: "grad_scale", value: s as f64, requirement: "finite and nonzero" })
        }
        _ => Ok(()),
    }
}

/// The largest step count: a step from `MAX_STEP` is
/// [`Error::StepLimit`], and a checkpoint holding a
/// larger count is refused. Beyond 2^53 a step count no longer converts to
/// `f64` exactly, so bias corrections (`beta^t`) would drift; no training
/// run comes near it (a step per nanosecond for 285 years).
pub const MAX_STEP: u64 = 1 << 53;
