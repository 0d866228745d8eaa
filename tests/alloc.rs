//! `step` allocates nothing after construction: a counting global allocator
//! watches every optimizer's step, serial and parallel.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use adaoptim::{Backend, Exec};
use common::configs::variety;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One test in this binary, so no other test allocates while it counts.
#[test]
fn step_does_not_allocate() {
    // The counter does see allocations.
    let before = ALLOCS.load(Ordering::SeqCst);
    let v = std::hint::black_box(vec![1u8; 10]);
    assert!(ALLOCS.load(Ordering::SeqCst) > before);
    drop(v);

    let n = 100_000;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for ((name, cfg), guarded) in variety().into_iter().flat_map(|v| [(v, false), (v, true)]) {
        for exec in [Exec::scalar(), Exec::serial(Backend::best()), Exec::parallel(Backend::best(), 4096), Exec::auto()]
        {
            let mut opt = cfg.build(n).unwrap();
            opt.set_exec(exec);
            // Guarded: clipping (the norm pass), a loss scale, SkipStep.
            if guarded {
                opt.set_max_grad_norm(Some(1.0)).unwrap();
                opt.set_grad_scale(Some(3.0)).unwrap();
                opt.set_non_finite(adaoptim::NonFinitePolicy::SkipStep);
            }
            let mut p = vec![0.5f32; n];
            let g = vec![0.25f32; n];
            pool.install(|| {
                // Warm-up: the first cross-thread call may set up rayon's
                // thread-local latches.
                opt.step(&mut p, &g).unwrap();
                let before = ALLOCS.load(Ordering::SeqCst);
                for _ in 0..5 {
                    opt.step(&mut p, &g).unwrap();
                }
                let after = ALLOCS.load(Ordering::SeqCst);
                assert_eq!(after, before, "{name} guarded={guarded} {exec:?}: step allocated {} times", after - before);
            });
        }
    }
}
