//! Environments for reinforcement learning (course deck 3's deep Q-learning): CartPole-v1
//! ([`cartpole`]) and the trading agent's market ([`trading`]).
//!
//! Every environment is seeded and serialisable (its random generator included), so a
//! training run can checkpoint it and continue exactly after `kill -9`.
//!
//! The [`Environment`] trait has the shape of Burn 0.22's `burn::rl::Environment` (`state`,
//! `step` returning a [`StepResult`] with `done` and `truncated`, `reset`), with two
//! differences: the episode length is a method, not an associated constant (a trading
//! episode lasts as long as its price file), and states are plain `Vec<f32>` vectors.

pub mod cartpole;
pub mod rng;
pub mod trading;

/// The result of one step, as Burn's `StepResult`.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// The state after the step.
    pub next_state: Vec<f32>,
    pub reward: f64,
    /// The episode ended in a terminal state (the pole fell, the money was counted).
    pub done: bool,
    /// The episode was cut at its step limit without reaching a terminal state.
    pub truncated: bool,
}

/// A discrete-action environment.
pub trait Environment {
    /// Length of the state vector.
    fn state_len(&self) -> usize;
    /// Number of actions (actions are `0..actions()`).
    fn actions(&self) -> usize;
    /// The most steps an episode can last.
    fn max_steps(&self) -> usize;
    /// The current state.
    fn state(&self) -> Vec<f32>;
    /// Apply `action`.
    fn step(&mut self, action: usize) -> StepResult;
    /// Start a new episode (drawing its start from the environment's own generator).
    fn reset(&mut self);
}
