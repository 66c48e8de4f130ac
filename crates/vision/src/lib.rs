//! kiln-vision: everything image classifiers share, so that an MLP or a CNN crate only
//! supplies its network ([`ImageNet`]): data sets by name, per-batch normalisation and
//! augmentation, the softmax/cross-entropy task for the shared training loop, the confusion
//! matrix and misclassified-image plots, `predict --image`, and the benchmark.
//!
//! Inputs are normalised per batch: x = (p / scale − μ) / σ, with μ and σ the mean and
//! deviation of the training set's intensities (saved with the run for prediction).

pub mod augment;
pub mod bench;
pub mod gallery;
pub mod judge;

use std::marker::PhantomData;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_core::classify::{self, probabilities};
use kiln_core::data::to_vec;
use kiln_core::plot::{confusion_matrix, image_grid};
use kiln_core::train::{Phase, StepOutput, Supervised, load_model};
use kiln_core::{
    ConfigDoc, Family, Figure, Finished, PredictInput, RunConfig, RunContext, RunDir, metrics,
};
use kiln_datasets::images::{self, ImageData};
use kiln_datasets::{ImageSet, parse_rows};
use rand::rngs::StdRng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use augment::Augment;

/// A network that maps `[batch, channels, height, width]` images (grey: 1 channel, RGB: 3)
/// to `[batch, outputs]` logits.
pub trait ImageNet: Module + Sized + 'static {
    /// The `[params.net]` table of the config.
    type Params: Serialize + DeserializeOwned + Clone + std::fmt::Debug;

    /// Build the network for `channels × height × width` inputs and `outputs` logits, or say
    /// which `params.net` field is wrong.
    fn build_for(
        params: &Self::Params,
        channels: usize,
        height: usize,
        width: usize,
        outputs: usize,
        device: &Device,
    ) -> Result<Self, String>;

    /// [`build_for`](Self::build_for) grey `height × width` inputs.
    fn build(
        params: &Self::Params,
        height: usize,
        width: usize,
        outputs: usize,
        device: &Device,
    ) -> Result<Self, String> {
        Self::build_for(params, 1, height, width, outputs, device)
    }

    /// Logits for a batch of images.
    fn forward(&self, images: Tensor<4>) -> Tensor<2>;

    /// Logits and the activations of the layer before the output (the features a judge of
    /// generated images compares, as FID compares Inception's). Default: the logits for both.
    fn forward_features(&self, images: Tensor<4>) -> (Tensor<2>, Tensor<2>) {
        let logits = self.forward(images);
        (logits.clone(), logits)
    }

    /// One line describing the architecture, for the report.
    fn describe(
        params: &Self::Params,
        channels: usize,
        height: usize,
        width: usize,
        outputs: usize,
    ) -> String;
    /// The Burn path of the classifier layer, which `params.head` replaces and
    /// `freeze = "backbone"` leaves trainable. Default: `output`.
    fn classifier() -> &'static str {
        "output"
    }
    /// The network as ONNX operators on `x` (normalised `[batch, 1, h, w]` images), returning
    /// the logits' name, or why it cannot be exported. Default: no ONNX export.
    fn onnx(&self, g: &mut kiln_core::onnx::Graph, x: &str) -> Result<String, String> {
        let _ = (g, x);
        Err("this network has no ONNX export".into())
    }
    /// The names of this network's weights in its PyTorch twin (`scripts/reference/`), for
    /// `kiln export`. Default: no twin.
    fn torch_names(params: &Self::Params) -> Option<kiln_core::export::TorchNames> {
        let _ = params;
        None
    }
}

/// `[params]` of an image-classifier config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageParams<N> {
    /// Use only the first N training images (0 = all): for quick runs and tests.
    #[serde(default)]
    pub train_limit: usize,
    /// Use only the first N test images (0 = all).
    #[serde(default)]
    pub test_limit: usize,
    #[serde(default)]
    pub augment: Augment,
    /// Start from these weights instead of random ones: a PyTorch `state_dict` (`.pth`, `.pt`)
    /// or a safetensors file with the PyTorch twin's names (torchvision's for `resnet`), or
    /// one written by `kiln export`.
    #[serde(default)]
    pub pretrained: Option<std::path::PathBuf>,
    /// Parameters kept fixed while training: `"backbone"` (everything but the classifier) or
    /// a list of layer names (`["conv1", "bn1", "layer1"]`). Frozen batch norms also keep
    /// their running averages (Keras' `trainable = False`).
    #[serde(default)]
    pub freeze: Option<Freeze>,
    /// A new classifier for a new label set: `{ classes = N }` (N must be the data set's
    /// number of classes); the pretrained file's classifier is not loaded.
    #[serde(default)]
    pub head: Option<Head>,
    /// Folder data (`dataset = "folder:DIR"`): the size images are resized to, `28` (the
    /// default) or `[height, width]`.
    #[serde(default)]
    pub image_size: Option<ImageSize>,
    /// Folder data: `false` keeps the images' stored size (every image must have the same).
    #[serde(default)]
    pub resize: Option<bool>,
    pub net: N,
}

/// `params.image_size`: one side or `[height, width]`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ImageSize {
    Side(usize),
    HeightWidth([usize; 2]),
}

impl<N> ImageParams<N> {
    /// How folder images are sized, from `image_size` and `resize`; a one-line error when
    /// they contradict each other or name a data set that is not a folder.
    pub fn sizing(&self, dataset: &str) -> Result<kiln_datasets::folder::Sizing, String> {
        use kiln_datasets::folder::Sizing;
        if kiln_datasets::folder::dir_of(dataset).is_none()
            && (self.image_size.is_some() || self.resize.is_some())
        {
            return Err(format!(
                "params.{}: only folder data sets (dataset = \"folder:DIR\") are resized; {dataset:?} has its own size",
                if self.image_size.is_some() {
                    "image_size"
                } else {
                    "resize"
                }
            ));
        }
        match (self.resize, self.image_size) {
            (Some(false), Some(_)) => Err(
                "params.image_size: images keep their stored size (params.resize = false)".into(),
            ),
            (Some(false), None) => Ok(Sizing::Keep),
            (_, None) => Ok(Sizing::default()),
            (_, Some(size)) => {
                let [height, width] = match size {
                    ImageSize::Side(s) => [s, s],
                    ImageSize::HeightWidth(hw) => hw,
                };
                if !(1..=1024).contains(&height) || !(1..=1024).contains(&width) {
                    return Err(format!(
                        "params.image_size: sides from 1 to 1024 pixels, got {height}×{width}"
                    ));
                }
                Ok(Sizing::Resize { height, width })
            }
        }
    }
}

/// `params.freeze`: one name or several.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Freeze {
    One(String),
    Many(Vec<String>),
}

impl Freeze {
    fn names(&self) -> Vec<String> {
        match self {
            Freeze::One(n) => vec![n.clone()],
            Freeze::Many(v) => v.clone(),
        }
    }
}

/// `params.head`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub classes: usize,
}

/// Everything needed to turn stored pixels into network inputs; saved as `preprocessing.json`.
/// `mean` and `std` are per channel (one number for grey images, as older runs wrote them).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Preprocessing {
    pub dataset: String,
    pub classes: Vec<String>,
    #[serde(default = "one_channel")]
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub scale: f32,
    #[serde(with = "per_channel")]
    pub mean: Vec<f32>,
    #[serde(with = "per_channel")]
    pub std: Vec<f32>,
}

fn one_channel() -> usize {
    1
}

/// A per-channel statistic: written as one number for one channel, as a list for more.
mod per_channel {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(f32),
        Many(Vec<f32>),
    }

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        match v {
            [one] => OneOrMany::One(*one),
            many => OneOrMany::Many(many.to_vec()),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
        })
    }
}

/// How an input is described in reports: `28×28` (grey) or `3×28×28` (RGB).
pub fn input_size(channels: usize, height: usize, width: usize) -> String {
    if channels == 1 {
        format!("{height}×{width}")
    } else {
        format!("{channels}×{height}×{width}")
    }
}

impl Preprocessing {
    fn outputs(&self) -> usize {
        classify::outputs(self.classes.len())
    }

    /// Pixels per image (all channels).
    pub(crate) fn pixels(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Intensities in [0, 1] of one image (channel after channel) normalised per channel:
    /// x = (v − μ_c) / σ_c.
    pub(crate) fn normalise(&self, values: impl Iterator<Item = f32>, out: &mut Vec<f32>) {
        let plane = self.height * self.width;
        let stats = (self.mean.iter().zip(&self.std)).flat_map(|s| std::iter::repeat_n(s, plane));
        out.extend(values.zip(stats).map(|(v, (m, s))| (v - m) / s));
    }

    /// Normalised intensities of a batch of stored images, as `[batch, channels, h, w]`.
    fn batch(
        &self,
        set: &ImageSet,
        idx: &[usize],
        augment: Option<(&Augment, &mut StdRng)>,
        device: &Device,
    ) -> Tensor<4> {
        let mut buf = Vec::with_capacity(idx.len() * self.pixels());
        let a = 1.0 / self.scale;
        match augment {
            Some((aug, rng)) if aug.enabled() => {
                for &i in idx {
                    let (c, h, w) = (self.channels, self.height, self.width);
                    let img = aug.apply(set.image(i), c, h, w, rng);
                    self.normalise(img.iter().map(|&p| p as f32 * a), &mut buf);
                }
            }
            _ => {
                for &i in idx {
                    self.normalise(set.image(i).iter().map(|&p| p as f32 * a), &mut buf);
                }
            }
        }
        Tensor::from_data(
            TensorData::new(buf, [idx.len(), self.channels, self.height, self.width]),
            device,
        )
    }

    /// Intensities in [0, 1] (not yet normalised) as a `[1, channels, h, w]` input.
    fn input_from_intensities(&self, values: &[f32], device: &Device) -> Tensor<4> {
        let mut buf = Vec::with_capacity(values.len());
        self.normalise(values.iter().copied(), &mut buf);
        Tensor::from_data(
            TensorData::new(buf, [1, self.channels, self.height, self.width]),
            device,
        )
    }

    /// The network for these inputs.
    pub(crate) fn build<N: ImageNet>(
        &self,
        params: &N::Params,
        device: &Device,
    ) -> Result<N, String> {
        N::build_for(
            params,
            self.channels,
            self.height,
            self.width,
            self.outputs(),
            device,
        )
    }
}

/// The classification task the shared loop trains: cross-entropy over softmax outputs, or
/// binary cross-entropy over one sigmoid output when there are two classes.
pub struct ImageTask<'a, N: ImageNet> {
    pub params: &'a N::Params,
    pub pre: &'a Preprocessing,
    pub augment: Augment,
    /// Starting weights (`params.pretrained`), already checked against the network.
    pub start: Option<kiln_core::import::Weights>,
    /// Burn paths (prefixes) of the frozen parameters (`params.freeze`).
    pub frozen: Vec<String>,
}

impl<N: ImageNet> Supervised for ImageTask<'_, N> {
    fn loss_name(&self) -> Option<String> {
        Some(
            if self.pre.classes.len() == 2 {
                "binary cross-entropy"
            } else {
                "cross-entropy"
            }
            .into(),
        )
    }

    type Model = N;
    type Data = ImageSet;

    fn init_model(&self, device: &Device) -> N {
        // Parameters were validated by `build` before training started.
        let model = self
            .pre
            .build::<N>(self.params, device)
            .unwrap_or_else(|e| panic!("network parameters were checked before training: {e}"));
        let mut model = model;
        if let Some(start) = &self.start {
            kiln_core::import::apply(&mut model, start)
                .unwrap_or_else(|e| panic!("pretrained weights were checked before training: {e}"));
        }
        freeze(model, &self.frozen)
    }

    fn len(&self, data: &ImageSet) -> usize {
        data.n
    }

    fn step(
        &self,
        model: &N,
        data: &ImageSet,
        idx: &[usize],
        device: &Device,
        phase: Phase,
        rng: &mut StdRng,
    ) -> StepOutput {
        let aug = (phase == Phase::Train).then_some((&self.augment, rng));
        let x = self.pre.batch(data, idx, aug, device);
        let labels: Vec<i64> = idx.iter().map(|&i| data.labels[i] as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(labels, [idx.len()]), device);
        classify::step(model.forward(x), targets, self.pre.classes.len(), device)
    }
}

/// Probabilities for every image of `set`, row-major `n × classes`.
fn predict_all<N: ImageNet>(
    model: &N,
    pre: &Preprocessing,
    set: &ImageSet,
    device: &Device,
) -> Vec<f32> {
    let idx: Vec<usize> = (0..set.n).collect();
    let mut out = Vec::with_capacity(set.n * pre.classes.len());
    for chunk in idx.chunks(500) {
        out.extend(to_vec(probabilities(
            model.forward(pre.batch(set, chunk, None, device)),
            pre.classes.len(),
        )));
    }
    out
}

fn argmax(p: &[f32]) -> usize {
    (0..p.len())
        .max_by(|&a, &b| p[a].total_cmp(&p[b]))
        .unwrap_or(0)
}

/// A family of image classifiers built from the network `N`.
pub struct ImageFamily<N> {
    name: &'static str,
    about: &'static str,
    default_dataset: &'static str,
    _net: PhantomData<fn() -> N>,
}

impl<N> ImageFamily<N> {
    pub const fn new(
        name: &'static str,
        about: &'static str,
        default_dataset: &'static str,
    ) -> Self {
        ImageFamily {
            name,
            about,
            default_dataset,
            _net: PhantomData,
        }
    }
}

const PREPROCESSING: &str = "preprocessing.json";
/// Data sets are found in and downloaded to `data/` of the working directory.
const DATA_ROOT: &str = "data";
/// `dataset = "auto"`: MNIST, else Fashion-MNIST, else the digits (see `images::choose_auto`).
const AUTO: &str = "auto";

impl<N: ImageNet> ImageFamily<N> {
    fn config(&self, doc: &ConfigDoc) -> Result<RunConfig<ImageParams<N::Params>>> {
        Ok(doc.typed()?)
    }

    fn dataset(&self, cfg: &RunConfig<ImageParams<N::Params>>) -> String {
        cfg.dataset
            .clone()
            .unwrap_or_else(|| self.default_dataset.to_string())
    }

    /// The data set of a config, with the limits applied.
    fn load(&self, cfg: &RunConfig<ImageParams<N::Params>>) -> Result<ImageData> {
        let dataset = self.dataset(cfg);
        load_dataset(
            &dataset,
            cfg.data_dir.as_deref(),
            (cfg.params.train_limit, cfg.params.test_limit),
            cfg.params.sizing(&dataset).map_err(anyhow::Error::msg)?,
        )
    }

    fn check_net(
        &self,
        doc: &ConfigDoc,
        params: &N::Params,
        (c, h, w): (usize, usize, usize),
        outputs: usize,
    ) -> Result<()> {
        N::build_for(params, c, h, w, outputs, &Device::flex())
            .map(|_| ())
            .map_err(|e| anyhow!("{}: params.net: {e}", doc.source.display()))
    }
}

/// `model` with the parameters under `frozen` (Burn path prefixes) fixed: no gradient, no
/// optimizer state, and their batch norms in evaluation mode.
pub fn freeze<M: Module>(model: M, frozen: &[String]) -> M {
    if frozen.is_empty() {
        return model;
    }
    let patterns: Vec<String> = frozen
        .iter()
        .map(|p| format!("^{}(\\.|$)", p.replace('.', "\\.")))
        .collect();
    match burn::module::ParamGroup::from_any_regexes(patterns) {
        Ok(group) => model.freeze_group(group),
        Err(e) => panic!("frozen layer names were checked before training: {e:?}"),
    }
}

impl<N: ImageNet> ImageFamily<N> {
    /// `params.pretrained`'s weights, loaded into the network and read back in Burn's names
    /// and layout, or `None`.
    fn start_weights(
        &self,
        cfg: &RunConfig<ImageParams<N::Params>>,
        pre: &Preprocessing,
    ) -> Result<Option<kiln_core::import::Weights>> {
        let Some(file) = &cfg.params.pretrained else {
            return Ok(None);
        };
        let mut net = pre
            .build::<N>(&cfg.params.net, &Device::flex())
            .map_err(|e| anyhow!("params.net: {e}"))?;
        let names = N::torch_names(&cfg.params.net);
        let skip: Vec<String> = match &cfg.params.head {
            Some(_) => vec![N::classifier().to_string()],
            None => Vec::new(),
        };
        let loaded =
            kiln_core::import::load(&mut net, file, names.as_ref(), &skip).map_err(|e| {
                let hint = if cfg.params.head.is_none() && format!("{e}").contains(" is [") {
                    format!(
                        "; for a new label set set params.head = {{ classes = {} }}",
                        pre.classes.len()
                    )
                } else {
                    String::new()
                };
                anyhow!("{}: params.pretrained: {e:#}{hint}", file.display())
            })?;
        eprintln!(
            "{}: {} tensors loaded{}",
            file.display(),
            loaded.applied,
            if loaded.skipped > 0 {
                format!(", a new classifier for {} classes", pre.classes.len())
            } else {
                String::new()
            }
        );
        Ok(Some(kiln_core::import::snapshot(&net)?))
    }

    /// `params.freeze` as Burn path prefixes, each checked to name a part of the network.
    fn frozen(
        &self,
        doc: &ConfigDoc,
        cfg: &RunConfig<ImageParams<N::Params>>,
        pre: &Preprocessing,
    ) -> Result<Vec<String>> {
        let Some(freeze) = &cfg.params.freeze else {
            return Ok(Vec::new());
        };
        let net = pre
            .build::<N>(&cfg.params.net, &Device::flex())
            .map_err(|e| anyhow!("params.net: {e}"))?;
        let names = kiln_core::import::tensor_names(&net);
        let mut tops: Vec<String> = Vec::new();
        for n in &names {
            let top = n.split('.').next().unwrap_or(n).to_string();
            if !tops.contains(&top) {
                tops.push(top);
            }
        }
        let mut out = Vec::new();
        for name in freeze.names() {
            if name == "backbone" {
                out.extend(tops.iter().filter(|t| *t != N::classifier()).cloned());
                continue;
            }
            let ok = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                && names
                    .iter()
                    .any(|n| n == &name || n.starts_with(&format!("{name}.")));
            if !ok {
                bail!(
                    "{}: params.freeze: no layer {name:?} in this network (its layers: backbone, {})",
                    doc.source.display(),
                    tops.join(", ")
                );
            }
            out.push(name);
        }
        Ok(out)
    }
}

/// The training set's mean and deviation of the intensities, per channel.
fn preprocessing(data: &ImageData, dataset: &str) -> Preprocessing {
    let set = &data.train;
    let channels = set.channels.max(1);
    let plane = set.height * set.width;
    let scale = data.scale as f64;
    let (mut mean, mut std) = (Vec::new(), Vec::new());
    for c in 0..channels {
        let values = || {
            (0..set.n).flat_map(move |i| {
                set.image(i)[c * plane..(c + 1) * plane]
                    .iter()
                    .map(move |&p| p as f64 / scale)
            })
        };
        let n = (set.n * plane).max(1) as f64;
        let m = values().sum::<f64>() / n;
        let var = values().map(|v| (v - m).powi(2)).sum::<f64>() / n;
        mean.push(m as f32);
        std.push(if var > 0.0 { var.sqrt() as f32 } else { 1.0 });
    }
    Preprocessing {
        dataset: dataset.to_string(),
        classes: data.classes.clone(),
        channels,
        height: set.height,
        width: set.width,
        scale: data.scale,
        mean,
        std,
    }
}

impl<N: ImageNet> Family for ImageFamily<N> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn about(&self) -> &'static str {
        self.about
    }

    fn resolve(&self, doc: &mut ConfigDoc) -> Result<()> {
        resolve_dataset(doc, self.default_dataset)
    }

    fn check(&self, doc: &ConfigDoc) -> Result<()> {
        let cfg = self.config(doc)?;
        let dataset = self.dataset(&cfg);
        let sizing = cfg
            .params
            .sizing(&dataset)
            .map_err(|e| anyhow!("{}: {e}", doc.source.display()))?;
        let (c, h, w, classes) = dataset_shape(doc, &dataset, sizing)?;
        self.check_net(doc, &cfg.params.net, (c, h, w), classify::outputs(classes))
    }

    fn train(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = self.config(&ctx.doc)?;
        let data = self.load(&cfg)?;
        let pre = preprocessing(&data, &self.dataset(&cfg));
        let outputs = pre.outputs();
        self.check_net(
            &ctx.doc,
            &cfg.params.net,
            (pre.channels, pre.height, pre.width),
            outputs,
        )?;
        ctx.run.write_json(PREPROCESSING, &pre)?;
        let (train, val) = holdout_last(&data.train, cfg.train.validation_split);
        eprintln!(
            "{}: {} training images, {} validation (the end of the training split), {} test ({}), {} classes",
            data.name,
            train.n,
            val.n,
            data.test.n,
            input_size(pre.channels, pre.height, pre.width),
            pre.classes.len()
        );
        if let Some(head) = &cfg.params.head
            && head.classes != pre.classes.len()
        {
            bail!(
                "{}: params.head.classes: {} but the data set has {} classes",
                ctx.doc.source.display(),
                head.classes,
                pre.classes.len()
            );
        }
        let task = ImageTask::<N> {
            params: &cfg.params.net,
            pre: &pre,
            augment: cfg.params.augment,
            start: self.start_weights(&cfg, &pre)?,
            frozen: self.frozen(&ctx.doc, &cfg, &pre)?,
        };
        let (fitted, model, device) = ctx.fit(&cfg, &task, &train, &val)?;
        let test = test_set(&ctx.run, &model, &pre, &data, &device)?;
        let arch = N::describe(
            &cfg.params.net,
            pre.channels,
            pre.height,
            pre.width,
            outputs,
        );
        let fields = json!({
            "dataset": pre.dataset,
            "dataset_requested": cfg.dataset_requested.clone().unwrap_or_else(|| self.dataset(&cfg)),
            "architecture": arch,
            "parameters": model.num_params(),
            "train_examples": train.n,
            "test_examples": data.test.n,
            "test": {"accuracy": test.accuracy, "confusion": test.confusion},
            "inference_images_per_second": data.test.n as f64 / test.seconds.max(1e-9),
        });
        let data_row = format!(
            "{} ({} train / {} validation, the last {:.0}% of the training split / {} test){}",
            data.name,
            train.n,
            val.n,
            cfg.train.validation_split * 100.0,
            data.test.n,
            match &cfg.dataset_requested {
                Some(r) if *r != pre.dataset => format!(
                    "; `dataset = \"{r}\"` chose it ({})",
                    dataset_reason(&pre.dataset)
                ),
                _ => String::new(),
            }
        );
        let done = Finished {
            title: format!("{} on {}", self.name.to_uppercase(), data.name),
            fields,
            headline: vec![Figure::percent("test.accuracy", "test accuracy", test.accuracy)],
            rows: vec![
                ("data set".into(), data_row),
                ("network".into(), arch),
                ("parameters".into(), model.num_params().to_string()),
            ],
            examples: "images",
            notes: "Confusion matrix: `confusion_matrix.png`. Misclassified test images: `misclassified.png`.\n".into(),
        };
        ctx.finish(cfg.backend.as_str(), &fitted, done)
    }

    fn eval(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = self.config(&ctx.doc)?;
        let pre = ctx.run.read_json::<Preprocessing>(PREPROCESSING)?;
        let data = self.load(&cfg)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = self.load_model(&ctx.run, &cfg, &pre, &device)?;
        let probs = predict_all(&model, &pre, &data.test, &device);
        let predicted: Vec<usize> = probs.chunks(pre.classes.len()).map(argmax).collect();
        let labels: Vec<usize> = data.test.labels.iter().map(|&l| l as usize).collect();
        Ok(
            json!({"test": {"accuracy": metrics::accuracy(&labels, &predicted), "examples": labels.len()}}),
        )
    }

    fn predict(&self, ctx: &RunContext, input: &PredictInput) -> Result<String> {
        let cfg = self.config(&ctx.doc)?;
        let pre = ctx.run.read_json::<Preprocessing>(PREPROCESSING)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = self.load_model(&ctx.run, &cfg, &pre, &device)?;
        let rows: Vec<Vec<f32>> = match input {
            PredictInput::Image(path) => vec![read_image(path, &pre)?],
            PredictInput::Values(text) => {
                let names: Vec<String> = (0..pre.pixels()).map(|i| format!("x{i}")).collect();
                let n = names.len();
                let names = if n <= 8 {
                    names
                } else {
                    vec![format!("{n} intensities in [0, 1]")]
                };
                parse_rows(text, n, &names)?
                    .into_iter()
                    .map(|r| r.into_iter().map(|v| v as f32).collect())
                    .collect()
            }
        };
        let mut lines = Vec::new();
        for row in rows {
            let p = to_vec(probabilities(
                model.forward(pre.input_from_intensities(&row, &device)),
                pre.classes.len(),
            ));
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let top: Vec<String> = order
                .iter()
                .take(3)
                .map(|&c| format!("{} {:.3}", pre.classes[c], p[c]))
                .collect();
            lines.push(top.join(", "));
        }
        Ok(lines.join("\n"))
    }

    fn bench(&self, doc: &ConfigDoc, batches: usize) -> Result<kiln_core::train::Benchmark> {
        self.benchmark(doc, batches)
    }

    fn classifier(&self) -> Option<&dyn kiln_core::classify::OpenClassifier> {
        Some(self)
    }

    fn torch_names(&self, ctx: &RunContext) -> Result<Option<kiln_core::export::TorchNames>> {
        Ok(N::torch_names(&self.config(&ctx.doc)?.params.net))
    }

    /// Input `pixels` `[batch, 1, h, w]`: intensities in [0, 1] (the training set's polarity);
    /// the graph normalises them, x = (p − μ) / σ, runs the network and ends in softmax (or a
    /// sigmoid for two classes): output `probabilities` `[batch, classes]` (`[batch, 1]`, the
    /// second class's, for two).
    fn onnx(&self, ctx: &RunContext) -> Result<Option<kiln_core::onnx::OnnxExport>> {
        use kiln_core::onnx::{Attr, Graph};
        let cfg = self.config(&ctx.doc)?;
        let pre = ctx.run.read_json::<Preprocessing>(PREPROCESSING)?;
        let device = Device::flex();
        let model = self.load_model(&ctx.run, &cfg, &pre, &device)?;
        let mut g = Graph::new("pixels", &[pre.channels, pre.height, pre.width]);
        // One number for grey images; [1, C, 1, 1] (broadcast over the pixels) per channel.
        let dims: &[usize] = if pre.channels == 1 {
            &[]
        } else {
            &[1, pre.channels, 1, 1]
        };
        let mean = g.constant("normalise.mean", dims, &pre.mean);
        let std = g.constant("normalise.std", dims, &pre.std);
        let x = g.node("Sub", &["pixels", &mean], &[]);
        let x = g.node("Div", &[&x, &std], &[]);
        let logits = model
            .onnx(&mut g, &x)
            .map_err(|e| anyhow!("{}: {e}", ctx.run.path().display()))?;
        let outputs = pre.outputs();
        let probs = if outputs == 1 {
            g.node_as("Sigmoid", &[&logits], &[], "probabilities")
        } else {
            g.node_as(
                "Softmax",
                &[&logits],
                &[Attr::Int("axis", 1)],
                "probabilities",
            )
        };
        // The first 8 test images and kiln's probabilities for them.
        let data = self.load(&cfg)?;
        let n = data.test.n.min(8);
        let idx: Vec<usize> = (0..n).collect();
        let pixels: Vec<f32> = idx
            .iter()
            .flat_map(|&i| data.test.intensities(i, pre.scale))
            .collect();
        let x = pre.batch(&data.test, &idx, None, &device);
        let logits = model.forward(x);
        let p = to_vec(if outputs == 1 {
            burn::tensor::activation::sigmoid(logits)
        } else {
            burn::tensor::activation::softmax(logits, 1)
        });
        Ok(Some(kiln_core::onnx::OnnxExport {
            model: g.finish(&probs, &[outputs]),
            sample: vec![
                (
                    "pixels".into(),
                    vec![n, pre.channels, pre.height, pre.width],
                    pixels,
                ),
                ("probabilities".into(), vec![n, outputs], p),
            ],
        }))
    }
}

/// A classifier's numbers on the test set.
struct TestSet {
    accuracy: f64,
    confusion: Vec<Vec<usize>>,
    /// Seconds the predictions took.
    seconds: f64,
}

/// Predict the test set, and draw `confusion_matrix.png` and `misclassified.png`.
fn test_set<N: ImageNet>(
    run: &RunDir,
    model: &N,
    pre: &Preprocessing,
    data: &ImageData,
    device: &Device,
) -> Result<TestSet> {
    let started = std::time::Instant::now();
    let probs = predict_all(model, pre, &data.test, device);
    let seconds = started.elapsed().as_secs_f64();
    let k = pre.classes.len();
    let predicted: Vec<usize> = probs.chunks(k).map(argmax).collect();
    let labels: Vec<usize> = data.test.labels.iter().map(|&l| l as usize).collect();
    let accuracy = metrics::accuracy(&labels, &predicted);
    let confusion = metrics::confusion(&labels, &predicted, k);
    confusion_matrix(
        &run.file("confusion_matrix.png"),
        &format!("{} test confusion matrix", data.name),
        &pre.classes,
        &confusion,
    )?;
    let wrong: Vec<usize> = (0..data.test.n)
        .filter(|&i| predicted[i] != labels[i])
        .collect();
    let shown: Vec<(Vec<f32>, usize, usize, String)> = wrong
        .iter()
        .take(36)
        .map(|&i| {
            let label = format!(
                "{}→{}",
                short(&pre.classes[labels[i]]),
                short(&pre.classes[predicted[i]])
            );
            (
                data.test.intensities(i, pre.scale),
                pre.height,
                pre.width,
                label,
            )
        })
        .collect();
    image_grid(
        &run.file("misclassified.png"),
        &format!(
            "Misclassified test images (true→predicted), {} of {}",
            shown.len(),
            wrong.len()
        ),
        &shown,
        9,
    )?;
    Ok(TestSet {
        accuracy,
        confusion,
        seconds,
    })
}

impl<N: ImageNet> ImageFamily<N> {
    fn load_model(
        &self,
        run: &RunDir,
        cfg: &RunConfig<ImageParams<N::Params>>,
        pre: &Preprocessing,
        device: &Device,
    ) -> Result<N> {
        let net = pre
            .build::<N>(&cfg.params.net, device)
            .map_err(|e| anyhow!("params.net: {e}"))?;
        load_model(run, net)
    }
}

/// Settle `dataset = "auto"` (or an absent `dataset` whose default is `auto`) in the config
/// document: MNIST, else Fashion-MNIST, else the digits ([`images::choose_auto`]), announced
/// on stderr and recorded as `dataset` and `dataset_requested`.
pub fn resolve_dataset(doc: &mut ConfigDoc, default: &str) -> Result<()> {
    let cfg: RunConfig<serde::de::IgnoredAny> = doc.typed()?;
    if cfg.dataset.as_deref().unwrap_or(default) != AUTO {
        return Ok(());
    }
    let choice = images::choose_auto(cfg.data_dir.as_deref(), Path::new(DATA_ROOT));
    if let Some(note) = &choice.note {
        eprintln!("{note}");
    }
    doc.set(&format!("dataset=\"{}\"", choice.dataset))?;
    doc.set(&format!("dataset_requested=\"{AUTO}\""))?;
    Ok(())
}

/// `(height, width, classes)` of a data set by its config name, or a config error naming
/// `dataset`. Before `resolve`, `auto` has MNIST's shape (what it usually becomes).
/// `(channels, height, width, classes)` of a config's data set, without loading it.
pub fn dataset_shape(
    doc: &ConfigDoc,
    dataset: &str,
    sizing: kiln_datasets::folder::Sizing,
) -> Result<(usize, usize, usize, usize)> {
    let bad = |e: anyhow::Error| anyhow!("{}: dataset = {dataset:?}: {e:#}", doc.source.display());
    if let Some(dir) = kiln_datasets::folder::dir_of(dataset) {
        return kiln_datasets::folder::shape(dir, sizing).map_err(bad);
    }
    let grey = |(h, w, k)| (1, h, w, k);
    if let Some((train, _)) = kiln_datasets::pixel_csv::files_of(dataset) {
        return kiln_datasets::pixel_csv::shape(train)
            .map(grey)
            .map_err(bad);
    }
    let name = if dataset == AUTO { "mnist" } else { dataset };
    images::shape(name).map(grey).ok_or_else(|| {
        anyhow!(
            "{}: dataset: unknown dataset {dataset:?} (expected auto, mnist, fashion-mnist, digits, xor, folder:DIR or csv:FILE)",
            doc.source.display()
        )
    })
}

/// A data set by its config name from `data/` (or `data_dir`), the first `train_limit` and
/// `test_limit` images kept (`0` keeps all).
/// [`dataset_shape`] for the families that model grey images only (autoencoders, GANs):
/// `(height, width, classes)`, or a one-line error for colour images.
pub fn grey_dataset_shape(
    doc: &ConfigDoc,
    dataset: &str,
    family: &str,
) -> Result<(usize, usize, usize)> {
    let (c, h, w, k) = dataset_shape(doc, dataset, Default::default())?;
    if c != 1 {
        bail!(
            "{}: dataset = {dataset:?}: colour images ({c} channels); {family} models grey images (the classifiers take colour)",
            doc.source.display()
        );
    }
    Ok((h, w, k))
}

/// A data set with its limits (the first N training and test images; 0: all) applied, folder
/// images sized as `sizing` says.
pub fn load_dataset(
    dataset: &str,
    data_dir: Option<&Path>,
    (train_limit, test_limit): (usize, usize),
    sizing: kiln_datasets::folder::Sizing,
) -> Result<ImageData> {
    let mut data = images::load(dataset, data_dir, Path::new(DATA_ROOT), sizing)?;
    data.train = data.train.truncate(train_limit);
    data.test = data.test.truncate(test_limit);
    Ok(data)
}

/// Training images split into (train, validation): the last `fraction` of the official
/// training split is held out, the same images for every seed (MNIST-style files are already
/// shuffled; the digits' training part is in file order). `0` holds out nothing. The test set
/// is never used for validation: it is evaluated once, at the end.
pub fn holdout_last(set: &ImageSet, fraction: f64) -> (ImageSet, ImageSet) {
    let n_val = ((set.n as f64) * fraction).round() as usize;
    let n_train = set.n - n_val.min(set.n);
    let train: Vec<usize> = (0..n_train).collect();
    let val: Vec<usize> = (n_train..set.n).collect();
    (set.select(&train), set.select(&val))
}

/// The images `idx` of `set` as `[batch, h·w]` values a·p + b of their stored pixels p (the
/// generative models' inputs: a = 1/scale for [0, 1], a = 2/scale, b = −1 for [−1, 1]).
pub fn flat_batch(set: &ImageSet, idx: &[usize], a: f32, b: f32, device: &Device) -> Tensor<2> {
    let d = set.pixels_per_image();
    let mut buf = Vec::with_capacity(idx.len() * d);
    for &i in idx {
        buf.extend(set.image(i).iter().map(|&p| p as f32 * a + b));
    }
    Tensor::from_data(TensorData::new(buf, [idx.len(), d]), device)
}

/// Why `dataset = "auto"` settled on `dataset` (the order of `images::choose_auto`).
fn dataset_reason(dataset: &str) -> &'static str {
    match dataset {
        "mnist" => "MNIST was found or downloaded",
        "fashion-mnist" => "MNIST was not available offline; Fashion-MNIST is installed",
        _ => "neither MNIST nor Fashion-MNIST was available",
    }
}

fn short(name: &str) -> &str {
    name.split(['/', ' ']).next().unwrap_or(name)
}

/// A user's PNG or JPEG of any size as the network's intensities in [0, 1], resized to the
/// training images' `h × w`: for a grey network in the training set's polarity (MNIST-style
/// sets are light strokes on a dark background, so a photo of dark ink on light paper — a
/// bright border — is inverted); for a colour one its red, green and blue planes.
pub fn read_image(path: &Path, pre: &Preprocessing) -> Result<Vec<f32>> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .decode()
        .map_err(|e| anyhow!("{}: not a readable PNG or JPEG image ({e})", path.display()))?;
    let (h, w) = (pre.height, pre.width);
    let filter = image::imageops::FilterType::Triangle;
    if pre.channels == 3 {
        let rgb = image::imageops::resize(&img.to_rgb8(), w as u32, h as u32, filter).into_raw();
        return Ok((0..3)
            .flat_map(|c| rgb.iter().skip(c).step_by(3).map(|&p| p as f32 / 255.0))
            .collect());
    }
    let gray = image::imageops::resize(&img.to_luma8(), w as u32, h as u32, filter);
    let mut v: Vec<f32> = gray.pixels().map(|p| p.0[0] as f32 / 255.0).collect();
    let border: Vec<f32> = (0..h * w)
        .filter(|&i| i / w == 0 || i / w == h - 1 || i % w == 0 || i % w == w - 1)
        .map(|i| v[i])
        .collect();
    let border_mean = border.iter().sum::<f32>() / border.len().max(1) as f32;
    if (border_mean > 0.5) != (pre.mean[0] > 0.5) {
        v.iter_mut().for_each(|x| *x = 1.0 - *x);
    }
    Ok(v)
}

pub fn parity_batch(n: usize) -> (ImageSet, Preprocessing) {
    let (h, w) = (28, 28);
    let mut state = 0x9E37_79B9_u32;
    let pixels = (0..n * h * w)
        .map(|_| {
            // xorshift32: the same bytes on every machine, no generator crate involved.
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    let set = ImageSet {
        n,
        channels: 1,
        height: h,
        width: w,
        pixels,
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
    };
    let pre = Preprocessing {
        dataset: "parity".into(),
        classes: (0..10).map(|c| c.to_string()).collect(),
        channels: 1,
        height: h,
        width: w,
        scale: 255.0,
        mean: vec![0.5],
        std: vec![0.25],
    };
    (set, pre)
}

#[cfg(feature = "testing")]
/// One training step of network `N` with `params` on [`parity_batch`]`(n)`, from the same
/// weights (initialised on flex with seed 7), on flex and on `other` (several devices: data
/// parallel, the batch shared among them) — what the cross-device parity tests compare with
/// [`kiln_core::train::steps_agree`].
pub fn parity_steps<N: ImageNet>(
    params: &N::Params,
    n: usize,
    learning_rate: f64,
    other: &[Device],
) -> (kiln_core::train::StepResult, kiln_core::train::StepResult) {
    let idx: Vec<usize> = (0..n).collect();
    let mut steps = parity_runs::<N>(
        params,
        n,
        learning_rate,
        &[(&idx, &[Device::flex()]), (&idx, other)],
    );
    let b = steps.remove(1);
    (steps.remove(0), b)
}

#[cfg(feature = "testing")]
/// Steps of [`parity_steps`] from one initialisation: for each `(examples, devices)` of
/// `runs`, one step on those examples of [`parity_batch`]`(n)` on those devices. The weights
/// are drawn once, so the steps start from the same ones even while other tests draw from
/// flex's generator in parallel.
pub fn parity_runs<N: ImageNet>(
    params: &N::Params,
    n: usize,
    learning_rate: f64,
    runs: &[(&[usize], &[Device])],
) -> Vec<kiln_core::train::StepResult> {
    let (set, pre) = parity_batch(n);
    let task = ImageTask::<N> {
        params,
        pre: &pre,
        augment: Augment::default(),
        start: None,
        frozen: Vec::new(),
    };
    let flex = Device::flex().autodiff();
    flex.seed(7);
    let model = task.init_model(&flex);
    runs.iter()
        .map(|(idx, devices)| {
            kiln_core::train::one_step_on_devices(
                &task,
                &model,
                &set,
                idx,
                devices,
                learning_rate,
                1,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run written before colour (one mean, one deviation, no `channels`) reads as grey, and
    /// a colour one round-trips with its per-channel statistics; normalisation uses each
    /// channel's own.
    #[test]
    fn preprocessing_is_per_channel_and_reads_older_runs() {
        let old = r#"{"dataset": "mnist", "classes": ["0", "1"], "height": 1, "width": 2,
            "scale": 255.0, "mean": 0.5, "std": 0.25}"#;
        let pre: Preprocessing = serde_json::from_str(old).unwrap();
        assert_eq!(
            (pre.channels, &pre.mean, &pre.std),
            (1, &vec![0.5], &vec![0.25])
        );
        assert!(
            serde_json::to_string(&pre)
                .unwrap()
                .contains(r#""mean":0.5"#)
        );
        let colour = Preprocessing {
            channels: 3,
            mean: vec![0.0, 0.5, 1.0],
            std: vec![1.0, 0.5, 0.25],
            ..pre
        };
        let back: Preprocessing =
            serde_json::from_str(&serde_json::to_string(&colour).unwrap()).unwrap();
        assert_eq!(back, colour);
        let mut out = Vec::new();
        colour.normalise([1.0, 1.0, 1.0, 1.0, 1.0, 1.0].into_iter(), &mut out);
        assert_eq!(out, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn augmentation_moves_every_channel_alike() {
        use rand::SeedableRng;
        let aug = Augment {
            shift: 2,
            rotate_degrees: 30.0,
            flip: true,
        };
        let plane: Vec<u8> = (0..25).collect();
        let img: Vec<u8> = [plane.clone(), plane.clone(), plane].concat();
        let out = aug.apply(&img, 3, 5, 5, &mut StdRng::seed_from_u64(7));
        assert_eq!(out.len(), 75);
        assert_ne!(&out[..25], &img[..25], "seed 7 moves the picture");
        assert_eq!(&out[..25], &out[25..50]);
        assert_eq!(&out[..25], &out[50..]);
    }

    #[test]
    fn holdout_is_the_last_part() {
        let set = ImageSet {
            n: 10,
            channels: 1,
            height: 1,
            width: 1,
            pixels: (0..10).collect(),
            labels: vec![0; 10],
        };
        let (tr, va) = holdout_last(&set, 0.2);
        assert_eq!((tr.n, va.n), (8, 2));
        assert_eq!(va.pixels, vec![8, 9]);
    }
}
