//! Throughput report: parameters updated per second for each optimizer, size
//! and thread count, beside the roofline kernel (same arrays, trivial
//! arithmetic) measured in the same run.
//!
//! ```sh
//! cargo run --release --example throughput
//! cargo run --release --example throughput -- --optimizers adam,adagrad --sizes 65536,1048576 --threads 1,2 --json
//! ```
//! Options: `--optimizers` (torch class names, case-insensitive, or `all`),
//! `--sizes`, `--threads`, `--backend` (force one), `--json` (one object a line),
//! `--guards` (also time each step with `NonFinitePolicy::SkipStep` (alone and
//! with a loss scale of 65536, as mixed-precision training runs it), gradient
//! clipping to norm 1 (alone and with SkipStep), with a
//! power-of-two `grad_scale` and with a non-power-of-two one, and print their
//! cost relative to the plain step measured in the same run).

use std::time::Instant;

use adaoptim::{AnyConfig, Backend, Exec, NonFinitePolicy, Parallel, roofline};
use aligned_vec::{AVec, ConstAlign};

struct Args {
    optimizers: Vec<String>,
    sizes: Vec<usize>,
    threads: Vec<usize>,
    backend: Option<Backend>,
    json: bool,
    guards: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        optimizers: AnyConfig::TORCH_CLASSES.iter().map(|s| s.to_string()).collect(),
        sizes: vec![4096, 65536, 1 << 20, 1 << 24, 1 << 26],
        threads: vec![1, 2],
        backend: None,
        json: false,
        guards: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--optimizers" => {
                let v = value();
                if v != "all" {
                    a.optimizers = v.split(',').map(|s| s.trim().to_string()).collect();
                }
            }
            "--sizes" => a.sizes = value().split(',').map(|s| parse_size(s.trim())).collect(),
            "--threads" => a.threads = value().split(',').map(|s| s.trim().parse().expect("thread count")).collect(),
            "--backend" => a.backend = Some(Backend::from_name(&value()).expect("backend name")),
            "--json" => a.json = true,
            "--guards" => a.guards = true,
            "--bench" => {} // passed by `cargo bench`-style runners
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn parse_size(s: &str) -> usize {
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<usize>().expect("size") * mul
}

fn class_of(name: &str) -> &'static str {
    AnyConfig::TORCH_CLASSES
        .iter()
        .find(|c| c.eq_ignore_ascii_case(name))
        .unwrap_or_else(|| panic!("unknown optimizer {name}; known: {:?}", AnyConfig::TORCH_CLASSES))
}

/// Median seconds per call of `f`, after a warm-up, over enough calls for
/// about 0.3 s of work.
fn time_per_call(n: usize, mut f: impl FnMut()) -> f64 {
    f();
    let calls = (3e8 / n as f64).ceil().clamp(1.0, 20000.0) as usize;
    let reps = if n >= 1 << 24 { 3 } else { 7 };
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls {
                f();
            }
            t.elapsed().as_secs_f64() / calls as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

fn main() {
    let args = parse_args();
    let exec = Exec { backend: args.backend, parallel: Parallel::Auto };
    if !args.json {
        println!(
            "{:<9} {:>10} {:>3} {:>8} {:>9} {:>8} {:>11} {:>7}",
            "optimizer", "n", "thr", "backend", "Gparam/s", "GB/s", "roofline", "ratio"
        );
    }
    for &threads in &args.threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
        pool.install(|| {
            for &n in &args.sizes {
                // 64-byte aligned, as torch's tensors are (misaligned buffers
                // cost about 7% single-threaded at 64M: every zmm load splits).
                let mut p: AVec<f32, ConstAlign<64>> = AVec::from_iter(64, std::iter::repeat_n(0.5f32, n));
                let g: AVec<f32, ConstAlign<64>> =
                    AVec::from_iter(64, (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3));
                for name in &args.optimizers {
                    let cfg = AnyConfig::default_for(class_of(name)).expect("known class");
                    let mut opt = cfg.build(n).expect("valid config");
                    opt.set_exec(exec);
                    let nstate = opt.state_names().len();
                    let mut backend = Backend::Scalar;
                    let dt = time_per_call(n, || backend = opt.step(&mut p, &g).expect("step").backend);
                    if args.guards {
                        type Variant = (&'static str, NonFinitePolicy, Option<f32>, Option<f64>);
                        let variants: [Variant; 6] = [
                            ("skip-step", NonFinitePolicy::SkipStep, None, None),
                            // What torch's GradScaler asks of a fused optimizer.
                            ("skip-step+grad-scale-65536", NonFinitePolicy::SkipStep, Some(65536.0), None),
                            ("grad-scale-65536", NonFinitePolicy::Propagate, Some(65536.0), None),
                            ("grad-scale-3", NonFinitePolicy::Propagate, Some(3.0), None),
                            ("clip-norm-1", NonFinitePolicy::Propagate, None, Some(1.0)),
                            ("clip-norm-1+skip-step", NonFinitePolicy::SkipStep, None, Some(1.0)),
                        ];
                        for (label, policy, scale, max_norm) in variants {
                            // Alternate plain and guarded steps and take the
                            // median of the per-pair ratios: bandwidth drift
                            // on a shared machine cancels out.
                            let pairs = if n >= 1 << 24 { 15 } else { 101 };
                            let calls = (3e7 / n as f64).ceil() as usize;
                            let mut ratios = Vec::with_capacity(pairs);
                            let (mut tv, mut t0) = (0.0, 0.0);
                            // Seconds per step with the given guards.
                            let mut timed = |policy, scale, max_norm| {
                                opt.set_non_finite(policy);
                                opt.set_grad_scale(scale).expect("valid scale");
                                opt.set_max_grad_norm(max_norm).expect("valid norm");
                                let s = Instant::now();
                                for _ in 0..calls {
                                    opt.step(&mut p, &g).expect("step");
                                }
                                s.elapsed().as_secs_f64() / calls as f64
                            };
                            for _ in 0..pairs {
                                let a = timed(policy, scale, max_norm);
                                let b = timed(NonFinitePolicy::Propagate, None, None);
                                ratios.push(a / b);
                                tv += a;
                                t0 += b;
                            }
                            ratios.sort_by(f64::total_cmp);
                            let cost = ratios[pairs / 2];
                            let (dv, d0) = (tv / pairs as f64, t0 / pairs as f64);
                            let line = format!(
                                "{} n={n} threads={threads} {label}: {:.3} Gparam/s vs plain {:.3}, alternated in the same run: median cost {:+.1}%",
                                cfg.torch_class(),
                                n as f64 / dv / 1e9,
                                n as f64 / d0 / 1e9,
                                (cost - 1.0) * 100.0
                            );
                            if args.json {
                                println!(
                                    "{{\"optimizer\": \"{}\", \"n\": {n}, \"threads\": {threads}, \"variant\": \"{label}\", \"gparams_per_s\": {:.4}, \"plain_gparams_per_s\": {:.4}, \"median_cost\": {:.4}}}",
                                    cfg.torch_class().to_ascii_lowercase(),
                                    n as f64 / dv / 1e9,
                                    n as f64 / d0 / 1e9,
                                    cost - 1.0
                                );
                            } else {
                                println!("  {line}");
                            }
                        }
                    }
                    drop(opt);
                    let mut bufs: Vec<AVec<f32, ConstAlign<64>>> =
                        (0..nstate).map(|_| AVec::from_iter(64, std::iter::repeat_n(0.0f32, n))).collect();
                    let dt_roof = time_per_call(n, || {
                        let mut refs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                        roofline::step(&mut p, &g, &mut refs, &exec).expect("roofline");
                    });
                    let gps = n as f64 / dt / 1e9;
                    let roof = n as f64 / dt_roof / 1e9;
                    let gbs = gps * roofline::bytes_per_param(nstate) as f64;
                    if args.json {
                        println!(
                            "{{\"optimizer\": \"{}\", \"n\": {n}, \"threads\": {threads}, \"backend\": \"{backend}\", \"gparams_per_s\": {gps:.4}, \"gbytes_per_s\": {gbs:.3}, \"roofline_gparams_per_s\": {roof:.4}, \"ratio_to_roofline\": {:.4}, \"ns_per_step\": {:.1}}}",
                            cfg.torch_class().to_ascii_lowercase(),
                            gps / roof,
                            dt * 1e9
                        );
                    } else {
                        println!(
                            "{:<9} {:>10} {:>3} {:>8} {:>9.3} {:>8.2} {:>11.3} {:>7.3}",
                            cfg.torch_class(),
                            n,
                            threads,
                            backend.name(),
                            gps,
                            gbs,
                            roof,
                            gps / roof
                        );
                    }
                }
            }
        });
    }
}
