//! Backends (instruction sets) and their runtime detection: the bottom
//! layer, importing nothing of the crate. The execution policy that picks one
//! is in `exec`.

use std::sync::OnceLock;

/// An implementation of the per-element formulas.
///
/// All backends compute the same IEEE-754 operations in the same order (a
/// fused multiply-add exactly where a formula asks for one, as torch fuses;
/// no approximate reciprocals), so they are bitwise identical to
/// [`Backend::Scalar`] on every non-NaN result: 0 ULP per step. Code reaches a
/// backend's lanes only through the crate's one dispatch, which enters the
/// AVX2 and AVX-512 lanes only with a token that runtime detection made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Backend {
    /// Plain `f32` arithmetic, one element at a time: the reference.
    Scalar,
    /// `wide::f32x8`: portable SIMD chosen at compile time (two SSE2 registers
    /// in a default x86-64 build).
    Wide,
    /// 8 lanes of AVX (`ymm`), selected at run time on CPUs with AVX2, FMA and F16C.
    Avx2,
    /// 16 lanes of AVX-512F (`zmm`), selected at run time.
    Avx512,
}

impl Backend {
    /// Every backend, slowest first.
    pub const ALL: [Backend; 4] = [Backend::Scalar, Backend::Wide, Backend::Avx2, Backend::Avx512];

    /// Short name used by tests, benches, reports and `ADAOPTIM_BACKEND`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            Backend::Wide => "wide",
            Backend::Avx2 => "avx2",
            Backend::Avx512 => "avx512",
        }
    }

    /// Parses a [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Backend> {
        Backend::ALL.into_iter().find(|b| b.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether this CPU can run the backend (detected once, then cached).
    pub fn is_available(self) -> bool {
        match self {
            Backend::Scalar | Backend::Wide => true,
            Backend::Avx2 => features().avx2,
            Backend::Avx512 => features().avx512,
        }
    }

    /// The backends this CPU can run, slowest first.
    pub fn available() -> Vec<Backend> {
        Backend::ALL.into_iter().filter(|b| b.is_available()).collect()
    }

    /// The fastest backend this CPU can run.
    pub fn best() -> Backend {
        if Backend::Avx512.is_available() {
            Backend::Avx512
        } else if Backend::Avx2.is_available() {
            Backend::Avx2
        } else {
            Backend::Wide
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy)]
struct Features {
    avx2: bool,
    avx512: bool,
}

fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            Features {
                avx2: std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c"),
                avx512: std::arch::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Features { avx2: false, avx512: false }
        }
    })
}
