//! The engine's handlers: each concern of a run (progress, the NaN stop, the schedule,
//! checkpoints, `metrics.csv`, the stopping rules, curves, TensorBoard) reacts to the engine's
//! events ([`Handler`]). [`standard`] is the list every run gets, in the order they fire;
//! [`super::run_with`] appends a routine's or a user's own.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{self, Checkpoint};
use super::{
    Diverged, EngineOptions, Halt, LoopState, Metrics, Monitor, Routine, StopReason, stop_requested,
};
use crate::plot::{Series, line_chart};
use crate::run::{EpochRecord, RunDir};

/// Fired once, after a resumed run has loaded its checkpoint (the state is then not empty).
pub struct Started<'a> {
    pub run: &'a RunDir,
    pub state: &'a LoopState,
    pub opts: &'a EngineOptions,
    pub monitor: Option<&'a Monitor>,
}

/// Fired before each unit. `rates` holds the routine's optimizers with their base rates; a
/// schedule replaces them with this unit's.
pub struct UnitStarted<'a> {
    pub unit: usize,
    /// Batches in the unit (0: unknown).
    pub len: u64,
    pub state: &'a LoopState,
    pub opts: &'a EngineOptions,
    /// Whether each unit so far improved the monitored metric.
    pub improved: Vec<bool>,
    pub rates: Vec<(&'static str, f64)>,
}

/// Fired by [`super::UnitContext::batch`].
pub struct BatchCompleted {
    pub unit: usize,
    pub batch: usize,
    pub loss: f32,
}

/// Fired when a unit has trained and validated, before its numbers are kept: a handler may
/// add columns (the rates) or refuse them (NaN).
pub struct UnitMetrics<'a> {
    pub unit: usize,
    pub batches: usize,
    pub values: &'a mut Metrics,
    pub rates: &'a [(&'static str, f64)],
    pub run: &'a RunDir,
    pub state: &'a LoopState,
    pub opts: &'a EngineOptions,
}

/// Fired when a unit's numbers are in the history.
pub struct UnitCompleted<'a> {
    pub unit: usize,
    pub run: &'a RunDir,
    pub state: &'a LoopState,
    pub opts: &'a EngineOptions,
    pub monitor: Option<&'a Monitor>,
    pub routine: &'a dyn Routine,
}

/// Fired once at the end; `stop` is `None` when the run failed.
pub struct Stopped<'a> {
    pub run: &'a RunDir,
    pub state: &'a LoopState,
    pub opts: &'a EngineOptions,
    pub stop: Option<StopReason>,
}

/// Something that reacts to the engine's events. Every method defaults to doing nothing.
/// Handlers keep no state a resume would need: what they decide follows from [`LoopState`].
pub trait Handler {
    /// Return a reason to stop before training anything (a resumed run already done).
    fn started(&mut self, ev: &Started) -> Result<Option<StopReason>> {
        let _ = ev;
        Ok(None)
    }
    fn unit_started(&mut self, ev: &mut UnitStarted) -> Result<()> {
        let _ = ev;
        Ok(())
    }
    fn batch_completed(&mut self, ev: &BatchCompleted) -> Result<(), Halt> {
        let _ = ev;
        Ok(())
    }
    fn unit_metrics(&mut self, ev: &mut UnitMetrics) -> Result<()> {
        let _ = ev;
        Ok(())
    }
    /// Return a reason to stop after this unit; `stopping` is what an earlier handler decided.
    fn unit_completed(
        &mut self,
        ev: &UnitCompleted,
        stopping: Option<StopReason>,
    ) -> Result<Option<StopReason>> {
        let _ = (ev, stopping);
        Ok(None)
    }
    /// The pictures the routine drew after the unit, as (tag, PNG path).
    fn unit_pictures(&mut self, unit: usize, pictures: &[(String, PathBuf)]) -> Result<()> {
        let _ = (unit, pictures);
        Ok(())
    }
    fn stopped(&mut self, ev: &Stopped) -> Result<()> {
        let _ = ev;
        Ok(())
    }
}

/// The handlers every run gets, in firing order: the schedule, the guard (NaN, Ctrl-C), the
/// progress bar, checkpoints, `metrics.csv`, the stopping rules, curves, and TensorBoard
/// when `opts.tensorboard`.
pub fn standard(
    opts: &EngineOptions,
    optimizers: Vec<(&'static str, f64)>,
    loss_name: Option<String>,
) -> Vec<Box<dyn Handler>> {
    let mut h: Vec<Box<dyn Handler>> = vec![
        Box::new(LrSchedule {
            several: optimizers.len() > 1,
        }),
        Box::new(Guard),
        Box::new(Progress { bar: None }),
        Box::new(Checkpointer),
        Box::new(MetricsCsv),
        Box::new(StopAt),
        Box::new(TimeBudget),
        Box::new(EarlyStopping),
        Box::new(Curves { loss_name }),
    ];
    if opts.tensorboard {
        h.push(Box::new(super::tensorboard::TensorBoard::default()));
    }
    h
}

/// Sets each optimizer's rate from `opts.schedule` and records it (`lr` / `lr_<name>`).
pub struct LrSchedule {
    several: bool,
}

impl Handler for LrSchedule {
    fn unit_started(&mut self, ev: &mut UnitStarted) -> Result<()> {
        let f = ev
            .opts
            .schedule
            .factor(ev.unit, ev.opts.units, &ev.improved);
        for (_, lr) in ev.rates.iter_mut() {
            *lr *= f;
        }
        Ok(())
    }
    fn unit_metrics(&mut self, ev: &mut UnitMetrics) -> Result<()> {
        for (name, lr) in ev.rates {
            let column = if self.several {
                format!("lr_{name}")
            } else {
                "lr".to_string()
            };
            ev.values.push((column, *lr));
        }
        Ok(())
    }
}

/// The NaN/Inf stop (a batch loss or a unit's number) and Ctrl-C.
pub struct Guard;

impl Handler for Guard {
    fn batch_completed(&mut self, ev: &BatchCompleted) -> Result<(), Halt> {
        if !ev.loss.is_finite() {
            return Err(Halt::NonFinite {
                batch: ev.batch,
                loss: ev.loss,
            });
        }
        if stop_requested() {
            return Err(Halt::Interrupt);
        }
        Ok(())
    }
    fn unit_metrics(&mut self, ev: &mut UnitMetrics) -> Result<()> {
        if let Some((name, v)) = ev.values.iter().find(|(_, v)| !v.is_finite()) {
            // The last step left the weights non-finite: do not checkpoint them.
            eprintln!("{name} is {v} after {} {}", ev.opts.unit_name, ev.unit);
            return Err(Diverged {
                unit_name: ev.opts.unit_name,
                epoch: ev.unit,
                batch: ev.batches,
                loss: *v as f32,
                kept: ev.state.kept(ev.run, ev.opts.unit_name),
            }
            .into());
        }
        Ok(())
    }
}

/// One progress bar per unit (ticked per batch), and one line per unit after it — every
/// unit for short runs, about 50 lines for long ones (`metrics.csv` has them all).
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Handler for Progress {
    fn unit_started(&mut self, ev: &mut UnitStarted) -> Result<()> {
        let name = ev.opts.unit_name;
        let bar = ProgressBar::new(ev.len);
        let template = if ev.len > 0 {
            format!("{name} {{msg}} [{{bar:30}}] {{pos}}/{{len}} batches {{per_sec}} eta {{eta}}")
        } else {
            format!("{name} {{msg}} {{spinner}} {{pos}} steps {{per_sec}}")
        };
        bar.set_style(
            ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(format!("{}/{}", ev.unit, ev.opts.units));
        self.bar = Some(bar);
        Ok(())
    }
    fn batch_completed(&mut self, _: &BatchCompleted) -> Result<(), Halt> {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
        Ok(())
    }
    fn unit_metrics(&mut self, _: &mut UnitMetrics) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        Ok(())
    }
    fn unit_completed(
        &mut self,
        ev: &UnitCompleted,
        _: Option<StopReason>,
    ) -> Result<Option<StopReason>> {
        let units = ev.opts.units;
        if (units <= 100 || ev.unit.is_multiple_of(units.div_ceil(50)) || ev.unit == units)
            && let Some(r) = ev.state.history.last()
        {
            let values: Vec<String> = r
                .values
                .iter()
                .map(|(k, v)| format!("{k} {v:.5}"))
                .collect();
            eprintln!(
                "{} {}/{units}  {}",
                ev.opts.unit_name,
                ev.unit,
                values.join("  ")
            );
        }
        Ok(None)
    }
    fn stopped(&mut self, _: &Stopped) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
        Ok(())
    }
}

/// `checkpoints/epoch-NNNN/`: the routine's modules, optimizers and state plus the engine's
/// loop state, committed before anything else of the unit is written.
pub struct Checkpointer;

impl Handler for Checkpointer {
    fn unit_completed(
        &mut self,
        ev: &UnitCompleted,
        _: Option<StopReason>,
    ) -> Result<Option<StopReason>> {
        let mut ckpt = Checkpoint::begin(ev.run, ev.unit)?;
        ev.routine.save(&mut ckpt)?;
        ckpt.state(checkpoint::ENGINE_STATE, ev.state)?;
        ckpt.commit()?;
        Ok(None)
    }
}

/// `metrics.csv`, rewritten from the history after every unit and at the end.
pub struct MetricsCsv;

impl Handler for MetricsCsv {
    fn unit_completed(
        &mut self,
        ev: &UnitCompleted,
        _: Option<StopReason>,
    ) -> Result<Option<StopReason>> {
        ev.run.write_metrics(ev.opts.unit_name, &ev.state.history)?;
        Ok(None)
    }
    fn stopped(&mut self, ev: &Stopped) -> Result<()> {
        if ev.stop.is_some() {
            ev.run.write_metrics(ev.opts.unit_name, &ev.state.history)?;
        }
        Ok(())
    }
}

/// `train.stop_at`: the monitored metric reached its target (Lightning's `stopping_threshold`).
pub struct StopAt;

impl StopAt {
    fn reached(
        state: &LoopState,
        opts: &EngineOptions,
        monitor: Option<&Monitor>,
    ) -> Option<(f64, f64)> {
        let (m, target) = (monitor?, opts.stop_at?);
        let v = state.history.last()?.get(&m.metric)?;
        m.reached(v, target).then_some((v, target))
    }
}

impl Handler for StopAt {
    fn started(&mut self, ev: &Started) -> Result<Option<StopReason>> {
        Ok(Self::reached(ev.state, ev.opts, ev.monitor).map(|_| StopReason::TargetReached))
    }
    fn unit_completed(
        &mut self,
        ev: &UnitCompleted,
        stopping: Option<StopReason>,
    ) -> Result<Option<StopReason>> {
        if stopping.is_some() {
            return Ok(None);
        }
        Ok(
            Self::reached(ev.state, ev.opts, ev.monitor).map(|(_, target)| {
                eprintln!(
                    "{} reached {target} at {} {}: stopping",
                    ev.monitor.map_or("", |m| m.metric.as_str()),
                    ev.opts.unit_name,
                    ev.unit
                );
                StopReason::TargetReached
            }),
        )
    }
}

/// `train.max_minutes`: the training-time budget over the whole run.
pub struct TimeBudget;

impl TimeBudget {
    fn spent(state: &LoopState, opts: &EngineOptions) -> bool {
        opts.max_seconds.is_some_and(|m| state.seconds >= m)
    }
}

impl Handler for TimeBudget {
    fn started(&mut self, ev: &Started) -> Result<Option<StopReason>> {
        Ok(Self::spent(ev.state, ev.opts).then_some(StopReason::TimeLimit))
    }
    fn unit_completed(
        &mut self,
        ev: &UnitCompleted,
        stopping: Option<StopReason>,
    ) -> Result<Option<StopReason>> {
        if stopping.is_some() || !Self::spent(ev.state, ev.opts) {
            return Ok(None);
        }
        eprintln!(
            "time limit: {:.1} of {:.1} minutes of training spent after {} {}: stopping",
            ev.state.seconds / 60.0,
            ev.opts.max_seconds.unwrap_or_default() / 60.0,
            ev.opts.unit_name,
            ev.unit
        );
        Ok(Some(StopReason::TimeLimit))
    }
}

/// `train.patience`: stop after that many units without improvement of the monitored metric.
pub struct EarlyStopping;

impl EarlyStopping {
    fn hit(state: &LoopState, opts: &EngineOptions) -> bool {
        opts.patience > 0 && state.epochs_without_improvement >= opts.patience
    }
}

impl Handler for EarlyStopping {
    fn started(&mut self, ev: &Started) -> Result<Option<StopReason>> {
        Ok(Self::hit(ev.state, ev.opts).then_some(StopReason::EarlyStopped))
    }
    fn unit_completed(
        &mut self,
        ev: &UnitCompleted,
        stopping: Option<StopReason>,
    ) -> Result<Option<StopReason>> {
        if stopping.is_some() || !Self::hit(ev.state, ev.opts) {
            return Ok(None);
        }
        let name = ev.opts.unit_name;
        eprintln!(
            "early stopping: {} has not improved for {} {name}s (best {:.6} at {name} {})",
            ev.monitor.map_or("", |m| m.metric.as_str()),
            ev.opts.patience,
            ev.state.best_val_loss,
            ev.state.best_epoch
        );
        Ok(Some(StopReason::EarlyStopped))
    }
}

/// One curve per metric at the end (also when the run failed): [`write_curves`], titled with
/// the model and its data, the loss axis with what the loss is.
pub struct Curves {
    pub loss_name: Option<String>,
}

impl Handler for Curves {
    fn stopped(&mut self, ev: &Stopped) -> Result<()> {
        let words = CurveWords {
            subject: subject(ev.run),
            loss_name: self.loss_name.clone(),
        };
        write_curves(ev.run, ev.opts.unit_name, &ev.state.history, &words)
    }
}

/// "cnn on mnist": the run's model and its data (the data set, the data file or corpus, the
/// environment), from its `config.toml`; empty when there is none.
pub fn subject(run: &RunDir) -> String {
    let Ok(doc) = run.config() else {
        return String::new();
    };
    let model = doc.model().unwrap_or("").to_string();
    let t = &doc.table;
    let file = |v: Option<&toml::Value>| {
        v.and_then(|v| v.as_str()).map(|p| {
            std::path::Path::new(p)
                .file_name()
                .map_or(p.to_string(), |f| f.to_string_lossy().into_owned())
        })
    };
    let params = t.get("params");
    let data = file(t.get("dataset"))
        .or_else(|| file(params.and_then(|p| p.get("data"))))
        .or_else(|| {
            file(
                params
                    .and_then(|p| p.get("data"))
                    .and_then(|d| d.get("text")),
            )
        })
        .or_else(|| {
            file(
                params
                    .and_then(|p| p.get("data"))
                    .and_then(|d| d.get("csv")),
            )
        })
        .or_else(|| {
            file(
                params
                    .and_then(|p| p.get("env"))
                    .and_then(|e| e.get("kind")),
            )
        });
    match data {
        Some(d) => format!("{model} on {d}"),
        None => model,
    }
}

/// The words on the curves: what was trained on what, and what the loss is.
#[derive(Debug, Clone, Default)]
pub struct CurveWords {
    pub subject: String,
    pub loss_name: Option<String>,
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
/// `accuracy.png`, …), any other metric alone in `<name>.png`; the x axis counts `unit_name`s,
/// the title names the model and its data, the loss axis what the loss is.
pub fn write_curves(
    run: &RunDir,
    unit_name: &str,
    history: &[EpochRecord],
    words: &CurveWords,
) -> Result<()> {
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
        let what = if base == "lr" || base.starts_with("lr_") {
            format!(
                "Learning rate{}",
                base.strip_prefix("lr").unwrap_or("").replace('_', " ")
            )
        } else {
            title_case(&base)
        };
        let title = if words.subject.is_empty() {
            what
        } else {
            format!("{what} — {}", words.subject)
        };
        let y = match (&words.loss_name, base.as_str()) {
            (Some(l), "loss") => format!("loss ({l})"),
            _ => base.replace('_', " "),
        };
        line_chart(
            &run.file(&format!("{base}.png")),
            &title,
            unit_name,
            &y,
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
