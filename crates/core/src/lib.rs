//! kiln-core: what every kiln model shares — configs, backends, the training loop,
//! run directories, plots and reports. Model crates implement [`Family`] (for the runner)
//! and either [`Supervised`] (classifiers and regressors) or [`engine::Routine`] (anything
//! else: two networks, episodes) to train on the one engine.
//!
//! Formulas in the doc comments follow the course's notation; "course deck N" refers to the
//! decks listed in `docs/course.md`.

pub mod backend;
pub mod classify;
pub mod config;
pub mod data;
pub mod engine;
pub mod export;
pub mod family;
pub mod import;
pub mod metrics;
pub mod monitor;
pub mod nn;
pub mod onnx;
pub mod optim;
pub mod plot;
mod proto;
pub mod registry;
pub mod run;
pub mod schedule;
pub mod tabular;
pub mod train;

pub use backend::BackendName;
pub use config::{ConfigDoc, ConfigError, RunConfig, TrainConfig};
pub use family::{
    Family, Figure, Finished, PredictInput, RunContext, SampleRequest, TextRequest, TrainingSummary,
};
/// The shared flex kernels (they live in `kiln-kernels`, beside the CNN's).
pub use kiln_kernels::ops as flex_ops;
pub use run::RunDir;
pub use train::{FitOptions, Fitted, Phase, StepOutput, Supervised, fit};

/// Re-exported so model crates use exactly the harness's Burn.
pub use burn;
