//! Hugging Face cache resolution of `--model owner/name[@revision]`: any text gives a folder, the
//! text back (not a repo id), or an error — and a repo id never resolves outside the cache (a
//! revision starting with `/` or holding `..`, a ref file naming a path).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use peft_models::hub::{RepoId, resolve_model_in};

/// A cache with one repo, `org/model`: a `main` ref, a snapshot, and a ref naming a path.
fn cache() -> &'static PathBuf {
    static CACHE: OnceLock<PathBuf> = OnceLock::new();
    CACHE.get_or_init(|| {
        let cache = std::env::temp_dir().join(format!("peft-fuzz-hub-{}", std::process::id()));
        let repo = cache.join("models--org--model");
        std::fs::create_dir_all(repo.join("snapshots/aaaa1111")).unwrap();
        std::fs::write(repo.join("snapshots/aaaa1111/config.json"), "{}").unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "aaaa1111").unwrap();
        std::fs::write(repo.join("refs/evil"), "../../../../tmp").unwrap();
        cache.canonicalize().unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = std::str::from_utf8(data) else {
        return;
    };
    let cache = cache();
    // A spec naming an existing folder is that folder, not a repo id.
    if Path::new(spec).is_dir() || RepoId::parse(spec).is_none() {
        let _ = resolve_model_in(spec, cache);
        return;
    }
    if let Ok(path) = resolve_model_in(spec, cache) {
        let real = path.canonicalize().unwrap_or(path);
        assert!(real.starts_with(cache), "{spec} resolved to {}", real.display());
    }
});
