//! Stability: finite parameters and gradients (|p| < 1e18, |g| < 1e18) with
//! hyperparameters in the documented training domain give finite parameters
//! and state after every step (up to 64), and state stays in its domain:
//! second moments and accumulators >= 0, AdaMax's exp_inf > 0 after the
//! first step.
//!
//! The check runs while the inputs are in that domain: a step that starts
//! with some |p| >= 1e18 ends the run. This matters: the first run of this
//! target found centered RMSprop with alpha = 0 (its variance estimate is 0,
//! so the update is g / sqrt(eps), 1e4 g) pushing a parameter to 1e22, whose
//! weight decay term then overflowed g^2 to infinity and inf - inf to NaN.
//! That is the method diverging, in exact arithmetic as in torch; what the
//! crate guarantees is finite results for every step taken from in-domain
//! values.
//!
//! The domain (see the README): lr in [0, 1], weight_decay in [0, 0.1],
//! momentum, alpha, rho and betas in [0, 0.999], eps in [1e-8, 1],
//! lr_decay and momentum_decay in [0, 1], dampening in [0, 1],
//! initial_accumulator_value in [0, 10]. Outside it (lr = 1e30, eps = 0
//! with |g| near 1e-30, ...) overflow is the arithmetic's, as in torch.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use common::{RawConfig, domain};
use libfuzzer_sys::{Corpus, fuzz_target};

#[derive(Arbitrary, Debug)]
struct Input {
    config: RawConfig,
    len: u8,
    steps: u8,
    values: Vec<(f32, f32)>,
}

const NON_NEGATIVE: [&str; 5] = ["exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "acc_delta"];

fuzz_target!(|input: Input| -> Corpus {
    let Some(cfg) = input.config.build(domain) else { return Corpus::Reject };
    if input.values.is_empty() {
        return Corpus::Reject;
    }
    let n = 1 + input.len as usize % 64;
    let steps = 1 + input.steps as usize % 64;
    let clamp = |x: f32, lim: f32| if x.is_finite() { x % lim } else { 0.0 };
    let v = |i: usize| input.values[i % input.values.len()];
    let mut p: Vec<f32> = (0..n).map(|i| clamp(v(i).0, 1e6)).collect();
    let mut opt = cfg.build(n).expect("valid config");
    for s in 0..steps {
        if p.iter().any(|x| x.abs() >= 1e18) {
            break;
        }
        let g: Vec<f32> = (0..n).map(|i| clamp(v(i * 3 + s * 5).1, 1e18)).collect();
        opt.step(&mut p, &g).expect("valid step");
        for (i, x) in p.iter().enumerate() {
            assert!(x.is_finite(), "{cfg:?} step {s}: param {i} = {x}");
        }
        for name in opt.state_names() {
            for (i, x) in opt.state(name).unwrap().iter().enumerate() {
                assert!(x.is_finite(), "{cfg:?} step {s}: {name}[{i}] = {x}");
                if NON_NEGATIVE.contains(name) {
                    assert!(*x >= 0.0, "{cfg:?} step {s}: {name}[{i}] = {x} < 0");
                }
                if *name == "exp_inf" {
                    assert!(*x > 0.0, "{cfg:?} step {s}: exp_inf[{i}] = {x} not > 0");
                }
            }
        }
    }
    Corpus::Keep
});
