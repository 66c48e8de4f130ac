//! Deep Q-learning (course deck 3) on the shared engine: CartPole-v1 and the trading agent.
//!
//! One engine unit is a round of `episodes_per_round` training episodes followed by greedy
//! evaluation episodes on a separate, freshly seeded environment. The checkpoint after each
//! round holds the online and target networks, the optimizer, the replay memory, the step and
//! update counts (ε follows the step count) and the environment with its random generator, so
//! `kiln resume` after `kill -9` continues exactly as an uninterrupted run.

pub mod agent;
pub mod family;

pub use family::FAMILY;
