//! Criterion benches: every optimizer (default torch hyperparameters) at
//! several sizes through every path, beside the roofline kernel (same arrays,
//! trivial arithmetic: the bandwidth ceiling measured in the same run) and a
//! textbook multi-pass version (one full pass over the arrays per line of the
//! formula, the way numpy or torch's foreach path evaluates it).
//!
//! `cargo bench` runs everything (about half an hour); narrow it with
//! criterion's filter, e.g. `cargo bench -- adam/`, and the sizes with
//! `ADAOPTIM_BENCH_SIZES=65536,1048576`. `precision/` benches AdamW over each
//! mixed-precision storage combination beside its roofline. Parallel paths use the global rayon
//! pool (`RAYON_NUM_THREADS` sets its size).

use std::hint::black_box;
use std::time::Duration;

use adaoptim::{Adafactor, AdafactorConfig, AnyConfig, Backend, Exec, NonFinitePolicy, Parallel, roofline};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn sizes() -> Vec<usize> {
    match std::env::var("ADAOPTIM_BENCH_SIZES") {
        Ok(s) if !s.trim().is_empty() => s.split(',').map(|x| x.trim().parse().expect("size")).collect(),
        _ => vec![1 << 12, 1 << 16, 1 << 20, 1 << 24, 1 << 26],
    }
}

/// The execution paths benched for each optimizer.
fn paths() -> Vec<(String, Exec)> {
    let best = Backend::best();
    let mut v = vec![("scalar".to_string(), Exec::scalar()), ("wide".to_string(), Exec::serial(Backend::Wide))];
    if best != Backend::Wide {
        v.push((format!("{best}-1t"), Exec::serial(best)));
    }
    v.push((format!("{best}-parallel"), Exec { backend: Some(best), parallel: Parallel::Auto }));
    v
}

/// Textbook multi-pass evaluation: every line of the formula is one pass over
/// whole arrays (with a temporary), as array libraries evaluate it.
mod textbook {
    pub fn scale(x: &mut [f32], a: f32) {
        x.iter_mut().for_each(|x| *x *= a);
    }
    /// x += a * y
    pub fn axpy(x: &mut [f32], a: f32, y: &[f32]) {
        x.iter_mut().zip(y).for_each(|(x, y)| *x += a * y);
    }
    /// x += a * y * z
    pub fn addcmul(x: &mut [f32], a: f32, y: &[f32], z: &[f32]) {
        x.iter_mut().zip(y.iter().zip(z)).for_each(|(x, (y, z))| *x += a * y * z);
    }
    /// x += a * y / z
    pub fn addcdiv(x: &mut [f32], a: f32, y: &[f32], z: &[f32]) {
        x.iter_mut().zip(y.iter().zip(z)).for_each(|(x, (y, z))| *x += a * y / z);
    }
    /// out = sqrt(x + inner) * mul + outer
    pub fn sqrt_into(out: &mut [f32], x: &[f32], inner: f32, mul: f32, outer: f32) {
        out.iter_mut().zip(x).for_each(|(o, x)| *o = (x + inner).sqrt() * mul + outer);
    }
    pub fn maximum(x: &mut [f32], y: &[f32]) {
        x.iter_mut().zip(y).for_each(|(x, y)| *x = x.max(*y));
    }

    /// Whether a textbook version of `class` is written here (a new
    /// optimizer is benched without one until it is).
    pub fn has(class: &str) -> bool {
        ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "NAdam", "Adamax"].contains(&class)
    }

    /// One step of `class` with torch's default hyperparameters at step 10.
    pub fn step(class: &str, p: &mut [f32], g: &[f32], s: &mut [Vec<f32>], tmp: &mut [f32]) {
        let (b1, b2, t) = (0.9f32, 0.999f32, 10);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        match class {
            "SGD" => axpy(p, -1e-3, g),
            "Adagrad" => {
                addcmul(&mut s[0], 1.0, g, g);
                sqrt_into(tmp, &s[0], 0.0, 1.0, 1e-10);
                addcdiv(p, -1e-2, g, tmp);
            }
            "RMSprop" => {
                scale(&mut s[0], 0.99);
                addcmul(&mut s[0], 0.01, g, g);
                sqrt_into(tmp, &s[0], 0.0, 1.0, 1e-8);
                addcdiv(p, -1e-2, g, tmp);
            }
            "Adadelta" => {
                let (sq, acc) = s.split_at_mut(1);
                scale(&mut sq[0], 0.9);
                addcmul(&mut sq[0], 0.1, g, g);
                sqrt_into(tmp, &sq[0], 1e-6, 1.0, 0.0);
                tmp.iter_mut().zip(acc[0].iter().zip(g)).for_each(|(d, (a, g))| *d = (a + 1e-6).sqrt() / *d * g);
                scale(&mut acc[0], 0.9);
                addcmul(&mut acc[0], 0.1, tmp, tmp);
                axpy(p, -1.0, tmp);
            }
            "Adam" | "AdamW" | "NAdam" => {
                if class == "AdamW" {
                    scale(p, 1.0 - 1e-3 * 1e-2);
                }
                scale(&mut s[0], b1);
                axpy(&mut s[0], 1.0 - b1, g);
                scale(&mut s[1], b2);
                addcmul(&mut s[1], 1.0 - b2, g, g);
                sqrt_into(tmp, &s[1], 0.0, 1.0 / bc2.sqrt(), 1e-8);
                if class == "NAdam" {
                    addcdiv(p, -1e-3, g, tmp);
                }
                addcdiv(p, -1e-3 / bc1, &s[0], tmp);
            }
            "Adamax" => {
                scale(&mut s[0], b1);
                axpy(&mut s[0], 1.0 - b1, g);
                scale(&mut s[1], b2);
                tmp.iter_mut().zip(g).for_each(|(t, g)| *t = g.abs() + 1e-8);
                maximum(&mut s[1], tmp);
                addcdiv(p, -2e-3 / bc1, &s[0], &s[1]);
            }
            _ => {}
        }
    }
}

fn bench_optimizers(c: &mut Criterion) {
    for class in AnyConfig::TORCH_CLASSES {
        let cfg = AnyConfig::default_for(class).unwrap();
        let nstate = cfg.state_names().len();
        let mut group = c.benchmark_group(class.to_ascii_lowercase());
        group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
        for n in sizes() {
            group.throughput(Throughput::Bytes((roofline::bytes_per_param(nstate) * n) as u64));
            let mut p = vec![0.5f32; n];
            let g: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
            for (name, exec) in paths() {
                let mut opt = cfg.build(n).unwrap();
                opt.set_exec(exec);
                group.bench_function(BenchmarkId::new(&name, n), |b| {
                    b.iter(|| opt.step(black_box(&mut p), &g).unwrap())
                });
            }
            let mut bufs = vec![vec![0.0f32; n]; nstate];
            let exec = Exec::auto();
            group.bench_function(BenchmarkId::new("roofline-parallel", n), |b| {
                b.iter(|| {
                    let mut refs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                    roofline::step(black_box(&mut p), &g, &mut refs, &exec).unwrap()
                })
            });
            let exec1 = Exec::serial(Backend::best());
            group.bench_function(BenchmarkId::new("roofline-1t", n), |b| {
                b.iter(|| {
                    let mut refs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                    roofline::step(black_box(&mut p), &g, &mut refs, &exec1).unwrap()
                })
            });
            if textbook::has(class) {
                let mut tmp = vec![0.0f32; n];
                group.bench_function(BenchmarkId::new("textbook-1t", n), |b| {
                    b.iter(|| textbook::step(class, black_box(&mut p), &g, &mut bufs, &mut tmp))
                });
            }
        }
        group.finish();
    }
}

/// The cost of the non-finite guards on Adam (best backend, parallel): the
/// plain step, `SkipStep` (a pre-scan of the gradients), a loss scale divided
/// out inside the fused pass, and both. Filter with `cargo bench -- guards/`.
fn bench_guards(c: &mut Criterion) {
    let cfg = AnyConfig::default_for("Adam").unwrap();
    let mut group = c.benchmark_group("guards");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let exec = Exec { backend: Some(Backend::best()), parallel: Parallel::Auto };
    for n in sizes() {
        group.throughput(Throughput::Bytes((roofline::bytes_per_param(2) * n) as u64));
        let mut p = vec![0.5f32; n];
        let g: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        let variants = [
            ("adam-plain", NonFinitePolicy::Propagate, None),
            ("adam-skipstep", NonFinitePolicy::SkipStep, None),
            ("adam-grad-scale", NonFinitePolicy::Propagate, Some(65536.0)),
            ("adam-skipstep-grad-scale", NonFinitePolicy::SkipStep, Some(65536.0)),
        ];
        for (name, policy, scale) in variants {
            let mut opt = cfg.build(n).unwrap();
            opt.set_exec(exec);
            opt.set_non_finite(policy);
            opt.set_grad_scale(scale).unwrap();
            group.bench_function(BenchmarkId::new(name, n), |b| b.iter(|| opt.step(black_box(&mut p), &g).unwrap()));
        }
    }
    group.finish();
}

/// Row-sparse steps on an embedding table: 2^18 rows of 64, gradients of
/// 16384 rows drawn at random (so about 3% of them are duplicates that are
/// summed first), unsorted as a data loader hands them over, and the same
/// rows sorted and unique. Throughput counts the bytes of the rows touched.
fn bench_sparse(c: &mut Criterion) {
    use adaoptim::sparse::{SparseAdam, SparseAdamConfig};
    let (rows, dim, k) = (1usize << 18, 64usize, 16384usize);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let random: Vec<usize> = (0..k).map(|_| (next() % rows as u64) as usize).collect();
    let mut unique = random.clone();
    unique.sort_unstable();
    unique.dedup();
    let mut group = c.benchmark_group("sparse_adam");
    group.measurement_time(Duration::from_secs(3));
    for (name, idx) in [("random", &random), ("sorted_unique", &unique)] {
        let values = vec![0.01f32; idx.len() * dim];
        let mut table = adaoptim::memory::filled(rows * dim, 0.5);
        let mut opt = SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap();
        group.throughput(Throughput::Bytes((idx.len() * dim * 4 * 4) as u64));
        group.bench_function(BenchmarkId::new(name, k), |b| {
            b.iter(|| opt.step(black_box(&mut table), black_box(idx), black_box(&values)).unwrap())
        });
    }
    // The same random rows over caller-owned state (the free function) in
    // each storage: f32, a bf16 table with f32 and with bf16 state (dim
    // 64), and 8-bit state next to an f32 and a bf16 table, which needs
    // rows of whole blocks (dim 256, 2^16 rows, 4096 gradient rows: the
    // same table size), beside f32 at that shape. Throughput counts the
    // bytes of the rows touched, each buffer once (gradient, table, two
    // states), as above.
    use adaoptim::sparse::sparse_adam_step_mixed;
    use adaoptim::storage::{Params, Q8State, QMap, StateBuf, bf16};
    let config = SparseAdamConfig::default();
    for (name, dim, q8, table16, state16) in [
        ("random_f32_caller_state", dim, false, false, false),
        ("random_bf16_table", dim, false, true, false),
        ("random_bf16_table_bf16_state", dim, false, true, true),
        ("random_dim256_f32", 256, false, false, false),
        ("random_dim256_q8_state", 256, true, false, false),
        ("random_dim256_bf16_table_q8_state", 256, true, true, false),
    ] {
        let rows = rows * 64 / dim;
        let (n, k) = (rows * dim, k * 64 / dim);
        let idx: Vec<usize> = random.iter().take(k).map(|&r| r % rows).collect();
        let values = vec![0.01f32; k * dim];
        // Huge-page advised as the owning optimizer's state and the f32
        // table above (random rows on 4 KiB pages pay a TLB miss each).
        use adaoptim::memory::buffer;
        let (mut t32, mut t16) = (buffer(n, 0.5f32), buffer(n, bf16::from_f32(0.5)));
        let (mut m32, mut v32) = (buffer(n, 0f32), buffer(n, 0f32));
        let (mut m16, mut v16) = (buffer(n, bf16::ZERO), buffer(n, bf16::ZERO));
        let (mut mc, mut vc) = (buffer(n, 0u8), buffer(n, 0u8));
        let (mut ma, mut va) = (buffer(n / 256, 0f32), buffer(n / 256, 0f32));
        let table_bytes = if table16 { 2 } else { 4 };
        let state_bytes = if q8 {
            1
        } else if state16 {
            2
        } else {
            4
        };
        group.throughput(Throughput::Bytes((k * dim * (4 + table_bytes + 2 * state_bytes)) as u64));
        let mut t = 0u64;
        group.bench_function(BenchmarkId::new(name, k), |b| {
            b.iter(|| {
                t += 1;
                let table = if table16 { Params::Bf16(&mut t16) } else { Params::F32(&mut t32) };
                let state = if q8 {
                    [
                        StateBuf::Q8(Q8State { codes: &mut mc, absmax: &mut ma, map: QMap::signed() }),
                        StateBuf::Q8(Q8State { codes: &mut vc, absmax: &mut va, map: QMap::unsigned() }),
                    ]
                } else if state16 {
                    [StateBuf::Bf16(&mut m16), StateBuf::Bf16(&mut v16)]
                } else {
                    [StateBuf::F32(&mut m32), StateBuf::F32(&mut v32)]
                };
                let exec = Exec::auto();
                sparse_adam_step_mixed(&config, t.min(1000), dim, table, state, black_box(&idx), &values, exec).unwrap()
            })
        });
    }
    group.finish();
}

/// AdamW over each mixed-precision storage combination (best backend,
/// parallel), beside the roofline pass over the same storage; throughput in
/// bytes moved. Filter with `cargo bench -- precision/`.
fn bench_precision(c: &mut Criterion) {
    use adaoptim::storage::{Dtype, Grads, ParamCopy, Params, StateBuf, bf16};
    let cfg = AnyConfig::default_for("AdamW").unwrap();
    let mut group = c.benchmark_group("precision");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let exec = Exec { backend: Some(Backend::best()), parallel: Parallel::Auto };
    let options = adaoptim::StepOptions { exec, ..Default::default() };
    // (name, bf16 params, bf16 grads, bf16 states, bf16 copy)
    let combos = [
        ("f32", false, false, false, false),
        ("bf16-grads", false, true, false, true),
        ("bf16-f32states", true, true, false, false),
        ("bf16", true, true, true, false),
    ];
    for n in sizes() {
        for (name, bp, bg, bs, bc) in combos {
            let d = |half: bool| if half { Dtype::Bf16 } else { Dtype::F32 };
            let bytes = roofline::bytes_per_param_of(d(bp), d(bg), &[d(bs); 2], bc.then_some(Dtype::Bf16));
            group.throughput(Throughput::Bytes((bytes * n) as u64));
            let mut p32 = vec![0.5f32; if bp { 0 } else { n }];
            let mut p16 = vec![bf16::from_f32(0.5); if bp { n } else { 0 }];
            let g32: Vec<f32> = (0..if bg { 0 } else { n }).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
            let g16: Vec<bf16> =
                (0..if bg { n } else { 0 }).map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) * 1e-3)).collect();
            let mut s32 = vec![vec![0.0f32; if bs { 0 } else { n }]; 2];
            let mut s16 = vec![vec![bf16::from_f32(0.0); if bs { n } else { 0 }]; 2];
            let mut copy = vec![bf16::from_f32(0.0); if bc { n } else { 0 }];
            for roof in [false, true] {
                let mut t = 0u64;
                let mut aux = cfg.aux_init();
                let label = if roof { format!("roofline-{name}") } else { format!("adamw-{name}") };
                group.bench_function(BenchmarkId::new(label, n), |b| {
                    b.iter(|| {
                        let params = if bp { Params::Bf16(&mut p16) } else { Params::F32(&mut p32) };
                        let grads = if bg { Grads::Bf16(&g16) } else { Grads::F32(&g32) };
                        let mut state: Vec<StateBuf<'_>> = if bs {
                            s16.iter_mut().map(|x| StateBuf::Bf16(x)).collect()
                        } else {
                            s32.iter_mut().map(|x| StateBuf::F32(x)).collect()
                        };
                        let c = if bc { Some(ParamCopy::Bf16(&mut copy)) } else { None };
                        if roof {
                            roofline::step_mixed(params, grads, &mut state, c, &exec).unwrap();
                        } else {
                            t += 1;
                            cfg.step_mixed(t, &mut aux, params, grads, &mut state, c, &options).unwrap();
                        }
                    })
                });
            }
        }
    }
    group.finish();
}

/// Adafactor (shape-aware, outside the registry) on a square-ish matrix
/// (the factored path) and a vector of each size, every path, beside the
/// roofline pass over the same parameters and gradients (12 bytes per
/// parameter; Adafactor needs three passes, 24 bytes, see the README).
/// Filter with `cargo bench -- adafactor/`.
fn bench_adafactor(c: &mut Criterion) {
    let mut group = c.benchmark_group("adafactor");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for n in sizes() {
        let rows = (n as f64).sqrt() as usize;
        let mut p = vec![0.5f32; n];
        let g: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        group.throughput(Throughput::Bytes((roofline::bytes_per_param(0) * n) as u64));
        for (kind, shape) in [("matrix", vec![rows, n / rows]), ("vector", vec![n])] {
            let m: usize = shape.iter().product();
            for (name, exec) in paths() {
                let mut opt =
                    Adafactor::new(AdafactorConfig { weight_decay: 0.01, ..Default::default() }, &shape).unwrap();
                opt.set_exec(exec);
                group.bench_function(BenchmarkId::new(format!("{kind}-{name}"), n), |b| {
                    b.iter(|| opt.step(black_box(&mut p[..m]), &g[..m]).unwrap())
                });
            }
        }
        let exec = Exec::auto();
        group.bench_function(BenchmarkId::new("roofline-parallel", n), |b| {
            b.iter(|| roofline::step(black_box(&mut p), &g, &mut [], &exec).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_optimizers, bench_guards, bench_sparse, bench_precision, bench_adafactor);
criterion_main!(benches);
