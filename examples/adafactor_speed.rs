//! Adafactor steps on one matrix beside the roofline pass over the same
//! parameters and gradients (12 bytes per parameter: read both, write the
//! parameters), alternated over rounds, medians:
//! `cargo run --release --example adafactor_speed -- 1024 1024 [rounds]`.
//!
//! torch's Adafactor needs two whole-tensor reductions before the update
//! (the parameters' RMS, the update's RMS), so no implementation of it does
//! one pass: adaoptim makes three. With an update buffer the second pass
//! stores each element's update and the third reads it (28 bytes per
//! parameter); without one (`UpdateBuffer::Recompute`) the third recomputes
//! it (24 bytes, twice the divisions). Both are timed, alternated with the
//! roofline pass, and each is printed with its ratio to its own byte bound
//! (the roofline scaled by 12 over its bytes). The default
//! (`UpdateBuffer::Auto`) stores up to `AUTO_UPDATE_BUFFER` elements.
//! A third variant steps `bf16` parameters and gradients
//! (`step_slices_mixed`: read in place and widened in registers, stepped
//! as `f32`, rounded as written), with the update buffer `Auto` would
//! choose, and is printed against that `f32` variant.
use std::time::Instant;

use adaoptim::adafactor::{
    AUTO_UPDATE_BUFFER, AdafactorState, UpdateBuffer, state_sizes, step_slices, step_slices_mixed,
};
use adaoptim::storage::{Grads, Params, bf16};
use adaoptim::{AdafactorConfig, Exec, StepOptions, roofline};

fn main() {
    // `R C [rounds]`, or any shape as `--shape 256x256x3x3 [rounds]`.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let int = |x: &str| x.parse::<usize>().expect("integers");
    let (shape, rounds): (Vec<usize>, Option<&String>) = if args[0] == "--shape" {
        (args[1].split('x').map(int).collect(), args.get(2))
    } else {
        (vec![int(&args[0]), int(&args[1])], args.get(2))
    };
    let rounds = rounds.map_or(7, |x| int(x));
    let name = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
    let (n, rl, cl, vl) = state_sizes(&shape).unwrap();
    let p: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let g: Vec<f32> = (0..n).map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5).collect();
    let cfg = AdafactorConfig { weight_decay: 0.01, ..Default::default() };
    // Per variant: params, row_var, col_var, variance, step count.
    let fresh = || (p.clone(), vec![0f32; rl], vec![0f32; cl], vec![0f32; vl], 0u64);
    let mut runs = [fresh(), fresh()];
    let mut buffer = vec![0f32; n];
    let mut step = |k: usize, buffer: &mut [f32]| {
        let (p, rv, cv, v, t) = &mut runs[k];
        *t += 1;
        let update = if k == 0 { UpdateBuffer::Given(buffer) } else { UpdateBuffer::Recompute };
        let state = AdafactorState { row_var: rv, col_var: cv, variance: v, update };
        step_slices(&cfg, &shape, *t, p, &g, state, Exec::auto()).unwrap();
    };
    step(0, &mut buffer);
    step(1, &mut buffer);
    // bf16 parameters and gradients, the update buffer as `Auto` chooses.
    let stores = n <= AUTO_UPDATE_BUFFER;
    let (mut hp, hg): (Vec<bf16>, Vec<bf16>) =
        (p.iter().map(|&x| bf16::from_f32(x)).collect(), g.iter().map(|&x| bf16::from_f32(x)).collect());
    let (mut hr, mut hc, mut hv, mut ht) = (vec![0f32; rl], vec![0f32; cl], vec![0f32; vl], 0u64);
    let mut hbuffer = vec![0f32; n];
    let mut half_step = || {
        ht += 1;
        let update = if stores { UpdateBuffer::Given(&mut hbuffer) } else { UpdateBuffer::Recompute };
        let state = AdafactorState { row_var: &mut hr, col_var: &mut hc, variance: &mut hv, update };
        let options = StepOptions::default();
        step_slices_mixed(&cfg, &shape, ht, Params::Bf16(&mut hp), Grads::Bf16(&hg), state, &options).unwrap();
    };
    half_step();
    let calls = (2e8 / n as f64).ceil() as usize;
    let time = |f: &mut dyn FnMut()| {
        let s = Instant::now();
        for _ in 0..calls {
            f();
        }
        s.elapsed().as_secs_f64() / calls as f64
    };
    let (mut ts, mut tu, mut tr, mut th) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut q = p.clone();
    for _ in 0..rounds {
        ts.push(time(&mut || step(0, &mut buffer)));
        tu.push(time(&mut || step(1, &mut buffer)));
        th.push(time(&mut half_step));
        tr.push(time(&mut || {
            roofline::step(&mut q, &g, &mut [], &Exec::auto()).unwrap();
        }));
    }
    // The same steps from the same state: the same bits.
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    let [a, b] = &runs;
    assert!(
        a.4 == b.4 && same(&a.0, &b.0) && same(&a.1, &b.1) && same(&a.3, &b.3),
        "buffered and recomputed steps differ"
    );
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, su, rf) = (med(&mut ts), med(&mut tu), med(&mut tr));
    println!(
        "adafactor {name} threads={}: roofline (12 B/param) {:.3} Gparam/s",
        rayon::current_num_threads(),
        n as f64 / rf / 1e9
    );
    for (what, t, bytes) in [("update buffer", s, 28.0), ("recomputed", su, 24.0)] {
        println!(
            "  {what:>13}: {:.3} ms/step, {:.3} Gparam/s, {:.2}x of its {bytes} B/param bound",
            t * 1e3,
            n as f64 / t / 1e9,
            bytes / 12.0 * rf / t
        );
    }
    println!("  buffer/recomputed speed: {:.2}x", su / s);
    let (h, f32_same) = (med(&mut th), if stores { s } else { su });
    println!(
        "  bf16 params and grads ({}): {:.3} ms/step, {:.3} Gparam/s, {:.2}x the f32 step's time",
        if stores { "update buffer" } else { "recomputed" },
        h * 1e3,
        n as f64 / h / 1e9,
        h / f32_same
    );
}
