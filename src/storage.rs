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
//! values; only the final rounding into the storage type is added. The
//! common combinations (bf16 or f16 gradients next to `f32` states, with an
//! optional copy of the same half type; bf16 or f16 parameters with their own
//! gradient type and `f32` states; bf16 everything) skip the tiles: a fused
//! lane loop widens each vector in registers as it loads it and narrows as it
//! stores, giving the kernel the same values.
//!
//! # Rounding
//! - `f32 -> bf16`: round to nearest, ties to even (torch's
//!   `c10::BFloat16` rounding); NaN becomes the quiet NaN `0x7FC0`.
//! - `f32 -> f16`: round to nearest, ties to even, with subnormals and
//!   overflow to infinity (IEEE-754 `binary16`, the `FP16` library's
//!   branch-free algorithm torch's `c10::Half` uses); every NaN becomes
//!   the positive quiet NaN `0x7E00` (torch keeps the sign; the sign of a NaN
//!   that arithmetic makes differs between code paths, so we drop it and
//!   every backend stores the same bits).
//! - `bf16 -> f32` and `f16 -> f32` are exact.
//! - `f16` parameters round to nearest (a value past 65504 becomes
//!   infinite); `bf16` parameters may instead round stochastically
//!   ([`ParamRounding::Stochastic`]), from a counter-based stream keyed by
//!   (seed, step, element index): the same bits on every path.
//!
//! Each conversion is written once as plain integer and IEEE operations with
//! no branch (selects only), so the compiler vectorizes it inside every
//! backend's driver and every backend gives the same bits.

pub use half::{bf16, f16};

use crate::simd::{
    F32Vec, Q8_FAST_DELTA, Q8Fast, Q8Quantizer, Q8Table, bf16_to_f32, f16_to_f32, f32_to_bf16,
    f32_to_bf16_stochastic_bits, f32_to_f16, order_key, q8_code, stream_bits,
};

/// Elements per tile of the mixed-storage driver (and per block of a
/// block-wise quantized state).
pub const TILE: usize = 256;

pub use crate::dtype::Dtype;

/// Parameters, updated in place.
#[derive(Debug)]
pub enum Params<'a> {
    /// `f32` parameters (master weights).
    F32(&'a mut [f32]),
    /// `bf16` parameters: widened, stepped in `f32`, rounded back.
    Bf16(&'a mut [bf16]),
    /// `f16` parameters: widened, stepped in `f32`, rounded back to nearest
    /// (a value past `f16`'s range, 65504, becomes infinite, as torch's
    /// step on `float16` parameters gives).
    F16(&'a mut [f16]),
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
    /// Block-wise 8-bit state: dequantized per block, updated in `f32`,
    /// quantized back with the block's new absmax each step.
    Q8(Q8State<'a>),
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
storage_common!(Params, F32, Bf16, F16);
storage_common!(Grads, F32, Bf16, F16);
storage_common!(ParamCopy, Bf16, F16);

impl Params<'_> {
    /// The storage type.
    pub fn dtype(&self) -> Dtype {
        match self {
            Params::F32(_) => Dtype::F32,
            Params::Bf16(_) => Dtype::Bf16,
            Params::F16(_) => Dtype::F16,
        }
    }
    /// A shorter borrow of the same buffer.
    pub fn reborrow(&mut self) -> Params<'_> {
        match self {
            Params::F32(x) => Params::F32(x),
            Params::Bf16(x) => Params::Bf16(x),
            Params::F16(x) => Params::F16(x),
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
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        match self {
            StateBuf::F32(x) => x.len(),
            StateBuf::Bf16(x) => x.len(),
            StateBuf::Q8(q) => q.codes.len(),
        }
    }
    /// True if the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The storage type.
    pub fn dtype(&self) -> Dtype {
        match self {
            StateBuf::F32(_) => Dtype::F32,
            StateBuf::Bf16(_) => Dtype::Bf16,
            StateBuf::Q8(_) => Dtype::Q8,
        }
    }
    /// A shorter borrow of the same buffer.
    pub fn reborrow(&mut self) -> StateBuf<'_> {
        match self {
            StateBuf::F32(x) => StateBuf::F32(x),
            StateBuf::Bf16(x) => StateBuf::Bf16(x),
            StateBuf::Q8(q) => StateBuf::Q8(Q8State { codes: q.codes, absmax: q.absmax, map: q.map }),
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
            Params::F16(x) => {
                let (a, b) = x.split_at_mut(mid);
                (Params::F16(a), Params::F16(b))
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
            StateBuf::Q8(q) => {
                // The drivers split mixed buffers at multiples of TILE =
                // Q8_BLOCK, or at the end.
                assert!(mid.is_multiple_of(Q8_BLOCK) || mid == q.codes.len(), "8-bit states split at block boundaries");
                let (c0, c1) = q.codes.split_at_mut(mid);
                let (a0, a1) = q.absmax.split_at_mut(mid.div_ceil(Q8_BLOCK));
                (
                    StateBuf::Q8(Q8State { codes: c0, absmax: a0, map: q.map }),
                    StateBuf::Q8(Q8State { codes: c1, absmax: a1, map: q.map }),
                )
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

/// Elements per block of an 8-bit state: one `f32` absmax per block
/// (bitsandbytes' and torchao's block size).
pub const Q8_BLOCK: usize = TILE;

/// A block-wise 8-bit state buffer, bitsandbytes' layout: `codes[i]` indexes
/// `map`, and element `i` is `map.code()[codes[i]] * absmax[i / Q8_BLOCK]`
/// (bitsandbytes' `state1`/`state2`, `absmax1`/`absmax2`, `qmap1`/`qmap2`).
///
/// Each step dequantizes a block, updates it in `f32`, takes the block's new
/// absmax (the largest magnitude) and quantizes every element to the nearest
/// code of `value / absmax` (see [`QMap`] for the search and how ties
/// round). A block whose absmax is 0 holds zeros. 8-bit codes cannot hold
/// NaN or infinity: a block with a NaN element gets a NaN absmax, one with an
/// infinite element an infinite absmax, and either dequantizes as NaN, so a
/// blow-up stays visible instead of being clipped away.
#[derive(Debug)]
pub struct Q8State<'a> {
    /// One code per element.
    pub codes: &'a mut [u8],
    /// One scale per block of [`Q8_BLOCK`] elements: `codes.len().div_ceil(256)` entries.
    pub absmax: &'a mut [f32],
    /// The code map: [`QMap::signed`] for `exp_avg`, [`QMap::unsigned`] for `exp_avg_sq`.
    pub map: &'a QMap,
}

/// The 256 values of an 8-bit state's codes, sorted, with the search
/// structure that finds the nearest one.
///
/// Quantization reproduces bitsandbytes' CPU `quantize_blockwise`: with
/// `x = value / absmax` (in `[-1, 1]`), take the largest index `i` whose code
/// is `<= x`, searching a copy of the map whose first entry is `-1` (as
/// bitsandbytes sets it, so every `x` has one), then move to `i + 1` if its
/// code is strictly nearer (`|x - c[i+1]| < |x - c[i]|` in `f32`): **ties go to
/// the lower code**. The rule is monotonic in `x`, so it is a step function
/// with 255 jumps, found once when the map is built (by bisection over the
/// `f32` values, against the rule itself). A step then reads one entry of a
/// 65536-entry table indexed by the top 16 bits of `x`'s order-preserving
/// bit pattern (its bucket): the code of the bucket's smallest value in the
/// top byte and, in the low 17 bits, where in the bucket the next code's
/// jump lies (the low 16 bits of its pattern, or `0x10000` for none); the
/// code is the bucket's, plus one if `x`'s low 16 bits are at or past the
/// jump. Exact, since no bucket of the dynamic maps holds two jumps (checked
/// when a map is built; a map where one does is searched directly), and
/// one load and one integer comparison per element, which the SIMD
/// backends do 8 or 16 lanes at a time with a gather. On AVX-512 the
/// lanes skip the gather where the map allows: an arithmetic quantizer
/// (the code from a few constants per decade of the map, held in
/// registers, with the lanes that land too near a jump settled by the
/// table), proven exact for the map when it is built and checked against
/// the table on the CPU once (`simd::Q8Fast`). Dequantizing is
/// `code[c] * absmax`: a gather of the 256 values on AVX2, on AVX-512 the
/// values held in 16 registers and picked by permutes
/// (`F32Vec::dequantize_lanes`).
#[derive(Clone)]
pub struct QMap {
    /// The 256 values, and their byte planes for the dequantizing lanes.
    table: Q8Table,
    /// `code` with `search[0] = -1` and `search[256] = inf` (so index `i + 1`
    /// needs no bound check and never wins).
    search: [f32; 257],
    /// Per bucket: `code << 24 | jump`, as described above; and the
    /// arithmetic quantizer where this map allows one.
    quant: Q8Quantizer,
    /// No bucket holds more than one jump: a lookup and one comparison
    /// give the code (true for the dynamic maps; checked when built).
    one_jump: bool,
}

impl std::fmt::Debug for QMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMap").field("code", &self.table.code).finish_non_exhaustive()
    }
}

impl PartialEq for QMap {
    fn eq(&self, other: &Self) -> bool {
        self.table.code.map(f32::to_bits) == other.table.code.map(f32::to_bits)
    }
}

impl QMap {
    /// A map from 256 sorted values in `[-1, 1]` whose last is `1`.
    ///
    /// # Errors
    /// [`Error::InvalidOption`](crate::Error::InvalidOption) if the values are
    /// not finite, not sorted ascending, outside `[-1, 1]`, or the last is not 1.
    pub fn from_code(code: [f32; 256]) -> Result<QMap, crate::Error> {
        let bad = |reason| Err(crate::Error::InvalidOption { name: "qmap".into(), reason });
        if code.iter().any(|c| !c.is_finite() || c.abs() > 1.0) {
            return bad("every code must be finite and within [-1, 1]");
        }
        if code.windows(2).any(|w| w[0] > w[1]) {
            return bad("codes must be sorted ascending");
        }
        if code[255] != 1.0 {
            return bad("the last code must be 1");
        }
        let mut search = [f32::INFINITY; 257];
        search[..256].copy_from_slice(&code);
        search[0] = -1.0;
        let reference = |x: f32| reference_search(&search, x);
        // jump[j]: bisect the order keys between the codes j-1 and j
        let mut jump = [f32::INFINITY; 257];
        jump[0] = f32::NEG_INFINITY;
        for j in 1..256 {
            let (mut lo, mut hi) = (order_key(search[j - 1]), order_key(search[j]));
            // reference(key lo) < j <= reference(key hi)
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if usize::from(reference(from_order_key(mid))) >= j { hi = mid } else { lo = mid }
            }
            jump[j] = from_order_key(hi);
        }
        let start = |k: u32| {
            let x = from_order_key(k << 16);
            if x.is_nan() { 0 } else { reference(x.clamp(-1.0, 1.0)) }
        };
        let bucket: Vec<u8> = (0..=u32::from(u16::MAX)).map(start).collect();
        let one_jump = (0..u16::MAX as usize).all(|k| bucket[k + 1].saturating_sub(bucket[k]) <= 1);
        let lut = (0..=u32::from(u16::MAX))
            .map(|k| {
                let b = bucket[k as usize];
                // where in bucket k the jump to code b + 1 lies, by order key
                let next = order_key(jump[usize::from(b) + 1]);
                let at = if b == 255 || next >> 16 > k {
                    0x1_0000
                } else if next >> 16 == k {
                    next & 0xffff
                } else {
                    0
                };
                u32::from(b) << 24 | at
            })
            .collect();
        let mut quant = Q8Quantizer { lut, fast: if one_jump { build_fast(&jump).map(Box::new) } else { None } };
        if quant.fast.is_some() && !fast_lanes_agree(&quant, &jump, &code) {
            quant.fast = None;
        }
        Ok(QMap { table: Q8Table::new(code), search, quant, one_jump })
    }

    /// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`),
    /// for `exp_avg`.
    pub fn signed() -> &'static QMap {
        static MAP: std::sync::OnceLock<QMap> = std::sync::OnceLock::new();
        MAP.get_or_init(|| QMap::from_code(dynamic_map(true)).expect("the dynamic map is valid"))
    }

    /// bitsandbytes' unsigned dynamic map (`create_dynamic_map(signed=False)`),
    /// for `exp_avg_sq`.
    pub fn unsigned() -> &'static QMap {
        static MAP: std::sync::OnceLock<QMap> = std::sync::OnceLock::new();
        MAP.get_or_init(|| QMap::from_code(dynamic_map(false)).expect("the dynamic map is valid"))
    }

    /// The map for a state buffer of this torch name: [`unsigned`](Self::unsigned)
    /// for the states that are never negative (`exp_avg_sq`,
    /// `max_exp_avg_sq`, `square_avg`, `sum`, `acc_delta`, `exp_inf`,
    /// `step_size`), [`signed`](Self::signed) for the rest.
    pub fn for_state(name: &str) -> &'static QMap {
        match name {
            "exp_avg_sq" | "max_exp_avg_sq" | "square_avg" | "sum" | "acc_delta" | "exp_inf" | "step_size" => {
                QMap::unsigned()
            }
            _ => QMap::signed(),
        }
    }

    /// The 256 code values.
    pub fn code(&self) -> &[f32; 256] {
        &self.table.code
    }

    /// The code of `x` (a value divided by its block's absmax; NaN, from a
    /// block of zeros, counts as 0).
    #[inline(always)]
    pub fn quantize(&self, x: f32) -> u8 {
        if self.one_jump {
            self.quantize_fast(x)
        } else {
            reference_search(&self.search, if x.is_nan() { 0.0 } else { x })
        }
    }

    /// The bucket's code, plus one if `x` is at or past the bucket's jump
    /// (NaN counts as 0).
    #[inline(always)]
    fn quantize_fast(&self, x: f32) -> u8 {
        q8_code(&self.quant.lut, x)
    }
}

/// The arithmetic quantizer's tables for a map whose jumps are `jump`
/// (`jump[j]`: the smallest `y` whose code is `j` or more; `jump[0]` is
/// `-inf`, `jump[256]` `inf`), or `None` if the map does not allow one
/// (more than 32 segments, or two segment starts in one cell).
///
/// Segments are grown greedily from code 0: a segment of codes `p..=q` is
/// kept while its interior jumps `jump[p+1..=q]` pass [`segment_fits`]. This
/// is the proof [`Q8Fast`] relies on, checked against the lanes' own
/// arithmetic (the scalar model rounds as they do).
fn build_fast(jump: &[f32; 257]) -> Option<Q8Fast> {
    let mut segs: Vec<(usize, usize, f32, f32)> = Vec::new();
    let mut p = 0;
    while p < 256 {
        let mut best = segment_fit(jump, p, p)?;
        let mut q = p;
        while q < 255 {
            match segment_fit(jump, p, q + 1) {
                Some(fit) => {
                    best = fit;
                    q += 1;
                }
                None => break,
            }
        }
        segs.push((p, q, best.0, best.1));
        p = q + 1;
    }
    if segs.len() > 32 {
        return None;
    }
    let mut f = Q8Fast {
        bnd: [f32::INFINITY; 64],
        seg_lo: [0; 64],
        s: [0.0; 32],
        o: [0.0; 32],
        lo: [0.5; 32],
        hi: [0.5; 32],
        positive: jump[1] > 0.0,
    };
    for (g, &(p, q, sl, ol)) in segs.iter().enumerate() {
        (f.s[g], f.o[g], f.lo[g], f.hi[g]) = (sl, ol, p as f32 + 0.5, q as f32 + 0.5);
    }
    // the segment holding y: the last whose first jump is <= y
    let seg_of = |y: f32| segs.iter().rposition(|&(p, ..)| jump[p] <= y).expect("jump[0] is -inf");
    for cell in 0..64 {
        // the cell's values in [-1, 1], lowest and highest
        let (neg, b) = (cell >= 32, (cell % 32) as i32);
        let small = if b == 0 { 0.0 } else { f32::from_bits(((b + 96) as u32) << 23) };
        let large = if b == 31 { 1.0 } else { f32::from_bits((((b + 97) as u32) << 23) - 1) };
        let (low, high) = if neg { (-large, -small) } else { (small, large) };
        let (g0, g1) = (seg_of(low), seg_of(high));
        f.seg_lo[cell] = g0 as i32;
        match g1 - g0 {
            0 => {}
            1 => f.bnd[cell] = jump[segs[g1].0],
            _ => return None,
        }
        debug_assert!(Q8Fast::cell(low) == cell && Q8Fast::cell(high) == cell && low <= high);
    }
    Some(f)
}

/// Values where the arithmetic quantizer is most likely to go wrong: every
/// jump and code and their neighbours, zeros, the ends, NaN, and a stride
/// through `[-1, 1]` by order key.
fn fast_check_values(jump: &[f32; 257], code: &[f32; 256]) -> Vec<f32> {
    let mut x = vec![0.0, -0.0, 1.0, -1.0, f32::NAN];
    for &c in jump[1..256].iter().chain(code) {
        for d in -3i32..=3 {
            x.push(from_order_key(order_key(c).wrapping_add_signed(d)).clamp(-1.0, 1.0));
        }
    }
    let (lo, hi) = (order_key(-1.0), order_key(1.0));
    x.extend((0..4096u32).map(|i| from_order_key(lo + ((u64::from(hi - lo) * u64::from(i)) >> 12) as u32)));
    x
}

/// On a CPU whose lanes run the arithmetic quantizer (AVX-512), a check,
/// once per map, that they give the table's codes on
/// [`fast_check_values`]; a map whose check fails keeps the table (the
/// lanes are also checked on every `f32` by the tests).
fn fast_lanes_agree(quant: &Q8Quantizer, jump: &[f32; 257], code: &[f32; 256]) -> bool {
    if !crate::Backend::Avx512.is_available() {
        return true;
    }
    let x = fast_check_values(jump, code);
    let (fast, table) = crate::simd::dispatch(crate::Backend::Avx512, FastAndTable { quant, x: &x, absmax: 1.0 });
    fast == table
}

/// The codes of `x / absmax` by `V::quantize_lanes` and by the table's lanes
/// (`simd::quantize_lanes_with_table`), each cut to the whole vectors it
/// wrote: [`fast_lanes_agree`]'s work, and the tests'.
struct FastAndTable<'a> {
    quant: &'a Q8Quantizer,
    x: &'a [f32],
    absmax: f32,
}

impl crate::simd::LaneOp for FastAndTable<'_> {
    type Out = (Vec<u8>, Vec<u8>);
    #[inline(always)]
    fn run<V: F32Vec>(self) -> (Vec<u8>, Vec<u8>) {
        let n = self.x.len();
        let (mut fast, mut table) = (vec![0u8; n], vec![0u8; n]);
        let (src, q, d) = (self.x.as_ptr(), self.quant, self.absmax);
        // SAFETY: every buffer holds n elements.
        let (a, b) = unsafe {
            (
                V::quantize_lanes(q, src, d, fast.as_mut_ptr(), n),
                crate::simd::quantize_lanes_with_table::<V>(&q.lut, src, d, table.as_mut_ptr(), n),
            )
        };
        fast.truncate(a);
        table.truncate(b);
        (fast, table)
    }
}

/// The slope and offset of `t` for a segment of codes `p..=q`, if every
/// interior jump `J = jump[k]` (`p < k <= q`) has `t(J) > k - delta` and
/// `t(pred J) < k + delta` as the lanes round (so a lane whose `t` is at
/// least the margin from every integer floors to the rule's code; see
/// [`Q8Fast`]). `t` runs through `k` at `jump[k]`: the slope is one over the
/// jumps' mean spacing, the offset centres the errors.
fn segment_fit(jump: &[f32; 257], p: usize, q: usize) -> Option<(f32, f32)> {
    if q == p {
        // one code: the clamp holds t mid-way, never near an integer
        return Some((0.0, p as f32 + 0.5));
    }
    let interior = &jump[p + 1..=q];
    if interior.iter().any(|j| !j.is_finite()) {
        return None;
    }
    let h = if q - p >= 2 {
        (f64::from(jump[q]) - f64::from(jump[p + 1])) / (q - p - 1) as f64
    } else {
        // one interior jump: a spacing taken from its neighbours
        let (a, b) = (f64::from(jump[p]), f64::from(jump[p + 2]));
        let j = f64::from(jump[p + 1]);
        [j - a, b - j].into_iter().filter(|d| d.is_finite() && *d > 0.0).fold(f64::INFINITY, f64::min)
    };
    if !(h.is_finite() && h > 0.0) {
        return None;
    }
    let s = (1.0 / h) as f32;
    if !(s.is_finite() && s > 0.0) {
        return None;
    }
    let errs = interior.iter().enumerate().map(|(i, &j)| (p + 1 + i) as f64 - f64::from(j) * f64::from(s));
    let (lo, hi) = errs.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), e| (l.min(e), h.max(e)));
    let o = ((lo + hi) / 2.0) as f32;
    let prev = |y: f32| from_order_key(order_key(y) - 1);
    let exact = interior.iter().enumerate().all(|(i, &j)| {
        let k = (p + 1 + i) as f32;
        Q8Fast::t(j, s, o) > k - Q8_FAST_DELTA && Q8Fast::t(prev(j), s, o) < k + Q8_FAST_DELTA
    });
    // and not slow: the first and last codes' ranges (within [-1, 1]) span
    // half a unit of `t` or more, or most of their values would lie near
    // an integer and be settled by the table
    let width = |a: f32, b: f32| (f64::from(b.min(1.0)) - f64::from(a.max(-1.0))) * f64::from(s);
    let wide = width(jump[p], jump[p + 1]) >= 0.5 && width(jump[q], jump[q + 1]) >= 0.5;
    (exact && wide).then_some((s, o))
}

/// bitsandbytes' rule, evaluated directly: the largest `i` with
/// `search[i] <= x`, then `i + 1` if strictly nearer.
fn reference_search(search: &[f32; 257], x: f32) -> u8 {
    let mut i = search[1..256].iter().filter(|&&c| c <= x).count();
    i += usize::from((x - search[i + 1]).abs() < (x - search[i]).abs());
    i as u8
}

/// The f32 of an order key (see [`order_key`]).
#[inline(always)]
fn from_order_key(key: u32) -> f32 {
    f32::from_bits(if key & 0x8000_0000 != 0 { key & 0x7fff_ffff } else { !key })
}

/// bitsandbytes' dynamic code map, `create_dynamic_map(signed,
/// max_exponent_bits=7, total_bits=8)`: for each exponent `e` in `0..7`, the
/// midpoints of `linspace(0.1, 1, k)` scaled by `10^(e-6)`, with
/// `k = 2^e + 1` (signed, both signs) or `2^(e+1) + 1` (unsigned), plus 0
/// and 1, sorted. The values are the ones bitsandbytes 0.50.2 computes on
/// torch 2.15's CPU (whose vectorized float32 `linspace` rounds differently
/// from the formula evaluated element by element, and differently per SIMD
/// width), stored as bit patterns, so a map is the same on every machine; a
/// checkpoint made elsewhere carries its own map ([`QMap::from_code`]).
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    (if signed { SIGNED_MAP_BITS } else { UNSIGNED_MAP_BITS }).map(f32::from_bits)
}

/// bitsandbytes' `create_dynamic_map(signed=True)` (0.50.2, torch 2.15, AVX2
/// capability), as f32 bit patterns.
const SIGNED_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// bitsandbytes' `create_dynamic_map(signed=False)`, as f32 bit patterns.
const UNSIGNED_MAP_BITS: [u32; 256] = [
    0x00000000, 0x34ae7baa, 0x35500998, 0x360e9b38, 0x3692ccf6, 0x36de4c51, 0x3714e5d5, 0x3783126e, 0x37e171a0,
    0x381fe868, 0x384f1800, 0x387e479a, 0x3896bb99, 0x38ae5364, 0x38c5eb31, 0x3906594b, 0x394154ca, 0x397c5049,
    0x399ba5e4, 0x39b923a2, 0x39d6a163, 0x39f41f22, 0x3a08ce71, 0x3a178d50, 0x3a264c30, 0x3a350b10, 0x3a43c9ef,
    0x3a5288d0, 0x3a6147af, 0x3a70068e, 0x3a7ec56e, 0x3a958106, 0x3aba5e35, 0x3adf3b64, 0x3b020c4a, 0x3b147ae1,
    0x3b26e978, 0x3b395810, 0x3b4bc6a7, 0x3b5e3540, 0x3b70a3d7, 0x3b818937, 0x3b8ac082, 0x3b93f7cf, 0x3b9d2f1a,
    0x3ba66666, 0x3baf9db2, 0x3bb8d4fd, 0x3bc20c4a, 0x3bcb4395, 0x3bd47ae1, 0x3bddb22e, 0x3be6e978, 0x3bf020c5,
    0x3bf9580f, 0x3c0147ae, 0x3c05e354, 0x3c0a7ef9, 0x3c0f1aa0, 0x3c13b645, 0x3c1851eb, 0x3c1ced92, 0x3c218937,
    0x3c2f5c2a, 0x3c466667, 0x3c5d70a3, 0x3c747ae2, 0x3c85c28f, 0x3c9147af, 0x3c9ccccd, 0x3ca851eb, 0x3cb3d70b,
    0x3cbf5c29, 0x3ccae147, 0x3cd66667, 0x3ce1eb87, 0x3ced70a3, 0x3cf8f5c3, 0x3d023d70, 0x3d080000, 0x3d0dc28f,
    0x3d13851f, 0x3d1947af, 0x3d1f0a3d, 0x3d24cccd, 0x3d2a8f5c, 0x3d3051eb, 0x3d36147b, 0x3d3bd70a, 0x3d41999a,
    0x3d475c28, 0x3d4d1eb8, 0x3d52e147, 0x3d58a3d7, 0x3d5e6667, 0x3d6428f7, 0x3d69eb87, 0x3d6fae15, 0x3d7570a3,
    0x3d7b3333, 0x3d807ae2, 0x3d835c2a, 0x3d863d71, 0x3d891eb8, 0x3d8c0000, 0x3d8ee148, 0x3d91c290, 0x3d94a3d7,
    0x3d97851f, 0x3d9a6667, 0x3d9d47af, 0x3da028f6, 0x3da30a3e, 0x3da5eb85, 0x3da8cccd, 0x3dabae15, 0x3dae8f5c,
    0x3db170a4, 0x3db451eb, 0x3db73333, 0x3dba147b, 0x3dbcf5c3, 0x3dbfd70b, 0x3dc2b852, 0x3dc5999a, 0x3dc87ae2,
    0x3dcb5c29, 0x3dd40000, 0x3de26666, 0x3df0cccd, 0x3dff3333, 0x3e06cccc, 0x3e0e0000, 0x3e153334, 0x3e1c6666,
    0x3e23999a, 0x3e2acccc, 0x3e320000, 0x3e393334, 0x3e406666, 0x3e47999a, 0x3e4ecccc, 0x3e560000, 0x3e5d3334,
    0x3e646666, 0x3e6b999a, 0x3e72cccc, 0x3e7a0000, 0x3e809999, 0x3e843333, 0x3e87cccd, 0x3e8b6666, 0x3e8f0000,
    0x3e92999a, 0x3e963333, 0x3e99cccc, 0x3e9d6666, 0x3ea10000, 0x3ea4999a, 0x3ea83333, 0x3eabcccc, 0x3eaf6666,
    0x3eb30000, 0x3eb6999a, 0x3eba3333, 0x3ebdcccc, 0x3ec16666, 0x3ec50000, 0x3ec8999a, 0x3ecc3333, 0x3ecfcccc,
    0x3ed36666, 0x3ed70000, 0x3eda999a, 0x3ede3333, 0x3ee1cccc, 0x3ee56666, 0x3ee90000, 0x3eec999a, 0x3ef03333,
    0x3ef3cccc, 0x3ef76666, 0x3efb0000, 0x3efe9999, 0x3f01199a, 0x3f02e666, 0x3f04b333, 0x3f068000, 0x3f084ccc,
    0x3f0a199a, 0x3f0be666, 0x3f0db334, 0x3f0f8000, 0x3f114ccd, 0x3f13199a, 0x3f14e666, 0x3f16b334, 0x3f188000,
    0x3f1a4ccd, 0x3f1c199a, 0x3f1de666, 0x3f1fb334, 0x3f218000, 0x3f234ccd, 0x3f25199a, 0x3f26e666, 0x3f28b334,
    0x3f2a8000, 0x3f2c4ccd, 0x3f2e199a, 0x3f2fe666, 0x3f31b334, 0x3f338000, 0x3f354ccd, 0x3f37199a, 0x3f38e666,
    0x3f3ab334, 0x3f3c8000, 0x3f3e4ccd, 0x3f40199a, 0x3f41e666, 0x3f43b334, 0x3f458000, 0x3f474ccc, 0x3f49199a,
    0x3f4ae666, 0x3f4cb334, 0x3f4e8000, 0x3f504ccc, 0x3f52199a, 0x3f53e666, 0x3f55b334, 0x3f578000, 0x3f594ccc,
    0x3f5b199a, 0x3f5ce666, 0x3f5eb334, 0x3f608000, 0x3f624ccc, 0x3f64199a, 0x3f65e666, 0x3f67b334, 0x3f698000,
    0x3f6b4ccc, 0x3f6d199a, 0x3f6ee666, 0x3f70b334, 0x3f728000, 0x3f744ccc, 0x3f76199a, 0x3f77e666, 0x3f79b334,
    0x3f7b8000, 0x3f7d4ccc, 0x3f7f199a, 0x3f800000,
];

/// Quantizes `src` block by block ([`Q8_BLOCK`]) as a step does: each
/// block's absmax, then every element's nearest code. Converts an `f32`
/// state (torch's `exp_avg`, say) into an 8-bit one.
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) unless `codes` has
/// `src.len()` entries and `absmax` `src.len().div_ceil(256)`; nothing is written then.
pub fn quantize_blockwise(src: &[f32], map: &QMap, codes: &mut [u8], absmax: &mut [f32]) -> Result<(), crate::Error> {
    crate::error::check_len("codes", src.len(), codes.len())?;
    crate::error::check_len("absmax", src.len().div_ceil(Q8_BLOCK), absmax.len())?;
    for ((s, c), a) in src.chunks(Q8_BLOCK).zip(codes.chunks_mut(Q8_BLOCK)).zip(absmax.iter_mut()) {
        *a = quantize::<f32>(s, map, c);
    }
    Ok(())
}

/// The `f32` values of an 8-bit state: `map.code()[codes[i]] * absmax[i / 256]`.
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) unless `dst` has
/// `codes.len()` entries and `absmax` `codes.len().div_ceil(256)`; nothing is written then.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], map: &QMap, dst: &mut [f32]) -> Result<(), crate::Error> {
    crate::error::check_len("dst", codes.len(), dst.len())?;
    crate::error::check_len("absmax", codes.len().div_ceil(Q8_BLOCK), absmax.len())?;
    for ((c, d), &a) in codes.chunks(Q8_BLOCK).zip(dst.chunks_mut(Q8_BLOCK)).zip(absmax) {
        dequantize::<f32>(c, a, map, d);
    }
    Ok(())
}

/// Dequantizes `codes` of one block into `dst`, `V::LANES` at a time.
#[inline(always)]
pub(crate) fn dequantize<V: F32Vec>(codes: &[u8], absmax: f32, map: &QMap, dst: &mut [f32]) {
    let n = codes.len();
    assert_eq!(n, dst.len(), "tile lengths are equal by construction");
    // SAFETY: both slices hold `n` elements.
    let i = unsafe { V::dequantize_lanes(&map.table, codes.as_ptr(), absmax, dst.as_mut_ptr(), n) };
    for j in i..n {
        dst[j] = map.table.code[usize::from(codes[j])] * absmax;
    }
}

/// Quantizes one block `src` into `codes`, returning its absmax (NaN if the
/// block holds one, else the largest magnitude), `V::LANES` at a time.
#[inline(always)]
pub(crate) fn quantize<V: F32Vec>(src: &[f32], map: &QMap, codes: &mut [u8]) -> f32 {
    let n = src.len();
    assert_eq!(n, codes.len(), "tile lengths are equal by construction");
    let (s, c) = (src.as_ptr(), codes.as_mut_ptr());
    // the maximum is exact, so its order does not matter; `max_nan` keeps a NaN
    // SAFETY: `src` holds `n` floats.
    let (m, i) = unsafe { V::abs_max_lanes(s, n) };
    let m = src[i..].iter().fold(m, |m, &x| m.max_nan(x.abs()));
    let absmax = if m.is_nan() { f32::NAN } else { m };
    if map.one_jump {
        // SAFETY: both slices hold `n` elements.
        let i = unsafe { V::quantize_lanes(&map.quant, s, absmax, c, n) };
        for j in i..n {
            codes[j] = map.quantize_fast(src[j] / absmax);
        }
    } else {
        for (c, &x) in codes.iter_mut().zip(src) {
            *c = map.quantize(x / absmax);
        }
    }
    absmax
}

/// A 16-bit float format the driver widens and narrows (the conversions
/// are `simd`'s, so every backend's lanes and the scalar reference share one
/// definition).
pub(crate) trait Half: Copy + Send + Sync {
    /// Exact widening.
    fn widen(self) -> f32;
    /// Round to nearest, ties to even.
    fn narrow(x: f32) -> Self;
    /// Widens `V::LANES` values.
    ///
    /// # Safety
    /// `ptr..ptr + V::LANES` readable.
    unsafe fn load<V: F32Vec>(ptr: *const Self) -> V;
    /// Narrows `V::LANES` values.
    ///
    /// # Safety
    /// `ptr..ptr + V::LANES` writable.
    unsafe fn store<V: F32Vec>(v: V, ptr: *mut Self);
}

// `bf16` and `f16` are `repr(transparent)` over their `u16` bit pattern, so
// their pointers are `u16` pointers.
impl Half for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        bf16_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        bf16::from_bits(f32_to_bf16(x))
    }
    #[inline(always)]
    unsafe fn load<V: F32Vec>(ptr: *const Self) -> V {
        // SAFETY: forwarded contract; same layout as u16.
        unsafe { V::load_bf16(ptr.cast()) }
    }
    #[inline(always)]
    unsafe fn store<V: F32Vec>(v: V, ptr: *mut Self) {
        // SAFETY: forwarded contract; same layout as u16.
        unsafe { v.store_bf16(ptr.cast()) }
    }
}

impl Half for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        f16::from_bits(f32_to_f16(x))
    }
    #[inline(always)]
    unsafe fn load<V: F32Vec>(ptr: *const Self) -> V {
        // SAFETY: forwarded contract; same layout as u16.
        unsafe { V::load_f16(ptr.cast()) }
    }
    #[inline(always)]
    unsafe fn store<V: F32Vec>(v: V, ptr: *mut Self) {
        // SAFETY: forwarded contract; same layout as u16.
        unsafe { v.store_f16(ptr.cast()) }
    }
}

/// A gradient element type and its exact `f32` value.
pub(crate) trait Exact: Copy + Send + Sync {
    /// The value as `f32` (exact: every bf16 and f16 is an f32).
    fn exact(self) -> f32;
    /// `V::LANES` values as `f32`, exactly.
    ///
    /// # Safety
    /// `ptr..ptr + V::LANES` readable.
    unsafe fn exact_lanes<V: F32Vec>(ptr: *const Self) -> V;
}

impl Exact for f32 {
    #[inline(always)]
    fn exact(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn exact_lanes<V: F32Vec>(ptr: *const Self) -> V {
        // SAFETY: forwarded from the caller.
        unsafe { V::load(ptr) }
    }
}

impl Exact for bf16 {
    #[inline(always)]
    fn exact(self) -> f32 {
        self.widen()
    }
    #[inline(always)]
    unsafe fn exact_lanes<V: F32Vec>(ptr: *const Self) -> V {
        // SAFETY: forwarded from the caller.
        unsafe { <bf16 as Half>::load(ptr) }
    }
}

impl Exact for f16 {
    #[inline(always)]
    fn exact(self) -> f32 {
        self.widen()
    }
    #[inline(always)]
    unsafe fn exact_lanes<V: F32Vec>(ptr: *const Self) -> V {
        // SAFETY: forwarded from the caller.
        unsafe { <f16 as Half>::load(ptr) }
    }
}

/// An element type a fused lane loop reads and writes in place: `f32` as
/// it is, the 16-bit formats through their exact widening and their
/// round-to-nearest-even narrowing.
pub(crate) trait Elem: Copy + Send + Sync {
    /// Loads `V::LANES` values as `f32`.
    ///
    /// # Safety
    /// `ptr..ptr + V::LANES` readable.
    unsafe fn get<V: F32Vec>(ptr: *const Self) -> V;
    /// Stores `V::LANES` values.
    ///
    /// # Safety
    /// `ptr..ptr + V::LANES` writable.
    unsafe fn put<V: F32Vec>(v: V, ptr: *mut Self);
    /// Stores `V::LANES` values rounded stochastically (`f32` stores them as
    /// they are): lane `l` is the element whose index xor the key gives
    /// `lo ^ l` in the low half and `hi` in the high half (the first lane's
    /// index is a multiple of `V::LANES`).
    ///
    /// # Safety
    /// `ptr..ptr + V::LANES` writable.
    unsafe fn put_stochastic<V: F32Vec>(v: V, ptr: *mut Self, lo: u32, hi: u32);
    /// One value as [`put`](Elem::put) stores it (rounded to nearest even;
    /// `f32` as it is): the scalar tails of the lane loops.
    fn put_one(x: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn get<V: F32Vec>(ptr: *const Self) -> V {
        // SAFETY: forwarded contract.
        unsafe { V::load(ptr) }
    }
    #[inline(always)]
    unsafe fn put<V: F32Vec>(v: V, ptr: *mut Self) {
        // SAFETY: forwarded contract.
        unsafe { v.store(ptr) }
    }
    #[inline(always)]
    unsafe fn put_stochastic<V: F32Vec>(v: V, ptr: *mut Self, _: u32, _: u32) {
        // SAFETY: forwarded contract.
        unsafe { v.store(ptr) }
    }
    #[inline(always)]
    fn put_one(x: f32) -> Self {
        x
    }
}

impl Elem for bf16 {
    #[inline(always)]
    unsafe fn get<V: F32Vec>(ptr: *const Self) -> V {
        // SAFETY: forwarded contract.
        unsafe { <bf16 as Half>::load(ptr) }
    }
    #[inline(always)]
    unsafe fn put<V: F32Vec>(v: V, ptr: *mut Self) {
        // SAFETY: forwarded contract.
        unsafe { <bf16 as Half>::store(v, ptr) }
    }
    #[inline(always)]
    unsafe fn put_stochastic<V: F32Vec>(v: V, ptr: *mut Self, lo: u32, hi: u32) {
        // SAFETY: forwarded contract; bf16 is a transparent u16.
        unsafe { v.store_bf16_stochastic(ptr.cast(), lo, hi) }
    }
    #[inline(always)]
    fn put_one(x: f32) -> Self {
        Half::narrow(x)
    }
}

impl Elem for f16 {
    #[inline(always)]
    unsafe fn get<V: F32Vec>(ptr: *const Self) -> V {
        // SAFETY: forwarded contract.
        unsafe { <f16 as Half>::load(ptr) }
    }
    #[inline(always)]
    unsafe fn put<V: F32Vec>(v: V, ptr: *mut Self) {
        // SAFETY: forwarded contract.
        unsafe { <f16 as Half>::store(v, ptr) }
    }
    /// Round to nearest: stochastic rounding of `f16` parameters is refused
    /// with a typed error before any step reaches the lanes, so this only
    /// keeps the loop total.
    #[inline(always)]
    unsafe fn put_stochastic<V: F32Vec>(v: V, ptr: *mut Self, _: u32, _: u32) {
        // SAFETY: forwarded contract.
        unsafe { <f16 as Half>::store(v, ptr) }
    }
    #[inline(always)]
    fn put_one(x: f32) -> Self {
        Half::narrow(x)
    }
}

/// `dst[i] = src[i].widen()`, `V::LANES` at a time, the tail with `f32`.
#[inline(always)]
pub(crate) fn widen<V: F32Vec, H: Half>(src: &[H], dst: &mut [f32]) {
    let n = src.len();
    assert_eq!(n, dst.len(), "tile lengths are equal by construction");
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + V::LANES <= n {
        // SAFETY: i + LANES <= n, the length of both slices.
        unsafe { H::load::<V>(s.add(i)).store(d.add(i)) };
        i += V::LANES;
    }
    for j in i..n {
        dst[j] = src[j].widen();
    }
}

/// `dst[i] = H::narrow(src[i])`, `V::LANES` at a time, the tail with `f32`.
#[inline(always)]
pub(crate) fn narrow<V: F32Vec, H: Half>(src: &[f32], dst: &mut [H]) {
    let n = src.len();
    assert_eq!(n, dst.len(), "tile lengths are equal by construction");
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + V::LANES <= n {
        // SAFETY: i + LANES <= n, the length of both slices.
        unsafe { H::store::<V>(V::load(s.add(i)), d.add(i)) };
        i += V::LANES;
    }
    for j in i..n {
        dst[j] = H::narrow(src[j]);
    }
}

/// How `bf16` parameters are rounded after each update.
///
/// Round to nearest loses every update smaller than half a `bf16` ulp of the
/// parameter (2^-9 relative): a long run at a small learning rate stalls.
/// Stochastic rounding rounds up with probability equal to the fraction of
/// the ulp the value lies past the lower neighbour, so the rounding is
/// unbiased and small updates accumulate in expectation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ParamRounding {
    /// Round to nearest, ties to even (torch's `bfloat16` rounding).
    #[default]
    Nearest,
    /// Stochastic rounding with a deterministic, counter-based random
    /// stream keyed by (`seed`, step, element index): see
    /// [`stochastic_bits`]. Stateless, so the same bits for any backend,
    /// thread count and chunk size, and a run resumed from a checkpoint
    /// (which holds the step) continues the same stream.
    Stochastic {
        /// The stream's seed (give each tensor its own to decorrelate them).
        seed: u64,
        /// The index of the buffers' first element in the whole tensor, for
        /// a caller that steps a tensor in pieces (a multiple of [`TILE`]);
        /// 0 for a whole tensor.
        offset: u64,
    },
}

/// splitmix64's output function (Steele, Lea and Flood, 2014), a
/// bijection on `u64`.
#[inline(always)]
const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of step `t`'s stream: `splitmix64(splitmix64(seed) ^ t)`.
#[inline]
pub const fn stochastic_key(seed: u64, t: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ t)
}

/// The 16 random bits stochastic rounding adds below a `bf16`'s last bit,
/// for element `index` of step `t` with seed `seed` (`key` =
/// [`stochastic_key`]`(seed, t)`): with `lo`/`hi` the low and high 32 bits
/// of `index` and of `key`,
/// `fmix32(fmix32(index_lo ^ key_lo) ^ index_hi ^ key_hi) >> 16`.
/// For one key each round is a bijection of `index_lo`, so the elements of
/// one 2^32 span never share a 32-bit hash.
#[inline(always)]
pub const fn stochastic_bits(key: u64, index: u64) -> u32 {
    stream_bits(index as u32 ^ key as u32, (index >> 32) as u32 ^ (key >> 32) as u32)
}

/// `x` rounded to `bf16` stochastically with the random bits `r`
/// (`r < 2^16`): `(bits(x) + r) >> 16`, so `x` rounds away from zero with
/// probability (distance past the lower magnitude) / ulp. Values already in
/// `bf16` are unchanged; NaN becomes `0x7FC0` as in round to nearest; a
/// finite value within one ulp of the largest `bf16` may round to infinity.
#[inline(always)]
pub fn f32_to_bf16_stochastic(x: f32, r: u32) -> bf16 {
    bf16::from_bits(f32_to_bf16_stochastic_bits(x, r))
}

/// Narrows a tile of updated parameters stochastically: `src[j]` is
/// element `base + j` of the tensor. `base` is a multiple of [`TILE`] and
/// the tile at most [`TILE`] long (the driver splits at multiples of it), so
/// the index's high half is the same for the whole tile.
/// `V::LANES` at a time, the tail with `f32`.
#[inline(always)]
pub(crate) fn narrow_bf16_stochastic<V: F32Vec>(src: &[f32], dst: &mut [bf16], key: u64, base: u64) {
    debug_assert!(base.is_multiple_of(TILE as u64) && src.len() <= TILE);
    let n = src.len();
    assert_eq!(n, dst.len(), "tile lengths are equal by construction");
    let lo = (base as u32) ^ (key as u32);
    let hi = ((base >> 32) as u32) ^ ((key >> 32) as u32);
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut j = 0;
    while j + V::LANES <= n {
        // base's low 8 bits are zero and j < 256: base + j = base ^ j, and
        // j is a multiple of LANES, so lane l's index is base ^ (j ^ l).
        // SAFETY: j + LANES <= n, the length of both slices.
        unsafe { <bf16 as Elem>::put_stochastic(V::load(s.add(j)), d.add(j), lo ^ j as u32, hi) };
        j += V::LANES;
    }
    for (k, (d, &x)) in dst.iter_mut().zip(src).enumerate().skip(j) {
        *d = f32_to_bf16_stochastic(x, stream_bits(lo ^ k as u32, hi));
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
            f32::from_bits(0xffc0_0000), // x86's default NaN: negative
            f32::from_bits(0xff80_0001),
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
                // every NaN, whatever its sign or payload, to the positive quiet NaN
                assert_eq!(ours.to_bits(), 0x7e00);
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
    fn fast_quantization_is_the_reference_rule() {
        for map in [QMap::signed(), QMap::unsigned()] {
            assert!(map.one_jump);
            let check = |x: f32| {
                let want = reference_search(&map.search, x);
                assert_eq!(map.quantize_fast(x), want, "{x:e} ({:#x})", x.to_bits());
            };
            // a stride through every f32 in [-1, 1], by order key
            let (lo, hi) = (order_key(-1.0), order_key(1.0));
            let mut k = lo;
            while k <= hi {
                check(from_order_key(k));
                k += 251;
            }
            // every code, every jump, and their neighbours
            let jumps: Vec<f32> = (0..=u32::from(u16::MAX))
                .filter(|&k| map.quant.lut[k as usize] & 0x1_ffff < 0x1_0000)
                .map(|k| from_order_key(k << 16 | map.quant.lut[k as usize] & 0xffff))
                .collect();
            assert!(jumps.len() >= 200, "the dynamic maps' jumps fall inside buckets");
            for &c in map.table.code.iter().chain(&jumps) {
                for d in -3i32..=3 {
                    let x = from_order_key(order_key(c).wrapping_add_signed(d));
                    if (-1.0..=1.0).contains(&x) {
                        check(x);
                    }
                }
            }
        }
    }

    /// The arithmetic quantizer's scalar model ([`Q8Fast::code`]) against
    /// the rule, where the proof says it is exact: every code, every jump
    /// and their neighbours, and a stride through `[-1, 1]`; and it defers
    /// to the table rarely.
    #[test]
    fn dynamic_maps_have_an_exact_arithmetic_quantizer() {
        for map in [QMap::signed(), QMap::unsigned()] {
            let f = map.quant.fast.as_deref().expect("the dynamic maps allow the arithmetic quantizer");
            // the tables are what the builder makes from the map's jumps
            unchecked_quantizer(map);
            let (seen, deferred) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
            let check = |x: f32| {
                seen.set(seen.get() + 1);
                match f.code(x) {
                    Some(c) => assert_eq!(c, reference_search(&map.search, x), "{x:e} ({:#x})", x.to_bits()),
                    None => deferred.set(deferred.get() + 1),
                }
            };
            let (lo, hi) = (order_key(-1.0), order_key(1.0));
            let mut k = lo;
            while k <= hi {
                check(from_order_key(k));
                k += 4093;
            }
            let strided = (seen.get(), deferred.get());
            for j in 0..256 {
                for c in [map.search[j], map.table.code[j]] {
                    for d in -3i32..=3 {
                        let x = from_order_key(order_key(c).wrapping_add_signed(d));
                        if (-1.0..=1.0).contains(&x) {
                            check(x);
                        }
                    }
                }
            }
            // uniform values over a block's range: few lanes near an integer t
            let mut u = 0x9e37_79b9u32;
            for _ in 0..200_000 {
                u = u.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                check(f32::from(u as u16) / 32768.0 - 1.0);
            }
            assert!(strided.1 * 100 < strided.0, "{} of {} strided values deferred", strided.1, strided.0);
            let (seen, deferred) = (seen.get(), deferred.get());
            assert!(deferred * 50 < seen, "{deferred} of {seen} deferred");
        }
        // the jumps of a map with spacings that change at every code do
        // not fall in few segments: no arithmetic quantizer, the table serves
        let mut quadratic = [0f32; 256];
        for (i, c) in quadratic.iter_mut().enumerate() {
            let v = (i as f32 - 127.0) / 128.0;
            *c = v * v.abs();
        }
        quadratic[255] = 1.0;
        let map = QMap::from_code(quadratic).expect("a valid map");
        assert!(map.one_jump && map.quant.fast.is_none());
    }

    /// The dynamic maps' arithmetic quantizer, built but not yet
    /// self-checked (so the lanes under test are the ones the builder made).
    fn unchecked_quantizer(map: &QMap) -> Q8Quantizer {
        let fast = map.quant.fast.clone().expect("the dynamic maps allow the arithmetic quantizer");
        let rebuilt = build_fast(&jumps_of(map)).expect("rebuilt");
        assert_eq!(format!("{rebuilt:?}"), format!("{fast:?}"));
        Q8Quantizer { lut: map.quant.lut.clone(), fast: Some(Box::new(rebuilt)) }
    }

    /// A map's jumps, recovered from its table (every jump falls inside a
    /// bucket of the dynamic maps: checked).
    fn jumps_of(map: &QMap) -> [f32; 257] {
        let mut jump = [f32::INFINITY; 257];
        jump[0] = f32::NEG_INFINITY;
        let (lo, hi) = (order_key(-1.0) >> 16, order_key(1.0) >> 16);
        for k in lo..=hi {
            let e = map.quant.lut[k as usize];
            if e & 0x1_ffff < 0x1_0000 {
                jump[(e >> 24) as usize + 1] = from_order_key(k << 16 | e & 0xffff);
            } else if k > lo
                && map.quant.lut[k as usize - 1] >> 24 != e >> 24
                && map.quant.lut[k as usize - 1] & 0x1_ffff >= 0x1_0000
            {
                // a jump exactly at a bucket's start
                jump[(e >> 24) as usize] = from_order_key(k << 16);
            }
        }
        assert!(jump[1..256].iter().all(|j| j.is_finite()), "every jump found");
        jump
    }

    /// [`Q8Fast::code`], the lanes' scalar model, gives the rule's code (the
    /// table's, [`fast_quantization_is_the_reference_rule`]) where it does
    /// not defer, on every `f32` of magnitude in `[2^-30, 1]` (the cells
    /// that hold jumps) and every 97th below: the builder's proof, checked
    /// in full, on every machine.
    #[test]
    fn the_arithmetic_quantizer_model_is_exact_on_every_float() {
        use rayon::prelude::*;
        let (lo, hi) = (order_key(-1.0), order_key(1.0) + 1);
        let (tiny_lo, tiny_hi) = (order_key(-(2f32.powi(-30))) + 1, order_key(2f32.powi(-30)));
        const CHUNK: u32 = 1 << 22;
        for map in [QMap::signed(), QMap::unsigned()] {
            let f = map.quant.fast.as_deref().expect("the dynamic maps allow the arithmetic quantizer");
            let deferred: u64 = (0..(hi - lo).div_ceil(CHUNK))
                .into_par_iter()
                .map(|c| {
                    let start = lo + c * CHUNK;
                    let mut deferred = 0;
                    for k in start..start + CHUNK.min(hi - start) {
                        if (tiny_lo..tiny_hi).contains(&k) && k % 97 != 0 {
                            continue;
                        }
                        let y = from_order_key(k);
                        match f.code(y) {
                            Some(got) => {
                                let want = q8_code(&map.quant.lut, y);
                                assert_eq!(got, want, "{y:e} ({:#x})", y.to_bits());
                            }
                            None => deferred += 1,
                        }
                    }
                    deferred
                })
                .sum();
            assert!(deferred < u64::from(hi - lo - (tiny_hi - tiny_lo)) / 100, "{deferred} deferred");
        }
    }

    /// The AVX-512 lanes ([`Q8Fast`]) give the table's code for every `f32`
    /// in `[-1, 1]` and NaN, for both dynamic maps (the table's lanes are
    /// [`q8_code`], checked by `simd`'s lane tests and against the rule above).
    #[test]
    fn avx512_quantizes_every_float_as_the_table() {
        use rayon::prelude::*;
        if !crate::Backend::available().contains(&crate::Backend::Avx512) {
            return;
        }
        let (lo, hi) = (order_key(-1.0), order_key(1.0) + 1);
        const CHUNK: u32 = 1 << 22;
        for map in [QMap::signed(), QMap::unsigned()] {
            let quant = &unchecked_quantizer(map);
            (0..(hi - lo).div_ceil(CHUNK)).into_par_iter().for_each(|c| {
                let start = lo + c * CHUNK;
                let len = CHUNK.min(hi - start);
                let mut x: Vec<f32> = (start..start + len).map(from_order_key).collect();
                x.push(f32::NAN);
                let (got, want) =
                    crate::simd::dispatch(crate::Backend::Avx512, FastAndTable { quant, x: &x, absmax: 1.0 });
                assert_eq!((got.len(), want.len()), (x.len() - x.len() % 16, x.len() - x.len() % 16));
                if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
                    panic!("{:e} ({:#x}): {} against the table's {}", x[i], x[i].to_bits(), got[i], want[i]);
                }
            });
            // and the self-check let the maps keep it
            assert!(map.quant.fast.is_some());
        }
    }

    /// The AVX-512 lanes against the table where their pipeline and their
    /// shortcuts could go wrong: every length from 0 to 80 (the pipeline's
    /// first and last vectors), and in each vector a NaN of either sign, `-0.0`,
    /// infinities, values beyond `[-1, 1]` and negative values at every
    /// lane among ordinary ones, for both dynamic maps run both ways (all
    /// cells loaded, and positive cells only) and several absmax values.
    #[test]
    fn avx512_quantizer_settles_special_lanes_as_the_table() {
        if !crate::Backend::available().contains(&crate::Backend::Avx512) {
            return;
        }
        let specials = [f32::NAN, -f32::NAN, -0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY, 3.5, -2.0, -0.3, -1e-30];
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for map in [QMap::signed(), QMap::unsigned()] {
            for positive in [false, true] {
                let mut quant = unchecked_quantizer(map);
                quant.fast.as_mut().expect("built").positive = positive;
                for absmax in [1.0f32, 0.37, 3e-7, 0.0] {
                    for n in 0..=80usize {
                        for &special in &specials {
                            let at = (next() % 80) as usize;
                            let mut x: Vec<f32> = (0..n)
                                .map(|_| {
                                    let r = next();
                                    let v = ((r >> 11) % 20001) as f32 / 10000.0 - 1.0;
                                    // mostly the map's own sign, at every magnitude
                                    let v = if map.code()[0] >= 0.0 && !r.is_multiple_of(4) { v.abs() } else { v };
                                    v * absmax * 2f32.powi(-((r % 23) as i32))
                                })
                                .collect();
                            if at < n {
                                x[at] = special;
                            }
                            let (got, want) = crate::simd::dispatch(
                                crate::Backend::Avx512,
                                FastAndTable { quant: &quant, x: &x, absmax },
                            );
                            assert_eq!((got.len(), want.len()), (n - n % 16, n - n % 16));
                            assert_eq!(
                                got, want,
                                "n {n}, special {special} at {at}, absmax {absmax}, positive {positive}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A xorshift stream from `seed` (the tests' random values).
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// The SIMD block quantizer and dequantizer of `V` against the scalar
    /// instantiation, bit for bit: codes, absmax and values, on blocks of
    /// every shape a step meets (full and short, zeros, NaN, subnormals,
    /// mixed magnitudes).
    fn tiles_match_scalar<V: F32Vec>() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for case in 0..400 {
            let len = [256, 255, 17, 1, 240, 129][case % 6];
            let mut x: Vec<f32> = (0..len)
                .map(|_| {
                    let r = next();
                    let mag = 2f32.powi((r % 60) as i32 - 45);
                    (((r >> 8) % 2001) as f32 / 1000.0 - 1.0) * mag
                })
                .collect();
            match case % 9 {
                1 => x.iter_mut().for_each(|v| *v = 0.0),
                2 => x[len / 2] = f32::NAN,
                3 => x.iter_mut().for_each(|v| *v = f32::from_bits(v.to_bits() & 0x807f_ffff)),
                4 => x.iter_mut().step_by(3).for_each(|v| *v = -0.0),
                _ => {}
            }
            for map in [QMap::signed(), QMap::unsigned()] {
                let (mut c0, mut c1) = (vec![0u8; len], vec![0u8; len]);
                let a0 = quantize::<f32>(&x, map, &mut c0);
                let a1 = quantize::<V>(&x, map, &mut c1);
                assert_eq!(a0.to_bits(), a1.to_bits(), "absmax, case {case}");
                assert_eq!(c0, c1, "codes, case {case}");
                let (mut d0, mut d1) = (vec![0f32; len], vec![0f32; len]);
                dequantize::<f32>(&c0, a0, map, &mut d0);
                dequantize::<V>(&c0, a0, map, &mut d1);
                assert!(d0.iter().zip(&d1).all(|(a, b)| a.to_bits() == b.to_bits()), "values, case {case}");
                let h: Vec<bf16> = x.iter().map(|&v| bf16::narrow(v)).collect();
                let mut hb = vec![bf16::ZERO; len];
                narrow::<V, bf16>(&x, &mut hb);
                assert!(h.iter().zip(&hb).all(|(a, b)| a.to_bits() == b.to_bits()), "bf16 tile, case {case}");
                let mut w = vec![0f32; len];
                widen::<V, bf16>(&h, &mut w);
                assert!(w.iter().zip(&h).all(|(a, b)| a.to_bits() == b.widen().to_bits()));
                let hf: Vec<f16> = x.iter().map(|&v| f16::narrow(v)).collect();
                let mut hfb = vec![f16::ZERO; len];
                narrow::<V, f16>(&x, &mut hfb);
                assert!(hf.iter().zip(&hfb).all(|(a, b)| a.to_bits() == b.to_bits()), "f16 tile, case {case}");
            }
        }
    }

    /// [`tiles_match_scalar`] as a lane op, run through the crate's dispatch.
    struct Tiles;
    impl crate::simd::LaneOp for Tiles {
        type Out = ();
        fn run<V: F32Vec>(self) {
            tiles_match_scalar::<V>()
        }
    }

    #[test]
    fn simd_tiles_match_scalar() {
        for b in crate::Backend::available() {
            crate::simd::dispatch(b, Tiles);
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
