//! Logistic regression on iris (course deck 0, chapters 8–9; course deck 1's losses).
//!
//! Binary (two classes): one output z = w·x + b, probability ŷ = σ(z) = 1 / (1 + e^(−z)),
//! loss binary cross-entropy BCE = −(1/N) Σᵢ [yᵢ log ŷᵢ + (1 − yᵢ) log(1 − ŷᵢ)].
//!
//! Multiclass (K classes): K outputs z = xW + b, probabilities softmax(z)_k = e^(z_k) / Σⱼ e^(z_j),
//! loss cross-entropy CE = −(1/N) Σᵢ Σ_c y_i^c log ŷ_i^c with one-hot targets y.
//!
//! Features are standardised with the training set's mean and deviation.

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor};
use kiln_core::classify;
use kiln_core::data::{DenseSet, to_vec};
use kiln_core::plot::decision_regions;
use kiln_core::tabular::{self, Preprocessing};
use kiln_core::train::{Phase, StepOutput, Supervised, load_model};
use kiln_core::{
    ConfigDoc, Family, Figure, Finished, PredictInput, RunConfig, RunContext, RunDir, metrics,
};
use kiln_datasets::{Standardizer, Table, stratified_split};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// `[params]` of a logistic-regression config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogisticParams {
    #[serde(default = "default_data")]
    pub data: PathBuf,
    #[serde(default = "default_features")]
    pub features: Vec<String>,
    /// Column holding the class names.
    #[serde(default = "default_label")]
    pub label: String,
    /// Classes to keep, in output order; two classes make a binary (sigmoid) model.
    #[serde(default = "default_classes")]
    pub classes: Vec<String>,
    /// Fraction of each class held out as the test set (stratified).
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    #[serde(default = "default_split_seed")]
    pub split_seed: u64,
}

fn default_data() -> PathBuf {
    "data/iris.csv".into()
}
fn default_features() -> Vec<String> {
    ["sepal_length", "sepal_width", "petal_length", "petal_width"]
        .map(String::from)
        .to_vec()
}
fn default_label() -> String {
    "species".into()
}
fn default_classes() -> Vec<String> {
    ["setosa", "versicolor", "virginica"]
        .map(String::from)
        .to_vec()
}
fn default_test_fraction() -> f64 {
    0.2
}
fn default_split_seed() -> u64 {
    42
}

/// One linear layer; the head (sigmoid or softmax) is applied by the loss and by `probabilities`.
#[derive(Module, Debug)]
pub struct LogisticRegression {
    pub linear: Linear,
    #[module(skip)]
    pub classes: usize,
}

impl LogisticRegression {
    pub fn new(features: usize, classes: usize, device: &Device) -> Self {
        LogisticRegression {
            linear: LinearConfig::new(features, classify::outputs(classes)).init(device),
            classes,
        }
    }

    /// Logits z: `[batch, features]` → `[batch, 1]` (binary) or `[batch, K]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear.forward(x)
    }

    /// Class probabilities `[batch, K]` (for binary: [1 − σ(z), σ(z)]).
    pub fn probabilities(&self, x: Tensor<2>) -> Tensor<2> {
        classify::probabilities(self.forward(x), self.classes)
    }

    /// Predicted class per row: σ(z) ≥ 0.5 ⇔ z ≥ 0 (binary), argmax z (multiclass).
    pub fn predict(&self, x: Tensor<2>) -> Tensor<1, Int> {
        classify::predict(self.forward(x), self.classes)
    }
}

/// The supervised problem: BCE (binary) or cross-entropy (multiclass) on dense rows.
pub struct Classification {
    pub features: usize,
    pub classes: usize,
}

impl Supervised for Classification {
    fn loss_name(&self) -> Option<String> {
        Some(
            if self.classes == 2 {
                "binary cross-entropy"
            } else {
                "cross-entropy"
            }
            .into(),
        )
    }

    type Model = LogisticRegression;
    type Data = DenseSet;

    fn init_model(&self, device: &Device) -> LogisticRegression {
        LogisticRegression::new(self.features, self.classes, device)
    }

    fn len(&self, data: &DenseSet) -> usize {
        data.len()
    }

    fn step(
        &self,
        model: &LogisticRegression,
        data: &DenseSet,
        idx: &[usize],
        device: &Device,
        _: Phase,
        _: &mut StdRng,
    ) -> StepOutput {
        let logits = model.forward(data.batch_x(idx, device));
        classify::step(
            logits,
            data.batch_classes(idx, device),
            self.classes,
            device,
        )
    }
}

/// What the outputs of a logistic run are, in its saved preprocessing.
#[derive(Debug, Serialize, Deserialize)]
struct Classes {
    classes: Vec<String>,
}

struct Prepared {
    scaler: Standardizer,
    train: DenseSet,
    test: DenseSet,
    /// Raw (unscaled) rows for plotting.
    train_raw: Vec<Vec<f64>>,
    train_labels: Vec<usize>,
    test_raw: Vec<Vec<f64>>,
    test_labels: Vec<usize>,
}

fn prepare(p: &LogisticParams, source: &std::path::Path) -> Result<Prepared> {
    if p.classes.len() < 2 {
        bail!(
            "{}: params.classes: need at least two classes",
            source.display()
        );
    }
    tabular::check_params(source, &p.features, p.test_fraction)?;
    let table = Table::read(&p.data)?;
    let x = table.numeric(&p.features)?;
    let names = table.text(&p.label)?;
    for c in &p.classes {
        if !names.contains(c) {
            bail!(
                "{}: params.classes: no rows of class {c:?} in {}",
                source.display(),
                p.data.display()
            );
        }
    }
    let (rows, labels): (Vec<Vec<f64>>, Vec<usize>) = x
        .into_iter()
        .zip(&names)
        .filter_map(|(r, n)| p.classes.iter().position(|c| c == n).map(|k| (r, k)))
        .unzip();
    let (train_idx, test_idx) = stratified_split(&labels, p.test_fraction, p.split_seed);
    let pick = |idx: &[usize]| -> (Vec<Vec<f64>>, Vec<usize>) {
        (
            idx.iter().map(|&i| rows[i].clone()).collect(),
            idx.iter().map(|&i| labels[i]).collect(),
        )
    };
    let (train_raw, train_labels) = pick(&train_idx);
    let (test_raw, test_labels) = pick(&test_idx);
    let scaler = Standardizer::fit(&train_raw);
    let as_f64 = |l: &[usize]| l.iter().map(|&v| v as f64).collect::<Vec<_>>();
    Ok(Prepared {
        train: DenseSet::new(&scaler.transform(&train_raw), &as_f64(&train_labels)),
        test: DenseSet::new(&scaler.transform(&test_raw), &as_f64(&test_labels)),
        scaler,
        train_raw,
        train_labels,
        test_raw,
        test_labels,
    })
}

fn predict_classes(model: &LogisticRegression, set: &DenseSet, device: &Device) -> Vec<usize> {
    let data = model.predict(set.all_x(device)).into_data();
    data.iter::<i64>().map(|v| v as usize).collect()
}

pub struct LogisticFamily;

impl LogisticFamily {
    fn config(doc: &ConfigDoc) -> Result<RunConfig<LogisticParams>> {
        tabular::csv_config(doc, "logistic")
    }
}

/// `decision_boundary.png`: the classes over the plane of the two features, with every
/// training and test point.
fn decision_picture(
    run: &RunDir,
    p: &LogisticParams,
    pre: &Preprocessing<Classes>,
    data: &Prepared,
    model: &LogisticRegression,
    device: &Device,
) -> Result<()> {
    let classify = |pts: &[(f64, f64)]| -> Vec<usize> {
        let rows: Vec<Vec<f64>> = pts.iter().map(|&(a, b)| vec![a, b]).collect();
        predict_classes(model, &pre.scaled(&rows), device)
    };
    let points: Vec<(f64, f64, usize)> = data
        .train_raw
        .iter()
        .zip(&data.train_labels)
        .chain(data.test_raw.iter().zip(&data.test_labels))
        .map(|(r, &c)| (r[0], r[1], c))
        .collect();
    decision_regions(
        &run.file("decision_boundary.png"),
        &format!("Decision regions ({})", p.classes.join(" / ")),
        (&p.features[0], &p.features[1]),
        &classify,
        &points,
        &p.classes,
    )
}

/// The test confusion matrix as a Markdown table (rows: true, columns: predicted).
fn confusion_table(classes: &[String], confusion: &[Vec<usize>]) -> String {
    "## Test confusion matrix (rows: true, columns: predicted)\n\n".to_string()
        + &metrics::confusion_markdown("", classes, confusion)
}

impl Family for LogisticFamily {
    fn name(&self) -> &'static str {
        "logistic"
    }

    fn about(&self) -> &'static str {
        "logistic regression on iris: binary (sigmoid + BCE) or multiclass (softmax + CE)"
    }

    fn check(&self, doc: &ConfigDoc) -> Result<()> {
        Self::config(doc).map(|_| ())
    }

    fn train(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = Self::config(&ctx.doc)?;
        let p = &cfg.params;
        let data = prepare(p, &ctx.doc.source)?;
        let (train, val) =
            tabular::validation_part(&data.train, cfg.train.validation_split, cfg.seed);
        let classes = Classes {
            classes: p.classes.clone(),
        };
        let pre = Preprocessing::new(&p.features, classes, &data.scaler);
        ctx.run.write_json(tabular::PREPROCESSING, &pre)?;
        let task = Classification {
            features: p.features.len(),
            classes: p.classes.len(),
        };
        let (fitted, model, device) = ctx.fit(&cfg, &task, &train, &val)?;
        let test_pred = predict_classes(&model, &data.test, &device);
        let train_pred = predict_classes(&model, &data.train, &device);
        let test_acc = metrics::accuracy(&data.test_labels, &test_pred);
        let confusion = metrics::confusion(&data.test_labels, &test_pred, p.classes.len());
        let errors = test_pred
            .iter()
            .zip(&data.test_labels)
            .filter(|(a, b)| a != b)
            .count();
        let mut notes = String::new();
        if p.features.len() == 2 {
            decision_picture(&ctx.run, p, &pre, &data, &model, &device)?;
            notes.push_str("Decision regions over both features: `decision_boundary.png`.\n\n");
        }
        notes.push_str(&confusion_table(&p.classes, &confusion));
        let fields = json!({
            "kind": if p.classes.len() == 2 { "binary" } else { "multiclass" },
            "features": p.features,
            "classes": p.classes,
            "train_examples": data.train_labels.len(),
            "test_examples": data.test_labels.len(),
            "test": {"accuracy": test_acc, "errors": errors, "confusion": confusion},
            "train_accuracy": metrics::accuracy(&data.train_labels, &train_pred),
        });
        let n = data.test_labels.len();
        let text = format!("{:.2}% ({} of {n})", test_acc * 100.0, n - errors);
        let done = Finished {
            title: format!(
                "Logistic regression: {} from {}",
                p.classes.join(" / "),
                p.features.join(", ")
            ),
            fields,
            headline: vec![Figure::new(
                "test.accuracy",
                "test accuracy",
                test_acc,
                text,
            )],
            rows: Vec::new(),
            examples: "rows",
            notes,
        };
        ctx.finish(cfg.backend.as_str(), &fitted, done)
    }

    fn eval(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = Self::config(&ctx.doc)?;
        let p = &cfg.params;
        let data = prepare(p, &ctx.doc.source)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = load_model(
            &ctx.run,
            LogisticRegression::new(p.features.len(), p.classes.len(), &device),
        )?;
        let pred = predict_classes(&model, &data.test, &device);
        Ok(
            json!({"test": {"accuracy": metrics::accuracy(&data.test_labels, &pred), "confusion": metrics::confusion(&data.test_labels, &pred, p.classes.len())}}),
        )
    }

    fn predict(&self, ctx: &RunContext, input: &PredictInput) -> Result<String> {
        let cfg = Self::config(&ctx.doc)?;
        let (pre, set, device) =
            tabular::predict_input::<Classes>(ctx, input, cfg.backend, "logistic regression")?;
        let classes = &pre.outputs.classes;
        let model = load_model(
            &ctx.run,
            LogisticRegression::new(pre.features.len(), classes.len(), &device),
        )?;
        let probs = to_vec(model.probabilities(set.all_x(&device)));
        let k = classes.len();
        let lines = probs
            .chunks(k)
            .map(|p| {
                let best = (0..k).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0);
                let all: Vec<String> = classes
                    .iter()
                    .zip(p)
                    .map(|(c, v)| format!("{c} {v:.3}"))
                    .collect();
                format!("{} ({})", classes[best], all.join(", "))
            })
            .collect::<Vec<_>>();
        Ok(lines.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::loss::{BinaryCrossEntropyLossConfig, CrossEntropyLossConfig};
    use burn::tensor::TensorData;
    use burn::tensor::activation::softmax;

    fn device() -> Device {
        Device::flex()
    }

    /// Course deck 1: outputs 0.2, 0.9, 0.3 for labels 0, 1, 0 give
    /// BCE = −(log(1 − 0.2) + log 0.9 + log(1 − 0.3)) / 3 ≈ 0.2284.
    #[test]
    fn binary_cross_entropy_matches_the_worked_example() {
        let d = device();
        let probs = Tensor::<1>::from_data(TensorData::new(vec![0.2f32, 0.9, 0.3], [3]), &d);
        let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 0], [3]), &d);
        let bce = BinaryCrossEntropyLossConfig::new()
            .init(&d)
            .forward(probs, labels)
            .into_scalar::<f32>();
        let expected = -((0.8f64).ln() + (0.9f64).ln() + (0.7f64).ln()) / 3.0;
        assert!((bce as f64 - expected).abs() < 1e-5, "{bce} vs {expected}");
        assert!((expected - 0.2284).abs() < 1e-4);
    }

    /// Course deck 1: outputs [0.3 0.6 0.1], [0.8 0.1 0.1], [0.2 0.3 0.5] with classes 2, 1, 3 give
    /// CE = −(log 0.6 + log 0.8 + log 0.5) / 3 ≈ 0.4757. Burn's loss takes logits; log p are
    /// logits whose softmax is p.
    #[test]
    fn cross_entropy_matches_the_worked_example() {
        let d = device();
        let p = [0.3f32, 0.6, 0.1, 0.8, 0.1, 0.1, 0.2, 0.3, 0.5];
        let logits = Tensor::<2>::from_data(
            TensorData::new(p.iter().map(|v| v.ln()).collect::<Vec<_>>(), [3, 3]),
            &d,
        );
        let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 0, 2], [3]), &d);
        let ce = CrossEntropyLossConfig::new()
            .init(&d)
            .forward(logits, labels)
            .into_scalar::<f32>();
        let expected = -((0.6f64).ln() + (0.8f64).ln() + (0.5f64).ln()) / 3.0;
        assert!((ce as f64 - expected).abs() < 1e-5, "{ce} vs {expected}");
        assert!((expected - 0.4757).abs() < 1e-4);
    }

    /// Course deck 1: softmax([−1, 2]) = [0.0474, 0.9526].
    #[test]
    fn softmax_matches_the_worked_example() {
        let d = device();
        let z = Tensor::<2>::from_data(TensorData::new(vec![-1.0f32, 2.0], [1, 2]), &d);
        let p = to_vec(softmax(z, 1));
        assert!(
            (p[0] - 0.0474).abs() < 1e-4 && (p[1] - 0.9526).abs() < 1e-4,
            "{p:?}"
        );
    }

    /// Autodiff gradient of the multiclass loss against central finite differences.
    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let d = Device::flex().autodiff();
        let rows = vec![
            vec![0.5, -1.0],
            vec![1.5, 2.0],
            vec![-0.3, 0.7],
            vec![0.1, 0.1],
        ];
        let labels = [0.0, 2.0, 1.0, 2.0];
        let data = DenseSet::new(&rows, &labels);
        let task = Classification {
            features: 2,
            classes: 3,
        };
        d.seed(3);
        let model = task.init_model(&d);
        let w0 = to_vec(model.linear.weight.val());
        let b0 = to_vec(model.linear.bias.as_ref().unwrap().val());
        let loss_at = |w: &[f32]| -> f64 {
            // Reference CE in f64: −(1/N) Σ log softmax(z)_y.
            rows.iter()
                .zip(labels)
                .map(|(r, y)| {
                    let z: Vec<f64> = (0..3)
                        .map(|k| r[0] * w[k] as f64 + r[1] * w[3 + k] as f64 + b0[k] as f64)
                        .collect();
                    let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
                    lse - z[y as usize]
                })
                .sum::<f64>()
                / rows.len() as f64
        };
        let out = task.step(
            &model,
            &data,
            &[0, 1, 2, 3],
            &d,
            Phase::Train,
            &mut rand::SeedableRng::seed_from_u64(0),
        );
        let grads = out.loss.backward();
        let gw = to_vec(model.linear.weight.val().grad(&grads).unwrap());
        let h = 1e-3f32;
        for j in 0..w0.len() {
            let (mut wp, mut wm) = (w0.clone(), w0.clone());
            wp[j] += h;
            wm[j] -= h;
            let fd = (loss_at(&wp) - loss_at(&wm)) / (2.0 * h as f64);
            assert!(
                (gw[j] as f64 - fd).abs() < 1e-3,
                "w{j}: autodiff {} vs fd {fd}",
                gw[j]
            );
        }
    }
}
