//! Linear regression on Boston housing (course deck 0, chapters 7–9; course deck 4's y = mx + b).
//!
//! The model is ŷ = w·z + b on standardised features z = (x − μ)/σ, trained by gradient
//! descent on the mean squared error
//!
//! MSE(w, b) = (1/N) Σᵢ (yᵢ − ŷᵢ)²,  ∂MSE/∂w = (2/N) Σᵢ (ŷᵢ − yᵢ) zᵢ,  ∂MSE/∂b = (2/N) Σᵢ (ŷᵢ − yᵢ)
//!
//! and, for comparison, solved in closed form by least squares ([`least_squares`]). Both
//! coefficient sets are reported in standardised and in original units:
//! w_orig,j = w_j / σ_j and b_orig = b − Σⱼ w_j μ_j / σ_j.

pub mod least_squares;

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::nn::loss::{MseLoss, Reduction};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use kiln_core::data::{DenseSet, to_vec};
use kiln_core::tabular::{self, Preprocessing};
use kiln_core::train::{Phase, StepOutput, Supervised, load_model};
use kiln_core::{
    ConfigDoc, Family, Figure, Finished, PredictInput, RunConfig, RunContext, metrics,
};
use kiln_datasets::{Standardizer, Table, shuffled_split};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// `[params]` of a linear-regression config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearParams {
    /// CSV file with a header row.
    #[serde(default = "default_data")]
    pub data: PathBuf,
    /// Feature columns. Default: all Boston columns except `B` (see data/README.md) and the target.
    #[serde(default = "default_features")]
    pub features: Vec<String>,
    #[serde(default = "default_target")]
    pub target: String,
    /// Fraction of rows held out as the test set.
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Seed of the train/test split (kept apart from the run seed so the split stays fixed).
    #[serde(default = "default_split_seed")]
    pub split_seed: u64,
}

fn default_data() -> PathBuf {
    "data/boston.csv".into()
}
pub fn default_features() -> Vec<String> {
    [
        "CRIM", "ZN", "INDUS", "CHAS", "NOX", "RM", "AGE", "DIS", "RAD", "TAX", "PTRATIO", "LSTAT",
    ]
    .map(String::from)
    .to_vec()
}
fn default_target() -> String {
    "MEDV".into()
}
fn default_test_fraction() -> f64 {
    0.2
}
fn default_split_seed() -> u64 {
    42
}

/// ŷ = x·W + b with W of shape `[features, 1]`.
#[derive(Module, Debug)]
pub struct LinearRegression {
    pub linear: Linear,
}

impl LinearRegression {
    pub fn new(features: usize, device: &Device) -> Self {
        LinearRegression {
            linear: LinearConfig::new(features, 1).init(device),
        }
    }

    /// `[batch, features]` → `[batch, 1]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear.forward(x)
    }

    /// `(weights, bias)` as plain numbers.
    pub fn coefficients(&self) -> (Vec<f64>, f64) {
        let w = to_vec(self.linear.weight.val())
            .into_iter()
            .map(f64::from)
            .collect();
        let b = self
            .linear
            .bias
            .as_ref()
            .map(|b| to_vec(b.val())[0] as f64)
            .unwrap_or(0.0);
        (w, b)
    }
}

/// The supervised problem the shared loop trains: MSE on dense rows.
pub struct Regression {
    pub features: usize,
}

impl Supervised for Regression {
    fn loss_name(&self) -> Option<String> {
        Some("mean squared error".into())
    }

    type Model = LinearRegression;
    type Data = DenseSet;

    fn init_model(&self, device: &Device) -> LinearRegression {
        LinearRegression::new(self.features, device)
    }

    fn len(&self, data: &DenseSet) -> usize {
        data.len()
    }

    fn step(
        &self,
        model: &LinearRegression,
        data: &DenseSet,
        idx: &[usize],
        device: &Device,
        _: Phase,
        _: &mut StdRng,
    ) -> StepOutput {
        let pred = model.forward(data.batch_x(idx, device));
        let loss = MseLoss::new().forward(pred, data.batch_y(idx, device), Reduction::Mean);
        StepOutput::loss(loss)
    }
}

/// What the outputs of a linear run are, in its saved preprocessing.
#[derive(Debug, Serialize, Deserialize)]
struct Target {
    target: String,
}

struct Prepared {
    scaler: Standardizer,
    /// Standardised training rows and targets (f64, for least squares).
    train_rows: Vec<Vec<f64>>,
    train_y: Vec<f64>,
    test: DenseSet,
    test_y: Vec<f64>,
}

fn prepare(p: &LinearParams, source: &std::path::Path) -> Result<Prepared> {
    tabular::check_params(source, &p.features, p.test_fraction)?;
    let table = Table::read(&p.data)?;
    let x = table.numeric(&p.features)?;
    let y: Vec<f64> = table
        .numeric(std::slice::from_ref(&p.target))?
        .into_iter()
        .map(|r| r[0])
        .collect();
    let (train_idx, test_idx) = shuffled_split(x.len(), p.test_fraction, p.split_seed);
    let pick = |idx: &[usize]| -> (Vec<Vec<f64>>, Vec<f64>) {
        (
            idx.iter().map(|&i| x[i].clone()).collect(),
            idx.iter().map(|&i| y[i]).collect(),
        )
    };
    let (train_raw, train_y) = pick(&train_idx);
    let (test_raw, test_y) = pick(&test_idx);
    let scaler = Standardizer::fit(&train_raw);
    let train_rows = scaler.transform(&train_raw);
    let test = DenseSet::new(&scaler.transform(&test_raw), &test_y);
    Ok(Prepared {
        scaler,
        train_rows,
        train_y,
        test,
        test_y,
    })
}

fn predict_rows(model: &LinearRegression, set: &DenseSet, device: &Device) -> Vec<f64> {
    to_vec(model.forward(set.all_x(device)))
        .into_iter()
        .map(f64::from)
        .collect()
}

fn regression_metrics(y: &[f64], y_hat: &[f64]) -> Value {
    json!({"mse": metrics::mse(y, y_hat), "mae": metrics::mae(y, y_hat), "r2": metrics::r2(y, y_hat)})
}

/// Coefficients as `{feature: value}` plus the intercept, in standardised and original units.
fn coefficient_sets(names: &[String], w: &[f64], b: f64, scaler: &Standardizer) -> Value {
    let orig_w: Vec<f64> = w.iter().zip(&scaler.std).map(|(w, s)| w / s).collect();
    let orig_b = b - w
        .iter()
        .zip(scaler.mean.iter().zip(&scaler.std))
        .map(|(w, (m, s))| w * m / s)
        .sum::<f64>();
    let named = |ws: &[f64]| -> Value {
        names
            .iter()
            .cloned()
            .zip(ws.iter().map(|v| json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    json!({
        "standardized": {"intercept": b, "weights": named(w)},
        "original_units": {"intercept": orig_b, "weights": named(&orig_w)},
    })
}

/// max over coefficients (intercept included) of |g − a| / |a|.
pub fn max_relative_difference(gd: &[f64], ls: &[f64]) -> f64 {
    gd.iter()
        .zip(ls)
        .map(|(g, a)| (g - a).abs() / a.abs().max(f64::MIN_POSITIVE))
        .fold(0.0, f64::max)
}

pub struct LinearFamily;

impl LinearFamily {
    fn config(doc: &ConfigDoc) -> Result<RunConfig<LinearParams>> {
        tabular::csv_config(doc, "linear")
    }
}

/// `report.md`'s table of the coefficients, gradient descent beside least squares
/// (`ls` = [β₀, β₁, …]).
fn coefficient_table(features: &[String], w: &[f64], b: f64, ls: &[f64]) -> String {
    let mut out = String::from(
        "## Coefficients (standardised features)\n\n| feature | gradient descent | least squares |\n|---|---|---|\n",
    );
    out.push_str(&format!("| intercept | {b:.5} | {:.5} |\n", ls[0]));
    for (j, name) in features.iter().enumerate() {
        out.push_str(&format!("| {name} | {:.5} | {:.5} |\n", w[j], ls[j + 1]));
    }
    out
}

/// ŷ = β₀ + Σⱼ βⱼ·xⱼ of the least-squares coefficients β on every row of `set`.
fn least_squares_predictions(ls: &[f64], set: &DenseSet) -> Vec<f64> {
    set.x
        .chunks(set.dim)
        .map(|r| {
            ls[0]
                + r.iter()
                    .zip(&ls[1..])
                    .map(|(&x, w)| x as f64 * w)
                    .sum::<f64>()
        })
        .collect()
}

impl Family for LinearFamily {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn about(&self) -> &'static str {
        "linear regression on Boston housing: gradient descent vs least squares"
    }

    fn check(&self, doc: &ConfigDoc) -> Result<()> {
        Self::config(doc).map(|_| ())
    }

    fn train(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = Self::config(&ctx.doc)?;
        let p = &cfg.params;
        let data = prepare(p, &ctx.doc.source)?;
        let (train, val) = tabular::validation_part(
            &DenseSet::new(&data.train_rows, &data.train_y),
            cfg.train.validation_split,
            cfg.seed,
        );
        let target = Target {
            target: p.target.clone(),
        };
        let pre = Preprocessing::new(&p.features, target, &data.scaler);
        ctx.run.write_json(tabular::PREPROCESSING, &pre)?;
        let task = Regression {
            features: p.features.len(),
        };
        let (fitted, model, device) = ctx.fit(&cfg, &task, &train, &val)?;
        let (w, b) = model.coefficients();
        let ls = least_squares::solve(&data.train_rows, &data.train_y)
            .context("least squares: XᵀX is singular (are two features identical?)")?;
        let gd_all: Vec<f64> = std::iter::once(b).chain(w.iter().copied()).collect();
        let rel = max_relative_difference(&gd_all, &ls);
        let test = regression_metrics(&data.test_y, &predict_rows(&model, &data.test, &device));
        let fields = json!({
            "features": p.features,
            "target": p.target,
            "train_examples": data.train_y.len(),
            "test_examples": data.test_y.len(),
            "gradient_descent": coefficient_sets(&p.features, &w, b, &data.scaler),
            "least_squares": coefficient_sets(&p.features, &ls[1..], ls[0], &data.scaler),
            "max_relative_difference": rel,
            "test": test,
            "test_least_squares": regression_metrics(&data.test_y, &least_squares_predictions(&ls, &data.test)),
        });
        let metric = |k: &str| test[k].as_f64().unwrap_or(f64::NAN);
        let mse = metric("mse");
        let done = Finished {
            title: format!(
                "Linear regression: {} from {}",
                p.target,
                p.features.join(", ")
            ),
            fields,
            headline: vec![Figure::new(
                "test.mse",
                "test MSE",
                mse,
                format!("{mse:.4}"),
            )],
            rows: vec![
                ("test MAE".into(), format!("{:.4}", metric("mae"))),
                ("test R²".into(), format!("{:.4}", metric("r2"))),
                (
                    "max relative difference GD vs least squares".into(),
                    format!("{rel:.2e}"),
                ),
            ],
            examples: "rows",
            notes: coefficient_table(&p.features, &w, b, &ls),
        };
        ctx.finish(cfg.backend.as_str(), &fitted, done)
    }

    fn eval(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = Self::config(&ctx.doc)?;
        let data = prepare(&cfg.params, &ctx.doc.source)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = load_model(
            &ctx.run,
            LinearRegression::new(cfg.params.features.len(), &device),
        )?;
        let y_hat = predict_rows(&model, &data.test, &device);
        Ok(json!({"test": regression_metrics(&data.test_y, &y_hat)}))
    }

    fn predict(&self, ctx: &RunContext, input: &PredictInput) -> Result<String> {
        let cfg = Self::config(&ctx.doc)?;
        let (pre, set, device) =
            tabular::predict_input::<Target>(ctx, input, cfg.backend, "linear regression")?;
        let model = load_model(&ctx.run, LinearRegression::new(pre.features.len(), &device))?;
        let y_hat = predict_rows(&model, &set, &device);
        Ok(y_hat
            .iter()
            .map(|v| format!("{} = {v:.3}", pre.outputs.target))
            .collect::<Vec<_>>()
            .join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::optim::GradientsParams;
    use burn::tensor::TensorData;
    use kiln_core::optim::{OptimizerConfig, OptimizerName};

    fn line(m: f32, b: f32, device: &Device) -> LinearRegression {
        LinearRegression {
            linear: Linear {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(vec![m], [1, 1]),
                    device,
                )),
                bias: Some(Param::from_tensor(Tensor::from_data(
                    TensorData::new(vec![b], [1]),
                    device,
                ))),
            },
        }
    }

    /// Course deck 4: points (1,3), (2,5); start at m = −1, b = 5. Then MSE = 2.5,
    /// ∂MSE/∂m = −3, ∂MSE/∂b = −1, and one step with η = 0.1 gives m = −0.7, b = 5.1.
    #[test]
    fn one_gradient_step_matches_the_worked_example() {
        let device = Device::flex().autodiff();
        let model = line(-1.0, 5.0, &device);
        let data = DenseSet::new(&[vec![1.0], vec![2.0]], &[3.0, 5.0]);
        let out = Regression { features: 1 }.step(
            &model,
            &data,
            &[0, 1],
            &device,
            Phase::Train,
            &mut rand::SeedableRng::seed_from_u64(0),
        );
        let loss = out.loss.clone().into_scalar::<f32>();
        assert!((loss - 2.5).abs() < 1e-6, "MSE {loss}");
        let grads = out.loss.backward();
        let dm = to_vec(model.linear.weight.val().grad(&grads).unwrap())[0];
        let db = to_vec(
            model
                .linear
                .bias
                .as_ref()
                .unwrap()
                .val()
                .grad(&grads)
                .unwrap(),
        )[0];
        assert!((dm + 3.0).abs() < 1e-6, "dMSE/dm {dm}");
        assert!((db + 1.0).abs() < 1e-6, "dMSE/db {db}");

        let out = Regression { features: 1 }.step(
            &model,
            &data,
            &[0, 1],
            &device,
            Phase::Train,
            &mut rand::SeedableRng::seed_from_u64(0),
        );
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        let mut sgd = OptimizerConfig {
            name: OptimizerName::Sgd,
            ..Default::default()
        }
        .init();
        let model = sgd.step(0.1, model, grads);
        let (w, b) = model.coefficients();
        assert!((w[0] + 0.7).abs() < 1e-6, "m {}", w[0]);
        assert!((b - 5.1).abs() < 1e-6, "b {b}");
    }

    /// Autodiff against central finite differences of the MSE at a random point.
    #[test]
    fn gradient_matches_finite_differences() {
        let device = Device::flex().autodiff();
        let rows = vec![vec![0.5, -1.0], vec![1.5, 2.0], vec![-0.3, 0.7]];
        let y = [1.0, -2.0, 0.5];
        let data = DenseSet::new(&rows, &y);
        let (w0, b0) = ([0.3f64, -0.2], 0.1f64);
        let mse_at = |w: [f64; 2], b: f64| {
            let yh: Vec<f64> = rows.iter().map(|r| r[0] * w[0] + r[1] * w[1] + b).collect();
            metrics::mse(&y, &yh)
        };
        let model = LinearRegression {
            linear: Linear {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(vec![0.3f32, -0.2], [2, 1]),
                    &device,
                )),
                bias: Some(Param::from_tensor(Tensor::from_data(
                    TensorData::new(vec![0.1f32], [1]),
                    &device,
                ))),
            },
        };
        let out = Regression { features: 2 }.step(
            &model,
            &data,
            &[0, 1, 2],
            &device,
            Phase::Train,
            &mut rand::SeedableRng::seed_from_u64(0),
        );
        let grads = out.loss.backward();
        let gw = to_vec(model.linear.weight.val().grad(&grads).unwrap());
        let gb = to_vec(
            model
                .linear
                .bias
                .as_ref()
                .unwrap()
                .val()
                .grad(&grads)
                .unwrap(),
        )[0];
        let h = 1e-5;
        for j in 0..2 {
            let (mut wp, mut wm) = (w0, w0);
            wp[j] += h;
            wm[j] -= h;
            let fd = (mse_at(wp, b0) - mse_at(wm, b0)) / (2.0 * h);
            assert!(
                (gw[j] as f64 - fd).abs() < 1e-4,
                "w{j}: autodiff {} vs fd {fd}",
                gw[j]
            );
        }
        let fd_b = (mse_at(w0, b0 + h) - mse_at(w0, b0 - h)) / (2.0 * h);
        assert!((gb as f64 - fd_b).abs() < 1e-4);
    }

    #[test]
    fn relative_difference() {
        assert_eq!(max_relative_difference(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((max_relative_difference(&[1.001, 2.0], &[1.0, 2.0]) - 1e-3).abs() < 1e-9);
    }
}
