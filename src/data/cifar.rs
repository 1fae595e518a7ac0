//! The CIFAR-10 and CIFAR-100 binary formats (the "binary version" of the dataset pages).
//!
//! CIFAR-10: `cifar-10-batches-bin/data_batch_{1..5}.bin` and `test_batch.bin`, records of one
//! label byte and 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each row-major 32x32).
//! CIFAR-100: `cifar-100-binary/train.bin` and `test.bin`, records of a coarse label byte, a fine
//! label byte and the same 3072 pixel bytes; the fine label is the class.

use std::path::{Path, PathBuf};

use super::{DataError, DatasetKind, Split};

const PIXELS: usize = 3 * 32 * 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarVariant {
    Cifar10,
    Cifar100,
}

impl CifarVariant {
    fn label_bytes(self) -> usize {
        match self {
            Self::Cifar10 => 1,
            Self::Cifar100 => 2,
        }
    }

    fn classes(self) -> usize {
        match self {
            Self::Cifar10 => 10,
            Self::Cifar100 => 100,
        }
    }
}

/// Reads one binary CIFAR file and appends its records to `split`.
pub fn read_cifar_file(
    path: &Path,
    variant: CifarVariant,
    split: &mut Split,
) -> Result<(), DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let record = variant.label_bytes() + PIXELS;
    if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            what: format!(
                "{} bytes is not a whole number of {record}-byte records (truncated or not a {variant:?} binary file)",
                bytes.len()
            ),
        });
    }
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = rec[variant.label_bytes() - 1];
        if label as usize >= variant.classes() {
            return Err(DataError::Format {
                path: path.to_path_buf(),
                what: format!(
                    "record {i}: label {label} out of range 0..{}",
                    variant.classes()
                ),
            });
        }
        split.labels.push(label);
        split
            .images
            .extend_from_slice(&rec[variant.label_bytes()..]);
    }
    Ok(())
}

fn first_dir(data_dir: &Path, names: &[&str], kind: DatasetKind) -> Result<PathBuf, DataError> {
    names
        .iter()
        .map(|n| data_dir.join(n))
        .find(|p| p.is_dir())
        .ok_or_else(|| DataError::Missing {
            dataset: kind,
            dir: data_dir.to_path_buf(),
            looked_for: names
                .iter()
                .map(|n| format!("{n}/"))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn require(path: PathBuf, kind: DatasetKind) -> Result<PathBuf, DataError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(DataError::Missing {
            dataset: kind,
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            looked_for: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
    }
}

pub(super) fn load_cifar_dataset(
    kind: DatasetKind,
    data_dir: &Path,
) -> Result<(Split, Split), DataError> {
    let empty = || Split {
        images: Vec::new(),
        labels: Vec::new(),
        sample_len: PIXELS,
    };
    let (mut train, mut test) = (empty(), empty());
    match kind {
        DatasetKind::Cifar10 => {
            let dir = first_dir(data_dir, &["cifar-10-batches-bin", "cifar10"], kind)?;
            for i in 1..=5 {
                let path = require(dir.join(format!("data_batch_{i}.bin")), kind)?;
                read_cifar_file(&path, CifarVariant::Cifar10, &mut train)?;
            }
            read_cifar_file(
                &require(dir.join("test_batch.bin"), kind)?,
                CifarVariant::Cifar10,
                &mut test,
            )?;
        }
        DatasetKind::Cifar100 => {
            let dir = first_dir(data_dir, &["cifar-100-binary", "cifar100"], kind)?;
            read_cifar_file(
                &require(dir.join("train.bin"), kind)?,
                CifarVariant::Cifar100,
                &mut train,
            )?;
            read_cifar_file(
                &require(dir.join("test.bin"), kind)?,
                CifarVariant::Cifar100,
                &mut test,
            )?;
        }
        _ => unreachable!("not a CIFAR dataset"),
    }
    Ok((train, test))
}
