//! The crate's layering, checked on its source: every file imports only from
//! modules of a lower layer (or its own module), so there is no import
//! circle. The table below is the one the crate docs describe ("How the crate
//! is built"); a new module must be placed in it, and an import that points
//! up fails this test, naming the file and the module.
//!
//! References are read from code, not comments or docs (an intra-doc link to
//! a higher module is not an import): `crate::module`, `$crate::module`,
//! `crate::Name` and `use crate::{Name, ...}`, where a root `Name` counts as
//! the module `lib.rs` re-exports it from.

use std::collections::BTreeMap;
use std::path::Path;

/// Layer of each module, lowest first.
const LAYERS: &[(&str, usize)] = &[
    ("dtype", 0),
    ("backend", 0),
    ("error", 1),
    ("exec", 2),
    ("keywords", 2),
    ("memory", 2),
    ("schedule", 2),
    ("simd", 3),
    ("storage", 4),
    ("math", 4),
    ("driver", 5),
    ("clip", 6),
    ("optim", 7),
    ("groups", 8),
    ("mixed", 8),
    ("multi", 9),
    ("sparse", 8),
    ("adafactor", 8),
    ("roofline", 8),
    ("any", 9),
    ("checkpoint", 10),
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

fn src() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))
}

/// Code lines of a file: comments, doc comments and doc attributes dropped.
fn code(text: &str) -> String {
    text.lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("//") || t.starts_with("#[doc") || t.starts_with("#![doc"))
        })
        .map(|l| match l.find(" // ") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// Root names (`crate::Error`, `crate::AdamConfig`) and the module that
/// defines them, from `lib.rs`'s `pub use` lines and the optimizer registry.
fn root_names() -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    let lib = code(&std::fs::read_to_string(src().join("lib.rs")).unwrap());
    let lib = lib.replace('\n', " ");
    for stmt in lib.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else { continue };
        let module = ident_at(rest).to_string();
        let items = match (rest.find('{'), rest.rfind('}')) {
            (Some(a), Some(b)) => rest[a + 1..b].to_string(),
            _ => rest.rsplit("::").next().unwrap().to_string(),
        };
        for item in items.split(',').map(str::trim).filter(|i| !i.is_empty() && *i != "*") {
            names.insert(item.to_string(), module.clone());
        }
    }
    // `pub use optim::registered::*`: the registry's configurations and aliases.
    let registry = std::fs::read_to_string(src().join("optim/mod.rs")).unwrap();
    let body = &registry[registry.find("macro_rules! for_each_optimizer").unwrap()..];
    let body = &body[..body.find("pub(crate) use for_each_optimizer").unwrap()];
    for part in body.split([',', '{', '}']) {
        if let Some((variant, cfg)) = part.trim().strip_suffix(')').and_then(|p| p.split_once('(')) {
            names.insert(variant.trim().to_string(), "optim".to_string());
            names.insert(cfg.trim().to_string(), "optim".to_string());
        }
    }
    names.insert("ReadmeDoctests".to_string(), "lib".to_string());
    names
}

/// The modules a file's code refers to.
fn references(code: &str, roots: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let resolve = |name: &str| -> Result<String, String> {
        if layer(name).is_some() {
            Ok(name.to_string())
        } else if let Some(m) = roots.get(name) {
            Ok(m.clone())
        } else {
            Err(format!("`crate::{name}` is neither a module in the layer table nor a root re-export"))
        }
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').ok_or("unclosed `use crate::{`")?;
            for item in group[..end].split(',').map(str::trim).filter(|s| !s.is_empty()) {
                out.push(resolve(ident_at(item))?);
            }
        } else {
            let name = ident_at(after);
            if !name.is_empty() {
                out.push(resolve(name)?);
            }
        }
        rest = after;
    }
    Ok(out)
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a source file belongs to: `optim/adam.rs` is `optim`.
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn every_import_points_down() {
    let roots = root_names();
    let mut all = Vec::new();
    files(src(), &mut all);
    all.sort();
    let mut violations = Vec::new();
    let mut checked = 0;
    for path in all {
        let module = module_of(&path);
        if module == "lib" {
            continue;
        }
        let own =
            layer(&module).unwrap_or_else(|| panic!("{}: module `{module}` is not in the layer table", path.display()));
        let text = std::fs::read_to_string(&path).unwrap();
        for r in references(&code(&text), &roots).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
            checked += 1;
            if r == module {
                continue;
            }
            match layer(&r) {
                Some(l) if l < own => {}
                _ => violations.push(format!("{} (layer {own}) imports from `{r}`", path.display())),
            }
        }
    }
    assert!(checked > 100, "only {checked} references found: the scan is broken");
    violations.dedup();
    assert!(violations.is_empty(), "imports that point up or sideways:\n{}", violations.join("\n"));
}

/// The scan itself: an upward import is seen, a doc link is not.
#[test]
fn the_scan_sees_imports_and_skips_docs() {
    let roots = root_names();
    assert_eq!(roots.get("AdamWConfig").map(String::as_str), Some("optim"));
    assert_eq!(roots.get("AnyConfig").map(String::as_str), Some("any"));
    assert_eq!(roots.get("Error").map(String::as_str), Some("error"));
    let text = "/// See [`x`](crate::checkpoint::read).\nuse crate::{AnyConfig, Error};\nlet x = crate::driver::drive(); // crate::any\n";
    let refs = references(&code(text), &roots).unwrap();
    assert_eq!(refs, ["any", "error", "driver"]);
    assert!(references("crate::nonexistent::f()", &roots).is_err());
}
