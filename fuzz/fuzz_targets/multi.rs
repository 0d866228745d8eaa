//! `MultiOptimizer::step_mixed`: configurations with a training run's
//! hyperparameters (two groups of the same class), tensors of arbitrary sizes whose parameters are `f32`,
//! `bf16` or `f16` and whose gradients are `f32`, `bf16`, `f16` or absent
//! per step, each group's state in `f32`, `bf16` or 8-bit block-wise
//! storage, a loss scale, the non-finite policy and every backend, serial
//! and parallel with an arbitrary chunk. Each tensor must get the bits of
//! `step_mixed` over it alone on the scalar path with state in its group's
//! storage (made and read through the public storage functions); a step
//! is skipped (nothing changes) exactly when a present gradient is NaN or
//! infinite under `SkipStep`.
#![no_main]

mod common;

use adaoptim::multi::{MixedTensorStep, MultiOptimizer};
use adaoptim::storage::{
    Dtype, Grads, Params, Q8_BLOCK, Q8State, QMap, StateBuf, bf16, dequantize_blockwise, f16, quantize_blockwise,
};
#[allow(unused_imports)]
use adaoptim::{
    AdadeltaConfig, AdagradConfig, AdamConfig, AdamWConfig, AdamaxConfig, AsgdConfig, LionConfig, NAdamConfig,
    RAdamConfig, RmsPropConfig, RpropConfig, SgdConfig,
};
use adaoptim::{Algorithm, AnyConfig, Backend, Exec, NonFinitePolicy, StepOptions};
use arbitrary::Arbitrary;
use common::{RawConfig, same};
use libfuzzer_sys::{Corpus, fuzz_target};

#[derive(Arbitrary, Debug)]
struct Tensor {
    len: u8,
    /// 0: f32, 1: bf16, 2: f16.
    params: u8,
    /// Per step: 0 f32, 1 bf16, 2 f16, 3 none.
    grads: [u8; 3],
    second_group: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    config: RawConfig,
    other: RawConfig,
    tensors: Vec<Tensor>,
    steps: u8,
    chunk: u16,
    scale: u8,
    /// Each group's state storage: 0 f32, 1 bf16, 2 8-bit.
    state: [u8; 2],
    skip_non_finite: bool,
    /// Values as raw bits (NaN, inf, huge, subnormal); otherwise finite
    /// ones are folded into (-10, 10), so that steps move parameters.
    raw_values: bool,
    values: Vec<u32>,
}

/// A tensor's parameters in its storage.
#[derive(Clone)]
enum Stored {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Stored {
    fn params(&mut self) -> Params<'_> {
        match self {
            Stored::F32(v) => Params::F32(v),
            Stored::Bf16(v) => Params::Bf16(v),
            Stored::F16(v) => Params::F16(v),
        }
    }
    fn bits(&self) -> Vec<u32> {
        match self {
            Stored::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
            Stored::Bf16(v) => v.iter().map(|x| u32::from(x.to_bits())).collect(),
            Stored::F16(v) => v.iter().map(|x| u32::from(x.to_bits())).collect(),
        }
    }
}

/// One step's gradient for one tensor in its storage.
enum Grad {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Grad {
    fn grads(&self) -> Grads<'_> {
        match self {
            Grad::F32(v) => Grads::F32(v),
            Grad::Bf16(v) => Grads::Bf16(v),
            Grad::F16(v) => Grads::F16(v),
        }
    }
    fn any_non_finite(&self) -> bool {
        match self {
            Grad::F32(v) => v.iter().any(|x| !x.is_finite()),
            Grad::Bf16(v) => v.iter().any(|x| !x.to_f32().is_finite()),
            Grad::F16(v) => v.iter().any(|x| !x.to_f32().is_finite()),
        }
    }
}

/// A reference state buffer in its storage.
enum St {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    Q8(Vec<u8>, Vec<f32>, &'static QMap),
}

impl St {
    fn new(dtype: Dtype, n: usize, x: f32, name: &str) -> St {
        match dtype {
            Dtype::F32 => St::F32(vec![x; n]),
            Dtype::Bf16 => St::Bf16(vec![bf16::from_f32(x); n]),
            _ => {
                let map = QMap::for_state(name);
                let (mut c, mut a) = (vec![0u8; n], vec![0f32; n.div_ceil(Q8_BLOCK)]);
                quantize_blockwise(&vec![x; n], map, &mut c, &mut a).expect("lengths");
                St::Q8(c, a, map)
            }
        }
    }
    fn buf(&mut self) -> StateBuf<'_> {
        match self {
            St::F32(x) => StateBuf::F32(x),
            St::Bf16(x) => StateBuf::Bf16(x),
            St::Q8(codes, absmax, map) => StateBuf::Q8(Q8State { codes, absmax, map }),
        }
    }
    fn bits(&self) -> Vec<u32> {
        let v = match self {
            St::F32(x) => x.clone(),
            St::Bf16(x) => x.iter().map(|v| v.to_f32()).collect(),
            St::Q8(c, a, map) => {
                let mut out = vec![0.0; c.len()];
                dequantize_blockwise(c, a, map, &mut out).expect("lengths");
                out
            }
        };
        v.iter().map(|x| x.to_bits()).collect()
    }
}

/// Parameters and every state buffer of every tensor, as bits.
type Out = Vec<(Vec<u32>, Vec<Vec<u32>>)>;

fn check<A: Algorithm + Copy + Into<AnyConfig>>(configs: [A; 2], input: &Input) {
    // No values or no tensors: a few fixed ones, so that short inputs test
    // something too.
    let values: &[u32] = if input.values.is_empty() { &[0x3f80_0000, 0xbe4c_cccd, 0x4049_0fdb] } else { &input.values };
    let val = |i: usize| {
        let x = f32::from_bits(values[i % values.len()]);
        if input.raw_values || !x.is_finite() { x } else { x % 10.0 }
    };
    let steps = 1 + input.steps as usize % 3;
    let default = [Tensor { len: 37, params: 0, grads: [0, 1, 2], second_group: false }];
    let tensors: Vec<&Tensor> =
        if input.tensors.is_empty() { default.iter().collect() } else { input.tensors.iter().take(5).collect() };
    let lens: Vec<usize> = tensors.iter().map(|t| t.len as usize % 200).collect();
    let start: Vec<Stored> = tensors
        .iter()
        .zip(&lens)
        .enumerate()
        .map(|(k, (t, &n))| {
            let v: Vec<f32> = (0..n).map(|i| val(k * 31 + i)).collect();
            match t.params % 3 {
                0 => Stored::F32(v),
                1 => Stored::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
                _ => Stored::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            }
        })
        .collect();
    // grads[s][k]: step s's gradient of tensor k, if any.
    let grads: Vec<Vec<Option<Grad>>> = (0..steps)
        .map(|s| {
            tensors
                .iter()
                .zip(&lens)
                .enumerate()
                .map(|(k, (t, &n))| {
                    let g: Vec<f32> = (0..n).map(|i| val(k * 17 + i * 7 + s * 13 + 1)).collect();
                    match t.grads[s] % 4 {
                        0 => Some(Grad::F32(g)),
                        1 => Some(Grad::Bf16(g.iter().map(|&x| bf16::from_f32(x)).collect())),
                        2 => Some(Grad::F16(g.iter().map(|&x| f16::from_f32(x)).collect())),
                        _ => None,
                    }
                })
                .collect()
        })
        .collect();
    // Scales of 1 or more: an unscaled finite gradient stays finite, so a
    // step is skipped exactly when a present gradient is not finite.
    let scale = [None, Some(1.0f32), Some(2.0), Some(1024.0), Some(65536.0)][input.scale as usize % 5];
    let policy = if input.skip_non_finite { NonFinitePolicy::SkipStep } else { NonFinitePolicy::Propagate };
    let group_of = |t: &Tensor| usize::from(t.second_group);
    let dtypes = input.state.map(|d| [Dtype::F32, Dtype::Bf16, Dtype::Q8][d as usize % 3]);

    // The reference: each tensor alone, scalar, its own state and count.
    let reference: Out = {
        let mut out = Vec::new();
        let skipped: Vec<bool> = grads
            .iter()
            .map(|gs| policy == NonFinitePolicy::SkipStep && gs.iter().flatten().any(Grad::any_non_finite))
            .collect();
        for (k, t) in tensors.iter().enumerate() {
            let cfg: AnyConfig = configs[group_of(t)].into();
            let mut p = start[k].clone();
            let mut state: Vec<St> = cfg
                .state_names()
                .iter()
                .enumerate()
                .map(|(i, name)| St::new(dtypes[group_of(t)], lens[k], cfg.state_init(i), name))
                .collect();
            let mut aux = cfg.aux_init();
            let mut count = 0u64;
            for (s, gs) in grads.iter().enumerate() {
                let Some(g) = &gs[k] else { continue };
                if skipped[s] {
                    continue;
                }
                count += 1;
                let mut bufs: Vec<StateBuf<'_>> = state.iter_mut().map(St::buf).collect();
                let options = StepOptions { exec: Exec::scalar(), grad_scale: scale, ..StepOptions::default() };
                cfg.step_mixed(count, &mut aux, p.params(), g.grads(), &mut bufs, None, &options).expect("valid step");
            }
            out.push((p.bits(), state.iter().map(St::bits).collect()));
        }
        out
    };

    let run = |exec: Exec| -> Out {
        let mut opt = MultiOptimizer::new();
        for (g, cfg) in configs.iter().enumerate() {
            let sizes: Vec<usize> =
                tensors.iter().zip(&lens).filter(|(t, _)| group_of(t) == g).map(|(_, &n)| n).collect();
            opt.add_group_with_state(*cfg, &sizes, dtypes[g]).expect("valid group");
        }
        // Tensors are numbered group by group: map ours onto that order.
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&k| group_of(tensors[k]));
        opt.set_exec(exec);
        opt.set_non_finite(policy);
        opt.set_grad_scale(scale).expect("valid scale");
        let mut params = start.clone();
        for gs in &grads {
            let before: Vec<Vec<u32>> = params.iter().map(Stored::bits).collect();
            let mut by_slot: Vec<Option<&mut Stored>> = params.iter_mut().map(Some).collect();
            let mut steps: Vec<MixedTensorStep<'_>> = order
                .iter()
                .map(|&k| MixedTensorStep::new(by_slot[k].take().unwrap().params(), gs[k].as_ref().map(Grad::grads)))
                .collect();
            let report = opt.step_mixed(&mut steps).expect("valid step");
            drop(steps);
            let expect_skip = policy == NonFinitePolicy::SkipStep && gs.iter().flatten().any(Grad::any_non_finite);
            assert_eq!(report.skipped, expect_skip, "skipped");
            if report.skipped {
                let after: Vec<Vec<u32>> = params.iter().map(Stored::bits).collect();
                assert_eq!(before, after, "a skipped step changed parameters");
            }
        }
        let mut out = Vec::new();
        for (k, p) in params.iter().enumerate() {
            let slot = order.iter().position(|&x| x == k).unwrap();
            let cfg: AnyConfig = configs[group_of(tensors[k])].into();
            let state = cfg
                .state_names()
                .iter()
                .map(|name| opt.state_f32(slot, name).unwrap().unwrap().iter().map(|x| x.to_bits()).collect())
                .collect();
            out.push((p.bits(), state));
        }
        out
    };

    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let eq = |a: &[u32], b: &[u32], what: &str| {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            // f32 NaNs compare equal whatever their payload (half bits as integers).
            assert!(
                x == y || *x > 0xffff && same(f32::from_bits(*x), f32::from_bits(*y)),
                "{what}[{i}]: {x:#x} vs {y:#x}"
            );
        }
    };
    for b in Backend::available() {
        for exec in [Exec::serial(b), Exec::parallel(b, input.chunk as usize % 300)] {
            let got = pool.install(|| run(exec));
            for (k, ((p, s), (rp, rs))) in got.iter().zip(&reference).enumerate() {
                eq(p, rp, &format!("{b:?} tensor {k} params"));
                for (a, r) in s.iter().zip(rs) {
                    eq(a, r, &format!("{b:?} tensor {k} state"));
                }
            }
        }
    }
}

/// Hyperparameters picked from values a training run uses, by the raw
/// number's bits (so tiny and huge raw numbers give steps that move).
fn training(name: &str, x: f64) -> f64 {
    let bits = x.to_bits();
    let pick = |table: &[f64]| table[((bits ^ (bits >> 29) ^ (bits >> 52)) % table.len() as u64) as usize];
    match name {
        "lr" => pick(&[1e-3, 1e-2, 0.1, 0.5]),
        "weight_decay" => pick(&[0.0, 0.01, 0.1]),
        "momentum" | "alpha" | "rho" | "betas" | "dampening" => pick(&[0.0, 0.5, 0.9, 0.99]),
        "eps" => pick(&[1e-8, 1e-6, 1e-3]),
        _ => pick(&[0.0, 0.25, 0.5, 1.0, 2.0]),
    }
}

macro_rules! dispatch {
    ($($module:ident { $($variant:ident($cfg:ident)),+ })*) => {
        /// Runs [`check`] with the two configurations' own type; `None`
        /// when they are of different classes.
        fn check_any(a: AnyConfig, b: AnyConfig, input: &Input) -> Option<()> {
            match (a, b) {
                $($((AnyConfig::$variant(x), AnyConfig::$variant(y)) => check([x, y], input),)+)*
                _ => return None,
            }
            Some(())
        }
    };
}
adaoptim::for_each_optimizer!(dispatch);

fuzz_target!(|input: Input| -> Corpus {
    // A training run's hyperparameters: extreme ones are the
    // `differential` and `mixed` targets' job; this one is about the
    // bookkeeping of many tensors.
    let Some(a) = input.config.build(training) else { return Corpus::Reject };
    // The second group: the same class, its own hyperparameters.
    let other = RawConfig { class: input.config.class, ..input.other.clone() };
    let b = other.build(training).unwrap_or(a);
    match check_any(a, b, &input) {
        Some(()) => Corpus::Keep,
        None => Corpus::Reject,
    }
});
