//! The torch keyword vocabulary, below everything that uses it: the
//! [`HyperValue`] a keyword argument carries, the `torch_options!` macro each
//! configuration's file invokes to name its torch options, and options to and
//! from JSON as torch's constructors and `param_groups` entries spell them.
//! The one place that knows which keys are ours, which are torch's
//! bookkeeping, and which pick an implementation. Imports only [`Error`].

use serde_json::{Map, Value};

use crate::Error;

/// Adafactor's `eps = (eps1 or None, eps2)`: a pair sets `Some(eps1)`; `None`
/// reads back as f32's machine epsilon, the value the step uses for it.
impl Hyper for (Option<f64>, f64) {
    fn from_hyper(name: &str, v: &HyperValue) -> Result<Self, Error> {
        let (a, b) = <(f64, f64)>::from_hyper(name, v)?;
        Ok((Some(a), b))
    }
    fn to_hyper(&self) -> HyperValue {
        HyperValue::Pair(self.0.unwrap_or(f64::from(f32::EPSILON)), self.1)
    }
}

/// A configuration's torch keyword options, as `torch_options!` implements
/// them (the generic face of each configuration's `set_option` and
/// `options`, for the checkpoint layer). Not nameable outside the crate.
pub trait TorchOptions: Sized {
    /// Sets one option by its torch name.
    ///
    /// # Errors
    /// [`Error::InvalidOption`].
    fn set_torch_option(&mut self, key: &str, v: &HyperValue) -> Result<(), Error>;
    /// Every option with its torch name and value.
    fn torch_options(&self) -> Vec<(&'static str, HyperValue)>;
    /// The default configuration with `options` set (not validated).
    ///
    /// # Errors
    /// [`Error::InvalidOption`].
    fn with_torch_options(options: &[(&str, HyperValue)]) -> Result<Self, Error>;
}

/// A hyperparameter value as torch's keyword arguments carry it.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum HyperValue {
    /// A float or integer.
    Number(f64),
    /// A flag.
    Bool(bool),
    /// A pair such as `betas`.
    Pair(f64, f64),
}

pub(crate) trait Hyper: Sized {
    fn from_hyper(name: &str, v: &HyperValue) -> Result<Self, Error>;
    fn to_hyper(&self) -> HyperValue;
}

fn wrong_type(name: &str, expected: &'static str) -> Error {
    Error::InvalidOption { name: name.to_string(), reason: expected }
}

impl Hyper for f64 {
    fn from_hyper(name: &str, v: &HyperValue) -> Result<Self, Error> {
        match *v {
            HyperValue::Number(x) => Ok(x),
            _ => Err(wrong_type(name, "expected a number")),
        }
    }
    fn to_hyper(&self) -> HyperValue {
        HyperValue::Number(*self)
    }
}

impl Hyper for bool {
    fn from_hyper(name: &str, v: &HyperValue) -> Result<Self, Error> {
        match *v {
            HyperValue::Bool(b) => Ok(b),
            _ => Err(wrong_type(name, "expected a bool")),
        }
    }
    fn to_hyper(&self) -> HyperValue {
        HyperValue::Bool(*self)
    }
}

impl Hyper for (f64, f64) {
    fn from_hyper(name: &str, v: &HyperValue) -> Result<Self, Error> {
        match *v {
            HyperValue::Pair(a, b) => Ok((a, b)),
            _ => Err(wrong_type(name, "expected a pair of numbers")),
        }
    }
    fn to_hyper(&self) -> HyperValue {
        HyperValue::Pair(self.0, self.1)
    }
}

/// A configuration's torch keyword options: `set_option` and `options` from
/// the list of its fields that torch's constructor takes (and flags torch's
/// `param_groups` holds with one fixed value). Invoked in each optimizer's
/// own file.
macro_rules! torch_options {
    ($cfg:ty { $($field:ident),* $(,)? } $(fixed { $($flag:ident = $value:literal),* })?) => {
        impl $cfg {
            /// Sets one keyword option by its torch name.
            ///
            /// # Errors
            /// [`Error::InvalidOption`](crate::Error::InvalidOption) for an
            /// unknown name or a value of the wrong type.
            pub fn set_option(&mut self, key: &str, v: &$crate::HyperValue) -> Result<(), $crate::Error> {
                use $crate::keywords::Hyper;
                match key {
                    $(stringify!($field) => self.$field = Hyper::from_hyper(key, v)?,)*
                    k if $crate::keywords::IMPLEMENTATION_KEYS.contains(&k) => {
                        bool::from_hyper(k, v)?;
                    }
                    // A flag torch's `param_groups` holds with one value for
                    // this class (AdamW's `decoupled_weight_decay = True`).
                    $($(stringify!($flag) => {
                        if bool::from_hyper(key, v)? != $value {
                            let reason = concat!("is always ", stringify!($value), " for this optimizer");
                            return Err($crate::Error::InvalidOption { name: key.to_string(), reason });
                        }
                    })*)?
                    _ => return Err($crate::Error::InvalidOption { name: key.to_string(), reason: "unknown option" }),
                }
                Ok(())
            }

            /// Every option with its torch name and current value.
            pub fn options(&self) -> Vec<(&'static str, $crate::HyperValue)> {
                use $crate::keywords::Hyper;
                vec![$((stringify!($field), self.$field.to_hyper())),*]
            }
        }

        impl $crate::keywords::TorchOptions for $cfg {
            fn set_torch_option(&mut self, key: &str, v: &$crate::HyperValue) -> Result<(), $crate::Error> {
                self.set_option(key, v)
            }
            fn torch_options(&self) -> Vec<(&'static str, $crate::HyperValue)> {
                self.options()
            }
            fn with_torch_options(options: &[(&str, $crate::HyperValue)]) -> Result<Self, $crate::Error> {
                let mut c = <$cfg>::default();
                for (k, v) in options {
                    c.set_option(k, v)?;
                }
                Ok(c)
            }
        }
    };
}
pub(crate) use torch_options;

/// torch keyword arguments that pick one of torch's implementations and do
/// not change the update rule; accepted and ignored.
pub(crate) const IMPLEMENTATION_KEYS: [&str; 4] = ["foreach", "fused", "differentiable", "capturable"];

/// Options of ours that torch's constructors do not take. They are written
/// only when set, so that torch can take a `param_groups` entry as keyword
/// arguments whenever the configuration is one torch has.
const EXTENSION_KEYS: [&str; 2] = ["eps_inside_sqrt", "torch_exact"];

pub(crate) fn options_json(options: Vec<(&'static str, HyperValue)>) -> Map<String, Value> {
    let mut m = Map::new();
    for (k, v) in options {
        if EXTENSION_KEYS.contains(&k) && v == HyperValue::Bool(false) {
            continue;
        }
        let j = match v {
            HyperValue::Number(x) => Value::from(x),
            HyperValue::Bool(b) => Value::from(b),
            HyperValue::Pair(a, b) => Value::from(vec![a, b]),
        };
        m.insert(k.to_string(), j);
    }
    m
}

/// Keys of a torch `param_groups` entry that are not optimizer options:
/// the parameter indices, and the rate an `lr_scheduler` records at its start.
const GROUP_KEYS: [&str; 2] = ["params", "initial_lr"];

/// torch keyword arguments from JSON (see [`AnyConfig::from_torch_json`](crate::AnyConfig::from_torch_json)) as
/// option pairs; keys in `skip` and [`GROUP_KEYS`] are ignored, and torch's
/// `None` (JSON `null`) is accepted for the implementation switches
/// (`foreach`, `fused`, ...), which torch writes so.
pub(crate) fn kwargs_from_json<'a>(kwargs: &'a Value, skip: &[&str]) -> Result<Vec<(&'a str, HyperValue)>, Error> {
    let invalid = |name: &str, reason| Error::InvalidOption { name: name.to_string(), reason };
    let obj = kwargs.as_object().ok_or_else(|| invalid("kwargs", "not a JSON object"))?;
    let mut opts = Vec::with_capacity(obj.len());
    let ignored = |k: &str, v: &Value| {
        skip.contains(&k) || GROUP_KEYS.contains(&k) || (v.is_null() && IMPLEMENTATION_KEYS.contains(&k))
    };
    for (k, v) in obj.iter().filter(|(k, v)| !ignored(k, v)) {
        let h = match v {
            Value::Bool(b) => HyperValue::Bool(*b),
            Value::Number(x) => HyperValue::Number(x.as_f64().ok_or_else(|| invalid(k, "not a number"))?),
            Value::Array(a) if a.len() == 2 => match (a[0].as_f64(), a[1].as_f64()) {
                (Some(x), Some(y)) => HyperValue::Pair(x, y),
                _ => return Err(invalid(k, "not a pair of numbers")),
            },
            _ => return Err(invalid(k, "not a number, flag or pair of numbers")),
        };
        opts.push((k.as_str(), h));
    }
    Ok(opts)
}

/// JSON text parsed as a value, or [`Error::InvalidOption`].
pub(crate) fn parse_kwargs(kwargs: &str) -> Result<Value, Error> {
    serde_json::from_str(kwargs)
        .map_err(|_| Error::InvalidOption { name: "kwargs".to_string(), reason: "not valid JSON" })
}
