//! The IDX format of MNIST and Fashion-MNIST, gzipped or raw (see `shared/data/README.md`).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{DataError, DatasetKind, Split};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// An IDX file of unsigned bytes: its dimensions and data.
#[derive(Debug)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

fn format_err(path: &Path, what: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Reads a whole file, inflating it if it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format_err(path, format!("corrupt or truncated gzip stream ({e})")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Reads an IDX file of u8 values and checks its magic number and length.
pub fn read_idx(path: &Path, expected_magic: u32) -> Result<IdxArray, DataError> {
    let bytes = read_maybe_gz(path)?;
    if bytes.len() < 4 {
        return Err(format_err(
            path,
            format!("truncated: {} bytes, no IDX header", bytes.len()),
        ));
    }
    let magic = u32::from_be_bytes(bytes[0..4].try_into().unwrap());
    if magic != expected_magic {
        return Err(format_err(
            path,
            format!(
                "bad magic number {magic:#010x}, expected {expected_magic:#010x} (not an IDX {} file)",
                if expected_magic == IMAGES_MAGIC {
                    "image"
                } else {
                    "label"
                }
            ),
        ));
    }
    let ndims = (magic & 0xff) as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(format_err(
            path,
            format!("truncated header: {} bytes, need {header}", bytes.len()),
        ));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let expected: usize = dims.iter().product();
    let got = bytes.len() - header;
    if got != expected {
        return Err(format_err(
            path,
            format!(
                "{} data: header {dims:?} promises {expected} bytes, file has {got}",
                if got < expected {
                    "truncated"
                } else {
                    "oversized"
                }
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// The first of `names` (each tried gzipped, then raw) that exists in `dir`.
fn find(dir: &Path, names: &[&str], kind: DatasetKind) -> Result<PathBuf, DataError> {
    let mut looked = Vec::new();
    for name in names {
        for candidate in [format!("{name}.gz"), name.to_string()] {
            let p = dir.join(&candidate);
            if p.is_file() {
                return Ok(p);
            }
            looked.push(candidate);
        }
    }
    Err(DataError::Missing {
        dataset: kind,
        dir: dir.to_path_buf(),
        looked_for: looked.join(", "),
    })
}

fn load_split(
    dir: &Path,
    kind: DatasetKind,
    prefix: &str,
    classes: usize,
) -> Result<Split, DataError> {
    let images_path = find(
        dir,
        &[
            &format!("{prefix}-images-idx3-ubyte"),
            &format!("{prefix}-images.idx3-ubyte"),
        ],
        kind,
    )?;
    let labels_path = find(
        dir,
        &[
            &format!("{prefix}-labels-idx1-ubyte"),
            &format!("{prefix}-labels.idx1-ubyte"),
        ],
        kind,
    )?;
    let images = read_idx(&images_path, IMAGES_MAGIC)?;
    let labels = read_idx(&labels_path, LABELS_MAGIC)?;
    let (_, h, w) = kind.image_shape();
    if images.dims.len() != 3 || images.dims[1] != h || images.dims[2] != w {
        return Err(format_err(
            &images_path,
            format!("images are {:?}, expected (N, {h}, {w})", images.dims),
        ));
    }
    if images.dims[0] != labels.dims[0] {
        return Err(DataError::CountMismatch {
            images: images_path,
            labels: labels_path,
            image_count: images.dims[0],
            label_count: labels.dims[0],
        });
    }
    if let Some(bad) = labels.data.iter().find(|&&l| l as usize >= classes) {
        return Err(format_err(
            &labels_path,
            format!("label {bad} out of range 0..{classes}"),
        ));
    }
    Ok(Split {
        images: images.data,
        labels: labels.data,
        sample_len: h * w,
    })
}

pub(super) fn load_idx_dataset(
    kind: DatasetKind,
    data_dir: &Path,
) -> Result<(Split, Split), DataError> {
    let dir = dataset_dir(kind, data_dir)?;
    let classes = kind.classes();
    Ok((
        load_split(&dir, kind, "train", classes)?,
        load_split(&dir, kind, "t10k", classes)?,
    ))
}

/// The test split alone.
pub(super) fn load_idx_test(kind: DatasetKind, data_dir: &Path) -> Result<Split, DataError> {
    let dir = dataset_dir(kind, data_dir)?;
    load_split(&dir, kind, "t10k", kind.classes())
}

fn dataset_dir(kind: DatasetKind, data_dir: &Path) -> Result<std::path::PathBuf, DataError> {
    let dir = data_dir.join(kind.name());
    if !dir.is_dir() {
        return Err(DataError::Missing {
            dataset: kind,
            dir: data_dir.to_path_buf(),
            looked_for: format!("directory {}/", kind.name()),
        });
    }
    Ok(dir)
}
