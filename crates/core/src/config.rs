//! Run configuration: TOML files in `configs/`, `--set key=value` overrides, and the
//! resolved copy written into every run directory.
//!
//! A config file has run-level keys shared by every model and one `[params]` table that
//! belongs to the model family named by `model`:
//!
//! ```toml
//! model = "linear"        # which family trains it (`kiln list`)
//! backend = "flex"        # flex | ndarray | wgpu | cuda
//! seed = 42
//!
//! [train]                 # the shared harness (see `TrainConfig`)
//! epochs = 100
//!
//! [params]                # the family's own settings
//! features = ["RM"]
//! ```
//!
//! Parsing is two-step on purpose: the text is parsed into a `toml::Table`, the overrides are
//! applied to that table (so `--set train.epochs=5` stays an integer), and only then is the
//! whole document deserialised into typed structs that reject unknown keys.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::BackendName;
use crate::monitor::Mode;
use crate::optim::OptimizerConfig;
use crate::schedule::Schedule;

/// A configuration error: always names the file and, where known, the field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}{message}")]
pub struct ConfigError {
    pub file: String,
    /// `"train.epochs: "` or empty when the error is about the whole document.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    /// `file: field: message`, the message folded onto one line.
    pub fn new(file: &Path, field: &str, message: impl Into<String>) -> Self {
        let field = if field.is_empty() || field == "." {
            String::new()
        } else {
            format!("{field}: ")
        };
        ConfigError {
            file: file.display().to_string(),
            field,
            message: one_line(&message.into()),
        }
    }
}

/// Collapse a possibly multi-line message into one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Run-level settings every model shares, plus the family's own `[params]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig<P> {
    /// Name of the model family that trains this config (see `kiln list`).
    pub model: String,
    /// Which compiled-in backend runs the tensors.
    #[serde(default)]
    pub backend: BackendName,
    /// Seed for weight initialisation, shuffling, splits and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Which data set (image models: `auto`, `mnist`, `fashion-mnist`, `digits`, `xor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// What the config asked for when `dataset` was settled at run time (`auto`); written
    /// into the run's resolved `config.toml`, not meant to be set by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_requested: Option<String>,
    /// A local directory holding the data set's files (`--data-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub train: TrainConfig,
    pub params: P,
}

fn default_seed() -> u64 {
    42
}

impl<P> RunConfig<P> {
    /// The device a family with its own loop (GAN, DQN) trains on, with autodiff: the first
    /// of `train.devices`, probed, or the backend's default device.
    pub fn training_device(&self) -> anyhow::Result<burn::tensor::Device> {
        let mut devices = self
            .backend
            .devices(&self.train.devices)
            .map_err(anyhow::Error::msg)?;
        Ok(devices.remove(0).autodiff())
    }
}

/// The shared training loop's settings (`[train]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Mini-batch size; `0` means the whole training set in one batch (full-batch gradient descent).
    pub batch_size: usize,
    pub optimizer: OptimizerConfig,
    /// Step size η in θ ← θ − η ∇L(θ).
    pub learning_rate: f64,
    /// Exponential learning-rate decay per epoch: epoch e uses η·γ^(e−1) (PyTorch's
    /// `ExponentialLR`). 1 = constant. Shorthand for `schedule = { kind = "exponential",
    /// gamma = γ }`.
    pub lr_decay: f64,
    /// The learning-rate schedule every optimizer follows ([`crate::schedule`]): `"constant"`
    /// (the default), `"step"`, `"exponential"`, `"cosine"`, `"one_cycle"`, `"plateau"`, or a
    /// table with its settings. The rate of every unit is a column of `metrics.csv`.
    #[serde(
        deserialize_with = "crate::schedule::deserialize",
        skip_serializing_if = "Schedule::is_constant"
    )]
    pub schedule: Schedule,
    /// Write TensorBoard event files (every metric per unit, and the pictures of generative
    /// models) under `tensorboard/` in the run directory: `tensorboard --logdir runs`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tensorboard: bool,
    /// Fraction of the training set held out for validation (early stopping, curves, config
    /// choice). Image and generative models hold out the last part of the official training
    /// split, the tabular models a seeded shuffled part; `0` means no validation (the test set
    /// is never used for it).
    pub validation_split: f64,
    /// Stop after this many epochs without improvement of the validation loss; `0` disables.
    pub patience: usize,
    /// Smallest change of the monitored metric that counts as an improvement.
    pub min_delta: f64,
    /// The metric early stopping follows (a column of `metrics.csv`); default `val_loss`, or
    /// the first metric when there is no validation set.
    pub monitor: Option<String>,
    /// Whether the monitored metric should fall (`min`, the default) or rise (`max`).
    pub mode: Mode,
    /// Devices to train on, data parallel (`--devices 0,1`): each holds a replica of the model
    /// and computes the gradient of its share of every batch, the gradients are summed on
    /// one device and one optimizer step follows (see [`crate::train`]). Empty (the default)
    /// means the backend's default device. Only `cuda` and `wgpu` have more than device 0.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<usize>,
    /// Training-time budget in minutes (Lightning's `max_time`): training stops within a
    /// batch of it, after validating and checkpointing the epoch it cut short. For comparing
    /// models at equal wall time; a time-limited run's length depends on the machine's speed,
    /// so it is not reproducible to the batch. Unset: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_minutes: Option<f64>,
    /// Stop once the monitored metric reaches this value — `≥` for `mode = "max"`, `≤` for
    /// `min` — as Lightning's `stopping_threshold`: `monitor = "val_accuracy"`, `mode = "max"`,
    /// `stop_at = 0.95` ends training at the first epoch whose validation accuracy is 95%.
    /// Unset: no threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_at: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 32,
            optimizer: OptimizerConfig::default(),
            learning_rate: 1e-3,
            lr_decay: 1.0,
            schedule: Schedule::default(),
            tensorboard: false,
            validation_split: 0.0,
            patience: 0,
            min_delta: 0.0,
            monitor: None,
            mode: Mode::Min,
            devices: Vec::new(),
            max_minutes: None,
            stop_at: None,
        }
    }
}

impl TrainConfig {
    /// The schedule to run: `schedule`, or `lr_decay` as an exponential one.
    pub fn effective_schedule(&self) -> Schedule {
        if self.schedule.is_constant() && self.lr_decay != 1.0 {
            Schedule::exponential(self.lr_decay)
        } else {
            self.schedule.clone()
        }
    }

    /// For a family with its own training loop (GAN, DQN): `train.devices` may name one
    /// device, not several — data parallel training is what [`crate::train::fit`] does.
    pub fn one_device(&self, family: &str) -> Result<(), (String, String)> {
        if self.devices.len() > 1 {
            return Err((
                "train.devices".into(),
                format!(
                    "{:?}: the {family} family trains on one device (data parallel training \
                     is for the supervised and autoencoder families)",
                    self.devices
                ),
            ));
        }
        Ok(())
    }

    /// For a family that holds out no validation data: `train.validation_split` must stay 0,
    /// so that a value set for it is an error rather than silently ignored. `why` says what
    /// the family measures instead.
    pub fn no_validation_split(&self, family: &str, why: &str) -> Result<(), (String, String)> {
        if self.validation_split != 0.0 {
            return Err((
                "train.validation_split".into(),
                format!(
                    "{}: the {family} family holds out no validation data ({why}); remove it or set 0",
                    self.validation_split
                ),
            ));
        }
        Ok(())
    }

    /// Reject settings that would only show up later as NaN or an empty loop.
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, msg: String| Err((format!("train.{field}"), msg));
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!("must be a positive number, got {}", self.learning_rate),
            );
        }
        if !(self.lr_decay > 0.0 && self.lr_decay <= 1.0) {
            return bad(
                "lr_decay",
                format!("must be in (0, 1], got {}", self.lr_decay),
            );
        }
        if self.lr_decay != 1.0 && !self.schedule.is_constant() {
            return bad(
                "lr_decay",
                "is a shorthand for schedule = { kind = \"exponential\", gamma = ... }; \
                 with train.schedule set, put the decay there"
                    .into(),
            );
        }
        self.schedule.check(self.epochs)?;
        if let Some(m) = self.max_minutes
            && !(m.is_finite() && m > 0.0)
        {
            return bad("max_minutes", format!("must be a positive number, got {m}"));
        }
        if let Some(t) = self.stop_at
            && !t.is_finite()
        {
            return bad("stop_at", format!("must be a finite number, got {t}"));
        }
        if !(0.0..0.9).contains(&self.validation_split) {
            return bad(
                "validation_split",
                format!("must be in [0, 0.9), got {}", self.validation_split),
            );
        }
        self.optimizer
            .check()
            .map_err(|(f, m)| (format!("train.optimizer.{f}"), m))
    }
}

/// A config document: where it came from, its overrides applied, not yet typed.
#[derive(Debug, Clone)]
pub struct ConfigDoc {
    /// The file it was read from (or `<embedded>/name.toml`), used in every error message.
    pub source: PathBuf,
    pub table: toml::Table,
}

impl ConfigDoc {
    /// Parse TOML text; syntax errors name the file and line.
    pub fn parse(source: impl Into<PathBuf>, text: &str) -> Result<Self, ConfigError> {
        let source = source.into();
        match text.parse::<toml::Table>() {
            Ok(table) => Ok(ConfigDoc { source, table }),
            Err(e) => {
                let line = e
                    .span()
                    .map(|s| format!("line {}: ", text[..s.start].lines().count().max(1)))
                    .unwrap_or_default();
                Err(ConfigError::new(
                    &source,
                    "",
                    format!("{line}invalid TOML: {}", e.message()),
                ))
            }
        }
    }

    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "", format!("cannot read config: {e}")))?;
        Self::parse(path, &text)
    }

    /// The config's name: the file stem of its source (`configs/linear-simple.toml` → `linear-simple`).
    pub fn name(&self) -> String {
        self.source
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The `model` key: which family trains this config.
    pub fn model(&self) -> Result<&str, ConfigError> {
        match self.table.get("model") {
            Some(toml::Value::String(s)) => Ok(s),
            Some(other) => Err(ConfigError::new(
                &self.source,
                "model",
                format!("expected a string, found {}", other.type_str()),
            )),
            None => Err(ConfigError::new(
                &self.source,
                "model",
                "missing (name the model family, e.g. model = \"linear\")",
            )),
        }
    }

    /// Apply one `key.path=value` override. The value is parsed as a TOML value
    /// (`5`, `0.1`, `true`, `"adam"`, `[1, 2]`); anything that does not parse is taken as a
    /// bare string, so `--set train.optimizer.name=sgd` works without quotes.
    pub fn set(&mut self, assignment: &str) -> Result<(), ConfigError> {
        let (key, raw) = assignment.split_once('=').ok_or_else(|| {
            ConfigError::new(
                &self.source,
                "",
                format!("--set {assignment:?}: expected key=value"),
            )
        })?;
        let key = key.trim();
        let value = parse_value(raw.trim());
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::new(
                &self.source,
                key,
                "--set: empty key segment",
            ));
        }
        let mut table = &mut self.table;
        for part in &parts[..parts.len() - 1] {
            let entry = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = match entry {
                toml::Value::Table(t) => t,
                other => {
                    return Err(ConfigError::new(
                        &self.source,
                        key,
                        format!("--set: `{part}` is a {}, not a table", other.type_str()),
                    ));
                }
            };
        }
        table.insert(parts[parts.len() - 1].to_string(), value);
        Ok(())
    }

    /// Deserialise into the typed config; unknown keys and wrong types are errors naming the
    /// file and the dotted field path.
    pub fn typed<P: DeserializeOwned>(&self) -> Result<RunConfig<P>, ConfigError> {
        let value = toml::Value::Table(self.table.clone());
        let config: RunConfig<P> = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::new(&self.source, &path, e.inner().to_string())
        })?;
        config
            .train
            .check()
            .map_err(|(field, msg)| ConfigError::new(&self.source, &field, msg))?;
        Ok(config)
    }

    /// The resolved document as TOML text (what is written to `config.toml` in a run).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.table)
            .unwrap_or_else(|_| toml::to_string(&self.table).unwrap_or_default())
    }
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        width: usize,
    }

    const DOC: &str = "model = \"m\"\n[train]\nepochs = 3\n[params]\nwidth = 4\n";

    #[test]
    fn parses_and_defaults() {
        let cfg: RunConfig<P> = ConfigDoc::parse("x.toml", DOC).unwrap().typed().unwrap();
        assert_eq!(cfg.train.epochs, 3);
        assert_eq!(cfg.train.batch_size, TrainConfig::default().batch_size);
        assert_eq!(cfg.params.width, 4);
        assert_eq!(cfg.seed, 42);
    }

    #[test]
    fn set_keeps_types_and_creates_tables() {
        let mut doc = ConfigDoc::parse("x.toml", DOC).unwrap();
        doc.set("train.epochs=7").unwrap();
        doc.set("train.optimizer.name=sgd").unwrap();
        doc.set("params.width=9").unwrap();
        let cfg: RunConfig<P> = doc.typed().unwrap();
        assert_eq!(cfg.train.epochs, 7);
        assert_eq!(cfg.params.width, 9);
        assert_eq!(cfg.train.optimizer.name, crate::optim::OptimizerName::Sgd);
    }

    #[test]
    fn unknown_key_names_file_and_field() {
        let mut doc = ConfigDoc::parse("x.toml", DOC).unwrap();
        doc.set("train.epohcs=7").unwrap();
        let err = doc.typed::<P>().unwrap_err().to_string();
        assert!(err.starts_with("x.toml: train"), "{err}");
        assert!(err.contains("epohcs"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn wrong_type_names_the_field() {
        let mut doc = ConfigDoc::parse("x.toml", DOC).unwrap();
        doc.set("params.width=\"wide\"").unwrap();
        let err = doc.typed::<P>().unwrap_err().to_string();
        assert!(err.contains("params.width"), "{err}");
    }

    #[test]
    fn syntax_error_names_line() {
        let err = ConfigDoc::parse("x.toml", "model = \"m\"\n[train\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.toml: line 2"), "{err}");
    }

    #[test]
    fn bad_learning_rate_is_rejected_before_training() {
        let mut doc = ConfigDoc::parse("x.toml", DOC).unwrap();
        doc.set("train.learning_rate=-1").unwrap();
        let err = doc.typed::<P>().unwrap_err().to_string();
        assert!(err.contains("train.learning_rate"), "{err}");
    }
}
