//! Work sharing for a step's many small pieces, with the calling thread
//! working from the start.
//!
//! Measured on this project's 2-core machine: a rayon `install` +
//! `par_iter` over the 194 (empty) pieces of a 194-tensor model cost about
//! 200 µs per step, the time for the calling thread to hand the job over and
//! for sleeping pool threads to wake (futex round trips), before any work.
//! That was a third of the whole Python `step()` at that size. Here the
//! caller starts on the pieces at once; one job per further pool thread
//! joins in when its thread is up, taking pieces from the same counter. The
//! caller never waits for a helper that has not started: a helper that
//! starts after the caller closed the work leaves without touching it. A
//! helper that is inside the work is waited for (it finishes the piece it
//! holds). Which thread steps a piece does not change its bits: each piece
//! is stepped on its own. A panic in the work reaches the caller, from
//! whichever thread (as with rayon's parallel iterators), after every
//! helper has left the work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

/// The pool to take helpers from: the package's own, or rayon's global one.
pub(crate) fn helpers(pool: Option<&rayon::ThreadPool>) -> usize {
    pool.map_or_else(rayon::current_num_threads, rayon::ThreadPool::current_num_threads).saturating_sub(1)
}

/// What a caller and its helpers share.
struct Shared {
    /// The next index to claim.
    next: AtomicUsize,
    /// Indices `0..n` are the work.
    n: usize,
    /// Helpers inside [`help`]'s work loop (or about to check `closed`).
    active: AtomicUsize,
    /// Set by the caller once it has run out of indices.
    closed: AtomicBool,
    /// The work, its lifetime erased: valid while the caller is inside
    /// [`share`], which outlasts every helper that found `closed` unset.
    work: *const (dyn Fn(usize) + Sync),
    /// A panic in a helper's call of the work, raised again by the caller
    /// (as rayon's own parallel iterators do; a panic left in a spawned job
    /// would abort the process).
    panic: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `work` points to a `Sync` closure, only called (by shared
// reference) while the caller keeps it alive (see `Shared::work`); the other
// fields are atomics.
unsafe impl Send for Shared {}
// SAFETY: as for `Send`.
unsafe impl Sync for Shared {}

fn claim_all(sh: &Shared, work: &(dyn Fn(usize) + Sync)) {
    loop {
        let i = sh.next.fetch_add(1, SeqCst);
        if i >= sh.n {
            return;
        }
        work(i);
    }
}

fn help(sh: &Shared) {
    sh.active.fetch_add(1, SeqCst);
    if !sh.closed.load(SeqCst) {
        // SAFETY: `closed` was unset after this helper counted itself
        // active (both SeqCst), so the caller has not yet seen `active`
        // reach 0 and is still inside `share`, keeping `work` alive until
        // this helper leaves (the `fetch_sub` below).
        let work = unsafe { &*sh.work };
        let run = std::panic::AssertUnwindSafe(|| claim_all(sh, work));
        if let Err(payload) = std::panic::catch_unwind(run) {
            sh.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(payload);
        }
    }
    sh.active.fetch_sub(1, SeqCst);
}

/// Calls `work(i)` once for every `i` in `0..n`, on this thread and on up to
/// [`helpers`] pool threads; returns when every call has returned.
pub(crate) fn share(pool: Option<&rayon::ThreadPool>, n: usize, work: &(dyn Fn(usize) + Sync)) {
    let extra = helpers(pool).min(n.saturating_sub(1));
    if extra == 0 {
        (0..n).for_each(work);
        return;
    }
    // SAFETY (of the lifetime erasure): helpers dereference `work` only as
    // `help` describes, while this function has not returned.
    let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(work) };
    let sh = Arc::new(Shared {
        next: AtomicUsize::new(0),
        n,
        active: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        work: erased,
        panic: std::sync::Mutex::new(None),
    });
    for _ in 0..extra {
        let sh = Arc::clone(&sh);
        match pool {
            Some(pool) => pool.spawn(move || help(&sh)),
            None => rayon::spawn(move || help(&sh)),
        }
    }
    // Closes the work and waits for the helpers inside it when this
    // function leaves, by returning or by a panic in `work` (which must not
    // free the closure under a helper still calling it).
    let close = Close(&sh);
    claim_all(&sh, work);
    drop(close);
    if let Some(payload) = sh.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
        std::panic::resume_unwind(payload);
    }
}

/// See [`share`].
struct Close<'a>(&'a Shared);

impl Drop for Close<'_> {
    fn drop(&mut self) {
        self.0.closed.store(true, SeqCst);
        // Helpers inside the work finish the piece they hold; no new one enters.
        let mut spins = 0u32;
        while self.0.active.load(SeqCst) != 0 {
            spins += 1;
            if spins < 1 << 10 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn every_index_once() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for pool in [Some(&pool), None] {
            for n in [0, 1, 2, 5, 194, 1000] {
                let seen = Mutex::new(vec![0u32; n]);
                share(pool, n, &|i| {
                    // Long enough that helpers wake up and take some.
                    std::thread::sleep(std::time::Duration::from_micros(20));
                    lock(&seen)[i] += 1
                });
                assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1), "n = {n}");
            }
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap()
    }

    #[test]
    fn a_panic_reaches_the_caller_whichever_thread_ran_it() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for bad in [0, 1, 50, 99] {
            let done = AtomicUsize::new(0);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                share(Some(&pool), 100, &|i| {
                    std::thread::sleep(std::time::Duration::from_micros(20));
                    assert!(i != bad, "index {i}");
                    done.fetch_add(1, SeqCst);
                })
            }));
            // Raised here, not an abort of the process (a panic left in a
            // rayon job aborts). Which other indices ran depends on timing.
            assert!(r.is_err(), "bad = {bad}");
            assert!(done.load(SeqCst) < 100);
        }
    }

    #[test]
    fn returns_with_helpers_still_queued() {
        // Both pool threads busy: the helpers cannot start, and the caller
        // does all the work alone and returns without waiting for them.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        let started = std::sync::Barrier::new(3);
        pool.in_place_scope(|s| {
            for _ in 0..2 {
                s.spawn(|_| {
                    started.wait();
                    let _ = lock(&rx).recv();
                });
            }
            started.wait();
            let count = AtomicUsize::new(0);
            share(Some(&pool), 100, &|_| {
                count.fetch_add(1, SeqCst);
            });
            assert_eq!(count.load(SeqCst), 100);
            tx.send(()).unwrap();
            tx.send(()).unwrap();
        });
    }
}
