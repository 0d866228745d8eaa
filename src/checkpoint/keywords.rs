//! The torch keyword vocabulary: options to and from JSON, as torch's
//! constructors and `param_groups` entries spell them. The one place that
//! knows which keys are ours, which are torch's bookkeeping, and which pick
//! an implementation.

use serde_json::{Map, Value};

use super::bad;
use crate::{AnyConfig, Error, HyperValue};

/// torch keyword arguments that pick one of torch's implementations and do
/// not change the update rule; accepted and ignored.
pub(crate) const IMPLEMENTATION_KEYS: [&str; 4] = ["foreach", "fused", "differentiable", "capturable"];

/// Options of ours that torch's constructors do not take. They are written
/// only when set, so that torch can take a `param_groups` entry as keyword
/// arguments whenever the configuration is one torch has.
const EXTENSION_KEYS: [&str; 1] = ["eps_inside_sqrt"];

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

/// torch keyword arguments from JSON (see [`AnyConfig::from_torch_json`]) as
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

/// The configuration of one `param_groups` entry of a checkpoint.
pub(crate) fn options_from_json(class: &str, group: &Value, skip: &[&str]) -> Result<AnyConfig, Error> {
    kwargs_from_json(group, skip)
        .and_then(|opts| AnyConfig::from_torch(class, &opts))
        .map_err(|e| bad(format!("hyperparameters: {e}")))
}
