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

/// 16 batches of 1% of the rows, drawn at random, and their gradient values.
fn row_batches(rows: usize, dim: usize) -> (Vec<Vec<usize>>, Vec<f32>) {
    let touched = rows / 100;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % rows as u64) as usize
    };
    let batches = (0..16).map(|_| (0..touched).map(|_| next()).collect()).collect();
    let vals = (0..touched * dim).map(|i| ((i % 11) as f32 - 5.0) * 1e-3).collect();
    (batches, vals)
}

/// `--huge-pages-ab`: SparseAdam on a 1M x 64 table with everything on 4 KiB
/// pages, with its state on huge pages, and with state and table on huge
/// pages, stepped in turn on the same random row batches; median times.
fn huge_pages_ab(threads: usize) {
    let (rows, dim) = (1 << 20, 64);
    let new = || SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap();
    // SAFETY: no other thread exists yet (the rayon pool is built below), so
    // nothing reads the environment concurrently.
    unsafe { std::env::set_var("ADAOPTIM_HUGE_PAGES", "0") };
    let mut small = new();
    // SAFETY: as above.
    unsafe { std::env::remove_var("ADAOPTIM_HUGE_PAGES") };
    let (mut state_huge, mut all_huge) = (new(), new());
    let mut plain_tables = [vec![0.1f32; rows * dim], vec![0.1f32; rows * dim]];
    let mut huge_table = adaoptim::memory::filled(rows * dim, 0.1);
    let (batches, vals) = row_batches(rows, dim);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..320 {
        let b = &batches[i % batches.len()];
        let [t0, t1] = &mut plain_tables;
        let runs: [(&mut SparseAdam, &mut [f32]); 3] =
            [(&mut small, t0), (&mut state_huge, t1), (&mut all_huge, &mut huge_table)];
        for (k, (opt, table)) in runs.into_iter().enumerate() {
            let t = Instant::now();
            pool.install(|| opt.step(table, b, &vals).unwrap());
            if i >= 32 {
                times[k].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let [a, b, c] = times.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    });
    println!(
        "SparseAdam {rows} x {dim}, {} random rows per step, {threads} threads, medians: all on 4 KiB pages {a:.3} ms; \
         state on huge pages {b:.3} ms ({:.2}x); state and table on huge pages {c:.3} ms ({:.2}x)",
        rows / 100,
        a / b,
        a / c
    );
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
            "--huge-pages-ab" => return huge_pages_ab(threads),
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

    // Embedding table: 1M x 64, 1% of rows per step, a fresh random batch of
    // rows each step (16 batches in turn), the table allocated like the
    // optimizer's state (64-byte aligned, huge pages where the OS allows).
    let (rows, dim) = (1 << 20, 64);
    let mut table = adaoptim::memory::filled(rows * dim, 0.1);
    let (batches, vals) = row_batches(rows, dim);
    let touched = batches[0].len();
    let mut sparse = SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap();
    let mut batch = 0;
    let dt_sparse = median_secs(32, || {
        batch = (batch + 1) % batches.len();
        pool.install(|| sparse.step(&mut table, &batches[batch], &vals).map(|_| ()).unwrap())
    });
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
