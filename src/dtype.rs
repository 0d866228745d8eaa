//! The storage types of buffers, named for errors and checkpoints (the
//! bottom layer: it imports nothing; [`storage`](crate::storage) re-exports it).

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
    /// Block-wise 8-bit codes ([`Q8State`](crate::storage::Q8State)): one byte per element plus one
    /// `f32` absmax per block of [`Q8_BLOCK`](crate::storage::Q8_BLOCK).
    Q8,
}

impl Dtype {
    /// Bytes per element (8-bit states: the code byte; the absmax adds
    /// 4/256 of a byte).
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::Q8 => 1,
        }
    }

    /// The safetensors / torch name: `"F32"`, `"BF16"`, `"F16"`, `"U8"`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::Bf16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::Q8 => "U8",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
