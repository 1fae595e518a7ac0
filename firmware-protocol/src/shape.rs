//! The one vocabulary of layer shapes, shared by the host, the simulator, the emulator, export and
//! device firmware: what a layer is ([`LayerShape`]), a CNN block's geometry ([`ConvGeometry`]),
//! how its parameters may be cut into chunks ([`ChunkUnits`], thesis section 4.4) and whether a
//! clean pass trains or evaluates ([`ForwardMode`]).
//!
//! Every width, parameter count and chunk rule is derived here and nowhere else. The types travel
//! on the wire inside [`crate::message::LayerDescriptor`]: postcard writes `usize` and `u32` as the
//! same varint, so these types encode exactly as the protocol's version-2 descriptor did.

use core::fmt;
use core::ops::Range;

use serde::{Deserialize, Serialize};

/// Taps of a 3x3 convolution kernel.
pub const CONV_TAPS: usize = 9;

/// A CNN block (thesis Appendix A, Table 4): Conv2d 3x3 (stride 1, padding 1) -> BatchNorm2d ->
/// ReLU on `in_channels` maps of `height` x `width`. Its features are the ReLU output projected
/// per output channel by a fixed random `A_c` (`proj_dim` x HW, section 4.4) drawn from
/// `projection_seed`; its next-layer input is the ReLU output max-pooled 2x2. Parameters per
/// output channel, in order: conv weights (in_channels x 3 x 3), conv bias, BatchNorm scale,
/// BatchNorm shift; chunks are whole channels. Inputs and outputs are per sample in CHW order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConvGeometry {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Spatial size of the input (and of the ReLU output: padding 1 keeps it).
    pub height: usize,
    pub width: usize,
    /// d: projected features per output channel.
    pub proj_dim: usize,
    /// Names the block's fixed projection `A`.
    pub projection_seed: u64,
}

/// Why a shape cannot be a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapeError {
    /// A dense layer or conv block with no inputs, outputs, channels or projected features.
    Empty,
    /// A conv block's map is smaller than the 2x2 max-pool.
    TooSmallToPool { height: usize, width: usize },
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str(
                "a layer needs at least one input and one output (a conv block: one input \
                 channel, one output channel and one projected feature)",
            ),
            Self::TooSmallToPool { height, width } => write!(
                f,
                "a conv block's input must be at least 2x2 to be max-pooled, got {height}x{width}"
            ),
        }
    }
}

impl ConvGeometry {
    /// Refuses geometries a block cannot have: empty dimensions, or a map too small to pool.
    pub const fn check(&self) -> Result<(), ShapeError> {
        if self.in_channels == 0 || self.out_channels == 0 || self.proj_dim == 0 {
            return Err(ShapeError::Empty);
        }
        if self.height < 2 || self.width < 2 {
            return Err(ShapeError::TooSmallToPool {
                height: self.height,
                width: self.width,
            });
        }
        Ok(())
    }

    /// Conv weights per output channel (C_in x 3 x 3).
    pub const fn kernel_len(&self) -> usize {
        self.in_channels.saturating_mul(CONV_TAPS)
    }

    /// Parameters per output channel: conv weights, conv bias, BatchNorm scale and shift. The one
    /// place this count (`C_in*9+3`) is written.
    pub const fn channel_params(&self) -> usize {
        self.kernel_len().saturating_add(3)
    }

    pub const fn param_count(&self) -> usize {
        self.out_channels.saturating_mul(self.channel_params())
    }

    /// H*W of the map that is projected (before pooling).
    pub const fn spatial(&self) -> usize {
        self.height.saturating_mul(self.width)
    }

    pub const fn input_width(&self) -> usize {
        self.in_channels.saturating_mul(self.spatial())
    }

    /// C*d goodness features per sample.
    pub const fn feature_width(&self) -> usize {
        self.out_channels.saturating_mul(self.proj_dim)
    }

    /// (H/2, W/2), rounded down as `MaxPool2d(2, 2)` does.
    pub const fn pooled(&self) -> (usize, usize) {
        (self.height / 2, self.width / 2)
    }

    /// Values per sample passed to the next block (C x H/2 x W/2).
    pub const fn output_width(&self) -> usize {
        let (ph, pw) = self.pooled();
        self.out_channels.saturating_mul(ph).saturating_mul(pw)
    }
}

/// What one layer is. Variants are only ever appended, so a layer's encoding never changes with
/// the protocol version that added another kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LayerShape {
    /// Linear + ReLU: weights (outputs x inputs, row-major) then bias.
    Dense { inputs: usize, outputs: usize },
    /// A CNN block (see [`ConvGeometry`]); protocol version 2.
    Conv(ConvGeometry),
}

impl LayerShape {
    pub const fn dense(inputs: usize, outputs: usize) -> Self {
        Self::Dense { inputs, outputs }
    }

    /// A CNN block on `in_channels` maps of `height` x `width` (see [`ConvGeometry`]).
    pub const fn conv(
        in_channels: usize,
        out_channels: usize,
        (height, width): (usize, usize),
        proj_dim: usize,
        projection_seed: u64,
    ) -> Self {
        Self::Conv(ConvGeometry {
            in_channels,
            out_channels,
            height,
            width,
            proj_dim,
            projection_seed,
        })
    }

    /// Values of state a layer keeps besides its parameters: a CNN block's BatchNorm running
    /// statistics (the means, then the variances, one per output channel); none for a dense
    /// layer. [`crate::message::Request::ReadLayerState`] returns them.
    pub const fn state_len(&self) -> usize {
        match self {
            Self::Dense { .. } => 0,
            Self::Conv(g) => 2 * g.out_channels,
        }
    }

    /// Refuses shapes no layer can have.
    pub const fn check(&self) -> Result<(), ShapeError> {
        match self {
            Self::Dense { inputs, outputs } => {
                if *inputs == 0 || *outputs == 0 {
                    Err(ShapeError::Empty)
                } else {
                    Ok(())
                }
            }
            Self::Conv(g) => g.check(),
        }
    }

    /// The block's geometry, for a conv block.
    pub const fn conv_geometry(&self) -> Option<&ConvGeometry> {
        match self {
            Self::Dense { .. } => None,
            Self::Conv(g) => Some(g),
        }
    }

    /// Values per sample of the layer's input.
    pub const fn input_width(&self) -> usize {
        match self {
            Self::Dense { inputs, .. } => *inputs,
            Self::Conv(g) => g.input_width(),
        }
    }

    /// Values per sample of the features the goodness `G_l = a_l M_l` is computed from.
    pub const fn feature_width(&self) -> usize {
        match self {
            Self::Dense { outputs, .. } => *outputs,
            Self::Conv(g) => g.feature_width(),
        }
    }

    /// Values per sample passed to the next layer.
    pub const fn output_width(&self) -> usize {
        match self {
            Self::Dense { outputs, .. } => *outputs,
            Self::Conv(g) => g.output_width(),
        }
    }

    /// Parameters `W_l` in the device's flat layout.
    pub const fn param_count(&self) -> usize {
        match self {
            Self::Dense { inputs, outputs } => {
                outputs.saturating_mul(*inputs).saturating_add(*outputs)
            }
            Self::Conv(g) => g.param_count(),
        }
    }

    /// Parameter groups that a chunk must not split (thesis section 4.4).
    pub const fn chunk_units(&self) -> ChunkUnits {
        match self {
            Self::Dense { .. } => ChunkUnits::Flat,
            Self::Conv(g) => ChunkUnits::Groups {
                size: g.channel_params(),
            },
        }
    }

    /// The chunks of this layer's parameters (see [`ChunkUnits::chunks`]).
    pub fn weight_chunks(&self, chunk_max: usize) -> impl Iterator<Item = Range<usize>> + Clone {
        self.chunk_units().chunks(self.param_count(), chunk_max)
    }

    /// Whether the next layer's input differs from the features (a conv block pools), and so
    /// follows them in a clean forward pass's result on the wire.
    pub const fn has_separate_output(&self) -> bool {
        matches!(self, Self::Conv(_))
    }

    /// Values per sample of a clean forward pass's result on the wire: the features, then the
    /// next-layer input where it differs from them.
    pub const fn forward_width(&self) -> usize {
        if self.has_separate_output() {
            self.feature_width().saturating_add(self.output_width())
        } else {
            self.feature_width()
        }
    }

    /// The feature columns that perturbing the parameters in `chunk` can change: a dense layer's
    /// outputs whose weight rows or bias entries the chunk covers, a conv block's projected
    /// features of the channels it covers. Every other feature keeps its clean value.
    pub fn touched_features(&self, chunk: &Range<usize>) -> Range<usize> {
        if chunk.is_empty() {
            return 0..0;
        }
        match *self {
            Self::Dense { inputs, outputs } => {
                let nw = inputs * outputs;
                let (mut lo, mut hi) = (outputs, 0);
                if chunk.start < nw {
                    lo = chunk.start / inputs;
                    hi = chunk.end.min(nw).div_ceil(inputs);
                }
                if chunk.end > nw {
                    lo = lo.min(chunk.start.max(nw) - nw);
                    hi = hi.max(chunk.end - nw);
                }
                lo.min(outputs)..hi.min(outputs)
            }
            Self::Conv(g) => {
                let per_channel = g.channel_params();
                let first = (chunk.start / per_channel).min(g.out_channels);
                let end = chunk.end.div_ceil(per_channel).min(g.out_channels);
                first * g.proj_dim..end * g.proj_dim
            }
        }
    }
}

/// How a layer's parameters may be cut into chunks (thesis section 4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChunkUnits {
    /// Any consecutive range (MLP layers).
    Flat,
    /// Whole consecutive groups of this many parameters (a conv block's output channels).
    Groups { size: usize },
}

impl ChunkUnits {
    /// The chunks of `W_l` (thesis section 4.4): consecutive ranges of at most `chunk_max`
    /// parameters over the flat layout (weights then bias); with [`ChunkUnits::Groups`], as many
    /// whole groups as fit in `chunk_max` (a group larger than `chunk_max` is a chunk by itself).
    /// The one place this rule is written.
    pub fn chunks(
        self,
        param_count: usize,
        chunk_max: usize,
    ) -> impl Iterator<Item = Range<usize>> + Clone {
        assert!(chunk_max > 0, "chunk_max must be positive");
        let step = match self {
            Self::Flat => chunk_max,
            Self::Groups { size } => {
                assert!(
                    size > 0 && param_count.is_multiple_of(size),
                    "groups must cover the parameters"
                );
                (chunk_max / size).max(1) * size
            }
        };
        (0..param_count)
            .step_by(step)
            .map(move |start| start..(start + step).min(param_count))
    }

    /// Whether `chunk` of a layer with `param_count` parameters respects these units.
    pub fn allows(&self, chunk: &Range<usize>, param_count: usize) -> bool {
        if chunk.start > chunk.end || chunk.end > param_count {
            return false;
        }
        match *self {
            Self::Flat => true,
            Self::Groups { size } => {
                size > 0
                    && chunk.start.is_multiple_of(size)
                    && (chunk.end.is_multiple_of(size) || chunk.end == param_count)
            }
        }
    }
}

/// Whether a clean forward pass is part of training (BatchNorm uses and commits batch
/// statistics) or evaluation (BatchNorm uses running statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ForwardMode {
    Train,
    Eval,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_widths_and_counts_follow_the_geometry() {
        let s = LayerShape::conv(3, 32, (32, 32), 16, 7);
        assert_eq!(s.param_count(), 32 * (27 + 3));
        assert_eq!(s.input_width(), 3 * 32 * 32);
        assert_eq!(s.feature_width(), 32 * 16);
        assert_eq!(s.output_width(), 32 * 16 * 16);
        assert_eq!(s.forward_width(), 32 * 16 + 32 * 16 * 16);
        assert_eq!(s.chunk_units(), ChunkUnits::Groups { size: 30 });
        let odd = LayerShape::conv(1, 2, (5, 7), 4, 0);
        assert_eq!(odd.output_width(), 2 * 2 * 3);
    }

    #[test]
    fn dense_touched_features_cover_rows_and_bias() {
        let s = LayerShape::dense(4, 3);
        assert_eq!(s.touched_features(&(0..4)), 0..1);
        assert_eq!(s.touched_features(&(3..9)), 0..3);
        assert_eq!(s.touched_features(&(12..14)), 0..2);
        assert_eq!(s.touched_features(&(11..13)), 0..3);
        assert_eq!(s.touched_features(&(5..5)), 0..0);
    }

    #[test]
    fn conv_touched_features_are_whole_channels() {
        let s = LayerShape::conv(1, 4, (4, 4), 2, 0);
        assert_eq!(s.touched_features(&(12..24)), 2..4);
        assert_eq!(s.touched_features(&(0..48)), 0..8);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert_eq!(LayerShape::dense(0, 3).check(), Err(ShapeError::Empty));
        assert_eq!(
            LayerShape::conv(1, 1, (1, 4), 1, 0).check(),
            Err(ShapeError::TooSmallToPool {
                height: 1,
                width: 4
            })
        );
        assert!(LayerShape::conv(1, 1, (2, 2), 1, 0).check().is_ok());
    }

    #[test]
    fn flat_chunks_cover_consecutively_and_respect_the_bound() {
        let chunks = |n, max| {
            ChunkUnits::Flat
                .chunks(n, max)
                .collect::<std::vec::Vec<_>>()
        };
        assert_eq!(
            chunks(120_300, 50_000),
            [0..50_000, 50_000..100_000, 100_000..120_300]
        );
        // The MNIST MLP's first layer fits one chunk (section 4.5).
        assert_eq!(chunks(39_250, 50_000), std::vec![0..39_250]);
    }

    #[test]
    fn groups_are_never_split() {
        let chunks =
            |size, max| (ChunkUnits::Groups { size }.chunks(60, max)).collect::<std::vec::Vec<_>>();
        assert_eq!(chunks(10, 25), [0..20, 20..40, 40..60]);
        // A group larger than the bound is a chunk by itself.
        assert_eq!(chunks(30, 25), [0..30, 30..60]);
        let conv = LayerShape::conv(1, 4, (4, 4), 2, 0);
        assert_eq!(
            conv.weight_chunks(30).collect::<std::vec::Vec<_>>(),
            [0..24, 24..48]
        );
    }

    #[test]
    fn group_units_allow_whole_groups_only() {
        let u = ChunkUnits::Groups { size: 10 };
        assert!(u.allows(&(10..30), 40));
        assert!(!u.allows(&(5..30), 40));
        assert!(!u.allows(&(10..45), 40));
        assert!(ChunkUnits::Flat.allows(&(3..7), 7));
    }
}
