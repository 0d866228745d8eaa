//! Schedules on arbitrary configurations: a typed error, or finite values
//! within the schedule's documented bounds at every step asked.
#![no_main]

use adaoptim::schedule::*;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    kind: u8,
    x: [f64; 6],
    k: [u64; 4],
    flags: [bool; 2],
    steps: Vec<u64>,
    nested: u8,
}

fn build(i: &Input, kind: u8, depth: u8) -> Option<Schedule> {
    let [a, b, c, d, e, f] = i.x;
    let [k0, k1, k2, _] = i.k;
    let s: Schedule = match kind % 13 {
        0 => ConstantLR::new(a, b, k0).ok()?.into(),
        1 => StepLR::new(a, k0, b).ok()?.into(),
        2 => MultiStepLR::new(a, vec![k0, k1, k2], b).ok()?.into(),
        3 => ExponentialLR::new(a, b).ok()?.into(),
        4 => ExponentialLR::from_decay_rate(a, b).ok()?.into(),
        5 => LinearLR::new(a, b, c, k0).ok()?.into(),
        6 => PolynomialLR::new(a, k0, b).ok()?.into(),
        7 => CosineAnnealingLR::new(a, k0, b).ok()?.into(),
        8 => CosineAnnealingWarmRestarts::new(a, k0, k1, b).ok()?.into(),
        9 => {
            let mode = match k2 % 3 {
                0 => CyclicMode::Triangular,
                1 => CyclicMode::Triangular2,
                _ => CyclicMode::ExpRange { gamma: c },
            };
            let down = i.flags[0].then_some(k1);
            CyclicLR::new(a, b, k0, down, mode, i.flags[1].then_some((d, e))).ok()?.into()
        }
        10 => {
            let anneal = if i.flags[0] { Anneal::Cos } else { Anneal::Linear };
            OneCycleLR::new(a, k0, b, anneal, c, d, i.flags[1], Some((e, f))).ok()?.into()
        }
        11 if depth < 2 => {
            let first = build(i, i.nested, depth + 1)?;
            let second = build(i, kind.wrapping_add(i.nested / 2), depth + 1)?;
            SequentialLR::new(vec![first, second], vec![k0]).ok()?.into()
        }
        12 if depth < 2 => {
            let first = build(i, i.nested, depth + 1)?;
            ChainedScheduler::new(a, vec![first]).ok()?.into()
        }
        _ => return None,
    };
    Some(s)
}

fuzz_target!(|input: Input| {
    let Some(s) = build(&input, input.kind, 0) else { return };
    let (lo, hi) = s.bounds();
    assert!(lo.is_finite() && hi.is_finite() && lo <= hi, "{s:?}: bounds {lo} {hi}");
    let slack = 1e-9 * hi.abs().max(lo.abs());
    for &t in input.steps.iter().take(64).chain(&[0, 1, 2, u64::MAX]) {
        let lr = s.lr_at(t);
        assert!(lr.is_finite(), "{s:?} step {t}: {lr}");
        assert!(lr >= lo - slack && lr <= hi + slack, "{s:?} step {t}: {lr} outside [{lo}, {hi}]");
        if let Some(m) = s.momentum_at(t) {
            assert!(m.is_finite(), "{s:?} step {t}: momentum {m}");
        }
    }
});
