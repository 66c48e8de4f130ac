//! Learning-rate schedules (`train.schedule`): the factor f(u) that multiplies every
//! optimizer's base rate in unit u (an epoch, or a DQN round), η_u = η·f(u).
//!
//! The engine evaluates the schedule at the start of every unit and hands each registered
//! optimizer its rate ([`crate::engine::UnitContext::lr`]); `metrics.csv` records it (`lr`, or
//! `lr_<optimizer>` for a routine with several). Every schedule is a pure function of the unit,
//! the number of units and, for `plateau`, the metrics history, so a resumed run follows the
//! same rates as an uninterrupted one without any state of its own.
//!
//! | `kind` | f(u), u = 1…U | PyTorch |
//! |---|---|---|
//! | `constant` | 1 | — |
//! | `step` | γ^⌊(u−1)/step_size⌋ | `StepLR` |
//! | `exponential` | γ^(u−1) (what `train.lr_decay` means) | `ExponentialLR` |
//! | `cosine` | u/W for u ≤ W, then m + (1−m)·½(1 + cos(π·(u−W−1)/(U−W−1))) | `LinearLR` → `CosineAnnealingLR` |
//! | `one_cycle` | cosine rise from 1/25 to 1 over the first P units, cosine fall to 1/(25·10⁴) | `OneCycleLR` (per unit) |
//! | `plateau` | ×γ each time the monitored metric has not improved for more than `patience` units | `ReduceLROnPlateau` |
//!
//! (W = `warmup`, m = `min_factor`, P = `warmup`, or 30% of the units when it is 0.)

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

/// Which schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Step,
    Exponential,
    Cosine,
    OneCycle,
    Plateau,
}

/// `train.schedule`: a name (`schedule = "cosine"`) or a table with the settings
/// (`schedule = { kind = "cosine", warmup = 2 }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Multiplier γ: per `step_size` units (`step`, default 0.1), per unit (`exponential`,
    /// default 0.95), per plateau (`plateau`, default 0.1).
    pub gamma: Option<f64>,
    /// `step`: units between two multiplications by γ.
    pub step_size: usize,
    /// `cosine`: units of linear warm-up; `one_cycle`: units of the rising part (0: 30%).
    pub warmup: usize,
    /// `cosine` and `plateau`: the smallest factor f reaches.
    pub min_factor: f64,
    /// `plateau`: units without improvement tolerated before the rate falls.
    pub patience: usize,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            kind: ScheduleKind::Constant,
            gamma: None,
            step_size: 10,
            warmup: 0,
            min_factor: 0.0,
            patience: 2,
        }
    }
}

/// Accept `"cosine"` as well as a table.
pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Schedule, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Schedule;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(
                "a schedule name (constant, step, exponential, cosine, one_cycle, plateau) or a table { kind = ..., ... }",
            )
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Schedule, E> {
            let kind = ScheduleKind::deserialize(serde::de::value::StrDeserializer::<E>::new(s))?;
            Ok(Schedule {
                kind,
                ..Schedule::default()
            })
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Schedule, A::Error> {
            Schedule::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(V)
}

impl Schedule {
    /// The default γ of each kind.
    pub fn gamma(&self) -> f64 {
        self.gamma.unwrap_or(match self.kind {
            ScheduleKind::Exponential => 0.95,
            _ => 0.1,
        })
    }

    /// `train.lr_decay = γ` as a schedule: exponential with that γ.
    pub fn exponential(gamma: f64) -> Self {
        Schedule {
            kind: ScheduleKind::Exponential,
            gamma: Some(gamma),
            ..Schedule::default()
        }
    }

    pub fn is_constant(&self) -> bool {
        self.kind == ScheduleKind::Constant
    }

    /// Whether the schedule reads the monitored metric.
    pub fn needs_monitor(&self) -> bool {
        self.kind == ScheduleKind::Plateau
    }

    /// Settings that would only show up as a flat or exploding rate: (field, message).
    pub fn check(&self, units: usize) -> Result<(), (String, String)> {
        let bad = |f: &str, m: String| Err((format!("train.schedule.{f}"), m));
        let g = self.gamma();
        if !(g > 0.0 && g <= 1.0) {
            return bad("gamma", format!("must be in (0, 1], got {g}"));
        }
        if self.kind == ScheduleKind::Step && self.step_size == 0 {
            return bad("step_size", "must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.min_factor) {
            return bad(
                "min_factor",
                format!("must be in [0, 1], got {}", self.min_factor),
            );
        }
        if matches!(self.kind, ScheduleKind::Cosine | ScheduleKind::OneCycle)
            && self.warmup >= units
            && units > 1
        {
            return bad(
                "warmup",
                format!(
                    "{} warm-up units leave none of the {units} to anneal",
                    self.warmup
                ),
            );
        }
        Ok(())
    }

    /// f(u) for unit `unit` (1-based) of `units`; `improved[i]` says whether unit i+1 improved
    /// the monitored metric (only `plateau` reads it; it holds the units before `unit`).
    pub fn factor(&self, unit: usize, units: usize, improved: &[bool]) -> f64 {
        let u = unit.max(1) as f64;
        let n = units.max(1) as f64;
        let g = self.gamma();
        let cos_between =
            |from: f64, to: f64, t: f64| to + (from - to) * 0.5 * (1.0 + (PI * t).cos());
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Step => g.powi(((unit.max(1) - 1) / self.step_size.max(1)) as i32),
            ScheduleKind::Exponential => g.powi(unit.saturating_sub(1) as i32),
            ScheduleKind::Cosine => {
                let w = self.warmup as f64;
                if u <= w {
                    return u / w;
                }
                let span = n - w - 1.0;
                let t = if span > 0.0 {
                    (u - w - 1.0) / span
                } else {
                    0.0
                };
                cos_between(1.0, self.min_factor, t.min(1.0))
            }
            ScheduleKind::OneCycle => {
                let rise = if self.warmup > 0 {
                    self.warmup as f64
                } else {
                    (0.3 * n).ceil().max(1.0)
                };
                let (start, end) = (1.0 / 25.0, 1.0 / 25.0e4);
                if u <= rise {
                    let t = if rise > 1.0 {
                        (u - 1.0) / (rise - 1.0)
                    } else {
                        1.0
                    };
                    cos_between(start, 1.0, t)
                } else {
                    let span = n - rise;
                    let t = if span > 0.0 { (u - rise) / span } else { 1.0 };
                    cos_between(1.0, end, t.min(1.0))
                }
            }
            ScheduleKind::Plateau => {
                let mut f: f64 = 1.0;
                let mut bad = 0;
                for &better in improved.iter().take(unit.saturating_sub(1)) {
                    if better {
                        bad = 0;
                    } else {
                        bad += 1;
                        if bad > self.patience {
                            f = (f * g).max(self.min_factor);
                            bad = 0;
                        }
                    }
                }
                f
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            ..Schedule::default()
        }
    }

    #[test]
    fn step_and_exponential_match_pytorch() {
        let s = Schedule {
            step_size: 2,
            ..of(ScheduleKind::Step)
        };
        let f: Vec<f64> = (1..=5).map(|u| s.factor(u, 5, &[])).collect();
        assert_eq!(f, [1.0, 1.0, 0.1, 0.1, 0.1f64.powi(2)]);
        let e = Schedule::exponential(0.5);
        assert_eq!(e.factor(3, 9, &[]), 0.25);
        assert_eq!(of(ScheduleKind::Constant).factor(7, 9, &[]), 1.0);
    }

    /// Warm-up 1/W, 2/W, …, 1; then half a cosine period down to `min_factor` at the last unit.
    #[test]
    fn cosine_warms_up_then_anneals_to_the_floor() {
        let s = Schedule {
            warmup: 2,
            min_factor: 0.1,
            ..of(ScheduleKind::Cosine)
        };
        let f: Vec<f64> = (1..=7).map(|u| s.factor(u, 7, &[])).collect();
        assert_eq!(&f[..3], &[0.5, 1.0, 1.0]);
        assert!((f[4] - 0.55).abs() < 1e-12, "{f:?}"); // halfway: (1 + 0.1) / 2
        assert!((f[6] - 0.1).abs() < 1e-12, "{f:?}");
        assert!(f.windows(2).skip(2).all(|w| w[1] < w[0]), "{f:?}");
    }

    #[test]
    fn one_cycle_rises_then_falls() {
        let s = of(ScheduleKind::OneCycle);
        let f: Vec<f64> = (1..=10).map(|u| s.factor(u, 10, &[])).collect();
        assert!(
            (f[0] - 0.04).abs() < 1e-12 && (f[2] - 1.0).abs() < 1e-12,
            "{f:?}"
        );
        assert!((f[9] - 4e-6).abs() < 1e-12, "{f:?}");
        assert!(f[..3].windows(2).all(|w| w[1] > w[0]));
        assert!(f[2..].windows(2).all(|w| w[1] < w[0]));
    }

    /// ReduceLROnPlateau(patience=1, factor=0.5): the rate halves after the second unit in a
    /// row without improvement, and the count restarts.
    #[test]
    fn plateau_reduces_after_patience_units_without_improvement() {
        let s = Schedule {
            gamma: Some(0.5),
            patience: 1,
            ..of(ScheduleKind::Plateau)
        };
        let improved = [true, false, false, true, false, false, false, false];
        let f: Vec<f64> = (1..=9).map(|u| s.factor(u, 9, &improved)).collect();
        assert_eq!(f, [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.125]);
    }

    #[test]
    fn a_name_or_a_table_deserializes() {
        #[derive(Deserialize)]
        struct T {
            #[serde(deserialize_with = "deserialize")]
            s: Schedule,
        }
        let t: T = toml::from_str("s = \"cosine\"").unwrap();
        assert_eq!(t.s.kind, ScheduleKind::Cosine);
        let t: T = toml::from_str("s = { kind = \"step\", step_size = 3 }").unwrap();
        assert_eq!((t.s.kind, t.s.step_size), (ScheduleKind::Step, 3));
        let e = toml::from_str::<T>("s = { kind = \"step\", steps = 3 }")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("steps"), "{e}");
        let e = toml::from_str::<T>("s = \"cosin\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cosine"), "{e}");
    }
}
