//! Storage types: the element types a step's buffers may be held in, and the
//! conversions between them and the `f32` every formula computes in.
//!
//! A step reads and writes each buffer in its own storage: gradients in
//! `f32`, [`bf16`] or [`f16`](struct@f16) (what an accelerator hands over), parameters in
//! `f32` (master weights) or `bf16`, each state buffer in `f32` or `bf16`, and
//! optionally writes a `bf16`/`f16` copy of the updated `f32` parameters into
//! a caller-owned buffer (the copy ZeRO-Offload sends back to the
//! accelerator). See [`step_mixed`](crate::step_mixed).
//!
//! # How the mixed path is built
//! The formula is not changed, nor instantiated per storage: the driver walks
//! the buffers in tiles of [`TILE`] elements, widens every non-`f32` tile into
//! an `f32` tile on the stack (an `f32` buffer is used in place), runs the
//! optimizer's `f32` kernel over the tiles, and narrows what it wrote back
//! into the buffers' storage. So the `f32` values a formula sees, and what it
//! computes from them, are the same bits as an `f32` step on the widened
//! values; only the final rounding into the storage type is added.
//!
//! # Rounding
//! - `f32 -> bf16`: round to nearest, ties to even (torch's
//!   `c10::BFloat16` rounding); NaN becomes the quiet NaN `0x7FC0`.
//! - `f32 -> f16`: round to nearest, ties to even, with subnormals and
//!   overflow to infinity (IEEE-754 `binary16`, the `FP16` library's
//!   branch-free algorithm torch's `c10::Half` uses); NaN becomes `0x7E00`.
//! - `bf16 -> f32` and `f16 -> f32` are exact.
//!
//! Each conversion is written once as plain integer and IEEE operations with
//! no branch (selects only), so the compiler vectorizes it inside every
//! backend's driver and every backend gives the same bits.

pub use half::{bf16, f16};

/// Elements per tile of the mixed-storage driver (and per block of a
/// block-wise quantized state).
pub const TILE: usize = 256;

/// The element type of a buffer, for errors and checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dtype {
    /// IEEE-754 single precision.
    F32,
    /// bfloat16: the top half of an `f32`.
    Bf16,
    /// IEEE-754 half precision (`binary16`).
    F16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// The safetensors / torch name: `"F32"`, `"BF16"`, `"F16"`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::Bf16 => "BF16",
            Dtype::F16 => "F16",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parameters, updated in place.
#[derive(Debug)]
pub enum Params<'a> {
    /// `f32` parameters (master weights).
    F32(&'a mut [f32]),
    /// `bf16` parameters: widened, stepped in `f32`, rounded back.
    Bf16(&'a mut [bf16]),
}

/// Gradients, read only.
#[derive(Clone, Copy, Debug)]
pub enum Grads<'a> {
    /// `f32` gradients.
    F32(&'a [f32]),
    /// `bf16` gradients.
    Bf16(&'a [bf16]),
    /// `f16` gradients.
    F16(&'a [f16]),
}

/// One state buffer, updated in place.
#[derive(Debug)]
pub enum StateBuf<'a> {
    /// `f32` state.
    F32(&'a mut [f32]),
    /// `bf16` state: widened, updated in `f32`, rounded back each step.
    Bf16(&'a mut [bf16]),
}

/// Where a step writes a half-precision copy of the updated `f32` parameters.
#[derive(Debug)]
pub enum ParamCopy<'a> {
    /// A `bf16` copy.
    Bf16(&'a mut [bf16]),
    /// An `f16` copy.
    F16(&'a mut [f16]),
}

macro_rules! storage_common {
    ($t:ident, $($v:ident),+) => {
        impl<'a> $t<'a> {
            /// Elements in the buffer.
            pub fn len(&self) -> usize {
                match self { $($t::$v(x) => x.len(),)+ }
            }
            /// True if the buffer holds no element.
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }
        }
    };
}
storage_common!(Params, F32, Bf16);
storage_common!(Grads, F32, Bf16, F16);
storage_common!(StateBuf, F32, Bf16);
storage_common!(ParamCopy, Bf16, F16);

impl Params<'_> {
    /// The storage type.
    pub fn dtype(&self) -> Dtype {
        match self {
            Params::F32(_) => Dtype::F32,
            Params::Bf16(_) => Dtype::Bf16,
        }
    }
    /// A shorter borrow of the same buffer.
    pub fn reborrow(&mut self) -> Params<'_> {
        match self {
            Params::F32(x) => Params::F32(x),
            Params::Bf16(x) => Params::Bf16(x),
        }
    }
}

impl Grads<'_> {
    /// The storage type.
    pub fn dtype(&self) -> Dtype {
        match self {
            Grads::F32(_) => Dtype::F32,
            Grads::Bf16(_) => Dtype::Bf16,
            Grads::F16(_) => Dtype::F16,
        }
    }
}

impl StateBuf<'_> {
    /// The storage type.
    pub fn dtype(&self) -> Dtype {
        match self {
            StateBuf::F32(_) => Dtype::F32,
            StateBuf::Bf16(_) => Dtype::Bf16,
        }
    }
    /// A shorter borrow of the same buffer.
    pub fn reborrow(&mut self) -> StateBuf<'_> {
        match self {
            StateBuf::F32(x) => StateBuf::F32(x),
            StateBuf::Bf16(x) => StateBuf::Bf16(x),
        }
    }
}

impl ParamCopy<'_> {
    /// The storage type.
    pub fn dtype(&self) -> Dtype {
        match self {
            ParamCopy::Bf16(_) => Dtype::Bf16,
            ParamCopy::F16(_) => Dtype::F16,
        }
    }
    /// A shorter borrow of the same buffer.
    pub fn reborrow(&mut self) -> ParamCopy<'_> {
        match self {
            ParamCopy::Bf16(x) => ParamCopy::Bf16(x),
            ParamCopy::F16(x) => ParamCopy::F16(x),
        }
    }
}

impl<'a> Params<'a> {
    pub(crate) fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            Params::F32(x) => {
                let (a, b) = x.split_at_mut(mid);
                (Params::F32(a), Params::F32(b))
            }
            Params::Bf16(x) => {
                let (a, b) = x.split_at_mut(mid);
                (Params::Bf16(a), Params::Bf16(b))
            }
        }
    }
}

impl<'a> Grads<'a> {
    pub(crate) fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            Grads::F32(x) => {
                let (a, b) = x.split_at(mid);
                (Grads::F32(a), Grads::F32(b))
            }
            Grads::Bf16(x) => {
                let (a, b) = x.split_at(mid);
                (Grads::Bf16(a), Grads::Bf16(b))
            }
            Grads::F16(x) => {
                let (a, b) = x.split_at(mid);
                (Grads::F16(a), Grads::F16(b))
            }
        }
    }
}

impl<'a> StateBuf<'a> {
    pub(crate) fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            StateBuf::F32(x) => {
                let (a, b) = x.split_at_mut(mid);
                (StateBuf::F32(a), StateBuf::F32(b))
            }
            StateBuf::Bf16(x) => {
                let (a, b) = x.split_at_mut(mid);
                (StateBuf::Bf16(a), StateBuf::Bf16(b))
            }
        }
    }
}

impl<'a> ParamCopy<'a> {
    pub(crate) fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            ParamCopy::Bf16(x) => {
                let (a, b) = x.split_at_mut(mid);
                (ParamCopy::Bf16(a), ParamCopy::Bf16(b))
            }
            ParamCopy::F16(x) => {
                let (a, b) = x.split_at_mut(mid);
                (ParamCopy::F16(a), ParamCopy::F16(b))
            }
        }
    }
}

/// A 16-bit float format the driver widens and narrows.
pub(crate) trait Half: Copy + Send + Sync {
    /// Exact widening.
    fn widen(self) -> f32;
    /// Round to nearest, ties to even.
    fn narrow(x: f32) -> Self;
}

impl Half for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        let b = x.to_bits();
        let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
        bf16::from_bits(if x.is_nan() { 0x7fc0 } else { rounded })
    }
}

impl Half for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // FP16's fp16_ieee_to_fp32_value: normal and infinite/NaN inputs by a
        // shift and an exact scaling, subnormals by a magic subtraction.
        let w = u32::from(self.to_bits()) << 16;
        let sign = w & 0x8000_0000;
        let two_w = w.wrapping_add(w);
        let normalized = f32::from_bits((two_w >> 4) + (0xe0 << 23)) * f32::from_bits(0x0780_0000); // 2^-112
        let denormalized = f32::from_bits((two_w >> 17) | (126 << 23)) - 0.5;
        let bits = if two_w < (1 << 27) { denormalized.to_bits() } else { normalized.to_bits() };
        f32::from_bits(sign | bits)
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        // FP16's fp16_ieee_from_fp32_value: the two scalings round the
        // mantissa at the f16 position (nearest even) and send overflow to
        // infinity; the added bias places subnormals.
        let base = (x.abs() * f32::from_bits(0x7780_0000)) * f32::from_bits(0x0880_0000); // 2^112, 2^-110
        let w = x.to_bits();
        let shl1_w = w.wrapping_add(w);
        let sign = w & 0x8000_0000;
        let bias = (shl1_w & 0xff00_0000).max(0x7100_0000);
        let base = f32::from_bits((bias >> 1) + 0x0780_0000) + base;
        let bits = base.to_bits();
        let nonsign = ((bits >> 13) & 0x7c00) + (bits & 0x0fff);
        let h = (sign >> 16) | if shl1_w > 0xff00_0000 { 0x7e00 } else { nonsign };
        f16::from_bits(h as u16)
    }
}

/// `dst[i] = src[i].widen()`.
#[inline(always)]
pub(crate) fn widen<H: Half>(src: &[H], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.widen();
    }
}

/// `dst[i] = H::narrow(src[i])`.
#[inline(always)]
pub(crate) fn narrow<H: Half>(src: &[f32], dst: &mut [H]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = H::narrow(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f32 bit pattern in a stride, plus the edges.
    fn samples() -> impl Iterator<Item = f32> {
        let edges = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            65504.0,
            65520.0,
            65519.99,
            5.960_464_5e-8,
            2.980_232_2e-8,
            2.980_232_3e-8,
            6.103_515_6e-5,
            1e-45,
        ];
        edges.into_iter().chain((0..=u32::MAX).step_by(9973).map(f32::from_bits))
    }

    #[test]
    fn bf16_matches_half_crate_round_to_nearest_even() {
        for x in samples() {
            let ours = bf16::narrow(x);
            if x.is_nan() {
                assert_eq!(ours.to_bits(), 0x7fc0);
                continue;
            }
            assert_eq!(ours.to_bits(), bf16::from_f32(x).to_bits(), "{x:e} ({:#010x})", x.to_bits());
            assert_eq!(ours.widen().to_bits(), bf16::from_f32(x).to_f32().to_bits());
        }
    }

    #[test]
    fn f16_matches_half_crate_round_to_nearest_even() {
        for x in samples() {
            let ours = f16::narrow(x);
            if x.is_nan() {
                assert_eq!(ours.to_bits() & 0x7fff, 0x7e00);
                continue;
            }
            assert_eq!(ours.to_bits(), f16::from_f32(x).to_bits(), "{x:e} ({:#010x})", x.to_bits());
        }
    }

    #[test]
    fn f16_widening_is_exact_for_every_pattern() {
        for h in 0..=u16::MAX {
            let h = f16::from_bits(h);
            let ours = h.widen();
            if h.is_nan() {
                assert!(ours.is_nan());
                continue;
            }
            assert_eq!(ours.to_bits(), h.to_f32().to_bits(), "{:#06x}", h.to_bits());
            // and narrowing it back is the identity
            assert_eq!(f16::narrow(ours).to_bits(), h.to_bits());
        }
    }

    #[test]
    fn bf16_widening_round_trips_every_pattern() {
        for h in 0..=u16::MAX {
            let h = bf16::from_bits(h);
            if h.is_nan() {
                assert!(h.widen().is_nan());
                continue;
            }
            assert_eq!(bf16::narrow(h.widen()).to_bits(), h.to_bits());
        }
    }

    #[test]
    fn ties_round_to_even() {
        // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: even is 1.0.
        assert_eq!(bf16::narrow(1.0 + 2f32.powi(-8)).to_bits(), bf16::from_f32(1.0).to_bits());
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is the latter.
        assert_eq!(bf16::narrow(1.0 + 3.0 * 2f32.powi(-8)).widen(), 1.0 + 2f32.powi(-6));
        // f16: 1 + 2^-11 is halfway between 1.0 and 1 + 2^-10.
        assert_eq!(f16::narrow(1.0 + 2f32.powi(-11)).widen(), 1.0);
        assert_eq!(f16::narrow(1.0 + 3.0 * 2f32.powi(-11)).widen(), 1.0 + 2f32.powi(-9));
        // overflow: 65520 rounds to infinity, just below it to 65504
        assert_eq!(f16::narrow(65520.0).widen(), f32::INFINITY);
        assert_eq!(f16::narrow(65519.0).widen(), 65504.0);
    }
}
