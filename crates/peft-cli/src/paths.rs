//! The folders a command is given, checked before anything is loaded: a missing folder, a
//! folder that is not a model (or not an adapter), a model without the tokenizer a command
//! needs, and an adapter folder given where a model is expected (or the reverse) each get one
//! line naming the flag, the path and what is wrong — instead of the first file a loader fails
//! to open.

use std::path::Path;

use anyhow::{Result, bail};

/// A model's configuration file (transformers' `config.json`).
const MODEL_CONFIG: &str = "config.json";
/// A PEFT adapter's configuration file.
const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The tokenizer file peft-rs reads (the `tokenizers` library's).
const TOKENIZER: &str = "tokenizer.json";

/// Checks that `dir`, given as `flag` (`--model`), is a folder at all.
fn folder(flag: &str, dir: &Path) -> Result<()> {
    if !dir.exists() {
        bail!("{flag} {}: no such folder", dir.display());
    }
    if !dir.is_dir() {
        bail!("{flag} {}: not a folder", dir.display());
    }
    Ok(())
}

/// Checks that `dir` (given as `--model`) is a Hugging Face model folder, and that it has a
/// tokenizer where the command needs one (`needs_tokenizer`: `generate`, `serve`, `train`).
pub(crate) fn check_model(dir: &Path, needs_tokenizer: bool) -> Result<()> {
    folder("--model", dir)?;
    if !dir.join(MODEL_CONFIG).is_file() {
        if dir.join(ADAPTER_CONFIG).is_file() {
            bail!(
                "--model {}: a PEFT adapter folder ({ADAPTER_CONFIG}), not a model: pass it as \
                 --adapter and its base model as --model",
                dir.display()
            );
        }
        bail!(
            "--model {}: not a Hugging Face model folder (no {MODEL_CONFIG})",
            dir.display()
        );
    }
    if needs_tokenizer && !dir.join(TOKENIZER).is_file() {
        bail!(
            "--model {}: no {TOKENIZER} (this command reads text, so it needs the model's \
             tokenizer)",
            dir.display()
        );
    }
    Ok(())
}

/// Checks that `dir` (given as `--adapter`) is a PEFT adapter folder.
pub(crate) fn check_adapter(dir: &Path) -> Result<()> {
    folder("--adapter", dir)?;
    if !dir.join(ADAPTER_CONFIG).is_file() {
        if dir.join(MODEL_CONFIG).is_file() {
            bail!(
                "--adapter {}: a model folder ({MODEL_CONFIG}), not a PEFT adapter \
                 ({ADAPTER_CONFIG}): pass a model as --model",
                dir.display()
            );
        }
        bail!(
            "--adapter {}: not a PEFT adapter folder (no {ADAPTER_CONFIG})",
            dir.display()
        );
    }
    Ok(())
}

/// `--model FILE.gguf`: the GGUF file imported once as a Hugging Face folder (config,
/// tokenizer, de-quantised weights; `peft_gguf::import_gguf`) in the cache, which is then the
/// model folder. The cache is `$PEFT_GGUF_CACHE`, else `$XDG_CACHE_HOME/peft-rs/gguf`, else
/// `~/.cache/peft-rs/gguf`; an entry is keyed by the file's name, size and modification time,
/// and written under a temporary name renamed into place when complete. Any other path is
/// returned as it is.
pub(crate) fn import_gguf_model(path: &Path) -> Result<std::path::PathBuf> {
    if !(path.is_file() && path.extension().is_some_and(|e| e == "gguf")) {
        return Ok(path.to_path_buf());
    }
    let meta = std::fs::metadata(path)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let stem = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let cache = match std::env::var_os("PEFT_GGUF_CACHE") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => match std::env::var_os("XDG_CACHE_HOME") {
            Some(dir) => std::path::PathBuf::from(dir).join("peft-rs/gguf"),
            None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/peft-rs/gguf"),
        },
    };
    let target = cache.join(format!("{stem}-{}-{mtime}", meta.len()));
    if target.join(MODEL_CONFIG).is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(&cache)?;
    let staging = cache.join(format!(".{stem}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let imported = peft_gguf::import_gguf(path, &staging)
        .map_err(|e| anyhow::anyhow!("--model {}: {e}", path.display()));
    if let Err(e) = imported {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    std::fs::rename(&staging, &target)?;
    eprintln!("imported {} as {}", path.display(), target.display());
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each mistake in a folder gives its own message, naming the path.
    #[test]
    fn each_mistake_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let model = root.join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join(MODEL_CONFIG), "{}").unwrap();
        let adapter = root.join("adapter");
        std::fs::create_dir(&adapter).unwrap();
        std::fs::write(adapter.join(ADAPTER_CONFIG), "{}").unwrap();
        let empty = root.join("empty");
        std::fs::create_dir(&empty).unwrap();
        let file = root.join("file");
        std::fs::write(&file, "x").unwrap();
        let missing = root.join("missing");

        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert_eq!(
            err(check_model(&missing, false)),
            format!("--model {}: no such folder", missing.display())
        );
        assert_eq!(
            err(check_model(&file, false)),
            format!("--model {}: not a folder", file.display())
        );
        assert!(
            err(check_model(&empty, false))
                .ends_with("not a Hugging Face model folder (no config.json)")
        );
        assert!(err(check_model(&adapter, false)).contains("a PEFT adapter folder"));
        check_model(&model, false).unwrap();
        assert!(err(check_model(&model, true)).contains("no tokenizer.json"));
        std::fs::write(model.join(TOKENIZER), "{}").unwrap();
        check_model(&model, true).unwrap();

        assert_eq!(
            err(check_adapter(&missing)),
            format!("--adapter {}: no such folder", missing.display())
        );
        assert!(
            err(check_adapter(&model)).contains("a model folder (config.json), not a PEFT adapter")
        );
        assert!(
            err(check_adapter(&empty))
                .ends_with("not a PEFT adapter folder (no adapter_config.json)")
        );
        check_adapter(&adapter).unwrap();
    }
}
