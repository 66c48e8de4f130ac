//! Autoencoder and variational autoencoder (course deck 3, generative models): compress an
//! image into a small code and decode it back; the VAE makes the code space smooth so that
//! decoding a random code gives a new image. The network and the losses are in [`net`].
//!
//! Both train on kiln's shared loop ([`Supervised`]; the target is the input itself) and draw
//! pictures after every epoch: `reconstructions.png` (validation images above their
//! reconstructions) and, for the VAE, `samples-epoch-NNN.png` decoded from one fixed batch of
//! codes z ~ N(0, I), the same every epoch so progress shows. At the end: test loss,
//! reconstructions of test images, an interpolation strip between two test images, and for a
//! 2-d code the test codes coloured by class (`latent.png`) and the decoded manifold
//! (`manifold.png`).

pub mod net;

use anyhow::{Result, anyhow, bail};
use burn::module::Module;
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor, TensorData};
use kiln_core::data::to_vec;
use kiln_core::nn::standard_normal;
use kiln_core::plot::{GridText, labelled_tiles, scatter};
use kiln_core::run::RunDir;
use kiln_core::train::{Benchmark, Phase, StepOutput, Supervised, benchmark, evaluate, load_model};
use kiln_core::{
    ConfigDoc, Family, Figure, Finished, PredictInput, RunConfig, RunContext, SampleRequest,
};
use kiln_datasets::{ImageData, ImageSet};
use kiln_vision::gallery::{tiles, zoom};
use kiln_vision::{flat_batch, grey_dataset_shape, holdout_last, load_dataset, resolve_dataset};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::PathBuf;

use net::{AutoencoderNet, NetParams, bce_per_image, kl_per_image};

/// `[params]` of an autoencoder or VAE config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AeParams {
    /// Use only the first N training images (0 = all): for quick runs and tests.
    #[serde(default)]
    pub train_limit: usize,
    /// Use only the first N test images (0 = all).
    #[serde(default)]
    pub test_limit: usize,
    pub net: NetParams,
}

/// What `sample`, `predict` and `eval` need besides the weights; saved as `generative.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenInfo {
    pub dataset: String,
    pub classes: Vec<String>,
    pub height: usize,
    pub width: usize,
    pub scale: f32,
    pub variational: bool,
    /// Per code dimension: mean and deviation of the training images' codes. The VAE samples
    /// from its prior N(0, I); the plain autoencoder has none, so it samples from this fit.
    pub code_mean: Vec<f32>,
    pub code_std: Vec<f32>,
}

const INFO: &str = "generative.json";
/// Samples drawn every epoch from the same codes.
const FIXED_SAMPLES: usize = 64;
const PREVIEW: usize = 10;

/// Intensities p/scale ∈ [0, 1] of the images `idx`, as `[batch, h·w]`.
fn batch(set: &ImageSet, idx: &[usize], scale: f32, device: &Device) -> Tensor<2> {
    flat_batch(set, idx, 1.0 / scale, 0.0, device)
}

/// The reconstruction task: the target is the input.
pub struct AeTask<'a> {
    pub params: &'a NetParams,
    pub info: &'a GenInfo,
    /// Validation images shown in `reconstructions.png` after every epoch.
    pub preview: ImageSet,
    /// `[FIXED_SAMPLES × latent]` codes decoded into `samples-epoch-NNN.png` (VAE).
    pub fixed_z: Vec<f32>,
}

impl AeTask<'_> {
    fn decode_images(&self, model: &AutoencoderNet, z: Tensor<2>) -> Vec<Vec<f32>> {
        let d = self.info.height * self.info.width;
        to_vec(sigmoid(model.decode(z)))
            .chunks(d)
            .map(<[f32]>::to_vec)
            .collect()
    }

    /// Two rows: images of `set` above their reconstructions from μ.
    fn reconstructions(
        &self,
        model: &AutoencoderNet,
        set: &ImageSet,
        path: &std::path::Path,
        device: &Device,
    ) -> Result<()> {
        let idx: Vec<usize> = (0..set.n.min(PREVIEW)).collect();
        let x = batch(set, &idx, self.info.scale, device);
        let mut images: Vec<Vec<f32>> = to_vec(x.clone())
            .chunks(set.pixels_per_image())
            .map(<[f32]>::to_vec)
            .collect();
        images.extend(self.decode_images(model, model.encode(x).mu));
        tiles(
            path,
            &images,
            self.info.height,
            self.info.width,
            idx.len(),
            zoom(self.info.height),
        )
    }
}

impl Supervised for AeTask<'_> {
    fn loss_name(&self) -> Option<String> {
        Some(
            if self.info.variational {
                "BCE + KL per image"
            } else {
                "BCE per image"
            }
            .into(),
        )
    }

    type Model = AutoencoderNet;
    type Data = ImageSet;

    fn init_model(&self, device: &Device) -> AutoencoderNet {
        AutoencoderNet::new(
            self.params,
            self.info.height,
            self.info.width,
            self.info.variational,
            device,
        )
    }

    fn len(&self, data: &ImageSet) -> usize {
        data.n
    }

    /// Loss per image, averaged over the batch: BCE (+ KL for the VAE, with z = μ + σ ⊙ ε and
    /// ε drawn on the host from the epoch's generator, in both phases).
    fn step(
        &self,
        model: &AutoencoderNet,
        data: &ImageSet,
        idx: &[usize],
        device: &Device,
        _phase: Phase,
        rng: &mut StdRng,
    ) -> StepOutput {
        let x = batch(data, idx, self.info.scale, device);
        let enc = model.encode(x.clone());
        let (z, kl) = match enc.log_var {
            Some(log_var) => {
                let [b, k] = enc.mu.dims();
                let eps = Tensor::<2>::from_data(
                    TensorData::new(standard_normal(rng, b * k), [b, k]),
                    device,
                );
                let sigma = log_var.clone().mul_scalar(0.5).exp();
                let z = enc.mu.clone() + sigma * eps;
                (z, Some(kl_per_image(enc.mu, log_var)))
            }
            None => (enc.mu, None),
        };
        let bce = bce_per_image(model.decode(z), x);
        match kl {
            Some(kl) => {
                let (bce, kl) = (bce.mean(), kl.mean());
                StepOutput {
                    loss: bce.clone() + kl.clone(),
                    correct: None,
                    extra: vec![("bce", bce.detach()), ("kl", kl.detach())],
                }
            }
            None => StepOutput::loss(bce.mean()),
        }
    }

    fn after_epoch(
        &self,
        model: &AutoencoderNet,
        epoch: usize,
        run: &RunDir,
        device: &Device,
    ) -> Result<Vec<(String, PathBuf)>> {
        self.reconstructions(
            model,
            &self.preview,
            &run.file("reconstructions.png"),
            device,
        )?;
        let mut pictures = vec![(
            "reconstructions".to_string(),
            run.file("reconstructions.png"),
        )];
        if self.info.variational {
            let k = model.latent();
            let z = Tensor::from_data(
                TensorData::new(self.fixed_z.clone(), [FIXED_SAMPLES, k]),
                device,
            );
            let path = run.file(&format!("samples-epoch-{epoch:03}.png"));
            tiles(
                &path,
                &self.decode_images(model, z),
                self.info.height,
                self.info.width,
                8,
                zoom(self.info.height),
            )?;
            pictures.push(("samples".into(), path));
        }
        Ok(pictures)
    }
}

/// The autoencoder (`variational = false`) or the VAE.
pub struct AutoencoderFamily {
    pub variational: bool,
}

pub static AUTOENCODER: AutoencoderFamily = AutoencoderFamily { variational: false };
pub static VAE: AutoencoderFamily = AutoencoderFamily { variational: true };

/// The default data set when a config names none.
const DEFAULT_DATASET: &str = "auto";

impl AutoencoderFamily {
    fn config(&self, doc: &ConfigDoc) -> Result<RunConfig<AeParams>> {
        Ok(doc.typed()?)
    }

    fn dataset(cfg: &RunConfig<AeParams>) -> String {
        cfg.dataset
            .clone()
            .unwrap_or_else(|| DEFAULT_DATASET.to_string())
    }

    fn load(&self, cfg: &RunConfig<AeParams>) -> Result<ImageData> {
        load_dataset(
            &Self::dataset(cfg),
            cfg.data_dir.as_deref(),
            (cfg.params.train_limit, cfg.params.test_limit),
            Default::default(),
        )
    }

    fn info(&self, data: &ImageData) -> GenInfo {
        GenInfo {
            dataset: data.name.clone(),
            classes: data.classes.clone(),
            height: data.train.height,
            width: data.train.width,
            scale: data.scale,
            variational: self.variational,
            code_mean: Vec::new(),
            code_std: Vec::new(),
        }
    }

    fn task<'a>(
        &self,
        cfg: &'a RunConfig<AeParams>,
        info: &'a GenInfo,
        preview: ImageSet,
    ) -> AeTask<'a> {
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5a5a_5a5a);
        AeTask {
            params: &cfg.params.net,
            info,
            preview,
            fixed_z: standard_normal(&mut rng, FIXED_SAMPLES * cfg.params.net.latent),
        }
    }

    fn load_net(
        &self,
        run: &RunDir,
        cfg: &RunConfig<AeParams>,
        info: &GenInfo,
        device: &Device,
    ) -> Result<AutoencoderNet> {
        let net = AutoencoderNet::new(
            &cfg.params.net,
            info.height,
            info.width,
            info.variational,
            device,
        );
        load_model(run, net)
    }

    /// `summary.json`'s sections and `report.md`'s words after training: the test loss (BCE,
    /// and KL for the VAE) as the headline. `counts`: train / validation / test images.
    #[allow(clippy::too_many_arguments)]
    fn finished(
        &self,
        ctx: &RunContext,
        cfg: &RunConfig<AeParams>,
        data: &ImageData,
        counts: [usize; 3],
        model: &AutoencoderNet,
        test: Value,
        pictures: &[&str],
    ) -> Finished {
        let (h, w) = (data.train.height, data.train.width);
        let arch = cfg.params.net.describe(h, w, self.variational);
        let [n_train, n_val, n_test] = counts;
        let loss = test["loss"].as_f64().unwrap_or(f64::NAN);
        let text = match (test["bce"].as_f64(), test["kl"].as_f64()) {
            (Some(b), Some(k)) if self.variational => format!("{loss:.2} (BCE {b:.2} + KL {k:.2})"),
            _ => format!("{loss:.2} (BCE summed over pixels)"),
        };
        let kind = if self.variational {
            "VAE"
        } else {
            "Autoencoder"
        };
        let shown: Vec<String> = pictures.iter().map(|p| format!("`{p}`")).collect();
        Finished {
            title: format!("{kind} on {}", data.name),
            fields: json!({
                "dataset": Self::dataset(cfg),
                "dataset_requested": cfg.dataset_requested.clone().unwrap_or_else(|| Self::dataset(cfg)),
                "architecture": arch,
                "parameters": model.num_params(),
                "train_examples": n_train,
                "validation_examples": n_val,
                "test_examples": n_test,
                "test": test,
            }),
            headline: vec![Figure::new("test.loss", "test loss per image", loss, text)],
            rows: vec![
                (
                    "data set".into(),
                    format!(
                        "{} ({n_train} train / {n_val} validation / {n_test} test)",
                        data.name
                    ),
                ),
                ("network".into(), arch),
                ("parameters".into(), model.num_params().to_string()),
            ],
            examples: "images",
            notes: format!(
                "Pictures: {}. `kiln sample {} --n 64` draws new images.\n",
                shown.join(", "),
                ctx.run.path().display()
            ),
        }
    }

    /// The test set's pictures: reconstructions, an interpolation and, for a 2-d code, the
    /// latent map and the manifold; returns their file names (and the per-epoch samples').
    fn test_pictures(
        &self,
        task: &AeTask,
        model: &AutoencoderNet,
        test: &ImageSet,
        run: &RunDir,
        device: &Device,
    ) -> Result<Vec<&'static str>> {
        task.reconstructions(model, test, &run.file("reconstructions.png"), device)?;
        interpolation(task, model, test, &run.file("interpolation.png"), device)?;
        let mut pictures = vec!["reconstructions.png", "interpolation.png"];
        if model.latent() == 2 {
            latent_pictures(task, model, test, run, device)?;
            pictures.extend(["latent.png", "manifold.png"]);
        }
        if self.variational {
            pictures.push("samples-epoch-NNN.png");
        }
        Ok(pictures)
    }

    fn test_metrics(
        &self,
        task: &AeTask,
        model: &AutoencoderNet,
        test: &ImageSet,
        seed: u64,
        device: &Device,
    ) -> Value {
        let mut rng = StdRng::seed_from_u64(seed);
        let m = evaluate(task, model, test, device, 500, &mut rng);
        let map: serde_json::Map<String, Value> =
            m.into_iter().map(|(k, v)| (k, json!(v))).collect();
        Value::Object(map)
    }
}

impl Family for AutoencoderFamily {
    fn name(&self) -> &'static str {
        if self.variational {
            "vae"
        } else {
            "autoencoder"
        }
    }

    fn about(&self) -> &'static str {
        if self.variational {
            "variational autoencoder: images → (μ, log σ²) → sampled code → images; samples new images"
        } else {
            "autoencoder: images → small code → images (reconstruction)"
        }
    }

    fn resolve(&self, doc: &mut ConfigDoc) -> Result<()> {
        resolve_dataset(doc, DEFAULT_DATASET)
    }

    fn check(&self, doc: &ConfigDoc) -> Result<()> {
        let cfg = self.config(doc)?;
        let (h, w, _) = grey_dataset_shape(doc, &Self::dataset(&cfg), self.name())?;
        cfg.params
            .net
            .check(h, w)
            .map_err(|e| anyhow!("{}: params.net.{e}", doc.source.display()))
    }

    fn train(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = self.config(&ctx.doc)?;
        let data = self.load(&cfg)?;
        let mut info = self.info(&data);
        cfg.params
            .net
            .check(info.height, info.width)
            .map_err(|e| anyhow!("{}: params.net.{e}", ctx.doc.source.display()))?;
        let (train, val) = holdout_last(&data.train, cfg.train.validation_split);
        eprintln!(
            "{}: {} training images, {} validation (the last {:.0}% of the training split), {} test ({}×{})",
            data.name,
            train.n,
            val.n,
            cfg.train.validation_split * 100.0,
            data.test.n,
            info.height,
            info.width
        );
        let preview_src = if val.n > 0 { &val } else { &train };
        let preview = preview_src.select(&(0..preview_src.n.min(PREVIEW)).collect::<Vec<_>>());
        let (fitted, model, device) = {
            let task = self.task(&cfg, &info, preview.clone());
            ctx.fit(&cfg, &task, &train, &val)?
        };

        // Codes of the training images: the autoencoder samples from their fitted Gaussian.
        let codes = encode_all(&model, &train, info.scale, &device);
        let k = cfg.params.net.latent;
        (info.code_mean, info.code_std) = mean_std(&codes, k);
        ctx.run.write_json(INFO, &info)?;

        let task = self.task(&cfg, &info, preview);
        let test = self.test_metrics(&task, &model, &data.test, cfg.seed, &device);
        let pictures = self.test_pictures(&task, &model, &data.test, &ctx.run, &device)?;
        let counts = [train.n, val.n, data.test.n];
        let done = self.finished(ctx, &cfg, &data, counts, &model, test, &pictures);
        ctx.finish(cfg.backend.as_str(), &fitted, done)
    }

    fn eval(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = self.config(&ctx.doc)?;
        let info: GenInfo = ctx.run.read_json(INFO)?;
        let data = self.load(&cfg)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = self.load_net(&ctx.run, &cfg, &info, &device)?;
        let task = self.task(&cfg, &info, ImageSet::default());
        Ok(json!({"test": self.test_metrics(&task, &model, &data.test, cfg.seed, &device)}))
    }

    fn predict(&self, ctx: &RunContext, input: &PredictInput) -> Result<String> {
        let cfg = self.config(&ctx.doc)?;
        let info: GenInfo = ctx.run.read_json(INFO)?;
        let PredictInput::Image(path) = input else {
            bail!(
                "{}: predict --image FILE: an autoencoder encodes images",
                self.name()
            );
        };
        let pre = kiln_vision::Preprocessing {
            dataset: info.dataset.clone(),
            classes: info.classes.clone(),
            height: info.height,
            width: info.width,
            scale: info.scale,
            channels: 1,
            mean: vec![0.0],
            std: vec![1.0],
        };
        let pixels = kiln_vision::read_image(path, &pre)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = self.load_net(&ctx.run, &cfg, &info, &device)?;
        let x = Tensor::from_data(
            TensorData::new(pixels, [1, info.height * info.width]),
            &device,
        );
        let code = to_vec(model.encode(x).mu);
        Ok(format!(
            "code: [{}]",
            code.iter()
                .map(|v| format!("{v:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    fn bench(&self, doc: &ConfigDoc, batches: usize) -> Result<Benchmark> {
        self.check(doc)?;
        let cfg = self.config(doc)?;
        let data = self.load(&cfg)?;
        let info = self.info(&data);
        let task = self.task(&cfg, &info, ImageSet::default());
        benchmark(
            &task,
            &data.train,
            &cfg.train,
            cfg.backend,
            cfg.seed,
            batches,
        )
    }
    fn image_sampler(&self) -> Option<&dyn kiln_core::family::ImageSampler> {
        Some(self)
    }

    fn torch_names(&self, ctx: &RunContext) -> Result<Option<kiln_core::export::TorchNames>> {
        Ok(self
            .config(&ctx.doc)?
            .params
            .net
            .torch_names(self.variational))
    }

    /// The decoder: codes `z` `[batch, latent]` → `images` `[batch, 1, h, w]` in [0, 1]. A
    /// VAE's codes are drawn from N(0, I); a plain autoencoder's from the Gaussian fitted to
    /// its training codes (`info.json`: `code_mean`, `code_std`). The sample file holds eight
    /// codes drawn as `kiln sample` draws them and kiln's images for them.
    fn onnx(&self, ctx: &RunContext) -> Result<Option<kiln_core::onnx::OnnxExport>> {
        let cfg = self.config(&ctx.doc)?;
        let info: GenInfo = ctx.run.read_json(INFO)?;
        let device = Device::flex();
        let model = self.load_net(&ctx.run, &cfg, &info, &device)?;
        let k = model.latent();
        let mut g = kiln_core::onnx::Graph::new("z", &[k]);
        let out = model.decoder_onnx(&mut g, "z");
        let n = 8;
        let z = codes(&info, k, n, 0);
        let images = to_vec(sigmoid(model.decode(Tensor::from_data(
            TensorData::new(z.clone(), [n, k]),
            &device,
        ))));
        let (h, w) = (info.height, info.width);
        Ok(Some(kiln_core::onnx::OnnxExport {
            model: g.finish(&out, &[1, h, w]),
            sample: vec![
                ("z".into(), vec![n, k], z),
                ("images".into(), vec![n, 1, h, w], images),
            ],
        }))
    }
}

/// `n` codes of `k` dimensions as `kiln sample --seed seed` draws them: N(0, I) for a VAE,
/// the Gaussian fitted to the training codes for a plain autoencoder.
fn codes(info: &GenInfo, k: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut z = standard_normal(&mut rng, n * k);
    if !info.variational {
        // z = mean + std ⊙ ε, the Gaussian fitted to the training codes.
        for (i, v) in z.iter_mut().enumerate() {
            *v = info.code_mean[i % k] + info.code_std[i % k] * *v;
        }
    }
    z
}

impl kiln_core::family::ImageSampler for AutoencoderFamily {
    fn sample(&self, ctx: &RunContext, req: &SampleRequest) -> Result<std::path::PathBuf> {
        if req.truncation.is_some() || req.judge.is_some() || req.class.is_some() {
            anyhow::bail!(
                "--truncation, --judge and --class: for GAN runs; {} is an autoencoder run",
                ctx.run.path().display()
            );
        }
        let cfg = self.config(&ctx.doc)?;
        let info: GenInfo = ctx.run.read_json(INFO)?;
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let model = self.load_net(&ctx.run, &cfg, &info, &device)?;
        let k = model.latent();
        let z = codes(&info, k, req.n, req.seed);
        let task = self.task(&cfg, &info, ImageSet::default());
        let images = task.decode_images(
            &model,
            Tensor::from_data(TensorData::new(z, [req.n, k]), &device),
        );
        let out = req
            .out
            .clone()
            .unwrap_or_else(|| ctx.run.file(&format!("samples-seed-{}.png", req.seed)));
        let cols = (req.n as f64).sqrt().ceil() as usize;
        tiles(
            &out,
            &images,
            info.height,
            info.width,
            cols,
            zoom(info.height),
        )?;
        Ok(out)
    }
}

/// μ of every image of `set`, row-major `n × latent`.
fn encode_all(model: &AutoencoderNet, set: &ImageSet, scale: f32, device: &Device) -> Vec<f32> {
    let idx: Vec<usize> = (0..set.n).collect();
    let mut out = Vec::new();
    for chunk in idx.chunks(1000) {
        out.extend(to_vec(model.encode(batch(set, chunk, scale, device)).mu));
    }
    out
}

/// Per-column mean and deviation of a row-major `n × k` matrix.
fn mean_std(rows: &[f32], k: usize) -> (Vec<f32>, Vec<f32>) {
    let n = (rows.len() / k.max(1)).max(1) as f64;
    let mut mean = vec![0f64; k];
    for r in rows.chunks(k) {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += v as f64 / n;
        }
    }
    let mut var = vec![0f64; k];
    for r in rows.chunks(k) {
        for ((s, &v), m) in var.iter_mut().zip(r).zip(&mean) {
            *s += (v as f64 - m).powi(2) / n;
        }
    }
    (
        mean.iter().map(|&m| m as f32).collect(),
        var.iter().map(|&v| v.sqrt().max(1e-6) as f32).collect(),
    )
}

/// Ten steps from the code of the first test image to that of the first test image of
/// another class: z_t = (1 − t)·μ_a + t·μ_b, decoded.
fn interpolation(
    task: &AeTask,
    model: &AutoencoderNet,
    test: &ImageSet,
    path: &std::path::Path,
    device: &Device,
) -> Result<()> {
    if test.n == 0 {
        return Ok(());
    }
    let b = (1..test.n)
        .find(|&i| test.labels[i] != test.labels[0])
        .unwrap_or(test.n - 1);
    let codes = to_vec(
        model
            .encode(batch(test, &[0, b], task.info.scale, device))
            .mu,
    );
    let k = codes.len() / 2;
    let steps = 10;
    let mut z = Vec::with_capacity(steps * k);
    for s in 0..steps {
        let t = s as f32 / (steps - 1) as f32;
        z.extend((0..k).map(|j| (1.0 - t) * codes[j] + t * codes[k + j]));
    }
    let images = task.decode_images(
        model,
        Tensor::from_data(TensorData::new(z, [steps, k]), device),
    );
    tiles(
        path,
        &images,
        task.info.height,
        task.info.width,
        steps,
        zoom(task.info.height),
    )
}

/// For a 2-d code: the test images' codes coloured by class, and the decoded manifold — a
/// 15×15 grid of codes at the normal quantiles Φ⁻¹(0.05 … 0.95) of each axis (VAE) or over
/// the codes' mean ± 2 deviations (autoencoder).
fn latent_pictures(
    task: &AeTask,
    model: &AutoencoderNet,
    test: &ImageSet,
    run: &RunDir,
    device: &Device,
) -> Result<()> {
    let codes = encode_all(model, test, task.info.scale, device);
    let points: Vec<(f64, f64, usize)> = codes
        .chunks(2)
        .zip(&test.labels)
        .map(|(c, &l)| (c[0] as f64, c[1] as f64, l as usize))
        .collect();
    scatter(
        &run.file("latent.png"),
        &format!("Test images' codes μ(x), {} images", points.len()),
        &points,
        &task.info.classes,
    )?;
    let n = 15;
    let axis = |j: usize| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let p = 0.05 + 0.9 * i as f64 / (n - 1) as f64;
                if task.info.variational {
                    normal_quantile(p) as f32
                } else {
                    let (m, s) = (task.info.code_mean[j], task.info.code_std[j]);
                    m + s * (4.0 * (p as f32 - 0.5) / 0.9)
                }
            })
            .collect()
    };
    let (xs, ys) = (axis(0), axis(1));
    let mut z = Vec::with_capacity(n * n * 2);
    for y in ys.iter().rev() {
        for x in &xs {
            z.extend([*x, *y]);
        }
    }
    let images = task.decode_images(
        model,
        Tensor::from_data(TensorData::new(z, [n * n, 2]), device),
    );
    // Every other value under the columns and beside the rows, so the numbers do not touch.
    let ticks = |v: &[f32]| -> Vec<String> {
        v.iter()
            .enumerate()
            .map(|(i, x)| {
                if i % 2 == 0 {
                    format!("{x:.1}")
                } else {
                    String::new()
                }
            })
            .collect()
    };
    let y_top_first: Vec<f32> = ys.iter().rev().copied().collect();
    let what = if task.info.variational {
        "normal quantiles 5%…95%"
    } else {
        "the codes' mean ± 2 deviations"
    };
    let text = GridText {
        title: format!("Decoder over 15×15 codes ({what})"),
        columns: Vec::new(),
        x_axis: Some(("z₁ (first code coordinate)".into(), ticks(&xs))),
        y_axis: Some(("z₂".into(), ticks(&y_top_first))),
    };
    let (h, w) = (task.info.height, task.info.width);
    labelled_tiles(&run.file("manifold.png"), &images, (h, w), n, 2, &text)
}

/// Φ⁻¹(p), the standard normal quantile (Acklam's rational approximation, |error| < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        assert!(normal_quantile(0.5).abs() < 1e-12);
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
        assert!((normal_quantile(0.05) + 1.644_854).abs() < 1e-5);
    }

    /// A VAE's loss falls on a small subset of the digits (the loop, the reparameterisation
    /// and both loss terms together).
    #[test]
    fn vae_loss_falls_on_a_small_subset() {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../data/digits.csv");
        let data = kiln_datasets::images::load_digits(&root, 1).unwrap();
        let train = data.train.clone().truncate(256);
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("r")).unwrap();
        let doc = ConfigDoc::parse(
            "vae.toml",
            "model = \"vae\"\nseed = 3\n[train]\nepochs = 8\nbatch_size = 32\nlearning_rate = 0.003\n[params]\nnet = { hidden = [64], latent = 2 }\n",
        )
        .unwrap();
        let cfg: RunConfig<AeParams> = doc.typed().unwrap();
        let info = VAE.info(&data);
        let task = VAE.task(&cfg, &info, train.select(&[0, 1]));
        let fitted = kiln_core::train::fit(
            &task,
            &train,
            &ImageSet::default(),
            &run,
            &kiln_core::FitOptions {
                train: &cfg.train,
                seed: 3,
                backend: cfg.backend,
                resume: false,
            },
        )
        .unwrap();
        let first = fitted.history[0].get("train_loss").unwrap();
        let last = fitted.history.last().unwrap().get("train_loss").unwrap();
        assert!(last < 0.8 * first, "{first} → {last}");
        let kl = fitted.history.last().unwrap().get("train_kl").unwrap();
        assert!(kl > 0.0, "KL {kl}");
        assert!(run.file("samples-epoch-008.png").is_file());
        assert!(run.file("reconstructions.png").is_file());
    }
}
