//! Model folders named by Hugging Face repo id (`Qwen/Qwen2.5-0.5B`, `meta-llama/Llama-3.2-1B@main`),
//! found in the local Hugging Face cache without any network access.
//!
//! The cache is the folder `huggingface_hub` fills: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. A repo lives in
//! `models--{owner}--{name}/`, with `refs/{branch or tag}` holding a commit hash and
//! `snapshots/{commit}/` holding the files.

use std::path::{Path, PathBuf};

use peft_core::{PeftError, Result};

/// The Hugging Face hub cache folder this process would read, from the environment.
pub fn cache_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// `owner/name` with an optional `@revision`, as written on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    /// `owner/name`.
    pub repo: String,
    /// A branch, tag or commit hash; `main` when not given.
    pub revision: String,
}

impl RepoId {
    /// Parses `owner/name[@revision]`; `None` for anything else (a path, say).
    pub fn parse(text: &str) -> Option<Self> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (text, "main"),
        };
        let (owner, name) = repo.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        // A branch may hold `/` (`refs/pr/1`), but every part between them must be a plain
        // name: no leading `/` (an absolute path would replace the cache folder when joined),
        // no empty part, no `.` or `..`.
        let rev_ok = !revision.is_empty()
            && !revision.contains("..")
            && revision.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            });
        (part_ok(owner) && part_ok(name) && rev_ok).then(|| Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The repo's folder in `cache`: `models--{owner}--{name}`.
    pub fn folder(&self, cache: &Path) -> PathBuf {
        cache.join(format!("models--{}", self.repo.replace('/', "--")))
    }
}

/// Resolves `--model`: an existing folder is used as it is; otherwise `owner/name[@revision]` is
/// looked up in [`cache_dir`] (errors name the cache folder searched and how to fill it).
/// Anything else comes back unchanged, for the loader to report the file it cannot read.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    resolve_model_in(spec, &cache_dir())
}

/// [`resolve_model`] against an explicit cache folder.
pub fn resolve_model_in(spec: &str, cache: &Path) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let Some(id) = RepoId::parse(spec) else {
        return Ok(path.to_path_buf());
    };
    let repo_dir = id.folder(cache);
    let missing = |what: String| {
        PeftError::InvalidInput(format!(
            "--model {spec}: {what} in the Hugging Face cache {} (no network is used: fill it with \
             `hf download {}{}`, or set HF_HUB_CACHE / HF_HOME, or pass a folder)",
            cache.display(),
            id.repo,
            if id.revision == "main" {
                String::new()
            } else {
                format!(" --revision {}", id.revision)
            }
        ))
    };
    if !repo_dir.is_dir() {
        return Err(missing(format!("{} is not", id.repo)));
    }
    let snapshots = repo_dir.join("snapshots");
    // A ref (branch or tag) names a commit; a full commit hash names its snapshot directly.
    let ref_file = repo_dir.join("refs").join(&id.revision);
    let commit = if ref_file.is_file() {
        std::fs::read_to_string(&ref_file)
            .map_err(|e| PeftError::io(&ref_file, e))?
            .trim()
            .to_string()
    } else {
        id.revision.clone()
    };
    // A ref names a commit hash: anything else (a path, `..`) must not lead out of the cache.
    let hash_like = |c: &str| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric());
    if ref_file.is_file() && !hash_like(&commit) {
        return Err(PeftError::InvalidInput(format!(
            "--model {spec}: {} names `{commit}`, not a commit hash",
            ref_file.display()
        )));
    }
    let snapshot = snapshots.join(&commit);
    if !snapshot.is_dir() {
        return Err(missing(format!(
            "revision `{}` of {} is not",
            id.revision, id.repo
        )));
    }
    if !snapshot.join("config.json").is_file() {
        return Err(missing(format!(
            "{}'s snapshot {commit} has no config.json",
            id.repo
        )));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cache: `org/model` with `main` and a `v1` tag pointing at two snapshots.
    fn fake_cache() -> tempfile::TempDir {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--model");
        for (commit, _) in [("aaaa1111", "main"), ("bbbb2222", "v1")] {
            let snap = repo.join("snapshots").join(commit);
            std::fs::create_dir_all(&snap).unwrap();
            std::fs::write(
                snap.join("config.json"),
                format!("{{\"commit\":\"{commit}\"}}"),
            )
            .unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "aaaa1111\n").unwrap();
        std::fs::write(repo.join("refs/v1"), "bbbb2222").unwrap();
        // A repo downloaded only partly: a snapshot without config.json.
        let partial = cache.path().join("models--org--partial/snapshots/cccc");
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::create_dir_all(cache.path().join("models--org--partial/refs")).unwrap();
        std::fs::write(cache.path().join("models--org--partial/refs/main"), "cccc").unwrap();
        cache
    }

    #[test]
    fn repo_ids_resolve_through_refs_and_snapshots() {
        let cache = fake_cache();
        let snaps = cache.path().join("models--org--model/snapshots");
        let main = resolve_model_in("org/model", cache.path()).unwrap();
        assert_eq!(main, snaps.join("aaaa1111"));
        let tag = resolve_model_in("org/model@v1", cache.path()).unwrap();
        assert_eq!(tag, snaps.join("bbbb2222"));
        let commit = resolve_model_in("org/model@bbbb2222", cache.path()).unwrap();
        assert_eq!(commit, snaps.join("bbbb2222"));
    }

    #[test]
    fn missing_repos_and_revisions_name_the_cache() {
        let cache = fake_cache();
        let err = resolve_model_in("org/absent", cache.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/absent is not in the Hugging Face cache"),
            "{err}"
        );
        assert!(err.contains(&cache.path().display().to_string()), "{err}");
        assert!(err.contains("hf download org/absent"), "{err}");
        let err = resolve_model_in("org/model@v2", cache.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("revision `v2` of org/model is not"), "{err}");
        assert!(err.contains("--revision v2"), "{err}");
        let err = resolve_model_in("org/partial", cache.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no config.json"), "{err}");
        let not_an_id = resolve_model_in("/no/such/dir", cache.path()).unwrap();
        assert_eq!(not_an_id, Path::new("/no/such/dir"));
    }

    #[test]
    fn folders_win_and_odd_ids_are_not_repo_ids() {
        let cache = fake_cache();
        let dir = cache.path().join("models--org--model");
        let text = dir.display().to_string();
        assert_eq!(resolve_model_in(&text, cache.path()).unwrap(), dir);
        assert_eq!(RepoId::parse("a/b/c"), None);
        assert_eq!(RepoId::parse("../b"), None);
        assert_eq!(RepoId::parse("a/b@../../x"), None);
        // Revisions that would leave the cache when joined to its folders.
        for bad in [
            "a/b@/etc/passwd",
            "a/b@x//y",
            "a/b@x/./y",
            "a/b@x/",
            "a/b@.",
        ] {
            assert_eq!(RepoId::parse(bad), None, "{bad}");
        }
        assert_eq!(
            RepoId::parse("a/b@refs/pr/1").map(|id| id.revision),
            Some("refs/pr/1".to_string())
        );
        // A ref file naming a path instead of a commit is refused.
        let refs = dir.join("refs");
        std::fs::write(refs.join("evil"), "../../../../etc").unwrap();
        let err = resolve_model_in("org/model@evil", cache.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a commit hash"), "{err}");
        assert_eq!(
            RepoId::parse("Qwen/Qwen2.5-0.5B"),
            Some(RepoId {
                repo: "Qwen/Qwen2.5-0.5B".into(),
                revision: "main".into()
            })
        );
    }
}
