//! Mixed-precision and 8-bit storage: every backend, serial and parallel
//! with an arbitrary chunk, against the scalar reference, bit for bit, for
//! arbitrary configurations, storage combinations (bf16/f16 grads, bf16
//! params rounded to nearest or stochastically, f16 params rounded to
//! nearest, f32/bf16/8-bit states, a bf16/f16 param copy) and values (NaN,
//! inf, subnormals, extreme magnitudes included). Stochastic rounding of f16
//! params is a typed error that changes nothing. Stability on top: finite
//! inputs of moderate size keep an 8-bit state's absmax finite and >= 0.
#![no_main]

mod common;

use adaoptim::storage::{Grads, ParamCopy, ParamRounding, Params, Q8State, QMap, StateBuf, bf16, f16};
use adaoptim::{Backend, Exec, HyperValue, StepOptions};
use arbitrary::Arbitrary;
use common::{RawConfig, same};
use libfuzzer_sys::{Corpus, fuzz_target};

#[derive(Arbitrary, Debug)]
struct Input {
    config: RawConfig,
    len: u16,
    steps: u8,
    chunk: u16,
    grads: u8,
    /// Odd: bf16 (this byte was a `bool`, bf16 or not, and the committed
    /// seeds keep their meaning); even with the top bit set: f16; else f32.
    params: u8,
    state: u8,
    copy: u8,
    /// Stochastic rounding of bf16 params with this seed.
    sr_seed: Option<u64>,
    values: Vec<u32>,
}

type Out = (Vec<u32>, Vec<Vec<u32>>, Vec<u32>);

fuzz_target!(|input: Input| -> Corpus {
    let Some(cfg) = input.config.build(|_, x| x) else { return Corpus::Reject };
    if input.values.is_empty() {
        return Corpus::Reject;
    }
    let n = input.len as usize % 700;
    let steps = 1 + input.steps as usize % 3;
    let val = |i: usize| f32::from_bits(input.values[i % input.values.len()]);
    let p0: Vec<f32> = (0..n).map(val).collect();
    let gs: Vec<Vec<f32>> = (0..steps).map(|s| (0..n).map(|i| val(i * 7 + s * 13 + 1)).collect()).collect();
    let names = cfg.state_names();
    let pkind = match input.params {
        p if p & 1 == 1 => 1,
        p if p & 0x80 != 0 => 2,
        _ => 0,
    };
    let (gkind, skind, ckind) = (input.grads % 3, input.state % 3, if pkind == 0 { input.copy % 3 } else { 0 });

    let run = |exec: Exec| -> Out {
        let mut p32 = p0.clone();
        let mut p16: Vec<bf16> = p0.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut ph: Vec<f16> = p0.iter().map(|&x| f16::from_f32(x)).collect();
        let mut s32 = vec![vec![0f32; n]; names.len()];
        let mut s16 = vec![vec![bf16::ZERO; n]; names.len()];
        let mut codes = vec![vec![0u8; n]; names.len()];
        let mut absmax = vec![vec![0f32; n.div_ceil(256)]; names.len()];
        let mut cb = vec![bf16::ZERO; n];
        let mut ch = vec![f16::ZERO; n];
        let mut aux = cfg.aux_init();
        for (t, g) in gs.iter().enumerate() {
            let gb: Vec<bf16> = g.iter().map(|&x| bf16::from_f32(x)).collect();
            let gh: Vec<f16> = g.iter().map(|&x| f16::from_f32(x)).collect();
            let params = match pkind {
                0 => Params::F32(&mut p32),
                1 => Params::Bf16(&mut p16),
                _ => Params::F16(&mut ph),
            };
            let grads = match gkind {
                0 => Grads::F32(g),
                1 => Grads::Bf16(&gb),
                _ => Grads::F16(&gh),
            };
            let mut state: Vec<StateBuf<'_>> = match skind {
                0 => s32.iter_mut().map(|x| StateBuf::F32(x)).collect(),
                1 => s16.iter_mut().map(|x| StateBuf::Bf16(x)).collect(),
                _ => codes
                    .iter_mut()
                    .zip(absmax.iter_mut())
                    .zip(names)
                    .map(|((c, a), name)| StateBuf::Q8(Q8State { codes: c, absmax: a, map: QMap::for_state(name) }))
                    .collect(),
            };
            let copy = match ckind {
                0 => None,
                1 => Some(ParamCopy::Bf16(&mut cb)),
                _ => Some(ParamCopy::F16(&mut ch)),
            };
            let param_rounding = match input.sr_seed {
                Some(seed) if pkind == 1 => ParamRounding::Stochastic { seed, offset: 0 },
                _ => ParamRounding::Nearest,
            };
            let options = StepOptions { exec, param_rounding, ..StepOptions::default() };
            cfg.step_mixed(t as u64 + 1, &mut aux, params, grads, &mut state, copy, &options).expect("valid step");
        }
        let p: Vec<u32> = match pkind {
            0 => p32.iter().map(|x| x.to_bits()).collect(),
            1 => p16.iter().map(|x| u32::from(x.to_bits())).collect(),
            _ => ph.iter().map(|x| u32::from(x.to_bits())).collect(),
        };
        let s: Vec<Vec<u32>> = match skind {
            0 => s32.iter().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect(),
            1 => s16.iter().map(|v| v.iter().map(|x| u32::from(x.to_bits())).collect()).collect(),
            _ => codes
                .iter()
                .zip(&absmax)
                .map(|(c, a)| c.iter().map(|&x| u32::from(x)).chain(a.iter().map(|x| x.to_bits())).collect())
                .collect(),
        };
        let c: Vec<u32> = match ckind {
            1 => cb.iter().map(|x| u32::from(x.to_bits())).collect(),
            2 => ch.iter().map(|x| u32::from(x.to_bits())).collect(),
            _ => vec![],
        };
        (p, s, c)
    };
    if let (2, Some(seed)) = (pkind, input.sr_seed) {
        // f16 params have no stochastic rounding: refused, nothing written.
        let mut ph: Vec<f16> = p0.iter().map(|&x| f16::from_f32(x)).collect();
        let before = ph.clone();
        let mut s32 = vec![vec![0f32; n]; names.len()];
        let mut state: Vec<StateBuf<'_>> = s32.iter_mut().map(|x| StateBuf::F32(x)).collect();
        let mut aux = cfg.aux_init();
        let aux0 = aux;
        let options =
            StepOptions { param_rounding: ParamRounding::Stochastic { seed, offset: 0 }, ..StepOptions::default() };
        let r = cfg.step_mixed(1, &mut aux, Params::F16(&mut ph), Grads::F32(&gs[0]), &mut state, None, &options);
        assert!(r.is_err(), "{cfg:?}: stochastic rounding of f16 params accepted");
        drop(state);
        assert!(ph.iter().zip(&before).all(|(a, b)| a.to_bits() == b.to_bits()), "refused step wrote params");
        assert!(s32.iter().flatten().all(|x| x.to_bits() == 0), "refused step wrote state");
        assert!(aux.iter().zip(&aux0).all(|(a, b)| a.to_bits() == b.to_bits()), "refused step wrote aux");
    }
    let reference = run(Exec::scalar());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let nan_eq = |a: &[u32], b: &[u32], what: &str| {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            // compare as f32 where the value is one (bf16/f16 bits compare as integers)
            assert!(
                x == y || same(f32::from_bits(*x), f32::from_bits(*y)) && *x > 0xffff,
                "{cfg:?} {what}[{i}]: {x:#x} vs {y:#x}"
            );
        }
    };
    for b in Backend::available() {
        for exec in [Exec::serial(b), Exec::parallel(b, input.chunk as usize % 2000)] {
            let (p, s, c) = pool.install(|| run(exec));
            nan_eq(&p, &reference.0, "param");
            for (a, r) in s.iter().zip(&reference.1) {
                nan_eq(a, r, "state");
            }
            nan_eq(&c, &reference.2, "copy");
        }
    }
    // stability: moderate finite values and hyperparameters keep 8-bit
    // absmax finite and >= 0. Moderate hyperparameters: every number within
    // 1e7, eps at least 1e-12 (an eps of 0 or infinity in f32 makes
    // Adadelta divide 0 by 0 or inf by inf in any storage, as torch does;
    // a tiny one lets a block's flushed codes blow an update up).
    let moderate = |x: f32| x.is_finite() && x.abs() < 1e3;
    let moderate_config = cfg.options().iter().all(|(name, v)| match (name, v) {
        (&"eps", HyperValue::Number(e)) => (1e-12..=1e7).contains(e),
        (_, HyperValue::Number(x)) => x.abs() <= 1e7,
        (_, HyperValue::Pair(a, b)) => a.abs() <= 1e7 && b.abs() <= 1e7,
        _ => true,
    });
    if skind == 2
        && moderate_config
        && p0.iter().all(|&x| moderate(x))
        && gs.iter().flatten().all(|&x| moderate(x))
        && cfg.torch_class() != "Rprop"
    {
        for s in &reference.1 {
            for &a in &s[n..] {
                let a = f32::from_bits(a);
                assert!(a.is_finite() && a >= 0.0, "{cfg:?}: absmax {a:e}");
            }
        }
    }
    Corpus::Keep
});
