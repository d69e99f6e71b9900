//! The house rule that no crate's modules import each other in a circle (docs/ARCHITECTURE.md,
//! "Layering"), checked by a test over every `crates/*/src` folder: a module's imports are the
//! `crate::<module>` paths in its code (comments and its test module left out).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each module of the crate in `src` (a file `<name>.rs`, or `<name>/mod.rs`) with the modules
/// of the same crate its code names.
pub fn module_imports(src: &Path) -> std::io::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(src)? {
        let path = entry?.path();
        let name = path.file_stem().and_then(|s| s.to_str()).map(String::from);
        let file = if path.is_dir() {
            path.join("mod.rs")
        } else if path.extension().is_some_and(|e| e == "rs") {
            path.clone()
        } else {
            continue;
        };
        if let (Some(name), true) = (name, file.is_file()) {
            files.push((name, file));
        }
    }
    let modules: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
    let mut graph = BTreeMap::new();
    for (name, file) in files {
        let text = std::fs::read_to_string(&file)?;
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let mut uses = BTreeSet::new();
        for line in code.lines() {
            let line = line.split("//").next().unwrap_or("");
            uses.extend(named_modules(line, &modules));
        }
        // `use crate::{a::x, b::y}` spread over several lines.
        for group in code.split("use crate::{").skip(1) {
            let group = group.split("};").next().unwrap_or("");
            for part in group.split(',') {
                let head = part.trim().split("::").next().unwrap_or("").trim();
                if modules.contains(head) {
                    uses.insert(head.to_string());
                }
            }
        }
        uses.remove(&name);
        graph.insert(name, uses);
    }
    Ok(graph)
}

/// The modules named as `crate::<module>` on `line`.
fn named_modules(line: &str, modules: &BTreeSet<String>) -> Vec<String> {
    line.split("crate::")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            modules.contains(&name).then_some(name)
        })
        .collect()
}

/// The modules that reach themselves through their imports.
pub fn in_circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    graph
        .keys()
        .filter(|start| {
            let mut seen = BTreeSet::new();
            let mut stack: Vec<&String> = graph[*start].iter().collect();
            while let Some(next) = stack.pop() {
                if next == *start {
                    return true;
                }
                if seen.insert(next) {
                    stack.extend(graph.get(next).into_iter().flatten());
                }
            }
            false
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_crate_imports_its_own_modules_in_a_circle() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
        let mut checked = 0;
        for entry in std::fs::read_dir(&crates).unwrap() {
            let src = entry.unwrap().path().join("src");
            if !src.is_dir() {
                continue;
            }
            let graph = module_imports(&src).unwrap();
            let circles = in_circles(&graph);
            assert!(
                circles.is_empty(),
                "{}: {circles:?} import each other in a circle",
                src.display()
            );
            checked += 1;
        }
        assert!(
            checked >= 17,
            "only {checked} crates found under {}",
            crates.display()
        );
    }

    #[test]
    fn a_circle_is_found() {
        let graph: BTreeMap<String, BTreeSet<String>> = [
            ("a", vec!["b"]),
            ("b", vec!["c"]),
            ("c", vec!["a"]),
            ("d", vec!["a"]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
        assert_eq!(in_circles(&graph), vec!["a", "b", "c"]);
        let modules: BTreeSet<String> = ["kernels", "blas"].map(String::from).into();
        assert_eq!(
            named_modules("use crate::kernels::dot; crate::blas::blas()", &modules),
            vec!["kernels", "blas"]
        );
    }
}
