//! Supervised learning on the engine ([`crate::engine`]): the loop every classifier and
//! regressor shares.
//!
//! Per epoch e: shuffle the training indices with a generator seeded by (seed, e); for each
//! mini-batch B compute the loss L_B(θ), its gradient by backpropagation, and let the
//! optimizer update θ; then evaluate the validation set without gradients. After every epoch
//! the model, the optimizer state and the loop state are checkpointed atomically, and
//! `metrics.csv` is rewritten from the checkpointed history.
//!
//! On several devices (`train.devices`), each batch is shared among replicas of the model
//! and their share-weighted gradients are summed before the one optimizer step, which is the
//! update of the whole batch on one device (see `one_step_on_devices` (built for tests)).
//!
//! Everything random is derived from the seed and the epoch number (shuffling, dropout,
//! augmentation), so a run resumed from the checkpoint of epoch e continues exactly as the
//! uninterrupted run would have.

use std::fs;
use std::time::Instant;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams};
use burn::tensor::{Device, Int, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use serde::Serialize;

use crate::backend::BackendName;
use crate::config::TrainConfig;
use crate::engine::checkpoint::{Checkpoint, CheckpointReader};
use crate::engine::{self, EngineOptions, Metrics, Monitor, Outcome, Routine, UnitContext};
use crate::run::{MODEL_FILE, RunDir};

pub use crate::engine::{Diverged, StopReason, write_curves};

/// What one forward pass over a batch gives the loop.
pub struct StepOutput {
    /// Mean loss over the batch, shape `[1]`.
    pub loss: Tensor<1>,
    /// For classifiers: how many predictions in the batch were right, shape `[1]`.
    pub correct: Option<Tensor<1, Int>>,
    /// Further batch means to report beside the loss (a VAE's `bce` and `kl`), shape `[1]`
    /// each; `metrics.csv` gets `train_<name>` and `val_<name>`.
    pub extra: Vec<(&'static str, Tensor<1>)>,
}

impl StepOutput {
    /// A batch loss and nothing else.
    pub fn loss(loss: Tensor<1>) -> Self {
        StepOutput {
            loss,
            correct: None,
            extra: Vec::new(),
        }
    }
}

/// Sums over a pass of batch outputs, each weighted by its batch's size.
#[derive(Default)]
struct Tally {
    loss: f64,
    correct: i64,
    classifier: bool,
    extra: Vec<(&'static str, f64)>,
    seen: usize,
}

impl Tally {
    /// Add a batch of `n` examples whose mean loss is `loss`.
    fn add(
        &mut self,
        loss: f32,
        correct: Option<Tensor<1, Int>>,
        extra: Vec<(&'static str, Tensor<1>)>,
        n: usize,
    ) {
        self.loss += loss as f64 * n as f64;
        if let Some(c) = correct {
            self.classifier = true;
            self.correct += c.into_scalar::<i64>();
        }
        for (i, (name, v)) in extra.into_iter().enumerate() {
            let v = v.into_scalar::<f32>() as f64 * n as f64;
            match self.extra.get_mut(i) {
                Some(slot) => slot.1 += v,
                None => self.extra.push((name, v)),
            }
        }
        self.seen += n;
    }

    /// `<prefix>loss`, `<prefix>accuracy` (classifiers), `<prefix><extra>`: means per example.
    fn metrics(&self, prefix: &str) -> Metrics {
        let n = self.seen.max(1) as f64;
        let mut out = vec![(format!("{prefix}loss"), self.loss / n)];
        if self.classifier {
            out.push((format!("{prefix}accuracy"), self.correct as f64 / n));
        }
        out.extend(
            self.extra
                .iter()
                .map(|(k, v)| (format!("{prefix}{k}"), v / n)),
        );
        out
    }
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
///
/// ```
/// use burn::nn::loss::{MseLoss, Reduction};
/// use burn::nn::{Linear, LinearConfig};
/// use burn::tensor::{Device, Tensor, TensorData};
/// use kiln_core::train::{FitOptions, Phase, StepOutput, Supervised, fit};
/// use kiln_core::{BackendName, RunDir, TrainConfig};
///
/// /// Fit y = 2x − 1 from eight points: one linear unit, MSE.
/// struct Line;
///
/// impl Supervised for Line {
///     type Model = Linear;
///     type Data = [(f32, f32)];
///     fn init_model(&self, device: &Device) -> Linear {
///         LinearConfig::new(1, 1).init(device)
///     }
///     fn len(&self, data: &[(f32, f32)]) -> usize {
///         data.len()
///     }
///     fn step(&self, model: &Linear, data: &[(f32, f32)], idx: &[usize], device: &Device,
///             _phase: Phase, _rng: &mut rand::rngs::StdRng) -> StepOutput {
///         let column = |f: fn(&(f32, f32)) -> f32| {
///             let v: Vec<f32> = idx.iter().map(|&i| f(&data[i])).collect();
///             Tensor::<2>::from_data(TensorData::new(v, [idx.len(), 1]), device)
///         };
///         let pred = model.forward(column(|p| p.0));
///         StepOutput::loss(MseLoss::new().forward(pred, column(|p| p.1), Reduction::Mean))
///     }
/// }
///
/// let data: Vec<(f32, f32)> = (0..8).map(|i| (i as f32 / 4.0, i as f32 / 2.0 - 1.0)).collect();
/// let dir = tempfile::tempdir()?;
/// let run = RunDir::create(&dir.path().join("line"))?;
/// let train = TrainConfig { epochs: 200, batch_size: 4, learning_rate: 0.05, ..TrainConfig::default() };
/// let opts = FitOptions { train: &train, seed: 1, backend: BackendName::default(), resume: false };
/// let fitted = fit(&Line, &data[..], &[][..], &run, &opts)?;
/// let last = fitted.history.last().unwrap().get("train_loss").unwrap();
/// assert!(last < 1e-3, "MSE after 200 epochs: {last}");
/// assert!(run.file("metrics.csv").is_file() && run.file("loss.png").is_file());
/// # anyhow::Ok(())
/// ```
pub trait Supervised {
    type Model: Module;
    /// The examples, in whatever form the model batches them from (tensors are built per batch).
    type Data: ?Sized;

    /// A freshly initialised network on `device`.
    fn init_model(&self, device: &Device) -> Self::Model;
    /// After each epoch's checkpoint, with the model on the inference device: pictures
    /// (reconstructions, samples), returned as (tag, PNG path) for TensorBoard. Default:
    /// nothing.
    fn after_epoch(
        &self,
        model: &Self::Model,
        epoch: usize,
        run: &RunDir,
        device: &Device,
    ) -> Result<Vec<(String, std::path::PathBuf)>> {
        let _ = (model, epoch, run, device);
        Ok(Vec::new())
    }
    /// Number of examples in `data`.
    fn len(&self, data: &Self::Data) -> usize;
    /// What the loss is, for the loss curve's axis (`cross-entropy`). Default: unnamed.
    fn loss_name(&self) -> Option<String> {
        None
    }
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

/// What `fit` returns: the trained model (final weights) and how the engine's run went.
pub struct Fitted<M> {
    pub model: M,
    pub outcome: Outcome,
}

impl<M> std::ops::Deref for Fitted<M> {
    type Target = Outcome;
    fn deref(&self) -> &Outcome {
        &self.outcome
    }
}

fn batches(n: usize, batch_size: usize) -> usize {
    n.div_ceil(effective_batch(n, batch_size))
}

/// The gradient of one batch: from one device, or one per device (data parallel).
enum BatchGradients {
    One(GradientsParams),
    Many(MultiGradientsParams),
}

/// `idx` dealt into `n` contiguous shares whose sizes differ by at most one (empty shares
/// when the batch is smaller than `n`).
fn shares(idx: &[usize], n: usize) -> impl Iterator<Item = &[usize]> {
    (0..n).map(move |k| &idx[k * idx.len() / n..(k + 1) * idx.len() / n])
}

/// Forward and backward of the batch `idx` on `devices` (their autodiff form; the first
/// holds `model`).
///
/// One device: ∇L_B(θ) of the batch. Several (data parallel): device k gets a replica of θ
/// and the share B_k of the batch, and differentiates its mean loss weighted by its share,
/// (|B_k|/|B|)·L_{B_k}(θ); summed over the devices these gradients are exactly the
/// full-batch gradient ∇L_B(θ) = Σ_k (|B_k|/|B|)·∇L_{B_k}(θ) of a loss that is a mean over
/// examples, so the update does not depend on how many devices share the batch. Every
/// replica's work is queued before any result is read back, so GPUs compute side by side.
///
/// Batch norm, as in PyTorch's `DistributedDataParallel`: each replica normalises with its
/// own share's statistics, and the running averages are those of the first device's
/// replica — `model` itself. The other replicas get their own copies of the running states
/// (`valid().train()` rebuilds them; a plain clone would share them, and a fork onto another
/// device would move the shared tensors under the first replica's feet).
///
/// Returns each share's size and outputs (their `loss` unweighted), and the gradients.
fn batch_gradients<T: Supervised>(
    task: &T,
    model: &T::Model,
    data: &T::Data,
    idx: &[usize],
    devices: &[Device],
    rng: &mut StdRng,
) -> (Vec<(usize, StepOutput)>, BatchGradients) {
    if devices.len() <= 1 {
        let device = &devices[0];
        let out = task.step(model, data, idx, device, Phase::Train, rng);
        let grads = GradientsParams::from_grads(out.loss.clone().backward(), model);
        return (vec![(idx.len(), out)], BatchGradients::One(grads));
    }
    let mut outputs = Vec::with_capacity(devices.len());
    let mut grads = MultiGradientsParams::default();
    for (k, (device, share)) in devices.iter().zip(shares(idx, devices.len())).enumerate() {
        if share.is_empty() {
            continue;
        }
        let weight = share.len() as f64 / idx.len() as f64;
        let (out, g) = if k == 0 {
            let out = task.step(model, data, share, device, Phase::Train, rng);
            let g = GradientsParams::from_grads((out.loss.clone() * weight).backward(), model);
            (out, g)
        } else {
            let replica = model.valid().train().fork(device);
            let out = task.step(&replica, data, share, device, Phase::Train, rng);
            let g = GradientsParams::from_grads((out.loss.clone() * weight).backward(), &replica);
            (out, g)
        };
        grads.grads.push((g, device.clone()));
        outputs.push((share.len(), out));
    }
    (outputs, BatchGradients::Many(grads))
}

/// The batch loss from its shares' mean losses: Σ_k |B_k|·L_k / |B| (one share: its loss,
/// exactly — an f32 times and divided by a count is exact in f64).
fn batch_loss(shares: impl IntoIterator<Item = (usize, f32)>, batch: usize) -> f32 {
    let sum: f64 = shares.into_iter().map(|(n, l)| n as f64 * l as f64).sum();
    (sum / batch as f64) as f32
}

/// The optimizer's step θ ← opt(θ, g) with the gradients of [`batch_gradients`]; after a
/// data-parallel step the updated parameters are gathered back onto `main`.
fn apply_gradients<M: Module>(
    optim: &mut ModuleOptimizer,
    lr: f64,
    model: M,
    grads: BatchGradients,
    main: &Device,
) -> M {
    match grads {
        BatchGradients::One(g) => optim.step(lr, model, g),
        BatchGradients::Many(g) => optim.step_multi(lr, model, g).fork(main),
    }
}

#[cfg(any(test, feature = "testing"))]
/// What one training step left behind: the batch loss and every float parameter tensor
/// (flattened, in the module's visiting order) after the update (see [`one_step_on`]).
#[derive(Debug, Clone)]
pub struct StepResult {
    pub loss: f32,
    pub parameters: Vec<Vec<f32>>,
}

#[cfg(any(test, feature = "testing"))]
/// One plain gradient-descent step of `task` on the batch `idx`, from `model`'s weights copied
/// to `device` (autodiff is added): w ← w − η ∇L(w). Returns the batch loss before the step
/// and the weights after it. Run on two devices from the same `model`, the results must agree
/// (the GPU parity tests): plain SGD rather than Adam because Adam's first step is
/// ≈ η·sign(g), which turns a rounding difference in a near-zero gradient into a full step.
pub fn one_step_on<T: Supervised>(
    task: &T,
    model: &T::Model,
    data: &T::Data,
    idx: &[usize],
    device: &Device,
    learning_rate: f64,
    seed: u64,
) -> StepResult {
    one_step_on_devices(
        task,
        model,
        data,
        idx,
        std::slice::from_ref(device),
        learning_rate,
        seed,
    )
}

#[cfg(any(test, feature = "testing"))]
/// [`one_step_on`] data parallel over `devices` (the first holds the model), as training
/// with `train.devices` steps: the batch dealt into one share per device, the gradients
/// summed. The same update as on one device with the whole batch, to rounding, for a model
/// without batch statistics (the data-parallel tests).
pub fn one_step_on_devices<T: Supervised>(
    task: &T,
    model: &T::Model,
    data: &T::Data,
    idx: &[usize],
    devices: &[Device],
    learning_rate: f64,
    seed: u64,
) -> StepResult {
    // Reading every parameter initialises any lazy one where `model` lives, so the copy
    // carries those values instead of initialising afresh on the device.
    let _ = crate::nn::parameter_tensors(model);
    let devices: Vec<Device> = devices.iter().map(|d| d.clone().autodiff()).collect();
    let main = &devices[0];
    // A fresh module loaded from `model`'s record, not a clone: clones share their running
    // states (batch norm's averages), so one device's update would leak into the other's.
    let model = task
        .init_model(main)
        .load_record(model.clone().into_record())
        .fork(main);
    crate::nn::seed_dropout(seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let (outputs, grads) = batch_gradients(task, &model, data, idx, &devices, &mut rng);
    let loss = batch_loss(
        outputs
            .into_iter()
            .map(|(n, out)| (n, out.loss.into_scalar::<f32>())),
        idx.len(),
    );
    let mut sgd: ModuleOptimizer = burn::optim::SgdConfig::new().init();
    let model = apply_gradients(&mut sgd, learning_rate, model, grads, main);
    StepResult {
        loss,
        // `valid` folds the step's pending running-state updates in before they are read.
        parameters: crate::nn::parameter_tensors(&model.valid()),
    }
}

#[cfg(any(test, feature = "testing"))]
/// Whether two steps agree to `rel`: |Δloss| ≤ rel·|loss|, and for every parameter tensor
/// max|a − b| ≤ rel·max|a| (the error relative to the tensor's scale, so a weight that is
/// nearly zero is not asked for more digits than its neighbours carry). The first
/// disagreement, or `Ok`.
pub fn steps_agree(a: &StepResult, b: &StepResult, rel: f32) -> Result<(), String> {
    if (a.loss - b.loss).abs() > rel * a.loss.abs().max(b.loss.abs()) {
        return Err(format!("loss {} vs {}", a.loss, b.loss));
    }
    if a.parameters.len() != b.parameters.len() {
        return Err(format!(
            "{} vs {} parameter tensors",
            a.parameters.len(),
            b.parameters.len()
        ));
    }
    for (t, (x, y)) in a.parameters.iter().zip(&b.parameters).enumerate() {
        if x.len() != y.len() {
            return Err(format!("tensor {t}: {} vs {} values", x.len(), y.len()));
        }
        let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let (i, diff) = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .enumerate()
            .fold(
                (0, 0.0f32),
                |best, (i, d)| if d > best.1 { (i, d) } else { best },
            );
        if diff > rel * scale {
            return Err(format!(
                "tensor {t}, value {i}: {} vs {} (largest |value| {scale})",
                x[i], y[i]
            ));
        }
    }
    Ok(())
}

/// `train.batch_size`, where `0` means the whole set in one batch (full-batch descent).
pub fn effective_batch(n: usize, batch_size: usize) -> usize {
    if batch_size == 0 {
        n.max(1)
    } else {
        batch_size
    }
}

/// The engine options `[train]` gives: epochs, early stopping, its monitor and threshold, the
/// time budget.
pub fn engine_options(cfg: &TrainConfig, seed: u64, resume: bool) -> EngineOptions {
    let mut opts = EngineOptions::new(cfg.epochs, seed);
    opts.patience = cfg.patience;
    opts.min_delta = cfg.min_delta;
    opts.resume = resume;
    opts.max_seconds = cfg.max_minutes.map(|m| m * 60.0);
    opts.stop_at = cfg.stop_at;
    opts.monitor = cfg.monitor.as_ref().map(|metric| Monitor {
        metric: metric.clone(),
        mode: cfg.mode,
    });
    opts.schedule = cfg.effective_schedule();
    opts.tensorboard = cfg.tensorboard;
    opts
}

/// Supervised learning as an engine routine: per epoch, one shuffled pass of mini-batch
/// steps θ ← opt(θ, ∇L_B(θ)) over the training set, then the validation set without gradients.
struct SupervisedRoutine<'a, T: Supervised> {
    task: &'a T,
    train: &'a T::Data,
    val: &'a T::Data,
    cfg: &'a TrainConfig,
    /// The training devices (autodiff); the first holds the model, more than one trains data
    /// parallel.
    devices: Vec<Device>,
    eval_device: Device,
    /// Always `Some` between calls (taken while the optimizer consumes and returns it).
    model: Option<T::Model>,
    optim: ModuleOptimizer,
    n_train: usize,
    batch_size: usize,
}

impl<T: Supervised> SupervisedRoutine<'_, T> {
    fn model(&self) -> &T::Model {
        self.model.as_ref().expect("model present between steps")
    }
}

impl<T: Supervised> Routine for SupervisedRoutine<'_, T> {
    fn unit_len(&self) -> u64 {
        batches(self.n_train, self.cfg.batch_size) as u64
    }

    fn optimizers(&self) -> Vec<(&'static str, f64)> {
        vec![("model", self.cfg.learning_rate)]
    }

    fn loss_name(&self) -> Option<String> {
        self.task.loss_name()
    }

    /// `val_loss`, or `train_loss` without a validation set.
    fn monitor(&self) -> Option<Monitor> {
        Some(if self.task.len(self.val) > 0 {
            Monitor::min("val_loss")
        } else {
            Monitor::min("train_loss")
        })
    }

    fn train_unit(&mut self, epoch: usize, ctx: &mut UnitContext) -> Result<Metrics> {
        let mut order: Vec<usize> = (0..self.n_train).collect();
        order.shuffle(&mut ctx.rng);
        let _ = epoch;
        let lr = ctx.lr("model");
        let mut tally = Tally::default();
        for idx in order.chunks(self.batch_size) {
            if ctx.time_up() && tally.seen > 0 {
                break;
            }
            let model = self.model.take().expect("model present between steps");
            let (outputs, grads) = batch_gradients(
                self.task,
                &model,
                self.train,
                idx,
                &self.devices,
                &mut ctx.rng,
            );
            let outputs: Vec<_> = outputs
                .into_iter()
                .map(|(n, out)| (n, out.loss.into_scalar::<f32>(), out.correct, out.extra))
                .collect();
            let loss = batch_loss(outputs.iter().map(|(n, l, ..)| (*n, *l)), idx.len());
            if let Err(e) = ctx.batch(loss) {
                self.model = Some(model);
                return Err(e.into());
            }
            for (n, loss, correct, extra) in outputs {
                tally.add(loss, correct, extra, n);
            }
            self.model = Some(apply_gradients(
                &mut self.optim,
                lr,
                model,
                grads,
                &self.devices[0],
            ));
        }
        ctx.examples(tally.seen);
        Ok(tally.metrics("train_"))
    }

    fn validate(&mut self, _epoch: usize, rng: &mut StdRng) -> Result<Metrics> {
        if self.task.len(self.val) == 0 {
            return Ok(Vec::new());
        }
        Ok(evaluate(
            self.task,
            &self.model().valid(),
            self.val,
            &self.eval_device,
            self.batch_size.max(256),
            rng,
        )
        .into_iter()
        .map(|(k, v)| (format!("val_{k}"), v))
        .collect())
    }

    fn after_unit(
        &mut self,
        epoch: usize,
        run: &RunDir,
    ) -> Result<Vec<(String, std::path::PathBuf)>> {
        self.task
            .after_epoch(&self.model().valid(), epoch, run, &self.eval_device)
    }

    fn save(&self, ckpt: &mut Checkpoint) -> Result<()> {
        ckpt.module("model", self.model())?;
        ckpt.optimizer("optimizer", &self.optim)
    }

    fn load(&mut self, ckpt: &CheckpointReader) -> Result<()> {
        let model = self.model.take().expect("model present between steps");
        self.model = Some(ckpt.module("model", model)?);
        self.optim = ckpt.optimizer("optimizer", self.optim.clone())?;
        Ok(())
    }
}

/// Train `task` on `train`, validating on `val`, in `run` (the supervised client of
/// [`engine::run`]).
pub fn fit<T: Supervised>(
    task: &T,
    train: &T::Data,
    val: &T::Data,
    run: &RunDir,
    opts: &FitOptions,
) -> Result<Fitted<T::Model>> {
    let devices = opts
        .backend
        .devices(&opts.train.devices)
        .map_err(anyhow::Error::msg)?;
    fit_on(task, train, val, run, opts, &devices)
}

/// [`fit`] on the given devices rather than those `train.devices` names: the first holds
/// the model and validates; with more than one, every batch is shared among them (data
/// parallel, see `one_step_on_devices`).
pub fn fit_on<T: Supervised>(
    task: &T,
    train: &T::Data,
    val: &T::Data,
    run: &RunDir,
    opts: &FitOptions,
    devices: &[Device],
) -> Result<Fitted<T::Model>> {
    let cfg = opts.train;
    if devices.is_empty() {
        bail!("no device to train on");
    }
    let devices: Vec<Device> = devices.iter().map(|d| d.clone().autodiff()).collect();
    let device = devices[0].clone();
    device.seed(opts.seed);
    let n_train = task.len(train);
    if n_train == 0 {
        bail!("the training set is empty");
    }
    let mut routine = SupervisedRoutine {
        task,
        train,
        val,
        cfg,
        model: Some(task.init_model(&device)),
        eval_device: device.clone().inner(),
        devices,
        optim: cfg.optimizer.init(),
        n_train,
        batch_size: effective_batch(n_train, cfg.batch_size),
    };
    let outcome = engine::run(
        &mut routine,
        run,
        &engine_options(cfg, opts.seed, opts.resume),
        Some(&device),
    )?;
    let model = routine.model.take().expect("model present after training");
    save_weights(&model, &run.file(MODEL_FILE))?;
    Ok(Fitted { model, outcome })
}

/// Mean loss (`loss`), accuracy for classifiers (`accuracy`) and the step's extra values of
/// `model` over all of `data`, without gradients.
pub fn evaluate<T: Supervised>(
    task: &T,
    model: &T::Model,
    data: &T::Data,
    device: &Device,
    batch_size: usize,
    rng: &mut StdRng,
) -> Metrics {
    let n = task.len(data);
    let idx: Vec<usize> = (0..n).collect();
    let mut tally = Tally::default();
    for chunk in idx.chunks(batch_size.max(1)) {
        let out = task.step(model, data, chunk, device, Phase::Eval, rng);
        let loss = out.loss.into_scalar::<f32>();
        tally.add(loss, out.correct, out.extra, chunk.len());
    }
    tally.metrics("")
}

/// SHA-256 over every parameter and buffer of a module, in the module's own order: each
/// tensor's shape, then its values as little-endian bytes (see [`save_weights`]).
struct WeightsDigest(sha2::Sha256);

impl WeightsDigest {
    fn add(&mut self, shape: &[usize], data: burn::tensor::TensorData) {
        use sha2::Digest as _;
        for d in shape {
            self.0.update((*d as u64).to_le_bytes());
        }
        self.0.update(data.as_bytes());
    }
}

impl burn::module::ModuleVisitor for WeightsDigest {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        let t = param.val();
        self.add(&t.dims(), t.into_data());
    }
    fn visit_int<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D, Int>>) {
        let t = param.val();
        self.add(&t.dims(), t.into_data());
    }
}

/// The file beside `model.bpk` that holds the SHA-256 of the weights' values.
pub const WEIGHTS_DIGEST_FILE: &str = "model.sha256";

/// Save a run's final weights to `path`, and beside it (`model.sha256`) the SHA-256 of their
/// values. Burn records a random id for every parameter and running statistic, drawn anew in
/// every process, so two files of the same weights differ in those bytes; the digest does
/// not: an interrupted and resumed run has the digest of the uninterrupted one.
pub fn save_weights<M: Module>(module: &M, path: &std::path::Path) -> Result<()> {
    use sha2::Digest as _;
    module
        .clone()
        .save_file(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot save model: {e}", path.display()))?;
    let mut digest = WeightsDigest(sha2::Sha256::new());
    module.visit(&mut digest);
    let hex: String = digest
        .0
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    crate::run::write_atomic(
        &path.with_file_name(WEIGHTS_DIGEST_FILE),
        format!("{hex}\n").as_bytes(),
    )
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
    /// What an example is in the printed rates (`images`, `characters`, `windows`).
    pub unit: String,
    /// Further measured lines the table has no column for (sampling speed).
    pub notes: Vec<String>,
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

/// What [`time_training`] measured.
pub struct Timed {
    /// Examples in the timed steps.
    pub examples: usize,
    pub per_second: f64,
    /// The shuffled example order the batches were cut from.
    pub order: Vec<usize>,
}

/// Time `batches` training steps over batches cut from a shuffled order of `0..n` (cycled),
/// after 2 warm-up steps, the device synchronised before and after the timed ones. `step`
/// trains on one batch of example indices.
pub fn time_training(
    device: &Device,
    n: usize,
    batch_size: usize,
    batches: usize,
    rng: &mut StdRng,
    mut step: impl FnMut(&[usize], &mut StdRng),
) -> Result<Timed> {
    let sync = || device.sync().map_err(|e| anyhow::anyhow!("{e:?}"));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let warmup = 2;
    let mut chunks = order.chunks(batch_size.max(1)).cycle();
    let (mut examples, mut started) = (0usize, Instant::now());
    for b in 0..warmup + batches {
        if b == warmup {
            sync()?;
            started = Instant::now();
        }
        let idx = chunks.next().unwrap_or(&[]);
        step(idx, rng);
        if b >= warmup {
            examples += idx.len();
        }
    }
    sync()?;
    let per_second = examples as f64 / started.elapsed().as_secs_f64();
    Ok(Timed {
        examples,
        per_second,
        order,
    })
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
    let mut model = Some(task.init_model(&device));
    let mut optim = cfg.optimizer.init();
    let n = task.len(data);
    let batch_size = effective_batch(n, cfg.batch_size).min(n).max(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let timed = time_training(&device, n, batch_size, batches, &mut rng, |idx, rng| {
        let m = model.take().expect("model");
        let out = task.step(&m, data, idx, &device, Phase::Train, rng);
        let grads = GradientsParams::from_grads(out.loss.backward(), &m);
        model = Some(optim.step(cfg.learning_rate, m, grads));
    })?;
    let (model, order) = (model.expect("model"), timed.order);
    let (timed, train_rate) = (timed.examples, timed.per_second);

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
        unit: "images".into(),
        notes: Vec::new(),
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

    /// `lr_decay` is the exponential schedule: η·γ^(e−1).
    #[test]
    fn lr_decay_is_the_exponential_schedule() {
        let cfg = TrainConfig {
            learning_rate: 0.1,
            lr_decay: 0.5,
            ..TrainConfig::default()
        };
        let s = cfg.effective_schedule();
        assert_eq!(0.1 * s.factor(1, 10, &[]), 0.1);
        assert_eq!(0.1 * s.factor(3, 10, &[]), 0.025);
        assert!(TrainConfig::default().effective_schedule().is_constant());
    }

    /// y = w·x + b under MSE: the data are the pairs (x, y).
    struct Line;

    impl Supervised for Line {
        type Model = burn::nn::Linear;
        type Data = [(f32, f32)];
        fn init_model(&self, device: &Device) -> burn::nn::Linear {
            burn::nn::LinearConfig::new(1, 1).init(device)
        }
        fn len(&self, data: &[(f32, f32)]) -> usize {
            data.len()
        }
        fn step(
            &self,
            model: &burn::nn::Linear,
            data: &[(f32, f32)],
            idx: &[usize],
            device: &Device,
            _phase: Phase,
            _rng: &mut StdRng,
        ) -> StepOutput {
            let column = |f: fn(&(f32, f32)) -> f32| {
                let v: Vec<f32> = idx.iter().map(|&i| f(&data[i])).collect();
                Tensor::<2>::from_data(burn::tensor::TensorData::new(v, [idx.len(), 1]), device)
            };
            let err = model.forward(column(|p| p.0)) - column(|p| p.1);
            StepOutput::loss(err.powi_scalar(2).mean())
        }
    }

    /// One SGD step is the hand-computed one, ∂L/∂w = (2/n) Σ (w·xᵢ + b − yᵢ)·xᵢ and
    /// ∂L/∂b = (2/n) Σ (w·xᵢ + b − yᵢ), and it is the same on flex and on ndarray.
    #[test]
    fn one_step_is_gradient_descent_on_every_cpu_backend() {
        let data = [(1.0f32, 1.0f32), (2.0, 3.0), (-1.0, -3.0)];
        let flex = Device::flex().autodiff();
        let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
        flex.seed(3);
        let model = Line.init_model(&flex);
        let w0 = crate::nn::parameter_tensors(&model); // [[w], [b]]
        let (w, b) = (w0[0][0], w0[1][0]);
        let n = data.len() as f32;
        let loss: f32 = data
            .iter()
            .map(|(x, y)| (w * x + b - y).powi(2))
            .sum::<f32>()
            / n;
        let gw: f32 = data
            .iter()
            .map(|(x, y)| 2.0 * (w * x + b - y) * x)
            .sum::<f32>()
            / n;
        let gb: f32 = data.iter().map(|(x, y)| 2.0 * (w * x + b - y)).sum::<f32>() / n;
        let lr = 0.1;
        let on_flex = one_step_on(&Line, &model, &data, &[0, 1, 2], &Device::flex(), lr, 1);
        let hand = StepResult {
            loss,
            parameters: vec![vec![w - 0.1 * gw], vec![b - 0.1 * gb]],
        };
        steps_agree(&on_flex, &hand, 1e-5).unwrap();
        #[allow(deprecated)]
        let on_ndarray = one_step_on(&Line, &model, &data, &[0, 1, 2], &Device::ndarray(), lr, 1);
        steps_agree(&on_flex, &on_ndarray, 1e-6).unwrap();
        // A step that did not move is caught.
        let unmoved = StepResult {
            loss,
            parameters: w0,
        };
        assert!(steps_agree(&on_flex, &unmoved, 1e-4).is_err());
    }

    /// Data parallel: the batch dealt over two (or three) replicas gives the update of the
    /// whole batch on one device, shares of unequal size (3 + 2) and an empty one (2 points
    /// over 3 replicas) included. On the CPU backends the replicas share the one device;
    /// the GPU crates repeat this across distinct wgpu devices.
    #[test]
    fn data_parallel_step_is_the_whole_batch_step() {
        let data = [
            (1.0f32, 1.0f32),
            (2.0, 3.0),
            (-1.0, -3.0),
            (0.5, 0.2),
            (3.0, 4.5),
        ];
        let flex = Device::flex();
        let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
        flex.clone().autodiff().seed(5);
        let model = Line.init_model(&flex.clone().autodiff());
        let all = [0, 1, 2, 3, 4];
        let one = one_step_on(&Line, &model, &data, &all, &flex, 0.1, 1);
        let two = one_step_on_devices(
            &Line,
            &model,
            &data,
            &all,
            &[flex.clone(), flex.clone()],
            0.1,
            1,
        );
        steps_agree(&one, &two, 1e-5).unwrap();
        let pair = one_step_on(&Line, &model, &data, &[3, 4], &flex, 0.1, 1);
        let three = one_step_on_devices(
            &Line,
            &model,
            &data,
            &[3, 4],
            &[flex.clone(), flex.clone(), flex.clone()],
            0.1,
            1,
        );
        steps_agree(&pair, &three, 1e-5).unwrap();
        let hand = StepResult {
            loss: one.loss,
            parameters: parameter_tensors_after(&model, |w, g| w - 0.1 * g, &data, &all),
        };
        steps_agree(&two, &hand, 1e-5).unwrap();
        // Summing the shares' mean gradients without their weights would double the step.
        let unweighted = StepResult {
            loss: one.loss,
            parameters: parameter_tensors_after(&model, |w, g| w - 0.2 * g, &data, &all),
        };
        assert!(steps_agree(&one, &unweighted, 1e-3).is_err());
    }

    /// The parameters after w ← f(w, ∂L/∂w) for `Line` on `idx`, by hand.
    fn parameter_tensors_after(
        model: &burn::nn::Linear,
        f: impl Fn(f32, f32) -> f32,
        data: &[(f32, f32)],
        idx: &[usize],
    ) -> Vec<Vec<f32>> {
        let p = crate::nn::parameter_tensors(model);
        let (w, b) = (p[0][0], p[1][0]);
        let n = idx.len() as f32;
        let r = |i: usize| w * data[i].0 + b - data[i].1;
        let gw: f32 = idx.iter().map(|&i| 2.0 * r(i) * data[i].0).sum::<f32>() / n;
        let gb: f32 = idx.iter().map(|&i| 2.0 * r(i)).sum::<f32>() / n;
        vec![vec![f(w, gw)], vec![f(b, gb)]]
    }

    /// Training data parallel through `fit_on`, the whole loop (shared steps, the gathered
    /// update, validation, checkpoints): the same curve as on one device.
    #[test]
    fn fit_on_two_replicas_follows_one_device() {
        fit_two_ways(&Device::flex(), &Device::flex(), 1e-5);
    }

    /// The same across two distinct wgpu devices (on lavapipe: two devices of one adapter).
    #[cfg(feature = "wgpu")]
    #[test]
    fn fit_on_two_wgpu_devices_follows_one() {
        use burn::tensor::DeviceKind;
        let first = BackendName::Wgpu.device().unwrap();
        let second = Device::wgpu(DeviceKind::Cpu);
        assert_ne!(first, second);
        fit_two_ways(&first, &second, 1e-4);
    }

    /// Tests that seed a device's generator and then draw weights from it hold this, so a
    /// test running in parallel cannot draw in between.
    static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn fit_two_ways(first: &Device, second: &Device, rel: f64) {
        let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
        let data: Vec<(f32, f32)> = (0..40)
            .map(|i| (i as f32 / 20.0 - 1.0, 0.7 * (i as f32 / 20.0 - 1.0) + 0.3))
            .collect();
        let train = TrainConfig {
            epochs: 4,
            batch_size: 8,
            learning_rate: 0.1,
            ..TrainConfig::default()
        };
        let opts = FitOptions {
            train: &train,
            seed: 3,
            backend: BackendName::default(),
            resume: false,
        };
        let dir = tempfile::tempdir().unwrap();
        let losses = |name: &str, devices: &[Device]| -> Vec<f64> {
            let run = RunDir::create(&dir.path().join(name)).unwrap();
            let fitted = fit_on(&Line, &data[..30], &data[30..], &run, &opts, devices).unwrap();
            assert!(run.file("metrics.csv").is_file());
            fitted
                .history
                .iter()
                .flat_map(|r| [r.get("train_loss").unwrap(), r.get("val_loss").unwrap()])
                .collect()
        };
        let one = losses("one", std::slice::from_ref(first));
        let two = losses("two", &[first.clone(), second.clone()]);
        assert!(one[6] < 0.1 * one[0], "it learns: {one:?}");
        for (a, b) in one.iter().zip(&two) {
            assert!((a - b).abs() <= rel * a.abs(), "{one:?}\n{two:?}");
        }
    }

    #[test]
    fn shares_differ_by_at_most_one() {
        let idx: Vec<usize> = (10..17).collect();
        let got: Vec<&[usize]> = shares(&idx, 3).collect();
        assert_eq!(got, [&[10, 11][..], &[12, 13][..], &[14, 15, 16][..]]);
        let got: Vec<usize> = shares(&idx[..2], 3).map(|s| s.len()).collect();
        assert_eq!(got, [0, 1, 1]);
    }

    #[test]
    fn batch_count() {
        assert_eq!(batches(10, 3), 4);
        assert_eq!(batches(10, 0), 1);
    }
}
