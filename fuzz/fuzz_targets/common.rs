//! Input shapes shared by the fuzz targets.
#![allow(dead_code)]

use adaoptim::{AnyConfig, HyperValue};
use arbitrary::Arbitrary;

/// An optimizer configuration from raw fuzz bytes: a class and a value for
/// every option that class has (numbers as raw f64, so NaN, inf, negative
/// and huge all occur; flags as bools).
#[derive(Arbitrary, Debug, Clone)]
pub struct RawConfig {
    pub class: u8,
    pub numbers: [f64; 8],
    pub flags: [bool; 6],
}

impl RawConfig {
    /// The configuration, or `None` where the crate rejects it (which the
    /// crate must do with an error, not a panic).
    pub fn build(&self, map: impl Fn(&str, f64) -> f64) -> Option<AnyConfig> {
        let classes = AnyConfig::TORCH_CLASSES;
        let class = classes[self.class as usize % classes.len()];
        let mut cfg = AnyConfig::default_for(class).ok()?;
        let (mut ni, mut fi) = (0, 0);
        for (name, value) in cfg.options() {
            let v = match value {
                HyperValue::Number(_) => {
                    ni += 1;
                    HyperValue::Number(map(name, self.numbers[(ni - 1) % 8]))
                }
                HyperValue::Pair(_, _) => {
                    ni += 2;
                    HyperValue::Pair(map(name, self.numbers[(ni - 2) % 8]), map(name, self.numbers[(ni - 1) % 8]))
                }
                HyperValue::Bool(_) => {
                    fi += 1;
                    HyperValue::Bool(self.flags[(fi - 1) % 6])
                }
                // A kind of value this target does not know yet: leave the default.
                other => other,
            };
            cfg.set_option(name, &v).ok()?;
        }
        cfg.validate().ok()?;
        Some(cfg)
    }
}

/// Same bits, every NaN equal to every NaN.
pub fn same(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

/// Folds any f64 into [lo, hi] (NaN to lo).
pub fn fold(x: f64, lo: f64, hi: f64) -> f64 {
    if !x.is_finite() {
        return lo;
    }
    lo + (x.abs() % 1.0) * (hi - lo)
}

/// Hyperparameters folded into the training domain (lr up to 1, betas
/// below 1, eps from 1e-8 to 1).
pub fn domain(name: &str, x: f64) -> f64 {
    match name {
        "lr" => fold(x, 0.0, 1.0),
        "weight_decay" => fold(x, 0.0, 0.1),
        "momentum" | "alpha" | "rho" | "betas" => fold(x, 0.0, 0.999),
        "eps" => 10f64.powf(fold(x, -8.0, 0.0)),
        "initial_accumulator_value" => fold(x, 0.0, 10.0),
        _ => fold(x, 0.0, 1.0),
    }
}
