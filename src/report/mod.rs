//! What a run tells the world: observers of its progress ([`observe`]), the figures it records
//! per epoch and at its end ([`metrics`]), the progress bars and log lines on stderr
//! ([`progress`]), the plots and tables of finished runs ([`plots`], [`sweep`]), and the trained
//! model as a file ([`export`]).

pub mod export;
pub mod metrics;
pub mod observe;
pub mod plots;
pub mod progress;
pub mod sweep;
pub mod sweep_gather;
