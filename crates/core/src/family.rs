//! The one trait the runner drives every model crate through. Adding a model to kiln means:
//! a crate that implements `Family`, a `configs/<name>.toml`, and one line in the runner's
//! registry.

use std::path::PathBuf;

use anyhow::Result;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::config::{ConfigDoc, RunConfig};
use crate::run::{EpochRecord, RunDir};
use burn::module::Module;
use burn::tensor::Device;

use crate::engine::{Monitor, Outcome, StopReason};
use crate::train::{Benchmark, FitOptions, Fitted, Supervised, fit};
use serde::{Deserialize, Serialize};

/// A run directory together with its resolved config.
pub struct RunContext {
    pub run: RunDir,
    pub doc: ConfigDoc,
    /// `kiln resume`: continue from the latest checkpoint.
    pub resume: bool,
}

impl RunContext {
    /// Train `task` in this run with the config's `[train]`, seed, backend and resume flag;
    /// returns the fit and the trained model moved to the backend's plain (inference) device.
    pub fn fit<T: Supervised, P>(
        &self,
        cfg: &RunConfig<P>,
        task: &T,
        train: &T::Data,
        val: &T::Data,
    ) -> Result<(Fitted<T::Model>, T::Model, Device)> {
        let opts = FitOptions {
            train: &cfg.train,
            seed: cfg.seed,
            backend: cfg.backend,
            resume: self.resume,
        };
        let fitted = fit(task, train, val, &self.run, &opts)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = fitted.model.valid().to_device(&device);
        Ok((fitted, model, device))
    }

    /// The typed config (run-level settings and the family's `[params]`).
    pub fn config<P: DeserializeOwned>(&self) -> Result<RunConfig<P>> {
        Ok(self.doc.typed()?)
    }
}

/// What the user asked `kiln predict` to predict on.
#[derive(Debug, Clone)]
pub enum PredictInput {
    /// `--input`: a CSV file path or comma-separated values.
    Values(String),
    /// `--image`: an image file.
    Image(PathBuf),
}

/// What the user asked `kiln sample` for.
#[derive(Debug, Clone)]
pub struct SampleRequest {
    /// How many samples (a square-ish grid).
    pub n: usize,
    /// Seed of the noise the samples are generated from.
    pub seed: u64,
    /// The PNG to write (default: `samples-seed-<seed>.png` in the run directory).
    pub out: Option<PathBuf>,
    /// GAN: draw the noise from N(0, I) truncated to [−ψ, ψ] per coordinate.
    pub truncation: Option<f64>,
    /// GAN: a finished kiln classifier run that judges the samples.
    pub judge: Option<PathBuf>,
    /// Class-conditional GAN: draw only this class (its name or its index).
    pub class: Option<String>,
}

/// What the user asked `kiln sample` for from a text model.
#[derive(Debug, Clone)]
pub struct TextRequest {
    /// Text the generation continues (empty: start of a fresh line).
    pub prompt: String,
    /// How many characters to generate.
    pub len: usize,
    /// Softmax temperature (1 = the model's own probabilities).
    pub temperature: f64,
    /// Draw only among the k most likely characters.
    pub top_k: Option<usize>,
    /// Seed of the draws: the same seed gives the same text.
    pub seed: u64,
}

/// A model family: what `kiln train/eval/predict/resume <model>` runs.
///
/// A family reads its `[params]` from the config, trains on the shared engine (here through
/// [`RunContext::fit`]), evaluates and draws, and hands the rest to [`RunContext::finish`]:
/// `summary.json` with the engine's `training` section and the headline figures, and
/// `report.md`. The runner's registry holds one `&dyn Family` per family.
///
/// ```
/// use anyhow::Result;
/// use burn::nn::loss::{MseLoss, Reduction};
/// use burn::nn::{Linear, LinearConfig};
/// use burn::tensor::{Device, Tensor, TensorData};
/// use kiln_core::train::{Phase, StepOutput, Supervised};
/// use kiln_core::{ConfigDoc, Family, Figure, Finished, PredictInput, RunContext, RunDir};
/// use serde::Deserialize;
/// use serde_json::{Value, json};
///
/// /// `[params]`: the slope of the line y = a·x to learn.
/// #[derive(Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct Params { slope: f32 }
///
/// struct Line(f32);
/// impl Supervised for Line {
///     type Model = Linear;
///     type Data = [f32];
///     fn init_model(&self, device: &Device) -> Linear { LinearConfig::new(1, 1).init(device) }
///     fn len(&self, xs: &[f32]) -> usize { xs.len() }
///     fn step(&self, model: &Linear, xs: &[f32], idx: &[usize], device: &Device,
///             _: Phase, _: &mut rand::rngs::StdRng) -> StepOutput {
///         let col = |f: &dyn Fn(f32) -> f32| {
///             let v: Vec<f32> = idx.iter().map(|&i| f(xs[i])).collect();
///             Tensor::<2>::from_data(TensorData::new(v, [idx.len(), 1]), device)
///         };
///         let pred = model.forward(col(&|x| x));
///         StepOutput::loss(MseLoss::new().forward(pred, col(&|x| self.0 * x), Reduction::Mean))
///     }
/// }
///
/// struct LineFamily;
/// impl Family for LineFamily {
///     fn name(&self) -> &'static str { "line" }
///     fn about(&self) -> &'static str { "learns y = a·x" }
///     fn check(&self, doc: &ConfigDoc) -> Result<()> {
///         let cfg = doc.typed::<Params>()?;
///         anyhow::ensure!(cfg.params.slope.is_finite(), "{}: params.slope: not finite", doc.source.display());
///         Ok(())
///     }
///     fn train(&self, ctx: &RunContext) -> Result<Value> {
///         let cfg = ctx.config::<Params>()?;
///         let xs: Vec<f32> = (0..16).map(|i| i as f32 / 8.0).collect();
///         let (fitted, model, _device) = ctx.fit(&cfg, &Line(cfg.params.slope), &xs[..], &[][..])?;
///         let slope = model.weight.val().into_scalar::<f32>() as f64;
///         ctx.finish(cfg.backend.as_str(), &fitted, Finished {
///             title: "Line".into(),
///             fields: json!({ "slope": slope }),
///             headline: vec![Figure::new("slope", "learned slope", slope, format!("{slope:.3}"))],
///             ..Finished::default()
///         })
///     }
///     fn eval(&self, ctx: &RunContext) -> Result<Value> { ctx.run.read_summary() }
///     fn predict(&self, _: &RunContext, _: &PredictInput) -> Result<String> {
///         anyhow::bail!("line: nothing to predict")
///     }
/// }
///
/// let doc = ConfigDoc::parse("line.toml", r#"
///     model = "line"
///     [train]
///     epochs = 150
///     batch_size = 4
///     learning_rate = 0.05
///     [params]
///     slope = 3.0
/// "#)?;
/// LineFamily.check(&doc)?;
/// let dir = tempfile::tempdir()?;
/// let ctx = RunContext { run: RunDir::create(&dir.path().join("run"))?, doc, resume: false };
/// let summary = LineFamily.train(&ctx)?;
/// assert!((summary["slope"].as_f64().unwrap() - 3.0).abs() < 0.05, "{summary}");
/// assert!(ctx.run.file("metrics.csv").is_file() && ctx.run.file("report.md").is_file());
/// assert_eq!(summary["headline"][0]["metric"], "slope");
/// assert_eq!(summary["training"]["units_run"], 150);
/// # anyhow::Ok(())
/// ```
pub trait Family: Sync {
    /// The name used in configs (`model = "..."`).
    fn name(&self) -> &'static str;
    /// One line for `kiln list`.
    fn about(&self) -> &'static str;
    /// Settle what the config leaves to run time (image models: `dataset = "auto"`) in the
    /// document itself, so that the run's `config.toml` records what was used. Called before
    /// `check` and before a run directory is made. Default: nothing to settle.
    fn resolve(&self, doc: &mut ConfigDoc) -> Result<()> {
        let _ = doc;
        Ok(())
    }
    /// Check the config's `[params]` without training (called before a run directory is made).
    fn check(&self, doc: &ConfigDoc) -> Result<()>;
    /// Train (or resume) in `ctx.run`; write `summary.json` and `report.md`; return the summary.
    fn train(&self, ctx: &RunContext) -> Result<Value>;
    /// Re-evaluate a finished run's model on its test data; return the metrics.
    fn eval(&self, ctx: &RunContext) -> Result<Value>;
    /// Predict on user input with a finished run's model; return printable text.
    fn predict(&self, ctx: &RunContext, input: &PredictInput) -> Result<String>;
    /// Capability: draws images from a finished run (`kiln sample`). Default: it does not.
    fn image_sampler(&self) -> Option<&dyn ImageSampler> {
        None
    }
    /// Capability: continues text with a finished run (`kiln sample --prompt`). Default: no.
    fn text_generator(&self) -> Option<&dyn TextGenerator> {
        None
    }
    /// Capability: acts in an environment (`kiln play`). Default: it does not.
    fn agent(&self) -> Option<&dyn Agent> {
        None
    }
    /// The PyTorch names of a finished run's weights, where the family has a PyTorch twin in
    /// `scripts/reference/` (`kiln export`); `None`: Burn's names. Default: none.
    fn torch_names(&self, ctx: &RunContext) -> Result<Option<crate::export::TorchNames>> {
        let _ = ctx;
        Ok(None)
    }
    /// A finished run's model as an ONNX graph (`kiln export --format onnx`), or `None` when
    /// the family has no ONNX export. Default: none.
    fn onnx(&self, ctx: &RunContext) -> Result<Option<crate::onnx::OnnxExport>> {
        let _ = ctx;
        Ok(None)
    }
    /// Capability: this family classifies images, and a finished run of it can judge another
    /// model's images ([`crate::registry::open_classifier`]). Default: it does not.
    fn classifier(&self) -> Option<&dyn crate::classify::OpenClassifier> {
        None
    }
    /// Measure training and inference throughput of the config on its backend.
    fn bench(&self, doc: &ConfigDoc, batches: usize) -> Result<Benchmark> {
        let _ = batches;
        anyhow::bail!(
            "{}: no benchmark for {} (it trains in seconds: time `kiln train` instead)",
            doc.source.display(),
            self.name()
        )
    }
}

/// What a generative family offers `kiln sample`.
pub trait ImageSampler: Sync {
    /// Generate `req.n` samples from a finished run's model into a PNG grid; return its path.
    fn sample(&self, ctx: &RunContext, req: &SampleRequest) -> Result<PathBuf>;
}

/// What a language model offers `kiln sample --prompt`.
pub trait TextGenerator: Sync {
    /// Continue `req.prompt` by `req.len` characters with a finished text model.
    fn generate(&self, ctx: &RunContext, req: &TextRequest) -> Result<String>;
}

/// What a reinforcement learner offers `kiln play`.
pub trait Agent: Sync {
    /// Play `episodes` greedy episodes with a finished agent (seeded by `seed`); return
    /// printable results.
    fn play(&self, ctx: &RunContext, episodes: usize, seed: u64) -> Result<String>;
}

/// The last unit's metrics as a JSON object (`training.final` in `summary.json`).
fn final_values(history: &[EpochRecord]) -> Value {
    let finals: serde_json::Map<String, Value> = history
        .last()
        .map(|r| {
            r.values
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect()
        })
        .unwrap_or_default();
    Value::Object(finals)
}

/// The `training` section of every `summary.json`, the same keys for every family, from the
/// engine's [`Outcome`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingSummary {
    pub backend: String,
    /// What one unit is: `epoch`, or `round` (DQN).
    pub unit: String,
    /// Units completed, resumed parts included.
    pub units_run: usize,
    pub stop_reason: StopReason,
    /// The metric "best" refers to (`train.monitor`, or the family's default); `null` without.
    pub monitor: Option<Monitor>,
    pub best_unit: Option<usize>,
    pub best_value: Option<f64>,
    /// The last unit's numbers (a row of `metrics.csv`).
    #[serde(rename = "final")]
    pub last: Value,
    /// Seconds of training over the whole run, resumed parts included.
    pub seconds: f64,
    /// Seconds of training in the process that finished the run.
    pub seconds_this_process: f64,
    /// Training examples (images, sequences, windows, environment steps) per second in that
    /// process; `null` when it trained no unit.
    pub examples_per_second: Option<f64>,
}

impl TrainingSummary {
    pub fn new(outcome: &Outcome, backend: &str) -> Self {
        let has_best = outcome.monitor.is_some() && outcome.best_epoch > 0;
        TrainingSummary {
            backend: backend.to_string(),
            unit: outcome.unit_name.to_string(),
            units_run: outcome.history.last().map_or(0, |r| r.epoch),
            stop_reason: outcome.stop,
            monitor: outcome.monitor.clone(),
            best_unit: has_best.then_some(outcome.best_epoch),
            best_value: has_best
                .then_some(outcome.best_value)
                .filter(|v| v.is_finite()),
            last: final_values(&outcome.history),
            seconds: outcome.seconds_total,
            seconds_this_process: outcome.seconds,
            examples_per_second: outcome.examples_per_second(),
        }
    }
}

/// One headline figure of a run: what `kiln list --runs`, `report.md` and
/// `kiln sweep --collect` show. `metric` is its dotted path in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub metric: String,
    pub label: String,
    pub value: f64,
    /// The value as people read it (`99.29%`).
    pub text: String,
}

impl Figure {
    pub fn new(metric: &str, label: &str, value: f64, text: impl Into<String>) -> Self {
        Figure {
            metric: metric.into(),
            label: label.into(),
            value,
            text: text.into(),
        }
    }
    /// A share in [0, 1] shown as a percentage with two decimals.
    pub fn percent(metric: &str, label: &str, value: f64) -> Self {
        Self::new(metric, label, value, format!("{:.2}%", value * 100.0))
    }
}

/// What a family's training leaves for core to write: the family's own sections of
/// `summary.json`, its headline figures and the words of `report.md`.
#[derive(Debug, Clone, Default)]
pub struct Finished {
    /// `report.md`'s title (`CNN on MNIST`).
    pub title: String,
    /// The family's sections of `summary.json` (a JSON object): data set, architecture, test
    /// numbers, …
    pub fields: Value,
    /// The figures the run is judged by, the most important first; each `metric` must be a
    /// number at that path of `fields`.
    pub headline: Vec<Figure>,
    /// Further rows of `report.md`'s table (data set, network, parameters).
    pub rows: Vec<(String, String)>,
    /// What the throughput counts (`images`, `windows`, `steps`).
    pub examples: &'static str,
    /// Markdown after the table (pictures and what they show).
    pub notes: String,
}

/// A number at a dotted path of a JSON value (`test.accuracy`).
pub fn lookup(s: &Value, path: &str) -> Option<f64> {
    path.split('.').try_fold(s, |v, k| v.get(k))?.as_f64()
}

/// The headline figures of a finished run's `summary.json` (empty for failed runs).
pub fn headline_of(summary: &Value) -> Vec<Figure> {
    serde_json::from_value(summary["headline"].clone()).unwrap_or_default()
}

impl RunContext {
    /// The end of every training: write `summary.json` (`model`, `config`, the family's
    /// fields, `headline` and the engine's `training` section) and `report.md` from one
    /// [`Finished`]; return the summary.
    pub fn finish(&self, backend: &str, outcome: &Outcome, done: Finished) -> Result<Value> {
        let mut summary = serde_json::Map::new();
        summary.insert("model".into(), json!(self.doc.model()?));
        summary.insert(
            "config".into(),
            json!(self.doc.source.display().to_string()),
        );
        match done.fields {
            Value::Object(fields) => summary.extend(fields),
            Value::Null => {}
            other => anyhow::bail!("summary fields must be a JSON object, not {other}"),
        }
        let summary_value = Value::Object(summary.clone());
        for f in &done.headline {
            anyhow::ensure!(
                lookup(&summary_value, &f.metric) == Some(f.value),
                "headline {:?}: summary.json has no {} = {}",
                f.label,
                f.metric,
                f.value
            );
        }
        summary.insert("headline".into(), serde_json::to_value(&done.headline)?);
        let training = TrainingSummary::new(outcome, backend);
        summary.insert("training".into(), serde_json::to_value(&training)?);
        let summary = Value::Object(summary);
        self.run.write_summary(&summary)?;
        let mut rows: Vec<(String, String)> = done
            .headline
            .iter()
            .map(|f| (f.label.clone(), f.text.clone()))
            .collect();
        rows.extend(done.rows);
        rows.extend(training_rows(&training, done.examples));
        self.run.write_report(&render_report(
            &done.title,
            &self.doc.name(),
            &rows,
            &outcome.history,
            outcome.unit_name,
            &done.notes,
        ))?;
        Ok(summary)
    }
}

/// The report rows every trained model shares: units, training time and speed, stop, backend.
fn training_rows(t: &TrainingSummary, examples: &str) -> Vec<(String, String)> {
    let speed = match t.examples_per_second {
        Some(r) if !examples.is_empty() => format!(" ({r:.0} {examples}/s)"),
        _ => String::new(),
    };
    let mut rows = vec![
        (format!("{}s", t.unit), t.units_run.to_string()),
        ("training time".into(), format!("{:.1} s{speed}", t.seconds)),
    ];
    if t.stop_reason != StopReason::Completed {
        rows.push((
            "stopped".into(),
            serde_json::to_value(t.stop_reason)
                .ok()
                .and_then(|v| v.as_str().map(|s| s.replace('_', " ")))
                .unwrap_or_default(),
        ));
    }
    if let (Some(m), Some(u), Some(v)) = (&t.monitor, t.best_unit, t.best_value) {
        rows.push((
            format!("best {}", m.metric),
            format!("{v:.5} ({} {u})", t.unit),
        ));
    }
    rows.push(("backend".into(), t.backend.clone()));
    rows
}

/// `report.md`: a title, the headline numbers as a table, and extra sections.
fn render_report(
    title: &str,
    config_name: &str,
    headline: &[(String, String)],
    history: &[EpochRecord],
    unit: &str,
    extra: &str,
) -> String {
    let mut out =
        format!("# {title}\n\nConfig: `{config_name}` (resolved copy in `config.toml`).\n\n");
    out.push_str("| metric | value |\n|---|---|\n");
    for (k, v) in headline {
        out.push_str(&format!("| {k} | {v} |\n"));
    }
    if let Some(last) = history.last() {
        out.push_str(&format!("\nLast {unit} ({}): ", last.epoch));
        let parts: Vec<String> = last
            .values
            .iter()
            .map(|(k, v)| format!("{k} {v:.5}"))
            .collect();
        out.push_str(&parts.join(", "));
        out.push('\n');
    }
    let curves: Vec<String> = crate::engine::curve_groups(history)
        .into_iter()
        .map(|(stem, _)| format!("`{stem}.png`"))
        .collect();
    if !curves.is_empty() {
        out.push_str(&format!("\nCurves: {}.", curves.join(", ")));
    }
    out.push_str(&format!(
        " Per-{unit} numbers: `metrics.csv`. Machine-readable: `summary.json`.\n"
    ));
    if !extra.is_empty() {
        out.push('\n');
        out.push_str(extra);
        if !extra.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}
