//! [`MixedOptimizer`]: its steps are `step_mixed`'s on the same buffers, its
//! checkpoints keep the state bit for bit under torch's or bitsandbytes'
//! names and dtypes, and bad input changes nothing.

mod common;

use adaoptim::mixed::MixedOptimizer;
use adaoptim::storage::{Dtype, Grads, ParamCopy, ParamRounding, Params, Q8State, QMap, StateBuf, bf16};
use adaoptim::*;
use common::Rng;
use safetensors::SafeTensors;

const N: usize = 1000; // four blocks, the last partial

/// Caller-owned state in `dtype`, stepped through `step_mixed`.
enum Held {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    Q8(Vec<u8>, Vec<f32>, &'static QMap),
}

fn held(dtype: Dtype, name: &str, x: f32) -> Held {
    match dtype {
        Dtype::F32 => Held::F32(vec![x; N]),
        Dtype::Bf16 => Held::Bf16(vec![bf16::from_f32(x); N]),
        _ => {
            let map = QMap::for_state(name);
            let (mut c, mut a) = (vec![0u8; N], vec![0f32; N.div_ceil(256)]);
            storage::quantize_blockwise(&vec![x; N], map, &mut c, &mut a).unwrap();
            Held::Q8(c, a, map)
        }
    }
}

fn widened(h: &Held) -> Vec<u32> {
    match h {
        Held::F32(x) => x.iter().map(|v| v.to_bits()).collect(),
        Held::Bf16(x) => x.iter().map(|v| v.to_f32().to_bits()).collect(),
        Held::Q8(c, a, map) => {
            let mut out = vec![0f32; N];
            storage::dequantize_blockwise(c, a, map, &mut out).unwrap();
            out.iter().map(|v| v.to_bits()).collect()
        }
    }
}

/// Runs `steps` steps of `cfg` with state in `dtype` and bf16 params, both
/// through a `MixedOptimizer` (checkpointed and reloaded half way) and
/// through `step_mixed` on caller buffers; asserts the same bits.
fn same_as_step_mixed<A: Algorithm + Into<AnyConfig>>(cfg: A, dtype: Dtype, sr: Option<u64>) {
    let mut rng = Rng::new(17);
    let p0: Vec<bf16> = rng.vec(N, 1.0).iter().map(|&x| bf16::from_f32(x)).collect();
    let gs: Vec<Vec<bf16>> = (0..6).map(|_| rng.vec(N, 0.1).iter().map(|&x| bf16::from_f32(x)).collect()).collect();
    let any: AnyConfig = cfg.clone().into();
    let names = any.state_names();
    let mut state: Vec<Held> = (0..names.len()).map(|i| held(dtype, names[i], any.state_init(i))).collect();
    let mut aux = any.aux_init();
    let mut p = p0.clone();
    for (t, g) in gs.iter().enumerate() {
        let mut bufs: Vec<StateBuf<'_>> = state
            .iter_mut()
            .map(|h| match h {
                Held::F32(x) => StateBuf::F32(x),
                Held::Bf16(x) => StateBuf::Bf16(x),
                Held::Q8(c, a, map) => StateBuf::Q8(Q8State { codes: c, absmax: a, map }),
            })
            .collect();
        let param_rounding = sr.map_or(ParamRounding::Nearest, |seed| ParamRounding::Stochastic { seed, offset: 0 });
        let opt = StepOptions { param_rounding, ..StepOptions::default() };
        any.step_mixed(t as u64 + 1, &mut aux, Params::Bf16(&mut p), Grads::Bf16(g), &mut bufs, None, &opt).unwrap();
    }
    let mut opt = MixedOptimizer::new(cfg, N, dtype).unwrap();
    opt.set_stochastic_rounding(sr);
    let mut q = p0.clone();
    for g in &gs[..3] {
        opt.step(Params::Bf16(&mut q), Grads::Bf16(g), None).unwrap();
    }
    let bytes = opt.to_safetensors().unwrap();
    let mut opt = MixedOptimizer::<A>::from_safetensors(&bytes).unwrap();
    assert_eq!(opt.to_safetensors().unwrap(), bytes, "a reloaded optimizer writes the same bytes");
    opt.set_stochastic_rounding(sr);
    opt.set_exec(Exec::parallel(Backend::best(), 256));
    for g in &gs[3..] {
        opt.step(Params::Bf16(&mut q), Grads::Bf16(g), None).unwrap();
    }
    assert_eq!(p, q, "{} {dtype:?}: params", A::TORCH_CLASS);
    assert_eq!(opt.steps(), 6);
    for (name, h) in names.iter().zip(&state) {
        let got: Vec<u32> = opt.state_f32(name).unwrap().iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, widened(h), "{} {dtype:?}: {name}", A::TORCH_CLASS);
    }
}

#[test]
fn steps_and_checkpoints_are_step_mixed_on_the_same_buffers() {
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::Q8] {
        for sr in [None, Some(5)] {
            same_as_step_mixed(AdamWConfig { weight_decay: 0.1, ..Default::default() }, dtype, sr);
            same_as_step_mixed(AdamConfig { amsgrad: true, maximize: true, ..Default::default() }, dtype, sr);
            same_as_step_mixed(AdagradConfig { initial_accumulator_value: 0.1, ..Default::default() }, dtype, sr);
            same_as_step_mixed(SgdConfig { lr: 0.01, momentum: 0.9, nesterov: true, ..Default::default() }, dtype, sr);
            same_as_step_mixed(RmsPropConfig { centered: true, ..Default::default() }, dtype, sr);
        }
    }
}

#[test]
fn eight_bit_checkpoints_use_bitsandbytes_names_and_dtypes() {
    let mut opt = MixedOptimizer::new(AdamWConfig::default(), N, Dtype::Q8).unwrap();
    let mut p = vec![0.5f32; N];
    let g: Vec<f32> = Rng::new(3).vec(N, 0.1);
    opt.step(Params::F32(&mut p), Grads::F32(&g), None).unwrap();
    let bytes = opt.to_safetensors().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(names, ["absmax1", "absmax2", "qmap1", "qmap2", "state1", "state2", "step"]);
    let dtype = |n: &str| st.tensor(n).unwrap().dtype();
    use safetensors::Dtype as D;
    assert_eq!((dtype("state1"), dtype("absmax1"), dtype("qmap1")), (D::U8, D::F32, D::F32));
    assert_eq!(st.tensor("state2").unwrap().shape(), [N]);
    assert_eq!(st.tensor("absmax2").unwrap().shape(), [4]);
    // qmap1 is the signed map (exp_avg), qmap2 the unsigned one (exp_avg_sq):
    // bitsandbytes' values, as tests/q8.rs checks them against the package
    let floats = |n: &str| -> Vec<f32> {
        st.tensor(n).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    assert_eq!(floats("qmap1"), QMap::signed().code());
    assert_eq!(floats("qmap2"), QMap::unsigned().code());
    assert!(floats("qmap1")[0] < 0.0 && floats("qmap2")[0] >= 0.0);
    let meta = checkpoint::format::metadata(&bytes).unwrap();
    assert_eq!((meta["layout"].as_str(), meta["state_dtype"].as_str()), ("mixed", "U8"));
}

#[test]
fn bf16_checkpoints_hold_bf16_tensors_under_torch_names() {
    let mut opt = MixedOptimizer::new(AdamConfig { amsgrad: true, ..Default::default() }, N, Dtype::Bf16).unwrap();
    let mut p = vec![0.5f32; N];
    let mut copy = vec![bf16::ZERO; N];
    opt.step(Params::F32(&mut p), Grads::F32(&vec![0.25; N]), Some(ParamCopy::Bf16(&mut copy))).unwrap();
    assert_eq!(copy, p.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>());
    let bytes = opt.to_safetensors().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] {
        assert_eq!(st.tensor(name).unwrap().dtype(), safetensors::Dtype::BF16, "{name}");
    }
    // exp_avg after one step is (1 - beta1) * g = 0.025, rounded to bf16
    let raw = st.tensor("exp_avg").unwrap().data();
    assert_eq!(bf16::from_bits(u16::from_le_bytes([raw[0], raw[1]])), bf16::from_f32(0.1f32 * 0.25));
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let mut opt = MixedOptimizer::new(AdamWConfig::default(), N, Dtype::Q8).unwrap();
    let mut p = vec![0.5f32; N];
    let g = vec![0.1f32; N];
    opt.step(Params::F32(&mut p), Grads::F32(&g), None).unwrap();
    let before = opt.to_safetensors().unwrap();
    let p_before = p.clone();
    // wrong lengths
    let e = opt.step(Params::F32(&mut p[..N - 1]), Grads::F32(&g[..N - 1]), None).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    let e = opt.step(Params::F32(&mut p), Grads::F32(&g[..N - 1]), None).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    // a copy beside bf16 params
    let mut pb = vec![bf16::ONE; N];
    let mut copy = vec![bf16::ZERO; N];
    let e = opt.step(Params::Bf16(&mut pb), Grads::F32(&g), Some(ParamCopy::Bf16(&mut copy))).unwrap_err();
    assert!(matches!(e, Error::Storage { .. }), "{e}");
    assert_eq!(opt.to_safetensors().unwrap(), before);
    assert_eq!(p, p_before);
    assert!(pb.iter().all(|&x| x == bf16::ONE) && copy.iter().all(|&x| x == bf16::ZERO));
    // f16 state is not a state storage
    let e = MixedOptimizer::new(AdamWConfig::default(), N, Dtype::F16).unwrap_err();
    assert!(matches!(e, Error::Storage { .. }), "{e}");
    // an invalid learning rate
    assert!(opt.set_lr(-1.0).is_err());
    assert_eq!(opt.to_safetensors().unwrap(), before);
}

#[test]
fn damaged_or_foreign_checkpoints_are_refused() {
    let mut opt = MixedOptimizer::new(AdamWConfig::default(), N, Dtype::Q8).unwrap();
    let mut p = vec![0.5f32; N];
    opt.step(Params::F32(&mut p), Grads::F32(&vec![0.1; N]), None).unwrap();
    let bytes = opt.to_safetensors().unwrap();
    // another optimizer class, another layout
    assert!(matches!(MixedOptimizer::<AdamConfig>::from_safetensors(&bytes), Err(Error::Checkpoint { .. })));
    assert!(matches!(Optimizer::<AdamWConfig>::from_safetensors(&bytes), Err(Error::Checkpoint { .. })));
    let dense = Optimizer::new(AdamWConfig::default(), N).unwrap().to_safetensors().unwrap();
    assert!(matches!(MixedOptimizer::<AdamWConfig>::from_safetensors(&dense), Err(Error::Checkpoint { .. })));
    // a flipped byte in the codes: the checksum catches it
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(MixedOptimizer::<AdamWConfig>::from_safetensors(&bad), Err(Error::Checkpoint { .. })));
    // truncated
    assert!(MixedOptimizer::<AdamWConfig>::from_safetensors(&bytes[..bytes.len() / 2]).is_err());
}
