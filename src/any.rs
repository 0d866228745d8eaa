//! Optimizers chosen at run time by torch class name and keyword options —
//! for configuration files, checkpoints and tools that take an optimizer name.
//!
//! ```
//! use adaoptim::{AnyConfig, HyperValue};
//! let cfg = AnyConfig::from_torch("AdamW", &[("lr", HyperValue::Number(3e-4))])?;
//! let mut opt = cfg.build(4)?;
//! let mut p = [1.0_f32; 4];
//! opt.step(&mut p, &[0.5; 4])?;
//! assert_eq!(opt.torch_class(), "AdamW");
//!
//! // Adafactor factors a matrix's second moment, so it is built for a shape
//! let cfg = AnyConfig::from_torch_json("Adafactor", r#"{"lr": 0.01, "eps": [null, 0.001]}"#)?;
//! let mut opt = cfg.build_shaped(&[2, 2])?;
//! opt.step(&mut p, &[0.5; 4])?;
//! assert_eq!(opt.state_names(), ["row_var", "col_var"]);
//! # Ok::<(), adaoptim::Error>(())
//! ```

pub use crate::keywords::HyperValue;
use crate::optim::registered::*;
use crate::{Adafactor, AdafactorConfig, Algorithm, Error, Exec, NonFinitePolicy, Optimizer, StepReport};

/// What the element-wise entry points return for Adafactor, whose step
/// needs the tensor's shape.
const SHAPE_NEEDED: Error = Error::IncompatibleConfig {
    reason: "Adafactor needs the tensor's shape: use build_shaped, Adafactor or adafactor::step_slices",
};

macro_rules! any_types {
    ($($module:ident { $($variant:ident($cfg:ident)),+ })*) => {
        any_types!(@flat $($($variant($cfg)),+),*);
    };
    (@flat $($variant:ident($cfg:ident)),* $(,)?) => {
        /// Any optimizer configuration of this crate.
        #[derive(Clone, Copy, Debug, PartialEq)]
        #[allow(missing_docs)]
        #[non_exhaustive]
        pub enum AnyConfig {
            $($variant($cfg),)*
            Adafactor(AdafactorConfig),
        }

        /// Any optimizer of this crate, chosen at run time.
        #[derive(Clone, Debug)]
        #[allow(missing_docs)]
        #[non_exhaustive]
        pub enum AnyOptimizer {
            $($variant(Optimizer<$cfg>),)*
            Adafactor(Adafactor),
        }

        impl From<AdafactorConfig> for AnyConfig {
            fn from(c: AdafactorConfig) -> Self {
                AnyConfig::Adafactor(c)
            }
        }
        impl From<Adafactor> for AnyOptimizer {
            fn from(o: Adafactor) -> Self {
                AnyOptimizer::Adafactor(o)
            }
        }

        $(
            impl From<$cfg> for AnyConfig {
                fn from(c: $cfg) -> Self {
                    AnyConfig::$variant(c)
                }
            }
            impl From<Optimizer<$cfg>> for AnyOptimizer {
                fn from(o: Optimizer<$cfg>) -> Self {
                    AnyOptimizer::$variant(o)
                }
            }
        )*

        impl AnyConfig {
            /// The torch class names of the element-wise optimizers: every
            /// method of this type takes them. [`SHAPED_CLASSES`](Self::SHAPED_CLASSES)
            /// lists the others.
            pub const TORCH_CLASSES: &'static [&'static str] = &[$(<$cfg as Algorithm>::TORCH_CLASS),*];

            /// The torch class names of the optimizers that need the tensor's
            /// shape (`"Adafactor"`): built with
            /// [`build_shaped`](Self::build_shaped); the slice-only entry points
            /// ([`step_slices_with`](Self::step_slices_with),
            /// [`step_mixed`](Self::step_mixed)) return
            /// [`Error::IncompatibleConfig`] for them.
            pub const SHAPED_CLASSES: &'static [&'static str] = &[AdafactorConfig::TORCH_CLASS];

            /// The default configuration of a torch class (`"Adam"`, `"SGD"`, ...).
            ///
            /// # Errors
            /// [`Error::UnknownOptimizer`].
            pub fn default_for(torch_class: &str) -> Result<AnyConfig, Error> {
                $(if torch_class == <$cfg as Algorithm>::TORCH_CLASS {
                    return Ok(AnyConfig::$variant($cfg::default()));
                })*
                if torch_class == AdafactorConfig::TORCH_CLASS {
                    return Ok(AnyConfig::Adafactor(AdafactorConfig::default()));
                }
                Err(Error::UnknownOptimizer { name: torch_class.to_string() })
            }

            /// The torch class name.
            pub fn torch_class(&self) -> &'static str {
                match self {
                    $(AnyConfig::$variant(_) => <$cfg as Algorithm>::TORCH_CLASS,)*
                    AnyConfig::Adafactor(_) => AdafactorConfig::TORCH_CLASS,
                }
            }

            /// Sets one keyword option by its torch name.
            ///
            /// # Errors
            /// [`Error::InvalidOption`].
            pub fn set_option(&mut self, key: &str, v: &HyperValue) -> Result<(), Error> {
                match self { $(AnyConfig::$variant(c) => c.set_option(key, v),)* AnyConfig::Adafactor(c) => c.set_option(key, v) }
            }

            /// Every option with its torch name and value.
            pub fn options(&self) -> Vec<(&'static str, HyperValue)> {
                match self { $(AnyConfig::$variant(c) => c.options(),)* AnyConfig::Adafactor(c) => c.options() }
            }

            /// Checks the hyperparameters.
            ///
            /// # Errors
            /// [`Error::InvalidHyperparameter`].
            pub fn validate(&self) -> Result<(), Error> {
                match self { $(AnyConfig::$variant(c) => c.validate(),)* AnyConfig::Adafactor(c) => c.validate() }
            }

            /// State buffer names, torch's `state_dict` names, in kernel order.
            /// Adafactor's depend on the shape: `row_var` and `col_var` for two
            /// or more dimensions, `variance` for a vector; all three are listed
            /// ([`AnyOptimizer::state_names`] gives a tensor's).
            pub fn state_names(&self) -> &'static [&'static str] {
                match self {
                    $(AnyConfig::$variant(c) => c.state_names(),)*
                    AnyConfig::Adafactor(_) => &["row_var", "col_var", "variance"],
                }
            }

            /// Initial value of state buffer `i` (0 except Adagrad's `sum`).
            pub fn state_init(&self, i: usize) -> f32 {
                match self { $(AnyConfig::$variant(c) => c.state_init(i),)* AnyConfig::Adafactor(_) => 0.0 }
            }

            /// The torch names of the scalar states (NAdam's `mu_product`,
            /// ASGD's `eta` and `mu`; none for most optimizers).
            pub fn aux_names(&self) -> &'static [&'static str] {
                use crate::optim::sealed::Sealed;
                match self { $(AnyConfig::$variant(_) => <$cfg as Sealed>::AUX_NAMES,)* AnyConfig::Adafactor(_) => &[] }
            }

            /// The initial scalar state as torch stores it, in the order of
            /// [`aux_names`](Self::aux_names) (NAdam's `mu_product` = 1),
            /// unused entries 0.
            pub fn aux_init(&self) -> crate::AuxState {
                use crate::optim::sealed::Sealed;
                match self {
                    $(AnyConfig::$variant(c) => <$cfg as Sealed>::aux_to_f32(&c.aux_init()),)*
                    AnyConfig::Adafactor(_) => Default::default(),
                }
            }

            /// [`step_slices_with`](crate::step_slices_with) for whatever
            /// configuration this is: the free kernel over caller-owned state,
            /// chosen at run time. `aux` is the scalar state as torch stores
            /// it (start from [`aux_init`](Self::aux_init)), carried exactly.
            ///
            /// # Errors
            /// As [`step_slices_with`](crate::step_slices_with);
            /// [`Error::IncompatibleConfig`] for Adafactor
            /// ([`SHAPED_CLASSES`](Self::SHAPED_CLASSES)); nothing is modified
            /// then.
            pub fn step_slices_with(
                &self,
                t: u64,
                aux: &mut crate::AuxState,
                params: &mut [f32],
                grads: &[f32],
                state: &mut [&mut [f32]],
                options: &crate::StepOptions,
            ) -> Result<StepReport, Error> {
                use crate::optim::sealed::Sealed;
                match self {
                    $(AnyConfig::$variant(c) => {
                        let mut a = <$cfg as Sealed>::aux_from_f32(*aux).unwrap_or_else(|| c.aux_init());
                        let r = crate::step_slices_with(c, t, &mut a, params, grads, state, options)?;
                        *aux = <$cfg as Sealed>::aux_to_f32(&a);
                        Ok(r)
                    })*
                    AnyConfig::Adafactor(_) => Err(SHAPE_NEEDED),
                }
            }

            /// [`step_mixed`](crate::step_mixed) for whatever configuration
            /// this is: a step over buffers in any storage type, `aux` as in
            /// [`step_slices_with`](Self::step_slices_with).
            ///
            /// # Errors
            /// As [`step_mixed`](crate::step_mixed); [`Error::IncompatibleConfig`]
            /// for Adafactor; nothing is modified then.
            #[allow(clippy::too_many_arguments)]
            pub fn step_mixed(
                &self,
                t: u64,
                aux: &mut crate::AuxState,
                params: crate::storage::Params<'_>,
                grads: crate::storage::Grads<'_>,
                state: &mut [crate::storage::StateBuf<'_>],
                param_copy: Option<crate::storage::ParamCopy<'_>>,
                options: &crate::StepOptions,
            ) -> Result<StepReport, Error> {
                use crate::optim::sealed::Sealed;
                match self {
                    $(AnyConfig::$variant(c) => {
                        let mut a = <$cfg as Sealed>::aux_from_f32(*aux).unwrap_or_else(|| c.aux_init());
                        let r = crate::step_mixed(c, t, &mut a, params, grads, state, param_copy, options)?;
                        *aux = <$cfg as Sealed>::aux_to_f32(&a);
                        Ok(r)
                    })*
                    AnyConfig::Adafactor(_) => Err(SHAPE_NEEDED),
                }
            }

            /// An optimizer over `n` parameters (for Adafactor, a vector of
            /// `n`: unfactored; [`build_shaped`](Self::build_shaped) gives a
            /// matrix its factored state).
            ///
            /// # Errors
            /// [`Error::InvalidHyperparameter`].
            pub fn build(&self, n: usize) -> Result<AnyOptimizer, Error> {
                self.build_shaped(&[n])
            }

            /// An optimizer for a tensor of `shape` (row-major; `[]` is one
            /// element). The element-wise optimizers use only its element count;
            /// Adafactor factors the second moment of two or more dimensions.
            ///
            /// # Errors
            /// [`Error::InvalidHyperparameter`]; [`Error::TooLarge`] if the
            /// element count overflows.
            pub fn build_shaped(&self, shape: &[usize]) -> Result<AnyOptimizer, Error> {
                let too_large = Error::TooLarge { what: "params", elements: usize::MAX };
                let n = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).ok_or(too_large)?;
                Ok(match self {
                    $(AnyConfig::$variant(c) => AnyOptimizer::$variant(Optimizer::new(*c, n)?),)*
                    AnyConfig::Adafactor(c) => AnyOptimizer::Adafactor(Adafactor::new(*c, shape)?),
                })
            }
        }

        impl AnyOptimizer {
            /// See [`Optimizer::step`].
            ///
            /// # Errors
            /// As [`Optimizer::step`].
            pub fn step(&mut self, params: &mut [f32], grads: &[f32]) -> Result<StepReport, Error> {
                match self { $(AnyOptimizer::$variant(o) => o.step(params, grads),)* AnyOptimizer::Adafactor(o) => o.step(params, grads) }
            }
            /// The configuration.
            pub fn config(&self) -> AnyConfig {
                match self {
                    $(AnyOptimizer::$variant(o) => AnyConfig::$variant(*o.config()),)*
                    AnyOptimizer::Adafactor(o) => AnyConfig::Adafactor(*o.config()),
                }
            }
            /// Replaces the configuration, keeping the state.
            ///
            /// # Errors
            /// As [`Optimizer::set_config`]; [`Error::IncompatibleConfig`] for
            /// another optimizer kind.
            pub fn set_config(&mut self, config: AnyConfig) -> Result<(), Error> {
                match (self, config) {
                    $((AnyOptimizer::$variant(o), AnyConfig::$variant(c)) => o.set_config(c),)*
                    (AnyOptimizer::Adafactor(o), AnyConfig::Adafactor(c)) => o.set_config(c),
                    _ => Err(Error::IncompatibleConfig { reason: "another optimizer kind" }),
                }
            }
            /// The torch class name.
            pub fn torch_class(&self) -> &'static str {
                match self {
                    $(AnyOptimizer::$variant(_) => <$cfg as Algorithm>::TORCH_CLASS,)*
                    AnyOptimizer::Adafactor(_) => AdafactorConfig::TORCH_CLASS,
                }
            }
            /// See [`Optimizer::lr`].
            pub fn lr(&self) -> f64 {
                match self { $(AnyOptimizer::$variant(o) => o.lr(),)* AnyOptimizer::Adafactor(o) => o.lr() }
            }
            /// See [`Optimizer::set_lr`].
            ///
            /// # Errors
            /// As [`Optimizer::set_lr`].
            pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
                match self { $(AnyOptimizer::$variant(o) => o.set_lr(lr),)* AnyOptimizer::Adafactor(o) => o.set_lr(lr) }
            }
            /// See [`Optimizer::step_count`].
            pub fn step_count(&self) -> u64 {
                match self { $(AnyOptimizer::$variant(o) => o.step_count(),)* AnyOptimizer::Adafactor(o) => o.steps() }
            }
            /// See [`Optimizer::len`].
            pub fn len(&self) -> usize {
                match self { $(AnyOptimizer::$variant(o) => o.len(),)* AnyOptimizer::Adafactor(o) => o.len() }
            }
            /// See [`Optimizer::is_empty`].
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }
            /// See [`Optimizer::set_exec`].
            pub fn set_exec(&mut self, exec: Exec) {
                match self { $(AnyOptimizer::$variant(o) => o.set_exec(exec),)* AnyOptimizer::Adafactor(o) => o.set_exec(exec) }
            }
            /// See [`Optimizer::set_non_finite`].
            pub fn set_non_finite(&mut self, policy: NonFinitePolicy) {
                match self { $(AnyOptimizer::$variant(o) => o.set_non_finite(policy),)* AnyOptimizer::Adafactor(o) => o.set_non_finite(policy) }
            }
            /// See [`Optimizer::set_grad_scale`].
            ///
            /// # Errors
            /// As [`Optimizer::set_grad_scale`].
            pub fn set_grad_scale(&mut self, grad_scale: Option<f32>) -> Result<(), Error> {
                match self { $(AnyOptimizer::$variant(o) => o.set_grad_scale(grad_scale),)* AnyOptimizer::Adafactor(o) => o.set_grad_scale(grad_scale) }
            }
            /// See [`Optimizer::set_max_grad_norm`].
            ///
            /// # Errors
            /// As [`Optimizer::set_max_grad_norm`].
            pub fn set_max_grad_norm(&mut self, max_norm: Option<f64>) -> Result<(), Error> {
                match self { $(AnyOptimizer::$variant(o) => o.set_max_grad_norm(max_norm),)* AnyOptimizer::Adafactor(o) => o.set_max_grad_norm(max_norm) }
            }
            /// See [`Optimizer::last_grad_norm`].
            pub fn last_grad_norm(&self) -> Option<f64> {
                match self { $(AnyOptimizer::$variant(o) => o.last_grad_norm(),)* AnyOptimizer::Adafactor(o) => o.last_grad_norm() }
            }
            /// See [`Optimizer::state`].
            pub fn state(&self, name: &str) -> Option<&[f32]> {
                match self { $(AnyOptimizer::$variant(o) => o.state(name),)* AnyOptimizer::Adafactor(o) => o.state(name) }
            }
            /// See [`Optimizer::to_safetensors`].
            ///
            /// # Errors
            /// As [`Optimizer::to_safetensors`].
            pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
                match self { $(AnyOptimizer::$variant(o) => o.to_safetensors(),)* AnyOptimizer::Adafactor(o) => o.to_safetensors() }
            }
            /// See [`Optimizer::restore`]; also an error for another kind.
            ///
            /// # Errors
            /// As [`Optimizer::restore`].
            pub fn restore(&mut self, bytes: &[u8]) -> Result<(), Error> {
                match self { $(AnyOptimizer::$variant(o) => o.restore(bytes),)* AnyOptimizer::Adafactor(o) => o.restore(bytes) }
            }
            /// See [`Optimizer::state_names`].
            pub fn state_names(&self) -> &'static [&'static str] {
                match self { $(AnyOptimizer::$variant(o) => o.state_names(),)* AnyOptimizer::Adafactor(o) => o.state_names() }
            }
        }
    };
}

crate::optim::for_each_optimizer!(any_types);

impl AnyConfig {
    /// A configuration from a torch class name and keyword arguments;
    /// options not given keep torch's defaults.
    ///
    /// # Errors
    /// [`Error::UnknownOptimizer`], [`Error::InvalidOption`] or
    /// [`Error::InvalidHyperparameter`].
    pub fn from_torch(torch_class: &str, options: &[(&str, HyperValue)]) -> Result<AnyConfig, Error> {
        let mut c = AnyConfig::default_for(torch_class)?;
        for (k, v) in options {
            c.set_option(k, v)?;
        }
        c.validate()?;
        Ok(c)
    }

    /// A configuration from torch keyword arguments written as a JSON
    /// object: `{"lr": 0.001, "betas": [0.9, 0.999], "amsgrad": true}`, or one
    /// entry of a torch optimizer's `param_groups` as `json.dumps` writes it
    /// (its `params` list and a scheduler's `initial_lr` are ignored, and
    /// `null` is accepted for `foreach`, `fused`, `capturable` and
    /// `differentiable`). Options not given keep torch's defaults.
    ///
    /// # Errors
    /// As [`from_torch`](Self::from_torch), and [`Error::InvalidOption`] for
    /// text that is not a JSON object or a value that is not a number, a
    /// flag or a pair of numbers.
    pub fn from_torch_json(torch_class: &str, kwargs: &str) -> Result<AnyConfig, Error> {
        let v = crate::keywords::parse_kwargs(kwargs)?;
        if torch_class == AdafactorConfig::TORCH_CLASS {
            // its `eps = (None, eps2)` is JSON `[null, eps2]`
            return AdafactorConfig::from_torch_kwargs(&v).map(AnyConfig::Adafactor);
        }
        AnyConfig::from_torch(torch_class, &crate::keywords::kwargs_from_json(&v, &[])?)
    }
}
