//! The one training loop every supervised model shares.
//!
//! Per epoch e: shuffle the training indices with a generator seeded by (seed, e); for each
//! mini-batch B compute the loss L_B(θ), its gradient by backpropagation, and let the
//! optimizer update θ; then evaluate the validation set without gradients. After every epoch
//! the model, the optimizer state and the loop state are checkpointed atomically, and
//! `metrics.csv` is rewritten from the checkpointed history.
//!
//! Everything random is derived from the seed and the epoch number (shuffling, dropout,
//! augmentation), so a run resumed from the checkpoint of epoch e continues exactly as the
//! uninterrupted run would have.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use serde::{Deserialize, Serialize};

use crate::backend::BackendName;
use crate::config::TrainConfig;
use crate::plot::{Series, line_chart};
use crate::run::{EpochRecord, MODEL_FILE, RunDir, write_atomic};

/// What one forward pass over a batch gives the loop.
pub struct StepOutput {
    /// Mean loss over the batch, shape `[1]`.
    pub loss: Tensor<1>,
    /// For classifiers: how many predictions in the batch were right, shape `[1]`.
    pub correct: Option<Tensor<1, Int>>,
}

/// Whether a step is a training step (dropout, augmentation on) or an evaluation step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Train,
    Eval,
}

/// A supervised learning problem: the network and how a batch turns into a loss.
///
/// A model crate implements this; `fit` does the rest (batches, optimizer, validation, early
/// stopping, checkpoints, metrics, curves).
pub trait Supervised {
    type Model: Module;
    /// The examples, in whatever form the model batches them from (tensors are built per batch).
    type Data: ?Sized;

    /// A freshly initialised network on `device`.
    fn init_model(&self, device: &Device) -> Self::Model;
    /// Number of examples in `data`.
    fn len(&self, data: &Self::Data) -> usize;
    /// Forward the examples `indices` of `data` through `model` and return the batch loss.
    /// `rng` is seeded per epoch; use it for augmentation in the `Train` phase.
    fn step(
        &self,
        model: &Self::Model,
        data: &Self::Data,
        indices: &[usize],
        device: &Device,
        phase: Phase,
        rng: &mut StdRng,
    ) -> StepOutput;
}

/// Settings of one `fit` call, from the run's config.
pub struct FitOptions<'a> {
    pub train: &'a TrainConfig,
    pub seed: u64,
    pub backend: BackendName,
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Ran all configured epochs.
    Completed,
    /// Validation loss did not improve for `patience` epochs.
    EarlyStopped,
}

/// What `fit` returns: the trained model (final weights) and its history.
pub struct Fitted<M> {
    pub model: M,
    pub history: Vec<EpochRecord>,
    pub stop: StopReason,
    pub best_epoch: usize,
    pub best_val_loss: f64,
    /// Wall-clock seconds of training in this process (not counting a resumed part).
    pub seconds: f64,
    /// Training examples per second over this process's epochs.
    pub examples_per_second: f64,
}

/// Loop state saved in each checkpoint beside the weights and the optimizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoopState {
    epoch: usize,
    history: Vec<EpochRecord>,
    best_val_loss: f64,
    best_epoch: usize,
    epochs_without_improvement: usize,
    seed: u64,
}

/// Training diverged: the loss became NaN or infinite. The last good checkpoint is kept.
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

const LATEST: &str = "latest";

/// Derive an independent seed for (run seed, epoch, purpose).
pub fn derive_seed(seed: u64, epoch: usize, purpose: u64) -> u64 {
    // SplitMix64 finaliser over a simple combination: well-mixed and stable across versions.
    let mut z = seed
        ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// η_e = η·γ^(e−1) for epoch e (1-based).
pub fn learning_rate(cfg: &TrainConfig, epoch: usize) -> f64 {
    cfg.learning_rate * cfg.lr_decay.powi(epoch.saturating_sub(1) as i32)
}

fn batches(n: usize, batch_size: usize) -> usize {
    let bs = if batch_size == 0 {
        n.max(1)
    } else {
        batch_size
    };
    n.div_ceil(bs)
}

/// Train `task` on `train`, validating on `val`, in `run`.
pub fn fit<T: Supervised>(
    task: &T,
    train: &T::Data,
    val: &T::Data,
    run: &RunDir,
    opts: &FitOptions,
) -> Result<Fitted<T::Model>> {
    let cfg = opts.train;
    let device = opts
        .backend
        .device()
        .map_err(anyhow::Error::msg)?
        .autodiff();
    let eval_device = device.clone().inner();
    device.seed(opts.seed);
    let mut model = task.init_model(&device);
    let mut optim: ModuleOptimizer = cfg.optimizer.init();
    let mut state = LoopState {
        epoch: 0,
        history: Vec::new(),
        best_val_loss: f64::INFINITY,
        best_epoch: 0,
        epochs_without_improvement: 0,
        seed: opts.seed,
    };
    if opts.resume {
        if let Some((m, o, s)) = load_checkpoint(run, model.clone(), optim.clone())? {
            model = m;
            optim = o;
            state = s;
            eprintln!("resuming after epoch {} of {}", state.epoch, cfg.epochs);
        } else {
            eprintln!("no checkpoint yet; starting from epoch 1");
        }
    }

    let n_train = task.len(train);
    let n_val = task.len(val);
    if n_train == 0 {
        bail!("the training set is empty");
    }
    let batch_size = if cfg.batch_size == 0 {
        n_train
    } else {
        cfg.batch_size
    };
    let eval_batch = batch_size.max(256);
    let started = Instant::now();
    let mut trained_examples = 0usize;
    let mut stop = StopReason::Completed;
    if state.epoch >= cfg.epochs
        || (cfg.patience > 0 && state.epochs_without_improvement >= cfg.patience)
    {
        stop = if state.epoch >= cfg.epochs {
            StopReason::Completed
        } else {
            StopReason::EarlyStopped
        };
    }

    while stop == StopReason::Completed && state.epoch < cfg.epochs {
        let epoch = state.epoch + 1;
        device.seed(derive_seed(opts.seed, epoch, 1));
        crate::nn::seed_dropout(derive_seed(opts.seed, epoch, 3));
        let mut rng = StdRng::seed_from_u64(derive_seed(opts.seed, epoch, 2));
        let mut order: Vec<usize> = (0..n_train).collect();
        order.shuffle(&mut rng);

        let lr = learning_rate(cfg, epoch);
        let bar = progress(batches(n_train, cfg.batch_size) as u64, epoch, cfg.epochs);
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0i64, 0usize);
        let mut classifier = false;
        for (b, idx) in order.chunks(batch_size).enumerate() {
            let out = task.step(&model, train, idx, &device, Phase::Train, &mut rng);
            let loss = out.loss.clone().into_scalar::<f32>();
            if !loss.is_finite() {
                bar.abandon();
                let kept = kept_checkpoint(run, &state);
                write_curves(run, &state.history)?;
                return Err(Diverged {
                    epoch,
                    batch: b + 1,
                    loss,
                    kept,
                }
                .into());
            }
            if let Some(c) = out.correct {
                classifier = true;
                correct += c.into_scalar::<i64>();
            }
            loss_sum += loss as f64 * idx.len() as f64;
            seen += idx.len();
            let grads = GradientsParams::from_grads(out.loss.backward(), &model);
            model = optim.step(lr, model, grads);
            bar.inc(1);
        }
        bar.finish_and_clear();
        trained_examples += seen;

        let mut values = vec![("train_loss".to_string(), loss_sum / seen as f64)];
        if classifier {
            values.push(("train_accuracy".to_string(), correct as f64 / seen as f64));
        }
        if n_val > 0 {
            let (vl, vacc) = evaluate(
                task,
                &model.valid(),
                val,
                &eval_device,
                eval_batch,
                &mut rng,
            );
            values.push(("val_loss".to_string(), vl));
            if let Some(a) = vacc {
                values.push(("val_accuracy".to_string(), a));
            }
        }
        if let Some((name, v)) = values.iter().find(|(_, v)| !v.is_finite()) {
            // The last step left the weights non-finite: do not checkpoint them.
            let kept = kept_checkpoint(run, &state);
            write_curves(run, &state.history)?;
            let batch = batches(n_train, cfg.batch_size);
            eprintln!("{name} is {v} after epoch {epoch}");
            return Err(Diverged {
                epoch,
                batch,
                loss: *v as f32,
                kept,
            }
            .into());
        }
        let record = EpochRecord { epoch, values };
        let monitored = record.get("val_loss").unwrap_or(record.values[0].1);
        // Every epoch for short runs; about 50 lines for long ones (metrics.csv has them all).
        if cfg.epochs <= 100 || epoch.is_multiple_of(cfg.epochs.div_ceil(50)) || epoch == cfg.epochs
        {
            eprintln!("epoch {epoch}/{}  {}", cfg.epochs, fmt_values(&record));
        }
        if monitored < state.best_val_loss - cfg.min_delta {
            state.best_val_loss = monitored;
            state.best_epoch = epoch;
            state.epochs_without_improvement = 0;
        } else {
            state.epochs_without_improvement += 1;
        }
        state.history.push(record);
        state.epoch = epoch;
        save_checkpoint(run, &model, &optim, &state)?;
        run.write_metrics(&state.history)?;
        if cfg.patience > 0 && state.epochs_without_improvement >= cfg.patience {
            eprintln!(
                "early stopping: validation loss has not improved for {} epochs (best {:.6} at epoch {})",
                cfg.patience, state.best_val_loss, state.best_epoch
            );
            stop = StopReason::EarlyStopped;
        }
    }

    let seconds = started.elapsed().as_secs_f64();
    model.clone().save_file(run.file(MODEL_FILE)).map_err(|e| {
        anyhow::anyhow!("{}: cannot save model: {e}", run.file(MODEL_FILE).display())
    })?;
    run.write_metrics(&state.history)?;
    write_curves(run, &state.history)?;
    Ok(Fitted {
        model,
        history: state.history,
        stop,
        best_epoch: state.best_epoch,
        best_val_loss: state.best_val_loss,
        seconds,
        examples_per_second: if seconds > 0.0 {
            trained_examples as f64 / seconds
        } else {
            0.0
        },
    })
}

/// Mean loss (and accuracy, for classifiers) of `model` over all of `data`, without gradients.
pub fn evaluate<T: Supervised>(
    task: &T,
    model: &T::Model,
    data: &T::Data,
    device: &Device,
    batch_size: usize,
    rng: &mut StdRng,
) -> (f64, Option<f64>) {
    let n = task.len(data);
    let idx: Vec<usize> = (0..n).collect();
    let (mut loss_sum, mut correct, mut classifier) = (0f64, 0i64, false);
    for chunk in idx.chunks(batch_size.max(1)) {
        let out = task.step(model, data, chunk, device, Phase::Eval, rng);
        loss_sum += out.loss.into_scalar::<f32>() as f64 * chunk.len() as f64;
        if let Some(c) = out.correct {
            classifier = true;
            correct += c.into_scalar::<i64>();
        }
    }
    let n = n.max(1) as f64;
    (loss_sum / n, classifier.then(|| correct as f64 / n))
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

fn progress(len: u64, epoch: usize, epochs: usize) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "epoch {msg} [{bar:30}] {pos}/{len} batches {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("{epoch}/{epochs}"));
    bar
}

/// Loss curve (and accuracy curve for classifiers) from the history.
pub fn write_curves(run: &RunDir, history: &[EpochRecord]) -> Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    let series = |name: &'static str| Series {
        name,
        points: history
            .iter()
            .filter_map(|r| r.get(name).map(|v| (r.epoch as f64, v)))
            .collect(),
    };
    let keep = |s: &Series| !s.points.is_empty();
    let loss: Vec<Series> = [series("train_loss"), series("val_loss")]
        .into_iter()
        .filter(keep)
        .collect();
    line_chart(&run.file("loss.png"), "Loss", "epoch", "loss", &loss)?;
    let acc: Vec<Series> = [series("train_accuracy"), series("val_accuracy")]
        .into_iter()
        .filter(keep)
        .collect();
    if !acc.is_empty() {
        line_chart(
            &run.file("accuracy.png"),
            "Accuracy",
            "epoch",
            "accuracy",
            &acc,
        )?;
    }
    Ok(())
}

fn epoch_dir(run: &RunDir, epoch: usize) -> PathBuf {
    run.checkpoints().join(format!("epoch-{epoch:04}"))
}

/// Write `checkpoints/epoch-NNNN/` completely, then flip the `latest` pointer atomically,
/// then remove older epoch directories. A kill at any point leaves a loadable `latest`.
fn save_checkpoint<M: Module>(
    run: &RunDir,
    model: &M,
    optim: &ModuleOptimizer,
    state: &LoopState,
) -> Result<()> {
    let dir = epoch_dir(run, state.epoch);
    fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let err = |what: &str, e: burn::store::RecordError| {
        anyhow::anyhow!("{}: cannot save {what}: {e}", dir.display())
    };
    model
        .clone()
        .save_file(dir.join("model.bpk"))
        .map_err(|e| err("model", e))?;
    optim
        .save(dir.join("optimizer.bpk"))
        .map_err(|e| err("optimizer", e))?;
    write_atomic(
        &dir.join("state.json"),
        serde_json::to_string(state)?.as_bytes(),
    )?;
    write_atomic(
        &run.checkpoints().join(LATEST),
        dir.file_name().unwrap().to_string_lossy().as_bytes(),
    )?;
    for entry in fs::read_dir(run.checkpoints())?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let older = name
            .strip_prefix("epoch-")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n < state.epoch);
        if older {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

fn load_checkpoint<M: Module>(
    run: &RunDir,
    model: M,
    optim: ModuleOptimizer,
) -> Result<Option<(M, ModuleOptimizer, LoopState)>> {
    let latest = run.checkpoints().join(LATEST);
    if !latest.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&latest)
        .with_context(|| format!("{}: cannot read", latest.display()))?;
    let dir = run.checkpoints().join(name.trim());
    let state_path = dir.join("state.json");
    let state: LoopState = serde_json::from_str(
        &fs::read_to_string(&state_path)
            .with_context(|| format!("{}: cannot read checkpoint", state_path.display()))?,
    )
    .with_context(|| format!("{}: corrupt checkpoint state", state_path.display()))?;
    let model_path = dir.join("model.bpk");
    let model = model
        .try_load_file(&model_path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load checkpoint: {e}", model_path.display()))?;
    let optim_path = dir.join("optimizer.bpk");
    let optim = optim
        .load(&optim_path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load checkpoint: {e}", optim_path.display()))?;
    Ok(Some((model, optim, state)))
}

/// Load final weights from a finished run into a freshly built model.
pub fn load_model<M: Module>(run: &RunDir, model: M) -> Result<M> {
    let path = run.file(MODEL_FILE);
    if !path.is_file() {
        bail!(
            "{}: no trained model in this run (did training finish?)",
            path.display()
        );
    }
    model.try_load_file(&path).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a valid model checkpoint for this config: {e}",
            path.display()
        )
    })
}

/// Throughput of one model on one backend, measured on the real training step.
#[derive(Debug, Clone, Serialize)]
pub struct Benchmark {
    pub backend: String,
    pub batch_size: usize,
    pub batches: usize,
    pub train_examples_per_second: f64,
    pub inference_examples_per_second: f64,
    /// Seconds one epoch over `epoch_examples` takes at the measured training speed.
    pub epoch_seconds: f64,
    pub epoch_examples: usize,
    /// Peak resident memory of the process so far (Linux: VmHWM).
    pub peak_rss_bytes: Option<u64>,
}

/// Time `batches` training steps (forward, backward, optimizer update; after 2 warm-up steps)
/// and inference over the same examples.
pub fn benchmark<T: Supervised>(
    task: &T,
    data: &T::Data,
    cfg: &TrainConfig,
    backend: BackendName,
    seed: u64,
    batches: usize,
) -> Result<Benchmark> {
    let device = backend.device().map_err(anyhow::Error::msg)?.autodiff();
    device.seed(seed);
    crate::nn::seed_dropout(seed);
    let mut model = task.init_model(&device);
    let mut optim = cfg.optimizer.init();
    let n = task.len(data);
    let batch_size = if cfg.batch_size == 0 {
        n
    } else {
        cfg.batch_size
    }
    .min(n)
    .max(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let warmup = 2;
    let mut chunks = order.chunks(batch_size).cycle();
    let mut timed = 0usize;
    let mut started = Instant::now();
    for b in 0..warmup + batches {
        if b == warmup {
            device.sync().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            started = Instant::now();
        }
        let idx = chunks.next().unwrap_or(&[]);
        let out = task.step(&model, data, idx, &device, Phase::Train, &mut rng);
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = optim.step(cfg.learning_rate, model, grads);
        if b >= warmup {
            timed += idx.len();
        }
    }
    device.sync().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let train_rate = timed as f64 / started.elapsed().as_secs_f64();

    let eval_device = device.clone().inner();
    let valid = model.valid();
    let infer_n = timed.min(n).max(1);
    let idx: Vec<usize> = order[..infer_n].to_vec();
    let started = Instant::now();
    for chunk in idx.chunks(batch_size.max(256)) {
        let out = task.step(&valid, data, chunk, &eval_device, Phase::Eval, &mut rng);
        let _ = out.loss.into_scalar::<f32>();
    }
    let infer_rate = infer_n as f64 / started.elapsed().as_secs_f64();
    Ok(Benchmark {
        backend: backend.to_string(),
        batch_size,
        batches,
        train_examples_per_second: train_rate,
        inference_examples_per_second: infer_rate,
        epoch_seconds: n as f64 / train_rate,
        epoch_examples: n,
        peak_rss_bytes: peak_rss(),
    })
}

/// Peak resident set size of this process (Linux `VmHWM`), if known.
pub fn peak_rss() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_differ() {
        assert_ne!(derive_seed(1, 1, 1), derive_seed(1, 2, 1));
        assert_ne!(derive_seed(1, 1, 1), derive_seed(1, 1, 2));
        assert_eq!(derive_seed(7, 3, 1), derive_seed(7, 3, 1));
    }

    #[test]
    fn exponential_decay() {
        let cfg = TrainConfig {
            learning_rate: 0.1,
            lr_decay: 0.5,
            ..TrainConfig::default()
        };
        assert_eq!(learning_rate(&cfg, 1), 0.1);
        assert_eq!(learning_rate(&cfg, 3), 0.025);
        assert_eq!(learning_rate(&TrainConfig::default(), 9), 1e-3);
    }

    #[test]
    fn batch_count() {
        assert_eq!(batches(10, 3), 4);
        assert_eq!(batches(10, 0), 1);
    }
}
