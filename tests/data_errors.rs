//! Bad data on disk gives a clear error naming the file and what is wrong; CIFAR's binary format
//! is read from files written here in the real layout.

use std::io::Write;
use std::path::Path;

use pnn::data::{Dataset, DatasetKind};

fn idx_images(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [0x0803u32, n, rows, cols] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend_from_slice(pixels);
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0801u32.to_be_bytes());
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A small but well-formed MNIST directory: 3 training and 2 test images.
fn write_mnist(root: &Path) {
    let dir = root.join("mnist");
    std::fs::create_dir_all(&dir).unwrap();
    let px: Vec<u8> = (0..3 * 784).map(|i| (i % 256) as u8).collect();
    std::fs::write(
        dir.join("train-images-idx3-ubyte.gz"),
        gz(&idx_images(3, 28, 28, &px)),
    )
    .unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx_labels(&[1, 2, 3])).unwrap();
    std::fs::write(
        dir.join("t10k-images-idx3-ubyte"),
        idx_images(2, 28, 28, &px[..2 * 784]),
    )
    .unwrap();
    std::fs::write(
        dir.join("t10k-labels-idx1-ubyte.gz"),
        gz(&idx_labels(&[4, 5])),
    )
    .unwrap();
}

fn load_err(root: &Path) -> String {
    Dataset::load(DatasetKind::Mnist, root)
        .expect_err("bad data was accepted")
        .to_string()
}

#[test]
fn well_formed_files_load_gzipped_or_raw() {
    let root = tempfile::tempdir().unwrap();
    write_mnist(root.path());
    let d = Dataset::load(DatasetKind::Mnist, root.path()).unwrap();
    assert_eq!((d.train.len(), d.test.len()), (3, 2));
    assert_eq!(d.train.labels, vec![1, 2, 3]);
    assert_eq!(d.train.image(1)[0], (784 % 256) as u8);
}

#[test]
fn truncated_image_file() {
    let root = tempfile::tempdir().unwrap();
    write_mnist(root.path());
    let path = root.path().join("mnist/t10k-images-idx3-ubyte");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(root.path());
    assert!(
        err.contains("t10k-images-idx3-ubyte") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn truncated_gzip_stream() {
    let root = tempfile::tempdir().unwrap();
    write_mnist(root.path());
    let path = root.path().join("mnist/train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(root.path());
    assert!(
        err.contains("train-images-idx3-ubyte.gz") && err.contains("gzip"),
        "{err}"
    );
}

#[test]
fn bad_magic_number() {
    let root = tempfile::tempdir().unwrap();
    write_mnist(root.path());
    // A label file where an image file should be.
    std::fs::write(
        root.path().join("mnist/t10k-images-idx3-ubyte"),
        idx_labels(&[1, 2]),
    )
    .unwrap();
    let err = load_err(root.path());
    assert!(
        err.contains("t10k-images-idx3-ubyte") && err.contains("bad magic number"),
        "{err}"
    );
}

#[test]
fn label_and_image_counts_disagree() {
    let root = tempfile::tempdir().unwrap();
    write_mnist(root.path());
    std::fs::write(
        root.path().join("mnist/train-labels-idx1-ubyte"),
        idx_labels(&[1, 2]),
    )
    .unwrap();
    let err = load_err(root.path());
    assert!(
        err.contains("3 images but 2 labels") && err.contains("train-labels-idx1-ubyte"),
        "{err}"
    );
}

#[test]
fn missing_dataset_directory_and_file() {
    let root = tempfile::tempdir().unwrap();
    let err = load_err(root.path());
    assert!(
        err.contains("mnist not found") && err.contains("mnist/"),
        "{err}"
    );
    write_mnist(root.path());
    std::fs::remove_file(root.path().join("mnist/t10k-labels-idx1-ubyte.gz")).unwrap();
    let err = load_err(root.path());
    assert!(err.contains("t10k-labels-idx1-ubyte"), "{err}");
}

/// CIFAR-10 binary records: a label byte then 3072 pixel bytes (R, G, B planes of 32x32).
fn cifar10_record(label: u8, seed: u8) -> Vec<u8> {
    let mut r = vec![label];
    r.extend((0..3072u32).map(|i| (i as u8).wrapping_mul(seed)));
    r
}

#[test]
fn cifar10_binary_layout_is_read() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    for b in 1..=5u8 {
        let mut f = cifar10_record(b, b);
        f.extend(cifar10_record(9, b + 10));
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), f).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), cifar10_record(0, 3)).unwrap();
    let d = Dataset::load(DatasetKind::Cifar10, root.path()).unwrap();
    assert_eq!((d.train.len(), d.test.len()), (10, 1));
    assert_eq!(d.train.labels, vec![1, 9, 2, 9, 3, 9, 4, 9, 5, 9]);
    assert_eq!(d.train.image(2), &cifar10_record(2, 2)[1..]);
    // Per-channel statistics: three channels, computed per plane.
    assert_eq!(d.normalizer.mean.len(), 3);
    assert_eq!(d.normalizer.plane, 1024);
    // Truncating a file is refused with its name.
    let f = dir.join("data_batch_3.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1]).unwrap();
    let err = Dataset::load(DatasetKind::Cifar10, root.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data_batch_3.bin") && err.contains("3073-byte records"),
        "{err}"
    );
}

/// The CIFAR normaliser is the per-channel mean and population standard deviation of the
/// training images (thesis section 4.3), each channel its own: computed here from the bytes
/// written, with channels that differ.
#[test]
fn cifar10_normaliser_is_each_channels_training_statistics() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let record = |label: u8, seed: u32| {
        let mut r = vec![label];
        for c in 0..3u32 {
            r.extend((0..1024u32).map(|i| ((i * (seed + 7 * c) + 40 * c) % 97 + 50 * c) as u8));
        }
        r
    };
    let mut train = Vec::new();
    for b in 1..=5u8 {
        let batch = [record(b, b as u32), record(9, 3 * b as u32 + 1)];
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), batch.concat()).unwrap();
        train.extend(batch);
    }
    // The test set must not enter the statistics.
    let mut bright = vec![255u8; 3073];
    bright[0] = 0;
    std::fs::write(dir.join("test_batch.bin"), bright).unwrap();
    let d = Dataset::load(DatasetKind::Cifar10, root.path()).unwrap();
    for c in 0..3 {
        let values: Vec<f64> = (train.iter())
            .flat_map(|r| r[1 + c * 1024..1 + (c + 1) * 1024].iter())
            .map(|&v| v as f64 / 255.0)
            .collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let (m, s) = (d.normalizer.mean[c] as f64, d.normalizer.std[c] as f64);
        assert!(
            (m - mean).abs() < 1e-6,
            "channel {c}: mean {m}, want {mean}"
        );
        assert!((s - std).abs() < 1e-6, "channel {c}: std {s}, want {std}");
        // A normalised pixel of that channel.
        let mut x = Vec::new();
        d.normalizer.batch(&d.train, &[0], &mut x);
        let raw = train[0][1 + c * 1024 + 5] as f64 / 255.0;
        let got = x[c * 1024 + 5] as f64;
        assert!(
            (got - (raw - mean) / std).abs() < 1e-5,
            "channel {c}: {got}"
        );
    }
    assert!(
        d.normalizer.mean[0] < d.normalizer.mean[1] && d.normalizer.mean[1] < d.normalizer.mean[2]
    );
}

#[test]
fn cifar100_uses_the_fine_label() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    let rec = |coarse: u8, fine: u8| {
        let mut r = vec![coarse, fine];
        r.extend(std::iter::repeat_n(fine, 3072));
        r
    };
    std::fs::write(dir.join("train.bin"), [rec(3, 42), rec(19, 99)].concat()).unwrap();
    std::fs::write(dir.join("test.bin"), rec(0, 7)).unwrap();
    let d = Dataset::load(DatasetKind::Cifar100, root.path()).unwrap();
    assert_eq!(d.train.labels, vec![42, 99]);
    assert_eq!(d.test.labels, vec![7]);
    assert_eq!(d.classes(), 100);
    std::fs::write(dir.join("test.bin"), rec(0, 100)).unwrap();
    let err = Dataset::load(DatasetKind::Cifar100, root.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("test.bin") && err.contains("label 100 out of range"),
        "{err}"
    );
}
