//! A fingerprint of the crate's `f32` results, for refactors that must not
//! change a bit: every registered optimizer with torch's defaults, and with
//! `maximize` and `weight_decay` where it takes them, stepped on every
//! backend this machine has, serially and in parallel chunks, plain, with a
//! loss scale (a power of two and not), with clipping and with both; then
//! SparseAdam and sparse Adagrad; then Adafactor on matrices, a batch of
//! matrices and a vector. Prints one FNV-1a hash per case and a total.
//!
//! ```text
//! cargo run --release --example bithash > new.txt   # on each build
//! diff old.txt new.txt                              # empty: the same bits
//! ```
//!
//! Uses only the public API, so the same file builds against older commits.

use adaoptim::sparse::{SparseAdagrad, SparseAdam, SparseAdamConfig};
use adaoptim::*;

fn fnv(h: &mut u64, xs: &[f32]) {
    for x in xs {
        for b in x.to_bits().to_le_bytes() {
            *h ^= u64::from(b);
            *h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Values of every magnitude and sign, some exactly zero.
fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let u = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            if i % 37 == 0 { 0.0 } else { u * 10f32.powi((s % 7) as i32 - 4) }
        })
        .collect()
}

fn main() {
    let n = 3 * 4096 + 45;
    let mut total = 0xcbf2_9ce4_8422_2325u64;
    let execs: Vec<(String, Exec)> = Backend::available()
        .into_iter()
        .flat_map(|b| [(format!("{b}-serial"), Exec::serial(b)), (format!("{b}-par1024"), Exec::parallel(b, 1024))])
        .collect();
    let guards: [(&str, Option<f32>, Option<f64>); 4] = [
        ("plain", None, None),
        ("scale1024", Some(1024.0), None),
        ("scale3-clip", Some(3.0), Some(0.5)),
        ("clip", None, Some(0.01)),
    ];
    for class in AnyConfig::TORCH_CLASSES {
        let mut variants = vec![("default", "{}")];
        for (name, json) in
            [("max", r#"{"maximize": true}"#), ("wd-max", r#"{"weight_decay": 0.01, "maximize": true}"#)]
        {
            if AnyConfig::from_torch_json(class, json).is_ok() {
                variants.push((name, json));
            }
        }
        for (vname, json) in variants {
            let cfg = AnyConfig::from_torch_json(class, json).unwrap();
            for (ename, exec) in &execs {
                for (gname, scale, clip) in guards {
                    let mut opt = cfg.build(n).unwrap();
                    opt.set_exec(*exec);
                    opt.set_grad_scale(scale).unwrap();
                    opt.set_max_grad_norm(clip).unwrap();
                    let mut p = data(n, 1);
                    for step in 0..5 {
                        let g: Vec<f32> = data(n, 10 + step).iter().map(|x| x * scale.unwrap_or(1.0)).collect();
                        opt.step(&mut p, &g).unwrap();
                    }
                    let mut h = 0xcbf2_9ce4_8422_2325u64;
                    fnv(&mut h, &p);
                    for s in opt.state_names() {
                        fnv(&mut h, opt.state(s).unwrap());
                    }
                    println!("{class} {vname} {ename} {gname} {h:016x}");
                    total ^= h;
                    total = total.wrapping_mul(0x100_0000_01b3);
                }
            }
        }
    }
    let (rows, dim) = (300, 24);
    let idx: Vec<usize> = (0..200).map(|i| (i * 7) % rows).collect();
    for (ename, exec) in &execs {
        for maximize in [false, true] {
            let mut table = data(rows * dim, 3);
            let mut opt = SparseAdam::new(SparseAdamConfig { maximize, ..Default::default() }, rows, dim).unwrap();
            opt.set_exec(*exec);
            let mut table2 = table.clone();
            let mut ada = SparseAdagrad::new(AdagradConfig { maximize, ..Default::default() }, rows, dim).unwrap();
            ada.set_exec(*exec);
            for step in 0..5 {
                let vals = data(idx.len() * dim, 20 + step);
                opt.step(&mut table, &idx, &vals).unwrap();
                ada.step(&mut table2, &idx, &vals).unwrap();
            }
            let mut h = 0xcbf2_9ce4_8422_2325u64;
            fnv(&mut h, &table);
            fnv(&mut h, &table2);
            println!("sparse max={maximize} {ename} {h:016x}");
            total ^= h;
            total = total.wrapping_mul(0x100_0000_01b3);
        }
    }
    for shape in [vec![64usize, 64], vec![3, 100, 700], vec![5000], vec![1, 40000]] {
        for (cname, cfg) in [
            ("default", AdafactorConfig::default()),
            ("wd-max", AdafactorConfig { weight_decay: 0.01, maximize: true, ..Default::default() }),
        ] {
            for (ename, exec) in &execs {
                let n: usize = shape.iter().product();
                let mut opt = Adafactor::new(cfg, &shape).unwrap();
                opt.set_exec(*exec);
                let mut p = data(n, 4);
                for step in 0..5 {
                    opt.step(&mut p, &data(n, 30 + step)).unwrap();
                }
                let mut h = 0xcbf2_9ce4_8422_2325u64;
                for s in [&p[..], opt.row_var(), opt.col_var(), opt.variance()] {
                    fnv(&mut h, s);
                }
                println!("adafactor {shape:?} {cname} {ename} {h:016x}");
                total ^= h;
                total = total.wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    // Batches of small matrices (a conv weight's kernels, one-row and
    // one-column matrices, the largest that fit one task), then a few long
    // rows (pieces of a row per task, windows without a stored update),
    // many rows and columns of more than one block, and tall, thin
    // matrices; each with the update stored and recomputed, and `d = 1`
    // (the updates' RMS then reaches the parameters on some steps).
    let shapes: [&[usize]; 12] = [
        &[64, 3, 3],
        &[37, 5, 7],
        &[2, 3, 16, 16],
        &[300, 1, 40],
        &[50, 40, 1],
        &[4, 256, 60],
        &[3, 300, 20],
        &[2, 262_150],
        &[1, 300_001],
        &[300, 16_400],
        &[20_000, 3],
        &[70_001, 1],
    ];
    for shape in shapes {
        let cfg = AdafactorConfig { weight_decay: 0.01, d: 1.0, ..Default::default() };
        for (ename, exec) in &execs {
            for (mode, store) in [("stored", true), ("recomputed", false)] {
                let (n, rl, cl, vl) = adafactor::state_sizes(shape).unwrap();
                let (mut rv, mut cv, mut v, mut u) = (vec![0f32; rl], vec![0f32; cl], vec![0f32; vl], vec![0f32; n]);
                let mut p = data(n, 5);
                for t in 1..=4u64 {
                    let update =
                        if store { adafactor::UpdateBuffer::Given(&mut u) } else { adafactor::UpdateBuffer::Recompute };
                    let state =
                        adafactor::AdafactorState { row_var: &mut rv, col_var: &mut cv, variance: &mut v, update };
                    adafactor::step_slices(&cfg, shape, t, &mut p, &data(n, 40 + t as u32), state, *exec).unwrap();
                }
                let mut h = 0xcbf2_9ce4_8422_2325u64;
                for s in [&p[..], &rv, &cv] {
                    fnv(&mut h, s);
                }
                println!("adafactor {shape:?} {mode} {ename} {h:016x}");
                total ^= h;
                total = total.wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    println!("total {total:016x}");
}
