//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// `shared/` beside the repository (as on CI and in the main checkout), or `$PNN_SHARED_DIR`.
pub fn shared_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PNN_SHARED_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub mod replay;

/// The real datasets: `$PNN_DATA_DIR`, else `shared/data`.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("PNN_DATA_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => shared_dir().join("data"),
    }
}

/// An array from an `.npz` file: shape and values.
pub struct NpyArray<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

/// Reads every array of an `.npz` archive as raw `.npy` bytes, by name (without `.npy`).
pub fn read_npz(path: &Path) -> HashMap<String, Vec<u8>> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut zip = zip::ZipArchive::new(file).expect("npz is a zip archive");
    let mut out = HashMap::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).unwrap();
        let name = entry
            .name()
            .expect("entry name")
            .trim_end_matches(".npy")
            .to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        out.insert(name, bytes);
    }
    out
}

pub fn npy<T: npyz::Deserialize>(arrays: &HashMap<String, Vec<u8>>, name: &str) -> NpyArray<T> {
    let bytes = arrays
        .get(name)
        .unwrap_or_else(|| panic!("array {name} missing"));
    let file = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = file.shape().iter().map(|&d| d as usize).collect();
    NpyArray {
        shape,
        data: file.into_vec().unwrap(),
    }
}

/// The `pnn-train` under test: this build's, or `$PNN_TRAIN_BIN` (to run a test against another
/// build, e.g. to show that it fails on an older one).
pub fn train_binary() -> PathBuf {
    std::env::var_os("PNN_TRAIN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pnn-train")))
}

/// A `pnn-train` command with `args`, the data directory set and no standard input.
pub fn train_command(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(train_binary());
    c.args(args)
        .env("PNN_DATA_DIR", data_dir())
        .stdin(std::process::Stdio::null());
    c
}

/// Runs [`train_command`] to its end.
pub fn train_output(args: &[&str]) -> std::process::Output {
    train_command(args).output().expect("pnn-train runs")
}

/// Runs `pnn-train` with `args`; returns (exit code, stdout, stderr).
pub fn pnn_train(args: &[&str]) -> (i32, String, String) {
    let out = train_output(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON object on the last line of stdout.
pub fn summary(stdout: &str) -> serde_json::Value {
    let last = stdout.lines().last().expect("stdout has a line");
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {last}"))
}
