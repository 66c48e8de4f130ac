//! Sequence classification: a sequence of feature vectors (a player's yearly statistics) →
//! one of k classes (course deck 3's home-run ranges).
//!
//! The network reads one feature vector per step; a linear layer maps the last hidden state
//! to k logits (softmax cross-entropy, as every kiln classifier).

use kiln_kernels::linear::linear;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_core::classify;
use kiln_core::optim::OptimizerConfig;
use kiln_core::train::{Phase, StepOutput, Supervised};
use kiln_datasets::tabular::Table;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::recurrent::{Stack, StackParams, last_step};

/// Sequences of equal length: `x[i]` is `steps × features` values, row-major.
#[derive(Debug, Clone, Default)]
pub struct Sequences {
    pub x: Vec<Vec<f32>>,
    pub y: Vec<usize>,
    pub steps: usize,
    pub features: usize,
    pub classes: Vec<String>,
}

impl Sequences {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    pub fn select(&self, idx: &[usize]) -> Sequences {
        Sequences {
            x: idx.iter().map(|&i| self.x[i].clone()).collect(),
            y: idx.iter().map(|&i| self.y[i]).collect(),
            ..Sequences {
                steps: self.steps,
                features: self.features,
                classes: self.classes.clone(),
                ..Default::default()
            }
        }
    }

    /// The time average of every feature, `[n, features]` row-major: what a bag-of-features
    /// model sees (the order of the steps is lost).
    pub fn bag(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len() * self.features);
        for x in &self.x {
            for f in 0..self.features {
                let s: f32 = (0..self.steps).map(|t| x[t * self.features + f]).sum();
                out.push(s / self.steps as f32);
            }
        }
        out
    }
}

/// The synthetic "player careers" (documented in data/README.md): `steps` years of `features`
/// statistics. Statistic 0 follows a line with level L ~ N(0, 1) and slope k ~ N(0, 1):
/// x_t,0 = L + k·(t − (T−1)/2)/((T−1)/2) + N(0, noise²); the other statistics are N(0, 1)
/// noise. The class is the quintile of k (declining fast … improving fast), so the classes
/// are equally likely. The time average of statistic 0 is L plus noise, independent of k:
/// a model that ignores the order of the years cannot do better than chance (20%).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Careers {
    pub sequences: usize,
    pub steps: usize,
    pub features: usize,
    pub noise: f64,
}

/// Quintile boundaries of the standard normal: Φ⁻¹(0.2), Φ⁻¹(0.4), Φ⁻¹(0.6), Φ⁻¹(0.8).
const QUINTILES: [f64; 4] = [-0.841_621_2, -0.253_347_1, 0.253_347_1, 0.841_621_2];

pub const CAREER_CLASSES: [&str; 5] = [
    "declining fast",
    "declining",
    "steady",
    "improving",
    "improving fast",
];

impl Careers {
    pub fn generate(&self, seed: u64) -> Sequences {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x0ca4_ee45);
        let per = self.steps * self.features;
        let half = ((self.steps.max(2) - 1) as f64) / 2.0;
        let mut x = Vec::with_capacity(self.sequences);
        let mut y = Vec::with_capacity(self.sequences);
        for _ in 0..self.sequences {
            let z = kiln_core::nn::standard_normal(&mut rng, 2 + per);
            let (level, slope) = (z[0] as f64, z[1] as f64);
            let mut seq: Vec<f32> = z[2..].to_vec();
            for t in 0..self.steps {
                let i = t * self.features;
                seq[i] =
                    (level + slope * (t as f64 - half) / half + self.noise * seq[i] as f64) as f32;
            }
            x.push(seq);
            y.push(QUINTILES.iter().filter(|&&q| slope > q).count());
        }
        Sequences {
            x,
            y,
            steps: self.steps,
            features: self.features,
            classes: CAREER_CLASSES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Users' sequences from a CSV with a header: one row per time step, columns `sequence` (an
/// id; the rows of a sequence are consecutive, in time order), `label` (a class name or
/// number) and any number of numeric feature columns. Every sequence has the same length.
pub fn read_csv(path: &Path) -> Result<Sequences> {
    let table = Table::read(path)?;
    let ids = table.text("sequence")?;
    let labels = table.text("label")?;
    let feature_names: Vec<String> = table
        .header
        .iter()
        .filter(|h| *h != "sequence" && *h != "label")
        .cloned()
        .collect();
    if feature_names.is_empty() {
        bail!(
            "{}: no feature columns besides sequence and label",
            path.display()
        );
    }
    let values = table.numeric(&feature_names)?;
    let mut seqs: Vec<(String, String, Vec<f32>, usize)> = Vec::new();
    for (i, ((id, label), row)) in ids.into_iter().zip(labels).zip(values).enumerate() {
        let values = row.into_iter().map(|v| v as f32);
        match seqs.last_mut() {
            Some(last) if last.0 == id => {
                if last.1 != label {
                    bail!(
                        "{}: line {}, column \"label\": sequence {id:?} changes its label from {:?} to {label:?}",
                        path.display(),
                        i + 2,
                        last.1
                    );
                }
                last.2.extend(values);
                last.3 += 1;
            }
            _ => seqs.push((id, label, values.collect(), 1)),
        }
    }
    let Some(steps) = seqs.first().map(|s| s.3) else {
        bail!("{}: no sequences", path.display());
    };
    if let Some(bad) = seqs.iter().find(|s| s.3 != steps) {
        bail!(
            "{}: sequence {:?} has {} steps, the first has {steps} (all must be equally long)",
            path.display(),
            bad.0,
            bad.3
        );
    }
    let names: BTreeMap<String, usize> = seqs
        .iter()
        .map(|s| (s.1.clone(), 0))
        .collect::<BTreeMap<_, _>>()
        .into_keys()
        .enumerate()
        .map(|(i, k)| (k, i))
        .collect();
    Ok(Sequences {
        y: seqs.iter().map(|s| names[&s.1]).collect(),
        x: seqs.into_iter().map(|s| s.2).collect(),
        steps,
        features: feature_names.len(),
        classes: names.into_keys().collect(),
    })
}

#[derive(Module, Debug)]
pub struct SequenceNet {
    pub stack: Stack,
    pub head: Linear,
}

impl SequenceNet {
    pub fn new(p: &StackParams, features: usize, classes: usize, device: &Device) -> Self {
        SequenceNet {
            stack: p.stack(features, device),
            head: LinearConfig::new(p.hidden, classify::outputs(classes)).init(device),
        }
    }

    /// Logits `[batch, outputs]` of sequences `idx` of `data`.
    pub fn forward(&self, data: &Sequences, idx: &[usize], device: &Device) -> Tensor<2> {
        let f = data.features;
        let steps: Vec<Tensor<2>> = (0..data.steps)
            .map(|t| {
                let mut buf = Vec::with_capacity(idx.len() * f);
                for &i in idx {
                    buf.extend_from_slice(&data.x[i][t * f..(t + 1) * f]);
                }
                Tensor::from_data(TensorData::new(buf, [idx.len(), f]), device)
            })
            .collect();
        let (out, _) = self.stack.forward(steps, None);
        linear(&self.head, last_step(out))
    }
}

pub struct SequenceTask<'a> {
    pub params: &'a StackParams,
    pub features: usize,
    pub classes: usize,
}

impl Supervised for SequenceTask<'_> {
    fn loss_name(&self) -> Option<String> {
        Some("cross-entropy".into())
    }

    type Model = SequenceNet;
    type Data = Sequences;

    fn init_model(&self, device: &Device) -> SequenceNet {
        SequenceNet::new(self.params, self.features, self.classes, device)
    }

    fn len(&self, data: &Sequences) -> usize {
        data.len()
    }

    fn step(
        &self,
        model: &SequenceNet,
        data: &Sequences,
        indices: &[usize],
        device: &Device,
        _phase: Phase,
        _rng: &mut StdRng,
    ) -> StepOutput {
        let logits = model.forward(data, indices, device);
        let y: Vec<i64> = indices.iter().map(|&i| data.y[i] as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(y, [indices.len()]), device);
        classify::step(logits, targets, self.classes, device)
    }
}

/// The order-blind baseline: a dense network (features → 32 ReLU → classes) on the time
/// average of each feature, trained full-batch with Adam for `steps` steps; returns its
/// accuracy on `test`.
pub fn bag_baseline(train: &Sequences, test: &Sequences, seed: u64, steps: usize) -> f64 {
    let d = Device::flex().autodiff();
    d.seed(seed);
    let k = train.classes.len();
    let f = train.features;
    let l1 = LinearConfig::new(f, 32).init(&d);
    let l2 = LinearConfig::new(32, classify::outputs(k)).init(&d);
    let mut net = (l1, l2);
    let x = Tensor::<2>::from_data(TensorData::new(train.bag(), [train.len(), f]), &d);
    let y: Vec<i64> = train.y.iter().map(|&c| c as i64).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(y, [train.len()]), &d);
    let mut optim = OptimizerConfig::default().init();
    for _ in 0..steps {
        let logits = net.1.forward(relu(net.0.forward(x.clone())));
        let out = classify::step(logits, y.clone(), k, &d);
        let grads = GradientsParams::from_grads(out.loss.backward(), &net);
        net = optim.step(1e-2, net, grads);
    }
    let e = Device::flex();
    let net = (net.0.valid(), net.1.valid());
    let xt = Tensor::<2>::from_data(TensorData::new(test.bag(), [test.len(), f]), &e);
    let pred = classify::predict(net.1.forward(relu(net.0.forward(xt))), k);
    let pred: Vec<i64> = pred
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap_or_default();
    let right = pred
        .iter()
        .zip(&test.y)
        .filter(|(p, y)| **p as usize == **y)
        .count();
    right as f64 / test.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn careers_are_balanced_and_seeded() {
        let g = Careers {
            sequences: 5000,
            steps: 8,
            features: 15,
            noise: 0.3,
        };
        let s = g.generate(1);
        assert_eq!(s.x[0].len(), 8 * 15);
        for c in 0..5 {
            let share = s.y.iter().filter(|&&y| y == c).count() as f64 / 5000.0;
            assert!((share - 0.2).abs() < 0.03, "class {c}: {share}");
        }
        assert_eq!(g.generate(1).x[7], s.x[7]);
        assert_ne!(g.generate(2).x[7], s.x[7]);
    }

    /// The order-blind dense baseline stays near chance (20%) on the careers.
    #[test]
    fn bag_of_features_cannot_solve_careers() {
        let g = Careers {
            sequences: 3000,
            steps: 8,
            features: 15,
            noise: 0.3,
        };
        let s = g.generate(5);
        let train = s.select(&(0..2000).collect::<Vec<_>>());
        let test = s.select(&(2000..3000).collect::<Vec<_>>());
        let acc = bag_baseline(&train, &test, 1, 300);
        assert!(acc < 0.3, "bag-of-features accuracy {acc}");
    }

    #[test]
    fn csv_format_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seq.csv");
        std::fs::write(
            &p,
            "sequence,label,hr,avg\na,high,1,0.2\na,high,2,0.3\nb,low,3,0.1\nb,low,1,0.1\n",
        )
        .unwrap();
        let s = read_csv(&p).unwrap();
        assert_eq!((s.len(), s.steps, s.features), (2, 2, 2));
        assert_eq!(s.classes, vec!["high", "low"]);
        assert_eq!(s.y, vec![0, 1]);
        assert_eq!(s.x[1], vec![3.0, 0.1, 1.0, 0.1]);
        std::fs::write(&p, "sequence,label,hr\na,1,x\n").unwrap();
        let err = read_csv(&p).unwrap_err().to_string();
        assert!(
            err.contains("seq.csv: line 2, column \"hr\": not a number: \"x\""),
            "{err}"
        );
        std::fs::write(&p, "sequence,label,hr\na,1,1\na,1,2\nb,0,1\n").unwrap();
        let err = read_csv(&p).unwrap_err().to_string();
        assert!(err.contains("sequence \"b\" has 1 steps"), "{err}");
    }
}
