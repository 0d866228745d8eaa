//! Every path against the scalar reference: lengths around the lane counts,
//! unaligned sub-slices, thread counts, chunk sizes, and non-finite values.

mod common;

use adaoptim::clip::clip_coef;
use adaoptim::{AnyConfig, Backend, Exec, StepOptions};
use approx::assert_relative_eq;
use common::configs::variety;
use common::{Rng, all_paths, assert_same_bits, same_bits};

const LENGTHS: [usize; 10] = [0, 1, 7, 8, 9, 15, 16, 17, 33, 1003];

/// Runs `steps` steps of `cfg` with `exec` on the given inputs; returns the
/// parameters and every state buffer.
fn trajectory(cfg: &AnyConfig, exec: Exec, p0: &[f32], grads: &[Vec<f32>]) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut opt = cfg.build(p0.len()).unwrap();
    opt.set_exec(exec);
    let mut p = p0.to_vec();
    for g in grads {
        opt.step(&mut p, g).unwrap();
    }
    let state = opt.state_names().iter().map(|n| opt.state(n).unwrap().to_vec()).collect();
    (p, state)
}

fn inputs(rng: &mut Rng, n: usize, steps: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    (rng.vec(n, 1.0), (0..steps).map(|_| rng.vec(n, 1.0)).collect())
}

#[test]
fn every_backend_matches_scalar_reference() {
    let mut rng = Rng::new(1);
    for (name, cfg) in variety() {
        for n in LENGTHS {
            let (p0, grads) = inputs(&mut rng, n, 6);
            let (p_ref, s_ref) = trajectory(&cfg, Exec::scalar(), &p0, &grads);
            for (path, exec) in all_paths() {
                let (p, s) = trajectory(&cfg, exec, &p0, &grads);
                for (a, b) in p.iter().zip(&p_ref) {
                    assert_relative_eq!(*a, *b, max_relative = 1e-6, epsilon = 1e-7);
                }
                // The stronger claim of the docs: 0 ULP, same bits.
                assert_same_bits(&format!("{name} n={n} {path} params"), &p, &p_ref);
                for (x, y) in s.iter().zip(&s_ref) {
                    assert_same_bits(&format!("{name} n={n} {path} state"), x, y);
                }
            }
        }
    }
}

#[test]
fn unaligned_subslices_match_scalar() {
    let mut rng = Rng::new(2);
    for (name, cfg) in variety() {
        let total = 1003 + 16;
        for offset in [1usize, 3, 5, 13] {
            let n = 1003 - offset;
            let (p0, grads) = inputs(&mut rng, total, 3);
            let reference = {
                let sub: Vec<Vec<f32>> = grads.iter().map(|g| g[offset..offset + n].to_vec()).collect();
                trajectory(&cfg, Exec::scalar(), &p0[offset..offset + n], &sub).0
            };
            for b in Backend::available() {
                // Step a sub-slice that starts off any SIMD alignment, state
                // allocated by the caller inside bigger (offset) buffers too.
                let mut p = p0.clone();
                let names = cfg.state_names();
                let mut bufs: Vec<Vec<f32>> =
                    names.iter().enumerate().map(|(i, _)| vec![initial(&cfg, i); total]).collect();
                let mut aux = AuxCarrier::new(&cfg);
                for (t, g) in grads.iter().enumerate() {
                    let mut refs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| &mut b[offset..offset + n]).collect();
                    aux.step(
                        &cfg,
                        t as u64 + 1,
                        &mut p[offset..offset + n],
                        &g[offset..offset + n],
                        &mut refs,
                        &Exec::serial(b),
                    );
                }
                assert_same_bits(&format!("{name} offset {offset} {b}"), &p[offset..offset + n], &reference);
                assert_eq!(&p[..offset], &p0[..offset], "{name}: outside the sub-slice untouched");
            }
        }
    }
}

fn initial(cfg: &AnyConfig, i: usize) -> f32 {
    cfg.state_init(i)
}

/// The free kernel's scalar state for any configuration, through the
/// registry's dispatch (`AnyConfig::step_slices_with`): no list of
/// optimizers to keep in step here.
struct AuxCarrier(adaoptim::AuxState);

impl AuxCarrier {
    fn new(cfg: &AnyConfig) -> Self {
        AuxCarrier(cfg.aux_init())
    }
    fn step(&mut self, cfg: &AnyConfig, t: u64, p: &mut [f32], g: &[f32], s: &mut [&mut [f32]], exec: &Exec) {
        self.step_with(cfg, t, p, g, s, &StepOptions { exec: *exec, ..StepOptions::default() });
    }
    fn step_with(&mut self, cfg: &AnyConfig, t: u64, p: &mut [f32], g: &[f32], s: &mut [&mut [f32]], o: &StepOptions) {
        cfg.step_slices_with(t, &mut self.0, p, g, s, o).unwrap();
    }
}

#[test]
fn parallel_is_bitwise_serial_for_any_threads_and_chunks() {
    let mut rng = Rng::new(3);
    let n = 5003;
    for (name, cfg) in variety() {
        let (p0, grads) = inputs(&mut rng, n, 4);
        for b in Backend::available() {
            let (p_ser, s_ser) = trajectory(&cfg, Exec::serial(b), &p0, &grads);
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                for chunk in [1, 17, 63, 100, 1000, 4999, 0] {
                    let (p, s) = pool.install(|| trajectory(&cfg, Exec::parallel(b, chunk), &p0, &grads));
                    let what = format!("{name} {b} threads={threads} chunk={chunk}");
                    assert_same_bits(&what, &p, &p_ser);
                    for (x, y) in s.iter().zip(&s_ser) {
                        assert_same_bits(&what, x, y);
                    }
                }
            }
        }
    }
}

#[test]
fn shard_equals_range_of_unsharded_step() {
    let mut rng = Rng::new(4);
    let n = 1000;
    for (name, cfg) in variety() {
        let (p0, grads) = inputs(&mut rng, n, 3);
        let (whole, _) = trajectory(&cfg, Exec::auto(), &p0, &grads);
        // Three uneven shards, each with its own optimizer over its range.
        let mut sharded = Vec::new();
        for (lo, hi) in [(0, 333), (333, 334), (334, 1000)] {
            let sub: Vec<Vec<f32>> = grads.iter().map(|g| g[lo..hi].to_vec()).collect();
            sharded.extend(trajectory(&cfg, Exec::auto(), &p0[lo..hi], &sub).0);
        }
        assert_same_bits(&format!("{name} sharded"), &sharded, &whole);
    }
}

/// Values that break naive kernels: NaN, infinities, subnormals, huge and tiny.
fn hostile(rng: &mut Rng, n: usize) -> Vec<f32> {
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::MIN_POSITIVE / 4.0,
        -f32::MIN_POSITIVE / 8.0,
        f32::MAX,
        -1e30,
        1e19,
        1e-30,
    ];
    (0..n)
        .map(|_| {
            if rng.unit() < 0.3 {
                specials[(rng.next_u64() % specials.len() as u64) as usize]
            } else {
                rng.log_uniform(-40.0, 38.0)
            }
        })
        .collect()
}

#[test]
fn non_finite_and_extreme_values_agree_on_every_path() {
    let mut rng = Rng::new(5);
    for (name, cfg) in variety() {
        for n in [1usize, 9, 17, 100] {
            let p0 = hostile(&mut rng, n);
            let grads: Vec<Vec<f32>> = (0..4).map(|_| hostile(&mut rng, n)).collect();
            let (p_ref, s_ref) = trajectory(&cfg, Exec::scalar(), &p0, &grads);
            for (path, exec) in all_paths() {
                let (p, s) = trajectory(&cfg, exec, &p0, &grads);
                // NaN where the reference has NaN, same bits elsewhere: checked
                // element by element, separately from any approx comparison.
                for (i, (a, b)) in p.iter().zip(&p_ref).enumerate() {
                    assert_eq!(a.is_nan(), b.is_nan(), "{name} {path} n={n} element {i}: {a} vs {b}");
                    assert!(same_bits(*a, *b), "{name} {path} n={n} element {i}: {a:e} vs {b:e}");
                }
                for (x, y) in s.iter().zip(&s_ref) {
                    assert_same_bits(&format!("{name} {path} state"), x, y);
                }
            }
        }
    }
}

#[test]
fn nan_gradient_poisons_only_its_element() {
    // torch semantics (Propagate): a NaN gradient makes that parameter NaN and
    // leaves the others finite, on every path. The sign-based optimizers step
    // by `torch.sign(x)`, which is 0 for NaN (checked in torch 2.15), so there
    // the NaN element does not move at all, as in torch and lion-pytorch.
    const SIGN_BASED: [&str; 2] = ["Rprop", "Lion"];
    for (name, cfg) in variety() {
        for (path, exec) in all_paths() {
            let n = 37;
            let p0 = vec![0.5f32; n];
            let mut g = vec![0.1f32; n];
            g[20] = f32::NAN;
            let (p, _) = trajectory(&cfg, exec, &p0, &[g]);
            if SIGN_BASED.contains(&cfg.torch_class()) {
                assert_eq!(p[20], 0.5, "{name} {path}: torch.sign(NaN) = 0 leaves the parameter");
            } else {
                assert!(p[20].is_nan(), "{name} {path}: NaN gradient must give NaN parameter");
            }
            assert!(p.iter().enumerate().all(|(i, x)| i == 20 || x.is_finite()), "{name} {path}: others finite");
        }
    }
}

#[test]
fn forced_backend_reports_itself() {
    for b in Backend::available() {
        let mut opt = AnyConfig::default_for("Adam").unwrap().build(100).unwrap();
        opt.set_exec(Exec::serial(b));
        let mut p = vec![0.0; 100];
        let r = opt.step(&mut p, &[1.0; 100]).unwrap();
        assert_eq!(r.backend, b);
        assert!(!r.parallel);
        opt.set_exec(Exec::parallel(b, 16));
        let r = opt.step(&mut p, &[1.0; 100]).unwrap();
        assert_eq!((r.backend, r.parallel), (b, true));
    }
    assert!(Backend::Scalar.is_available() && Backend::Wide.is_available());
    assert_eq!(Backend::from_name("AVX512"), Some(Backend::Avx512));
    assert_eq!(Backend::from_name("sse9"), None);
}

#[test]
fn env_forced_backend_is_the_one_that_runs() {
    // CI runs the suite once per backend with ADAOPTIM_BACKEND set; then the
    // automatic choice must be exactly that backend (like matrixmultiply's
    // MMTEST_FEATURE), so each backend is proven to have run.
    let mut opt = AnyConfig::default_for("Adam").unwrap().build(64).unwrap();
    let mut p = vec![0.0; 64];
    let r = opt.step(&mut p, &[1.0; 64]).unwrap();
    match std::env::var("ADAOPTIM_BACKEND") {
        Ok(v) if !v.is_empty() && v != "auto" => assert_eq!(r.backend.name(), v.to_ascii_lowercase()),
        _ => assert_eq!(r.backend, Backend::best()),
    }
}

/// The free kernel with a loss scale and a clipping factor (`step_slices_with`)
/// gives the bits of an optimizer with that `grad_scale` and clipping whose
/// norm produced the factor, also when run as two shards with the same
/// factor: the transform is the guards' one, in the same place.
#[test]
fn free_kernel_scale_and_clip_equal_the_guarded_optimizer() {
    let mut rng = Rng::new(17);
    let n = 3001;
    for (name, cfg) in variety() {
        for scale in [None, Some(1024.0f32), Some(3.0)] {
            let mut opt = cfg.build(n).unwrap();
            opt.set_grad_scale(scale).unwrap();
            opt.set_max_grad_norm(Some(0.5)).unwrap();
            let mut p_opt = rng.vec(n, 1.0);
            let mut p_free = p_opt.clone();
            let names = opt.state_names();
            let mut state: Vec<Vec<f32>> = (0..names.len()).map(|i| vec![initial(&cfg, i); n]).collect();
            let shards = [0..1000, 1000..n];
            let mut aux = [AuxCarrier::new(&cfg), AuxCarrier::new(&cfg)];
            for t in 1..=4u64 {
                let g: Vec<f32> =
                    rng.vec(n, if t == 3 { 1e-3 } else { 2.0 }).iter().map(|x| x * scale.unwrap_or(1.0)).collect();
                opt.step(&mut p_opt, &g).unwrap();
                let coef = clip_coef(opt.last_grad_norm().unwrap(), 0.5);
                let o = StepOptions { grad_scale: scale, clip_coef: Some(coef), ..StepOptions::default() };
                for (r, a) in shards.iter().zip(aux.iter_mut()) {
                    let mut refs: Vec<&mut [f32]> = state.iter_mut().map(|s| &mut s[r.clone()]).collect();
                    a.step_with(&cfg, t, &mut p_free[r.clone()], &g[r.clone()], &mut refs, &o);
                }
                let what = format!("{name} scale {scale:?} step {t} (coef {coef})");
                assert_same_bits(&what, &p_free, &p_opt);
                for (k, nm) in names.iter().enumerate() {
                    assert_same_bits(&format!("{what} {nm}"), &state[k], opt.state(nm).unwrap());
                }
            }
        }
    }
}
