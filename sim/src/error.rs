//! What a simulated layer refuses: one error type for dense layers and conv blocks.

/// What a simulated layer refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SimError {
    #[error("expected {expected} parameters, got {got}")]
    ParameterCount { expected: usize, got: usize },
    #[error("input of {got} values is not a whole batch of {width}-wide rows")]
    InputShape { width: usize, got: usize },
    #[error("no input loaded")]
    NoInput,
    #[error("{what}: expected {expected} values, got {got}")]
    BufferLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("chunk {start}..{end} is outside the {count} parameters")]
    ChunkOutOfRange {
        start: usize,
        end: usize,
        count: usize,
    },
}
