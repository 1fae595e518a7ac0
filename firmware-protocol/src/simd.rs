//! The one place the workspace asks the CPU which vector instructions it has (host builds only).
//!
//! Every SIMD kernel (direction generation here, the simulator's products and convolutions, the
//! host's loss) dispatches on [`level`], detected once, instead of asking the CPU itself; a kernel
//! whose safe helpers need proof of a feature takes a token ([`Avx2`]) that only detection makes.
//! Every vector path computes the same bits as its portable twin (each kernel's tests compare
//! them), so the level changes speed, never results.

use std::sync::OnceLock;

/// Instruction-set levels the kernels use, in increasing order of what they include.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// No vector kernels: the portable code.
    Portable,
    /// AVX (256-bit float lanes).
    Avx,
    /// AVX2 (256-bit integer lanes too).
    Avx2,
    /// AVX2 and fused multiply-add.
    Avx2Fma,
}

/// The level this CPU supports, detected on first use.
pub fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    if !std::is_x86_feature_detected!("avx") {
        SimdLevel::Portable
    } else if !std::is_x86_feature_detected!("avx2") {
        SimdLevel::Avx
    } else if !std::is_x86_feature_detected!("fma") {
        SimdLevel::Avx2
    } else {
        SimdLevel::Avx2Fma
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Portable
}

/// Proof that the CPU has AVX2: only [`Avx2::detect`] makes one, so a kernel's safe helpers that
/// take it may use AVX2 intrinsics soundly.
#[derive(Clone, Copy, Debug)]
pub struct Avx2(());

impl Avx2 {
    pub fn detect() -> Option<Self> {
        (level() >= SimdLevel::Avx2).then_some(Avx2(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_exists_exactly_where_the_level_allows_it() {
        assert_eq!(Avx2::detect().is_some(), level() >= SimdLevel::Avx2);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            level() >= SimdLevel::Avx2Fma,
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        );
    }
}
