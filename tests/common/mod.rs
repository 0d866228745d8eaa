//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod configs;

use adaoptim::{AnyConfig, Backend, Exec};
use serde_json::Value;

/// A small deterministic generator (xorshift64*), so tests need no RNG crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    /// A value of random sign and magnitude 10^[lo_exp, hi_exp).
    pub fn log_uniform(&mut self, lo_exp: f64, hi_exp: f64) -> f32 {
        let m = 10f64.powf(self.range(lo_exp, hi_exp));
        (if self.unit() < 0.5 { -m } else { m }) as f32
    }
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| self.range(-scale, scale) as f32).collect()
    }
}

/// A configuration from a golden file's torch keyword arguments, through
/// the crate's own parser ([`AnyConfig::from_torch_json`]). A `null` option
/// is torch's `None`, which for every option the golden files use means the
/// default, so it is left out first (the crate's parser accepts `null` only
/// for torch's implementation switches).
pub fn config_from_json(class: &str, options: &Value) -> Result<AnyConfig, adaoptim::Error> {
    let mut obj = options.as_object().expect("options is an object").clone();
    obj.retain(|_, v| !v.is_null());
    AnyConfig::from_torch_json(class, &Value::Object(obj).to_string())
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

/// Every execution path this machine can run: each backend serial, and the
/// best backend (and the scalar one) through rayon with a small odd chunk.
pub fn all_paths() -> Vec<(String, Exec)> {
    let mut v: Vec<(String, Exec)> =
        Backend::available().into_iter().map(|b| (b.name().to_string(), Exec::serial(b))).collect();
    v.push(("parallel-scalar".into(), Exec::parallel(Backend::Scalar, 17)));
    v.push((format!("parallel-{}", Backend::best()), Exec::parallel(Backend::best(), 33)));
    v
}

/// Same bits, treating every NaN as equal to every NaN.
pub fn same_bits(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

pub fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(same_bits(*x, *y), "{what}: element {i}: {x:e} ({:#x}) vs {y:e} ({:#x})", x.to_bits(), y.to_bits());
    }
}

/// Stochastic rounding to bf16 as `ParamRounding::Stochastic`'s docs
/// define it, written out here independently of the crate: the key
/// `splitmix64(splitmix64(seed) ^ t)`, per element `i` the bits
/// `fmix32(fmix32(i_lo ^ key_lo) ^ i_hi ^ key_hi) >> 16` added below the
/// bf16's last bit, then truncation; NaN to 0x7FC0.
pub fn round_stochastic(x: &[f32], seed: u64, t: u64, offset: u64) -> Vec<f32> {
    fn splitmix64(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9E3779B97F4A7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn fmix32(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85EBCA6B);
        h ^= h >> 13;
        h = h.wrapping_mul(0xC2B2AE35);
        h ^ (h >> 16)
    }
    let key = splitmix64(splitmix64(seed) ^ t);
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let i = i as u64 + offset;
            let r = fmix32(fmix32((i as u32) ^ (key as u32)) ^ ((i >> 32) as u32) ^ ((key >> 32) as u32)) >> 16;
            let b = if v.is_nan() { 0x7FC0 } else { (v.to_bits() + r) >> 16 };
            f32::from_bits(b << 16)
        })
        .collect()
}
