//! Time-series forecasting: the last W values of a series → the next H values.
//!
//! The series is split in time order (training, then validation, then test: no shuffling
//! across the split) and standardised with the training part's mean μ and standard deviation
//! s only: x ← (x − μ)/s. The network reads the window one value per step and a linear layer
//! maps the last hidden state to the H forecasts; the loss is their mean squared error.

use kiln_kernels::linear::linear;
use std::path::Path;

use anyhow::Result;
use burn::module::Module;
use burn::nn::loss::{MseLoss, Reduction};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};
use kiln_core::train::{Phase, StepOutput, Supervised};
use kiln_datasets::tabular::Table;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::recurrent::{Stack, StackParams, last_step};

/// The synthetic series: y_t = A·sin(2πt/P) + b·t + ε_t, ε_t ~ N(0, σ²) independent.
///
/// No predictor can beat σ² in expected squared error on the next value: ε_t is unknowable
/// from the past.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Synthetic {
    /// Number of values.
    pub length: usize,
    /// Amplitude A.
    pub amplitude: f64,
    /// Period P in steps.
    pub period: f64,
    /// Trend b per step.
    pub trend: f64,
    /// Noise standard deviation σ.
    pub noise: f64,
}

impl Synthetic {
    pub fn generate(&self, seed: u64) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x005e_71e5);
        let eps = kiln_core::nn::standard_normal(&mut rng, self.length);
        (0..self.length)
            .map(|t| {
                let t_f = t as f64;
                self.amplitude * (std::f64::consts::TAU * t_f / self.period).sin()
                    + self.trend * t_f
                    + self.noise * eps[t] as f64
            })
            .collect()
    }
}

/// One numeric column of a CSV file with a header row (errors name the line and column).
pub fn read_column(path: &Path, column: &str) -> Result<Vec<f64>> {
    let table = Table::read(path)?;
    Ok(table
        .numeric(&[column.to_string()])?
        .into_iter()
        .map(|row| row[0])
        .collect())
}

#[derive(Module, Debug)]
pub struct Forecaster {
    pub stack: Stack,
    pub head: Linear,
}

impl Forecaster {
    pub fn new(p: &StackParams, horizon: usize, device: &Device) -> Self {
        Forecaster {
            stack: p.stack(1, device),
            head: LinearConfig::new(p.hidden, horizon).init(device),
        }
    }

    /// Windows `[batch, W]` (standardised) → forecasts `[batch, H]` (standardised).
    ///
    /// Each window is centred on its mean ℓ = (1/W)·Σ_s x_s: the network reads x_s − ℓ and
    /// forecasts the difference, ŷ_{t+h} = ℓ + f(x − ℓ)_h. So a level the training part never
    /// reached (a trend continuing into the test part) looks like any other window.
    pub fn forward(&self, windows: &[&[f32]], device: &Device) -> Tensor<2> {
        let b = windows.len();
        let w = windows.first().map(|x| x.len()).unwrap_or(0);
        let level: Vec<f32> = windows
            .iter()
            .map(|x| x.iter().sum::<f32>() / w as f32)
            .collect();
        let steps: Vec<Tensor<2>> = (0..w)
            .map(|t| {
                let col: Vec<f32> = windows.iter().zip(&level).map(|(x, l)| x[t] - l).collect();
                Tensor::from_data(TensorData::new(col, [b, 1]), device)
            })
            .collect();
        let (out, _) = self.stack.forward(steps, None);
        let difference = linear(&self.head, last_step(out));
        difference + Tensor::<2>::from_data(TensorData::new(level, [b, 1]), device)
    }
}

/// Standardised series and the windows (by target start index) of one split.
pub struct SeriesSplit<'a> {
    /// The whole standardised series (windows of a split may read values of the previous
    /// split as inputs; their targets lie in the split).
    pub z: &'a [f32],
    /// Target start indices t: input z[t−W..t], target z[t..t+H].
    pub targets: Vec<usize>,
    pub window: usize,
    pub horizon: usize,
}

/// Start indices of the training, validation and test targets for a series of `n` values:
/// the targets in order of time, cut into the given fractions (test = the rest).
pub fn split_targets(
    n: usize,
    window: usize,
    horizon: usize,
    val: f64,
    test: f64,
) -> Result<[Vec<usize>; 3], String> {
    let need = window + horizon + 3;
    if n < need {
        return Err(format!(
            "the series has {n} values, fewer than window {window} + horizon {horizon} + 3 (one target in each of training, validation and test)"
        ));
    }
    let all: Vec<usize> = (window..=n - horizon).collect();
    let m = all.len();
    let n_test = ((m as f64 * test).round() as usize).max(1);
    let n_val = if val > 0.0 {
        ((m as f64 * val).round() as usize).max(1)
    } else {
        0
    };
    if n_test + n_val >= m {
        return Err(format!(
            "the series has {n} values: too few for window {window}, horizon {horizon} and the validation and test parts"
        ));
    }
    let n_train = m - n_val - n_test;
    Ok([
        all[..n_train].to_vec(),
        all[n_train..n_train + n_val].to_vec(),
        all[n_train + n_val..].to_vec(),
    ])
}

pub struct SeriesTask<'a> {
    pub params: &'a StackParams,
    pub horizon: usize,
}

impl SeriesSplit<'_> {
    pub fn batch(&self, idx: &[usize]) -> (Vec<&[f32]>, Vec<f32>) {
        let mut targets = Vec::with_capacity(idx.len() * self.horizon);
        let windows = idx
            .iter()
            .map(|&i| {
                let t = self.targets[i];
                targets.extend_from_slice(&self.z[t..t + self.horizon]);
                &self.z[t - self.window..t]
            })
            .collect();
        (windows, targets)
    }
}

impl<'a> Supervised for SeriesTask<'a> {
    fn loss_name(&self) -> Option<String> {
        Some("mean squared error, standardised units".into())
    }

    type Model = Forecaster;
    type Data = SeriesSplit<'a>;

    fn init_model(&self, device: &Device) -> Forecaster {
        Forecaster::new(self.params, self.horizon, device)
    }

    fn len(&self, data: &SeriesSplit<'a>) -> usize {
        data.targets.len()
    }

    fn step(
        &self,
        model: &Forecaster,
        data: &SeriesSplit<'a>,
        indices: &[usize],
        device: &Device,
        _phase: Phase,
        _rng: &mut StdRng,
    ) -> StepOutput {
        let (windows, targets) = data.batch(indices);
        let pred = model.forward(&windows, device);
        let y = Tensor::from_data(
            TensorData::new(targets, [indices.len(), self.horizon]),
            device,
        );
        StepOutput::loss(MseLoss::new().forward(pred, y, Reduction::Mean))
    }
}

/// Mean squared error over every target and horizon, in the series' own units.
pub fn mse(pred: &[f64], truth: &[f64]) -> f64 {
    pred.iter()
        .zip(truth)
        .map(|(p, t)| (p - t).powi(2))
        .sum::<f64>()
        / truth.len().max(1) as f64
}

/// The baselines' forecasts for targets `targets` of `y` (original units), every horizon:
/// last value ŷ_{t+h} = y_{t−1}; moving average ŷ_{t+h} = mean(y_{t−k} … y_{t−1}).
pub fn baselines(y: &[f64], targets: &[usize], horizon: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut last = Vec::new();
    let mut avg = Vec::new();
    for &t in targets {
        let l = y[t - 1];
        let m = y[t - k..t].iter().sum::<f64>() / k as f64;
        for _ in 0..horizon {
            last.push(l);
            avg.push(m);
        }
    }
    (last, avg)
}

/// The true values of `targets`, every horizon, in order.
pub fn truth(y: &[f64], targets: &[usize], horizon: usize) -> Vec<f64> {
    targets
        .iter()
        .flat_map(|&t| y[t..t + horizon].iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_in_time_order_and_disjoint() {
        let [tr, va, te] = split_targets(100, 10, 2, 0.15, 0.15).unwrap();
        assert_eq!(tr.first(), Some(&10));
        assert_eq!(te.last(), Some(&98));
        assert!(tr.last() < va.first() && va.last() < te.first());
        assert_eq!(tr.len() + va.len() + te.len(), 89);
        let err = split_targets(12, 10, 1, 0.1, 0.1).unwrap_err();
        assert!(err.contains("12 values, fewer than window 10"), "{err}");
    }

    #[test]
    fn baselines_by_hand() {
        let y = [1.0, 2.0, 4.0, 8.0, 16.0];
        let (last, avg) = baselines(&y, &[3, 4], 1, 2);
        assert_eq!(last, vec![4.0, 8.0]);
        assert_eq!(avg, vec![3.0, 6.0]);
        assert_eq!(truth(&y, &[3], 2), vec![8.0, 16.0]);
        assert_eq!(mse(&[1.0, 3.0], &[2.0, 1.0]), 2.5);
    }

    #[test]
    fn generator_noise_has_the_stated_sigma() {
        let g = Synthetic {
            length: 20_000,
            amplitude: 1.0,
            period: 50.0,
            trend: 0.001,
            noise: 0.2,
        };
        let y = g.generate(3);
        let resid: Vec<f64> = y
            .iter()
            .enumerate()
            .map(|(t, v)| v - (std::f64::consts::TAU * t as f64 / 50.0).sin() - 0.001 * t as f64)
            .collect();
        let rows: Vec<Vec<f64>> = resid.iter().map(|r| vec![*r]).collect();
        let fit = kiln_datasets::tabular::Standardizer::fit(&rows);
        let (m, s) = (fit.mean[0], fit.std[0]);
        assert!(m.abs() < 0.01 && (s - 0.2).abs() < 0.005, "{m} {s}");
        assert_eq!(g.generate(3), y);
    }

    #[test]
    fn csv_column_errors_name_row_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.csv");
        std::fs::write(&p, "date,price\n2020-01-01,1.5\n2020-01-02,abc\n").unwrap();
        let err = read_column(&p, "price").unwrap_err().to_string();
        assert!(
            err.contains("s.csv: line 3, column \"price\": not a number: \"abc\""),
            "{err}"
        );
        let err = read_column(&p, "close").unwrap_err().to_string();
        assert!(
            err.contains("no column \"close\" (columns: date, price)"),
            "{err}"
        );
    }
}
