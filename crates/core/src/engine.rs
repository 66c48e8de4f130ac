//! The training engine every family runs on: supervised classifiers and regressors,
//! autoencoders, GANs and reinforcement learners alike.
//!
//! A family implements [`Routine`]: what one unit of training (an epoch, or an episode)
//! does and which named numbers it reports, what validation measures, and how its own
//! networks, optimizers and state go into a checkpoint. [`run`] owns everything else, once:
//!
//! - the unit counter and the loop state (history, best value, units without improvement);
//! - seeding: before unit e the device, kiln's dropout masks and the unit's data generator are
//!   seeded from (seed, e, purpose) ([`UnitSeeds`]), so a resumed run continues exactly as an
//!   uninterrupted one;
//! - progress (one bar per unit; the routine ticks it per batch through [`UnitContext`]);
//! - the NaN/Inf stop: a non-finite batch loss (reported through [`UnitContext::batch`]) or
//!   unit metric ends the run with [`Diverged`], keeping the last good checkpoint;
//! - early stopping on any metric, minimised or maximised ([`Monitor`]);
//! - checkpoints: `checkpoints/epoch-NNNN/` with the routine's named modules, optimizers and
//!   JSON state plus the engine's `state.json`, written completely before the `latest`
//!   pointer flips (a kill at any moment leaves a loadable `latest`);
//! - `metrics.csv` (one row per unit) and one curve per metric name (`train_X` beside `val_X`
//!   in `X.png`).
//!
//! The shape follows PyTorch Ignite's `Engine` (a process function per iteration, the rest in
//! the engine), Lightning's manual optimisation (the routine steps its own optimizers, so a GAN
//! steps two) and Keras' overridable `train_step`.
//!
//! ```
//! use kiln_core::engine::{self, EngineOptions, Monitor, Routine, UnitContext, Metrics};
//! use kiln_core::engine::checkpoint::{Checkpoint, CheckpointReader};
//! use kiln_core::RunDir;
//!
//! /// Gradient descent on f(x) = (x − 3)², x ← x − η·2(x − 3), one step per "epoch".
//! struct Quadratic { x: f64 }
//!
//! impl Routine for Quadratic {
//!     fn train_unit(&mut self, _unit: usize, ctx: &mut UnitContext) -> anyhow::Result<Metrics> {
//!         let loss = (self.x - 3.0).powi(2);
//!         ctx.batch(loss as f32)?;
//!         self.x -= 0.1 * 2.0 * (self.x - 3.0);
//!         Ok(vec![("train_loss".into(), loss)])
//!     }
//!     fn save(&self, ckpt: &mut Checkpoint) -> anyhow::Result<()> { ckpt.state("x", &self.x) }
//!     fn load(&mut self, ckpt: &CheckpointReader) -> anyhow::Result<()> {
//!         self.x = ckpt.state("x")?;
//!         Ok(())
//!     }
//! }
//!
//! let dir = tempfile::tempdir()?;
//! let run = RunDir::create(&dir.path().join("run"))?;
//! let mut routine = Quadratic { x: 0.0 };
//! let opts = EngineOptions::new(20, 7).monitor(Monitor::min("train_loss"));
//! let outcome = engine::run(&mut routine, &run, &opts, None)?;
//! assert_eq!(outcome.history.len(), 20);
//! assert!((routine.x - 3.0).abs() < 0.05);
//! # anyhow::Ok(())
//! ```

pub mod checkpoint;

use std::time::Instant;

use anyhow::Result;
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::plot::{Series, line_chart};
use crate::run::{EpochRecord, RunDir};
use checkpoint::{Checkpoint, CheckpointReader};

/// Named numbers of one unit, in the order they appear in `metrics.csv`.
pub type Metrics = Vec<(String, f64)>;

/// What a family does; the engine does the rest (see the module docs).
pub trait Routine {
    /// Batches (or steps) in one unit, for the progress bar; `0` shows a spinner.
    fn unit_len(&self) -> u64 {
        0
    }
    /// Train for one unit (1-based `unit`) and return its training metrics (`train_*`, or any
    /// names: `d_loss`, `episode_return`, …). Report every batch's loss through `ctx.batch`.
    fn train_unit(&mut self, unit: usize, ctx: &mut UnitContext) -> Result<Metrics>;
    /// Measure the model after `unit` without training it (`val_*`). Default: nothing.
    fn validate(&mut self, unit: usize, rng: &mut StdRng) -> Result<Metrics> {
        let _ = (unit, rng);
        Ok(Vec::new())
    }
    /// Put the routine's modules, optimizers and own state into a checkpoint.
    fn save(&self, ckpt: &mut Checkpoint) -> Result<()>;
    /// Restore what `save` wrote.
    fn load(&mut self, ckpt: &CheckpointReader) -> Result<()>;
    /// After each unit's checkpoint: pictures (sample grids, reconstructions). Default: nothing.
    fn after_unit(&mut self, unit: usize, run: &RunDir) -> Result<()> {
        let _ = (unit, run);
        Ok(())
    }
}

/// Whether the monitored metric should fall or rise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Min,
    Max,
}

/// The metric early stopping and "best unit" follow.
#[derive(Debug, Clone, PartialEq)]
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
    fn improves(&self, value: f64, best: f64, min_delta: f64) -> bool {
        match self.mode {
            Mode::Min => value < best - min_delta,
            Mode::Max => value > best + min_delta,
        }
    }
    fn worst(&self) -> f64 {
        match self.mode {
            Mode::Min => f64::INFINITY,
            Mode::Max => f64::NEG_INFINITY,
        }
    }
}

/// How the engine runs a routine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Units to run in all (epochs or episodes).
    pub units: usize,
    /// `epoch` or `episode`, for messages.
    pub unit_name: &'static str,
    pub seed: u64,
    /// Stop after this many units without improvement of the monitored metric; `0` never.
    pub patience: usize,
    pub min_delta: f64,
    /// Default: `val_loss` when the routine reports it, else its first metric, minimised.
    pub monitor: Option<Monitor>,
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// Stop once the monitored metric reaches this value (≥ for `max`, ≤ for `min`): a task
    /// that is solved (Lightning's `stopping_threshold`).
    pub stop_at: Option<f64>,
    /// Training-time budget in seconds over the whole run, resumed parts included
    /// (Lightning's `max_time`): once spent, the current unit ends after its batch
    /// ([`UnitContext::time_up`]), is validated and checkpointed, and the run stops.
    pub max_seconds: Option<f64>,
}

impl EngineOptions {
    pub fn new(units: usize, seed: u64) -> Self {
        EngineOptions {
            units,
            unit_name: "epoch",
            seed,
            patience: 0,
            min_delta: 0.0,
            monitor: None,
            resume: false,
            stop_at: None,
            max_seconds: None,
        }
    }
    pub fn monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = Some(monitor);
        self
    }
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Ran all configured units.
    Completed,
    /// The monitored metric did not improve for `patience` units.
    EarlyStopped,
    /// The monitored metric reached `stop_at`.
    TargetReached,
    /// The training-time budget (`train.max_minutes`) was spent.
    TimeLimit,
}

/// Training diverged: a loss or metric became NaN or infinite. The last good checkpoint is kept.
#[derive(Debug, thiserror::Error)]
#[error(
    "training diverged at epoch {epoch}, batch {batch}: loss is {loss}; {kept} \
     (try a smaller train.learning_rate)"
)]
pub struct Diverged {
    pub epoch: usize,
    pub batch: usize,
    pub loss: f32,
    pub kept: String,
}

/// Why [`UnitContext::batch`] asks the routine to stop (return it with `?`).
#[derive(Debug, thiserror::Error)]
pub enum Halt {
    /// The batch loss was NaN or infinite (turned into [`Diverged`] by the engine).
    #[error("batch {batch}: loss is {loss}")]
    NonFinite { batch: usize, loss: f32 },
    /// The user pressed Ctrl-C ([`request_stop`]); turned into [`Interrupted`].
    #[error("interrupted")]
    Interrupt,
}

/// The run was interrupted (Ctrl-C): the current epoch was dropped, the last checkpoint kept.
#[derive(Debug, thiserror::Error)]
#[error("interrupted during epoch {epoch}; {kept}")]
pub struct Interrupted {
    pub epoch: usize,
    pub kept: String,
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ask the running engine to stop after the current batch (the `kiln` binary calls this on
/// Ctrl-C). The unfinished epoch is dropped; the last checkpoint stays, so `kiln resume`
/// continues exactly.
pub fn request_stop() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

/// The purposes a unit's seeds are derived for: each gets its own independent stream.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub enum SeedPurpose {
    /// The device's generator (Burn's random tensors).
    Device = 1,
    /// The unit's data generator: shuffling, augmentation, noise, exploration.
    Data = 2,
    /// kiln's dropout masks ([`crate::nn::seed_dropout`]).
    Dropout = 3,
}

/// Derive an independent seed for (run seed, unit, purpose).
pub fn derive_seed(seed: u64, unit: usize, purpose: SeedPurpose) -> u64 {
    // SplitMix64 finaliser over a simple combination: well-mixed and stable across versions.
    let mut z = seed
        ^ (unit as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (purpose as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a routine gets for one unit: its seeded generator and the progress/NaN check.
pub struct UnitContext {
    /// Seeded from (seed, unit): shuffle, augment and sample with it.
    pub rng: StdRng,
    bar: ProgressBar,
    batches: usize,
    deadline: Option<Instant>,
}

impl UnitContext {
    /// One batch done with this loss: ticks the progress bar; a NaN or infinite loss is an
    /// error that ends the run (return it with `?`).
    pub fn batch(&mut self, loss: f32) -> Result<(), Halt> {
        self.batches += 1;
        if !loss.is_finite() {
            return Err(Halt::NonFinite {
                batch: self.batches,
                loss,
            });
        }
        if stop_requested() {
            return Err(Halt::Interrupt);
        }
        self.bar.inc(1);
        Ok(())
    }
    /// Batches reported so far in this unit.
    pub fn batches(&self) -> usize {
        self.batches
    }
    /// Whether the run's training-time budget is spent: a routine checks it between batches
    /// and ends the unit early (returning the metrics of the batches it did), so a
    /// time-limited run stops within a batch of its budget rather than a unit. Routines that
    /// never ask stop at the end of the unit.
    pub fn time_up(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// The engine's own state, saved as `state.json` in each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoopState {
    epoch: usize,
    history: Vec<EpochRecord>,
    /// Best value of the monitored metric so far (named so for older checkpoints).
    best_val_loss: f64,
    best_epoch: usize,
    epochs_without_improvement: usize,
    seed: u64,
    /// Seconds of training so far, all processes (for `max_seconds`).
    #[serde(default)]
    seconds: f64,
}

/// What [`run`] returns.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub history: Vec<EpochRecord>,
    pub stop: StopReason,
    pub best_epoch: usize,
    /// Best value of the monitored metric.
    pub best_value: f64,
    pub monitor: Monitor,
    /// Wall-clock seconds of the units run in this process.
    pub seconds: f64,
    /// Units run in this process (not counting a resumed part).
    pub units_here: usize,
}

/// Run `routine` for `opts.units` units in `run` (see the module docs). `device`, when given,
/// is reseeded before every unit.
pub fn run<R: Routine>(
    routine: &mut R,
    run: &RunDir,
    opts: &EngineOptions,
    device: Option<&Device>,
) -> Result<Outcome> {
    let mut monitor = opts.monitor.clone();
    let mut state = LoopState {
        epoch: 0,
        history: Vec::new(),
        best_val_loss: monitor.as_ref().map_or(f64::INFINITY, Monitor::worst),
        best_epoch: 0,
        epochs_without_improvement: 0,
        seed: opts.seed,
        seconds: 0.0,
    };
    if opts.resume {
        let candidates = checkpoint::candidates(run)?;
        if candidates.is_empty() {
            eprintln!("no checkpoint yet; starting from {} 1", opts.unit_name);
        }
        let mut first_error = None;
        for (i, reader) in candidates.iter().enumerate() {
            let loaded = reader
                .state::<LoopState>(checkpoint::ENGINE_STATE)
                .and_then(|s| routine.load(reader).map(|()| s));
            match loaded {
                Ok(s) => {
                    state = s;
                    eprintln!(
                        "resuming after {} {} of {}",
                        opts.unit_name, state.epoch, opts.units
                    );
                    first_error = None;
                    break;
                }
                Err(e) => {
                    let e = format!("{e:#}").replace('\n', " ");
                    if let Some(before) = candidates.get(i + 1) {
                        eprintln!(
                            "{} does not load ({e}); resuming from the checkpoint before it, {}",
                            reader.dir().display(),
                            before.dir().display()
                        );
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            if candidates.len() > 1 {
                anyhow::bail!("{e} (the checkpoints before it do not load either)");
            }
            anyhow::bail!("{e}");
        }
    }
    let patience_hit =
        |s: &LoopState| opts.patience > 0 && s.epochs_without_improvement >= opts.patience;
    let reached = |m: &Monitor, v: f64| match (opts.stop_at, m.mode) {
        (Some(t), Mode::Max) => v >= t,
        (Some(t), Mode::Min) => v <= t,
        (None, _) => false,
    };
    let already = match (&monitor, state.history.last()) {
        (Some(m), Some(last)) => last.get(&m.metric).is_some_and(|v| reached(m, v)),
        _ => false,
    };
    let out_of_time = |s: &LoopState| opts.max_seconds.is_some_and(|m| s.seconds >= m);
    let mut stop = if already {
        StopReason::TargetReached
    } else if out_of_time(&state) {
        StopReason::TimeLimit
    } else if patience_hit(&state) {
        StopReason::EarlyStopped
    } else {
        StopReason::Completed
    };
    let started = Instant::now();
    let mut units_here = 0;
    while stop == StopReason::Completed && state.epoch < opts.units {
        let unit = state.epoch + 1;
        let seeds = UnitSeeds::new(opts.seed, unit);
        if let Some(d) = device {
            d.seed(seeds.device);
        }
        crate::nn::seed_dropout(seeds.dropout);
        let unit_started = Instant::now();
        let mut ctx = UnitContext {
            rng: StdRng::seed_from_u64(seeds.data),
            bar: progress(routine.unit_len(), opts.unit_name, unit, opts.units),
            batches: 0,
            deadline: opts.max_seconds.map(|m| {
                unit_started + std::time::Duration::from_secs_f64((m - state.seconds).max(0.0))
            }),
        };
        let trained = routine.train_unit(unit, &mut ctx);
        let mut values = match trained {
            Ok(v) => v,
            Err(e) => {
                ctx.bar.abandon();
                write_curves(run, &state.history)?;
                return Err(match e.downcast::<Halt>() {
                    Ok(Halt::NonFinite { batch, loss }) => Diverged {
                        epoch: unit,
                        batch,
                        loss,
                        kept: kept_checkpoint(run, &state),
                    }
                    .into(),
                    Ok(Halt::Interrupt) => Interrupted {
                        epoch: unit,
                        kept: kept_checkpoint(run, &state),
                    }
                    .into(),
                    Err(e) => e,
                });
            }
        };
        ctx.bar.finish_and_clear();
        values.extend(routine.validate(unit, &mut ctx.rng)?);
        if let Some((name, v)) = values.iter().find(|(_, v)| !v.is_finite()) {
            // The last step left the weights non-finite: do not checkpoint them.
            eprintln!("{name} is {v} after {} {unit}", opts.unit_name);
            write_curves(run, &state.history)?;
            return Err(Diverged {
                epoch: unit,
                batch: ctx.batches,
                loss: *v as f32,
                kept: kept_checkpoint(run, &state),
            }
            .into());
        }
        let record = EpochRecord {
            epoch: unit,
            values,
        };
        let m = monitor.get_or_insert_with(|| default_monitor(&record));
        let Some(value) = record.get(&m.metric) else {
            anyhow::bail!(
                "train.monitor: no metric {:?} (this model reports {})",
                m.metric,
                record
                    .values
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        // Every unit for short runs; about 50 lines for long ones (metrics.csv has them all).
        if opts.units <= 100 || unit.is_multiple_of(opts.units.div_ceil(50)) || unit == opts.units {
            eprintln!(
                "{} {unit}/{}  {}",
                opts.unit_name,
                opts.units,
                fmt_values(&record)
            );
        }
        if m.improves(value, state.best_val_loss, opts.min_delta) {
            state.best_val_loss = value;
            state.best_epoch = unit;
            state.epochs_without_improvement = 0;
        } else {
            state.epochs_without_improvement += 1;
        }
        state.history.push(record);
        state.epoch = unit;
        state.seconds += unit_started.elapsed().as_secs_f64();
        units_here += 1;
        let mut ckpt = Checkpoint::begin(run, unit)?;
        routine.save(&mut ckpt)?;
        ckpt.state(checkpoint::ENGINE_STATE, &state)?;
        ckpt.commit()?;
        run.write_metrics(&state.history)?;
        routine.after_unit(unit, run)?;
        if reached(m, value) {
            eprintln!(
                "{} reached {} at {} {unit}: stopping",
                m.metric,
                opts.stop_at.unwrap_or_default(),
                opts.unit_name
            );
            stop = StopReason::TargetReached;
        } else if out_of_time(&state) {
            eprintln!(
                "time limit: {:.1} of {:.1} minutes of training spent after {} {unit}: stopping",
                state.seconds / 60.0,
                opts.max_seconds.unwrap_or_default() / 60.0,
                opts.unit_name
            );
            stop = StopReason::TimeLimit;
        } else if patience_hit(&state) {
            eprintln!(
                "early stopping: {} has not improved for {} {}s (best {:.6} at {} {})",
                m.metric,
                opts.patience,
                opts.unit_name,
                state.best_val_loss,
                opts.unit_name,
                state.best_epoch
            );
            stop = StopReason::EarlyStopped;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    run.write_metrics(&state.history)?;
    write_curves(run, &state.history)?;
    let monitor = monitor.unwrap_or_else(|| Monitor::min("val_loss"));
    Ok(Outcome {
        history: state.history,
        stop,
        best_epoch: state.best_epoch,
        best_value: state.best_val_loss,
        monitor,
        seconds,
        units_here,
    })
}

/// The seeds of one unit, one per [`SeedPurpose`].
#[derive(Debug, Clone, Copy)]
pub struct UnitSeeds {
    pub device: u64,
    pub data: u64,
    pub dropout: u64,
}

impl UnitSeeds {
    pub fn new(seed: u64, unit: usize) -> Self {
        UnitSeeds {
            device: derive_seed(seed, unit, SeedPurpose::Device),
            data: derive_seed(seed, unit, SeedPurpose::Data),
            dropout: derive_seed(seed, unit, SeedPurpose::Dropout),
        }
    }
}

fn default_monitor(record: &EpochRecord) -> Monitor {
    if record.get("val_loss").is_some() {
        Monitor::min("val_loss")
    } else {
        Monitor::min(record.values.first().map_or("train_loss", |(k, _)| k))
    }
}

fn kept_checkpoint(run: &RunDir, state: &LoopState) -> String {
    if state.epoch > 0 {
        format!(
            "kept the checkpoint of epoch {} in {}",
            state.epoch,
            run.checkpoints().display()
        )
    } else {
        "no epoch had completed, so there is no checkpoint".to_string()
    }
}

fn fmt_values(r: &EpochRecord) -> String {
    r.values
        .iter()
        .map(|(k, v)| format!("{k} {v:.5}"))
        .collect::<Vec<_>>()
        .join("  ")
}

fn progress(len: u64, unit_name: &str, unit: usize, units: usize) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let template = if len > 0 {
        format!("{unit_name} {{msg}} [{{bar:30}}] {{pos}}/{{len}} batches {{per_sec}} eta {{eta}}")
    } else {
        format!("{unit_name} {{msg}} {{spinner}} {{pos}} steps {{per_sec}}")
    };
    bar.set_style(
        ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("{unit}/{units}"));
    bar
}

/// The curves [`write_curves`] draws: (file stem, metric names), in `metrics.csv` order.
pub fn curve_groups(history: &[EpochRecord]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    let Some(first) = history.first() else {
        return groups;
    };
    for (name, _) in &first.values {
        let base = name
            .strip_prefix("train_")
            .or_else(|| name.strip_prefix("val_"))
            .unwrap_or(name)
            .to_string();
        match groups.iter_mut().find(|(b, _)| *b == base) {
            Some((_, names)) => names.push(name.clone()),
            None => groups.push((base, vec![name.clone()])),
        }
    }
    groups
}

/// One curve per metric: `train_X` and `val_X` together in `X.png` (`loss.png`,
/// `accuracy.png`, …), any other metric alone in `<name>.png`.
pub fn write_curves(run: &RunDir, history: &[EpochRecord]) -> Result<()> {
    for (base, names) in curve_groups(history) {
        let series: Vec<Series> = names
            .iter()
            .map(|name| Series {
                name: name.as_str(),
                points: history
                    .iter()
                    .filter_map(|r| r.get(name).map(|v| (r.epoch as f64, v)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        let title = title_case(&base);
        line_chart(
            &run.file(&format!("{base}.png")),
            &title,
            "epoch",
            &base.replace('_', " "),
            &series,
        )?;
    }
    Ok(())
}

fn title_case(s: &str) -> String {
    let s = s.replace('_', " ");
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_differ() {
        let p = SeedPurpose::Device;
        assert_ne!(derive_seed(1, 1, p), derive_seed(1, 2, p));
        assert_ne!(derive_seed(1, 1, p), derive_seed(1, 1, SeedPurpose::Data));
        assert_eq!(derive_seed(7, 3, p), derive_seed(7, 3, p));
    }

    /// A routine with no tensors: a counter that reports a metric falling then rising, and
    /// fails with a NaN at a chosen unit.
    struct Toy {
        total: f64,
        nan_at: Option<usize>,
        draws: Vec<u64>,
    }

    impl Routine for Toy {
        fn unit_len(&self) -> u64 {
            3
        }
        fn train_unit(&mut self, unit: usize, ctx: &mut UnitContext) -> Result<Metrics> {
            use rand::Rng as _;
            for _ in 0..3 {
                let loss = if Some(unit) == self.nan_at {
                    f32::NAN
                } else {
                    1.0
                };
                ctx.batch(loss)?;
            }
            self.draws.push(ctx.rng.random());
            self.total += unit as f64;
            let score = -((unit as f64) - 3.0).powi(2);
            Ok(vec![
                ("train_loss".into(), 1.0 / unit as f64),
                ("score".into(), score),
            ])
        }
        fn save(&self, ckpt: &mut Checkpoint) -> Result<()> {
            ckpt.state("toy", &(self.total, &self.draws))
        }
        fn load(&mut self, ckpt: &CheckpointReader) -> Result<()> {
            (self.total, self.draws) = ckpt.state("toy")?;
            Ok(())
        }
    }

    fn toy() -> Toy {
        Toy {
            total: 0.0,
            nan_at: None,
            draws: Vec::new(),
        }
    }

    /// A routine whose batches take 20 ms and that asks `time_up` between them, as
    /// `SupervisedRoutine` does: returns the batches it did.
    struct Slow;

    impl Routine for Slow {
        fn train_unit(&mut self, _unit: usize, ctx: &mut UnitContext) -> Result<Metrics> {
            let mut done = 0;
            while done < 50 && !(done > 0 && ctx.time_up()) {
                std::thread::sleep(std::time::Duration::from_millis(20));
                ctx.batch(1.0)?;
                done += 1;
            }
            Ok(vec![("train_batches".into(), done as f64)])
        }
        fn save(&self, _: &mut Checkpoint) -> Result<()> {
            Ok(())
        }
        fn load(&mut self, _: &CheckpointReader) -> Result<()> {
            Ok(())
        }
    }

    /// `max_seconds`: a 50-batch unit (1 s) under a 0.25 s budget ends after about a
    /// quarter of its batches, is checkpointed, and the run stops there; a routine that never
    /// asks stops at the end of its unit; resuming a run whose budget is spent trains nothing.
    #[test]
    fn time_limit_cuts_the_unit_short_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("r")).unwrap();
        let mut opts = EngineOptions::new(100, 1);
        opts.max_seconds = Some(0.25);
        let out = super::run(&mut Slow, &run, &opts, None).unwrap();
        assert_eq!(out.stop, StopReason::TimeLimit);
        assert_eq!(out.history.len(), 1);
        let done = out.history[0].get("train_batches").unwrap();
        assert!(
            (4.0..=14.0).contains(&done),
            "{done} batches of 20 ms in 0.25 s"
        );
        assert!(checkpoint::latest(&run).unwrap().is_some());
        opts.resume = true;
        let again = super::run(&mut Slow, &run, &opts, None).unwrap();
        assert_eq!((again.stop, again.units_here), (StopReason::TimeLimit, 0));

        let run = RunDir::create(&dir.path().join("toy")).unwrap();
        let mut opts = EngineOptions::new(100, 1);
        opts.max_seconds = Some(1e-9);
        let out = super::run(&mut toy(), &run, &opts, None).unwrap();
        assert_eq!((out.stop, out.history.len()), (StopReason::TimeLimit, 1));
    }

    #[test]
    fn early_stopping_maximises_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("r")).unwrap();
        let mut opts = EngineOptions::new(10, 1).monitor(Monitor::max("score"));
        opts.patience = 2;
        let out = super::run(&mut toy(), &run, &opts, None).unwrap();
        // score peaks at unit 3, then falls for units 4 and 5: stop after 5.
        assert_eq!(out.stop, StopReason::EarlyStopped);
        assert_eq!((out.best_epoch, out.history.len()), (3, 5));
        assert_eq!(out.best_value, 0.0);
        assert!(run.file("score.png").is_file() && run.file("loss.png").is_file());
        let csv = std::fs::read_to_string(run.file("metrics.csv")).unwrap();
        assert!(csv.starts_with("epoch,train_loss,score\n1,1,-4\n"), "{csv}");
    }

    #[test]
    fn resume_continues_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let straight = RunDir::create(&dir.path().join("a")).unwrap();
        let mut a = toy();
        super::run(&mut a, &straight, &EngineOptions::new(6, 9), None).unwrap();

        let split = RunDir::create(&dir.path().join("b")).unwrap();
        super::run(&mut toy(), &split, &EngineOptions::new(3, 9), None).unwrap();
        // A fresh process: the routine's state comes back from the checkpoint.
        let mut b = toy();
        let mut opts = EngineOptions::new(6, 9);
        opts.resume = true;
        let out = super::run(&mut b, &split, &opts, None).unwrap();
        assert_eq!(out.units_here, 3);
        assert_eq!((a.total, &a.draws), (b.total, &b.draws));
        let read = |r: &RunDir| std::fs::read_to_string(r.file("metrics.csv")).unwrap();
        assert_eq!(read(&straight), read(&split));
    }

    /// Two complete units stay on disk; a damaged latest one makes `resume` fall back to the
    /// one before it and continue exactly from there; with both damaged it is an error.
    #[test]
    fn resume_falls_back_past_a_damaged_latest_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let straight = RunDir::create(&dir.path().join("a")).unwrap();
        let mut a = toy();
        super::run(&mut a, &straight, &EngineOptions::new(6, 9), None).unwrap();

        let split = RunDir::create(&dir.path().join("b")).unwrap();
        super::run(&mut toy(), &split, &EngineOptions::new(4, 9), None).unwrap();
        let kept: Vec<String> = std::fs::read_dir(split.checkpoints())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("epoch-"))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(kept, ["epoch-0003", "epoch-0004"]);
        let toy_state = split.checkpoints().join("epoch-0004/toy.json");
        std::fs::write(&toy_state, "{ truncated").unwrap();
        let mut b = toy();
        let mut opts = EngineOptions::new(6, 9);
        opts.resume = true;
        let out = super::run(&mut b, &split, &opts, None).unwrap();
        assert_eq!(out.units_here, 3, "units 4, 5 and 6 trained again");
        assert_eq!((a.total, &a.draws), (b.total, &b.draws));
        let read = |r: &RunDir| std::fs::read_to_string(r.file("metrics.csv")).unwrap();
        assert_eq!(read(&straight), read(&split));

        // Both kept checkpoints damaged: one error, naming the newest.
        for unit in ["epoch-0005", "epoch-0006"] {
            std::fs::write(split.checkpoints().join(unit).join("state.json"), "x").unwrap();
        }
        let err = super::run(&mut toy(), &split, &opts, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("epoch-0006") && err.contains("do not load either"),
            "{err}"
        );
    }

    #[test]
    fn nan_batch_stops_and_keeps_the_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("r")).unwrap();
        let mut t = toy();
        t.nan_at = Some(3);
        let err = super::run(&mut t, &run, &EngineOptions::new(5, 1), None).unwrap_err();
        let d = err.downcast_ref::<Diverged>().expect("Diverged");
        assert_eq!((d.epoch, d.batch), (3, 1));
        assert!(d.kept.contains("epoch 2"), "{}", d.kept);
        let reader = checkpoint::latest(&run).unwrap().unwrap();
        let (total, _): (f64, Vec<u64>) = reader.state("toy").unwrap();
        assert_eq!(total, 3.0);
    }

    #[test]
    fn unknown_monitor_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("r")).unwrap();
        let opts = EngineOptions::new(2, 1).monitor(Monitor::min("val_los"));
        let err = super::run(&mut toy(), &run, &opts, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.monitor") && err.contains("score"),
            "{err}"
        );
    }
}
