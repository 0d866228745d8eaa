//! Real-model shapes and embedding tables:
//! - grouped Adam over the 194-tensor transformer-like mix of
//!   `shared/bench/torch_mix.py` (same shapes), as Gparam/s;
//! - a 1M x 64 embedding table with 1% of the rows touched per step: the
//!   row-sparse SparseAdam step against a dense Adam step over the table.
//!
//! `cargo run --release --example mix -- [--widths 64,256] [--threads 2] [--json]`

use std::time::Instant;

use adaoptim::groups::GroupedOptimizer;
use adaoptim::sparse::{SparseAdam, SparseAdamConfig};
use adaoptim::{Adam, AdamConfig};

fn model_shapes(w: usize) -> Vec<usize> {
    let mut shapes = Vec::new();
    for _ in 0..12 {
        shapes.extend([w * w; 4]);
        shapes.extend([4 * w * w, 4 * w * w]);
        shapes.extend([w; 6]);
        shapes.extend([4 * w; 2]);
        shapes.extend([w; 2]);
    }
    shapes.push(8000 * w / 256 * w);
    shapes.push(w);
    shapes
}

fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..7)
        .map(|_| {
            let s = Instant::now();
            for _ in 0..reps {
                f();
            }
            s.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[3]
}

fn main() {
    let mut widths = vec![64, 256];
    let mut threads = 2;
    let mut json = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--widths" => widths = it.next().unwrap().split(',').map(|s| s.parse().unwrap()).collect(),
            "--threads" => threads = it.next().unwrap().parse().unwrap(),
            "--json" => json = true,
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    for w in widths {
        let shapes = model_shapes(w);
        let mut opt = GroupedOptimizer::new();
        // Weight matrices with decay, vectors (biases, norms) without: two groups.
        let (mats, vecs): (Vec<usize>, Vec<usize>) = shapes.iter().partition(|&&n| n > 4 * w);
        opt.add_group(AdamConfig { weight_decay: 0.0, ..Default::default() }, &mats).unwrap();
        opt.add_group(AdamConfig::default(), &vecs).unwrap();
        let n: usize = shapes.iter().sum();
        opt.params_flat_mut().iter_mut().enumerate().for_each(|(i, p)| *p = (i % 13) as f32 * 0.01);
        opt.grads_flat_mut().iter_mut().enumerate().for_each(|(i, g)| *g = ((i % 7) as f32 - 3.0) * 1e-3);
        let reps = (2e8 / n as f64).ceil().max(3.0) as usize;
        let dt = median_secs(reps, || pool.install(|| opt.step().map(|_| ()).unwrap()));
        let gps = n as f64 / dt / 1e9;
        if json {
            println!(
                "{{\"impl\": \"adaoptim-grouped\", \"width\": {w}, \"tensors\": {}, \"params\": {n}, \"threads\": {threads}, \"ms_per_step\": {:.4}, \"gparams_per_s\": {gps:.4}}}",
                shapes.len(),
                dt * 1e3
            );
        } else {
            println!(
                "model mix width {w}: {} tensors, {n} params, {threads} threads: {:.3} ms/step, {gps:.3} Gparam/s",
                shapes.len(),
                dt * 1e3
            );
        }
    }

    // Embedding table: 1M x 64, 1% of rows per step.
    let (rows, dim) = (1 << 20, 64);
    let mut table = vec![0.1f32; rows * dim];
    let touched = rows / 100;
    let idx: Vec<usize> = (0..touched).map(|i| (i * 104_729) % rows).collect();
    let vals: Vec<f32> = (0..touched * dim).map(|i| ((i % 11) as f32 - 5.0) * 1e-3).collect();
    let mut sparse = SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap();
    let dt_sparse = median_secs(20, || pool.install(|| sparse.step(&mut table, &idx, &vals).map(|_| ()).unwrap()));
    let mut dense = Adam::new(AdamConfig::default(), rows * dim).unwrap();
    let g = vec![1e-3f32; rows * dim];
    let dt_dense = median_secs(2, || pool.install(|| dense.step(&mut table, &g).map(|_| ()).unwrap()));
    if json {
        println!(
            "{{\"impl\": \"adaoptim-sparse\", \"rows\": {rows}, \"dim\": {dim}, \"touched_rows\": {touched}, \"threads\": {threads}, \"sparse_ms\": {:.4}, \"dense_ms\": {:.4}, \"speedup\": {:.1}}}",
            dt_sparse * 1e3,
            dt_dense * 1e3,
            dt_dense / dt_sparse
        );
    } else {
        println!(
            "embedding {rows} x {dim}, {touched} rows per step, {threads} threads: SparseAdam {:.3} ms, dense Adam {:.3} ms ({:.0}x less time)",
            dt_sparse * 1e3,
            dt_dense * 1e3,
            dt_dense / dt_sparse
        );
    }
}
