//! The three recurrent families the runner drives: `rnn-series` (forecasting),
//! `rnn-classify` (sequence classification) and `char-rnn` (character-level language model).

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use burn::module::Module;
use burn::tensor::Device;
use kiln_core::plot::{Series as Line, confusion_matrix, line_chart};
use kiln_core::train::{Benchmark, benchmark, evaluate, load_model, peak_rss};
use kiln_core::{
    ConfigDoc, Family, Figure, Finished, PredictInput, RunConfig, RunContext, RunDir, TextRequest,
    classify,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use kiln_datasets::tabular::Standardizer;

use crate::recurrent::StackParams;
use crate::sequence::{self, Careers, SequenceNet, SequenceTask, Sequences};
use crate::series::{self, Forecaster, SeriesSplit, SeriesTask, Synthetic};
use crate::text::{
    self, CharModel, CharNet, CharNetParams, CharTask, NetKind, Sampling, TextSplit, Vocab,
};
use crate::transformer::CharTransformer;

const INFO: &str = "info.json";

fn cfg_err(doc: &ConfigDoc, field: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{}: params.{field}{e}", doc.source.display())
}

fn metrics_json(m: Vec<(String, f64)>) -> Value {
    Value::Object(m.into_iter().map(|(k, v)| (k, json!(v))).collect())
}

fn check_fraction(doc: &ConfigDoc, field: &str, v: f64) -> Result<()> {
    if !(v > 0.0 && v < 0.5) {
        return Err(cfg_err(
            doc,
            field,
            format!(": must be in (0, 0.5), got {v}"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// rnn-series

/// `[params.data]` of a forecaster: the synthetic series or a CSV column.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesData {
    #[serde(default)]
    pub synthetic: Option<Synthetic>,
    #[serde(default)]
    pub csv: Option<PathBuf>,
    #[serde(default)]
    pub column: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesParams {
    /// W: how many past values the network reads.
    pub window: usize,
    /// H: how many next values it forecasts.
    #[serde(default = "one")]
    pub horizon: usize,
    /// k of the moving-average baseline (mean of the last k values).
    #[serde(default = "ten")]
    pub moving_average: usize,
    /// The last fraction of the targets (in time) is the test part.
    pub test_fraction: f64,
    pub data: SeriesData,
    pub net: StackParams,
}

fn one() -> usize {
    1
}
fn ten() -> usize {
    10
}

/// What a forecasting run keeps beside its weights (`info.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SeriesInfo {
    mean: f64,
    std: f64,
    window: usize,
    horizon: usize,
    column: String,
}

pub struct SeriesFamily;
pub static SERIES: SeriesFamily = SeriesFamily;

impl SeriesFamily {
    fn config(&self, doc: &ConfigDoc) -> Result<RunConfig<SeriesParams>> {
        Ok(doc.typed()?)
    }

    fn load(&self, doc: &ConfigDoc, cfg: &RunConfig<SeriesParams>) -> Result<(Vec<f64>, String)> {
        let d = &cfg.params.data;
        match (&d.synthetic, &d.csv) {
            (Some(g), None) => {
                if g.length == 0
                    || g.period.is_nan()
                    || g.period <= 0.0
                    || g.noise.is_nan()
                    || g.noise < 0.0
                {
                    return Err(cfg_err(
                        doc,
                        "data.synthetic",
                        ": length and period must be positive and noise not negative",
                    ));
                }
                Ok((g.generate(cfg.seed), "value".into()))
            }
            (None, Some(path)) => {
                let column = d.column.clone().ok_or_else(|| {
                    cfg_err(
                        doc,
                        "data.column",
                        ": which column of params.data.csv to forecast",
                    )
                })?;
                Ok((series::read_column(path, &column)?, column))
            }
            _ => Err(cfg_err(
                doc,
                "data",
                ": give either synthetic = { … } or csv = \"FILE\" with column = \"NAME\"",
            )),
        }
    }

    fn checked(&self, doc: &ConfigDoc) -> Result<RunConfig<SeriesParams>> {
        let cfg = self.config(doc)?;
        let p = &cfg.params;
        for (k, v) in [
            ("window", p.window),
            ("horizon", p.horizon),
            ("moving_average", p.moving_average),
        ] {
            if v == 0 {
                return Err(cfg_err(doc, k, ": must be at least 1"));
            }
        }
        p.net.check().map_err(|e| cfg_err(doc, "net.", e))?;
        if p.moving_average > p.window {
            return Err(cfg_err(
                doc,
                "moving_average",
                ": must not exceed the window",
            ));
        }
        check_fraction(doc, "test_fraction", p.test_fraction)?;
        Ok(cfg)
    }

    /// The training, validation and test targets of a series of `n` values.
    fn targets(cfg: &RunConfig<SeriesParams>, n: usize) -> Result<[Vec<usize>; 3], String> {
        let p = &cfg.params;
        series::split_targets(
            n,
            p.window,
            p.horizon,
            cfg.train.validation_split,
            p.test_fraction,
        )
        .map_err(|e| format!("params.window: {e}"))
    }

    /// Forecasts (original units, every horizon) of the network for `targets`.
    fn forecast(
        model: &Forecaster,
        z: &[f32],
        targets: &[usize],
        info: &SeriesInfo,
        device: &Device,
    ) -> Vec<f64> {
        let mut out = Vec::with_capacity(targets.len() * info.horizon);
        for chunk in targets.chunks(512) {
            let windows: Vec<&[f32]> = chunk.iter().map(|&t| &z[t - info.window..t]).collect();
            let pred = kiln_core::data::to_vec(model.forward(&windows, device));
            out.extend(pred.iter().map(|&v| v as f64 * info.std + info.mean));
        }
        out
    }
}

/// The standardisation of a series from its training part only: the values up to the last
/// training target.
fn standardised(
    p: &SeriesParams,
    y: &[f64],
    train_targets: &[usize],
    column: String,
) -> SeriesInfo {
    let train_end = train_targets.last().map(|t| t + p.horizon).unwrap_or(0);
    let rows: Vec<Vec<f64>> = y[..train_end].iter().map(|v| vec![*v]).collect();
    let scaler = Standardizer::fit(&rows);
    SeriesInfo {
        mean: scaler.mean[0],
        std: scaler.std[0],
        window: p.window,
        horizon: p.horizon,
        column,
    }
}

/// The forecast's test numbers beside the baselines' (and the noise floor of a synthetic
/// series), with their report rows.
fn series_test(
    p: &SeriesParams,
    y: &[f64],
    te: &[usize],
    pred: &[f64],
) -> (Value, Vec<(String, String)>) {
    let truth = series::truth(y, te, p.horizon);
    let (last, avg) = series::baselines(y, te, p.horizon, p.moving_average);
    let test_mse = series::mse(pred, &truth);
    let last_mse = series::mse(&last, &truth);
    let avg_mse = series::mse(&avg, &truth);
    let sigma2 = p.data.synthetic.as_ref().map(|g| g.noise * g.noise);
    let mut rows = vec![
        (
            "last-value baseline MSE".to_string(),
            format!("{last_mse:.5}"),
        ),
        (
            format!("moving average of {} MSE", p.moving_average),
            format!("{avg_mse:.5}"),
        ),
    ];
    if let Some(s) = sigma2 {
        rows.push((
            "noise variance σ² (the best possible)".into(),
            format!("{s:.5} (test MSE = {:.3}·σ²)", test_mse / s),
        ));
    }
    let test = json!({
        "mse": test_mse,
        "last_value_mse": last_mse,
        "moving_average_mse": avg_mse,
        "noise_variance": sigma2,
        "mse_over_noise_variance": sigma2.map(|s| test_mse / s),
    });
    (test, rows)
}

/// `forecast.png`: the truth and the next-value forecast over the test part.
fn forecast_picture(
    run: &RunDir,
    info: &SeriesInfo,
    y: &[f64],
    te: &[usize],
    pred: &[f64],
) -> Result<()> {
    let h = info.horizon;
    line_chart(
        &run.file("forecast.png"),
        "Forecast on the test part (next value)",
        "time step",
        &info.column,
        &[
            Line {
                name: "truth",
                points: te.iter().map(|&t| (t as f64, y[t])).collect(),
            },
            Line {
                name: "forecast",
                points: te
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| (t as f64, pred[i * h]))
                    .collect(),
            },
        ],
    )
}

impl Family for SeriesFamily {
    fn name(&self) -> &'static str {
        "rnn-series"
    }
    fn about(&self) -> &'static str {
        "LSTM/GRU forecaster: the last W values of a series → the next H (synthetic or a CSV column)"
    }
    fn check(&self, doc: &ConfigDoc) -> Result<()> {
        self.checked(doc).map(|_| ())
    }

    fn train(&self, ctx: &RunContext) -> Result<Value> {
        let doc = &ctx.doc;
        let cfg = self.checked(doc)?;
        let p = &cfg.params;
        let (y, column) = self.load(doc, &cfg)?;
        let source = p
            .data
            .csv
            .as_ref()
            .map(|c| c.display().to_string())
            .unwrap_or_else(|| doc.source.display().to_string());
        let [tr, va, te] = Self::targets(&cfg, y.len()).map_err(|e| anyhow!("{source}: {e}"))?;
        let info = standardised(p, &y, &tr, column);
        ctx.run.write_json(INFO, &info)?;
        let z: Vec<f32> = y
            .iter()
            .map(|v| ((v - info.mean) / info.std) as f32)
            .collect();
        let split = |targets: &[usize]| SeriesSplit {
            z: &z,
            targets: targets.to_vec(),
            window: p.window,
            horizon: p.horizon,
        };
        let (train, val) = (split(&tr), split(&va));
        let counts = format!(
            "{} values; {} / {} / {} targets",
            y.len(),
            tr.len(),
            va.len(),
            te.len()
        );
        eprintln!("series: {counts} (training / validation / test, in time order)");
        let task = SeriesTask {
            params: &p.net,
            horizon: p.horizon,
        };
        let (fitted, model, device) = ctx.fit(&cfg, &task, &train, &val)?;
        let pred = Self::forecast(&model, &z, &te, &info, &device);
        forecast_picture(&ctx.run, &info, &y, &te, &pred)?;
        let (test, mut rows) = series_test(p, &y, &te, &pred);
        rows.push(("data".into(), format!("{source} ({counts}, in time order)")));
        let test_mse = test["mse"].as_f64().unwrap_or(f64::NAN);
        let fields = json!({
            "data": source,
            "column": info.column,
            "architecture": p.net.describe(p.horizon),
            "parameters": model.num_params(),
            "window": p.window,
            "horizon": p.horizon,
            "train_targets": tr.len(),
            "validation_targets": va.len(),
            "test_targets": te.len(),
            "standardisation": {"mean": info.mean, "std": info.std},
            "test": test,
        });
        let done = Finished {
            title: "Time-series forecast".into(),
            fields,
            headline: vec![Figure::new("test.mse", "test MSE", test_mse, format!("{test_mse:.5}"))],
            rows,
            examples: "windows",
            notes: "Picture: `forecast.png` (truth and forecast on the test part). MSE is in the series' own units; standardisation used the training part only.\n".into(),
        };
        ctx.finish(cfg.backend.as_str(), &fitted, done)
    }

    fn eval(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = self.checked(&ctx.doc)?;
        let info: SeriesInfo = ctx.run.read_json(INFO)?;
        let (y, _) = self.load(&ctx.doc, &cfg)?;
        let p = &cfg.params;
        let [_, _, te] = Self::targets(&cfg, y.len())
            .map_err(|e| anyhow!("{}: {e}", ctx.doc.source.display()))?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = load_model(&ctx.run, Forecaster::new(&p.net, p.horizon, &device))?;
        let z: Vec<f32> = y
            .iter()
            .map(|v| ((v - info.mean) / info.std) as f32)
            .collect();
        let pred = Self::forecast(&model, &z, &te, &info, &device);
        Ok(json!({"test": {"mse": series::mse(&pred, &series::truth(&y, &te, p.horizon))}}))
    }

    fn predict(&self, ctx: &RunContext, input: &PredictInput) -> Result<String> {
        let cfg = self.checked(&ctx.doc)?;
        let info: SeriesInfo = ctx.run.read_json(INFO)?;
        let PredictInput::Values(v) = input else {
            bail!("rnn-series: predict --input CSV (or comma-separated values) of the series");
        };
        let path = Path::new(v);
        let (values, what) = if path.is_file() {
            (
                series::read_column(path, &info.column)?,
                path.display().to_string(),
            )
        } else {
            let vals: Result<Vec<f64>> = v
                .split(',')
                .enumerate()
                .map(|(i, s)| {
                    s.trim().parse::<f64>().map_err(|_| {
                        anyhow!("--input: value {} is not a number: {:?}", i + 1, s.trim())
                    })
                })
                .collect();
            (vals?, "--input".to_string())
        };
        if values.len() < info.window {
            bail!(
                "{what}: the series has {} values, fewer than the model's window of {}",
                values.len(),
                info.window
            );
        }
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = load_model(
            &ctx.run,
            Forecaster::new(&cfg.params.net, info.horizon, &device),
        )?;
        let z: Vec<f32> = values
            .iter()
            .map(|v| ((v - info.mean) / info.std) as f32)
            .collect();
        let pred = Self::forecast(&model, &z, &[z.len()], &info, &device);
        Ok(pred
            .iter()
            .enumerate()
            .map(|(i, v)| format!("t+{}: {v:.6}", i + 1))
            .collect::<Vec<_>>()
            .join("\n"))
    }
}

// ---------------------------------------------------------------------------------------
// rnn-classify

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceData {
    #[serde(default)]
    pub careers: Option<Careers>,
    #[serde(default)]
    pub csv: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceParams {
    /// The fraction of the sequences (seeded shuffle) kept apart as the test set.
    pub test_fraction: f64,
    pub data: SequenceData,
    pub net: StackParams,
    /// Full-batch Adam steps of the order-blind dense baseline (0 = skip it).
    #[serde(default = "baseline_steps")]
    pub baseline_steps: usize,
}

fn baseline_steps() -> usize {
    300
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SequenceInfo {
    classes: Vec<String>,
    steps: usize,
    features: usize,
}

pub struct SequenceFamily;
pub static CLASSIFY: SequenceFamily = SequenceFamily;

impl SequenceFamily {
    /// The sequences, split into train / validation / test (seeded), with the source's name;
    /// writes the run's `SequenceInfo`.
    fn prepare(
        &self,
        ctx: &RunContext,
        cfg: &RunConfig<SequenceParams>,
    ) -> Result<(Sequences, [Sequences; 3], String)> {
        let (all, source) = self.load(&ctx.doc, cfg)?;
        let k = all.classes.len();
        if k < 2 {
            bail!("{source}: needs at least 2 classes, found {k}");
        }
        let [tr, va, te] = Self::split(
            all.len(),
            cfg.train.validation_split,
            cfg.params.test_fraction,
            cfg.seed,
        );
        let (train, val, test) = (all.select(&tr), all.select(&va), all.select(&te));
        ctx.run.write_json(
            INFO,
            &SequenceInfo {
                classes: all.classes.clone(),
                steps: all.steps,
                features: all.features,
            },
        )?;
        eprintln!(
            "{source}: {} sequences of {} steps × {} features, {k} classes; {} train / {} validation / {} test",
            all.len(),
            all.steps,
            all.features,
            train.len(),
            val.len(),
            test.len()
        );
        Ok((all, [train, val, test], source))
    }

    fn checked(&self, doc: &ConfigDoc) -> Result<RunConfig<SequenceParams>> {
        let cfg: RunConfig<SequenceParams> = doc.typed()?;
        let p = &cfg.params;
        if p.net.hidden == 0 || p.net.layers == 0 {
            return Err(cfg_err(
                doc,
                "net",
                ": hidden and layers must be at least 1",
            ));
        }
        check_fraction(doc, "test_fraction", p.test_fraction)?;
        Ok(cfg)
    }

    fn load(
        &self,
        doc: &ConfigDoc,
        cfg: &RunConfig<SequenceParams>,
    ) -> Result<(Sequences, String)> {
        match (&cfg.params.data.careers, &cfg.params.data.csv) {
            (Some(g), None) => {
                if g.sequences < 10 || g.steps < 2 || g.features == 0 {
                    return Err(cfg_err(
                        doc,
                        "data.careers",
                        ": needs at least 10 sequences, 2 steps and 1 feature",
                    ));
                }
                Ok((g.generate(cfg.seed), "synthetic careers".into()))
            }
            (None, Some(path)) => Ok((sequence::read_csv(path)?, path.display().to_string())),
            _ => Err(cfg_err(
                doc,
                "data",
                ": give either careers = { … } or csv = \"FILE\"",
            )),
        }
    }

    /// (train, validation, test) indices: a seeded shuffle, test the last part.
    fn split(n: usize, val: f64, test: f64, seed: u64) -> [Vec<usize>; 3] {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5e9_117));
        let n_test = ((n as f64 * test).round() as usize).max(1);
        let rest = n - n_test;
        let n_val = (rest as f64 * val).round() as usize;
        [
            idx[..rest - n_val].to_vec(),
            idx[rest - n_val..rest].to_vec(),
            idx[rest..].to_vec(),
        ]
    }

    fn predict_all(model: &SequenceNet, data: &Sequences, device: &Device) -> Vec<usize> {
        let k = data.classes.len();
        let idx: Vec<usize> = (0..data.len()).collect();
        let mut out = Vec::with_capacity(data.len());
        for chunk in idx.chunks(512) {
            let p = classify::predict(model.forward(data, chunk, device), k);
            let v: Vec<i64> = p
                .into_data()
                .convert::<i64>()
                .try_into_vec()
                .unwrap_or_default();
            out.extend(v.into_iter().map(|c| c as usize));
        }
        out
    }
}

/// A sequence classifier's `summary.json` sections and `report.md` words: the test accuracy
/// from the confusion `counts` against the order-blind baseline and chance.
fn sequence_finished(
    mut fields: Value,
    classes: &[String],
    counts: Vec<Vec<usize>>,
    baseline: Option<f64>,
    data: String,
) -> Finished {
    let k = classes.len();
    let n: usize = counts.iter().flatten().sum();
    let accuracy = (0..k).map(|c| counts[c][c]).sum::<usize>() as f64 / n as f64;
    let mut rows = Vec::new();
    if let Some(b) = baseline {
        rows.push((
            "dense network on time-averaged features (order-blind)".into(),
            format!("{:.2}%", b * 100.0),
        ));
    }
    rows.push(("chance".into(), format!("{:.2}%", 100.0 / k as f64)));
    rows.push(("data".into(), data));
    let notes = confusion_notes(classes, &counts);
    fields["test_accuracy"] = json!(accuracy);
    fields["confusion"] = json!(counts);
    Finished {
        title: "Sequence classification".into(),
        fields,
        headline: vec![Figure::percent("test_accuracy", "test accuracy", accuracy)],
        rows,
        examples: "sequences",
        notes,
    }
}

/// The confusion matrix as a Markdown table under its picture's name.
fn confusion_notes(classes: &[String], counts: &[Vec<usize>]) -> String {
    "Confusion matrix (rows: true class, columns: predicted): `confusion.png`.\n\n".to_string()
        + &kiln_core::metrics::confusion_markdown("true \\ predicted", classes, counts)
}

impl Family for SequenceFamily {
    fn name(&self) -> &'static str {
        "rnn-classify"
    }
    fn about(&self) -> &'static str {
        "LSTM/GRU sequence classifier: yearly statistics → one of k ranges (synthetic careers or a CSV)"
    }
    fn check(&self, doc: &ConfigDoc) -> Result<()> {
        self.checked(doc).map(|_| ())
    }

    fn train(&self, ctx: &RunContext) -> Result<Value> {
        let doc = &ctx.doc;
        let cfg = self.checked(doc)?;
        let p = &cfg.params;
        let (all, [train, val, test], source) = self.prepare(ctx, &cfg)?;
        let k = all.classes.len();
        let task = SequenceTask {
            params: &p.net,
            features: all.features,
            classes: k,
        };
        let (fitted, model, device) = ctx.fit(&cfg, &task, &train, &val)?;
        let pred = Self::predict_all(&model, &test, &device);
        let mut counts = vec![vec![0usize; k]; k];
        for (p, y) in pred.iter().zip(&test.y) {
            counts[*y][*p] += 1;
        }
        confusion_matrix(
            &ctx.run.file("confusion.png"),
            "Test confusion matrix",
            &all.classes,
            &counts,
        )?;
        let baseline = (p.baseline_steps > 0)
            .then(|| sequence::bag_baseline(&train, &test, cfg.seed, p.baseline_steps));
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let test_metrics = evaluate(&task, &model, &test, &device, 512, &mut rng);
        let fields = json!({
            "data": source,
            "classes": all.classes,
            "architecture": p.net.describe(k),
            "parameters": model.num_params(),
            "train_examples": train.len(),
            "validation_examples": val.len(),
            "test_examples": test.len(),
            "test": metrics_json(test_metrics),
            "bag_of_features_baseline_accuracy": baseline,
            "chance_accuracy": 1.0 / k as f64,
        });
        let split = format!("{} / {} / {}", train.len(), val.len(), test.len());
        let data = format!(
            "{source}: {} steps × {} features ({split})",
            all.steps, all.features
        );
        let done = sequence_finished(fields, &all.classes, counts, baseline, data);
        ctx.finish(cfg.backend.as_str(), &fitted, done)
    }

    fn eval(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = self.checked(&ctx.doc)?;
        let (all, _) = self.load(&ctx.doc, &cfg)?;
        let [_, _, te] = Self::split(
            all.len(),
            cfg.train.validation_split,
            cfg.params.test_fraction,
            cfg.seed,
        );
        let test = all.select(&te);
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let task = SequenceTask {
            params: &cfg.params.net,
            features: all.features,
            classes: all.classes.len(),
        };
        let model = load_model(
            &ctx.run,
            SequenceNet::new(&cfg.params.net, all.features, all.classes.len(), &device),
        )?;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        Ok(json!({"test": metrics_json(evaluate(&task, &model, &test, &device, 512, &mut rng))}))
    }

    fn predict(&self, ctx: &RunContext, input: &PredictInput) -> Result<String> {
        let cfg = self.checked(&ctx.doc)?;
        let info: SequenceInfo = ctx.run.read_json(INFO)?;
        let PredictInput::Values(v) = input else {
            bail!(
                "rnn-classify: predict --input FILE.csv (columns sequence,label,<features…>; label may be empty)"
            );
        };
        let data = sequence::read_csv(Path::new(v))?;
        if data.steps != info.steps || data.features != info.features {
            bail!(
                "{v}: sequences of {} steps × {} features; the model reads {} × {}",
                data.steps,
                data.features,
                info.steps,
                info.features
            );
        }
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let k = info.classes.len();
        let model = load_model(
            &ctx.run,
            SequenceNet::new(&cfg.params.net, info.features, k, &device),
        )?;
        let idx: Vec<usize> = (0..data.len()).collect();
        let probs = kiln_core::data::to_vec(classify::probabilities(
            model.forward(&data, &idx, &device),
            k,
        ));
        let mut out = Vec::new();
        for i in 0..data.len() {
            let row = &probs[i * k..(i + 1) * k];
            let best = (0..k)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap_or(0);
            out.push(format!(
                "sequence {}: {} ({:.1}%)",
                i + 1,
                info.classes[best],
                row[best] * 100.0
            ));
        }
        Ok(out.join("\n"))
    }
}

// ---------------------------------------------------------------------------------------
// char-rnn

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextData {
    /// A UTF-8 text file, or a directory whose files are read in name order.
    pub text: PathBuf,
    /// File names skipped in a directory.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Use only the first this many characters (0 = all).
    #[serde(default)]
    pub max_chars: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CharParams {
    /// T: characters per training window (the truncation length of backpropagation).
    pub window: usize,
    /// Fraction of the text kept apart as the test set.
    pub test_fraction: f64,
    pub data: TextData,
    pub net: CharNetParams,
}

/// Size of the blocks the text is dealt out in to training, validation and test: a hundredth
/// of the text, at least 100 and at most 10,000 characters.
fn block_size(chars: usize) -> usize {
    (chars / 100).clamp(100, 10_000)
}

/// A character-level language model: `char-rnn` (an LSTM or GRU) or `char-transformer`; the
/// same corpus, training, evaluation and sampling, a different network (`params.net.kind`).
pub struct CharFamily {
    name: &'static str,
    about: &'static str,
    kind: NetKind,
}

pub static CHAR: CharFamily = CharFamily {
    name: "char-rnn",
    about: "character-level language model on any UTF-8 text (English or Chinese): an LSTM or GRU (params.net.cell); kiln sample writes text",
    kind: NetKind::Recurrent,
};

pub static CHAR_TRANSFORMER: CharFamily = CharFamily {
    name: "char-transformer",
    about: "character-level language model on any UTF-8 text: a causal Transformer (pre-norm blocks of self-attention and MLP); kiln sample writes text",
    kind: NetKind::Transformer,
};

/// The three parts of a text: blocks of `block_size` characters are dealt out by the
/// low-discrepancy sequence u_i = frac(i·φ) (φ the golden ratio): block i goes to test when
/// u_i < test, to validation when u_i < test + val, else to training. So every part samples
/// the whole corpus (all fortune files), in the stated proportions, the same way every run.
pub fn deal_blocks(ids: &[u32], val: f64, test: f64) -> [Vec<u32>; 3] {
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let mut parts: [Vec<u32>; 3] = Default::default();
    for (i, block) in ids.chunks(block_size(ids.len())).enumerate() {
        let u = (i as f64 * phi).fract();
        let part = if u < test {
            2
        } else if u < test + val {
            1
        } else {
            0
        };
        parts[part].extend_from_slice(block);
    }
    parts
}

struct Prepared {
    vocab: Vocab,
    parts: [Vec<u32>; 3],
    sources: Vec<PathBuf>,
    chars: usize,
}

/// A character model's test numbers.
#[derive(Clone, Copy)]
struct CharTest {
    nats: f64,
    bpc: f64,
    val_bpc: f64,
    entropy: f64,
    chars_per_s: f64,
}

impl CharFamily {
    fn checked(&self, doc: &ConfigDoc) -> Result<RunConfig<CharParams>> {
        let cfg: RunConfig<CharParams> = doc.typed()?;
        let p = &cfg.params;
        p.net.check().map_err(|e| cfg_err(doc, "net.", e))?;
        if p.window < 2 {
            return Err(cfg_err(doc, "window", ": must be at least 2"));
        }
        check_fraction(doc, "test_fraction", p.test_fraction)?;
        if cfg.train.validation_split <= 0.0 {
            bail!(
                "{}: train.validation_split: a language model needs held-out text (e.g. 0.05)",
                doc.source.display()
            );
        }
        Ok(cfg)
    }

    fn prepare(&self, cfg: &RunConfig<CharParams>) -> Result<Prepared> {
        let d = &cfg.params.data;
        let mut corpus = text::load_corpus(&d.text, &d.exclude)?;
        if d.max_chars > 0 {
            corpus.text.truncate(d.max_chars);
        }
        let vocab = Vocab::of(&corpus.text);
        let ids: Vec<u32> = corpus
            .text
            .iter()
            .map(|&c| vocab.id(c).expect("the vocabulary holds every character"))
            .collect();
        let parts = deal_blocks(&ids, cfg.train.validation_split, cfg.params.test_fraction);
        let w = cfg.params.window;
        for (name, part) in ["training", "validation", "test"].iter().zip(&parts) {
            if part.len() <= w + 1 {
                bail!(
                    "{}: params.data.text: the {name} part has {} characters, fewer than one window of {} (use more text or a smaller window)",
                    d.text.display(),
                    part.len(),
                    w + 1
                );
            }
        }
        Ok(Prepared {
            vocab,
            parts,
            sources: corpus.sources,
            chars: ids.len(),
        })
    }

    /// The vocabulary a finished or checkpointed run was trained with.
    fn run_vocab(ctx: &RunContext) -> Result<Vocab> {
        ctx.run.read_json::<Vocab>("vocab.json")
    }

    fn load_net<N: CharModel>(
        ctx: &RunContext,
        cfg: &RunConfig<CharParams>,
        device: &Device,
    ) -> Result<(N, Vocab)> {
        let vocab = Self::run_vocab(ctx)?;
        let fresh = N::build(&cfg.params.net, vocab.len(), cfg.params.window, device);
        let model = load_model(&ctx.run, fresh).map_err(|e| {
            anyhow!(
                "{e} (vocab.json lists {} characters; the checkpoint must have as many outputs)",
                vocab.len()
            )
        })?;
        Ok((model, vocab))
    }
}

/// The family's commands for one network type `N` (dispatched on `params.net.kind`).
impl CharFamily {
    /// A resumed run must see the vocabulary it was trained on.
    fn same_vocab_on_resume(
        ctx: &RunContext,
        cfg: &RunConfig<CharParams>,
        vocab: &Vocab,
    ) -> Result<()> {
        let vocab_file = ctx.run.file("vocab.json");
        if !(ctx.resume && vocab_file.is_file()) {
            return Ok(());
        }
        let saved = Self::run_vocab(ctx)?;
        if saved != *vocab {
            bail!(
                "{}: the run was trained on a vocabulary of {} characters, the text {} now gives {} (the corpus changed; train a new run)",
                vocab_file.display(),
                saved.len(),
                cfg.params.data.text.display(),
                vocab.len()
            );
        }
        Ok(())
    }

    fn train_as<N: CharModel>(&self, ctx: &RunContext) -> Result<Value> {
        let doc = &ctx.doc;
        let cfg = self.checked(doc)?;
        let p = &cfg.params;
        let data = self.prepare(&cfg)?;
        Self::same_vocab_on_resume(ctx, &cfg, &data.vocab)?;
        ctx.run.write_json("vocab.json", &data.vocab)?;
        let [tr, va, te] = &data.parts;
        let entropy = text::unigram_entropy(tr, data.vocab.len());
        eprintln!(
            "{}: {} files, {} characters, vocabulary {}; {} train / {} validation / {} test; unigram entropy {entropy:.3} bits/char",
            p.data.text.display(),
            data.sources.len(),
            data.chars,
            data.vocab.len(),
            tr.len(),
            va.len(),
            te.len()
        );
        let split = |ids: &Vec<u32>| TextSplit {
            ids: ids.clone(),
            window: p.window,
        };
        let (train, val, test) = (split(tr), split(va), split(te));
        let task = CharTask::<N>::new(&p.net, data.vocab.len(), p.window);
        let (fitted, model, device) = ctx.fit(&cfg, &task, &train, &val)?;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let test_m = evaluate(&task, &model, &test, &device, 32, &mut rng);
        let nats = test_m.first().map(|m| m.1).unwrap_or(f64::NAN);
        let bpc = nats / std::f64::consts::LN_2;
        let val_bpc = fitted
            .history
            .last()
            .and_then(|r| r.get("val_bpc"))
            .unwrap_or(f64::NAN);
        let sample = Self::sample_text(ctx, &model, &data.vocab, &device)?;
        let chars_per_s = fitted.examples_per_second().unwrap_or(0.0) * p.window as f64;
        let test = CharTest {
            nats,
            bpc,
            val_bpc,
            entropy,
            chars_per_s,
        };
        let done = Self::finished(ctx, p, &data, &model, &test, &sample);
        ctx.finish(cfg.backend.as_str(), &fitted, done)
    }

    /// A character model's `summary.json` sections and `report.md` words: bits per
    /// character against the unigram entropy, and a sample.
    fn finished<N: CharModel>(
        ctx: &RunContext,
        p: &CharParams,
        data: &Prepared,
        model: &N,
        t: &CharTest,
        sample: &str,
    ) -> Finished {
        let [tr, va, te] = &data.parts;
        let CharTest {
            nats,
            bpc,
            val_bpc,
            entropy,
            chars_per_s,
        } = *t;
        let corpus = format!(
            "{} ({} files, {} characters, vocabulary {}; {} / {} / {})",
            p.data.text.display(),
            data.sources.len(),
            data.chars,
            data.vocab.len(),
            tr.len(),
            va.len(),
            te.len()
        );
        let fields = json!({
            "corpus": p.data.text.display().to_string(),
            "files": data.sources.len(),
            "characters": data.chars,
            "vocabulary": data.vocab.len(),
            "train_characters": tr.len(),
            "validation_characters": va.len(),
            "test_characters": te.len(),
            "architecture": p.net.describe(data.vocab.len()),
            "parameters": model.num_params(),
            "unigram_entropy_bits": entropy,
            "test": {"loss_nats": nats, "bits_per_char": bpc, "bpc_over_unigram_entropy": bpc / entropy},
            "validation_bits_per_char": val_bpc,
            "training_characters_per_second": chars_per_s,
        });
        let text = format!(
            "{bpc:.3} ({nats:.3} nats; {:.2} × the unigram entropy)",
            bpc / entropy
        );
        Finished {
            title: "Character-level language model".into(),
            fields,
            headline: vec![Figure::new(
                "test.bits_per_char",
                "test bits per character",
                bpc,
                text,
            )],
            rows: vec![
                (
                    "validation bits per character".into(),
                    format!("{val_bpc:.3}"),
                ),
                (
                    "unigram entropy of the training text".into(),
                    format!("{entropy:.3} bits"),
                ),
                ("corpus".into(), corpus),
                ("network".into(), p.net.describe(data.vocab.len())),
                ("parameters".into(), model.num_params().to_string()),
                (
                    "training speed".into(),
                    format!("{chars_per_s:.0} characters/s"),
                ),
            ],
            examples: "windows",
            notes: format!(
                "Sample (temperature 0.8, seed 0; all of it in `sample.txt`; more with `kiln sample {} --prompt TEXT`):\n\n```text\n{}\n```\n",
                ctx.run.path().display(),
                sample.chars().take(400).collect::<String>()
            ),
        }
    }

    /// 500 characters at temperature 0.8 from seed 0, written to `sample.txt`.
    fn sample_text<N: CharModel>(
        ctx: &RunContext,
        model: &N,
        vocab: &Vocab,
        device: &Device,
    ) -> Result<String> {
        let sampling = Sampling {
            temperature: 0.8,
            top_k: None,
        };
        let sample = text::generate(
            model,
            vocab,
            &[],
            500,
            &sampling,
            &mut StdRng::seed_from_u64(0),
            device,
        );
        kiln_core::run::write_atomic(&ctx.run.file("sample.txt"), sample.as_bytes())?;
        Ok(sample)
    }

    fn eval_as<N: CharModel>(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = self.checked(&ctx.doc)?;
        let data = self.prepare(&cfg)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let (model, vocab) = Self::load_net::<N>(ctx, &cfg, &device)?;
        if vocab != data.vocab {
            bail!(
                "{}: the run's vocabulary ({} characters) differs from that of {} now ({})",
                ctx.run.file("vocab.json").display(),
                vocab.len(),
                cfg.params.data.text.display(),
                data.vocab.len()
            );
        }
        let task = CharTask::<N>::new(&cfg.params.net, vocab.len(), cfg.params.window);
        let test = TextSplit {
            ids: data.parts[2].clone(),
            window: cfg.params.window,
        };
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        Ok(json!({"test": metrics_json(evaluate(&task, &model, &test, &device, 32, &mut rng))}))
    }

    fn predict_as<N: CharModel>(&self, ctx: &RunContext, input: &PredictInput) -> Result<String> {
        let PredictInput::Values(prompt) = input else {
            bail!("char-rnn: predict --input TEXT gives the most likely next characters");
        };
        let cfg = self.checked(&ctx.doc)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let (model, vocab) = Self::load_net::<N>(ctx, &cfg, &device)?;
        let ids = vocab.encode(prompt).map_err(|e| anyhow!("--input: {e}"))?;
        if ids.is_empty() {
            bail!("--input: empty text");
        }
        let (logits, _) = model.feed(&ids, None, &device);
        let v = model.vocab_size();
        let probs = text::softmax(&logits);
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        Ok(order
            .iter()
            .take(5)
            .map(|&i| format!("{:?}: {:.1}%", vocab.chars[i], probs[i] * 100.0))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    fn generate_as<N: CharModel>(&self, ctx: &RunContext, req: &TextRequest) -> Result<String> {
        let cfg = self.checked(&ctx.doc)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let (model, vocab) = Self::load_net::<N>(ctx, &cfg, &device)?;
        let prompt = vocab
            .encode(&req.prompt)
            .map_err(|e| anyhow!("--prompt: {e}"))?;
        let sampling = Sampling {
            temperature: req.temperature,
            top_k: req.top_k,
        };
        let mut rng = StdRng::seed_from_u64(req.seed);
        let text = text::generate(
            &model, &vocab, &prompt, req.len, &sampling, &mut rng, &device,
        );
        Ok(format!("{}{text}", req.prompt))
    }

    /// Training characters per second (the real training step on T-character windows),
    /// sampling characters per second (one character at a time, as `kiln sample`), peak RSS.
    fn bench_as<N: CharModel>(&self, doc: &ConfigDoc, batches: usize) -> Result<Benchmark> {
        let cfg = self.checked(doc)?;
        let data = self.prepare(&cfg)?;
        let task = CharTask::<N>::new(&cfg.params.net, data.vocab.len(), cfg.params.window);
        let train = TextSplit {
            ids: data.parts[0].clone(),
            window: cfg.params.window,
        };
        let mut b = benchmark(&task, &train, &cfg.train, cfg.backend, cfg.seed, batches)?;
        let t = cfg.params.window as f64;
        b.unit = "characters".into();
        b.train_examples_per_second *= t;
        b.inference_examples_per_second *= t;
        b.epoch_examples = train.ids.len();
        b.epoch_seconds = train.ids.len() as f64 / b.train_examples_per_second;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = N::build(
            &cfg.params.net,
            data.vocab.len(),
            cfg.params.window,
            &device,
        );
        let n = 1000;
        let started = std::time::Instant::now();
        let _ = text::generate(
            &model,
            &data.vocab,
            &[],
            n,
            &Sampling {
                temperature: 1.0,
                top_k: None,
            },
            &mut StdRng::seed_from_u64(0),
            &device,
        );
        b.notes.push(format!(
            "sampling {:.0} characters/s (one at a time, batch 1)",
            n as f64 / started.elapsed().as_secs_f64()
        ));
        b.peak_rss_bytes = peak_rss();
        Ok(b)
    }
}

impl Family for CharFamily {
    fn name(&self) -> &'static str {
        self.name
    }
    fn about(&self) -> &'static str {
        self.about
    }
    fn torch_names(&self, ctx: &RunContext) -> Result<Option<kiln_core::export::TorchNames>> {
        let cfg: RunConfig<CharParams> = ctx.doc.typed()?;
        Ok(cfg.params.net.torch_names())
    }
    /// `params.net.kind` is the family's: written into the run's config when absent; the other
    /// kind is the other family's (a run made before the families were named is still read).
    fn resolve(&self, doc: &mut ConfigDoc) -> Result<()> {
        let cfg: RunConfig<CharParams> = doc.typed()?;
        let given = doc
            .table
            .get("params")
            .and_then(|p| p.get("net"))
            .and_then(|n| n.get("kind"))
            .is_some();
        if given && cfg.params.net.kind != self.kind {
            let other = if self.kind == NetKind::Transformer {
                "char-rnn"
            } else {
                "char-transformer"
            };
            bail!(
                "{}: params.net.kind: {:?} is the {other} family (model = \"{other}\")",
                doc.source.display(),
                cfg.params.net.kind
            );
        }
        let kind = match self.kind {
            NetKind::Recurrent => "recurrent",
            NetKind::Transformer => "transformer",
        };
        doc.set(&format!("params.net.kind=\"{kind}\""))?;
        Ok(())
    }
    fn check(&self, doc: &ConfigDoc) -> Result<()> {
        self.checked(doc).map(|_| ())
    }
    fn train(&self, ctx: &RunContext) -> Result<Value> {
        match self.checked(&ctx.doc)?.params.net.kind {
            NetKind::Recurrent => self.train_as::<CharNet>(ctx),
            NetKind::Transformer => self.train_as::<CharTransformer>(ctx),
        }
    }
    fn eval(&self, ctx: &RunContext) -> Result<Value> {
        match self.checked(&ctx.doc)?.params.net.kind {
            NetKind::Recurrent => self.eval_as::<CharNet>(ctx),
            NetKind::Transformer => self.eval_as::<CharTransformer>(ctx),
        }
    }
    fn predict(&self, ctx: &RunContext, input: &PredictInput) -> Result<String> {
        match self.checked(&ctx.doc)?.params.net.kind {
            NetKind::Recurrent => self.predict_as::<CharNet>(ctx, input),
            NetKind::Transformer => self.predict_as::<CharTransformer>(ctx, input),
        }
    }
    fn bench(&self, doc: &ConfigDoc, batches: usize) -> Result<Benchmark> {
        match self.checked(doc)?.params.net.kind {
            NetKind::Recurrent => self.bench_as::<CharNet>(doc, batches),
            NetKind::Transformer => self.bench_as::<CharTransformer>(doc, batches),
        }
    }
    fn text_generator(&self) -> Option<&dyn kiln_core::family::TextGenerator> {
        Some(self)
    }
}

impl kiln_core::family::TextGenerator for CharFamily {
    fn generate(&self, ctx: &RunContext, req: &TextRequest) -> Result<String> {
        match self.checked(&ctx.doc)?.params.net.kind {
            NetKind::Recurrent => self.generate_as::<CharNet>(ctx, req),
            NetKind::Transformer => self.generate_as::<CharTransformer>(ctx, req),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_dealt_in_proportion() {
        let ids: Vec<u32> = (0..2_000_000).map(|i| (i % 7) as u32).collect();
        let [tr, va, te] = deal_blocks(&ids, 0.05, 0.05);
        let n = ids.len() as f64;
        assert_eq!(tr.len() + va.len() + te.len(), ids.len());
        assert!((va.len() as f64 / n - 0.05).abs() < 0.01, "{}", va.len());
        assert!((te.len() as f64 / n - 0.05).abs() < 0.01, "{}", te.len());
    }
}
