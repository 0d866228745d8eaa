//! Mixed-precision storage: every optimizer, every storage combination,
//! every backend and parallel split, against an independent reference (the
//! `f32` step on the widened buffers, rounded with the `half` crate's own
//! conversions), plus the errors and the one-step accuracy against f64.

mod common;

use adaoptim::storage::{Dtype, Grads, ParamCopy, ParamRounding, Params, StateBuf, bf16, f16};
use adaoptim::*;
use common::{Rng, configs::variety, round_stochastic};

#[derive(Clone, Copy, Debug, PartialEq)]
enum P {
    F32,
    Bf16,
    F16,
}
#[derive(Clone, Copy, Debug, PartialEq)]
enum G {
    F32,
    Bf16,
    F16,
}
#[derive(Clone, Copy, Debug, PartialEq)]
enum C {
    None,
    Bf16,
    F16,
}

/// Every combination the crate accepts.
fn combos() -> Vec<(P, G, Dtype, C)> {
    let mut v = Vec::new();
    for g in [G::F32, G::Bf16, G::F16] {
        for s in [Dtype::F32, Dtype::Bf16] {
            for c in [C::None, C::Bf16, C::F16] {
                v.push((P::F32, g, s, c));
            }
            v.push((P::Bf16, g, s, C::None));
            v.push((P::F16, g, s, C::None));
        }
    }
    v
}

/// Buffers of one run, held as f32 values that are exactly representable in
/// their storage (so the reference and the crate start from the same values).
#[derive(Clone, Debug, PartialEq)]
struct Run {
    p: Vec<f32>,
    s: Vec<Vec<f32>>,
    copy: Vec<f32>,
    aux: AuxState,
}

fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}
fn round_f16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn grads_rounded(g: G, grads: &[f32]) -> Vec<f32> {
    match g {
        G::F32 => grads.to_vec(),
        G::Bf16 => round_bf16(grads),
        G::F16 => round_f16(grads),
    }
}

fn start(cfg: &AnyConfig, combo: (P, G, Dtype, C), n: usize, rng: &mut Rng) -> Run {
    let (p, _, s, _) = combo;
    let params = rng.vec(n, 1.0);
    let params = match p {
        P::F32 => params,
        P::Bf16 => round_bf16(&params),
        P::F16 => round_f16(&params),
    };
    let k = cfg.state_names().len();
    // Nonzero state (as after some steps), non-negative where a formula takes a root.
    let state: Vec<Vec<f32>> = (0..k)
        .map(|_| {
            let v: Vec<f32> = rng.vec(n, 0.1).into_iter().map(f32::abs).collect();
            if s == Dtype::Bf16 { round_bf16(&v) } else { v }
        })
        .collect();
    Run { p: params, s: state, copy: vec![0.0; n], aux: cfg.aux_init() }
}

/// The reference: the f32 free kernel on the widened values, then the
/// `half` crate's round-to-nearest-even into each buffer's storage.
fn reference_step(cfg: &AnyConfig, t: u64, combo: (P, G, Dtype, C), run: &mut Run, grads: &[f32], opt: &StepOptions) {
    let (p, g, s, c) = combo;
    let g32 = grads_rounded(g, grads);
    let mut refs: Vec<&mut [f32]> = run.s.iter_mut().map(|v| v.as_mut_slice()).collect();
    let opts = StepOptions { exec: Exec::serial(Backend::Scalar), param_rounding: ParamRounding::Nearest, ..*opt };
    cfg.step_slices_with(t, &mut run.aux, &mut run.p, &g32, &mut refs, &opts).unwrap();
    if p == P::F16 {
        run.p = round_f16(&run.p);
    }
    if p == P::Bf16 {
        run.p = match opt.param_rounding {
            ParamRounding::Nearest => round_bf16(&run.p),
            ParamRounding::Stochastic { seed, offset } => round_stochastic(&run.p, seed, t, offset),
        };
    }
    if s == Dtype::Bf16 {
        for v in &mut run.s {
            *v = round_bf16(v);
        }
    }
    match c {
        C::None => {}
        C::Bf16 => run.copy = round_bf16(&run.p),
        C::F16 => run.copy = round_f16(&run.p),
    }
}

/// The crate's mixed step, on buffers of the combination's storage types.
fn mixed_step(
    cfg: &AnyConfig,
    t: u64,
    combo: (P, G, Dtype, C),
    run: &mut Run,
    grads: &[f32],
    opt: &StepOptions,
) -> Result<StepReport, Error> {
    let (p, g, s, c) = combo;
    let mut p32 = run.p.clone();
    let mut p16: Vec<bf16> = run.p.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut ph: Vec<f16> = run.p.iter().map(|&v| f16::from_f32(v)).collect();
    let gb: Vec<bf16> = grads.iter().map(|&v| bf16::from_f32(v)).collect();
    let gh: Vec<f16> = grads.iter().map(|&v| f16::from_f32(v)).collect();
    let mut s32 = run.s.clone();
    let mut s16: Vec<Vec<bf16>> = run.s.iter().map(|v| v.iter().map(|&x| bf16::from_f32(x)).collect()).collect();
    let mut cb = vec![bf16::from_f32(0.0); run.p.len()];
    let mut ch = vec![f16::from_f32(0.0); run.p.len()];
    let params = match p {
        P::F32 => Params::F32(&mut p32),
        P::Bf16 => Params::Bf16(&mut p16),
        P::F16 => Params::F16(&mut ph),
    };
    let grads = match g {
        G::F32 => Grads::F32(grads),
        G::Bf16 => Grads::Bf16(&gb),
        G::F16 => Grads::F16(&gh),
    };
    let mut state: Vec<StateBuf<'_>> = match s {
        Dtype::Bf16 => s16.iter_mut().map(|v| StateBuf::Bf16(v)).collect(),
        _ => s32.iter_mut().map(|v| StateBuf::F32(v)).collect(),
    };
    let copy = match c {
        C::None => None,
        C::Bf16 => Some(ParamCopy::Bf16(&mut cb)),
        C::F16 => Some(ParamCopy::F16(&mut ch)),
    };
    let r = cfg.step_mixed(t, &mut run.aux, params, grads, &mut state, copy, opt)?;
    run.p = match p {
        P::F32 => p32,
        P::Bf16 => p16.iter().map(|v| v.to_f32()).collect(),
        P::F16 => ph.iter().map(|v| v.to_f32()).collect(),
    };
    run.s = match s {
        Dtype::Bf16 => s16.iter().map(|v| v.iter().map(|x| x.to_f32()).collect()).collect(),
        _ => s32,
    };
    match c {
        C::None => {}
        C::Bf16 => run.copy = cb.iter().map(|v| v.to_f32()).collect(),
        C::F16 => run.copy = ch.iter().map(|v| v.to_f32()).collect(),
    }
    Ok(r)
}

fn paths() -> Vec<(String, Exec)> {
    let mut v = common::all_paths();
    // chunks that cut tiles (not multiples of 256) and many tiles per chunk
    v.push(("parallel-best-300".into(), Exec::parallel(Backend::best(), 300)));
    v.push(("parallel-wide-1024".into(), Exec::parallel(Backend::Wide, 1024)));
    v
}

/// Runs the steps on every path with `opt`'s rounding and checks every
/// buffer against `want`, bit for bit.
fn every_path_gives(
    cfg: &AnyConfig,
    combo: (P, G, Dtype, C),
    init: &Run,
    grads: &[Vec<f32>],
    want: &Run,
    opt: &StepOptions,
    name: &str,
) {
    for (path, exec) in paths() {
        let mut got = init.clone();
        let opt = StepOptions { exec, ..*opt };
        for (t, g) in grads.iter().enumerate() {
            mixed_step(cfg, t as u64 + 1, combo, &mut got, g, &opt).unwrap();
        }
        let what = format!("{name} {combo:?} {path}");
        assert_eq!(bits(&got.p), bits(&want.p), "{what}: params");
        for (j, (a, b)) in got.s.iter().zip(&want.s).enumerate() {
            assert_eq!(bits(a), bits(b), "{what}: state {j}");
        }
        assert_eq!(bits(&got.copy), bits(&want.copy), "{what}: copy");
        assert_eq!(got.aux.map(f32::to_bits), want.aux.map(f32::to_bits), "{what}: aux");
    }
}

#[test]
fn every_combination_matches_the_f32_step_on_widened_values_on_every_path() {
    let n = 1000; // four tiles minus 24: a partial last tile and a scalar tail
    let steps = 3;
    for (name, cfg) in variety() {
        for combo in combos() {
            let mut rng = Rng::new(7);
            let init = start(&cfg, combo, n, &mut rng);
            let grads: Vec<Vec<f32>> = (0..steps).map(|_| rng.vec(n, 0.3)).collect();
            let opt = StepOptions::default();
            let mut want = init.clone();
            for (t, g) in grads.iter().enumerate() {
                reference_step(&cfg, t as u64 + 1, combo, &mut want, g, &opt);
            }
            every_path_gives(&cfg, combo, &init, &grads, &want, &opt, name);
        }
    }
}

#[test]
fn loss_scale_and_clipping_apply_to_half_gradients_in_the_pass() {
    let n = 700;
    let cfg: AnyConfig = AdamWConfig::default().into();
    for (scale, clip) in [(Some(1024.0f32), None), (Some(3.0), Some(0.5f32)), (None, Some(0.25))] {
        for combo in combos() {
            let mut rng = Rng::new(11);
            let init = start(&cfg, combo, n, &mut rng);
            // gradients as the loss-scaled values a half-precision backward gives
            let g: Vec<f32> = rng.vec(n, 0.3).into_iter().map(|x| x * scale.unwrap_or(1.0)).collect();
            let opt = StepOptions { grad_scale: scale, clip_coef: clip, ..StepOptions::default() };
            let mut want = init.clone();
            reference_step(&cfg, 1, combo, &mut want, &g, &opt);
            for (path, exec) in paths() {
                let mut got = init.clone();
                mixed_step(&cfg, 1, combo, &mut got, &g, &StepOptions { exec, ..opt }).unwrap();
                assert_eq!(bits(&got.p), bits(&want.p), "{combo:?} {scale:?} {clip:?} {path}");
                assert_eq!(bits(&got.copy), bits(&want.copy), "{combo:?} {path}: copy");
            }
        }
    }
}

#[test]
fn all_f32_mixed_step_is_the_f32_step() {
    let n = 513;
    for (name, cfg) in variety() {
        let mut rng = Rng::new(3);
        let combo = (P::F32, G::F32, Dtype::F32, C::None);
        let mut a = start(&cfg, combo, n, &mut rng);
        let mut b = a.clone();
        let g = rng.vec(n, 0.2);
        let opt = StepOptions { exec: Exec::serial(Backend::best()), ..StepOptions::default() };
        mixed_step(&cfg, 1, combo, &mut a, &g, &opt).unwrap();
        let mut refs: Vec<&mut [f32]> = b.s.iter_mut().map(|v| v.as_mut_slice()).collect();
        cfg.step_slices_with(1, &mut b.aux, &mut b.p, &g, &mut refs, &opt).unwrap();
        assert_eq!(bits(&a.p), bits(&b.p), "{name}");
    }
}

#[test]
fn non_finite_half_gradients_propagate_as_in_f32() {
    // inf and NaN in bf16/f16 gradients reach the formula as inf and NaN
    let cfg: AnyConfig = AdamConfig::default().into();
    let mut p = vec![1.0f32; 4];
    let g = [f16::INFINITY, f16::NAN, f16::from_f32(1.0), f16::from_f32(65504.0)];
    let mut m = vec![0.0f32; 4];
    let mut v = vec![0.0f32; 4];
    let mut aux = cfg.aux_init();
    let mut state = [StateBuf::F32(&mut m), StateBuf::F32(&mut v)];
    cfg.step_mixed(1, &mut aux, Params::F32(&mut p), Grads::F16(&g), &mut state, None, &StepOptions::default())
        .unwrap();
    assert!(p[0].is_nan() && p[1].is_nan(), "{p:?}");
    assert!(p[2].is_finite() && p[3].is_finite(), "{p:?}");
}

#[test]
fn half_storage_holds_one_nan_on_every_path() {
    // Overflowing and non-finite values make NaNs, and the sign of a NaN an
    // operation makes differs between code paths (x86's default NaN is
    // negative; operand order and `fmaf` decide which NaN propagates). Half
    // storage keeps one NaN (f16 0x7E00, bf16 0x7FC0), so every path stores
    // the same bits; f32 buffers may hold any NaN.
    let edge = [
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        3e38,
        -3e38,
        65504.0,
        -65504.0,
        7.4e28,
        -3.9e10,
        1e-30,
        0.5,
        -2.0,
    ];
    let n = 67;
    let val = |i: usize| edge[i % edge.len()];
    for (name, cfg) in variety() {
        for combo in [
            (P::F16, G::F32, Dtype::F32, C::None),
            (P::F16, G::F16, Dtype::Bf16, C::None),
            (P::Bf16, G::F32, Dtype::F32, C::None),
            (P::F32, G::F32, Dtype::F32, C::F16),
            (P::F32, G::Bf16, Dtype::F32, C::Bf16),
        ] {
            let mut init = start(&cfg, combo, n, &mut Rng::new(5));
            let p: Vec<f32> = (0..n).map(|i| val(i * 5)).collect();
            init.p = match combo.0 {
                P::F32 => p,
                P::Bf16 => round_bf16(&p),
                P::F16 => round_f16(&p),
            };
            let grads: Vec<Vec<f32>> = (0..3).map(|t| (0..n).map(|i| val(i * 3 + t + 1)).collect()).collect();
            let run = |exec: Exec| {
                let mut r = init.clone();
                let opt = StepOptions { exec, ..StepOptions::default() };
                for (t, g) in grads.iter().enumerate() {
                    mixed_step(&cfg, t as u64 + 1, combo, &mut r, g, &opt).unwrap();
                }
                r
            };
            let want = run(Exec::scalar());
            assert!(want.p.iter().any(|x| x.is_nan()), "{name} {combo:?}: no NaN made");
            for (path, exec) in paths() {
                let got = run(exec);
                let what = format!("{name} {combo:?} {path}");
                if combo.0 == P::F32 {
                    common::assert_same_bits(&format!("{what}: params"), &got.p, &want.p);
                } else {
                    assert_eq!(bits(&got.p), bits(&want.p), "{what}: params");
                }
                assert_eq!(bits(&got.copy), bits(&want.copy), "{what}: copy");
                for (j, (a, b)) in got.s.iter().zip(&want.s).enumerate() {
                    if combo.2 == Dtype::F32 {
                        common::assert_same_bits(&format!("{what}: state {j}"), a, b);
                    } else {
                        assert_eq!(bits(a), bits(b), "{what}: state {j}");
                    }
                }
            }
        }
    }
}

#[test]
fn bad_storage_and_lengths_are_typed_errors_and_change_nothing() {
    let cfg: AnyConfig = AdamConfig::default().into();
    let n = 300;
    let mut p = vec![bf16::from_f32(0.5); n];
    let g = vec![bf16::from_f32(0.1); n];
    let mut m = vec![0.25f32; n];
    let mut v = vec![0.5f32; n];
    let mut copy = vec![bf16::from_f32(9.0); n];
    let mut aux = cfg.aux_init();
    let opt = StepOptions::default();
    {
        let mut state = [StateBuf::F32(&mut m), StateBuf::F32(&mut v)];
        let e = cfg
            .step_mixed(
                1,
                &mut aux,
                Params::Bf16(&mut p),
                Grads::Bf16(&g),
                &mut state,
                Some(ParamCopy::Bf16(&mut copy)),
                &opt,
            )
            .unwrap_err();
        assert!(matches!(e, Error::Storage { what: "params", dtype: Dtype::Bf16, .. }), "{e:?}");
        assert!(e.to_string().contains("BF16"), "{e}");
    }
    let mut p32 = vec![0.5f32; n];
    {
        let mut short = vec![bf16::from_f32(9.0); n - 1];
        let mut state = [StateBuf::F32(&mut m), StateBuf::F32(&mut v)];
        let e = cfg
            .step_mixed(
                1,
                &mut aux,
                Params::F32(&mut p32),
                Grads::Bf16(&g),
                &mut state,
                Some(ParamCopy::Bf16(&mut short)),
                &opt,
            )
            .unwrap_err();
        assert_eq!(e, Error::LengthMismatch { what: "param_copy", expected: n, actual: n - 1 });
        assert!(short.iter().all(|x| x.to_f32() == 9.0));
    }
    {
        let mut v16 = vec![bf16::from_f32(0.5); n + 1];
        let mut state = [StateBuf::F32(&mut m), StateBuf::Bf16(&mut v16)];
        let e =
            cfg.step_mixed(1, &mut aux, Params::F32(&mut p32), Grads::Bf16(&g), &mut state, None, &opt).unwrap_err();
        assert_eq!(e, Error::LengthMismatch { what: "exp_avg_sq", expected: n, actual: n + 1 });
    }
    {
        let mut state = [StateBuf::F32(&mut m)];
        let e = cfg
            .step_mixed(1, &mut aux, Params::F32(&mut p32), Grads::Bf16(&g[..n]), &mut state, None, &opt)
            .unwrap_err();
        assert_eq!(e, Error::StateCount { expected: 2, actual: 1 });
    }
    assert!(p.iter().all(|x| x.to_f32() == 0.5));
    assert!(p32.iter().all(|&x| x == 0.5));
    assert!(m.iter().all(|&x| x == 0.25) && v.iter().all(|&x| x == 0.5));
    assert!(copy.iter().all(|x| x.to_f32() == 9.0));
}

/// One AdamW step of each storage combination against the same math in f64
/// on the values the buffers hold. Bound (documented in the README): every
/// output within one unit in the last place of its storage type (the final
/// rounding), plus 1e-6 of the magnitude of the terms it sums (the f32
/// arithmetic before it).
#[test]
#[allow(clippy::needless_range_loop)]
fn one_step_is_within_one_storage_ulp_of_f64() {
    let n = 4096;
    let (lr, b1, b2, eps, wd) = (1e-3f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
    let cfg: AnyConfig = AdamWConfig { lr, betas: (b1, b2), eps, weight_decay: wd, ..Default::default() }.into();
    let t = 10u64;
    for combo in combos() {
        let mut rng = Rng::new(5);
        let mut run = start(&cfg, combo, n, &mut rng);
        let g = rng.vec(n, 0.3);
        let g_held = grads_rounded(combo.1, &g);
        let before = run.clone();
        mixed_step(&cfg, t, combo, &mut run, &g, &StepOptions::default()).unwrap();
        let ulp =
            |dtype_bits: i32, x: f64| 2f64.powi(x.abs().max(f64::MIN_POSITIVE).log2().floor() as i32 - dtype_bits);
        let p_bits = match combo.0 {
            P::F32 => 23,
            P::Bf16 => 7,
            P::F16 => 10,
        };
        let s_bits = if combo.2 == Dtype::Bf16 { 7 } else { 23 };
        for i in 0..n {
            let (p0, m0, v0, gi) =
                (f64::from(before.p[i]), f64::from(before.s[0][i]), f64::from(before.s[1][i]), f64::from(g_held[i]));
            let p1 = p0 * (1.0 - lr * wd);
            let m = b1 * m0 + (1.0 - b1) * gi;
            let v = b2 * v0 + (1.0 - b2) * gi * gi;
            let bc1 = 1.0 - b1.powi(t as i32);
            let bc2 = 1.0 - b2.powi(t as i32);
            let update = lr / bc1 * m / (v.sqrt() / bc2.sqrt() + eps);
            let p = p1 - update;
            // the magnitude the f32 arithmetic works at (sums may cancel)
            let (scale_p, scale_m) = (p1.abs() + update.abs(), (b1 * m0).abs() + ((1.0 - b1) * gi).abs());
            for (what, got, want, bits, scale) in [
                ("param", run.p[i], p, p_bits, scale_p),
                ("exp_avg", run.s[0][i], m, s_bits, scale_m),
                ("exp_avg_sq", run.s[1][i], v, s_bits, v),
            ] {
                let err = (f64::from(got) - want).abs();
                let bound = ulp(bits, want) + 1e-6 * scale;
                assert!(err <= bound, "{combo:?} {what}[{i}]: {got:e} vs {want:e}, error {err:e} > {bound:e}");
            }
        }
    }
}

/// The clipping norm of half-precision gradients: the sum of squares of the
/// bf16/f16 values is, bit for bit, the f32 sum of squares of their
/// widened values (which `clip` tests against a plain f64 sum), on every
/// backend and split, across several 16K-element leaves; and it is
/// non-finite exactly when a gradient is.
#[test]
fn half_gradient_sum_of_squares_is_the_widened_f32_one() {
    let mut rng = Rng::new(41);
    let n = 3 * (1 << 14) + 1234;
    let x: Vec<f32> = rng.vec(n, 3.0);
    let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let wb: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
    let wh: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
    // an independent value: a plain f64 sum of the widened squares
    let plain: f64 = wb.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    for (path, exec) in paths() {
        let sb = clip::sum_of_squares_mixed(Grads::Bf16(&b), &exec).unwrap();
        let sh = clip::sum_of_squares_mixed(Grads::F16(&h), &exec).unwrap();
        let sf = clip::sum_of_squares_mixed(Grads::F32(&x), &exec).unwrap();
        assert_eq!(sb.to_bits(), clip::sum_of_squares(&wb, &exec).unwrap().to_bits(), "bf16 {path}");
        assert_eq!(sh.to_bits(), clip::sum_of_squares(&wh, &exec).unwrap().to_bits(), "f16 {path}");
        assert_eq!(sf.to_bits(), clip::sum_of_squares(&x, &exec).unwrap().to_bits(), "f32 {path}");
        assert!((sb - plain).abs() <= 1e-12 * plain, "{sb} vs {plain}");
    }
    for bad in [f32::INFINITY, f32::NAN, f32::NEG_INFINITY] {
        for at in [0, n / 2, n - 1] {
            let mut b2 = b.clone();
            b2[at] = bf16::from_f32(bad);
            let mut h2 = h.clone();
            h2[at] = f16::from_f32(bad);
            for (path, exec) in paths() {
                assert!(
                    !clip::sum_of_squares_mixed(Grads::Bf16(&b2), &exec).unwrap().is_finite(),
                    "{bad} at {at}, {path}"
                );
                assert!(
                    !clip::sum_of_squares_mixed(Grads::F16(&h2), &exec).unwrap().is_finite(),
                    "{bad} at {at}, {path}"
                );
            }
        }
    }
    // the largest f16 squared, summed in f64: exact here
    let big = vec![f16::MAX; 1000];
    let s = clip::sum_of_squares_mixed(Grads::F16(&big), &Exec::auto()).unwrap();
    assert_eq!(s, 1000.0 * 65504.0f64 * 65504.0);
}

#[test]
fn stochastic_rounding_follows_the_documented_stream_on_every_path() {
    let n = 1000;
    let steps = 3;
    for (name, cfg) in variety() {
        for combo in combos().into_iter().filter(|c| c.0 == P::Bf16) {
            let mut rng = Rng::new(11);
            let init = start(&cfg, combo, n, &mut rng);
            let grads: Vec<Vec<f32>> = (0..steps).map(|_| rng.vec(n, 0.3)).collect();
            let rounding = ParamRounding::Stochastic { seed: 0x5eed, offset: 0 };
            let opt = StepOptions { param_rounding: rounding, ..StepOptions::default() };
            let mut want = init.clone();
            let mut nearest = init.clone();
            for (t, g) in grads.iter().enumerate() {
                reference_step(&cfg, t as u64 + 1, combo, &mut want, g, &opt);
                reference_step(&cfg, t as u64 + 1, combo, &mut nearest, g, &StepOptions::default());
            }
            // the option does something: some parameters differ from round to nearest
            assert_ne!(bits(&want.p), bits(&nearest.p), "{name} {combo:?}");
            every_path_gives(&cfg, combo, &init, &grads, &want, &opt, name);
        }
    }
}

/// SGD at a learning rate whose updates are a quarter of the bf16 ulp of
/// the parameters: round to nearest never moves them; stochastic rounding
/// moves them by the f32 run's amount on average.
#[test]
fn stochastic_rounding_accumulates_updates_that_round_to_nearest_loses() {
    let n = 1 << 16;
    let steps = 100u64;
    let cfg: AnyConfig = SgdConfig { lr: 1.0, ..Default::default() }.into();
    // bf16 ulp just below 2 is 2^-7; a step of 2^-9 is a quarter of it
    let g = vec![1.0f32 / 512.0; n];
    let run = |rounding: ParamRounding| {
        let mut p = vec![bf16::from_f32(1.5); n];
        let mut aux = cfg.aux_init();
        for t in 1..=steps {
            let opt = StepOptions { param_rounding: rounding, ..StepOptions::default() };
            cfg.step_mixed(t, &mut aux, Params::Bf16(&mut p), Grads::F32(&g), &mut [], None, &opt).unwrap();
        }
        p.iter().map(|v| f64::from(v.to_f32())).sum::<f64>() / n as f64
    };
    let f32_result = 1.5 - steps as f64 / 512.0; // 1.3046875, exact in f32 at every step
    assert_eq!(run(ParamRounding::Nearest), 1.5, "round to nearest stalls");
    let mean = run(ParamRounding::Stochastic { seed: 1, offset: 0 });
    // per element the rounding error is a sum of 100 independent terms of
    // at most one ulp (2^-7): its standard deviation is below 0.04, the
    // mean's over 65536 elements below 2e-4
    assert!((mean - f32_result).abs() < 1e-3, "mean {mean} vs f32 {f32_result}");
    // a different seed gives a different stream, the same mean
    let other = run(ParamRounding::Stochastic { seed: 2, offset: 0 });
    assert!((other - f32_result).abs() < 1e-3, "mean {other} vs f32 {f32_result}");
    assert_ne!(mean, other);
}

#[test]
fn stochastic_rounding_keeps_nan_inf_and_representable_values() {
    let cfg: AnyConfig = SgdConfig { lr: 0.0, ..Default::default() }.into();
    let vals = [0.0f32, -0.0, 1.0, -2.5, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-40, f32::MAX];
    let mut p: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
    let before: Vec<u16> = p.iter().map(|v| v.to_bits()).collect();
    let g = vec![0.0f32; vals.len()];
    let opt =
        StepOptions { param_rounding: ParamRounding::Stochastic { seed: 3, offset: 0 }, ..StepOptions::default() };
    let mut aux = cfg.aux_init();
    cfg.step_mixed(1, &mut aux, Params::Bf16(&mut p), Grads::F32(&g), &mut [], None, &opt).unwrap();
    let after: Vec<u16> = p.iter().map(|v| v.to_bits()).collect();
    // every value already in bf16 stays (NaN as the quiet NaN 0x7FC0)
    let want: Vec<u16> = before.iter().map(|&b| if b & 0x7fff > 0x7f80 { 0x7fc0 } else { b }).collect();
    assert_eq!(after, want);
}

#[test]
fn stochastic_rounding_of_non_bf16_params_is_a_typed_error_and_changes_nothing() {
    let cfg: AnyConfig = AdamConfig::default().into();
    let n = 300;
    let mut p = vec![0.5f32; n];
    let g = vec![0.1f32; n];
    let mut m = vec![0.0f32; n];
    let mut v = vec![0.0f32; n];
    let opt =
        StepOptions { param_rounding: ParamRounding::Stochastic { seed: 0, offset: 0 }, ..StepOptions::default() };
    let mut aux = cfg.aux_init();
    let mut state = [StateBuf::F32(&mut m), StateBuf::F32(&mut v)];
    let e = cfg.step_mixed(1, &mut aux, Params::F32(&mut p), Grads::F32(&g), &mut state, None, &opt).unwrap_err();
    assert!(matches!(e, Error::Storage { what: "params", dtype: Dtype::F32, .. }), "{e}");
    assert!(p.iter().all(|&x| x == 0.5) && m.iter().all(|&x| x == 0.0) && v.iter().all(|&x| x == 0.0));
    assert_eq!(aux, cfg.aux_init());
}

/// A tensor stepped in pieces, each with its offset, gives the whole step's
/// bits; an offset that is not a multiple of 256 is a typed error.
#[test]
fn stochastic_rounding_of_pieces_with_offsets_is_the_whole_step() {
    let cfg: AnyConfig = AdamWConfig::default().into();
    let n = 1000;
    let mut rng = Rng::new(5);
    let p0: Vec<bf16> = rng.vec(n, 1.0).iter().map(|&x| bf16::from_f32(x)).collect();
    let g: Vec<f32> = rng.vec(n, 0.1);
    let step = |p: &mut [bf16], g: &[f32], m: &mut [f32], v: &mut [f32], offset: u64| {
        let opt =
            StepOptions { param_rounding: ParamRounding::Stochastic { seed: 9, offset }, ..StepOptions::default() };
        let mut aux = cfg.aux_init();
        let mut state = [StateBuf::F32(m), StateBuf::F32(v)];
        cfg.step_mixed(4, &mut aux, Params::Bf16(p), Grads::F32(g), &mut state, None, &opt)
    };
    let (mut m, mut v) = (vec![0.01f32; n], vec![0.02f32; n]);
    let mut whole = p0.clone();
    step(&mut whole, &g, &mut m, &mut v, 0).unwrap();
    let (mut m2, mut v2) = (vec![0.01f32; n], vec![0.02f32; n]);
    let mut pieces = p0.clone();
    for (start, end) in [(0, 512), (512, 768), (768, n)] {
        step(&mut pieces[start..end], &g[start..end], &mut m2[start..end], &mut v2[start..end], start as u64).unwrap();
    }
    assert_eq!(whole, pieces);
    assert_eq!(bits(&m), bits(&m2));
    // an offset off the 256 grid: an error, nothing modified
    let mut p = p0.clone();
    let (mut m3, mut v3) = (vec![0.01f32; n], vec![0.02f32; n]);
    let e = step(&mut p, &g, &mut m3, &mut v3, 100).unwrap_err();
    assert!(matches!(e, Error::InvalidOption { .. }), "{e}");
    assert_eq!(p, p0);
    assert_eq!((m3, v3), (vec![0.01f32; n], vec![0.02f32; n]));
}

/// `f16` parameters round to nearest into `f16`: a step past 65504 gives
/// infinity (as `half` and torch's `float16` do), one below stays finite;
/// subnormal `f16` values widen and narrow exactly; stochastic rounding of
/// `f16` parameters is a typed error that changes nothing.
#[test]
fn f16_params_round_to_nearest_at_the_edges() {
    let cfg: AnyConfig = SgdConfig { lr: 1.0, ..Default::default() }.into();
    let mut p = [f16::MAX, f16::MAX, f16::from_f32(1.0), f16::from_bits(1), f16::from_f32(-2.0)];
    // p - g: 65504+32 (past the midpoint 65520 -> inf), 65504+8 (-> 65504),
    // 1 - 2^-25 (-> 1), 2^-24 + 2^-24 (the next subnormal), -2 - 1e30 (-> -inf).
    let g = [-32.0f32, -8.0, 2f32.powi(-25), -(2f32.powi(-24)), 1e30];
    let mut aux = cfg.aux_init();
    for exec in [Exec::scalar(), Exec::serial(Backend::best())] {
        let mut q = p;
        let opt = StepOptions { exec, ..StepOptions::default() };
        cfg.step_mixed(1, &mut aux, Params::F16(&mut q), Grads::F32(&g), &mut [], None, &opt).unwrap();
        let got: Vec<f32> = q.iter().map(|x| x.to_f32()).collect();
        assert_eq!(got, [f32::INFINITY, 65504.0, 1.0, 2f32.powi(-23), f32::NEG_INFINITY], "{exec:?}");
    }
    let opt =
        StepOptions { param_rounding: ParamRounding::Stochastic { seed: 0, offset: 0 }, ..StepOptions::default() };
    let before = p;
    let e = cfg.step_mixed(1, &mut aux, Params::F16(&mut p), Grads::F32(&g), &mut [], None, &opt).unwrap_err();
    assert!(matches!(e, Error::Storage { what: "params", dtype: Dtype::F16, .. }), "{e}");
    assert_eq!(p.map(f16::to_bits), before.map(f16::to_bits));
}
