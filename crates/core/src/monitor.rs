//! The metric a run follows — early stopping, `stop_at`, the `plateau` schedule and the "best
//! unit" of a summary — and whether it should fall or rise (`train.monitor`, `train.mode`).

use serde::{Deserialize, Serialize};

/// Whether the monitored metric should fall or rise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Min,
    Max,
}

/// The metric early stopping and "best unit" follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Monitor {
    pub metric: String,
    pub mode: Mode,
}

impl Monitor {
    pub fn min(metric: &str) -> Self {
        Monitor {
            metric: metric.into(),
            mode: Mode::Min,
        }
    }
    pub fn max(metric: &str) -> Self {
        Monitor {
            metric: metric.into(),
            mode: Mode::Max,
        }
    }
    /// Whether `value` improves on `best` by more than `min_delta`.
    pub fn improves(&self, value: f64, best: f64, min_delta: f64) -> bool {
        match self.mode {
            Mode::Min => value < best - min_delta,
            Mode::Max => value > best + min_delta,
        }
    }
    pub(crate) fn worst(&self) -> f64 {
        match self.mode {
            Mode::Min => f64::INFINITY,
            Mode::Max => f64::NEG_INFINITY,
        }
    }
    /// Whether `value` has reached `target` (≥ for `max`, ≤ for `min`).
    pub fn reached(&self, value: f64, target: f64) -> bool {
        match self.mode {
            Mode::Max => value >= target,
            Mode::Min => value <= target,
        }
    }
}
