//! CartPole-v1 (Barto, Sutton & Anderson 1983; the constants and Euler integration of
//! Gymnasium's `CartPoleEnv`): a pole hinged on a cart; push the cart left or right to keep the
//! pole up.
//!
//! State s = (x, ẋ, θ, θ̇). With F = ±10 N, m_c = 1.0, m_p = 0.1, M = m_c + m_p, half-length
//! l = 0.5, g = 9.8 and τ = 0.02 s:
//!
//! temp = (F + m_p·l·θ̇²·sin θ)/M
//! θ̈ = (g·sin θ − cos θ·temp) / (l·(4/3 − m_p·cos²θ/M))
//! ẍ = temp − m_p·l·θ̈·cos θ / M
//! x ← x + τ·ẋ, ẋ ← ẋ + τ·ẍ, θ ← θ + τ·θ̇, θ̇ ← θ̇ + τ·θ̈   (explicit Euler, in this order)
//!
//! Reward 1 every step, including the last. The episode terminates when |x| > 2.4 or
//! |θ| > 12° and is truncated after 500 steps. A reset draws each of the four values uniformly
//! from [−0.05, 0.05].

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;
use crate::{Environment, StepResult};

pub const GRAVITY: f64 = 9.8;
pub const MASS_CART: f64 = 1.0;
pub const MASS_POLE: f64 = 0.1;
pub const HALF_LENGTH: f64 = 0.5;
pub const FORCE: f64 = 10.0;
pub const TAU: f64 = 0.02;
pub const X_LIMIT: f64 = 2.4;
/// 12° in radians.
pub const THETA_LIMIT: f64 = 12.0 * 2.0 * std::f64::consts::PI / 360.0;
pub const MAX_STEPS: usize = 500;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CartPole {
    /// (x, ẋ, θ, θ̇).
    pub s: [f64; 4],
    pub steps: usize,
    pub rng: SplitMix64,
}

impl CartPole {
    /// A seeded environment, already reset.
    pub fn new(seed: u64) -> Self {
        let mut env = CartPole {
            s: [0.0; 4],
            steps: 0,
            rng: SplitMix64::new(seed),
        };
        env.reset();
        env
    }

    /// The next state from `s` under `action` (0 = push left, 1 = push right).
    pub fn dynamics(s: [f64; 4], action: usize) -> [f64; 4] {
        let [x, x_dot, theta, theta_dot] = s;
        let force = if action == 1 { FORCE } else { -FORCE };
        let total = MASS_CART + MASS_POLE;
        let pml = MASS_POLE * HALF_LENGTH;
        let (sin, cos) = theta.sin_cos();
        let temp = (force + pml * theta_dot * theta_dot * sin) / total;
        let theta_acc = (GRAVITY * sin - cos * temp)
            / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos * cos / total));
        let x_acc = temp - pml * theta_acc * cos / total;
        [
            x + TAU * x_dot,
            x_dot + TAU * x_acc,
            theta + TAU * theta_dot,
            theta_dot + TAU * theta_acc,
        ]
    }

    fn terminal(s: &[f64; 4]) -> bool {
        s[0] < -X_LIMIT || s[0] > X_LIMIT || s[2] < -THETA_LIMIT || s[2] > THETA_LIMIT
    }
}

impl Environment for CartPole {
    fn state_len(&self) -> usize {
        4
    }
    fn actions(&self) -> usize {
        2
    }
    fn max_steps(&self) -> usize {
        MAX_STEPS
    }
    fn state(&self) -> Vec<f32> {
        self.s.iter().map(|&v| v as f32).collect()
    }
    fn step(&mut self, action: usize) -> StepResult {
        self.s = Self::dynamics(self.s, action);
        self.steps += 1;
        let done = Self::terminal(&self.s);
        StepResult {
            next_state: self.state(),
            reward: 1.0,
            done,
            truncated: !done && self.steps >= MAX_STEPS,
        }
    }
    fn reset(&mut self) {
        for v in &mut self.s {
            *v = self.rng.range(-0.05, 0.05);
        }
        self.steps = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From rest, pushing right: temp = 10/1.1, θ̈ = −temp/(0.5·(4/3 − 0.1/1.1)) = −14.6341…,
    /// ẍ = temp − 0.05·θ̈/1.1 = 9.7561…; after one Euler step only the velocities move.
    #[test]
    fn one_step_by_hand() {
        let next = CartPole::dynamics([0.0, 0.0, 0.0, 0.0], 1);
        let temp: f64 = 10.0 / 1.1;
        let theta_acc = -temp / (0.5 * (4.0 / 3.0 - 0.1 / 1.1));
        let x_acc = temp - 0.05 * theta_acc / 1.1;
        assert!((theta_acc + 14.634_146).abs() < 1e-5, "{theta_acc}");
        assert!((x_acc - 9.756_098).abs() < 1e-5, "{x_acc}");
        let want = [0.0, 0.02 * x_acc, 0.0, 0.02 * theta_acc];
        for (a, b) in next.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{next:?} vs {want:?}");
        }
        // A second step from a tilted, moving state: the position integrates the old velocity.
        let s = [0.1, 0.5, 0.05, -0.2];
        let n = CartPole::dynamics(s, 0);
        assert!((n[0] - (0.1 + 0.02 * 0.5)).abs() < 1e-12);
        assert!((n[2] - (0.05 + 0.02 * -0.2)).abs() < 1e-12);
    }

    #[test]
    fn termination_and_truncation() {
        let mut env = CartPole::new(1);
        env.s = [2.39, 1.0, 0.0, 0.0];
        let r = env.step(1);
        assert!(r.done && !r.truncated && r.reward == 1.0);
        let mut env = CartPole::new(1);
        env.s = [0.0, 0.0, THETA_LIMIT - 1e-4, 1.0];
        assert!(env.step(1).done);
        // Truncation: the step limit, with the pole still up.
        let mut env = CartPole::new(2);
        env.steps = MAX_STEPS - 1;
        env.s = [0.0; 4];
        let r = env.step(0);
        assert!(r.truncated && !r.done);
    }

    #[test]
    fn reset_is_seeded_and_small() {
        let a = CartPole::new(5);
        assert_eq!(a, CartPole::new(5));
        assert_ne!(a.s, CartPole::new(6).s);
        assert!(a.s.iter().all(|v| v.abs() <= 0.05));
        // Serialised mid-episode and restored, it continues exactly (checkpoints hold it).
        let mut env = CartPole::new(3);
        env.step(1);
        let mut copy: CartPole =
            serde_json::from_str(&serde_json::to_string(&env).unwrap()).unwrap();
        for t in 0..5 {
            assert_eq!(env.step(t % 2), copy.step(t % 2));
        }
        env.reset();
        copy.reset();
        assert_eq!(env, copy);
    }
}
