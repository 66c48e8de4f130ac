//! Sample quality, measured: a trained kiln image classifier judges generated images.
//!
//! - **Confident share**: the fraction of samples whose top class probability is ≥ 0.9 — an
//!   image the classifier is sure about looks like a real item of some class.
//! - **Class histogram**: how the samples spread over the classes (a generator that collapses
//!   onto a few modes shows up here).
//! - **Fréchet distance** between the classifier's penultimate-layer features of the samples
//!   and of the test images, each modelled as a Gaussian N(μ, Σ) (FID's formula, with kiln's
//!   CNN in place of Inception):
//!
//!   d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}).
//!
//!   Tr((Σ₁Σ₂)^{1/2}) is computed as Σ √λᵢ over the eigenvalues λᵢ of the symmetric matrix
//!   Σ₁^{1/2} Σ₂ Σ₁^{1/2}, which has the same eigenvalues as Σ₁Σ₂.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, Tensor, TensorData};
use kiln_core::classify::probabilities;
use kiln_core::data::to_vec;
use kiln_core::train::load_model;
use kiln_core::{RunConfig, RunDir};
use nalgebra::{DMatrix, DVector};
use serde::Serialize;

use crate::{ImageFamily, ImageNet, ImageParams, PREPROCESSING, Preprocessing};

/// A trained image classifier that can judge images.
/// A trained image classifier (the trait lives in core, so that any family can offer one).
pub use kiln_core::classify::ImageClassifier as Classifier;

struct Loaded<N> {
    model: N,
    pre: Preprocessing,
    device: Device,
}

impl<N: ImageNet> Classifier for Loaded<N> {
    fn classes(&self) -> &[String] {
        &self.pre.classes
    }

    fn size(&self) -> (usize, usize) {
        (self.pre.height, self.pre.width)
    }

    fn classify(&self, images: &[Vec<f32>]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let (h, w) = self.size();
        let k = self.pre.classes.len();
        let (mut probs, mut feats) = (Vec::new(), Vec::new());
        for chunk in images.chunks(500) {
            let mut buf = Vec::with_capacity(chunk.len() * self.pre.pixels());
            for img in chunk {
                self.pre.normalise(img.iter().copied(), &mut buf);
            }
            let x = Tensor::from_data(
                TensorData::new(buf, [chunk.len(), self.pre.channels, h, w]),
                &self.device,
            );
            let (logits, features) = self.model.forward_features(x);
            let d = features.dims()[1];
            probs.extend(
                to_vec(probabilities(logits, k))
                    .chunks(k)
                    .map(<[f32]>::to_vec),
            );
            feats.extend(to_vec(features).chunks(d).map(<[f32]>::to_vec));
        }
        (probs, feats)
    }
}

impl<N: ImageNet> kiln_core::classify::OpenClassifier for ImageFamily<N> {
    /// The trained classifier of a finished run of this family, on the inference device of
    /// its backend.
    fn open(&self, dir: &Path) -> Result<Box<dyn Classifier>> {
        let run = RunDir::open(dir)?;
        let doc = run.config()?;
        let cfg: RunConfig<ImageParams<N::Params>> = doc.typed()?;
        let pre: Preprocessing = run.read_json(PREPROCESSING)?;
        if pre.channels != 1 {
            bail!(
                "{}: a judge of generated images must be trained on grey images ({} has {} channels)",
                dir.display(),
                pre.dataset,
                pre.channels
            );
        }
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let net = pre
            .build::<N>(&cfg.params.net, &device)
            .map_err(|e| anyhow!("{}: params.net: {e}", doc.source.display()))?;
        let model = load_model(&run, net)?;
        Ok(Box::new(Loaded { model, pre, device }))
    }
}

/// What the judge found; goes into `summary.json` and `report.md`.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub samples: usize,
    /// Share of samples whose top class probability is ≥ 0.9.
    pub confident_share: f64,
    /// The same share for the reference (test) images themselves: what a generator that
    /// reproduced the data set would score.
    pub test_confident_share: f64,
    /// Samples per class (by top class).
    pub histogram: Vec<usize>,
    /// Share of the least frequent class among the samples.
    pub smallest_class_share: f64,
    /// Fréchet distance between sample and test features.
    pub frechet_distance: f64,
    /// The same distance between two halves of the test set: the floor sampling noise sets.
    pub frechet_test_halves: f64,
    /// For samples drawn for given classes (a conditional generator): the share whose top
    /// class is the class asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asked_class_agreement: Option<f64>,
}

/// The reference images' side of a verdict, computed once: their confident share, their
/// features and the Fréchet distance between their two halves.
pub struct Reference {
    confident_share: f64,
    features: Vec<Vec<f32>>,
    halves: f64,
}

impl Reference {
    pub fn new(judge: &dyn Classifier, images: &[Vec<f32>]) -> Self {
        let (probs, features) = judge.classify(images);
        let half = features.len() / 2;
        Reference {
            confident_share: confident_share(&probs),
            halves: frechet_distance(&features[..half], &features[half..]),
            features,
        }
    }
}

/// Judge `samples` against `reference` images (the test set). `asked`: the class each sample
/// was drawn for, or empty.
pub fn judge(
    judge: &dyn Classifier,
    samples: &[Vec<f32>],
    asked: &[usize],
    reference: &[Vec<f32>],
) -> Verdict {
    judge_against(judge, samples, asked, &Reference::new(judge, reference))
}

/// Judge `samples` against a [`Reference`] computed before (the per-epoch judge of a GAN run
/// computes its reference once). `asked`: the class each sample was drawn for, or empty.
pub fn judge_against(
    judge: &dyn Classifier,
    samples: &[Vec<f32>],
    asked: &[usize],
    reference: &Reference,
) -> Verdict {
    let (probs, sample_feats) = judge.classify(samples);
    let k = judge.classes().len();
    let tops: Vec<usize> = probs.iter().map(|p| top_class(p).0).collect();
    let mut histogram = vec![0usize; k];
    for &t in &tops {
        histogram[t.min(k - 1)] += 1;
    }
    let n = samples.len().max(1) as f64;
    let agree = tops.iter().zip(asked).filter(|(t, y)| t == y).count();
    Verdict {
        asked_class_agreement: (!asked.is_empty()).then(|| agree as f64 / n),
        samples: samples.len(),
        confident_share: confident_share(&probs),
        test_confident_share: reference.confident_share,
        smallest_class_share: histogram.iter().copied().min().unwrap_or(0) as f64 / n,
        histogram,
        frechet_distance: frechet_distance(&sample_feats, &reference.features),
        frechet_test_halves: reference.halves,
    }
}

/// The top class and its probability.
fn top_class(p: &[f32]) -> (usize, f32) {
    p.iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, 0.0))
}

/// Share of the probability rows whose top class has probability ≥ 0.9 (0 for no rows).
fn confident_share(probs: &[Vec<f32>]) -> f64 {
    let confident = probs.iter().filter(|p| top_class(p).1 >= 0.9).count();
    confident as f64 / probs.len().max(1) as f64
}

fn gaussian(rows: &[Vec<f32>]) -> (DVector<f64>, DMatrix<f64>) {
    let d = rows.first().map_or(0, Vec::len);
    let n = rows.len().max(1) as f64;
    let mut mean = DVector::zeros(d);
    for r in rows {
        for (j, &v) in r.iter().enumerate() {
            mean[j] += v as f64 / n;
        }
    }
    let mut cov = DMatrix::zeros(d, d);
    for r in rows {
        let c = DVector::from_iterator(d, r.iter().map(|&v| v as f64)) - &mean;
        cov += &c * c.transpose();
    }
    cov /= (rows.len().max(2) - 1) as f64;
    (mean, cov)
}

/// Symmetric PSD square root through the eigendecomposition (negative rounding noise → 0).
fn sqrt_psd(m: DMatrix<f64>) -> DMatrix<f64> {
    let e = m.symmetric_eigen();
    let s = e.eigenvalues.map(|l| l.max(0.0).sqrt());
    &e.eigenvectors * DMatrix::from_diagonal(&s) * e.eigenvectors.transpose()
}

/// d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}) between two sets of feature vectors.
pub fn frechet_distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (m1, s1) = gaussian(a);
    let (m2, s2) = gaussian(b);
    let r1 = sqrt_psd(s1.clone());
    let inner = &r1 * &s2 * &r1;
    let inner = (&inner + inner.transpose()) * 0.5;
    let tr_sqrt: f64 = inner
        .symmetric_eigen()
        .eigenvalues
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum();
    ((&m1 - &m2).norm_squared() + s1.trace() + s2.trace() - 2.0 * tr_sqrt).max(0.0)
}

/// Error unless `classifier` takes `height × width` images.
pub fn check_size(
    classifier: &dyn Classifier,
    height: usize,
    width: usize,
    dir: &Path,
) -> Result<()> {
    let (h, w) = classifier.size();
    if (h, w) != (height, width) {
        bail!(
            "{}: the judge classifies {h}×{w} images, the samples are {height}×{width}",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn normal_rows(n: usize, d: usize, shift: f32, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                kiln_core::nn::standard_normal(&mut rng, d)
                    .into_iter()
                    .map(|v| v + shift)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn confident_share_counts_top_probabilities_of_at_least_0_9() {
        let probs = vec![
            vec![0.05, 0.95, 0.0],
            vec![0.9, 0.05, 0.05],
            vec![0.5, 0.3, 0.2],
            vec![0.1, 0.1, 0.8],
        ];
        assert_eq!(confident_share(&probs), 0.5);
        assert_eq!(top_class(&probs[3]), (2, 0.8));
        assert_eq!(confident_share(&[]), 0.0);
    }

    #[test]
    fn frechet_is_zero_for_a_set_against_itself_and_grows_with_difference() {
        let a = normal_rows(500, 8, 0.0, 1);
        assert!(
            frechet_distance(&a, &a) < 1e-6,
            "{}",
            frechet_distance(&a, &a)
        );
        let b = normal_rows(500, 8, 0.0, 2);
        let c = normal_rows(500, 8, 1.0, 3);
        let same = frechet_distance(&a, &b);
        let shifted = frechet_distance(&a, &c);
        // Shifting every coordinate by 1 adds ‖Δμ‖² = 8.
        assert!(
            same < 0.5 && (shifted - 8.0).abs() < 1.0,
            "{same} {shifted}"
        );
        // Closed form for diagonal covariances: Σ₂ = 4I gives Tr(I + 4I − 2·2I) = d.
        let wide: Vec<Vec<f32>> = b
            .iter()
            .map(|r| r.iter().map(|v| v * 2.0).collect())
            .collect();
        let d = frechet_distance(&a, &wide);
        assert!((d - 8.0).abs() < 1.5, "{d}");
    }

    /// A judge that reads its probabilities off the "image": image i is [p₀, p₁].
    struct Echo(Vec<String>);

    impl Classifier for Echo {
        fn classes(&self) -> &[String] {
            &self.0
        }
        fn size(&self) -> (usize, usize) {
            (1, 2)
        }
        fn classify(&self, images: &[Vec<f32>]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
            (images.to_vec(), images.to_vec())
        }
    }

    /// Samples drawn for given classes: the agreement is the share whose top class is the one
    /// asked for; without classes there is none.
    #[test]
    fn asked_class_agreement_counts_samples_of_the_class_asked_for() {
        let echo = Echo(vec!["a".into(), "b".into()]);
        let samples = vec![
            vec![0.95, 0.05],
            vec![0.2, 0.8],
            vec![0.6, 0.4],
            vec![0.1, 0.9],
        ];
        let reference = vec![vec![0.5, 0.5], vec![1.0, 0.0], vec![0.0, 1.0]];
        let v = judge(&echo, &samples, &[0, 1, 1, 0], &reference);
        assert_eq!(v.asked_class_agreement, Some(0.5));
        assert_eq!(v.histogram, vec![2, 2]);
        assert_eq!(v.confident_share, 0.5);
        let v = judge(&echo, &samples, &[], &reference);
        assert_eq!(v.asked_class_agreement, None);
        assert!(!serde_json::to_string(&v).unwrap().contains("asked"));
    }
}
