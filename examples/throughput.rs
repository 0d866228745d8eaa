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
//! cost relative to the plain step measured in the same run),
//! `--precision P,...` (storage combinations, see below; each row then
//! carries `precision`, `bytes_per_param` and the roofline of those bytes,
//! and the precisions are timed in alternated rounds, `--rounds R`, medians
//! reported).
//!
//! Precisions (AdamW's names from the mixed-precision issue):
//! `f32` (everything f32), `bf16-grads` (bf16 grads in, f32 master params
//! and states, bf16 param copy out), `bf16-f32states` (bf16 params and
//! grads, f32 states), `bf16` (bf16 params, grads and states), `q8` (f32
//! params and grads, 8-bit block-wise states), `bf16-q8` (bf16 params and
//! grads, 8-bit states), `f16-grads` (f16 grads in, f32 master params and
//! states, f16 param copy out), `f16-f32states` (f16 params and grads, f32
//! states). A precision with bf16 params takes the suffix
//! `-sr` for stochastic rounding of the params (`bf16-sr`,
//! `bf16-f32states-sr`, `bf16-q8-sr`).

use std::time::Instant;

use adaoptim::storage::{Dtype, Grads, ParamCopy, Params, Q8State, QMap, StateBuf, bf16, f16};
use adaoptim::{AnyConfig, Backend, Exec, NonFinitePolicy, Parallel, roofline};
use aligned_vec::{AVec, ConstAlign};

struct Args {
    optimizers: Vec<String>,
    sizes: Vec<usize>,
    threads: Vec<usize>,
    backend: Option<Backend>,
    json: bool,
    guards: bool,
    precision: Vec<String>,
    rounds: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        optimizers: AnyConfig::TORCH_CLASSES.iter().map(|s| s.to_string()).collect(),
        sizes: vec![4096, 65536, 1 << 20, 1 << 24, 1 << 26],
        threads: vec![1, 2],
        backend: None,
        json: false,
        guards: false,
        precision: Vec::new(),
        rounds: 5,
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
            "--precision" => a.precision = value().split(',').map(|s| s.trim().to_string()).collect(),
            "--rounds" => a.rounds = value().parse().expect("round count"),
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
    if !args.precision.is_empty() {
        return precisions(&args, exec);
    }
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

type Buf<T> = AVec<T, ConstAlign<64>>;

fn filled<T: Copy>(n: usize, x: T) -> Buf<T> {
    AVec::from_iter(64, std::iter::repeat_n(x, n))
}

/// The buffers of one precision.
struct Setup {
    name: String,
    p32: Buf<f32>,
    p16: Buf<bf16>,
    ph: Buf<f16>,
    g32: Buf<f32>,
    g16: Buf<bf16>,
    gh: Buf<f16>,
    s32: Vec<Buf<f32>>,
    s16: Vec<Buf<bf16>>,
    q8: Vec<(Buf<u8>, Buf<f32>, &'static QMap)>,
    copy: Buf<bf16>,
    copyh: Buf<f16>,
    t: u64,
    aux: adaoptim::AuxState,
}

/// (params, grads, state, copy) storage of a precision.
fn layout(name: &str) -> (Dtype, Dtype, Dtype, Option<Dtype>) {
    match name.strip_suffix("-sr").unwrap_or(name) {
        "f32" => (Dtype::F32, Dtype::F32, Dtype::F32, None),
        "bf16-grads" => (Dtype::F32, Dtype::Bf16, Dtype::F32, Some(Dtype::Bf16)),
        "bf16-f32states" => (Dtype::Bf16, Dtype::Bf16, Dtype::F32, None),
        "bf16" => (Dtype::Bf16, Dtype::Bf16, Dtype::Bf16, None),
        "q8" => (Dtype::F32, Dtype::F32, Dtype::Q8, None),
        "bf16-q8" => (Dtype::Bf16, Dtype::Bf16, Dtype::Q8, None),
        "f16-grads" => (Dtype::F32, Dtype::F16, Dtype::F32, Some(Dtype::F16)),
        "f16-f32states" => (Dtype::F16, Dtype::F16, Dtype::F32, None),
        other => panic!(
            "unknown precision {other}; known: f32, bf16-grads, bf16-f32states, bf16, q8, bf16-q8, f16-grads, f16-f32states"
        ),
    }
}

impl Setup {
    fn new(name: &str, n: usize, names: &[&str]) -> Setup {
        let k = names.len();
        let (p, g, s, c) = layout(name);
        let sized = |on: bool| if on { n } else { 0 };
        let grad = |i: usize| ((i % 97) as f32 - 48.0) * 1e-3;
        Setup {
            name: name.to_string(),
            p32: filled(sized(p == Dtype::F32), 0.5),
            p16: filled(sized(p == Dtype::Bf16), bf16::from_f32(0.5)),
            ph: filled(sized(p == Dtype::F16), f16::from_f32(0.5)),
            g32: AVec::from_iter(64, (0..sized(g == Dtype::F32)).map(grad)),
            g16: AVec::from_iter(64, (0..sized(g == Dtype::Bf16)).map(|i| bf16::from_f32(grad(i)))),
            gh: AVec::from_iter(64, (0..sized(g == Dtype::F16)).map(|i| f16::from_f32(grad(i)))),
            s32: (0..k).map(|_| filled(sized(s == Dtype::F32), 0.0)).collect(),
            s16: (0..k).map(|_| filled(sized(s == Dtype::Bf16), bf16::from_f32(0.0))).collect(),
            q8: names
                .iter()
                .map(|name| {
                    let m = sized(s == Dtype::Q8);
                    (filled(m, 0u8), filled(m.div_ceil(256), 0f32), QMap::for_state(name))
                })
                .collect(),
            copy: filled(sized(c == Some(Dtype::Bf16)), bf16::from_f32(0.0)),
            copyh: filled(sized(c == Some(Dtype::F16)), f16::from_f32(0.0)),
            t: 0,
            aux: [0.0; adaoptim::MAX_AUX],
        }
    }

    fn bytes(&self, k: usize) -> usize {
        let (p, g, s, c) = layout(&self.name);
        roofline::bytes_per_param_of(p, g, &vec![s; k], c)
    }

    /// One optimizer step (`roof` false) or one roofline pass (`roof` true).
    fn step(&mut self, cfg: &AnyConfig, exec: &Exec, roof: bool) -> Backend {
        let (p, g, s, _) = layout(&self.name);
        let params = match p {
            Dtype::F32 => Params::F32(&mut self.p32),
            Dtype::F16 => Params::F16(&mut self.ph),
            _ => Params::Bf16(&mut self.p16),
        };
        let grads = match g {
            Dtype::F32 => Grads::F32(&self.g32),
            Dtype::F16 => Grads::F16(&self.gh),
            _ => Grads::Bf16(&self.g16),
        };
        let mut state: Vec<StateBuf<'_>> = match s {
            Dtype::F32 => self.s32.iter_mut().map(|b| StateBuf::F32(b)).collect(),
            Dtype::Bf16 => self.s16.iter_mut().map(|b| StateBuf::Bf16(b)).collect(),
            _ => self.q8.iter_mut().map(|(codes, absmax, map)| StateBuf::Q8(Q8State { codes, absmax, map })).collect(),
        };
        let copy = match (self.copy.is_empty(), self.copyh.is_empty()) {
            (false, _) => Some(ParamCopy::Bf16(&mut self.copy)),
            (_, false) => Some(ParamCopy::F16(&mut self.copyh)),
            _ => None,
        };
        if roof {
            return roofline::step_mixed(params, grads, &mut state, copy, exec).expect("roofline").backend;
        }
        if self.t == 0 {
            self.aux = cfg.aux_init();
        }
        self.t += 1;
        let param_rounding = match self.name.ends_with("-sr") {
            true => adaoptim::storage::ParamRounding::Stochastic { seed: 1, offset: 0 },
            false => adaoptim::storage::ParamRounding::Nearest,
        };
        let options = adaoptim::StepOptions { exec: *exec, param_rounding, ..Default::default() };
        cfg.step_mixed(self.t, &mut self.aux, params, grads, &mut state, copy, &options).expect("step").backend
    }
}

/// Seconds per call of `f` over about 0.2 s of work.
fn seconds_per_call(n: usize, f: &mut dyn FnMut()) -> f64 {
    let calls = (2e8 / n as f64).ceil().clamp(1.0, 20000.0) as usize;
    let t = Instant::now();
    for _ in 0..calls {
        f();
    }
    t.elapsed().as_secs_f64() / calls as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `--precision`: every precision's step and roofline, timed in alternated
/// rounds, medians reported.
fn precisions(args: &Args, exec: Exec) {
    if !args.json {
        println!(
            "{:<9} {:<15} {:>10} {:>3} {:>5} {:>9} {:>11} {:>7}",
            "optimizer", "precision", "n", "thr", "B/par", "Gparam/s", "roofline", "ratio"
        );
    }
    for &threads in &args.threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
        pool.install(|| {
            for &n in &args.sizes {
                for name in &args.optimizers {
                    let cfg = AnyConfig::default_for(class_of(name)).expect("known class");
                    let k = cfg.state_names().len();
                    let mut setups: Vec<Setup> =
                        args.precision.iter().map(|p| Setup::new(p, n, cfg.state_names())).collect();
                    let mut times: Vec<(Vec<f64>, Vec<f64>)> = setups.iter().map(|_| (vec![], vec![])).collect();
                    let mut backend = Backend::Scalar;
                    for s in setups.iter_mut() {
                        s.step(&cfg, &exec, false); // warm-up: touch every page
                        s.step(&cfg, &exec, true);
                    }
                    for _ in 0..args.rounds {
                        for (s, t) in setups.iter_mut().zip(times.iter_mut()) {
                            t.0.push(seconds_per_call(n, &mut || backend = s.step(&cfg, &exec, false)));
                            t.1.push(seconds_per_call(n, &mut || {
                                s.step(&cfg, &exec, true);
                            }));
                        }
                    }
                    for (s, (ts, tr)) in setups.iter().zip(times) {
                        let gps = n as f64 / median(ts) / 1e9;
                        let roof = n as f64 / median(tr) / 1e9;
                        let bytes = s.bytes(k);
                        if args.json {
                            println!(
                                "{{\"optimizer\": \"{}\", \"precision\": \"{}\", \"n\": {n}, \"threads\": {threads}, \"backend\": \"{backend}\", \"bytes_per_param\": {bytes}, \"gparams_per_s\": {gps:.4}, \"roofline_gparams_per_s\": {roof:.4}, \"ratio_to_roofline\": {:.4}, \"rounds\": {}}}",
                                cfg.torch_class().to_ascii_lowercase(),
                                s.name,
                                gps / roof,
                                args.rounds
                            );
                        } else {
                            println!(
                                "{:<9} {:<15} {:>10} {:>3} {:>5} {:>9.3} {:>11.3} {:>7.3}",
                                cfg.torch_class(),
                                s.name,
                                n,
                                threads,
                                bytes,
                                gps,
                                roof,
                                gps / roof
                            );
                        }
                    }
                }
            }
        });
    }
}
