//! Times Adafactor steps on one matrix (profiling aid): `cargo run --release --example adafactor_speed -- 1024 1024 50`.
use adaoptim::{Adafactor, AdafactorConfig};
fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|x| x.parse().unwrap()).collect();
    let (r, c, steps) = (a[0], a[1], a[2]);
    let n = r * c;
    let mut p: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let g: Vec<f32> = (0..n).map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5).collect();
    let mut o = Adafactor::new(AdafactorConfig { weight_decay: 0.01, ..Default::default() }, &[r, c]).unwrap();
    o.step(&mut p, &g).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..steps {
        o.step(&mut p, &g).unwrap();
    }
    let s = t.elapsed().as_secs_f64() / steps as f64;
    println!("{r}x{c}: {:.3} ms/step, {:.3} Gparam/s", s * 1e3, n as f64 / s / 1e9);
}
