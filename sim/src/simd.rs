//! The one place the simulator chooses between its AVX / AVX2 kernels and their portable twins.
//!
//! The CPU is detected once, by `firmware_protocol::simd` (shared with the direction generator);
//! every kernel of this crate asks here which build to run: [`avx`], [`avx2`], [`avx2_fma`]
//! (always `false` off x86-64), and a kernel written once and compiled twice uses
//! [`multiversion!`](crate::simd::multiversion). The kernels themselves sit next to their
//! portable twins: `packed.rs` (the packed dense product), `sparse.rs` (the sparse product and
//! the compaction of a sparse row), `conv/kernels.rs` (the conv block's elementwise kernels).

#[cfg(target_arch = "x86_64")]
use firmware_protocol::simd::{SimdLevel, level};

/// Whether this CPU runs the AVX builds (the sparse product's panel transpose).
#[inline]
pub(crate) fn avx() -> bool {
    #[cfg(target_arch = "x86_64")]
    return level() >= SimdLevel::Avx;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU runs the AVX2 builds (the compaction of a sparse row).
#[inline]
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return level() >= SimdLevel::Avx2;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU runs the AVX2 + FMA builds (the products' micro-kernels, the conv block's
/// elementwise kernels).
#[inline]
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return level() >= SimdLevel::Avx2Fma;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Defines `pub(crate) fn $name` that runs `$body` (an `#[inline(always)]` function) built for
/// AVX2 + FMA where [`avx2_fma`] says the CPU has them, and built for the baseline target
/// otherwise: the same IEEE operations in the same order, so the same bits either way.
macro_rules! multiversion {
    ($(#[$doc:meta])* fn $name:ident / $wide:ident / $body:ident ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if $crate::simd::avx2_fma() {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { $wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $wide($($arg: $ty),*) $(-> $ret)? {
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;
