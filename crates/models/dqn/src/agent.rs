//! The deep Q-learning agent (course deck 3; Mnih et al. 2015): a Q-network scores every
//! action, ε-greedy play collects transitions (s, a, r, s′) into a replay memory, and the
//! network learns from uniform mini-batches of it towards targets from a slowly moving copy of
//! itself, the target network Q_θ⁻:
//!
//! y = r + γ·(1 − done)·Q_θ⁻(s′, a*),  a* = argmax_a′ Q_θ⁻(s′, a′)   (DQN)
//!                                      a* = argmax_a′ Q_θ(s′, a′)    (Double DQN)
//! L(θ) = mean over the batch of ℓ(Q_θ(s, a) − y),  ℓ = Huber (δ = 1) or squared error.
//!
//! A truncated episode (CartPole's 500-step limit) is not terminal: its last transition
//! still bootstraps from s′. The target network is copied from θ every N updates (hard) or
//! moved θ⁻ ← τ·θ + (1 − τ)·θ⁻ after every update (soft).

use anyhow::Result;
use burn::module::Module;
use burn::nn::loss::{HuberLossConfig, MseLoss, Reduction};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_core::data::to_vec;
use kiln_kernels::linear::linear;
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// The Q-network: state → hidden ReLU layers → one value per action.
#[derive(Module, Debug)]
pub struct QNet {
    pub layers: Vec<Linear>,
}

impl QNet {
    pub fn new(inputs: usize, hidden: &[usize], actions: usize, device: &Device) -> Self {
        let mut layers = Vec::new();
        let mut width = inputs;
        for &h in hidden.iter().chain(std::iter::once(&actions)) {
            layers.push(LinearConfig::new(width, h).init(device));
            width = h;
        }
        QNet { layers }
    }

    /// `[batch, state]` → `[batch, actions]`.
    pub fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            x = linear(l, x);
            if i < last {
                x = relu(x);
            }
        }
        x
    }

    /// Q-values of one state, on the device the network lives on.
    pub fn q_values(&self, s: &[f32]) -> Vec<f32> {
        let device = self.layers[0].weight.device();
        let x = Tensor::from_data(TensorData::new(s.to_vec(), [1, s.len()]), &device);
        to_vec(self.forward(x))
    }

    /// θ⁻ ← τ·θ + (1 − τ)·θ⁻, parameter by parameter (`self` is θ⁻, `online` is θ, both on the
    /// same device): [`kiln_core::nn::blend`].
    pub fn blend(&self, online: &QNet, tau: f64) -> QNet {
        kiln_core::nn::blend(self.clone(), online, tau)
    }
}

/// Index of the largest value (the first of ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// The replay memory: a ring buffer of the last `capacity` transitions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Replay {
    pub capacity: usize,
    pub state_len: usize,
    pub s: Vec<f32>,
    pub a: Vec<u32>,
    pub r: Vec<f32>,
    pub s2: Vec<f32>,
    pub done: Vec<bool>,
    /// Where the next transition goes once the memory is full.
    pub next: usize,
}

impl Replay {
    pub fn new(capacity: usize, state_len: usize) -> Self {
        Replay {
            capacity,
            state_len,
            s: Vec::new(),
            a: Vec::new(),
            r: Vec::new(),
            s2: Vec::new(),
            done: Vec::new(),
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.a.len()
    }

    pub fn is_empty(&self) -> bool {
        self.a.is_empty()
    }

    pub fn push(&mut self, s: &[f32], a: usize, r: f32, s2: &[f32], done: bool) {
        let k = self.state_len;
        if self.len() < self.capacity {
            self.s.extend_from_slice(s);
            self.s2.extend_from_slice(s2);
            self.a.push(a as u32);
            self.r.push(r);
            self.done.push(done);
        } else {
            let i = self.next;
            self.s[i * k..(i + 1) * k].copy_from_slice(s);
            self.s2[i * k..(i + 1) * k].copy_from_slice(s2);
            self.a[i] = a as u32;
            self.r[i] = r;
            self.done[i] = done;
        }
        self.next = (self.next + 1) % self.capacity;
    }

    /// `n` indices drawn uniformly, with replacement, from the stored transitions.
    pub fn sample(&self, rng: &mut StdRng, n: usize) -> Vec<usize> {
        (0..n).map(|_| rng.random_range(0..self.len())).collect()
    }

    fn rows(&self, v: &[f32], idx: &[usize]) -> Vec<f32> {
        let k = self.state_len;
        let mut out = Vec::with_capacity(idx.len() * k);
        for &i in idx {
            out.extend_from_slice(&v[i * k..(i + 1) * k]);
        }
        out
    }
}

/// ε as a function of the number of environment steps t taken so far.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Epsilon {
    pub start: f64,
    pub end: f64,
    /// Linear: steps from start to end. Exponential: the time constant.
    pub decay_steps: f64,
    #[serde(default)]
    pub schedule: Schedule,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// ε_t = max(end, start − (start − end)·t/decay_steps)
    #[default]
    Linear,
    /// ε_t = end + (start − end)·exp(−t/decay_steps)
    Exponential,
}

impl Epsilon {
    pub fn at(&self, t: u64) -> f64 {
        let t = t as f64;
        match self.schedule {
            Schedule::Linear => {
                (self.start - (self.start - self.end) * t / self.decay_steps).max(self.end)
            }
            Schedule::Exponential => {
                self.end + (self.start - self.end) * (-t / self.decay_steps).exp()
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TdLoss {
    #[default]
    Huber,
    Mse,
}

/// How the target network follows the online one.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "update", rename_all = "lowercase", deny_unknown_fields)]
pub enum TargetUpdate {
    /// Copy θ⁻ ← θ every `every` updates.
    Hard { every: u64 },
    /// θ⁻ ← τ·θ + (1 − τ)·θ⁻ after every update.
    Soft { tau: f64 },
}

/// Learning settings of the agent.
#[derive(Debug, Clone)]
pub struct Learning {
    pub gamma: f64,
    pub batch: usize,
    pub learning_rate: f64,
    pub loss: TdLoss,
    pub double: bool,
    pub target: TargetUpdate,
    /// Rewards are multiplied by this before they enter the targets.
    pub reward_scale: f64,
}

/// Online and target networks, their optimizer and the replay memory.
pub struct Agent {
    /// θ, on the autodiff device.
    pub online: Option<QNet>,
    /// θ⁻, on the plain device.
    pub target: QNet,
    pub optim: ModuleOptimizer,
    pub replay: Replay,
    pub device: Device,
    pub eval_device: Device,
    pub updates: u64,
    pub actions: usize,
}

impl Agent {
    pub fn online(&self) -> &QNet {
        self.online
            .as_ref()
            .expect("online network present between updates")
    }

    /// ε-greedy: a random action with probability ε, else the greedy one.
    pub fn act(&self, greedy_net: &QNet, s: &[f32], epsilon: f64, rng: &mut StdRng) -> usize {
        if rng.random::<f64>() < epsilon {
            rng.random_range(0..self.actions)
        } else {
            argmax(&greedy_net.q_values(s))
        }
    }

    /// One gradient step on a uniform mini-batch; returns the batch loss.
    pub fn learn(&mut self, l: &Learning, rng: &mut StdRng) -> Result<f32> {
        let idx = self.replay.sample(rng, l.batch);
        let k = self.replay.state_len;
        let b = idx.len();
        let s = self.replay.rows(&self.replay.s, &idx);
        let s2 = self.replay.rows(&self.replay.s2, &idx);
        let s2_t = Tensor::<2>::from_data(TensorData::new(s2, [b, k]), &self.eval_device);
        let q_next_target = to_vec(self.target.forward(s2_t.clone()));
        let a_n = self.actions;
        let chosen: Vec<usize> = if l.double {
            let q_next_online = to_vec(self.online().valid().forward(s2_t));
            (0..b)
                .map(|i| argmax(&q_next_online[i * a_n..(i + 1) * a_n]))
                .collect()
        } else {
            (0..b)
                .map(|i| argmax(&q_next_target[i * a_n..(i + 1) * a_n]))
                .collect()
        };
        let y: Vec<f32> = idx
            .iter()
            .enumerate()
            .map(|(row, &i)| {
                let bootstrap = if self.replay.done[i] {
                    0.0
                } else {
                    l.gamma * q_next_target[row * a_n + chosen[row]] as f64
                };
                (self.replay.r[i] as f64 * l.reward_scale + bootstrap) as f32
            })
            .collect();
        let actions: Vec<i64> = idx.iter().map(|&i| self.replay.a[i] as i64).collect();
        let online = self.online.take().expect("online network present");
        let x = Tensor::<2>::from_data(TensorData::new(s, [b, k]), &self.device);
        let a_t = Tensor::<2, Int>::from_data(TensorData::new(actions, [b, 1]), &self.device);
        let q = online.forward(x).gather(1, a_t); // Q_θ(s, a): [batch, 1]
        let y = Tensor::<2>::from_data(TensorData::new(y, [b, 1]), &self.device);
        let loss = match l.loss {
            TdLoss::Huber => HuberLossConfig::new(1.0)
                .init()
                .forward(q, y, Reduction::Mean),
            TdLoss::Mse => MseLoss::new().forward(q, y, Reduction::Mean),
        };
        let value = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &online);
        let online = self.optim.step(l.learning_rate, online, grads);
        self.updates += 1;
        match l.target {
            TargetUpdate::Hard { every } => {
                if self.updates.is_multiple_of(every.max(1)) {
                    self.target = online.valid();
                }
            }
            TargetUpdate::Soft { tau } => {
                self.target = self.target.blend(&online.valid(), tau);
            }
        }
        self.online = Some(online);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn epsilon_schedules() {
        let lin = Epsilon {
            start: 1.0,
            end: 0.1,
            decay_steps: 100.0,
            schedule: Schedule::Linear,
        };
        assert_eq!(lin.at(0), 1.0);
        assert!((lin.at(50) - 0.55).abs() < 1e-12);
        assert_eq!(lin.at(1000), 0.1);
        let exp = Epsilon {
            schedule: Schedule::Exponential,
            ..lin
        };
        assert!((exp.at(100) - (0.1 + 0.9 * (-1f64).exp())).abs() < 1e-12);
    }

    /// Uniform: each of 10 stored transitions is drawn about 1/10 of the time; seeded: the
    /// same generator state draws the same indices; the ring overwrites the oldest.
    #[test]
    fn replay_is_a_uniform_seeded_ring() {
        let mut r = Replay::new(10, 1);
        for i in 0..13 {
            r.push(&[i as f32], 0, i as f32, &[0.0], false);
        }
        assert_eq!(r.len(), 10);
        assert_eq!(r.r[..3], [10.0, 11.0, 12.0]);
        let mut rng = StdRng::seed_from_u64(1);
        let idx = r.sample(&mut rng, 20_000);
        for k in 0..10 {
            let share = idx.iter().filter(|&&i| i == k).count() as f64 / 20_000.0;
            assert!((share - 0.1).abs() < 0.01, "{k}: {share}");
        }
        assert_eq!(
            r.sample(&mut StdRng::seed_from_u64(4), 8),
            r.sample(&mut StdRng::seed_from_u64(4), 8)
        );
    }

    #[test]
    fn hard_copy_and_soft_blend() {
        let d = Device::flex();
        d.seed(1);
        let a = QNet::new(3, &[4], 2, &d);
        let b = QNet::new(3, &[4], 2, &d);
        let wa = to_vec(a.layers[0].weight.val());
        let wb = to_vec(b.layers[0].weight.val());
        let blended = b.blend(&a, 0.25);
        let wm = to_vec(blended.layers[0].weight.val());
        for i in 0..wa.len() {
            assert!((wm[i] - (0.25 * wa[i] + 0.75 * wb[i])).abs() < 1e-6);
        }
        let copied = b.blend(&a, 1.0);
        assert_eq!(
            to_vec(copied.layers[1].bias.as_ref().unwrap().val()),
            to_vec(a.layers[1].bias.as_ref().unwrap().val())
        );
    }
}
