//! The execution policy a caller can force: which backend (or the default,
//! from `ADAOPTIM_BACKEND`), and how a step is split across threads.

use std::sync::OnceLock;

use crate::Error;
use crate::backend::Backend;

impl Backend {
    /// The backend [`Exec::auto`] uses: `ADAOPTIM_BACKEND` if it is set (read
    /// once per process), else [`Backend::best`].
    ///
    /// # Errors
    /// [`Error::UnknownBackend`] if the variable names no backend;
    /// [`Error::BackendUnavailable`] if it names one this CPU cannot run.
    pub fn default_backend() -> Result<Backend, Error> {
        static FROM_ENV: OnceLock<Result<Backend, Error>> = OnceLock::new();
        FROM_ENV
            .get_or_init(|| match std::env::var("ADAOPTIM_BACKEND") {
                Ok(v) if !v.trim().is_empty() && v.trim() != "auto" => match Backend::from_name(&v) {
                    Some(b) if b.is_available() => Ok(b),
                    Some(b) => Err(Error::BackendUnavailable { backend: b }),
                    None => Err(Error::UnknownBackend { name: v }),
                },
                _ => Ok(Backend::best()),
            })
            .clone()
    }
}

/// How a step is split across threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Parallel {
    /// Serial with one rayon thread, or below [`PAR_THRESHOLD`] elements
    /// ([`PAR_THRESHOLD_INSIDE`] when called from inside a rayon pool, where
    /// no thread has to be woken); otherwise chunks of at least [`AUTO_GRAIN`]
    /// elements across the current rayon pool.
    Auto,
    /// Always on the calling thread.
    Serial,
    /// Always through rayon, in chunks of `chunk` elements (rounded up to a
    /// multiple of 16, the widest lane count; 0 means the automatic grain).
    Chunks {
        /// Elements per chunk.
        chunk: usize,
    },
}

/// Below this many elements, [`Parallel::Auto`] called from outside a rayon
/// pool stays on the calling thread. Handing work to a sleeping pool costs
/// tens of microseconds (measured on the 2-core machine: Adam at 128K
/// parameters took 46 us through rayon against 39 us serial; at 256K, 71 us
/// against 88 us).
pub const PAR_THRESHOLD: usize = 1 << 18;
/// The same threshold when the caller already runs on a rayon worker (inside
/// `ThreadPool::install` or a parallel iterator), where splitting is cheap.
pub const PAR_THRESHOLD_INSIDE: usize = 1 << 15;
/// Smallest chunk [`Parallel::Auto`] hands to a thread.
pub const AUTO_GRAIN: usize = 1 << 14;

/// The execution policy of a step: which backend, how parallel.
///
/// Results do not depend on the policy: every backend, thread count and chunk
/// size gives the same bits (NaN payloads aside).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exec {
    /// `None`: [`Backend::default_backend`]. `Some(b)`: force `b` (an error
    /// if this CPU cannot run it).
    pub backend: Option<Backend>,
    /// Thread splitting.
    pub parallel: Parallel,
}

impl Default for Exec {
    fn default() -> Self {
        Exec::auto()
    }
}

impl Exec {
    /// Best backend, automatic parallelism.
    pub const fn auto() -> Exec {
        Exec { backend: None, parallel: Parallel::Auto }
    }
    /// The scalar reference on the calling thread.
    pub const fn scalar() -> Exec {
        Exec { backend: Some(Backend::Scalar), parallel: Parallel::Serial }
    }
    /// A given backend on the calling thread.
    pub const fn serial(backend: Backend) -> Exec {
        Exec { backend: Some(backend), parallel: Parallel::Serial }
    }
    /// A given backend, always through rayon in chunks of `chunk` elements.
    pub const fn parallel(backend: Backend, chunk: usize) -> Exec {
        Exec { backend: Some(backend), parallel: Parallel::Chunks { chunk } }
    }

    /// The backend this policy runs.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] for a forced backend this CPU lacks, or
    /// the error of [`Backend::default_backend`].
    pub fn resolve_backend(&self) -> Result<Backend, Error> {
        match self.backend {
            Some(b) if b.is_available() => Ok(b),
            Some(b) => Err(Error::BackendUnavailable { backend: b }),
            None => Backend::default_backend(),
        }
    }

    /// Chunk size for `n` elements, or `None` to stay serial.
    pub(crate) fn chunk_for(&self, n: usize) -> Option<usize> {
        // A multiple of 16 (the widest lane count); a chunk past the largest
        // one is the largest one (it holds any slice, so the step is serial
        // in effect).
        let round = |c: usize| c.max(1).checked_next_multiple_of(16).unwrap_or(usize::MAX / 16 * 16);
        match self.parallel {
            Parallel::Serial => None,
            Parallel::Chunks { chunk: 0 } => Some(auto_chunk(n)),
            Parallel::Chunks { chunk } => Some(round(chunk)),
            Parallel::Auto => {
                let threads = rayon::current_num_threads();
                let threshold =
                    if rayon::current_thread_index().is_some() { PAR_THRESHOLD_INSIDE } else { PAR_THRESHOLD };
                if n < threshold || threads < 2 { None } else { Some(auto_chunk(n)) }
            }
        }
    }
}

/// About four chunks per thread (load balance on a shared machine), never
/// smaller than [`AUTO_GRAIN`], always a multiple of 64 elements.
fn auto_chunk(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let c = n.div_ceil(threads * 4).max(AUTO_GRAIN);
    c.div_ceil(64) * 64
}
