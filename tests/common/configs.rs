//! A spread of configurations covering every optimizer and every state layout.

use adaoptim::*;

/// The hand-picked spread below, then torch's defaults of every registered
/// optimizer (`AnyConfig::TORCH_CLASSES`), so a newly registered one is
/// covered by every test that iterates this list without editing it.
pub fn variety() -> Vec<(&'static str, AnyConfig)> {
    let mut v = spread();
    for class in AnyConfig::TORCH_CLASSES {
        v.push((class, AnyConfig::default_for(class).unwrap()));
    }
    v
}

fn spread() -> Vec<(&'static str, AnyConfig)> {
    vec![
        ("sgd", SgdConfig { lr: 0.1, ..Default::default() }.into()),
        (
            "sgd-momentum-damp-wd",
            SgdConfig { lr: 0.1, momentum: 0.9, dampening: 0.3, weight_decay: 0.01, ..Default::default() }.into(),
        ),
        (
            "sgd-nesterov-max",
            SgdConfig { lr: 0.05, momentum: 0.9, nesterov: true, maximize: true, ..Default::default() }.into(),
        ),
        (
            "adagrad",
            AdagradConfig {
                lr: 0.05,
                lr_decay: 0.01,
                weight_decay: 0.01,
                initial_accumulator_value: 0.1,
                ..Default::default()
            }
            .into(),
        ),
        ("adagrad-eps-inside", AdagradConfig { eps_inside_sqrt: true, eps: 1e-8, ..Default::default() }.into()),
        ("rmsprop", RmsPropConfig::default().into()),
        ("rmsprop-centered", RmsPropConfig { centered: true, eps_inside_sqrt: true, ..Default::default() }.into()),
        ("rmsprop-momentum", RmsPropConfig { momentum: 0.9, weight_decay: 1e-3, ..Default::default() }.into()),
        (
            "rmsprop-centered-momentum",
            RmsPropConfig { centered: true, momentum: 0.9, alpha: 0.9, maximize: true, ..Default::default() }.into(),
        ),
        ("adadelta", AdadeltaConfig { weight_decay: 0.01, ..Default::default() }.into()),
        ("adam", AdamConfig::default().into()),
        (
            "adam-amsgrad-wd",
            AdamConfig { amsgrad: true, weight_decay: 0.01, betas: (0.8, 0.99), ..Default::default() }.into(),
        ),
        ("adam-lerp-high", AdamConfig { betas: (0.3, 0.9), maximize: true, ..Default::default() }.into()),
        ("adamw", AdamWConfig::default().into()),
        ("adamw-amsgrad", AdamWConfig { amsgrad: true, ..Default::default() }.into()),
        ("adamax", AdamaxConfig { weight_decay: 0.02, ..Default::default() }.into()),
        ("nadam", NAdamConfig::default().into()),
        (
            "nadam-decoupled",
            NAdamConfig { weight_decay: 0.01, decoupled_weight_decay: true, ..Default::default() }.into(),
        ),
        // torch's own evaluation (its square root and, for Adam, division)
        ("adam-torch-exact-amsgrad", AdamConfig { torch_exact: true, amsgrad: true, ..Default::default() }.into()),
        ("adamw-torch-exact", AdamWConfig { torch_exact: true, ..Default::default() }.into()),
        (
            "rmsprop-torch-exact-centered-momentum",
            RmsPropConfig { torch_exact: true, centered: true, momentum: 0.9, ..Default::default() }.into(),
        ),
        ("adagrad-torch-exact", AdagradConfig { torch_exact: true, lr_decay: 0.01, ..Default::default() }.into()),
        ("adadelta-torch-exact", AdadeltaConfig { torch_exact: true, weight_decay: 0.01, ..Default::default() }.into()),
        (
            "radam-torch-exact",
            RAdamConfig { torch_exact: true, decoupled_weight_decay: true, weight_decay: 0.01, ..Default::default() }
                .into(),
        ),
        ("nadam-torch-exact", NAdamConfig { torch_exact: true, weight_decay: 0.01, ..Default::default() }.into()),
    ]
}
