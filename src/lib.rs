//! # adaoptim
//!
//! Fast, torch-exact CPU optimizers over flat `f32` slices: SGD (momentum,
//! Nesterov), AdaGrad, RMSprop, AdaDelta, Adam / AMSGrad / AdamW, AdaMax and
//! NAdam, with `torch.optim`'s semantics, argument names and defaults.
//!
//! Every optimizer's per-element formula is written once, generic over a lane
//! type, and driven by three paths: the scalar reference ([`Backend::Scalar`]),
//! SIMD kernels ([`Backend::Wide`], and [`Backend::Avx2`] / [`Backend::Avx512`]
//! chosen at run time), and a rayon driver that splits the slices at fixed
//! chunk boundaries. All of them give the same bits.
//!
//! Beyond the dense optimizers: [`schedule`] (torch's learning-rate
//! schedulers as closed-form functions), [`sparse`] (row-sparse updates of
//! embedding tables), [`groups`] (parameter groups in one flat arena,
//! shardable), [`checkpoint`] (safetensors, atomic, torch names), [`clip`]
//! (gradient clipping by global norm, fused into the step), [`any`]
//! (optimizers by torch class name), [`memory`] (aligned, huge-page-backed
//! buffers, as the optimizers' own state is) and [`roofline`] (the
//! bandwidth-ceiling kernel the benches compare against).
//!
//! ```
//! use adaoptim::{Adam, AdamConfig};
//!
//! let mut params = vec![0.5_f32; 1000];
//! let grads = vec![0.1_f32; 1000];
//! let mut opt = Adam::new(AdamConfig { lr: 1e-2, ..AdamConfig::default() }, params.len())?;
//! let report = opt.step(&mut params, &grads)?;
//! assert!((params[0] - 0.49).abs() < 1e-6); // first Adam step moves by lr
//! println!("ran on {}", report.backend);
//! # Ok::<(), adaoptim::Error>(())
//! ```
#![deny(missing_docs)]

pub mod any;
mod backend;
pub mod checkpoint;
pub mod clip;
mod driver;
mod error;
pub mod groups;
pub mod memory;
pub mod multi;
pub mod optim;
pub mod roofline;
pub mod schedule;
mod simd;
pub mod sparse;

pub use any::{AnyConfig, AnyOptimizer, HyperValue};
pub use backend::{AUTO_GRAIN, Backend, Exec, PAR_THRESHOLD, PAR_THRESHOLD_INSIDE, Parallel};
pub use driver::StepReport;
pub use error::Error;
pub use optim::adadelta::AdadeltaConfig;
pub use optim::adagrad::AdagradConfig;
pub use optim::adam::{AdamConfig, AdamWConfig};
pub use optim::adamax::AdamaxConfig;
pub use optim::nadam::NAdamConfig;
pub use optim::rmsprop::RmsPropConfig;
pub use optim::sgd::SgdConfig;
pub use optim::{
    Algorithm, MAX_STATE, MAX_STEP, NonFinitePolicy, Optimizer, StepOptions, step_slices, step_slices_with,
};

/// `torch.optim.SGD` (momentum, dampening, Nesterov).
pub type Sgd = Optimizer<SgdConfig>;
/// `torch.optim.Adagrad`.
pub type Adagrad = Optimizer<AdagradConfig>;
/// `torch.optim.RMSprop`.
pub type RmsProp = Optimizer<RmsPropConfig>;
/// `torch.optim.Adadelta`.
pub type Adadelta = Optimizer<AdadeltaConfig>;
/// `torch.optim.Adam` (and AMSGrad with `amsgrad: true`).
pub type Adam = Optimizer<AdamConfig>;
/// `torch.optim.AdamW`.
pub type AdamW = Optimizer<AdamWConfig>;
/// `torch.optim.Adamax`.
pub type Adamax = Optimizer<AdamaxConfig>;
/// `torch.optim.NAdam`.
pub type NAdam = Optimizer<NAdamConfig>;

/// The README's examples, compiled and run as doc-tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
