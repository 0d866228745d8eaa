//! # adaoptim
//!
//! Fast, torch-exact CPU optimizers over flat `f32` slices: SGD (momentum,
//! Nesterov), AdaGrad, RMSprop, AdaDelta, Adam / AMSGrad / AdamW, AdaMax,
//! NAdam and RAdam, with `torch.optim`'s semantics, argument names and
//! defaults.
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
//! # How the crate is built
//! Layers, each importing only from those below it (`tests/layers.rs` reads
//! the source and fails on an import that points up, so there is no import
//! circle):
//! 0. **Names** (`dtype`, `backend`): the storage types and the backends with
//!    their runtime detection; they import nothing of the crate.
//! 1. **Errors** (`error`): [`Error`], the step limit, the shared checks.
//! 2. **Policy and vocabulary** (`exec`, `keywords`, [`memory`],
//!    [`schedule`]): the [`Exec`] policy, the torch keyword vocabulary
//!    ([`HyperValue`], the `torch_options!` macro each optimizer file invokes,
//!    options to and from JSON), aligned buffers, learning-rate schedules.
//! 3. **Lanes** (`simd`): the lane types every formula is written against
//!    (`f32`, `wide`, AVX2, AVX-512) and `dispatch`, the one place that turns
//!    a [`Backend`] into a lane type. The AVX2/AVX-512 lanes are private to
//!    it and entered only with a capability token that runtime detection
//!    makes.
//! 4. **Storage and step math** ([`storage`], `math`): `f32`, `bf16`, `f16`
//!    and 8-bit block-wise buffers, their conversions and tiles; the math the
//!    kernels share (loss-scale removal, L2 decay, the guarded division,
//!    torch's `lerp`, `beta ** step`).
//! 5. **The driver** (`driver`): the one loop that runs a kernel (SIMD body,
//!    scalar tail; the `f32` loop, the fused bf16 loop or the tiled
//!    mixed-storage loop), the non-finite scan, the sum of squares, and
//!    `split_reduce`, the one split-and-join recursion (dense, mixed, scan,
//!    norm, grouped arena, multi-tensor pieces). It divides out the loss
//!    scale and multiplies in the clipping factor on every gradient before
//!    any kernel sees it, so no optimizer and no path can leave them out.
//! 6. **Clipping** ([`clip`]): the global norm and its factor.
//! 7. **The optimizers** ([`optim`]): one file each, holding the config
//!    (torch's names and defaults, validation, its torch options), the state
//!    layout and the per-element formula; `optim/mod.rs` holds the registry,
//!    the [`Algorithm`] trait and the free kernels [`step_slices`] /
//!    [`step_mixed`]; `optim/guards.rs` the controls every owner shares (the
//!    non-finite policy, loss scale, clipping, the schedule application);
//!    `optim/owner.rs` the owning [`Optimizer`].
//! 8. **Owners of many tensors, of shapes or of storages**: [`groups`]
//!    (one arena, shardable), [`mixed`] (one tensor's state in `f32`,
//!    `bf16` or 8-bit storage, and the owned buffers the multi-tensor owner
//!    reuses), [`sparse`] (row-sparse tables), [`adafactor`] (factored
//!    statistics per tensor shape), [`roofline`] (the bandwidth-ceiling
//!    kernel).
//! 9. **Caller-owned tensors and names**: [`multi`] (per-tensor step
//!    counts, each group's state in a [`mixed`] storage); [`any`]
//!    ([`AnyConfig`] / [`AnyOptimizer`], generated from the registry).
//! 10. **I/O** ([`checkpoint`]): the format, atomic files, and one part per
//!     owner (dense, grouped, multi, sparse, Adafactor, any).
//!
//! A step: [`Optimizer::step`] checks lengths and the step limit, runs the
//! guards (non-finite scan, or the norm pass when clipping), resolves a plan
//! (backend, loss scale, clip factor), and calls the configuration's
//! `run`, which folds the step's scalars in f64 and hands its kernel to the
//! driver.
//!
//! Adding an element-wise optimizer: one file under `src/optim/` (its
//! config with torch's names and defaults, `validate`, its state names, its
//! kernel, and its `torch_options!` line naming the keyword options) and one
//! line in the registry, `for_each_optimizer!` in `src/optim/mod.rs`. The
//! module, the re-export, the `Optimizer<Config>` alias, `AnyConfig`,
//! `AnyOptimizer` and `AnyConfig::TORCH_CLASSES` (which the tests, benches,
//! fuzz targets and the throughput report iterate) follow from that line.
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

pub mod adafactor;
pub mod any;
mod backend;
pub mod checkpoint;
pub mod clip;
mod driver;
mod dtype;
mod error;
mod exec;
pub mod groups;
mod keywords;
mod math;
pub mod memory;
pub mod mixed;
pub mod multi;
pub mod optim;
pub mod roofline;
pub mod schedule;
mod simd;
pub mod sparse;
pub mod storage;

pub use adafactor::{Adafactor, AdafactorConfig, AdafactorState, UpdateBuffer};
pub use any::{AnyConfig, AnyOptimizer};
pub use backend::Backend;
pub use driver::StepReport;
pub use error::{Error, IoSource, MAX_STEP};
pub use exec::{AUTO_GRAIN, Exec, PAR_THRESHOLD, PAR_THRESHOLD_INSIDE, Parallel};
pub use keywords::HyperValue;
pub use optim::registered::*;
pub use optim::{
    Algorithm, AuxState, MAX_AUX, MAX_STATE, NonFinitePolicy, Optimizer, StepOptions, step_mixed, step_slices,
    step_slices_with,
};

/// The README's examples, compiled and run as doc-tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
