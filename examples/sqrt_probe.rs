//! Which formula gives torch's float32 square roots on an AVX-512 machine
//! (MKL's `vsSqrt`, which torch's CPU `sqrt` calls): reads the values and
//! torch's results written by `python3 python/benches/torch_sqrt.py --probe`
//! and counts, per candidate, the values whose bits differ.
//!
//! ```sh
//! python3 python/benches/torch_sqrt.py --probe
//! cargo run --release --example sqrt_probe
//! ```
//! A research probe for the bit-exact mode (not used by the crate): the
//! candidates start from `vrsqrt14ps`, so it needs AVX-512.

fn read(path: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}; run python/benches/torch_sqrt.py --probe"));
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[cfg(target_arch = "x86_64")]
mod probe {
    use std::arch::x86_64::*;

    /// The candidates' names, in the order [`candidates`] writes them.
    pub const NAMES: [&str; 3] = [
        "y = x*r; y + (x - y*y) * (r/2)  (Markstein, products fused)",
        "y = x*r; y + y * (1/2 - y*(r/2))  (Goldschmidt, fused)",
        "-(x*r)/2 * (x*r*r - 3)  (GCC's -mrecip expansion)",
    ];

    /// Every candidate on `x`, 16 lanes at a time (`x.len()` a multiple of 16).
    #[target_feature(enable = "avx512f")]
    pub fn candidates(x: &[f32]) -> [Vec<f32>; 3] {
        let mut out = [vec![0f32; x.len()], vec![0f32; x.len()], vec![0f32; x.len()]];
        for i in (0..x.len() / 16).map(|k| 16 * k) {
            // SAFETY: i + 16 <= x.len() = out[k].len(); AVX-512F is enabled on this function.
            unsafe {
                let a = _mm512_loadu_ps(x.as_ptr().add(i));
                let r = _mm512_rsqrt14_ps(a);
                let half = _mm512_set1_ps(0.5);
                let y = _mm512_mul_ps(a, r);
                let h = _mm512_mul_ps(half, r);
                let markstein = _mm512_fmadd_ps(_mm512_fnmadd_ps(y, y, a), h, y);
                let goldschmidt = _mm512_fmadd_ps(y, _mm512_fnmadd_ps(y, h, half), y);
                let gcc =
                    _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(-0.5), y), _mm512_fmsub_ps(y, r, _mm512_set1_ps(3.0)));
                for (o, v) in out.iter_mut().zip([markstein, goldschmidt, gcc]) {
                    _mm512_storeu_ps(o.as_mut_ptr().add(i), v);
                }
            }
        }
        out
    }
}

fn main() {
    let x = read("/tmp/adaoptim_sqrt_in.bin");
    let torch = read("/tmp/adaoptim_sqrt_torch.bin");
    assert_eq!(x.len(), torch.len(), "the two files hold the same number of values");
    let n = x.len() / 16 * 16;
    let differ = |ours: &[f32]| ours.iter().zip(&torch).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let exact: Vec<f32> = x.iter().map(|v| v.sqrt()).collect();
    println!("{} values; correctly rounded sqrt: {} differ from torch", x.len(), differ(&exact));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected at run time.
        let outs = unsafe { probe::candidates(&x[..n]) };
        for (name, out) in probe::NAMES.iter().zip(&outs) {
            println!("{name}: {} of {n} differ from torch", differ(out));
        }
        return;
    }
    println!("the candidates need AVX-512 (vrsqrt14ps); not run");
}
