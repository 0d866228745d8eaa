//! Regression tests for the second reliability round: each finding of the
//! hostile-and-careless-user trial, which failed before its fix.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use adaoptim::groups::GroupedOptimizer;
use adaoptim::sparse::{RowWiseAdagrad, SparseAdagrad, SparseAdam, SparseAdamConfig};
use adaoptim::*;
use common::Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("adaoptim-rel-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Rewrites a checkpoint through the `safetensors` crate, as an outside
/// tool (or torch) would write it: `edit` changes the metadata and tensors;
/// the checksum table is dropped, as such a writer does not know it.
fn rewrite(
    bytes: &[u8],
    edit: impl FnOnce(&mut HashMap<String, String>, &mut Vec<(String, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap();
    meta.remove(CHECKSUM);
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec())).collect();
    edit(&mut meta, &mut tensors);
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, s, d)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), d).unwrap())).collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

const CHECKSUM: &str = adaoptim::checkpoint::CHECKSUM_KEY;

/// A checkpoint claiming `step` steps.
fn with_step(bytes: &[u8], step: u64) -> Vec<u8> {
    rewrite(bytes, |meta, tensors| {
        meta.insert("step".into(), step.to_string());
        let t = tensors.iter_mut().find(|t| t.0 == "step").unwrap();
        t.2 = (step as f32).to_le_bytes().to_vec();
    })
}

// 1. Concurrent saves to one path: each either succeeds atomically or
// fails without trace; the file is one complete checkpoint from an `Ok` save.
#[test]
fn concurrent_saves_to_one_path_never_lose_an_ok_save() {
    let dir = scratch_dir("concurrent");
    let path = dir.join("opt.safetensors");
    for round in 0..20 {
        let results: Vec<(f64, Result<(), Error>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|k| {
                    let path = &path;
                    s.spawn(move || {
                        let lr = (round * 10 + k + 1) as f64 * 1e-3;
                        let opt = Adam::new(AdamConfig { lr, ..Default::default() }, 4096).unwrap();
                        (lr, opt.save(path))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ok: Vec<f64> = results.iter().filter(|r| r.1.is_ok()).map(|r| r.0).collect();
        assert!(!ok.is_empty(), "round {round}: every save failed: {results:?}");
        let loaded = Adam::load(&path).unwrap();
        assert!(
            ok.contains(&loaded.lr()),
            "round {round}: the file holds lr {} from a failed save: {results:?}",
            loaded.lr()
        );
        assert_eq!(names_in(&dir), ["opt.safetensors"], "round {round}: a save left a trace");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// 2. A planted symlink at the old predictable temp name (or anywhere) is
// never written through.
#[cfg(unix)]
#[test]
fn a_planted_symlink_is_never_written_through() {
    let dir = scratch_dir("symlink");
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let path = dir.join("opt.safetensors");
    let planted = dir.join(format!(".opt.safetensors.tmp-{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    Adam::new(AdamConfig::default(), 8).unwrap().save(&path).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_file(), "the checkpoint is a regular file");
    // The link itself is not ours to remove.
    assert!(std::fs::symlink_metadata(&planted).is_ok());
    // A symlink that looks like one of our temp files is not followed either.
    let lookalike = dir.join(".opt.safetensors.abcdef.adaoptim-tmp");
    std::os::unix::fs::symlink(&victim, &lookalike).unwrap();
    Adam::new(AdamConfig::default(), 8).unwrap().save(&path).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    std::fs::remove_dir_all(&dir).unwrap();
}

// 3. Step counters: a checkpoint past the limit is refused; at the limit a
// step is a typed error that changes nothing (dense, grouped, sparse).
#[test]
fn step_counts_at_the_limit_are_errors_not_wraps() {
    let mut opt = Adam::new(AdamConfig::default(), 4).unwrap();
    let good = opt.to_safetensors().unwrap();
    for step in [u64::MAX, MAX_STEP + 1] {
        assert!(matches!(Adam::from_safetensors(&with_step(&good, step)), Err(Error::Checkpoint { .. })), "{step}");
    }
    let at_limit = with_step(&good, MAX_STEP);
    opt.restore(&at_limit).unwrap();
    let mut p = [1.0f32; 4];
    let before = opt.state_buffers().map(|b| b.to_vec()).collect::<Vec<_>>();
    assert_eq!(opt.step(&mut p, &[0.5; 4]), Err(Error::StepLimit { step: MAX_STEP }));
    assert_eq!(p, [1.0; 4]);
    assert_eq!(opt.step_count(), MAX_STEP);
    assert_eq!(opt.state_buffers().map(|b| b.to_vec()).collect::<Vec<_>>(), before);
    // The free kernel refuses a step number past the limit.
    let mut s = [vec![0.0f32; 4], vec![0.0f32; 4]];
    let [a, b] = &mut s;
    let r = step_slices(&AdamConfig::default(), MAX_STEP + 1, &mut (), &mut p, &[0.5; 4], &mut [a, b], &Exec::auto());
    assert_eq!(r, Err(Error::InvalidStep { step: MAX_STEP + 1 }));

    let mut g = GroupedOptimizer::new();
    g.add_group(AdamConfig::default(), &[5]).unwrap();
    let gb = with_step(&g.to_safetensors().unwrap(), MAX_STEP);
    let mut g = GroupedOptimizer::<AdamConfig>::from_safetensors(&gb).unwrap();
    g.grads_flat_mut().fill(0.5);
    let before = g.params_flat().to_vec();
    assert_eq!(g.step(), Err(Error::StepLimit { step: MAX_STEP }));
    assert_eq!(g.params_flat(), &before[..]);
    assert!(matches!(
        GroupedOptimizer::<AdamConfig>::from_safetensors(&with_step(&gb, u64::MAX)),
        Err(Error::Checkpoint { .. })
    ));

    let sa = SparseAdam::new(SparseAdamConfig::default(), 3, 2).unwrap();
    let mut sa = SparseAdam::from_safetensors(&with_step(&sa.to_safetensors().unwrap(), MAX_STEP)).unwrap();
    let mut table = [1.0f32; 6];
    assert_eq!(sa.step(&mut table, &[1], &[0.5, 0.5]), Err(Error::StepLimit { step: MAX_STEP }));
    assert_eq!(table, [1.0; 6]);
    let sg = SparseAdagrad::new(AdagradConfig::default(), 3, 2).unwrap();
    let mut sg = SparseAdagrad::from_safetensors(&with_step(&sg.to_safetensors().unwrap(), MAX_STEP)).unwrap();
    assert_eq!(sg.step(&mut table, &[1], &[0.5, 0.5]), Err(Error::StepLimit { step: MAX_STEP }));
    let rw = RowWiseAdagrad::new(0.1, 1e-10, 0.0, 3, 2).unwrap();
    let mut rw = RowWiseAdagrad::from_safetensors(&with_step(&rw.to_safetensors().unwrap(), MAX_STEP)).unwrap();
    assert_eq!(rw.step(&mut table, &[1], &[0.5, 0.5]), Err(Error::StepLimit { step: MAX_STEP }));
    assert_eq!(table, [1.0; 6]);
    assert_eq!(rw.acc(), &[0.0; 3]);
}

// 4. A chunk near usize::MAX is the largest chunk, not a division by zero.
#[test]
fn huge_chunks_do_not_panic() {
    for chunk in [usize::MAX, usize::MAX - 3, usize::MAX / 2 + 1] {
        let mut opt = Adam::new(AdamConfig::default(), 100).unwrap().with_exec(Exec::parallel(Backend::Scalar, chunk));
        opt.set_max_grad_norm(Some(1.0)).unwrap();
        opt.set_non_finite(NonFinitePolicy::SkipStep);
        let mut p = vec![1.0f32; 100];
        opt.step(&mut p, &vec![0.5; 100]).unwrap();
        let mut reference = Adam::new(AdamConfig::default(), 100).unwrap().with_exec(Exec::scalar());
        reference.set_max_grad_norm(Some(1.0)).unwrap();
        let mut q = vec![1.0f32; 100];
        reference.step(&mut q, &vec![0.5; 100]).unwrap();
        assert_eq!(p, q);
    }
}

// 5. Only regular files are read, never more than their length.
#[cfg(unix)]
#[test]
fn load_refuses_fifos_and_devices() {
    let dir = scratch_dir("fifo");
    let fifo = dir.join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().map(|s| s.success()).unwrap_or(false);
    if made {
        // Before the fix this blocked forever in open(2).
        assert!(matches!(Adam::load(&fifo), Err(Error::Io { kind: std::io::ErrorKind::InvalidInput, .. })));
        assert!(matches!(GroupedOptimizer::<AdamConfig>::load(&fifo), Err(Error::Io { .. })));
    }
    // Before the fix this read until the process ran out of memory.
    assert!(matches!(Adam::load("/dev/zero"), Err(Error::Io { kind: std::io::ErrorKind::InvalidInput, .. })));
    assert!(matches!(Adam::load(&dir), Err(Error::Io { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whether the kernel refuses allocations larger than memory (overcommit
/// modes 0 and 2); under mode 1 a huge allocation succeeds and the test of
/// it would exhaust memory instead.
fn refuses_huge_allocations() -> bool {
    std::fs::read_to_string("/proc/sys/vm/overcommit_memory").is_ok_and(|s| s.trim() != "1")
}

// 6 and 7. Impossible sizes are typed errors, and row-sparse bookkeeping is
// bounded by the rows a gradient touches.
#[test]
fn impossible_sizes_are_typed_errors() {
    let too_large = |r: Result<_, Error>| matches!(r, Err(Error::TooLarge { .. }));
    assert!(too_large(Adam::new(AdamConfig::default(), 1 << 62).map(|_| ())));
    assert!(too_large(Adam::new(AdamConfig::default(), usize::MAX).map(|_| ())));
    assert!(too_large(RowWiseAdagrad::new(0.1, 1e-10, 0.0, usize::MAX, 1).map(|_| ())));
    assert!(too_large(SparseAdam::new(SparseAdamConfig::default(), usize::MAX, 2).map(|_| ())));
    if refuses_huge_allocations() {
        // 4 TiB, 256 GiB: more than any machine this runs on.
        assert!(too_large(Adam::new(AdamConfig::default(), 1 << 40).map(|_| ())));
        assert!(too_large(SparseAdam::new(SparseAdamConfig::default(), 1 << 36, 1).map(|_| ())));
        assert!(too_large(RowWiseAdagrad::new(0.1, 1e-10, 0.0, 1 << 40, 4).map(|_| ())));
    }
    let mut g = GroupedOptimizer::new();
    assert!(too_large(g.add_group(AdamConfig::default(), &[usize::MAX]).map(|_| ())));
    let ids = g.add_group(AdamConfig::default(), &[1]).unwrap();
    let total = g.total_len();
    for sizes in [&[usize::MAX][..], &[usize::MAX - 8], &[5, usize::MAX / 2, usize::MAX / 2]] {
        assert!(too_large(g.add_group(AdamConfig::default(), sizes).map(|_| ())), "{sizes:?}");
        assert_eq!(g.total_len(), total, "a failed add_group changed the layout");
        assert_eq!(g.num_tensors(), 1);
    }
    assert_eq!(g.params(ids[0]).unwrap(), &[0.0]);
    g.grads_flat_mut().fill(1.0);
    g.step().unwrap();

    // A table of zero-width rows: nothing to allocate, rows anywhere.
    let mut wide = SparseAdam::new(SparseAdamConfig::default(), usize::MAX, 0).unwrap();
    wide.step(&mut [], &[usize::MAX - 1, 3, 3], &[]).unwrap();
    let mut huge = SparseAdagrad::new(AdagradConfig::default(), 1 << 40, 0).unwrap();
    huge.step(&mut [], &[(1 << 40) - 1, 0, (1 << 40) - 1], &[]).unwrap();
    // The same through a checkpoint claiming 2^40 rows of width 0.
    let bytes = SparseAdam::new(SparseAdamConfig::default(), 1 << 40, 0).unwrap().to_safetensors().unwrap();
    let mut loaded = SparseAdam::from_safetensors(&bytes).unwrap();
    loaded.step(&mut [], &[7, 1 << 39, 7], &[]).unwrap();
    assert_eq!(loaded.step_count(), 1);
}

// 8. Corruption of tensor data, or of the header's offsets, is detected.
#[test]
fn flipped_bits_and_swapped_offsets_are_detected() {
    let mut rng = Rng::new(15);
    let mut opt = Adam::new(AdamConfig { amsgrad: true, ..Default::default() }, 64).unwrap();
    let mut p = rng.vec(64, 1.0);
    for _ in 0..3 {
        opt.step(&mut p, &rng.vec(64, 1.0)).unwrap();
    }
    let good = opt.to_safetensors().unwrap();
    let header = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    for trial in 0..200 {
        let mut b = good.clone();
        for _ in 0..1 + trial % 3 {
            let byte = header + (rng.next_u64() as usize) % (good.len() - header);
            b[byte] ^= 1 << (rng.next_u64() % 8);
        }
        if b == good {
            continue;
        }
        assert!(
            matches!(Adam::from_safetensors(&b), Err(Error::Checkpoint { .. })),
            "trial {trial}: flip not detected"
        );
    }
    // Two state tensors' offsets swapped in the header (same length text).
    let text = std::str::from_utf8(&good[8..header]).unwrap();
    let offsets = |name: &str| {
        let at = text.find(&format!("\"{name}\":")).unwrap();
        let s = at + text[at..].find("\"data_offsets\":").unwrap() + "\"data_offsets\":".len();
        let e = s + text[s..].find(']').unwrap() + 1;
        (s, e)
    };
    assert_ne!(opt.state("exp_avg_sq"), opt.state("max_exp_avg_sq"), "test setup: the swapped tensors differ");
    let (a, b) = (offsets("exp_avg_sq"), offsets("max_exp_avg_sq"));
    let (ta, tb) = (text[a.0..a.1].to_string(), text[b.0..b.1].to_string());
    assert_eq!(ta.len(), tb.len(), "test setup: offsets of equal text length");
    let mut swapped = text.to_string();
    swapped.replace_range(b.0..b.1, &ta);
    swapped.replace_range(a.0..a.1, &tb);
    let mut bytes = good[..8].to_vec();
    bytes.extend_from_slice(swapped.as_bytes());
    bytes.extend_from_slice(&good[header..]);
    assert!(matches!(Adam::from_safetensors(&bytes), Err(Error::Checkpoint { .. })));
    // A file without checksums (as torch writes one) still loads.
    let plain = rewrite(&good, |_, _| {});
    let loaded = Adam::from_safetensors(&plain).unwrap();
    assert_eq!(loaded.state("exp_avg").unwrap(), opt.state("exp_avg").unwrap());
    // A checksum table that does not cover every tensor is refused.
    let partial = rewrite(&good, |meta, _| {
        meta.insert(CHECKSUM.into(), "{\"step\": 0}".into());
    });
    assert!(matches!(Adam::from_safetensors(&partial), Err(Error::Checkpoint { .. })));
}

// 9. SkipStep sees the coalesced gradient: duplicate rows that sum to inf.
#[test]
fn sparse_skip_step_sees_summed_duplicates() {
    let (rows, dim) = (4, 3);
    let values = vec![3e38f32; 2 * dim];
    let dup = [2usize, 2];
    let mut table = vec![1.0f32; rows * dim];
    let mut sa = SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap();
    sa.set_non_finite(NonFinitePolicy::SkipStep);
    assert!(sa.step(&mut table, &dup, &values).unwrap().skipped);
    let mut sg = SparseAdagrad::new(AdagradConfig::default(), rows, dim).unwrap();
    sg.set_non_finite(NonFinitePolicy::SkipStep);
    assert!(sg.step(&mut table, &dup, &values).unwrap().skipped);
    let mut rw = RowWiseAdagrad::new(0.1, 1e-10, 0.0, rows, dim).unwrap();
    rw.set_non_finite(NonFinitePolicy::SkipStep);
    assert!(rw.step(&mut table, &dup, &values).unwrap().skipped);
    assert!(table.iter().all(|&x| x == 1.0));
    assert_eq!((sa.step_count(), sg.step_count(), rw.step_count()), (0, 0, 0));
    assert!(sa.exp_avg().iter().all(|&x| x == 0.0));
    // Under Error, the index is the duplicated row's first value.
    sa.set_non_finite(NonFinitePolicy::Error);
    let rows3 = [0usize, 2, 1, 2];
    let mut vals = vec![1.0f32; 4 * dim];
    vals[dim + 1] = 3e38;
    vals[3 * dim + 1] = 3e38;
    assert_eq!(sa.step(&mut table, &rows3, &vals), Err(Error::NonFiniteGradient { index: dim + 1 }));
    assert!(table.iter().all(|&x| x == 1.0));
    // Finite sums still step, with the same bits as one summed row.
    sa.set_non_finite(NonFinitePolicy::SkipStep);
    let mut a = SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap();
    let mut b = SparseAdam::new(SparseAdamConfig::default(), rows, dim).unwrap();
    let (mut ta, mut tb) = (vec![1.0f32; rows * dim], vec![1.0f32; rows * dim]);
    a.step(&mut ta, &[3, 1, 3], &[0.25, 0.5, 1.0, 7.0, 7.0, 7.0, 0.125, 0.25, 2.0]).unwrap();
    b.step(&mut tb, &[1, 3], &[7.0, 7.0, 7.0, 0.375, 0.75, 3.0]).unwrap();
    assert_eq!(ta, tb);
}

// 10. A killed save's temp file is removed by the next save to the path;
// one in progress (locked) is left alone.
#[test]
fn the_next_save_removes_a_killed_saves_temp_file() {
    let dir = scratch_dir("stale");
    let path = dir.join("opt.safetensors");
    let stale = dir.join(".opt.safetensors.Xy12Ab.adaoptim-tmp");
    std::fs::write(&stale, vec![0u8; 1 << 16]).unwrap();
    let busy = dir.join(".opt.safetensors.Busy01.adaoptim-tmp");
    std::fs::write(&busy, b"in progress").unwrap();
    let held = std::fs::File::open(&busy).unwrap();
    held.lock().unwrap();
    let other = dir.join(".other.safetensors.Xy12Ab.adaoptim-tmp");
    std::fs::write(&other, b"another path's").unwrap();
    Adam::new(AdamConfig::default(), 8).unwrap().save(&path).unwrap();
    assert_eq!(
        names_in(&dir),
        [".opt.safetensors.Busy01.adaoptim-tmp", ".other.safetensors.Xy12Ab.adaoptim-tmp", "opt.safetensors"]
    );
    drop(held);
    std::fs::remove_dir_all(&dir).unwrap();
}

// 11. A TensorId from another optimizer is an error.
#[test]
fn foreign_tensor_ids_are_errors() {
    let mut a = GroupedOptimizer::new();
    let ids_a = a.add_group(AdamConfig::default(), &[3, 4]).unwrap();
    let mut b = GroupedOptimizer::new();
    let ids_b = b.add_group(AdamConfig::default(), &[3]).unwrap();
    assert_eq!(b.params(ids_a[1]), Err(Error::ForeignTensor { index: 1 }));
    assert_eq!(b.params(ids_a[0]), Err(Error::ForeignTensor { index: 0 }));
    assert!(matches!(b.params_mut(ids_a[0]), Err(Error::ForeignTensor { .. })));
    assert!(matches!(b.grads_mut(ids_a[0]), Err(Error::ForeignTensor { .. })));
    assert!(matches!(b.state("exp_avg", ids_a[0]), Err(Error::ForeignTensor { .. })));
    assert_eq!(a.params(ids_b[0]), Err(Error::ForeignTensor { index: 0 }));
    // A clone has the same layout: its ids are the original's.
    let c = a.clone();
    assert_eq!(c.params(ids_a[1]).unwrap().len(), 4);
}

// 12. The same state saves to the same bytes.
#[test]
fn the_same_state_gives_the_same_bytes() {
    let build = || {
        let mut opt = NAdam::new(NAdamConfig::default(), 40).unwrap();
        let mut p = vec![0.5f32; 40];
        opt.step(&mut p, &[0.25; 40]).unwrap();
        opt
    };
    let (a, b) = (build(), build());
    let bytes = a.to_safetensors().unwrap();
    for _ in 0..8 {
        assert_eq!(a.to_safetensors().unwrap(), bytes);
        assert_eq!(b.to_safetensors().unwrap(), bytes);
    }
    let mut g = GroupedOptimizer::new();
    g.add_group(AdamWConfig::default(), &[3, 5]).unwrap();
    g.add_group(AdamWConfig { weight_decay: 0.0, ..Default::default() }, &[2]).unwrap();
    let gb = g.to_safetensors().unwrap();
    assert!((0..8).all(|_| g.clone().to_safetensors().unwrap() == gb));
    let s = SparseAdam::new(SparseAdamConfig::default(), 4, 2).unwrap();
    let sb = s.to_safetensors().unwrap();
    assert!((0..8).all(|_| s.to_safetensors().unwrap() == sb));
    // Still plain safetensors.
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 4);
}
