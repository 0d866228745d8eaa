//! The checkpoint loader on arbitrary bytes: an error or a valid optimizer
//! (which can then step), never a panic.
#![no_main]

use adaoptim::AnyOptimizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(mut opt) = AnyOptimizer::from_safetensors(bytes) {
        let n = opt.len();
        if n <= 1 << 16 {
            let mut p = vec![0.5f32; n];
            opt.step(&mut p, &vec![0.25f32; n]).expect("a loaded optimizer steps");
            // And it round-trips.
            let again = AnyOptimizer::from_safetensors(&opt.to_safetensors().unwrap()).unwrap();
            assert_eq!(again.step_count(), opt.step_count());
        }
    }
});
