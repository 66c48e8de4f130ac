//! What the models that learn from one CSV table (`linear`, `logistic`) share: the config
//! rule (the table is `params.data`, so `dataset`/`data_dir` are errors), the feature and
//! test-fraction checks, the validation part of the training rows, the preprocessing saved
//! beside the weights and `kiln predict --input` on new rows.

use std::path::Path;

use anyhow::{Result, bail};
use burn::tensor::Device;
use kiln_datasets::{Standardizer, parse_rows, shuffled_split};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::BackendName;
use crate::config::{ConfigDoc, RunConfig};
use crate::data::DenseSet;
use crate::family::{PredictInput, RunContext};

/// The typed config of a CSV model: `dataset` and `data_dir` belong to the image models and
/// are a one-line error here.
pub fn csv_config<P: DeserializeOwned>(doc: &ConfigDoc, family: &str) -> Result<RunConfig<P>> {
    let cfg: RunConfig<P> = doc.typed()?;
    if cfg.dataset.is_some() || cfg.data_dir.is_some() {
        bail!(
            "{}: dataset/data_dir: {family} reads the CSV named by params.data",
            doc.source.display()
        );
    }
    Ok(cfg)
}

/// `params.features` must name at least one column and `params.test_fraction` be in (0, 1).
pub fn check_params(source: &Path, features: &[String], test_fraction: f64) -> Result<()> {
    if features.is_empty() {
        bail!(
            "{}: params.features: must name at least one column",
            source.display()
        );
    }
    if !(0.0 < test_fraction && test_fraction < 1.0) {
        bail!(
            "{}: params.test_fraction: must be in (0, 1), got {test_fraction}",
            source.display()
        );
    }
    Ok(())
}

/// `(train, validation)`: `validation_split` of the training rows, shuffled with `seed`,
/// validate; with 0 there is no validation and every training row trains. The test rows
/// never take part (they are evaluated once, at the end).
pub fn validation_part(train: &DenseSet, validation_split: f64, seed: u64) -> (DenseSet, DenseSet) {
    if validation_split > 0.0 {
        let (tr, va) = shuffled_split(train.len(), validation_split, seed);
        (train.select(&tr), train.select(&va))
    } else {
        (train.clone(), train.select(&[]))
    }
}

/// The preprocessing file in a run directory.
pub const PREPROCESSING: &str = "preprocessing.json";

/// Saved in the run directory so `predict` scales new rows exactly as in training:
/// the feature columns, what the outputs are (`O`: a target name, class names) and the
/// training set's standardisation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Preprocessing<O> {
    pub features: Vec<String>,
    #[serde(flatten)]
    pub outputs: O,
    pub scaler: Standardizer,
}

impl<O> Preprocessing<O> {
    pub fn new(features: &[String], outputs: O, scaler: &Standardizer) -> Self {
        Preprocessing {
            features: features.to_vec(),
            outputs,
            scaler: scaler.clone(),
        }
    }

    /// Standardised rows (zero targets), ready for the model.
    pub fn scaled(&self, rows: &[Vec<f64>]) -> DenseSet {
        DenseSet::new(&self.scaler.transform(rows), &vec![0.0; rows.len()])
    }
}

/// `kiln predict RUN --input "v1,v2,…"` (or a CSV file) on a CSV model: the saved
/// preprocessing, the user's rows standardised by it, and the device of the run's backend.
/// `what` names the model in the error an `--image` gets.
pub fn predict_input<O: DeserializeOwned>(
    ctx: &RunContext,
    input: &PredictInput,
    backend: BackendName,
    what: &str,
) -> Result<(Preprocessing<O>, DenseSet, Device)> {
    let PredictInput::Values(text) = input else {
        bail!("{what} predicts from numbers: use --input \"v1,v2,...\" or --input file.csv");
    };
    let pre: Preprocessing<O> = ctx.run.read_json(PREPROCESSING)?;
    let rows = parse_rows(text, pre.features.len(), &pre.features)?;
    let device = backend.device().map_err(anyhow::Error::msg)?;
    let set = pre.scaled(&rows);
    Ok((pre, set, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_part_is_a_seeded_share_or_nothing() {
        let rows: Vec<Vec<f64>> = (0..20).map(|i| vec![i as f64]).collect();
        let y: Vec<f64> = (0..20).map(f64::from).collect();
        let set = DenseSet::new(&rows, &y);
        let (tr, va) = validation_part(&set, 0.25, 7);
        assert_eq!((tr.len(), va.len()), (15, 5));
        let mut all: Vec<f32> = tr.y.iter().chain(&va.y).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, set.y);
        assert_eq!(validation_part(&set, 0.25, 7).1.y, va.y);
        let (tr, va) = validation_part(&set, 0.0, 7);
        assert_eq!((tr.len(), va.len()), (20, 0));
    }

    #[test]
    fn preprocessing_keeps_its_file_layout() {
        #[derive(Debug, Serialize, Deserialize, PartialEq)]
        struct Target {
            target: String,
        }
        let pre = Preprocessing {
            features: vec!["RM".into()],
            outputs: Target {
                target: "MEDV".into(),
            },
            scaler: Standardizer {
                mean: vec![6.0],
                std: vec![2.0],
            },
        };
        let text = serde_json::to_string(&pre).unwrap();
        assert_eq!(
            text,
            r#"{"features":["RM"],"target":"MEDV","scaler":{"mean":[6.0],"std":[2.0]}}"#
        );
        let back: Preprocessing<Target> = serde_json::from_str(&text).unwrap();
        assert_eq!(back.outputs, pre.outputs);
        assert_eq!(back.scaled(&[vec![8.0]]).x, vec![1.0]);
    }
}
