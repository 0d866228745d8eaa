//! One AdamW step over 25M parameters in 4 Vars, alternated in rounds:
//! the adapter, adaoptim on raw slices, candle's own `candle_nn::AdamW`.
//! Prints each one's median time and the ratios of medians (this is what
//! the README quotes; absolute times on a shared machine drift).
//!
//! With `--bf16` the Vars and their gradients are bf16 (adaoptim keeps
//! the state f32 unless told otherwise; candle's AdamW keeps it bf16, in
//! the Vars' dtype), and the raw-slice step is `MultiOptimizer::step_mixed`
//! over bf16 slices. `--state bf16` or `--state q8` keeps adaoptim's state
//! (adapter and raw slices alike) in bf16 or 8-bit block-wise storage.
//!
//! `cargo run --release -p adaoptim-candle --example speed [-- [--bf16] [--state f32|bf16|q8] [ROUNDS]]`

use std::time::Instant;

use adaoptim::multi::{MixedTensorStep, MultiOptimizer};
use adaoptim::storage::{Dtype as StateDtype, Grads, Params, bf16};
use adaoptim_candle::AdamWConfig;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::Optimizer;

const SHAPES: [&[usize]; 4] = [&[4096, 4096], &[4096, 1024], &[1024, 4096], &[4096]];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let half = args.iter().any(|a| a == "--bf16");
    let state = match args.iter().position(|a| a == "--state").and_then(|i| args.get(i + 1)).map(String::as_str) {
        None | Some("f32") => StateDtype::F32,
        Some("bf16") => StateDtype::Bf16,
        Some("q8") => StateDtype::Q8,
        Some(other) => return Err(candle_core::Error::Msg(format!("--state {other}: f32, bf16 or q8"))),
    };
    let rounds: usize = args.iter().find_map(|s| s.parse().ok()).unwrap_or(7);
    let dtype = if half { DType::BF16 } else { DType::F32 };
    let dev = &Device::Cpu;
    let make = || SHAPES.iter().map(|s| Var::ones(*s, dtype, dev)).collect::<Result<Vec<_>>>();
    let (ours_vars, their_vars) = (make()?, make()?);
    let grads_of = |vs: &[Var]| -> Result<candle_core::backprop::GradStore> {
        let mut loss = Tensor::new(0f32, dev)?;
        for v in vs {
            loss = (loss + (v.as_tensor() * 1e-3)?.sum_all()?.to_dtype(DType::F32)?)?;
        }
        loss.backward()
    };
    let (g_ours, g_theirs) = (grads_of(&ours_vars)?, grads_of(&their_vars)?);
    let config = AdamWConfig { lr: 1e-4, ..Default::default() };
    let mut ours = adaoptim_candle::AdamW::new(ours_vars, config)?;
    ours.set_state_dtype(state)?;
    let mut cn = candle_nn::AdamW::new(their_vars, candle_nn::ParamsAdamW { lr: 1e-4, ..Default::default() })?;
    let sizes: Vec<usize> = SHAPES.iter().map(|s| s.iter().product()).collect();
    let n: usize = sizes.iter().sum();
    let mut raw = MultiOptimizer::new();
    raw.add_group_with_state(config, &sizes, state).map_err(candle_core::Error::wrap)?;
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&k| vec![1.0; k]).collect();
    let grads: Vec<Vec<f32>> = sizes.iter().map(|&k| vec![1e-3; k]).collect();
    let mut params16: Vec<Vec<bf16>> = sizes.iter().map(|&k| vec![bf16::ONE; k]).collect();
    let grads16: Vec<Vec<bf16>> = sizes.iter().map(|&k| vec![bf16::from_f32(1e-3); k]).collect();
    let (mut t_ours, mut t_raw, mut t_cn) = (vec![], vec![], vec![]);
    // One untimed step each first (page faults, candle's allocations).
    for round in 0..=rounds {
        let t = Instant::now();
        ours.step(&g_ours)?;
        let a = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut steps: Vec<MixedTensorStep<'_>> = if half {
            params16
                .iter_mut()
                .zip(&grads16)
                .map(|(p, g)| MixedTensorStep::new(Params::Bf16(p), Some(Grads::Bf16(g))))
                .collect()
        } else {
            params
                .iter_mut()
                .zip(&grads)
                .map(|(p, g)| MixedTensorStep::new(Params::F32(p), Some(Grads::F32(g))))
                .collect()
        };
        raw.step_mixed(&mut steps).map_err(candle_core::Error::wrap)?;
        let b = t.elapsed().as_secs_f64();
        let t = Instant::now();
        cn.step(&g_theirs)?;
        let c = t.elapsed().as_secs_f64();
        if round > 0 {
            t_ours.push(a);
            t_raw.push(b);
            t_cn.push(c);
        }
    }
    let (a, b, c) = (median(&mut t_ours), median(&mut t_raw), median(&mut t_cn));
    let threads = rayon::current_num_threads();
    println!(
        "AdamW step, {n} {dtype:?} parameters in 4 Vars, adaoptim state {state:?}, {threads} threads, median of {rounds} alternated rounds:"
    );
    println!("  adaoptim-candle   {:8.2} ms  {:.3} Gparam/s", a * 1e3, n as f64 / a / 1e9);
    println!("  raw slices        {:8.2} ms  {:.3} Gparam/s", b * 1e3, n as f64 / b / 1e9);
    println!("  candle_nn::AdamW  {:8.2} ms  {:.3} Gparam/s", c * 1e3, n as f64 / c / 1e9);
    println!("  adapter vs candle_nn::AdamW: {:.1}x faster; adapter / raw slices: {:.3}", c / a, a / b);
    Ok(())
}
