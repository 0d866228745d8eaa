//! Checkpoints: exact resume for every optimizer, torch-style names, and
//! typed errors (never a panic, nothing changed) for bad files.

mod common;

use adaoptim::*;
use common::configs::variety;
use common::{Rng, assert_same_bits};

#[test]
fn resume_is_bit_exact_for_every_optimizer() {
    let mut rng = Rng::new(11);
    let dir = std::env::temp_dir().join(format!("adaoptim-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, cfg) in variety() {
        let n = 77;
        let p0 = rng.vec(n, 1.0);
        let grads: Vec<Vec<f32>> = (0..10).map(|_| rng.vec(n, 1.0)).collect();
        let mut straight = cfg.build(n).unwrap();
        let mut p_straight = p0.clone();
        for g in &grads {
            straight.step(&mut p_straight, g).unwrap();
        }
        for k in [0, 1, 4, 10] {
            let mut first = cfg.build(n).unwrap();
            let mut p = p0.clone();
            for g in &grads[..k] {
                first.step(&mut p, g).unwrap();
            }
            let path = dir.join(format!("{name}-{k}.safetensors"));
            first.save(&path).unwrap();
            let mut resumed = AnyOptimizer::load_any(&path);
            assert_eq!(resumed.step_count(), k as u64);
            assert_eq!(resumed.config(), cfg, "{name}: hyperparameters round-trip");
            for g in &grads[k..] {
                resumed.step(&mut p, g).unwrap();
            }
            assert_same_bits(&format!("{name} resumed after {k}"), &p, &p_straight);
            for s in straight.state_names() {
                assert_same_bits(&format!("{name} {s}"), resumed.state(s).unwrap(), straight.state(s).unwrap());
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

trait LoadAny {
    fn load_any(path: &std::path::Path) -> AnyOptimizer;
}
impl LoadAny for AnyOptimizer {
    fn load_any(path: &std::path::Path) -> AnyOptimizer {
        AnyOptimizer::from_safetensors(&std::fs::read(path).unwrap()).unwrap()
    }
}

#[test]
fn tensors_and_metadata_use_torch_names() {
    let mut opt = Adam::new(AdamConfig { amsgrad: true, ..Default::default() }, 5).unwrap();
    let mut p = [1.0f32; 5];
    opt.step(&mut p, &[0.5; 5]).unwrap();
    let bytes = opt.to_safetensors().unwrap();
    // Parse with the safetensors crate directly, as an outside reader would.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]);
    assert_eq!(st.tensor("step").unwrap().data(), 1.0f32.to_le_bytes());
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["torch_class"], "Adam");
    assert_eq!(meta["format"], "adaoptim-optimizer");
    let groups: serde_json::Value = serde_json::from_str(&meta["param_groups"]).unwrap();
    assert_eq!(groups[0]["betas"], serde_json::json!([0.9, 0.999]));
    assert_eq!(groups[0]["amsgrad"], serde_json::json!(true));

    let nadam = NAdam::new(NAdamConfig::default(), 3).unwrap();
    let st_bytes = nadam.to_safetensors().unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert_eq!(st.tensor("mu_product").unwrap().data(), 1.0f32.to_le_bytes());
}

#[test]
fn bad_checkpoints_are_typed_errors_and_change_nothing() {
    let mut rng = Rng::new(12);
    let mut opt = Adam::new(AdamConfig::default(), 16).unwrap();
    let mut p = rng.vec(16, 1.0);
    opt.step(&mut p, &rng.vec(16, 1.0)).unwrap();
    let good = opt.to_safetensors().unwrap();
    let before = snap(&opt);

    let mut target = Adam::new(AdamConfig { lr: 0.5, ..Default::default() }, 16).unwrap();
    target.step(&mut rng.vec(16, 1.0), &rng.vec(16, 1.0)).unwrap();
    let target_before = snap(&target);
    let check = |target: &mut Adam, bytes: &[u8], what: &str| {
        match target.restore(bytes) {
            Err(Error::Checkpoint { .. }) => {}
            other => panic!("{what}: expected Error::Checkpoint, got {other:?}"),
        }
        assert!(snap(target) == target_before, "{what}: target changed");
    };
    // Truncated anywhere.
    for cut in [0, 1, 7, 8, 20, good.len() / 2, good.len() - 1] {
        check(&mut target, &good[..cut], &format!("truncated at {cut}"));
    }
    // Bytes flipped anywhere: an error or (if only tensor data changed) a
    // valid load; never a panic.
    for i in (0..good.len()).step_by(3) {
        let mut b = good.clone();
        b[i] ^= 0x5A;
        let _ = Adam::from_safetensors(&b);
        let _ = AnyOptimizer::from_safetensors(&b);
    }
    // Another kind, another size.
    let sgd = Sgd::new(SgdConfig { momentum: 0.9, ..Default::default() }, 16).unwrap().to_safetensors().unwrap();
    check(&mut target, &sgd, "SGD into Adam");
    let small = Adam::new(AdamConfig::default(), 15).unwrap().to_safetensors().unwrap();
    check(&mut target, &small, "15 into 16");
    let ams = Adam::new(AdamConfig { amsgrad: true, ..Default::default() }, 16).unwrap();
    let mut ams_target = Adam::new(AdamConfig::default(), 16).unwrap();
    // A different state layout of the same kind is a valid checkpoint and
    // restores the layout with it.
    ams_target.restore(&ams.to_safetensors().unwrap()).unwrap();
    assert!(ams_target.config().amsgrad);
    // Not safetensors at all.
    check(&mut target, b"hello world, not a checkpoint", "text");
    // Metadata edits: version, format, hyperparameters.
    let edit = |from: &str, to: &str| -> Vec<u8> {
        let s = unsafe_lossless_replace(&good, from, to);
        assert_ne!(s, good, "edit {from} -> {to} did not apply");
        s
    };
    check(&mut target, &edit("\"format_version\":\"1\"", "\"format_version\":\"9\""), "version");
    check(&mut target, &edit("adaoptim-optimizer", "adaoptim-optimizeR"), "format");
    check(&mut target, &edit("\"lr\\\":0.001", "\"lr\\\":-1.00"), "negative lr");
    assert!(snap(&opt) == before, "saving does not change the source");
    assert!(matches!(Adam::load("/nonexistent/dir/x.safetensors"), Err(Error::Io { .. })));
}

/// Everything a checkpoint covers.
fn snap(o: &Adam) -> (AdamConfig, u64, Vec<Vec<f32>>) {
    (*o.config(), o.step_count(), o.state_buffers().map(|b| b.to_vec()).collect())
}

/// Replaces a same-length byte string inside the header.
fn unsafe_lossless_replace(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    if let Some(pos) = bytes.windows(from.len()).position(|w| w == from.as_bytes()) {
        out[pos..pos + to.len()].copy_from_slice(to.as_bytes());
    }
    out
}

#[test]
fn atomic_save_keeps_the_previous_file_on_failure() {
    let dir = std::env::temp_dir().join(format!("adaoptim-atomic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("opt.safetensors");
    let opt = Adam::new(AdamConfig::default(), 8).unwrap();
    opt.save(&path).unwrap();
    let first = std::fs::read(&path).unwrap();
    // A save into a folder that does not exist fails without touching anything.
    assert!(matches!(opt.save(dir.join("missing/opt.safetensors")), Err(Error::Io { .. })));
    // A second save replaces the file whole; no temporary file is left behind.
    let mut opt2 = Adam::new(AdamConfig { lr: 0.25, ..Default::default() }, 8).unwrap();
    opt2.step(&mut [0.0; 8], &[1.0; 8]).unwrap();
    opt2.save(&path).unwrap();
    assert_ne!(std::fs::read(&path).unwrap(), first);
    assert_eq!(Adam::load(&path).unwrap().lr(), 0.25);
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn grouped_resume_is_bit_exact() {
    use adaoptim::groups::GroupedOptimizer;
    let mut rng = Rng::new(13);
    let build = || {
        let mut o = GroupedOptimizer::new();
        let mut ids = o.add_group(NAdamConfig { weight_decay: 0.01, ..Default::default() }, &[100, 0, 1, 37]).unwrap();
        ids.extend(o.add_group(NAdamConfig { lr: 1e-2, ..Default::default() }, &[64, 3]).unwrap());
        (o, ids)
    };
    let (mut straight, ids) = build();
    let total = straight.total_len();
    let p0 = rng.vec(total, 1.0);
    let grads: Vec<Vec<f32>> = (0..8).map(|_| rng.vec(total, 1.0)).collect();
    straight.params_flat_mut().copy_from_slice(&p0);
    for g in &grads {
        straight.grads_flat_mut().copy_from_slice(g);
        straight.step().unwrap();
    }
    let (mut first, _) = build();
    first.params_flat_mut().copy_from_slice(&p0);
    for g in &grads[..3] {
        first.grads_flat_mut().copy_from_slice(g);
        first.step().unwrap();
    }
    let bytes = first.to_safetensors().unwrap();
    let mut resumed = GroupedOptimizer::<NAdamConfig>::from_safetensors(&bytes).unwrap();
    assert_eq!(resumed.step_count(), 3);
    assert_eq!(resumed.num_tensors(), 6);
    assert_eq!(resumed.group_config(1).unwrap().lr, 1e-2);
    for g in &grads[3..] {
        resumed.grads_flat_mut().copy_from_slice(g);
        resumed.step().unwrap();
    }
    // Tensor by tensor (the padding between tensors belongs to none and is
    // not saved); indices carry over, ids are the loaded optimizer's own.
    for &id in &ids {
        let rid = resumed.tensor_id(id.index()).unwrap();
        assert_eq!(resumed.params(id), Err(Error::ForeignTensor { index: id.index() }));
        assert_same_bits("grouped resume", resumed.params(rid).unwrap(), straight.params(id).unwrap());
        assert_same_bits(
            "grouped resume state",
            resumed.state("exp_avg_sq", rid).unwrap().unwrap(),
            straight.state("exp_avg_sq", id).unwrap().unwrap(),
        );
    }
    // Torch-style names.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().contains(&"state.3.exp_avg_sq") && st.names().contains(&"params.5"));
    // Truncation and another kind are errors, never panics.
    for cut in [0, 10, bytes.len() / 3, bytes.len() - 1] {
        assert!(matches!(
            GroupedOptimizer::<NAdamConfig>::from_safetensors(&bytes[..cut]),
            Err(Error::Checkpoint { .. })
        ));
    }
    assert!(GroupedOptimizer::<AdamConfig>::from_safetensors(&bytes).is_err());
    assert!(NAdam::from_safetensors(&bytes).is_err(), "a grouped file is not a dense one");
}

#[test]
fn sparse_resume_is_bit_exact() {
    use adaoptim::sparse::{RowWiseAdagrad, SparseAdagrad, SparseAdam, SparseAdamConfig};
    let mut rng = Rng::new(14);
    let (rows, dim) = (200, 7);
    let t0 = rng.vec(rows * dim, 1.0);
    let steps: Vec<(Vec<usize>, Vec<f32>)> = (0..6)
        .map(|_| {
            let idx: Vec<usize> = (0..30).map(|_| (rng.next_u64() % rows as u64) as usize).collect();
            let v = rng.vec(idx.len() * dim, 1.0);
            (idx, v)
        })
        .collect();
    // SparseAdam
    let mut a = SparseAdam::new(SparseAdamConfig { lr: 0.01, ..Default::default() }, rows, dim).unwrap();
    let mut ta = t0.clone();
    let mut b = a.clone();
    let mut tb = t0.clone();
    for (i, (idx, v)) in steps.iter().enumerate() {
        a.step(&mut ta, idx, v).unwrap();
        if i == 2 {
            b = SparseAdam::from_safetensors(&a.to_safetensors().unwrap()).unwrap();
            tb = ta.clone();
        } else if i > 2 {
            b.step(&mut tb, idx, v).unwrap();
        }
    }
    assert_same_bits("SparseAdam resume", &tb, &ta);
    // Sparse Adagrad and row-wise AdaGrad.
    let mut g = SparseAdagrad::new(AdagradConfig { lr_decay: 0.01, ..Default::default() }, rows, dim).unwrap();
    let mut r = RowWiseAdagrad::new(0.1, 1e-10, 0.1, rows, dim).unwrap();
    let (mut tg, mut tr) = (t0.clone(), t0.clone());
    for (idx, v) in &steps[..3] {
        g.step(&mut tg, idx, v).unwrap();
        r.step(&mut tr, idx, v).unwrap();
    }
    let mut g2 = SparseAdagrad::from_safetensors(&g.to_safetensors().unwrap()).unwrap();
    let mut r2 = RowWiseAdagrad::from_safetensors(&r.to_safetensors().unwrap()).unwrap();
    let (mut tg2, mut tr2) = (tg.clone(), tr.clone());
    for (idx, v) in &steps[3..] {
        g.step(&mut tg, idx, v).unwrap();
        g2.step(&mut tg2, idx, v).unwrap();
        r.step(&mut tr, idx, v).unwrap();
        r2.step(&mut tr2, idx, v).unwrap();
    }
    assert_same_bits("sparse Adagrad resume", &tg2, &tg);
    assert_same_bits("row-wise resume", &tr2, &tr);
    assert_eq!(g2.step_count(), 6);
    // A dense Adagrad checkpoint is not a sparse one, and vice versa.
    let dense = Adagrad::new(AdagradConfig::default(), rows * dim).unwrap().to_safetensors().unwrap();
    assert!(matches!(SparseAdagrad::from_safetensors(&dense), Err(Error::Checkpoint { .. })));
    assert!(matches!(Adagrad::from_safetensors(&g.to_safetensors().unwrap()), Err(Error::Checkpoint { .. })));
    let bytes = a.to_safetensors().unwrap();
    for cut in [0, 9, bytes.len() / 2, bytes.len() - 1] {
        assert!(SparseAdam::from_safetensors(&bytes[..cut]).is_err());
    }
}

/// Checkpoints written by torch itself: `tests/torch_interop/check.py` runs a
/// torch optimizer for 7 steps and writes its `state_dict` in this format
/// (tensors and `param_groups` as torch holds them, `foreach: null` and all;
/// `grouped_*`: three tensors in two parameter groups; `sparse_*`: an
/// embedding table with row-sparse gradients). Loaded here and run
/// for the remaining steps, each must end where torch, run straight through,
/// ends (golden tolerance).
#[test]
fn torch_written_checkpoints_resume() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torch_interop/fixtures");
    let (mut dense, mut grouped, mut row_sparse) = (0, 0, 0);
    let mut paths: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    for ck in paths.iter().filter(|p| p.extension().is_some_and(|x| x == "safetensors")) {
        let what = ck.display().to_string();
        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ck.with_extension("json")).unwrap()).unwrap();
        let bytes = std::fs::read(ck).unwrap();
        let (got, want): (Vec<Vec<f32>>, Vec<Vec<f32>>) = if run.get("rows").is_some() {
            row_sparse += 1;
            let mut step: RowStep = match run["torch_class"].as_str().unwrap() {
                "SparseAdam" => {
                    let mut o = sparse::SparseAdam::from_safetensors(&bytes).unwrap();
                    Box::new(move |p, r, g| {
                        o.step(p, r, g).unwrap();
                    })
                }
                "Adagrad" => {
                    let mut o = sparse::SparseAdagrad::from_safetensors(&bytes).unwrap();
                    Box::new(move |p, r, g| {
                        o.step(p, r, g).unwrap();
                    })
                }
                other => panic!("{what}: no sparse case for {other}"),
            };
            let mut table = json_f32s(&run["params0"]);
            let values = run["grad_values"].as_array().unwrap();
            for (r, v) in run["grad_rows"].as_array().unwrap().iter().zip(values) {
                let r: Vec<usize> = r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
                step(&mut table, &r, &json_f32s(v));
            }
            (vec![table], vec![json_f32s(&run["expected"])])
        } else if run.get("torch_class").is_some() {
            grouped += 1;
            let got = match run["torch_class"].as_str().unwrap() {
                "Adam" => resume_grouped::<AdamConfig>(&bytes, &run),
                "NAdam" => resume_grouped::<NAdamConfig>(&bytes, &run),
                "SGD" => resume_grouped::<SgdConfig>(&bytes, &run),
                "RMSprop" => resume_grouped::<RmsPropConfig>(&bytes, &run),
                other => panic!("{what}: no grouped case for {other}"),
            };
            (got, run["expected"].as_array().unwrap().iter().map(json_f32s).collect())
        } else {
            dense += 1;
            let mut opt = AnyOptimizer::from_safetensors(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(opt.step_count(), 7, "{what}");
            let mut p = json_f32s(&run["params0"]);
            for g in run["grads"].as_array().unwrap() {
                opt.step(&mut p, &json_f32s(g)).unwrap();
            }
            (vec![p], vec![json_f32s(&run["expected"])])
        };
        assert_eq!(got.len(), want.len(), "{what}: tensors");
        for (t, (got, want)) in got.iter().zip(&want).enumerate() {
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                let (g, w) = (f64::from(*g), f64::from(*w));
                assert!((g - w).abs() <= 1e-5 * w.abs() + 1e-6, "{what} tensor {t} element {i}: got {g}, torch {w}");
            }
        }
    }
    assert_eq!((dense, grouped, row_sparse), (9, 4, 2), "the cases of check.py");
}

/// One step of a row-sparse optimizer: table, rows, values.
type RowStep = Box<dyn FnMut(&mut [f32], &[usize], &[f32])>;

fn json_f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// Loads a torch-written grouped checkpoint and runs `run`'s gradients.
fn resume_grouped<A: Algorithm>(bytes: &[u8], run: &serde_json::Value) -> Vec<Vec<f32>> {
    let mut opt = groups::GroupedOptimizer::<A>::from_safetensors(bytes).unwrap();
    assert_eq!(opt.step_count(), 7);
    for step in run["grads"].as_array().unwrap() {
        for (i, g) in step.as_array().unwrap().iter().enumerate() {
            let id = opt.tensor_id(i).unwrap();
            opt.grads_mut(id).unwrap().copy_from_slice(&json_f32s(g));
        }
        opt.step().unwrap();
    }
    (0..opt.num_tensors()).map(|i| opt.params(opt.tensor_id(i).unwrap()).unwrap().to_vec()).collect()
}

/// Rewrites a checkpoint's `param_groups` metadata.
fn with_param_groups(bytes: &[u8], groups: serde_json::Value) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap();
    meta.insert("param_groups".into(), groups.to_string());
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    safetensors::serialize(tensors, Some(meta)).unwrap()
}

#[test]
fn param_groups_are_torch_keyword_arguments() {
    // What we write, torch's constructors take: no extension flag at its
    // default, no flag AdamW's constructor lacks.
    for (cfg, absent) in [
        (AnyConfig::from(AdagradConfig::default()), "eps_inside_sqrt"),
        (AnyConfig::from(RmsPropConfig::default()), "eps_inside_sqrt"),
        (AnyConfig::from(AdamWConfig::default()), "decoupled_weight_decay"),
        (AnyConfig::from(AdamWConfig::default()), "torch_exact"),
        (AnyConfig::from(AdamConfig::default()), "torch_exact"),
        (AnyConfig::from(AdagradConfig::default()), "torch_exact"),
        (AnyConfig::from(RmsPropConfig::default()), "torch_exact"),
    ] {
        let bytes = cfg.build(3).unwrap().to_safetensors().unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let groups: serde_json::Value =
            serde_json::from_str(&meta.metadata().as_ref().unwrap()["param_groups"]).unwrap();
        assert!(groups[0].get(absent).is_none(), "{} writes {absent}", cfg.torch_class());
    }
    // What torch writes, we read: its parameter indices, a scheduler's
    // initial_lr, None for the implementation switches, AdamW's fixed flag.
    let adamw = AdamW::new(AdamWConfig { lr: 0.01, ..Default::default() }, 3).unwrap().to_safetensors().unwrap();
    let torch_group = serde_json::json!([{
        "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "amsgrad": false,
        "maximize": false, "foreach": null, "capturable": false, "differentiable": false, "fused": null,
        "decoupled_weight_decay": true, "initial_lr": 0.02, "params": [0]
    }]);
    let loaded = AdamW::from_safetensors(&with_param_groups(&adamw, torch_group.clone())).unwrap();
    assert_eq!(loaded.config().lr, 0.01);
    // A None where torch needs a value, or AdamW without decoupling, is an error.
    for (key, value) in [("lr", serde_json::Value::Null), ("decoupled_weight_decay", serde_json::json!(false))] {
        let mut g = torch_group.clone();
        g[0][key] = value;
        let err = AdamW::from_safetensors(&with_param_groups(&adamw, g)).unwrap_err();
        assert!(matches!(err, Error::Checkpoint { .. }), "{key}: {err}");
    }
    let flag = [("decoupled_weight_decay", HyperValue::Bool(false))];
    assert!(matches!(AnyConfig::from_torch("AdamW", &flag), Err(Error::InvalidOption { .. })));
}

#[test]
fn restore_keeps_guards_and_load_starts_with_defaults() {
    let mut saved = Adam::new(AdamConfig { lr: 0.01, ..Default::default() }, 4).unwrap();
    let mut p = [1.0f32; 4];
    saved.step(&mut p, &[0.5; 4]).unwrap();
    let bytes = saved.to_safetensors().unwrap();

    let mut target = Adam::new(AdamConfig::default(), 4).unwrap();
    target.set_non_finite(NonFinitePolicy::SkipStep);
    target.set_grad_scale(Some(1024.0)).unwrap();
    target.set_max_grad_norm(Some(1.0)).unwrap();
    target.restore(&bytes).unwrap();
    assert_eq!(target.step_count(), 1);
    assert_eq!(target.config().lr, 0.01);
    assert_eq!(target.non_finite(), NonFinitePolicy::SkipStep);
    assert_eq!(target.grad_scale(), Some(1024.0));
    assert_eq!(target.max_grad_norm(), Some(1.0));
    // and the kept SkipStep is in force: a NaN gradient changes nothing
    let before = p;
    assert!(target.step(&mut p, &[f32::NAN, 0.0, 0.0, 0.0]).unwrap().skipped);
    assert_eq!(p, before);
    assert_eq!(target.step_count(), 1);

    let loaded = Adam::from_safetensors(&bytes).unwrap();
    assert_eq!(loaded.non_finite(), NonFinitePolicy::Propagate);
    assert_eq!((loaded.grad_scale(), loaded.max_grad_norm()), (None, None));
}

/// Groups with different state buffers (AMSGrad in one Adam group only)
/// save each tensor's own buffers, torch-style, and resume bit-exactly.
#[test]
fn grouped_resume_with_mixed_state_layouts() {
    use adaoptim::groups::GroupedOptimizer;
    let mut rng = Rng::new(14);
    let build = || {
        let mut o = GroupedOptimizer::new();
        let mut ids = o.add_group(AdamConfig::default(), &[50, 7]).unwrap();
        ids.extend(o.add_group(AdamConfig { amsgrad: true, lr: 1e-2, ..Default::default() }, &[33]).unwrap());
        (o, ids)
    };
    let (mut straight, ids) = build();
    let total = straight.total_len();
    let p0 = rng.vec(total, 1.0);
    let grads: Vec<Vec<f32>> = (0..6).map(|_| rng.vec(total, 1.0)).collect();
    straight.params_flat_mut().copy_from_slice(&p0);
    let (mut first, _) = build();
    first.params_flat_mut().copy_from_slice(&p0);
    for (k, g) in grads.iter().enumerate() {
        straight.grads_flat_mut().copy_from_slice(g);
        straight.step().unwrap();
        if k < 2 {
            first.grads_flat_mut().copy_from_slice(g);
            first.step().unwrap();
        }
    }
    let bytes = first.to_safetensors().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert!(names.contains(&"state.2.max_exp_avg_sq"));
    assert!(!names.contains(&"state.0.max_exp_avg_sq"), "a group without AMSGrad saves no max_exp_avg_sq");
    let mut resumed = GroupedOptimizer::<AdamConfig>::from_safetensors(&bytes).unwrap();
    for g in &grads[2..] {
        resumed.grads_flat_mut().copy_from_slice(g);
        resumed.step().unwrap();
    }
    for &id in &ids {
        let rid = resumed.tensor_id(id.index()).unwrap();
        assert_same_bits("mixed resume", resumed.params(rid).unwrap(), straight.params(id).unwrap());
        for name in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] {
            assert_eq!(resumed.state(name, rid).unwrap().is_some(), straight.state(name, id).unwrap().is_some());
            if let (Some(a), Some(b)) = (resumed.state(name, rid).unwrap(), straight.state(name, id).unwrap()) {
                assert_same_bits(&format!("mixed resume {name}"), a, b);
            }
        }
    }
}
