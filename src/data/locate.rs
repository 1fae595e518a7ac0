//! Where the data lives: `--data-dir`, then `PNN_DATA_DIR`, then `./data`, then `../shared/data`.

use std::path::{Path, PathBuf};

use super::DataError;

/// The directories searched, in order, given an explicit `--data-dir`.
pub fn data_dir_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(dir) = explicit {
        // An explicit choice is final: falling back silently would train on other data.
        return vec![dir.to_path_buf()];
    }
    if let Some(env) = std::env::var_os("PNN_DATA_DIR").filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(env)];
    }
    vec![PathBuf::from("data"), PathBuf::from("../shared/data")]
}

/// The first candidate directory that exists.
pub fn resolve_data_dir(explicit: Option<&Path>) -> Result<PathBuf, DataError> {
    let candidates = data_dir_candidates(explicit);
    candidates
        .iter()
        .find(|d| d.is_dir())
        .cloned()
        .ok_or_else(|| DataError::NoDataDir {
            tried: candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}
