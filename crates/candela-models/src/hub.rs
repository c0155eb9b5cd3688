//! Where a model's files are: a local path, or a model id in the Hugging Face hub cache.
//!
//! Offline only: an id resolves through the cache that `huggingface-cli download` (or
//! hf-hub) filled, laid out as
//!
//! ```text
//! $HF_HUB_CACHE (or $HF_HOME/hub, or ~/.cache/huggingface/hub)
//!   models--<org>--<name>/
//!     refs/main                 <- text file: commit hash
//!     snapshots/<hash>/         <- config.json, *.safetensors, tokenizer.json, or *.gguf
//! ```
//!
//! A spec may pin a revision with `@`: `org/name@v1.0` (a ref) or `org/name@<hash>`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The files of one model, found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelFiles {
    /// A single GGUF file (weights, config and tokenizer metadata).
    Gguf {
        /// The file.
        path: PathBuf,
    },
    /// A Hugging Face checkpoint directory: `config.json` + `*.safetensors`.
    Safetensors {
        /// The directory.
        dir: PathBuf,
    },
}

impl ModelFiles {
    /// The directory holding the model's side files (`tokenizer.json`,
    /// `tokenizer_config.json`): the checkpoint directory, or the GGUF file's directory.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Self::Gguf { path } => path.parent(),
            Self::Safetensors { dir } => Some(dir),
        }
    }
}

/// The hub cache directory: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else hf-hub's default.
pub fn hub_cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => hf_hub::Cache::from_env().path().clone(),
    }
}

/// Resolves a path (a `.gguf` file or a checkpoint directory) or a model id (through the
/// hub cache at [`hub_cache_dir`]).
pub fn resolve(spec: &str) -> Result<ModelFiles> {
    resolve_with_cache(spec, &hub_cache_dir())
}

/// As [`resolve`], with an explicit hub cache directory.
pub fn resolve_with_cache(spec: &str, cache_dir: &Path) -> Result<ModelFiles> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(ModelFiles::Gguf {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        return files_in_dir(path);
    }
    let not_found = || Error::ModelNotFound {
        spec: spec.to_string(),
        cache: cache_dir.to_path_buf(),
    };
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (spec, "main"),
    };
    if !is_model_id(id) || revision.is_empty() || revision.contains("..") {
        return Err(not_found());
    }
    let repo = hf_hub::Repo::model(id.to_string());
    let repo_dir = cache_dir.join(repo.folder_name());
    let ref_path = repo_dir.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(hash) => hash.trim().to_string(),
        // Not a ref: a commit hash names its snapshot directly.
        Err(_) => revision.to_string(),
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if commit.is_empty() || commit.contains('/') || !snapshot.is_dir() {
        return Err(not_found());
    }
    files_in_dir(&snapshot)
}

/// `org/name` with no path tricks.
fn is_model_id(id: &str) -> bool {
    let mut parts = id.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn files_in_dir(dir: &Path) -> Result<ModelFiles> {
    if dir.join("config.json").is_file() {
        return Ok(ModelFiles::Safetensors {
            dir: dir.to_path_buf(),
        });
    }
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut ggufs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    ggufs.sort();
    match ggufs.len() {
        1 => Ok(ModelFiles::Gguf {
            path: ggufs.remove(0),
        }),
        0 => Err(Error::NoWeights {
            dir: dir.to_path_buf(),
            reason: "found neither config.json nor a .gguf file".into(),
        }),
        n => Err(Error::NoWeights {
            dir: dir.to_path_buf(),
            reason: format!("{n} .gguf files; pass the path of the one to load"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids() {
        assert!(is_model_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!is_model_id("a/../b"));
        assert!(!is_model_id("../b"));
        assert!(!is_model_id("noslash"));
        assert!(!is_model_id("a/b/c"));
    }
}
