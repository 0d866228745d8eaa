//! Adafactor steps on one matrix beside the roofline pass over the same
//! parameters and gradients (12 bytes per parameter: read both, write the
//! parameters), alternated over rounds, medians:
//! `cargo run --release --example adafactor_speed -- 1024 1024 [rounds]`.
//!
//! torch's Adafactor needs two whole-tensor reductions before the update
//! (the parameters' RMS, the update's RMS), so no implementation of it does
//! one pass: adaoptim makes three (24 bytes per parameter), and the ratio to
//! the 3-pass bound (half the roofline) is printed too.
use std::time::Instant;

use adaoptim::{Adafactor, AdafactorConfig, Exec, roofline};

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|x| x.parse().expect("integers")).collect();
    let (r, c) = (a[0], a[1]);
    let rounds = a.get(2).copied().unwrap_or(7);
    let n = r * c;
    let mut p: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let g: Vec<f32> = (0..n).map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5).collect();
    let mut o = Adafactor::new(AdafactorConfig { weight_decay: 0.01, ..Default::default() }, &[r, c]).unwrap();
    o.step(&mut p, &g).unwrap();
    let calls = (2e8 / n as f64).ceil() as usize;
    let time = |f: &mut dyn FnMut()| {
        let s = Instant::now();
        for _ in 0..calls {
            f();
        }
        s.elapsed().as_secs_f64() / calls as f64
    };
    let (mut ts, mut tr) = (Vec::new(), Vec::new());
    let mut q = p.clone();
    for _ in 0..rounds {
        ts.push(time(&mut || o.step(&mut p, &g).unwrap()));
        tr.push(time(&mut || {
            roofline::step(&mut q, &g, &mut [], &Exec::auto()).unwrap();
        }));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, rf) = (med(&mut ts), med(&mut tr));
    println!(
        "adafactor {r}x{c} threads={}: {:.3} ms/step, {:.3} Gparam/s; roofline (12 B/param) {:.3} Gparam/s: {:.2}x of it, {:.2}x of the 3-pass bound",
        rayon::current_num_threads(),
        s * 1e3,
        n as f64 / s / 1e9,
        n as f64 / rf / 1e9,
        rf / s,
        2.0 * rf / s
    );
}
