//! The classification head shared by every classifier: how logits become a loss, predicted
//! classes and probabilities.
//!
//! Two classes use one logit z: ŷ = σ(z), loss binary cross-entropy, class 1 ⇔ z ≥ 0.
//! K > 2 classes use K logits: ŷ = softmax(z), loss cross-entropy, class = argmax z.

use burn::nn::loss::{BinaryCrossEntropyLossConfig, CrossEntropyLossConfig};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{Device, Int, Tensor};

use crate::train::StepOutput;

/// Number of logits a classifier over `classes` classes needs.
pub fn outputs(classes: usize) -> usize {
    if classes == 2 { 1 } else { classes }
}

/// Loss and number of correct predictions for `logits` `[batch, outputs(classes)]` and
/// integer `targets` `[batch]`.
pub fn step(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    classes: usize,
    device: &Device,
) -> StepOutput {
    let (loss, predicted) = if classes == 2 {
        let z = logits.squeeze_dim::<1>(1);
        let loss = BinaryCrossEntropyLossConfig::new()
            .with_logits(true)
            .init(device)
            .forward(z.clone(), targets.clone());
        (loss, z.greater_equal_elem(0.0).int())
    } else {
        let loss = CrossEntropyLossConfig::new()
            .init(device)
            .forward(logits.clone(), targets.clone());
        (loss, predict(logits, classes))
    };
    StepOutput {
        loss,
        correct: Some(predicted.equal(targets).int().sum()),
        extra: Vec::new(),
    }
}

/// Predicted class per row.
pub fn predict(logits: Tensor<2>, classes: usize) -> Tensor<1, Int> {
    if classes == 2 {
        logits.greater_equal_elem(0.0).int().squeeze_dim::<1>(1)
    } else {
        logits.argmax(1).squeeze_dim::<1>(1)
    }
}

/// Class probabilities `[batch, classes]` (two classes: [1 − σ(z), σ(z)]).
pub fn probabilities(logits: Tensor<2>, classes: usize) -> Tensor<2> {
    if classes == 2 {
        let p = sigmoid(logits);
        Tensor::cat(vec![p.clone().neg().add_scalar(1.0), p], 1)
    } else {
        softmax(logits, 1)
    }
}

/// A trained image classifier, as other families use it (a GAN's judge): class names, input
/// size, and class probabilities with penultimate-layer features.
pub trait ImageClassifier {
    fn classes(&self) -> &[String];
    /// `(height, width)` of its inputs.
    fn size(&self) -> (usize, usize);
    /// Class probabilities and penultimate-layer features of images given as intensities in
    /// [0, 1] (the polarity of the classifier's training set).
    fn classify(&self, images: &[Vec<f32>]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>);
}

/// What a family that classifies images offers: open a finished run as an [`ImageClassifier`].
pub trait OpenClassifier: Sync {
    fn open(&self, run: &std::path::Path) -> anyhow::Result<Box<dyn ImageClassifier>>;
}
