//! The checkpoint loaders on arbitrary bytes: an error or a valid optimizer
//! (which can then step), never a panic. Dense, grouped, sparse and mixed
//! (f32/bf16/8-bit state) layouts, and many tensors' Adafactors in one file.
#![no_main]

use adaoptim::groups::GroupedOptimizer;
use adaoptim::mixed::MixedOptimizer;
use adaoptim::sparse::{RowWiseAdagrad, SparseAdagrad, SparseAdam};
use adaoptim::storage::{Grads, Params, bf16};
use adaoptim::{Adafactor, AdamConfig, AnyOptimizer, Error, NAdamConfig, RmsPropConfig, SgdConfig};
use libfuzzer_sys::fuzz_target;

/// A loaded optimizer steps, or is at the step limit.
fn steps(r: Result<adaoptim::StepReport, Error>) {
    match r {
        Ok(_) | Err(Error::StepLimit { .. }) => {}
        Err(e) => panic!("a loaded optimizer steps: {e:?}"),
    }
}

fuzz_target!(|bytes: &[u8]| {
    if let Ok(mut g) = GroupedOptimizer::<AdamConfig>::from_safetensors(bytes) {
        steps(g.step());
    }
    if let Ok(mut g) = GroupedOptimizer::<NAdamConfig>::from_safetensors(bytes) {
        steps(g.step());
    }
    if let Ok(mut g) = GroupedOptimizer::<SgdConfig>::from_safetensors(bytes) {
        steps(g.step());
    }
    if let Ok(mut g) = GroupedOptimizer::<RmsPropConfig>::from_safetensors(bytes) {
        steps(g.step());
    }
    if let Ok(mut opt) = MixedOptimizer::<AdamConfig>::from_safetensors(bytes) {
        let n = opt.len();
        if n <= 1 << 16 {
            let mut p = vec![bf16::from_f32(0.5); n];
            steps(opt.step(Params::Bf16(&mut p), Grads::F32(&vec![0.25f32; n]), None));
            let again = MixedOptimizer::<AdamConfig>::from_safetensors(&opt.to_safetensors().unwrap()).unwrap();
            assert_eq!(again.steps(), opt.steps());
        }
    }
    if let Ok(mut opts) = Adafactor::many_from_safetensors(bytes)
        && opts.iter().map(Adafactor::len).sum::<usize>() <= 1 << 16
    {
        // It round-trips: the same file again.
        let again = Adafactor::many_to_safetensors(&opts, &[]).unwrap();
        let back = Adafactor::many_from_safetensors(&again).unwrap();
        assert_eq!(Adafactor::many_to_safetensors(&back, &[]).unwrap(), again);
        for o in &mut opts {
            let n = o.len();
            steps(o.step(&mut vec![0.5f32; n], &vec![0.25f32; n]));
        }
    }
    let _ = SparseAdam::from_safetensors(bytes);
    let _ = SparseAdagrad::from_safetensors(bytes);
    let _ = RowWiseAdagrad::from_safetensors(bytes);
    if let Ok(mut opt) = AnyOptimizer::from_safetensors(bytes) {
        let n = opt.len();
        if n <= 1 << 16 {
            let mut p = vec![0.5f32; n];
            steps(opt.step(&mut p, &vec![0.25f32; n]));
            // And it round-trips.
            let again = AnyOptimizer::from_safetensors(&opt.to_safetensors().unwrap()).unwrap();
            assert_eq!(again.step_count(), opt.step_count());
        }
    }
});
