//! [`MixedOptimizer`]: one tensor's optimizer owning its state in a
//! reduced-precision storage (`f32`, `bf16` or 8-bit block-wise), stepping
//! parameters and gradients of any [`storage`](crate::storage) type through
//! [`step_mixed`](crate::step_mixed).
//!
//! ```
//! use adaoptim::mixed::MixedOptimizer;
//! use adaoptim::storage::{bf16, Dtype, Grads, Params};
//! use adaoptim::AdamWConfig;
//!
//! let n = 1000;
//! let mut opt = MixedOptimizer::new(AdamWConfig::default(), n, Dtype::Q8)?; // 8-bit states
//! let mut params = vec![bf16::from_f32(0.5); n]; // bf16 params
//! let grads = vec![bf16::from_f32(0.01); n]; // bf16 grads
//! opt.step(Params::Bf16(&mut params), Grads::Bf16(&grads), None)?;
//! let bytes = opt.to_safetensors()?; // state1/absmax1/qmap1, ... as bitsandbytes names them
//! let back = MixedOptimizer::<AdamWConfig>::from_safetensors(&bytes)?;
//! assert_eq!(back.steps(), 1);
//! # Ok::<(), adaoptim::Error>(())
//! ```

use crate::error::{check_len, next_step};
use crate::memory::{self, Raw};
use crate::optim::sealed::Sealed;
use crate::storage::{
    Dtype, Grads, ParamCopy, ParamRounding, Params, Q8_BLOCK, Q8State, QMap, StateBuf, bf16, dequantize_blockwise,
    quantize_blockwise,
};
use crate::{Algorithm, Error, Exec, StepOptions, StepReport};

/// One state buffer, owned, in its storage (a [`MixedOptimizer`]'s, or a
/// [`MultiOptimizer`](crate::multi::MultiOptimizer) tensor's).
#[derive(Clone, Debug)]
pub(crate) enum Owned {
    F32(Raw),
    Bf16(Vec<bf16>),
    Q8 { codes: Vec<u8>, absmax: Vec<f32>, map: &'static QMap },
}

impl Owned {
    /// `n` elements of value `x` in `dtype`: `f32`, `bf16` (rounded to
    /// nearest) or 8-bit block-wise with `name`'s map (every block
    /// quantizes `x` alike).
    ///
    /// # Errors
    /// [`Error::Storage`] for another dtype; [`Error::TooLarge`] where the
    /// buffer cannot be allocated.
    pub(crate) fn new(dtype: Dtype, n: usize, x: f32, name: &str) -> Result<Owned, Error> {
        check_state_dtype(dtype)?;
        Ok(match dtype {
            Dtype::F32 => Owned::F32(memory::try_filled("state", n, x)?),
            Dtype::Bf16 => Owned::Bf16(try_vec(n, bf16::from_f32(x))?),
            Dtype::Q8 => {
                let map = QMap::for_state(name);
                let (mut code, mut scale) = ([0u8; 1], [0f32; 1]);
                quantize_blockwise(&[x], map, &mut code, &mut scale)?;
                Owned::Q8 { codes: try_vec(n, code[0])?, absmax: try_vec(n.div_ceil(Q8_BLOCK), scale[0])?, map }
            }
            _ => unreachable!("checked above"),
        })
    }

    /// `values` rounded (`bf16`, to nearest) or quantized (8-bit, with
    /// `name`'s map) into `dtype`.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub(crate) fn from_f32(dtype: Dtype, values: &[f32], name: &str) -> Result<Owned, Error> {
        check_state_dtype(dtype)?;
        let n = values.len();
        Ok(match dtype {
            Dtype::F32 => {
                let mut x = memory::try_filled("state", n, 0.0)?;
                x.copy_from_slice(values);
                Owned::F32(x)
            }
            Dtype::Bf16 => {
                let mut x = try_vec(n, bf16::ZERO)?;
                x.iter_mut().zip(values).for_each(|(d, &v)| *d = bf16::from_f32(v));
                Owned::Bf16(x)
            }
            _ => {
                let map = QMap::for_state(name);
                let (mut codes, mut absmax) = (try_vec(n, 0u8)?, try_vec(n.div_ceil(Q8_BLOCK), 0f32)?);
                quantize_blockwise(values, map, &mut codes, &mut absmax)?;
                Owned::Q8 { codes, absmax, map }
            }
        })
    }

    /// The buffer, borrowed for a step.
    pub(crate) fn buf(&mut self) -> StateBuf<'_> {
        match self {
            Owned::F32(x) => StateBuf::F32(x),
            Owned::Bf16(x) => StateBuf::Bf16(x),
            Owned::Q8 { codes, absmax, map } => StateBuf::Q8(Q8State { codes, absmax, map }),
        }
    }

    /// The storage.
    pub(crate) fn dtype(&self) -> Dtype {
        match self {
            Owned::F32(_) => Dtype::F32,
            Owned::Bf16(_) => Dtype::Bf16,
            Owned::Q8 { .. } => Dtype::Q8,
        }
    }

    /// The `f32` values (widened or dequantized).
    pub(crate) fn to_f32(&self) -> Vec<f32> {
        match self {
            Owned::F32(x) => x.to_vec(),
            Owned::Bf16(x) => x.iter().map(|v| v.to_f32()).collect(),
            Owned::Q8 { codes, absmax, map } => {
                let mut out = vec![0.0; codes.len()];
                dequantize_blockwise(codes, absmax, map, &mut out).expect("lengths kept by the owner");
                out
            }
        }
    }

    /// The parts bitsandbytes' `state_dict` holds, for an 8-bit buffer.
    pub(crate) fn q8_parts(&self) -> Option<Q8Parts<'_>> {
        match self {
            Owned::Q8 { codes, absmax, map } => Some(Q8Parts { state: codes, absmax, qmap: map.code() }),
            _ => None,
        }
    }
}

/// [`Error::Storage`] unless `dtype` is a state storage: `F32`, `BF16`, `Q8`.
pub(crate) fn check_state_dtype(dtype: Dtype) -> Result<(), Error> {
    match dtype {
        Dtype::F32 | Dtype::Bf16 | Dtype::Q8 => Ok(()),
        other => Err(Error::Storage { what: "state", dtype: other, reason: "optimizer state is f32, bf16 or 8-bit" }),
    }
}

/// `n` copies of `x`, or [`Error::TooLarge`] instead of an abort.
fn try_vec<T: Clone>(n: usize, x: T) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::TooLarge { what: "state", elements: n })?;
    v.resize(n, x);
    Ok(v)
}

/// An optimizer over `n` parameters that owns its state buffers in one
/// storage type ([`Dtype::F32`], [`Dtype::Bf16`] or [`Dtype::Q8`]) and its
/// step count; parameters and gradients are borrowed per step in any
/// storage [`step_mixed`](crate::step_mixed) takes, with an optional
/// half-precision copy of `f32` parameters.
///
/// Each step is [`step_mixed`](crate::step_mixed) on the owned buffers: the
/// same bits, every backend and thread count. `bf16` parameters may round
/// stochastically ([`set_stochastic_rounding`](Self::set_stochastic_rounding)).
/// Checkpoints ([`to_safetensors`](Self::to_safetensors)) keep the state in
/// its storage, bit for bit: `F32`/`BF16` tensors under torch's state names,
/// or for 8-bit states bitsandbytes' `state_dict` names and dtypes — the
/// `i`-th state (1-based) as `state{i}` (`U8` codes), `absmax{i}` (`F32`,
/// one per block of 256) and `qmap{i}` (`F32`, the 256 code values).
#[derive(Clone, Debug)]
pub struct MixedOptimizer<A: Algorithm> {
    pub(crate) config: A,
    pub(crate) n: usize,
    pub(crate) t: u64,
    pub(crate) aux: <A as Sealed>::Aux,
    pub(crate) dtype: Dtype,
    pub(crate) state: Vec<Owned>,
    exec: Exec,
    seed: Option<u64>,
}

impl<A: Algorithm> MixedOptimizer<A> {
    /// Validates `config` and makes the state for `n` parameters in
    /// `state_dtype`: zero, or the configuration's initial value (Adagrad's
    /// `initial_accumulator_value`) rounded into the storage.
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`]; [`Error::Storage`] for a state dtype
    /// other than `F32`, `BF16` and `Q8`.
    pub fn new(config: A, n: usize, state_dtype: Dtype) -> Result<Self, Error> {
        config.validate()?;
        let names = config.state_names();
        let state = names
            .iter()
            .enumerate()
            .map(|(i, name)| Owned::new(state_dtype, n, config.state_init(i), name))
            .collect::<Result<_, _>>()?;
        Ok(MixedOptimizer {
            aux: config.aux_init(),
            config,
            n,
            t: 0,
            dtype: state_dtype,
            state,
            exec: Exec::auto(),
            seed: None,
        })
    }

    /// One step: updates `params` in place from `grads` (and writes
    /// `param_copy`, if given, from `f32` params).
    ///
    /// # Errors
    /// As [`step_mixed`](crate::step_mixed) (a parameter or gradient of
    /// another length than the optimizer's, a copy beside non-`f32`
    /// params, stochastic rounding beside `f32` params), and
    /// [`Error::StepLimit`]. Nothing is modified then.
    pub fn step(
        &mut self,
        params: Params<'_>,
        grads: Grads<'_>,
        param_copy: Option<ParamCopy<'_>>,
    ) -> Result<StepReport, Error> {
        check_len("params", self.n, params.len())?;
        let t = next_step(self.t)?;
        let param_rounding = match self.seed {
            Some(seed) if params.dtype() == Dtype::Bf16 => ParamRounding::Stochastic { seed, offset: 0 },
            _ => ParamRounding::Nearest,
        };
        let options = StepOptions { exec: self.exec, param_rounding, ..StepOptions::default() };
        let mut bufs: Vec<StateBuf<'_>> = self.state.iter_mut().map(Owned::buf).collect();
        let report = crate::step_mixed(&self.config, t, &mut self.aux, params, grads, &mut bufs, param_copy, &options)?;
        self.t = t;
        Ok(report)
    }

    /// The number of parameters.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True for an optimizer of no parameters.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// The storage of the state buffers.
    pub fn state_dtype(&self) -> Dtype {
        self.dtype
    }

    /// The configuration.
    pub fn config(&self) -> &A {
        &self.config
    }

    /// Sets the execution policy.
    pub fn set_exec(&mut self, exec: Exec) {
        self.exec = exec;
    }

    /// Sets the learning rate.
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`] for a negative or non-finite rate;
    /// nothing changes then.
    pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
        crate::error::non_negative("lr", lr)?;
        self.config.set_lr_unchecked(lr);
        Ok(())
    }

    /// Rounds `bf16` parameters stochastically with this seed (`None`: to
    /// nearest, the default); `f32` parameters are not affected. The seed is
    /// not saved in checkpoints (like the execution policy): set it again
    /// after loading to continue the same stream.
    pub fn set_stochastic_rounding(&mut self, seed: Option<u64>) {
        self.seed = seed;
    }

    /// The `f32` values of the state buffer of this torch name (widened or
    /// dequantized), if the optimizer has one.
    pub fn state_f32(&self, name: &str) -> Option<Vec<f32>> {
        let i = self.config.state_names().iter().position(|s| *s == name)?;
        Some(self.state[i].to_f32())
    }
}

/// One 8-bit state as bitsandbytes' `state_dict` holds it: `state{i}`
/// (codes), `absmax{i}` and `qmap{i}`.
#[derive(Clone, Copy, Debug)]
pub struct Q8Parts<'a> {
    /// The codes, one per element (`state1`, `state2`).
    pub state: &'a [u8],
    /// One scale per block of 256 elements (`absmax1`, `absmax2`).
    pub absmax: &'a [f32],
    /// The 256 code values (`qmap1`, `qmap2`).
    pub qmap: &'a [f32],
}

impl<A: Algorithm> MixedOptimizer<A> {
    /// An optimizer with 8-bit state taken from bitsandbytes' `state_dict`
    /// of one parameter (its `state1`, `absmax1`, `qmap1`, `state2`, ... in
    /// state order, and its `step`): what a bitsandbytes 8-bit optimizer
    /// (`AdamW8bit`, ...) leaves, continued here.
    ///
    /// # Errors
    /// [`Error::StateCount`] for another number of states than the
    /// configuration's; [`Error::LengthMismatch`] for states of different
    /// lengths or an `absmax` not one per 256; [`Error::InvalidOption`] for a
    /// `qmap` that is not bitsandbytes' dynamic map for that state (signed
    /// for `exp_avg`, unsigned for `exp_avg_sq`); [`Error::InvalidStep`] past
    /// [`MAX_STEP`](crate::MAX_STEP); [`Error::InvalidHyperparameter`].
    pub fn from_q8_parts(config: A, step: u64, parts: &[Q8Parts<'_>]) -> Result<Self, Error> {
        config.validate()?;
        let names = config.state_names();
        if parts.len() != names.len() {
            return Err(Error::StateCount { expected: names.len(), actual: parts.len() });
        }
        if step > crate::MAX_STEP {
            return Err(Error::InvalidStep { step });
        }
        let n = parts.first().map_or(0, |q| q.state.len());
        let mut state = Vec::with_capacity(parts.len());
        for (name, q) in names.iter().zip(parts) {
            check_len(name, n, q.state.len())?;
            check_len("absmax", n.div_ceil(Q8_BLOCK), q.absmax.len())?;
            let map = QMap::for_state(name);
            if q.qmap.len() != 256 || q.qmap.iter().zip(map.code()).any(|(a, b)| a.to_bits() != b.to_bits()) {
                return Err(Error::InvalidOption {
                    name: "qmap".into(),
                    reason: "not bitsandbytes' dynamic map for this state",
                });
            }
            state.push(Owned::Q8 { codes: q.state.to_vec(), absmax: q.absmax.to_vec(), map });
        }
        let mut opt = MixedOptimizer::new(config, 0, Dtype::Q8)?;
        opt.n = n;
        opt.t = step;
        opt.state = state;
        Ok(opt)
    }

    /// The 8-bit state in bitsandbytes' `state_dict` form (`state{i}`,
    /// `absmax{i}`, `qmap{i}` for the `i`-th state), or `None` if the state
    /// is not 8-bit.
    pub fn q8_parts(&self) -> Option<Vec<Q8Parts<'_>>> {
        self.state.iter().map(Owned::q8_parts).collect()
    }
}
