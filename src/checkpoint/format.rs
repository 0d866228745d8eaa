//! The safetensors layer: a writer that gives the same bytes for the same
//! state, and a reader that checks format, version, kind, layout, step count
//! and per-tensor checksums before any tensor is used.

use std::borrow::Cow;
use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;

use super::bad;
use crate::{Error, MAX_STEP};

/// The `format` metadata value.
pub const FORMAT: &str = "adaoptim-optimizer";
/// The `format_version` this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The metadata key holding each tensor's CRC-32 (IEEE, as zlib's `crc32`):
/// a JSON object from tensor name to checksum.
pub const CHECKSUM_KEY: &str = "crc32";

/// One tensor of a checkpoint: shape, safetensors dtype name, element
/// size, little-endian bytes.
type Entry<'a> = (Vec<usize>, &'static str, usize, Cow<'a, [u8]>);

/// Builds a checkpoint: metadata and tensors (`F32`, and `BF16`/`U8` for
/// mixed-precision state), borrowed until [`finish`](Self::finish) writes
/// them out.
pub(crate) struct Writer<'a> {
    meta: BTreeMap<String, String>,
    tensors: BTreeMap<String, Entry<'a>>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(torch_class: &str, layout: &str, step: u64) -> Writer<'a> {
        let mut w = Writer { meta: BTreeMap::new(), tensors: BTreeMap::new() };
        w.meta("format", FORMAT);
        w.meta("format_version", FORMAT_VERSION);
        w.meta("torch_class", torch_class);
        w.meta("layout", layout);
        w.meta("step", step);
        w.scalar("step", step as f32);
        w
    }

    pub(crate) fn meta(&mut self, key: &str, value: impl ToString) {
        self.meta.insert(key.to_string(), value.to_string());
    }

    /// Adds a caller's extra metadata entries, none of which may be a key
    /// the checkpoint itself uses (one it already has, or the checksum
    /// key); nothing is added then.
    pub(crate) fn extra_meta(&mut self, extra: &[(&str, String)]) -> Result<(), Error> {
        if let Some((k, _)) = extra.iter().find(|(k, _)| *k == CHECKSUM_KEY || self.meta.contains_key(*k)) {
            return Err(bad(format!("metadata key {k:?} is the checkpoint's own")));
        }
        for (k, v) in extra {
            self.meta(k, v);
        }
        Ok(())
    }

    pub(crate) fn tensor(&mut self, name: impl Into<String>, shape: Vec<usize>, data: &'a [f32]) {
        self.tensors.insert(name.into(), (shape, "F32", 4, le_bytes(data)));
    }

    /// A `BF16` tensor.
    pub(crate) fn tensor_bf16(&mut self, name: impl Into<String>, shape: Vec<usize>, data: &'a [half::bf16]) {
        let bytes = data.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
        self.tensors.insert(name.into(), (shape, "BF16", 2, Cow::Owned(bytes)));
    }

    /// A `U8` tensor.
    pub(crate) fn tensor_u8(&mut self, name: impl Into<String>, shape: Vec<usize>, data: &'a [u8]) {
        self.tensors.insert(name.into(), (shape, "U8", 1, Cow::Borrowed(data)));
    }

    pub(crate) fn scalar(&mut self, name: impl Into<String>, x: f32) {
        self.tensors.insert(name.into(), (vec![], "F32", 4, Cow::Owned(x.to_le_bytes().to_vec())));
    }

    /// The file's bytes. The header is written here rather than by the
    /// `safetensors` crate, whose metadata map is a `HashMap` serialized in
    /// a different order on every call: here metadata keys and tensors are
    /// in name order, so the same state always gives the same bytes. The
    /// result is plain safetensors (tensors in name order, which is the
    /// order `safetensors` itself uses for tensors of one dtype).
    pub(crate) fn finish(mut self) -> Result<Vec<u8>, Error> {
        let mut sums = serde_json::Map::new();
        for (name, (shape, _, size, data)) in &self.tensors {
            if shape.iter().try_fold(*size, |a, &b| a.checked_mul(b)) != Some(data.len()) {
                return Err(bad(format!("tensor {name:?}: shape {shape:?} does not hold {} bytes", data.len())));
            }
            sums.insert(name.clone(), Value::from(crc32fast::hash(data)));
        }
        self.meta.insert(CHECKSUM_KEY.to_string(), Value::Object(sums).to_string());
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".to_string(),
            Value::from(serde_json::Map::from_iter(
                self.meta.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))),
            )),
        );
        let mut offset = 0usize;
        for (name, (shape, dtype, _, data)) in &self.tensors {
            let end = offset + data.len();
            let info = serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]});
            header.insert(name.clone(), info);
            offset = end;
        }
        // `serde_json::Map` keeps keys sorted (or, with `preserve_order`,
        // in insertion order, which is sorted here too); `__metadata__`
        // sorts before every tensor name that starts with a letter, and its
        // place does not matter to readers.
        let mut text = Value::Object(header).to_string().into_bytes();
        text.resize(text.len().next_multiple_of(8), b' ');
        let mut out = Vec::with_capacity(8 + text.len() + offset);
        out.extend_from_slice(&(text.len() as u64).to_le_bytes());
        out.extend_from_slice(&text);
        for (_, _, _, data) in self.tensors.values() {
            out.extend_from_slice(data);
        }
        Ok(out)
    }
}

/// The little-endian bytes of `data`: a view on little-endian targets, a
/// copy elsewhere.
fn le_bytes(data: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: any initialized memory is valid as bytes; the slice covers
        // exactly the `4 * len` bytes of `data`, borrowed for as long as it.
        Cow::Borrowed(unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), 4 * data.len()) })
    } else {
        Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Reads and checks a checkpoint.
pub(crate) struct Reader<'a> {
    st: SafeTensors<'a>,
    meta: std::collections::HashMap<String, String>,
    /// The exact step count.
    pub(crate) step: u64,
}

impl<'a> Reader<'a> {
    /// Parses `bytes` and checks format, version, kind, layout, step count
    /// and (where the file has them) every tensor's checksum. The
    /// `safetensors` parser has already checked that the tensors tile the
    /// data exactly (no gap, no overlap, nothing past the end).
    pub(crate) fn open(bytes: &'a [u8], torch_class: &str, layout: &str) -> Result<Reader<'a>, Error> {
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
        let meta = metadata.metadata().clone().ok_or_else(|| bad("no metadata"))?;
        let mut r = Reader { st, meta, step: 0 };
        if r.meta("format")? != FORMAT {
            return Err(bad(format!("format is {:?}, expected {FORMAT:?}", r.meta("format")?)));
        }
        if r.meta("format_version")? != FORMAT_VERSION.to_string() {
            return Err(bad(format!(
                "format_version {:?} is not supported (this crate reads {FORMAT_VERSION})",
                r.meta("format_version")?
            )));
        }
        if r.meta("torch_class")? != torch_class {
            return Err(bad(format!("checkpoint holds {}, expected {torch_class}", r.meta("torch_class")?)));
        }
        if r.meta("layout")? != layout {
            return Err(bad(format!("checkpoint layout is {}, expected {layout}", r.meta("layout")?)));
        }
        r.check_sums()?;
        r.step = r.parse("step")?;
        if r.step > MAX_STEP {
            return Err(bad(format!("step count {} is beyond any reachable one ({MAX_STEP})", r.step)));
        }
        let step_tensor = r.scalar("step")?;
        if step_tensor != r.step as f32 {
            return Err(bad(format!("step tensor {step_tensor} disagrees with metadata step {}", r.step)));
        }
        Ok(r)
    }

    /// With a checksum table: exactly one entry per tensor, each matching.
    /// Files without one (written by torch) are read unchecked.
    fn check_sums(&self) -> Result<(), Error> {
        let Some(text) = self.meta.get(CHECKSUM_KEY) else {
            return Ok(());
        };
        let sums: serde_json::Map<String, Value> =
            serde_json::from_str(text).map_err(|_| bad(format!("{CHECKSUM_KEY} is not a JSON object")))?;
        if sums.len() != self.st.len() {
            return Err(bad(format!("{} checksums for {} tensors", sums.len(), self.st.len())));
        }
        for (name, want) in &sums {
            let t = self.st.tensor(name).map_err(|_| bad(format!("checksum for a missing tensor {name:?}")))?;
            let want = want.as_u64().ok_or_else(|| bad(format!("checksum of {name:?} is not a number")))?;
            if u64::from(crc32fast::hash(t.data())) != want {
                return Err(bad(format!("tensor {name:?} is corrupted (checksum mismatch)")));
            }
        }
        Ok(())
    }

    pub(crate) fn meta(&self, key: &str) -> Result<&str, Error> {
        self.meta.get(key).map(String::as_str).ok_or_else(|| bad(format!("metadata has no {key:?}")))
    }

    pub(crate) fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<T, Error> {
        self.meta(key)?.parse().map_err(|_| bad(format!("metadata {key:?} is not a number")))
    }

    pub(crate) fn json(&self, key: &str) -> Result<Value, Error> {
        serde_json::from_str(self.meta(key)?).map_err(|e| bad(format!("{key}: {e}")))
    }

    /// Exactly this many tensors (so nothing unexpected is silently ignored).
    pub(crate) fn expect_count(&self, n: usize) -> Result<(), Error> {
        if self.st.len() != n {
            return Err(bad(format!("{} tensors, expected {n}", self.st.len())));
        }
        Ok(())
    }

    /// An `F32` tensor of this shape, copied into `out` (of the tensor's
    /// element count).
    pub(crate) fn read_into(&self, name: &str, shape: &[usize], out: &mut [f32]) -> Result<(), Error> {
        let data = self.data(name, shape)?;
        if data.len() != 4 * out.len() {
            return Err(bad(format!("tensor {name:?} holds {} bytes, expected {} floats", data.len(), out.len())));
        }
        for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    fn data(&self, name: &str, shape: &[usize]) -> Result<&[u8], Error> {
        self.data_of(name, shape, Dtype::F32, 4)
    }

    /// The bytes of a tensor of this dtype (of `size` bytes per element) and shape.
    fn data_of(&self, name: &str, shape: &[usize], dtype: Dtype, size: usize) -> Result<&[u8], Error> {
        let t = self.st.tensor(name).map_err(|_| bad(format!("missing tensor {name:?}")))?;
        if t.dtype() != dtype {
            return Err(bad(format!("tensor {name:?} has dtype {:?}, expected {dtype:?}", t.dtype())));
        }
        if t.shape() != shape {
            return Err(bad(format!("tensor {name:?} has shape {:?}, expected {shape:?}", t.shape())));
        }
        let count = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).ok_or_else(|| bad("shape overflows"))?;
        if count.checked_mul(size) != Some(t.data().len()) {
            return Err(bad(format!("tensor {name:?} holds {} bytes, expected {count} of {dtype:?}", t.data().len())));
        }
        Ok(t.data())
    }

    /// A `BF16` tensor of this shape.
    pub(crate) fn bf16s(&self, name: &str, shape: &[usize]) -> Result<Vec<half::bf16>, Error> {
        let data = self.data_of(name, shape, Dtype::BF16, 2)?;
        Ok(data.chunks_exact(2).map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect())
    }

    /// A `U8` tensor of this shape.
    pub(crate) fn u8s(&self, name: &str, shape: &[usize]) -> Result<Vec<u8>, Error> {
        Ok(self.data_of(name, shape, Dtype::U8, 1)?.to_vec())
    }

    /// An `F32` tensor of this shape.
    pub(crate) fn f32s(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        let data = self.data(name, shape)?;
        Ok(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// The shape of a tensor.
    pub(crate) fn shape(&self, name: &str) -> Result<Vec<usize>, Error> {
        let t = self.st.tensor(name).map_err(|_| bad(format!("missing tensor {name:?}")))?;
        Ok(t.shape().to_vec())
    }

    /// An `F32` tensor as an aligned buffer (its size is backed by the
    /// file's data, checked before anything is allocated).
    pub(crate) fn buffer(&self, name: &str, shape: &[usize]) -> Result<crate::memory::Raw, Error> {
        let data = self.data(name, shape)?;
        let mut b = crate::memory::try_filled("state", data.len() / 4, 0.0).map_err(|e| bad(e.to_string()))?;
        self.read_into(name, shape, &mut b)?;
        Ok(b)
    }

    pub(crate) fn scalar(&self, name: &str) -> Result<f32, Error> {
        let mut x = [0.0];
        self.read_into(name, &[], &mut x)?;
        Ok(x[0])
    }
}

/// A checkpoint's metadata entries (its own, and any a caller added with
/// [`MultiOptimizer::to_safetensors_with`](crate::multi::MultiOptimizer::to_safetensors_with)).
/// Only the header is read; nothing is checked beyond its being
/// safetensors with metadata.
///
/// # Errors
/// [`Error::Checkpoint`] if the bytes are not safetensors with metadata.
pub fn metadata(bytes: &[u8]) -> Result<std::collections::HashMap<String, String>, Error> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
    metadata.metadata().clone().ok_or_else(|| bad("no metadata"))
}

/// The `torch_class` a checkpoint holds.
///
/// # Errors
/// [`Error::Checkpoint`] if the bytes are not a checkpoint of this format.
pub fn torch_class_of(bytes: &[u8]) -> Result<String, Error> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
    let meta = metadata.metadata().as_ref().ok_or_else(|| bad("no metadata"))?;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("not an {FORMAT} checkpoint")));
    }
    meta.get("torch_class").cloned().ok_or_else(|| bad("metadata has no \"torch_class\""))
}
