//! Real datasets: where they are, how they are read, and how batches are normalised.
//!
//! Images stay `u8` in memory; each batch is normalised on the fly with the per-channel mean and
//! standard deviation of the training set (thesis section 4.3).

mod cifar;
mod idx;
mod locate;

use crate::oracle::Activations;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use cifar::{CifarVariant, read_cifar_file};
pub use idx::read_idx;
pub use locate::{data_dir_candidates, resolve_data_dir};

/// The datasets `pnn` trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    Mnist,
    FashionMnist,
    Cifar10,
    Cifar100,
}

impl DatasetKind {
    pub const ALL: [DatasetKind; 4] = [
        Self::Mnist,
        Self::FashionMnist,
        Self::Cifar10,
        Self::Cifar100,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Mnist => "mnist",
            Self::FashionMnist => "fashion-mnist",
            Self::Cifar10 => "cifar10",
            Self::Cifar100 => "cifar100",
        }
    }

    /// (channels, height, width)
    pub fn image_shape(self) -> (usize, usize, usize) {
        match self {
            Self::Mnist | Self::FashionMnist => (1, 28, 28),
            Self::Cifar10 | Self::Cifar100 => (3, 32, 32),
        }
    }

    pub fn classes(self) -> usize {
        match self {
            Self::Cifar100 => 100,
            _ => 10,
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let norm = s.to_ascii_lowercase().replace(['_', ' '], "-");
        Self::ALL
            .into_iter()
            .find(|k| k.name() == norm || (norm == "fashion" && *k == Self::FashionMnist)
                || (norm == "cifar-10" && *k == Self::Cifar10)
                || (norm == "cifar-100" && *k == Self::Cifar100))
            .ok_or_else(|| {
                format!("unknown dataset '{s}' (expected one of: mnist, fashion-mnist, cifar10, cifar100)")
            })
    }
}

/// Everything that can be wrong with data on disk; each names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("no data directory found; tried {tried}. Pass --data-dir or set PNN_DATA_DIR")]
    NoDataDir { tried: String },
    #[error("{dataset} not found in {dir}: looked for {looked_for}")]
    Missing {
        dataset: DatasetKind,
        dir: PathBuf,
        looked_for: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    #[error(
        "{dataset} in {dir}: the {split} files hold no samples; each split needs at least one (check that the files are complete)"
    )]
    Empty {
        dataset: DatasetKind,
        dir: PathBuf,
        split: &'static str,
    },
    #[error("{images} and {labels} disagree: {image_count} images but {label_count} labels")]
    CountMismatch {
        images: PathBuf,
        labels: PathBuf,
        image_count: usize,
        label_count: usize,
    },
}

/// One split: `len` images of `sample_len` bytes each, and their labels.
#[derive(Clone, Debug)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub sample_len: usize,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` samples (all of them if there are fewer).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.images.truncate(n * self.sample_len);
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * self.sample_len..(i + 1) * self.sample_len]
    }
}

/// A loaded dataset with its normalisation.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub kind: DatasetKind,
    pub train: Split,
    pub test: Split,
    pub normalizer: Normalizer,
}

impl Dataset {
    /// Loads `kind` from the data directory (see [`resolve_data_dir`]).
    pub fn load(kind: DatasetKind, data_dir: &std::path::Path) -> Result<Self, DataError> {
        let (train, test) = match kind {
            DatasetKind::Mnist | DatasetKind::FashionMnist => {
                idx::load_idx_dataset(kind, data_dir)?
            }
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
                cifar::load_cifar_dataset(kind, data_dir)?
            }
        };
        // An empty split would train on nothing and normalise by a mean of no samples (NaN).
        for (split, data) in [("training", &train), ("test", &test)] {
            if data.is_empty() {
                return Err(DataError::Empty {
                    dataset: kind,
                    dir: data_dir.to_path_buf(),
                    split,
                });
            }
        }
        let (channels, _, _) = kind.image_shape();
        let normalizer = Normalizer::from_training_set(&train, channels);
        Ok(Self {
            kind,
            train,
            test,
            normalizer,
        })
    }

    pub fn input_width(&self) -> usize {
        self.train.sample_len
    }

    pub fn classes(&self) -> usize {
        self.kind.classes()
    }
}

/// Per-channel `(x / 255 - mean_c) / std_c`, with mean and population standard deviation of the
/// training set (as torchvision's `Normalize` with statistics computed over the training images).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Values per channel plane (H * W); images are channel-major (C, H, W).
    pub plane: usize,
}

impl Normalizer {
    pub fn from_training_set(train: &Split, channels: usize) -> Self {
        let plane = train.sample_len / channels;
        let mut sum = vec![0u64; channels];
        let mut sum_sq = vec![0u64; channels];
        for img in train.images.chunks_exact(train.sample_len) {
            for (c, px) in img.chunks_exact(plane).enumerate() {
                for &p in px {
                    sum[c] += p as u64;
                    sum_sq[c] += (p as u64) * (p as u64);
                }
            }
        }
        let n = (train.len() * plane) as f64;
        let mean: Vec<f64> = sum.iter().map(|&s| s as f64 / n / 255.0).collect();
        let std: Vec<f32> = sum_sq
            .iter()
            .zip(&mean)
            .map(|(&s, &m)| {
                ((s as f64 / n / (255.0 * 255.0) - m * m).max(0.0).sqrt()).max(1e-12) as f32
            })
            .collect();
        Self {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
            plane,
        }
    }

    /// Normalises the images at `indices` of `split` into `out` (len(indices) x sample_len).
    pub fn batch(&self, split: &Split, indices: &[usize], out: &mut Vec<f32>) {
        // Every value is written below: no need to clear what a reused buffer holds.
        out.resize(indices.len() * split.sample_len, 0.0);
        // The 256 values a pixel can take, per channel, each computed exactly as the formula.
        let tables: Vec<[f32; 256]> = self
            .mean
            .iter()
            .zip(&self.std)
            .map(|(&m, &s)| std::array::from_fn(|p| (p as f32 / 255.0 - m) / s))
            .collect();
        for (n, (&i, sample)) in indices
            .iter()
            .zip(out.chunks_exact_mut(split.sample_len))
            .enumerate()
        {
            // Samples come in shuffled order, each from anywhere in the split: ask for the next
            // one's bytes while this one is converted, or every sample starts with a cache miss.
            if let Some(&next) = indices.get(n + 1) {
                prefetch(split.image(next));
            }
            let planes = split.image(i).chunks_exact(self.plane);
            for ((table, px), dst) in tables
                .iter()
                .zip(planes)
                .zip(sample.chunks_exact_mut(self.plane))
            {
                for (d, &p) in dst.iter_mut().zip(px) {
                    *d = table[p as usize];
                }
            }
        }
    }

    /// [`Normalizer::batch`] into `out` as a batch of activations (its buffer reused).
    pub fn batch_activations(&self, split: &Split, indices: &[usize], out: &mut Activations) {
        self.batch(split, indices, &mut out.data);
        out.rows = indices.len();
        out.width = split.sample_len;
    }
}

/// A hint to bring `bytes` into the cache (a no-op where there is no such instruction).
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch never faults, and the pointer is inside `bytes` anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}
