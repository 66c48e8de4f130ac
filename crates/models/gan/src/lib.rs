//! Generative adversarial network (course deck 3): a generator G learns to turn noise into
//! images by fooling a discriminator D that learns to tell real images from G's.
//!
//! Per batch of m real images x and noise z (labels y_real = 1 − s with label smoothing s):
//!
//! 1. discriminator step, G fixed:
//!    L_D = −1/m Σ [y_real·log D(x) + (1 − y_real)·log(1 − D(x))] − 1/m Σ log(1 − D(G(z)));
//! 2. generator step, D fixed, with fresh noise z′ (the non-saturating loss of Goodfellow et
//!    al. 2014): L_G = −1/m Σ log D(G(z′)).
//!
//! A class-conditional GAN (`params.net.conditional`, [`net`]) draws a class y for every fake
//! and feeds it to both networks. With the auxiliary classifier (AC-GAN) both losses gain the
//! cross-entropy of D's class head a(·): L_D += CE(a(x), y_x) + CE(a(G(z, y)), y) and
//! L_G += CE(a(G(z′, y′)), y′).
//!
//! Each network has its own optimizer, learning rate and betas. Both steps run on the shared
//! engine ([`kiln_core::engine`]), which checkpoints both networks and both optimizers, so a
//! killed run resumes exactly. Per epoch `metrics.csv` has d_loss, g_loss and the mean D(x) and
//! D(G(z)); `samples-epoch-NNN.png` decodes the same 64 noise vectors every epoch.
//!
//! `params.judge` (or `kiln train gan --judge <cnn-run-dir>`) measures the samples at the end
//! with a trained kiln classifier ([`kiln_vision::judge`]).

pub mod net;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::activation::{log_softmax, sigmoid, softplus};
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_core::data::to_vec;
use kiln_core::engine::checkpoint::{Checkpoint, CheckpointReader};
use kiln_core::engine::{self, Metrics, Monitor, Routine, UnitContext};
use kiln_core::nn::{blend, standard_normal, truncated_normal};
use kiln_core::optim::OptimizerConfig;
use kiln_core::run::{MODEL_FILE, RunDir};
use kiln_core::train::{
    Benchmark, effective_batch, engine_options, load_model, peak_rss, save_weights, time_training,
};
use kiln_core::{
    ConfigDoc, ConfigError, Family, Figure, Finished, PredictInput, RunConfig, RunContext,
    SampleRequest,
};
use kiln_datasets::{ImageData, ImageSet};
use kiln_vision::gallery::zoom;
use kiln_vision::judge::{Classifier, Reference, Verdict, check_size, judge, judge_against};
use kiln_vision::{flat_batch, grey_dataset_shape, load_dataset, resolve_dataset};
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use net::{Discriminator, Generator, NetParams, one_hot};

/// One network's optimizer; fields left out take `[train]`'s.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Side {
    pub learning_rate: Option<f64>,
    pub optimizer: Option<OptimizerConfig>,
}

/// `[params]` of a GAN config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GanParams {
    /// Use only the first N training images (0 = all).
    #[serde(default)]
    pub train_limit: usize,
    /// Use only the first N test images (0 = all): the judge's reference set.
    #[serde(default)]
    pub test_limit: usize,
    pub net: NetParams,
    #[serde(default)]
    pub generator: Side,
    #[serde(default)]
    pub discriminator: Side,
    /// One-sided label smoothing s: real images get target 1 − s (Salimans et al. 2016).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Exponential moving average of the generator's weights, β (0 = off): after every
    /// generator step θ̄ ← β·θ̄ + (1 − β)·θ; the sample grids, the judge and `model.bpk` use θ̄.
    #[serde(default)]
    pub ema: f64,
    /// A finished kiln `cnn` (or `mlp`) run that judges the samples after every epoch (against
    /// training images) and at the end (against the test set).
    #[serde(default)]
    pub judge: Option<PathBuf>,
    /// How many samples the judge classifies.
    #[serde(default = "default_judge_samples")]
    pub judge_samples: usize,
    /// Top-k generator updates (off when absent): see [`TopK`].
    #[serde(default)]
    pub top_k: Option<TopK>,
}

/// Top-k generator updates (Sinha et al. 2020, "Top-k training of GANs"): in epoch e the
/// generator step learns only from the k fakes of its batch of m that D rates most real,
///
///   k = max(⌈ν·m⌉, ⌈γ^(e−1)·m⌉),   L_G = −1/k Σ_{top k} log D(G(z′)),
///
/// so that late in training the worst fakes, whose gradients point G in unhelpful directions,
/// stop steering it. `decay` is γ, `min` is ν.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopK {
    pub decay: f64,
    pub min: f64,
}

impl TopK {
    /// The share of each batch kept in (1-based) epoch `epoch`: max(ν, γ^(e−1)).
    pub fn share(&self, epoch: usize) -> f64 {
        self.decay
            .powi(epoch.saturating_sub(1) as i32)
            .max(self.min)
    }
}

fn default_judge_samples() -> usize {
    1000
}

/// Saved as `generative.json`: what `sample` needs besides the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GanInfo {
    pub dataset: String,
    pub height: usize,
    pub width: usize,
    /// The classes a conditional generator was trained on (0: unconditional).
    #[serde(default)]
    pub classes: usize,
    /// Their names, for `kiln sample --class`.
    #[serde(default)]
    pub class_names: Vec<String>,
}

impl GanInfo {
    /// The class `kiln sample --class` names, by name (any case) or index.
    pub fn class_index(&self, run: &Path, asked: &str) -> Result<usize> {
        if self.classes == 0 {
            bail!(
                "--class: {} is not a class-conditional GAN (params.net.conditional is off)",
                run.display()
            );
        }
        let by_name = self
            .class_names
            .iter()
            .position(|c| c.eq_ignore_ascii_case(asked));
        match by_name.or_else(|| asked.parse::<usize>().ok().filter(|&i| i < self.classes)) {
            Some(i) => Ok(i),
            None => bail!(
                "--class: {asked:?} is neither a class of this run ({}) nor an index 0–{}",
                self.class_names.join(", "),
                self.classes - 1
            ),
        }
    }
}

const INFO: &str = "generative.json";
const DISCRIMINATOR_FILE: &str = "discriminator.bpk";
const FIXED_SAMPLES: usize = 64;

/// How many samples the per-epoch grid shows: 64, or 8 of each class for a conditional
/// generator (one class per column).
fn fixed_count(classes: usize) -> usize {
    if classes > 0 {
        8 * classes
    } else {
        FIXED_SAMPLES
    }
}

/// The class each of `n` samples is drawn for: `only`, or the classes in turn (i mod
/// `classes`); empty for an unconditional generator.
fn asked(classes: usize, n: usize, only: Option<usize>) -> Vec<usize> {
    if classes == 0 {
        return Vec::new();
    }
    (0..n).map(|i| only.unwrap_or(i % classes)).collect()
}

/// Columns of a sample grid of `n`: one per class for a conditional generator.
/// A grid of samples with a title, and the class names over the columns when each column is
/// one class (a conditional GAN).
fn sample_grid(
    path: &Path,
    title: String,
    images: &[Vec<f32>],
    (height, width): (usize, usize),
    columns: usize,
    class_names: &[String],
) -> Result<()> {
    let labels = if !class_names.is_empty() && columns == class_names.len() {
        class_names
            .iter()
            .map(|c| c.chars().take(10).collect())
            .collect()
    } else {
        Vec::new()
    };
    let text = kiln_core::plot::GridText {
        title,
        columns: labels,
        ..Default::default()
    };
    kiln_core::plot::labelled_tiles(path, images, (height, width), columns, zoom(height), &text)
}

fn grid_cols(classes: usize, n: usize) -> usize {
    if classes > 0 {
        classes
    } else {
        (n as f64).sqrt().ceil() as usize
    }
}

/// `labels` one-hot, `[n, classes]`, for a conditional GAN (`classes` > 0); `None` otherwise.
fn class_rows(labels: &[usize], classes: usize, device: &Device) -> Option<Tensor<2>> {
    (classes > 0).then(|| one_hot(labels, classes, device))
}

/// The generator's input for noise `noise` (rows of `latent`): each row of z, followed by its
/// row of the one-hot classes `y` when given, `[n, latent + classes]`.
pub fn generator_input(
    noise: &[f32],
    latent: usize,
    y: Option<Tensor<2>>,
    device: &Device,
) -> Tensor<2> {
    let z = Tensor::from_data(
        TensorData::new(noise.to_vec(), [noise.len() / latent, latent]),
        device,
    );
    match y {
        Some(y) => Tensor::cat(vec![z, y], 1),
        None => z,
    }
}

/// Real images p/scale scaled to [−1, 1] (the generator's tanh range), `[batch, h·w]`.
fn real_batch(set: &ImageSet, idx: &[usize], scale: f32, device: &Device) -> Tensor<2> {
    flat_batch(set, idx, 2.0 / scale, -1.0, device)
}

/// Mean binary cross-entropy of logits l against a constant target y:
/// 1/m Σ [softplus(l) − y·l] = −1/m Σ [y log σ(l) + (1 − y) log(1 − σ(l))].
pub fn bce_logits(logits: Tensor<2>, target: f64) -> Tensor<1> {
    (softplus(logits.clone(), 1.0) - logits.mul_scalar(target))
        .mean()
        .reshape([1])
}

/// Mean cross-entropy of class logits a `[m, classes]` against one-hot classes y:
/// −1/m Σᵢ Σ_c y_ic·log softmax(aᵢ)_c (AC-GAN's class term).
pub fn class_loss(logits: Tensor<2>, one_hot: Tensor<2>) -> Tensor<1> {
    let [m, _] = logits.dims();
    (log_softmax(logits, 1) * one_hot)
        .sum()
        .mul_scalar(-1.0 / m as f64)
        .reshape([1])
}

/// The `k` rows of `[m, 1]` logits with the largest values (ties: the earlier row first);
/// gradients flow to those rows only.
pub fn top_rows(logits: Tensor<2>, k: usize) -> Tensor<2> {
    let values = to_vec(logits.clone().detach());
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    let rows: Vec<i64> = order.iter().take(k).map(|&i| i as i64).collect();
    let n = rows.len();
    let device = logits.device();
    logits.select(
        0,
        Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device),
    )
}

/// Generated images mapped from [−1, 1] to intensities in [0, 1], one `Vec` per image.
fn to_images(x: Tensor<2>) -> Vec<Vec<f32>> {
    let [_, d] = x.dims();
    to_vec(x.add_scalar(1.0).mul_scalar(0.5))
        .chunks(d)
        .map(<[f32]>::to_vec)
        .collect()
}

/// The judge's verdict in one line.
fn verdict_line(dir: &Path, v: &Verdict) -> String {
    format!(
        "judge {}: {:.1}% of {} samples judged with confidence ≥ 0.9 (test images {:.1}%); smallest class {:.1}%; Fréchet distance {:.2} (test halves {:.2}){}",
        dir.display(),
        v.confident_share * 100.0,
        v.samples,
        v.test_confident_share * 100.0,
        v.smallest_class_share * 100.0,
        v.frechet_distance,
        v.frechet_test_halves,
        v.asked_class_agreement
            .map(|a| format!("; {:.1}% judged the class asked for", a * 100.0))
            .unwrap_or_default()
    )
}

/// How many training images the per-epoch judge compares samples with.
const EPOCH_REFERENCE: usize = 10_000;

/// The first `n` images of a set as intensities in [0, 1].
fn to_intensities(set: &ImageSet, scale: f32, n: usize) -> Vec<Vec<f32>> {
    (0..n.min(set.n))
        .map(|i| set.intensities(i, scale))
        .collect()
}

/// What one discriminator and one generator step measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub d_loss: f32,
    pub g_loss: f32,
    /// Mean D(x) over the real images.
    pub d_real: f32,
    /// Mean D(G(z)) over the fakes of the discriminator step.
    pub d_fake: f32,
}

/// Both networks, both optimizers, and how one batch trains them.
pub struct Gan {
    pub g: Option<Generator>,
    pub d: Option<Discriminator>,
    /// The moving average θ̄ of G's weights (on the inner device), when `params.ema` > 0.
    pub g_ema: Option<Generator>,
    pub ema: f64,
    pub g_opt: ModuleOptimizer,
    pub d_opt: ModuleOptimizer,
    pub g_lr: f64,
    pub d_lr: f64,
    pub latent: usize,
    /// The class count a conditional GAN trains on (0: unconditional).
    pub classes: usize,
    pub smoothing: f64,
    /// The share of each batch the generator step learns from (1 = all; see [`TopK`]).
    pub keep: f64,
    pub device: Device,
}

impl Gan {
    /// G's input for `n` fresh draws of z ~ N(0, I), and for a conditional GAN the classes
    /// (uniform) it is asked for, one-hot.
    fn noise(&self, rng: &mut StdRng, n: usize) -> (Tensor<2>, Option<Tensor<2>>) {
        let z = standard_normal(rng, n * self.latent);
        let labels: Vec<usize> = (0..if self.classes > 0 { n } else { 0 })
            .map(|_| rng.random_range(0..self.classes))
            .collect();
        let y = self.one_hot(&labels);
        (generator_input(&z, self.latent, y.clone(), &self.device), y)
    }

    fn one_hot(&self, labels: &[usize]) -> Option<Tensor<2>> {
        class_rows(labels, self.classes, &self.device)
    }

    /// Step 1: update D on real images `x` of classes `labels` (read only by a conditional GAN)
    /// and fakes G(z) (G's graph cut off by `detach`).
    pub fn d_step(&mut self, x: Tensor<2>, labels: &[usize], rng: &mut StdRng) -> (f32, f32, f32) {
        let [m, _] = x.dims();
        let (z, fake_y) = self.noise(rng, m);
        let g = self.g.as_ref().expect("generator present");
        let fake = g.forward(z).detach();
        let d = self.d.take().expect("discriminator present");
        let real_y = self.one_hot(labels);
        let (real_logits, real_classes) = d.forward_heads(x, real_y.clone());
        let (fake_logits, fake_classes) = d.forward_heads(fake, fake_y.clone());
        let d_real = sigmoid(real_logits.clone().detach())
            .mean()
            .into_scalar::<f32>();
        let d_fake = sigmoid(fake_logits.clone().detach())
            .mean()
            .into_scalar::<f32>();
        let mut loss = bce_logits(real_logits, 1.0 - self.smoothing) + bce_logits(fake_logits, 0.0);
        // AC-GAN: D also names the class of the real images and of the fakes.
        if let (Some(a), Some(y), Some(fa), Some(fy)) = (real_classes, real_y, fake_classes, fake_y)
        {
            loss = loss + class_loss(a, y) + class_loss(fa, fy);
        }
        let value = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &d);
        self.d = Some(self.d_opt.step(self.d_lr, d, grads));
        (value, d_real, d_fake)
    }

    /// Step 2: update G so that D calls its fakes real; only G's gradients are applied.
    /// D's weights are held constant here (`no_grad`: its batch norm still normalises with
    /// the batch's statistics), so the backward pass computes ∂L_G/∂G(z) through D but not
    /// the unused ∂L_G/∂θ_D.
    pub fn g_step(&mut self, m: usize, rng: &mut StdRng) -> f32 {
        let (z, y) = self.noise(rng, m);
        let g = self.g.take().expect("generator present");
        let d = self.d.clone().expect("discriminator present").no_grad();
        let (logits, classes) = d.forward_heads(g.forward(z), y.clone());
        let k = ((self.keep * m as f64).ceil() as usize).clamp(1, m);
        let mut loss = if k < m {
            bce_logits(top_rows(logits, k), 1.0)
        } else {
            bce_logits(logits, 1.0)
        };
        // AC-GAN: G also makes its images named as the class they were drawn for.
        if let (Some(a), Some(y)) = (classes, y) {
            loss = loss + class_loss(a, y);
        }
        let value = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &g);
        let g = self.g_opt.step(self.g_lr, g, grads);
        if let Some(avg) = self.g_ema.take() {
            self.g_ema = Some(blend(avg, &g.valid(), 1.0 - self.ema));
        }
        self.g = Some(g);
        value
    }

    /// One batch: a discriminator step on the real images `idx` of `set` (pixels p scaled by
    /// `scale`), then a generator step on as many fakes.
    pub fn train_batch(
        &mut self,
        set: &ImageSet,
        idx: &[usize],
        scale: f32,
        rng: &mut StdRng,
    ) -> StepStats {
        let x = real_batch(set, idx, scale, &self.device);
        let labels: Vec<usize> = idx.iter().map(|&i| set.labels[i] as usize).collect();
        let (d_loss, d_real, d_fake) = self.d_step(x, &labels, rng);
        let g_loss = self.g_step(idx.len(), rng);
        StepStats {
            d_loss,
            g_loss,
            d_real,
            d_fake,
        }
    }

    /// The generator that draws samples: the moving average θ̄ if kept, else G itself.
    pub fn sampler(&self) -> Generator {
        match &self.g_ema {
            Some(avg) => avg.clone(),
            None => self.g.as_ref().expect("generator").valid(),
        }
    }
}

/// The per-epoch judge: a classifier and its reference features of training images.
struct EpochJudge {
    net: Box<dyn Classifier>,
    reference: Reference,
    samples: usize,
    seed: u64,
}

/// The GAN as an engine routine: an epoch is one shuffled pass over the training images.
struct GanRoutine<'a> {
    gan: Gan,
    train: &'a ImageSet,
    scale: f32,
    batch_size: usize,
    eval_device: Device,
    fixed_z: Vec<f32>,
    height: usize,
    width: usize,
    judge: Option<EpochJudge>,
    top_k: Option<TopK>,
    /// The class names over a conditional GAN's columns (empty for an unconditional one).
    class_names: Vec<String>,
    /// G's and D's base rates, which the engine's schedule scales every epoch.
    base_lr: (f64, f64),
}

impl Routine for GanRoutine<'_> {
    fn unit_len(&self) -> u64 {
        self.train.n.div_ceil(self.batch_size) as u64
    }

    fn optimizers(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("generator", self.base_lr.0),
            ("discriminator", self.base_lr.1),
        ]
    }

    /// With a judge, its confident share (maximised); without one a GAN has no number that
    /// says it got better, so early stopping needs `train.monitor`.
    fn monitor(&self) -> Option<Monitor> {
        self.judge.as_ref().map(|_| Monitor::max("judge_confident"))
    }

    fn train_unit(&mut self, epoch: usize, ctx: &mut UnitContext) -> Result<Metrics> {
        self.gan.keep = self.top_k.map_or(1.0, |t| t.share(epoch));
        self.gan.g_lr = ctx.lr("generator");
        self.gan.d_lr = ctx.lr("discriminator");
        let mut order: Vec<usize> = (0..self.train.n).collect();
        order.shuffle(&mut ctx.rng);
        let mut sums = [0f64; 4];
        let mut seen = 0usize;
        for idx in order.chunks(self.batch_size) {
            let StepStats {
                d_loss,
                g_loss,
                d_real,
                d_fake,
            } = self
                .gan
                .train_batch(self.train, idx, self.scale, &mut ctx.rng);
            // A NaN in either loss stops the run; report the larger one.
            let worst = if g_loss.is_finite() { d_loss } else { g_loss };
            ctx.batch(worst)?;
            let m = idx.len() as f64;
            for (s, v) in sums.iter_mut().zip([d_loss, g_loss, d_real, d_fake]) {
                *s += v as f64 * m;
            }
            seen += idx.len();
        }
        ctx.examples(seen);
        let n = seen.max(1) as f64;
        Ok(["d_loss", "g_loss", "d_real", "d_fake"]
            .iter()
            .zip(sums)
            .map(|(k, s)| (k.to_string(), s / n))
            .collect())
    }

    fn save(&self, ckpt: &mut Checkpoint) -> Result<()> {
        ckpt.module("generator", self.gan.g.as_ref().expect("generator"))?;
        ckpt.module("discriminator", self.gan.d.as_ref().expect("discriminator"))?;
        if let Some(avg) = &self.gan.g_ema {
            ckpt.module("generator_ema", avg)?;
        }
        ckpt.optimizer("generator_optimizer", &self.gan.g_opt)?;
        ckpt.optimizer("discriminator_optimizer", &self.gan.d_opt)
    }

    fn load(&mut self, ckpt: &CheckpointReader) -> Result<()> {
        let g = self.gan.g.take().expect("generator");
        self.gan.g = Some(ckpt.module("generator", g)?);
        let d = self.gan.d.take().expect("discriminator");
        self.gan.d = Some(ckpt.module("discriminator", d)?);
        if let Some(avg) = self.gan.g_ema.take() {
            self.gan.g_ema = Some(ckpt.module("generator_ema", avg)?);
        }
        self.gan.g_opt = ckpt.optimizer("generator_optimizer", self.gan.g_opt.clone())?;
        self.gan.d_opt = ckpt.optimizer("discriminator_optimizer", self.gan.d_opt.clone())?;
        Ok(())
    }

    /// With a judge: the share of `judge_samples` samples (the same noise every epoch) judged
    /// confident, the smallest class's share and the Fréchet distance to training images; with
    /// a moving average also the live generator's confident share.
    fn validate(&mut self, _epoch: usize, _rng: &mut StdRng) -> Result<Metrics> {
        let Some(j) = &self.judge else {
            return Ok(Vec::new());
        };
        let (latent, classes) = (self.gan.latent, self.gan.classes);
        let asked = asked(classes, j.samples, None);
        let draw = |g: &Generator| {
            GanFamily::generate(
                g,
                latent,
                &asked,
                j.samples,
                j.seed,
                None,
                &self.eval_device,
            )
        };
        let v = judge_against(
            j.net.as_ref(),
            &draw(&self.gan.sampler()),
            &asked,
            &j.reference,
        );
        let mut m = vec![
            ("judge_confident".to_string(), v.confident_share),
            ("judge_smallest_class".to_string(), v.smallest_class_share),
            ("judge_frechet_train".to_string(), v.frechet_distance),
        ];
        if let Some(a) = v.asked_class_agreement {
            m.push(("judge_class_agreement".to_string(), a));
        }
        if self.gan.g_ema.is_some() {
            let live = draw(&self.gan.g.as_ref().expect("generator").valid());
            let v = judge_against(j.net.as_ref(), &live, &asked, &j.reference);
            m.push(("judge_confident_live".to_string(), v.confident_share));
        }
        Ok(m)
    }

    fn after_unit(&mut self, epoch: usize, run: &RunDir) -> Result<Vec<(String, PathBuf)>> {
        let g = self.gan.sampler();
        let path = run.file(&format!("samples-epoch-{epoch:03}.png"));
        let classes = self.gan.classes;
        let n = fixed_count(classes);
        let y = class_rows(&asked(classes, n, None), classes, &self.eval_device);
        let z = generator_input(&self.fixed_z, self.gan.latent, y, &self.eval_device);
        sample_grid(
            &path,
            format!("Samples of the same noise, epoch {epoch}"),
            &to_images(g.forward(z)),
            (self.height, self.width),
            grid_cols(classes, n),
            &self.class_names,
        )?;
        Ok(vec![("samples".into(), path)])
    }
}

pub struct GanFamily;

pub static FAMILY: GanFamily = GanFamily;

const DEFAULT_DATASET: &str = "auto";

/// Opens the judge: a finished run of any image-classifier family of the registry.
pub fn open_judge(dir: &Path) -> Result<Box<dyn Classifier>> {
    kiln_core::registry::open_classifier(dir)
}

impl GanFamily {
    fn config(&self, doc: &ConfigDoc) -> Result<RunConfig<GanParams>> {
        let cfg: RunConfig<GanParams> = doc.typed()?;
        let bad =
            |field: &str, msg: String| anyhow!("{}: params.{field}: {msg}", doc.source.display());
        if !(0.0..0.5).contains(&cfg.params.label_smoothing) {
            return Err(bad(
                "label_smoothing",
                format!("must be in [0, 0.5), got {}", cfg.params.label_smoothing),
            ));
        }
        if let Some(t) = cfg.params.top_k {
            for (field, v) in [("top_k.decay", t.decay), ("top_k.min", t.min)] {
                if !(v > 0.0 && v <= 1.0) {
                    return Err(bad(field, format!("must be in (0, 1], got {v}")));
                }
            }
        }
        if !(0.0..1.0).contains(&cfg.params.ema) {
            return Err(bad(
                "ema",
                format!("must be in [0, 1) (0 = off), got {}", cfg.params.ema),
            ));
        }
        for (name, side) in [
            ("generator", &cfg.params.generator),
            ("discriminator", &cfg.params.discriminator),
        ] {
            if let Some(lr) = side.learning_rate
                && !(lr.is_finite() && lr > 0.0)
            {
                return Err(bad(
                    &format!("{name}.learning_rate"),
                    format!("must be a positive number, got {lr}"),
                ));
            }
            if let Some(o) = &side.optimizer {
                o.check()
                    .map_err(|(f, m)| bad(&format!("{name}.optimizer.{f}"), m))?;
            }
        }
        Ok(cfg)
    }

    fn dataset(cfg: &RunConfig<GanParams>) -> String {
        cfg.dataset
            .clone()
            .unwrap_or_else(|| DEFAULT_DATASET.to_string())
    }

    fn load(&self, cfg: &RunConfig<GanParams>) -> Result<ImageData> {
        load_dataset(
            &Self::dataset(cfg),
            cfg.data_dir.as_deref(),
            (cfg.params.train_limit, cfg.params.test_limit),
            Default::default(),
        )
    }

    fn generator(
        &self,
        run: &RunDir,
        cfg: &RunConfig<GanParams>,
        info: &GanInfo,
        device: &Device,
    ) -> Result<Generator> {
        load_model(
            run,
            Generator::new(
                &cfg.params.net,
                info.height,
                info.width,
                info.classes,
                device,
            ),
        )
    }

    /// `n` samples from noise seeded by `seed` (N(0, I), or truncated to [−ψ, ψ]), as
    /// intensities in [0, 1]; a conditional generator draws sample i of class `asked[i]`
    /// (see [`asked`]; empty for an unconditional one).
    fn generate(
        g: &Generator,
        latent: usize,
        asked: &[usize],
        n: usize,
        seed: u64,
        truncation: Option<f64>,
        device: &Device,
    ) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(n);
        let mut left = n;
        while left > 0 {
            let m = left.min(500);
            let noise = match truncation {
                Some(psi) => truncated_normal(&mut rng, m * latent, psi),
                None => standard_normal(&mut rng, m * latent),
            };
            let labels = asked.get(out.len()..out.len() + m).unwrap_or(&[]);
            let y = class_rows(labels, g.classes(), device);
            let z = generator_input(&noise, latent, y, device);
            out.extend(to_images(g.forward(z)));
            left -= m;
        }
        out
    }
}

/// The engine's settings and the fixed noise, shared by `train` and the tests.
/// `classes`: the data set's class count (a conditional GAN trains on them).
pub fn build_gan(
    cfg: &RunConfig<GanParams>,
    h: usize,
    w: usize,
    classes: usize,
    device: &Device,
) -> Gan {
    let p = &cfg.params;
    let opt = |side: &Side| {
        side.optimizer
            .clone()
            .unwrap_or(cfg.train.optimizer.clone())
    };
    let g = Generator::new(&p.net, h, w, classes, device);
    Gan {
        g_ema: (p.ema > 0.0).then(|| g.valid()),
        ema: p.ema,
        g: Some(g),
        d: Some(Discriminator::new(&p.net, h, w, classes, device)),
        g_opt: opt(&p.generator).init(),
        d_opt: opt(&p.discriminator).init(),
        g_lr: p.generator.learning_rate.unwrap_or(cfg.train.learning_rate),
        d_lr: p
            .discriminator
            .learning_rate
            .unwrap_or(cfg.train.learning_rate),
        latent: p.net.latent,
        classes: p.net.label_dims(classes),
        smoothing: p.label_smoothing,
        keep: 1.0,
        device: device.clone(),
    }
}

/// The final verdict's headline figure and report rows (none without a judge).
fn verdict_rows(
    verdict: Option<&(Verdict, Vec<String>, PathBuf)>,
) -> (Vec<Figure>, Vec<(String, String)>) {
    let Some((v, classes, _)) = verdict else {
        return (Vec::new(), Vec::new());
    };
    let headline = vec![Figure::new(
        "judge.verdict.confident_share",
        "judged confident (≥ 0.9)",
        v.confident_share,
        format!(
            "{:.1}% of {} samples (the test images themselves: {:.1}%)",
            v.confident_share * 100.0,
            v.samples,
            v.test_confident_share * 100.0
        ),
    )];
    let mut rows = Vec::new();
    if let Some(a) = v.asked_class_agreement {
        rows.push((
            "judged the class asked for".to_string(),
            format!("{:.1}% of the samples", a * 100.0),
        ));
    }
    rows.push((
        "class histogram".to_string(),
        v.histogram
            .iter()
            .zip(classes)
            .map(|(n, c)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    rows.push((
        "Fréchet distance (judge features)".to_string(),
        format!(
            "{:.2} (two halves of the test set: {:.2})",
            v.frechet_distance, v.frechet_test_halves
        ),
    ));
    (headline, rows)
}

/// The words under `report.md`'s table: the pictures, the moving average, the judge.
fn report_notes(ctx: &RunContext, cfg: &RunConfig<GanParams>, judged: bool) -> String {
    format!(
        "Samples: `samples.png`, and `samples-epoch-NNN.png` from the same noise every epoch. \
         `d_real` is the mean D(x) over real images, `d_fake` the mean D(G(z)). \
         `kiln sample {} --n 64` draws new images.{}{}\n",
        ctx.run.path().display(),
        if cfg.params.ema > 0.0 {
            format!(
                " The samples, the judge and `model.bpk` use the moving average of the \
                 generator's weights (β = {}).",
                cfg.params.ema
            )
        } else {
            String::new()
        },
        if !judged {
            " Pass `--judge <cnn-run-dir>` to measure the samples with a trained classifier."
                .to_string()
        } else {
            format!(
                " Every epoch the judge measured {} samples of the same noise against \
                 training images (`judge_confident`, `judge_smallest_class`, \
                 `judge_frechet_train`; `judge_confident_live` is the live generator's \
                 share when a moving average is kept); the table above compares with the \
                 test set.",
                cfg.params.judge_samples
            )
        }
    )
}

impl GanFamily {
    /// The engine routine of a run: the networks, the fixed noise, the per-epoch judge.
    fn routine<'a>(
        cfg: &RunConfig<GanParams>,
        data: &'a ImageData,
        info: &GanInfo,
        device: &Device,
    ) -> Result<GanRoutine<'a>> {
        let (h, w) = (info.height, info.width);
        let mut fixed_rng = StdRng::seed_from_u64(cfg.seed ^ 0x5a5a_5a5a);
        let judge = match &cfg.params.judge {
            Some(dir) => {
                let net = open_judge(dir)?;
                // Per epoch the samples are compared with training images; the test set is
                // used once, at the end.
                let images = to_intensities(&data.train, data.scale, EPOCH_REFERENCE);
                let reference = Reference::new(net.as_ref(), &images);
                Some(EpochJudge {
                    net,
                    reference,
                    samples: cfg.params.judge_samples,
                    seed: cfg.seed.wrapping_add(1),
                })
            }
            None => None,
        };
        let gan = build_gan(cfg, h, w, data.classes.len(), device);
        Ok(GanRoutine {
            base_lr: (gan.g_lr, gan.d_lr),
            gan,
            train: &data.train,
            scale: data.scale,
            batch_size: effective_batch(data.train.n, cfg.train.batch_size),
            eval_device: device.clone().inner(),
            fixed_z: standard_normal(
                &mut fixed_rng,
                fixed_count(info.classes) * cfg.params.net.latent,
            ),
            height: h,
            width: w,
            judge,
            top_k: cfg.params.top_k,
            class_names: if info.classes > 0 {
                info.class_names.clone()
            } else {
                Vec::new()
            },
        })
    }

    /// `samples.png`: the fixed noise's grid (a column per class for a conditional GAN).
    fn samples_png(
        run: &RunDir,
        cfg: &RunConfig<GanParams>,
        info: &GanInfo,
        g: &Generator,
        device: &Device,
    ) -> Result<()> {
        let fixed = fixed_count(info.classes);
        let asked = asked(info.classes, fixed, None);
        let samples = Self::generate(
            g,
            cfg.params.net.latent,
            &asked,
            fixed,
            cfg.seed,
            None,
            device,
        );
        let (h, w) = (info.height, info.width);
        let names = if info.classes > 0 {
            &info.class_names[..]
        } else {
            &[]
        };
        sample_grid(
            &run.file("samples.png"),
            "Samples of the trained generator".into(),
            &samples,
            (h, w),
            grid_cols(info.classes, fixed),
            names,
        )
    }

    /// `summary.json`'s sections and `report.md`'s words: the judge's verdict as the headline
    /// when there is one.
    fn finished(
        ctx: &RunContext,
        cfg: &RunConfig<GanParams>,
        data: &ImageData,
        (g, d): (&Generator, &Discriminator),
        verdict: Option<(Verdict, Vec<String>, PathBuf)>,
    ) -> Finished {
        let arch = cfg.params.net.describe(data.train.height, data.train.width);
        let fields = json!({
            "dataset": Self::dataset(cfg),
            "dataset_requested": cfg.dataset_requested.clone().unwrap_or_else(|| Self::dataset(cfg)),
            "architecture": arch,
            "parameters": {"generator": g.num_params(), "discriminator": d.num_params()},
            "train_examples": data.train.n,
            "judge": verdict.as_ref().map(|(v, classes, dir)| json!({
                "run": dir.display().to_string(),
                "classes": classes,
                "verdict": v,
            })),
        });
        let (headline, mut rows) = verdict_rows(verdict.as_ref());
        rows.extend([
            (
                "data set".into(),
                format!("{} ({} train)", data.name, data.train.n),
            ),
            ("network".into(), arch),
            (
                "parameters".into(),
                format!("G {} / D {}", g.num_params(), d.num_params()),
            ),
        ]);
        Finished {
            title: format!("GAN on {}", data.name),
            fields,
            headline,
            rows,
            examples: "images",
            notes: report_notes(ctx, cfg, verdict.is_some()),
        }
    }

    /// The final verdict: the per-epoch judge's classifier, against the test set.
    fn final_verdict(
        cfg: &RunConfig<GanParams>,
        epoch_judge: Option<EpochJudge>,
        data: &ImageData,
        info: &GanInfo,
        g: &Generator,
        device: &Device,
    ) -> Result<Option<(Verdict, Vec<String>, PathBuf)>> {
        let (Some(dir), Some(EpochJudge { net, .. })) = (&cfg.params.judge, epoch_judge) else {
            return Ok(None);
        };
        check_size(net.as_ref(), info.height, info.width, dir)?;
        let judged = asked(info.classes, cfg.params.judge_samples, None);
        let samples = Self::generate(
            g,
            cfg.params.net.latent,
            &judged,
            cfg.params.judge_samples,
            cfg.seed.wrapping_add(1),
            None,
            device,
        );
        let reference = to_intensities(&data.test, data.scale, data.test.n);
        let v = judge(net.as_ref(), &samples, &judged, &reference);
        eprintln!("{}", verdict_line(dir, &v));
        Ok(Some((v, net.classes().to_vec(), dir.clone())))
    }
}

impl Family for GanFamily {
    fn name(&self) -> &'static str {
        "gan"
    }

    fn about(&self) -> &'static str {
        "generative adversarial network (DCGAN or MLP, optionally class-conditional): noise → images, judged by a trained CNN"
    }

    fn resolve(&self, doc: &mut ConfigDoc) -> Result<()> {
        resolve_dataset(doc, DEFAULT_DATASET)
    }

    fn check(&self, doc: &ConfigDoc) -> Result<()> {
        let cfg = self.config(doc)?;
        cfg.train
            .one_device("gan")
            .and_then(|()| {
                cfg.train.no_validation_split(
                    "gan",
                    "its judge scores samples every epoch against the training images",
                )
            })
            .map_err(|(f, m)| ConfigError::new(&doc.source, &f, m))?;
        let (h, w, _) = grey_dataset_shape(doc, &Self::dataset(&cfg), "gan")?;
        cfg.params
            .net
            .check(h, w)
            .map_err(|e| anyhow!("{}: params.net.{e}", doc.source.display()))?;
        if let Some(dir) = &cfg.params.judge {
            // A bad judge is found before hours of training, not after.
            check_size(open_judge(dir)?.as_ref(), h, w, dir)?;
        }
        Ok(())
    }

    fn train(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = self.config(&ctx.doc)?;
        let data = self.load(&cfg)?;
        let (h, w) = (data.train.height, data.train.width);
        cfg.params
            .net
            .check(h, w)
            .map_err(|e| anyhow!("{}: params.net.{e}", ctx.doc.source.display()))?;
        let info = GanInfo {
            dataset: Self::dataset(&cfg),
            height: h,
            width: w,
            classes: cfg.params.net.label_dims(data.classes.len()),
            class_names: data.classes.clone(),
        };
        ctx.run.write_json(INFO, &info)?;
        eprintln!(
            "{}: {} training images ({h}×{w}); a GAN has no validation set, the test set is the judge's reference",
            data.name, data.train.n
        );
        let device = cfg.training_device()?;
        device.seed(cfg.seed);
        let mut routine = Self::routine(&cfg, &data, &info, &device)?;
        let opts = engine_options(&cfg.train, cfg.seed, ctx.resume);
        let outcome = engine::run(&mut routine, &ctx.run, &opts, Some(&device))?;
        let g = routine.gan.sampler();
        let d = routine.gan.d.take().expect("discriminator").valid();
        save_weights(&g, &ctx.run.file(MODEL_FILE))?;
        save_weights(&d, &ctx.run.file(DISCRIMINATOR_FILE))?;
        let eval_device = device.inner();
        Self::samples_png(&ctx.run, &cfg, &info, &g, &eval_device)?;
        let verdict =
            Self::final_verdict(&cfg, routine.judge.take(), &data, &info, &g, &eval_device)?;
        let done = Self::finished(ctx, &cfg, &data, (&g, &d), verdict);
        ctx.finish(cfg.backend.as_str(), &outcome, done)
    }

    fn eval(&self, ctx: &RunContext) -> Result<Value> {
        let summary = ctx.run.read_summary()?;
        Ok(
            json!({"judge": summary["judge"].clone(), "training": summary["training"]["final"].clone()}),
        )
    }

    fn predict(&self, ctx: &RunContext, _input: &PredictInput) -> Result<String> {
        bail!(
            "{}: a GAN generates images rather than predicting: use `kiln sample {}`",
            ctx.run.path().display(),
            ctx.run.path().display()
        )
    }

    /// Training images per second, where one batch is a discriminator step and a generator
    /// step (`Gan::train_batch`, as in training), and samples per second from
    /// the trained-so-far generator.
    fn bench(&self, doc: &ConfigDoc, batches: usize) -> Result<Benchmark> {
        self.check(doc)?;
        let cfg = self.config(doc)?;
        let data = self.load(&cfg)?;
        let (h, w) = (data.train.height, data.train.width);
        let device = cfg.training_device()?;
        device.seed(cfg.seed);
        let mut gan = build_gan(&cfg, h, w, data.classes.len(), &device);
        let n = data.train.n;
        let batch_size = effective_batch(n, cfg.train.batch_size).min(n).max(1);
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let timed = time_training(&device, n, batch_size, batches, &mut rng, |idx, rng| {
            gan.train_batch(&data.train, idx, data.scale, rng);
        })?;
        let (timed, train_rate) = (timed.examples, timed.per_second);
        let (g, eval_device) = (gan.sampler(), device.clone().inner());
        let drawn = timed.max(500);
        let started = Instant::now();
        let _ = Self::generate(
            &g,
            cfg.params.net.latent,
            &asked(gan.classes, drawn, None),
            drawn,
            cfg.seed,
            None,
            &eval_device,
        );
        let sample_rate = drawn as f64 / started.elapsed().as_secs_f64();
        Ok(Benchmark {
            backend: cfg.backend.to_string(),
            unit: "images".into(),
            notes: vec![format!(
                "one training image = its share of a discriminator step (real and fake) and a \
                 generator step; inference = samples drawn from G ({})",
                cfg.params.net.describe(h, w)
            )],
            batch_size,
            batches,
            train_examples_per_second: train_rate,
            inference_examples_per_second: sample_rate,
            epoch_seconds: n as f64 / train_rate,
            epoch_examples: n,
            peak_rss_bytes: peak_rss(),
        })
    }
    fn image_sampler(&self) -> Option<&dyn kiln_core::family::ImageSampler> {
        Some(self)
    }

    /// The generator: `z` `[batch, latent]` noise from N(0, I) (a conditional generator:
    /// `[batch, latent + classes]`, each row's one-hot class after its noise) → `images`
    /// `[batch, 1, h, w]` in [0, 1]. The sample file holds the eight inputs `kiln sample
    /// --seed 0 --n 8` draws and kiln's images for them.
    fn onnx(&self, ctx: &RunContext) -> Result<Option<kiln_core::onnx::OnnxExport>> {
        let cfg = self.config(&ctx.doc)?;
        let info: GanInfo = ctx.run.read_json(INFO)?;
        let device = Device::flex();
        let gen_net = self.generator(&ctx.run, &cfg, &info, &device)?;
        let (latent, n) = (cfg.params.net.latent, 8);
        let inputs = latent + gen_net.classes();
        let mut g = kiln_core::onnx::Graph::new("z", &[inputs]);
        let out = gen_net.onnx(&mut g, "z", (info.height, info.width));
        let noise = standard_normal(&mut StdRng::seed_from_u64(0), n * latent);
        let labels = asked(info.classes, n, None);
        let y = class_rows(&labels, gen_net.classes(), &device);
        let z = generator_input(&noise, latent, y, &device);
        let images: Vec<f32> = Self::generate(&gen_net, latent, &labels, n, 0, None, &device)
            .into_iter()
            .flatten()
            .collect();
        let (h, w) = (info.height, info.width);
        Ok(Some(kiln_core::onnx::OnnxExport {
            model: g.finish(&out, &[1, h, w]),
            sample: vec![
                ("z".into(), vec![n, inputs], to_vec(z)),
                ("images".into(), vec![n, 1, h, w], images),
            ],
        }))
    }
}

impl kiln_core::family::ImageSampler for GanFamily {
    fn sample(&self, ctx: &RunContext, req: &SampleRequest) -> Result<PathBuf> {
        let cfg = self.config(&ctx.doc)?;
        let info: GanInfo = ctx.run.read_json(INFO)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let g = self.generator(&ctx.run, &cfg, &info, &device)?;
        let only = match &req.class {
            Some(c) => Some(info.class_index(ctx.run.path(), c)?),
            None => None,
        };
        let drawn_for = asked(info.classes, req.n, only);
        let images = Self::generate(
            &g,
            cfg.params.net.latent,
            &drawn_for,
            req.n,
            req.seed,
            req.truncation,
            &device,
        );
        if let Some(dir) = &req.judge {
            let judge_net = open_judge(dir)?;
            check_size(judge_net.as_ref(), info.height, info.width, dir)?;
            let data = self.load(&cfg)?;
            let reference = to_intensities(&data.test, data.scale, data.test.n);
            eprintln!(
                "{}",
                verdict_line(
                    dir,
                    &judge(judge_net.as_ref(), &images, &drawn_for, &reference)
                )
            );
        }
        let out = req
            .out
            .clone()
            .unwrap_or_else(|| ctx.run.file(&format!("samples-seed-{}.png", req.seed)));
        // One class per column, unless one class was asked for.
        let cols = grid_cols(if only.is_some() { 0 } else { info.classes }, req.n);
        let names = if info.classes > 0 && only.is_none() {
            &info.class_names[..]
        } else {
            &[]
        };
        let title = match only {
            Some(c) => format!(
                "{} samples of {} (seed {})",
                req.n, info.class_names[c], req.seed
            ),
            None => format!("{} samples (seed {})", req.n, req.seed),
        };
        sample_grid(&out, title, &images, (info.height, info.width), cols, names)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::nn::parameters;

    fn cfg() -> RunConfig<GanParams> {
        ConfigDoc::parse(
            "gan.toml",
            "model = \"gan\"\n[train]\nlearning_rate = 0.01\n[params]\nnet = { kind = \"mlp\", latent = 4, widths = [8] }\n",
        )
        .unwrap()
        .typed()
        .unwrap()
    }

    #[test]
    fn each_step_changes_only_its_own_network() {
        let device = Device::flex().autodiff();
        device.seed(1);
        let mut gan = build_gan(&cfg(), 2, 2, 3, &device);
        let mut rng = StdRng::seed_from_u64(1);
        let x = Tensor::from_data(TensorData::new(vec![1.0f32; 12], [3, 4]), &device);
        let (g0, d0) = (
            parameters(gan.g.as_ref().unwrap()),
            parameters(gan.d.as_ref().unwrap()),
        );
        gan.d_step(x, &[0, 1, 2], &mut rng);
        let (g1, d1) = (
            parameters(gan.g.as_ref().unwrap()),
            parameters(gan.d.as_ref().unwrap()),
        );
        assert_eq!(g0, g1, "the discriminator step changed the generator");
        assert_ne!(
            d0, d1,
            "the discriminator step did not change the discriminator"
        );
        gan.g_step(3, &mut rng);
        let (g2, d2) = (
            parameters(gan.g.as_ref().unwrap()),
            parameters(gan.d.as_ref().unwrap()),
        );
        assert_eq!(d1, d2, "the generator step changed the discriminator");
        assert_ne!(g1, g2, "the generator step did not change the generator");
    }

    /// With `ema = β` every generator step moves θ̄ to β·θ̄ + (1 − β)·θ, the discriminator step
    /// leaves it alone, and the sampler is θ̄.
    #[test]
    fn moving_average_follows_the_generator() {
        let device = Device::flex().autodiff();
        device.seed(2);
        let mut c = cfg();
        c.params.ema = 0.75;
        let mut gan = build_gan(&c, 2, 2, 3, &device);
        let mut rng = StdRng::seed_from_u64(2);
        let start = parameters(gan.g.as_ref().unwrap());
        assert_eq!(parameters(&gan.sampler()), start);
        let x = Tensor::from_data(TensorData::new(vec![1.0f32; 12], [3, 4]), &device);
        gan.d_step(x, &[0, 1, 2], &mut rng);
        assert_eq!(parameters(&gan.sampler()), start);
        gan.g_step(3, &mut rng);
        let live = parameters(gan.g.as_ref().unwrap());
        let avg = parameters(&gan.sampler());
        assert_ne!(live, start);
        for ((a, s), l) in avg.iter().zip(&start).zip(&live) {
            assert!((a - (0.75 * s + 0.25 * l)).abs() < 1e-6, "{a} {s} {l}");
        }
    }

    /// k = max(⌈ν·m⌉, ⌈γ^(e−1)·m⌉): all of the batch in epoch 1, then γ less each epoch, down
    /// to the floor ν.
    #[test]
    fn top_k_share_decays_to_its_floor() {
        let t = TopK {
            decay: 0.9,
            min: 0.5,
        };
        assert_eq!(t.share(1), 1.0);
        assert!((t.share(2) - 0.9).abs() < 1e-12);
        assert!((t.share(7) - 0.9f64.powi(6)).abs() < 1e-12); // 0.531
        assert_eq!(t.share(8), 0.5); // 0.9^7 = 0.478 < ν
        assert_eq!(t.share(50), 0.5);
    }

    /// The generator step's top-k keeps the rows D rates highest, and only they get gradient.
    #[test]
    fn top_rows_keeps_the_highest_logits_and_only_their_gradients() {
        let device = Device::flex().autodiff();
        let l = Tensor::<2>::from_data(
            TensorData::new(vec![0.1f32, 2.0, -1.0, 1.5, 1.5], [5, 1]),
            &device,
        )
        .require_grad();
        let kept = top_rows(l.clone(), 3);
        assert_eq!(to_vec(kept.clone()), vec![2.0, 1.5, 1.5]);
        let grads = (kept * 2.0).sum().backward();
        assert_eq!(
            to_vec(l.grad(&grads).unwrap()),
            vec![0.0, 2.0, 0.0, 2.0, 2.0]
        );
    }

    /// With top-k on, a generator step with k = m is the plain step; with k < m it differs.
    #[test]
    fn generator_step_with_top_k_learns_from_fewer_fakes() {
        let step = |keep: f64| {
            let device = Device::flex().autodiff();
            device.seed(3);
            let mut gan = build_gan(&cfg(), 2, 2, 3, &device);
            gan.keep = keep;
            let loss = gan.g_step(8, &mut StdRng::seed_from_u64(3));
            (loss, parameters(gan.g.as_ref().unwrap()))
        };
        let (all, g_all) = step(1.0);
        let (half, g_half) = step(0.5);
        // The kept half are the fakes D rates most real: their loss −log D is the smaller.
        assert!(half < all, "top-half loss {half} ≥ whole-batch loss {all}");
        assert_ne!(g_all, g_half);
        assert_eq!(step(1.0).1, g_all, "the plain step is not reproducible");
    }

    #[test]
    fn top_k_settings_are_checked() {
        for (toml, field) in [
            ("top_k = { decay = 0.0, min = 0.5 }", "params.top_k.decay"),
            ("top_k = { decay = 0.99, min = 1.5 }", "params.top_k.min"),
        ] {
            let doc = ConfigDoc::parse(
                "gan.toml",
                &format!(
                    "model = \"gan\"\n[params]\nnet = {{ kind = \"mlp\", latent = 4, widths = [8] }}\n{toml}\n"
                ),
            )
            .unwrap();
            let err = FAMILY.config(&doc).unwrap_err().to_string();
            assert!(err.starts_with("gan.toml: "), "{err}");
            assert!(err.contains(field), "{err}");
        }
    }

    /// The generator's input is each row of z followed by its one-hot class.
    #[test]
    fn generator_input_puts_the_class_beside_the_noise() {
        let dev = Device::flex();
        let z = [0.5f32, -1.0, 2.0, 3.0];
        let x = generator_input(&z, 2, class_rows(&[2, 0], 3, &dev), &dev);
        assert_eq!(x.dims(), [2, 5]);
        assert_eq!(to_vec(x), vec![0.5, -1.0, 0., 0., 1., 2.0, 3.0, 1., 0., 0.]);
        let plain = generator_input(&z, 2, class_rows(&[], 0, &dev), &dev);
        assert_eq!(plain.dims(), [2, 2]);
    }

    /// A conditional GAN learns what each class looks like: on 2×2 images that are all dark
    /// for class 0 and all bright for class 1, after 300 batches G draws dark images when asked
    /// for class 0 and bright ones for class 1 (an unconditional G cannot tell them apart).
    #[test]
    fn conditional_generator_draws_the_class_it_is_asked_for() {
        for how in [net::Conditioning::Projection, net::Conditioning::Auxiliary] {
            conditional_generator_learns(how);
        }
    }

    fn conditional_generator_learns(how: net::Conditioning) {
        let device = Device::flex().autodiff();
        device.seed(5);
        let mut c = cfg();
        c.params.net.conditional = Some(how);
        c.params.net.widths = vec![16];
        let mut gan = build_gan(&c, 2, 2, 2, &device);
        assert_eq!(gan.classes, 2);
        let mut rng = StdRng::seed_from_u64(5);
        let labels: Vec<usize> = (0..8).map(|i| i % 2).collect();
        let pixels: Vec<f32> = labels
            .iter()
            .flat_map(|&y| [if y == 0 { -1.0 } else { 1.0 }; 4])
            .collect();
        for _ in 0..300 {
            let x = Tensor::from_data(TensorData::new(pixels.clone(), [8, 4]), &device);
            gan.d_step(x, &labels, &mut rng);
            gan.g_step(8, &mut rng);
        }
        let g = gan.sampler();
        let mut mean_of = |class: usize| {
            let ask = vec![class; 50];
            let z = standard_normal(&mut rng, 50 * 4);
            let dev = device.clone().inner();
            let x = g.forward(generator_input(&z, 4, class_rows(&ask, 2, &dev), &dev));
            to_vec(x).iter().sum::<f32>() / 200.0
        };
        let (dark, bright) = (mean_of(0), mean_of(1));
        assert!(
            dark < -0.5 && bright > 0.5,
            "{how:?}: class 0 mean {dark}, class 1 mean {bright}"
        );
    }

    /// `kiln sample --class` takes a class name (any case) or an index; anything else, or a
    /// GAN that is not conditional, is a one-line error naming `--class`.
    #[test]
    fn sample_class_by_name_or_index() {
        let info = GanInfo {
            dataset: "fashion-mnist".into(),
            height: 28,
            width: 28,
            classes: 3,
            class_names: vec!["T-shirt/top".into(), "Trouser".into(), "Bag".into()],
        };
        let run = Path::new("runs/g");
        assert_eq!(info.class_index(run, "bag").unwrap(), 2);
        assert_eq!(info.class_index(run, "Trouser").unwrap(), 1);
        assert_eq!(info.class_index(run, "0").unwrap(), 0);
        let err = info.class_index(run, "3").unwrap_err().to_string();
        assert!(err.starts_with("--class: \"3\" is neither"), "{err}");
        assert!(
            err.contains("T-shirt/top, Trouser, Bag") && err.contains("0–2"),
            "{err}"
        );
        assert_eq!(asked(3, 4, None), vec![0, 1, 2, 0]);
        assert_eq!(asked(3, 2, Some(2)), vec![2, 2]);
        assert!(asked(0, 4, Some(1)).is_empty());
        let plain = GanInfo { classes: 0, ..info };
        let err = plain.class_index(run, "Bag").unwrap_err().to_string();
        assert!(err.contains("is not a class-conditional GAN"), "{err}");
    }

    /// The class term is softmax cross-entropy: for logits (0, ln 3) and class 1 it is
    /// −ln(3/4); for class 0, −ln(1/4).
    #[test]
    fn class_loss_is_softmax_cross_entropy() {
        let dev = Device::flex();
        let a = Tensor::<2>::from_data(
            TensorData::new(vec![0.0f32, 3f32.ln(), 0.0, 3f32.ln()], [2, 2]),
            &dev,
        );
        let got = class_loss(a, one_hot(&[1, 0], 2, &dev)).into_scalar::<f32>();
        let expected = -(0.75f32.ln() + 0.25f32.ln()) / 2.0;
        assert!((got - expected).abs() < 1e-6, "{got} {expected}");
    }

    #[test]
    fn bce_of_logits_matches_the_probability_form() {
        let l = [0.5f32, -2.0];
        let t = Tensor::<2>::from_data(TensorData::new(l.to_vec(), [2, 1]), &Device::flex());
        let got = bce_logits(t, 0.9).into_scalar::<f32>();
        let expected: f32 = l
            .iter()
            .map(|&l| {
                let p = 1.0 / (1.0 + (-l).exp());
                -(0.9 * p.ln() + 0.1 * (1.0 - p).ln())
            })
            .sum::<f32>()
            / 2.0;
        assert!((got - expected).abs() < 1e-5, "{got} {expected}");
    }
}
