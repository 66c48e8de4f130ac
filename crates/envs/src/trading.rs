//! The trading agent's market (course deck 3's ETF example): each day the agent sees the last
//! 20 days of prices and volumes and buys, holds or sells.
//!
//! - Data: an OHLCV CSV with the common columns `Date, Open, High, Low, Close, Adj Close,
//!   Volume` (Yahoo Finance's layout, names as written, any order), oldest first; or the seeded synthetic market
//!   ([`Synthetic`]).
//! - State: the last [`WINDOW`] days × 6 columns (Open, High, Low, Close, Adj Close, Volume),
//!   normalised by the window itself: every price p becomes p / c − 1 with c the last day's
//!   Close, every volume v becomes v / v̄ − 1 with v̄ the window's mean volume; then one number
//!   for the position, the share of the portfolio's value held in units (0 = all cash).
//! - Actions: buy 20, buy 10, hold, sell 10, sell 20 units, at the day's Close. A buy is cut
//!   to what the cash pays for (no borrowing); a sell is cut to the units held (no short
//!   selling).
//! - Start: 20,000 in cash, no units. The episode runs from day 20 to the last day of the
//!   file; on the last day every unit is sold at the Close.
//! - Reward: the change of the portfolio value V = cash + units × Close from one day to the
//!   next, so the return of an episode is V_end − 20,000.

use std::path::Path;

use anyhow::{Result, bail};
use kiln_datasets::tabular::Table;
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;
use crate::{Environment, StepResult};

/// Days in a state.
pub const WINDOW: usize = 20;
/// Columns per day in a state.
pub const COLUMNS: [&str; 6] = ["Open", "High", "Low", "Close", "Adj Close", "Volume"];
pub const START_CASH: f64 = 20_000.0;
/// Units bought (+) or sold (−) by each action.
pub const ACTION_UNITS: [i64; 5] = [20, 10, 0, -10, -20];

/// One day of an OHLCV file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Day {
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub adj_close: f64,
    pub volume: f64,
}

impl Day {
    fn columns(&self) -> [f64; 6] {
        [
            self.open,
            self.high,
            self.low,
            self.close,
            self.adj_close,
            self.volume,
        ]
    }
}

/// Read an OHLCV CSV; errors name the file, the row and the column.
pub fn read_ohlcv(path: &Path) -> Result<Vec<Day>> {
    let table = Table::read(path)?;
    let names: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
    let mut days = Vec::with_capacity(table.rows.len());
    for (i, v) in table.numeric(&names)?.into_iter().enumerate() {
        let line = i + 2;
        // Open, High, Low, Close and Adj Close are prices (> 0: the agent's returns divide
        // by them); Volume may be 0 (a holiday row) but not negative.
        if let Some(k) = v[..5].iter().position(|x| *x <= 0.0) {
            bail!(
                "{}: line {line}, column {:?}: a price must be positive, got {}",
                path.display(),
                COLUMNS[k],
                v[k]
            );
        }
        if v[5] < 0.0 {
            bail!(
                "{}: line {line}, column \"Volume\": negative",
                path.display()
            );
        }
        days.push(Day {
            open: v[0],
            high: v[1],
            low: v[2],
            close: v[3],
            adj_close: v[4],
            volume: v[5],
        });
    }
    if days.len() < WINDOW + 1 {
        bail!(
            "{}: {} rows of prices, fewer than one window of {WINDOW} days plus a day to trade ({})",
            path.display(),
            days.len(),
            WINDOW + 1
        );
    }
    Ok(days)
}

/// A seeded synthetic market: geometric Brownian motion with regime changes. The daily log
/// return is N(μ_r − σ_r²/2, σ_r²) in regime r; each day the regime switches with probability
/// `switch`. Regimes: bull (μ = +0.08%, σ = 1%) and bear (μ = −0.08%, σ = 2%). Open, High and
/// Low scatter around the Close by the day's σ; volume is log-normal, higher in the bear
/// regime.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Synthetic {
    pub days: usize,
    pub start_price: f64,
    pub switch: f64,
}

impl Synthetic {
    pub fn generate(&self, seed: u64) -> Vec<Day> {
        let mut rng = SplitMix64::new(seed ^ 0x7a4d_e5ee);
        let regimes = [(0.0008, 0.01, 1.0e6), (-0.0008, 0.02, 1.6e6)];
        let mut r = 0usize;
        let mut close = self.start_price;
        let mut days = Vec::with_capacity(self.days);
        for _ in 0..self.days {
            if rng.uniform() < self.switch {
                r = 1 - r;
            }
            let (mu, sigma, vol) = regimes[r];
            let open = close * (1.0 + 0.3 * sigma * rng.normal());
            close *= (mu - sigma * sigma / 2.0 + sigma * rng.normal()).exp();
            let high = open.max(close) * (1.0 + 0.5 * sigma * rng.normal().abs());
            let low = open.min(close) * (1.0 - 0.5 * sigma * rng.normal().abs());
            days.push(Day {
                open,
                high,
                low,
                close,
                adj_close: close,
                volume: vol * (0.3 * rng.normal()).exp(),
            });
        }
        days
    }
}

/// The market and the agent's account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trading {
    pub days: Vec<Day>,
    /// Index of today (the last day of the state's window).
    pub today: usize,
    pub cash: f64,
    pub units: i64,
}

impl Trading {
    pub fn new(days: Vec<Day>) -> Self {
        assert!(
            days.len() > WINDOW,
            "a market needs more than {WINDOW} days"
        );
        let mut env = Trading {
            days,
            today: 0,
            cash: 0.0,
            units: 0,
        };
        env.reset();
        env
    }

    fn close(&self) -> f64 {
        self.days[self.today].close
    }

    /// Cash plus units at today's Close.
    pub fn value(&self) -> f64 {
        self.cash + self.units as f64 * self.close()
    }

    /// Units actually traded for `action` today (cut to cash and holdings).
    pub fn executable(&self, action: usize) -> i64 {
        let want = ACTION_UNITS[action];
        if want > 0 {
            want.min((self.cash / self.close()).floor() as i64)
        } else {
            want.max(-self.units)
        }
    }

    /// The value buy-and-hold reaches: all cash into units on the first trading day (whole
    /// units), sold on the last.
    pub fn buy_and_hold(&self) -> f64 {
        let first = self.days[WINDOW - 1].close;
        let units = (START_CASH / first).floor();
        START_CASH - units * first + units * self.days[self.days.len() - 1].close
    }
}

impl Environment for Trading {
    fn state_len(&self) -> usize {
        WINDOW * COLUMNS.len() + 1
    }
    fn actions(&self) -> usize {
        ACTION_UNITS.len()
    }
    fn max_steps(&self) -> usize {
        self.days.len() - WINDOW
    }
    fn state(&self) -> Vec<f32> {
        let window = &self.days[self.today + 1 - WINDOW..=self.today];
        let c = self.close();
        let mean_volume = window.iter().map(|d| d.volume).sum::<f64>() / WINDOW as f64;
        let mut out = Vec::with_capacity(self.state_len());
        for d in window {
            let cols = d.columns();
            for (k, v) in cols.iter().enumerate() {
                out.push(if k == 5 {
                    if mean_volume > 0.0 {
                        v / mean_volume - 1.0
                    } else {
                        0.0
                    }
                } else {
                    v / c - 1.0
                } as f32);
            }
        }
        let value = self.value();
        out.push(if value > 0.0 {
            (self.units as f64 * c / value) as f32
        } else {
            0.0
        });
        out
    }
    fn step(&mut self, action: usize) -> StepResult {
        let before = self.value();
        let units = self.executable(action);
        self.cash -= units as f64 * self.close();
        self.units += units;
        self.today += 1;
        let done = self.today == self.days.len() - 1;
        if done {
            // The final liquidation: every unit sold at the last Close.
            self.cash += self.units as f64 * self.close();
            self.units = 0;
        }
        StepResult {
            next_state: self.state(),
            reward: self.value() - before,
            done,
            truncated: false,
        }
    }
    fn reset(&mut self) {
        self.today = WINDOW - 1;
        self.cash = START_CASH;
        self.units = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(days: usize, prices: &[f64]) -> Vec<Day> {
        (0..days)
            .map(|i| {
                let p = prices[i.min(prices.len() - 1)];
                Day {
                    open: p,
                    high: p,
                    low: p,
                    close: p,
                    adj_close: p,
                    volume: 100.0,
                }
            })
            .collect()
    }

    /// Buys are cut to the cash, sells to the holdings; rewards add up to V_end − 20,000 and
    /// the last day sells everything.
    #[test]
    fn accounting() {
        // 19 days at 100, then 1500 (only 13 units affordable), then 2000.
        let mut prices = vec![100.0; 19];
        prices.extend([1500.0, 2000.0, 2000.0]);
        let mut env = Trading::new(flat(22, &prices));
        assert_eq!(env.executable(0), 13); // floor(20000 / 1500)
        assert_eq!(env.executable(3), 0); // nothing to sell
        let r1 = env.step(0);
        assert_eq!(env.units, 13);
        assert!((env.cash - (20_000.0 - 13.0 * 1500.0)).abs() < 1e-9);
        assert!((r1.reward - 13.0 * 500.0).abs() < 1e-9, "{}", r1.reward);
        assert!(!r1.done);
        assert_eq!(env.executable(4), -13); // sell 20 cut to the 13 held
        let r2 = env.step(2);
        assert!(r2.done && !r2.truncated);
        assert_eq!(env.units, 0, "the last day sells everything");
        assert!((env.cash - (500.0 + 13.0 * 2000.0)).abs() < 1e-9);
        assert!(((r1.reward + r2.reward) - (env.cash - START_CASH)).abs() < 1e-9);
        // Buy and hold: 13 units at 1500 (the first trading day), sold at 2000.
        assert!((env.buy_and_hold() - env.cash).abs() < 1e-9);
    }

    #[test]
    fn state_is_normalised_by_the_window() {
        let mut prices: Vec<f64> = (0..25).map(|i| 100.0 + i as f64).collect();
        prices[19] = 200.0;
        let env = Trading::new(flat(25, &prices));
        let s = env.state();
        assert_eq!(s.len(), 121);
        // Today's Close is the reference: its column is 0; volume equals its mean: 0.
        assert_eq!(s[19 * 6 + 3], 0.0);
        assert_eq!(s[5], 0.0);
        assert!((s[3] - (100.0 / 200.0 - 1.0)).abs() < 1e-6);
        assert_eq!(s[120], 0.0, "all cash");
    }

    #[test]
    fn synthetic_is_seeded_and_positive() {
        let g = Synthetic {
            days: 500,
            start_price: 50.0,
            switch: 0.02,
        };
        let a = g.generate(1);
        assert_eq!(a, g.generate(1));
        assert_ne!(a, g.generate(2));
        assert!(
            a.iter()
                .all(|d| d.close > 0.0 && d.low <= d.close && d.close <= d.high)
        );
    }

    #[test]
    fn bad_files_name_file_row_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spy.csv");
        let header = "Date,Open,High,Low,Close,Adj Close,Volume\n";
        let row = |i: usize| format!("2020-01-{:02},1,2,0.5,1.5,1.5,1000\n", i + 1);
        std::fs::write(
            &p,
            format!("{header}{}", (0..5).map(row).collect::<String>()),
        )
        .unwrap();
        let e = read_ohlcv(&p).unwrap_err().to_string();
        assert!(
            e.contains("spy.csv: 5 rows of prices, fewer than one window"),
            "{e}"
        );
        std::fs::write(
            &p,
            "Date,Open,High,Low,Close,Volume\n2020-01-01,1,1,1,1,1\n",
        )
        .unwrap();
        let e = read_ohlcv(&p).unwrap_err().to_string();
        assert!(e.contains("spy.csv: no column \"Adj Close\""), "{e}");
        let mut text = format!("{header}{}", (0..25).map(row).collect::<String>());
        text = text.replacen("2020-01-03,1,2,0.5,1.5", "2020-01-03,1,2,0.5,n/a", 1);
        std::fs::write(&p, text).unwrap();
        let e = read_ohlcv(&p).unwrap_err().to_string();
        assert!(
            e.contains("spy.csv: line 4, column \"Close\": not a number: \"n/a\""),
            "{e}"
        );
        let text = format!("{header}{}", (0..25).map(row).collect::<String>());
        std::fs::write(&p, text.replacen("1.5,1.5,1000", "1.5,0,1000", 1)).unwrap();
        let e = read_ohlcv(&p).unwrap_err().to_string();
        assert!(
            e.contains("spy.csv: line 2, column \"Adj Close\": a price must be positive, got 0"),
            "{e}"
        );
        std::fs::write(&p, text).unwrap();
        assert_eq!(read_ohlcv(&p).unwrap().len(), 25);
    }
}
