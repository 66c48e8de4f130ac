//! The training engine every family runs on: supervised classifiers and regressors,
//! autoencoders, GANs and reinforcement learners alike.
//!
//! A family implements [`Routine`]: what one unit of training (an epoch, or a DQN round)
//! does and which named numbers it reports, what validation measures, which optimizers it
//! steps (named, with their base rates) and how its networks, optimizers and state go into a
//! checkpoint. [`run`] owns the loop and fires events; everything else is a [`Handler`] on
//! those events, as in PyTorch Ignite (`STARTED`, `EPOCH_STARTED`, `ITERATION_COMPLETED`,
//! `EPOCH_COMPLETED`, `COMPLETED`):
//!
//! | event | handlers ([`handlers`]) |
//! |---|---|
//! | started (after a resume has loaded) | stopping rules see whether there is anything left to do; TensorBoard rewrites its file from the history |
//! | unit started | the learning-rate [`Schedule`] sets each optimizer's rate; the progress bar appears |
//! | batch completed ([`UnitContext::batch`]) | the NaN stop and Ctrl-C; the progress bar ticks |
//! | unit metrics | the NaN stop checks the unit's numbers; the schedule adds `lr` |
//! | unit completed | checkpoint, `metrics.csv`, the stopping rules (target, time budget, patience), the log line, TensorBoard scalars |
//! | unit pictures (after [`Routine::after_unit`]) | TensorBoard images |
//! | stopped (completed, stopped early or failed) | `metrics.csv`, one curve per metric |
//!
//! The engine itself keeps only the loop state ([`LoopState`]: history, best value, seconds)
//! and the seeds: before unit u the device, kiln's dropout masks and the unit's data generator
//! are seeded from (seed, u, purpose) ([`UnitSeeds`]), so a resumed run continues exactly as an
//! uninterrupted one. Every handler is a function of that state, so a checkpoint of the
//! routine and the loop state is all a resume needs.
//!
//! The shape follows Ignite's `Engine` (a process function per iteration, the rest in
//! handlers), Lightning's manual optimisation (the routine steps its own optimizers, so a GAN
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
//!     fn optimizers(&self) -> Vec<(&'static str, f64)> { vec![("x", 0.1)] }
//!     fn train_unit(&mut self, _unit: usize, ctx: &mut UnitContext) -> anyhow::Result<Metrics> {
//!         let loss = (self.x - 3.0).powi(2);
//!         ctx.batch(loss as f32)?;
//!         self.x -= ctx.lr("x") * 2.0 * (self.x - 3.0);
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
//! // The rate is a column of metrics.csv.
//! assert_eq!(outcome.history[0].get("lr"), Some(0.1));
//! # anyhow::Ok(())
//! ```

pub mod checkpoint;
pub mod handlers;
pub mod tensorboard;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

pub use crate::monitor::{Mode, Monitor};
use crate::run::{EpochRecord, RunDir};
pub use crate::schedule::Schedule;
use checkpoint::{Checkpoint, CheckpointReader};
pub use handlers::Handler;

/// Named numbers of one unit, in the order they appear in `metrics.csv`.
pub type Metrics = Vec<(String, f64)>;

/// What a family does; the engine does the rest (see the module docs).
pub trait Routine {
    /// Batches (or steps) in one unit, for the progress bar; `0` shows a spinner.
    fn unit_len(&self) -> u64 {
        0
    }
    /// The optimizers the routine steps, each named with its base learning rate: the engine's
    /// schedule scales every one of them ([`UnitContext::lr`]) and records the rates in
    /// `metrics.csv` (`lr` for one optimizer, `lr_<name>` for several). Default: none.
    fn optimizers(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    /// What `loss` is (`cross-entropy`), for the curves. Default: unnamed.
    fn loss_name(&self) -> Option<String> {
        None
    }
    /// The metric early stopping, `stop_at`, the `plateau` schedule and "best unit" follow
    /// when `train.monitor` does not name one; `None`: this routine has no sensible default.
    fn monitor(&self) -> Option<Monitor> {
        None
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
    /// After each unit's checkpoint: pictures (sample grids, reconstructions); returns them
    /// as (tag, PNG path) for the image loggers. Default: none.
    fn after_unit(&mut self, unit: usize, run: &RunDir) -> Result<Vec<(String, PathBuf)>> {
        let _ = (unit, run);
        Ok(Vec::new())
    }
}

/// How the engine runs a routine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Units to run in all (epochs or rounds).
    pub units: usize,
    /// `epoch` or `round`: `metrics.csv`'s first column and the messages.
    pub unit_name: &'static str,
    pub seed: u64,
    /// Stop after this many units without improvement of the monitored metric; `0` never.
    pub patience: usize,
    pub min_delta: f64,
    /// Default: the routine's [`Routine::monitor`].
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
    /// The learning-rate schedule applied to every optimizer the routine registers.
    pub schedule: Schedule,
    /// Write TensorBoard event files under `tensorboard/` in the run directory.
    pub tensorboard: bool,
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
            schedule: Schedule::default(),
            tensorboard: false,
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
    "training diverged at {unit_name} {epoch}, batch {batch}: loss is {loss}; {kept} \
     (try a smaller train.learning_rate)"
)]
pub struct Diverged {
    pub unit_name: &'static str,
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

/// The run was interrupted (Ctrl-C): the current unit was dropped, the last checkpoint kept.
#[derive(Debug, thiserror::Error)]
#[error("interrupted during {unit_name} {epoch}; {kept}")]
pub struct Interrupted {
    pub unit_name: &'static str,
    pub epoch: usize,
    pub kept: String,
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ask the running engine to stop after the current batch (the `kiln` binary calls this on
/// Ctrl-C). The unfinished unit is dropped; the last checkpoint stays, so `kiln resume`
/// continues exactly.
pub fn request_stop() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub(crate) fn stop_requested() -> bool {
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

/// What a routine gets for one unit: its seeded generator, its optimizers' rates, and the
/// batch event (progress, the NaN stop, Ctrl-C).
pub struct UnitContext<'h> {
    /// Seeded from (seed, unit): shuffle, augment and sample with it.
    pub rng: StdRng,
    unit: usize,
    batches: usize,
    examples: usize,
    deadline: Option<Instant>,
    rates: Vec<(&'static str, f64)>,
    handlers: &'h mut [Box<dyn Handler>],
}

impl UnitContext<'_> {
    /// One batch done with this loss: fires the batch event (the progress bar ticks); a NaN
    /// or infinite loss, or Ctrl-C, is an error that ends the run (return it with `?`).
    pub fn batch(&mut self, loss: f32) -> Result<(), Halt> {
        self.batches += 1;
        let ev = handlers::BatchCompleted {
            unit: self.unit,
            batch: self.batches,
            loss,
        };
        for h in self.handlers.iter_mut() {
            h.batch_completed(&ev)?;
        }
        Ok(())
    }
    /// Count `n` training examples (images, sequences, environment steps) for the run's
    /// throughput (`examples_per_second` in `summary.json`).
    pub fn examples(&mut self, n: usize) {
        self.examples += n;
    }
    /// Batches reported so far in this unit.
    pub fn batches(&self) -> usize {
        self.batches
    }
    /// This unit's learning rate of the optimizer `name` (one of [`Routine::optimizers`]):
    /// its base rate times the schedule's factor.
    pub fn lr(&self, name: &str) -> f64 {
        match self.rates.iter().find(|(n, _)| *n == name) {
            Some((_, lr)) => *lr,
            None => panic!("optimizer {name:?} is not one of Routine::optimizers()"),
        }
    }
    /// Whether the run's training-time budget is spent: a routine checks it between batches
    /// and ends the unit early (returning the metrics of the batches it did), so a
    /// time-limited run stops within a batch of its budget rather than a unit. Routines that
    /// never ask stop at the end of the unit.
    pub fn time_up(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// The engine's own state, saved as `state.json` in each checkpoint; the handlers read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoopState {
    /// Units completed.
    pub epoch: usize,
    pub history: Vec<EpochRecord>,
    /// Best value of the monitored metric so far (named so for older checkpoints); without a
    /// monitor, or before any unit, it is infinite and written as `null`.
    #[serde(deserialize_with = "null_is_infinite")]
    pub best_val_loss: f64,
    pub best_epoch: usize,
    pub epochs_without_improvement: usize,
    pub seed: u64,
    /// Seconds of training so far, all processes (for `max_seconds`).
    #[serde(default)]
    pub seconds: f64,
}

fn null_is_infinite<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

impl LoopState {
    /// A sentence naming the checkpoint a failed run keeps.
    pub fn kept(&self, run: &RunDir, unit_name: &str) -> String {
        if self.epoch > 0 {
            format!(
                "kept the checkpoint of {unit_name} {} in {}",
                self.epoch,
                run.checkpoints().display()
            )
        } else {
            format!("no {unit_name} had completed, so there is no checkpoint")
        }
    }
}

/// What [`run`] returns.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub history: Vec<EpochRecord>,
    pub stop: StopReason,
    /// `epoch` or `round`.
    pub unit_name: &'static str,
    /// The metric "best" refers to; `None` when neither the config nor the routine names one.
    pub monitor: Option<Monitor>,
    /// The unit with the best monitored value (0 without a monitor).
    pub best_epoch: usize,
    /// Best value of the monitored metric.
    pub best_value: f64,
    /// Wall-clock seconds of the units run in this process.
    pub seconds: f64,
    /// Seconds of training over the whole run, resumed parts included.
    pub seconds_total: f64,
    /// Units run in this process (not counting a resumed part).
    pub units_here: usize,
    /// Examples counted through [`UnitContext::examples`] in this process.
    pub examples_here: usize,
}

impl Outcome {
    /// Training examples per second in this process; `None` when the routine counts none.
    pub fn examples_per_second(&self) -> Option<f64> {
        (self.examples_here > 0 && self.seconds > 0.0)
            .then(|| self.examples_here as f64 / self.seconds)
    }
}

/// The monitor a run follows: the config's, else the routine's; an error when something
/// needs one and there is none.
fn resolve_monitor<R: Routine>(routine: &R, opts: &EngineOptions) -> Result<Option<Monitor>> {
    let monitor = opts.monitor.clone().or_else(|| routine.monitor());
    if monitor.is_none() {
        let needs = [
            (opts.patience > 0, "train.patience"),
            (opts.stop_at.is_some(), "train.stop_at"),
            (
                opts.schedule.needs_monitor(),
                "train.schedule = \"plateau\"",
            ),
        ];
        if let Some((_, what)) = needs.iter().find(|(n, _)| *n) {
            bail!(
                "train.monitor: {what} follows a metric, and this model has no default one; \
                 name a column of metrics.csv (train.monitor = \"...\", train.mode = \"min\" or \"max\")"
            );
        }
    }
    Ok(monitor)
}

/// Load the newest checkpoint that loads into `routine`, falling back past damaged ones.
fn load_checkpoint<R: Routine>(
    routine: &mut R,
    run: &RunDir,
    opts: &EngineOptions,
) -> Result<Option<LoopState>> {
    let candidates = checkpoint::candidates(run)?;
    if candidates.is_empty() {
        eprintln!("no checkpoint yet; starting from {} 1", opts.unit_name);
        return Ok(None);
    }
    let mut first_error = None;
    for (i, reader) in candidates.iter().enumerate() {
        let loaded = reader
            .state::<LoopState>(checkpoint::ENGINE_STATE)
            .and_then(|s| routine.load(reader).map(|()| s));
        match loaded {
            Ok(s) => {
                eprintln!(
                    "resuming after {} {} of {}",
                    opts.unit_name, s.epoch, opts.units
                );
                return Ok(Some(s));
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
    let e = first_error.unwrap_or_default();
    if candidates.len() > 1 {
        bail!("{e} (the checkpoints before it do not load either)");
    }
    bail!("{e}")
}

/// Run `routine` for `opts.units` units in `run` with the handlers `opts` asks for
/// ([`handlers::standard`]); `device`, when given, is reseeded before every unit.
pub fn run<R: Routine>(
    routine: &mut R,
    run: &RunDir,
    opts: &EngineOptions,
    device: Option<&Device>,
) -> Result<Outcome> {
    run_with(routine, run, opts, device, Vec::new())
}

/// [`run`] with `extra` handlers after the standard ones.
pub fn run_with<R: Routine>(
    routine: &mut R,
    run: &RunDir,
    opts: &EngineOptions,
    device: Option<&Device>,
    extra: Vec<Box<dyn Handler>>,
) -> Result<Outcome> {
    let monitor = resolve_monitor(routine, opts)?;
    let mut handlers = handlers::standard(opts, routine.optimizers(), routine.loss_name());
    handlers.extend(extra);
    let mut state = LoopState {
        epoch: 0,
        history: Vec::new(),
        best_val_loss: monitor.as_ref().map_or(f64::INFINITY, Monitor::worst),
        best_epoch: 0,
        epochs_without_improvement: 0,
        seed: opts.seed,
        seconds: 0.0,
    };
    if opts.resume
        && let Some(s) = load_checkpoint(routine, run, opts)?
    {
        let worst = state.best_val_loss;
        state = s;
        if state.best_epoch == 0 {
            state.best_val_loss = worst;
        }
    }
    let result = run_units(
        routine,
        run,
        opts,
        device,
        &monitor,
        &mut handlers,
        &mut state,
    );
    let stopped = handlers::Stopped {
        run,
        state: &state,
        opts,
        stop: result.as_ref().ok().map(|(stop, ..)| *stop),
    };
    for h in handlers.iter_mut() {
        h.stopped(&stopped)?;
    }
    let (stop, seconds, units_here, examples_here) = result?;
    Ok(Outcome {
        history: state.history,
        stop,
        unit_name: opts.unit_name,
        best_epoch: if monitor.is_some() {
            state.best_epoch
        } else {
            0
        },
        best_value: state.best_val_loss,
        monitor,
        seconds,
        seconds_total: state.seconds,
        units_here,
        examples_here,
    })
}

/// The loop: returns why it stopped, its seconds, units and examples in this process.
fn run_units<R: Routine>(
    routine: &mut R,
    run: &RunDir,
    opts: &EngineOptions,
    device: Option<&Device>,
    monitor: &Option<Monitor>,
    handlers: &mut [Box<dyn Handler>],
    state: &mut LoopState,
) -> Result<(StopReason, f64, usize, usize)> {
    let started = Instant::now();
    let mut stop = None;
    {
        let ev = handlers::Started {
            run,
            state,
            opts,
            monitor: monitor.as_ref(),
        };
        for h in handlers.iter_mut() {
            let s = h.started(&ev)?;
            stop = stop.or(s);
        }
    }
    let (mut units_here, mut examples_here) = (0, 0);
    while stop.is_none() && state.epoch < opts.units {
        let unit = state.epoch + 1;
        let seeds = UnitSeeds::new(opts.seed, unit);
        if let Some(d) = device {
            d.seed(seeds.device);
        }
        crate::nn::seed_dropout(seeds.dropout);
        let unit_started = Instant::now();
        let mut begin = handlers::UnitStarted {
            unit,
            len: routine.unit_len(),
            state,
            opts,
            // Only the plateau schedule replays the monitor's history.
            improved: if opts.schedule.needs_monitor() {
                improvements(&state.history, monitor.as_ref(), opts.min_delta)
            } else {
                Vec::new()
            },
            rates: routine.optimizers(),
        };
        for h in handlers.iter_mut() {
            h.unit_started(&mut begin)?;
        }
        let rates = begin.rates;
        let mut ctx = UnitContext {
            rng: StdRng::seed_from_u64(seeds.data),
            unit,
            batches: 0,
            examples: 0,
            deadline: opts.max_seconds.map(|m| {
                unit_started + std::time::Duration::from_secs_f64((m - state.seconds).max(0.0))
            }),
            rates: rates.clone(),
            handlers,
        };
        let mut values = match routine.train_unit(unit, &mut ctx) {
            Ok(v) => v,
            Err(e) => {
                let kept = state.kept(run, opts.unit_name);
                return Err(match e.downcast::<Halt>() {
                    Ok(Halt::NonFinite { batch, loss }) => Diverged {
                        unit_name: opts.unit_name,
                        epoch: unit,
                        batch,
                        loss,
                        kept,
                    }
                    .into(),
                    Ok(Halt::Interrupt) => Interrupted {
                        unit_name: opts.unit_name,
                        epoch: unit,
                        kept,
                    }
                    .into(),
                    Err(e) => e,
                });
            }
        };
        let (batches, examples) = (ctx.batches, ctx.examples);
        values.extend(routine.validate(unit, &mut ctx.rng)?);
        let mut metrics = handlers::UnitMetrics {
            unit,
            batches,
            values: &mut values,
            rates: &rates,
            run,
            state,
            opts,
        };
        for h in handlers.iter_mut() {
            h.unit_metrics(&mut metrics)?;
        }
        let record = EpochRecord {
            epoch: unit,
            values,
        };
        if let Some(m) = monitor {
            let Some(value) = record.get(&m.metric) else {
                bail!(
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
            if m.improves(value, state.best_val_loss, opts.min_delta) {
                state.best_val_loss = value;
                state.best_epoch = unit;
                state.epochs_without_improvement = 0;
            } else {
                state.epochs_without_improvement += 1;
            }
        }
        state.history.push(record);
        state.epoch = unit;
        state.seconds += unit_started.elapsed().as_secs_f64();
        units_here += 1;
        examples_here += examples;
        let done = handlers::UnitCompleted {
            unit,
            run,
            state,
            opts,
            monitor: monitor.as_ref(),
            routine: &*routine,
        };
        for h in handlers.iter_mut() {
            let s = h.unit_completed(&done, stop)?;
            stop = stop.or(s);
        }
        let pictures = routine.after_unit(unit, run)?;
        for h in handlers.iter_mut() {
            h.unit_pictures(unit, &pictures)?;
        }
    }
    Ok((
        stop.unwrap_or(StopReason::Completed),
        started.elapsed().as_secs_f64(),
        units_here,
        examples_here,
    ))
}

/// For each unit of `history`, whether it improved the monitored metric by more than
/// `min_delta` (what the `plateau` schedule replays).
pub fn improvements(
    history: &[EpochRecord],
    monitor: Option<&Monitor>,
    min_delta: f64,
) -> Vec<bool> {
    let Some(m) = monitor else {
        return Vec::new();
    };
    let mut best = m.worst();
    history
        .iter()
        .map(|r| match r.get(&m.metric) {
            Some(v) if m.improves(v, best, min_delta) => {
                best = v;
                true
            }
            _ => false,
        })
        .collect()
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

pub use handlers::{curve_groups, write_curves};

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

    /// `max_seconds`: a 50-batch unit (at least 1 s) under a 0.25 s budget ends early — after
    /// at least one batch and before its 50th, however loaded the machine — is checkpointed,
    /// and the run stops there with the budget spent; a routine that never asks stops at the
    /// end of its unit; resuming a run whose budget is spent trains nothing.
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
            (1.0..50.0).contains(&done),
            "{done} batches of 20 ms in 0.25 s"
        );
        assert!(out.seconds_total >= 0.25, "{}", out.seconds_total);
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
