//! The `dqn` family: configs `dqn-cartpole` and `dqn-trading`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use burn::module::Module;
use kiln_core::engine::checkpoint::{Checkpoint, CheckpointReader};
use kiln_core::engine::{self, Metrics, Monitor, Routine, UnitContext, derive_seed};
use kiln_core::plot::{Series, line_chart};
use kiln_core::train::{Benchmark, engine_options, load_model, peak_rss, save_weights};
use kiln_core::{
    ConfigDoc, ConfigError, Family, Figure, Finished, PredictInput, RunConfig, RunContext, RunDir,
};
use kiln_envs::cartpole::CartPole;
use kiln_envs::trading::{self, Trading};
use kiln_envs::{Environment, StepResult};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::agent::{Agent, Epsilon, Learning, QNet, Replay, TargetUpdate, TdLoss, argmax};

/// `[params.env]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvParams {
    /// `cartpole` or `trading`.
    pub kind: String,
    /// Trading: an OHLCV CSV (else the synthetic market).
    #[serde(default)]
    pub csv: Option<PathBuf>,
    /// Trading: the synthetic market.
    #[serde(default)]
    pub synthetic: Option<trading::Synthetic>,
    /// Trading: the last fraction of the days is the test market, traded once at the end
    /// (`train.validation_split` of the days before it validate every round; the agent
    /// trains on the days before those).
    #[serde(default = "test_fraction")]
    pub test_fraction: f64,
}

fn test_fraction() -> f64 {
    0.3
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DqnParams {
    pub env: EnvParams,
    pub hidden: Vec<usize>,
    /// Discount γ.
    pub gamma: f64,
    pub replay_size: usize,
    /// Transitions collected before learning starts.
    pub warmup: usize,
    /// Environment steps per gradient update.
    #[serde(default = "one")]
    pub train_every: u64,
    pub episodes_per_round: usize,
    /// Greedy evaluation episodes after every round.
    pub eval_episodes: usize,
    pub epsilon: Epsilon,
    pub target: TargetUpdate,
    #[serde(default)]
    pub loss: TdLoss,
    #[serde(default)]
    pub double: bool,
    #[serde(default = "unit_scale")]
    pub reward_scale: f64,
    /// Solved when the mean greedy return over 100 episodes reaches this (CartPole: 475);
    /// checked with 100 greedy episodes whenever a round's evaluation reaches it.
    #[serde(default)]
    pub solve_at: Option<f64>,
}

fn one() -> u64 {
    1
}
fn unit_scale() -> f64 {
    1.0
}

/// An environment the agent can be checkpointed with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Env {
    CartPole(CartPole),
    Trading(Trading),
}

impl Env {
    fn inner(&mut self) -> &mut dyn Environment {
        match self {
            Env::CartPole(e) => e,
            Env::Trading(e) => e,
        }
    }
    fn view(&self) -> &dyn Environment {
        match self {
            Env::CartPole(e) => e,
            Env::Trading(e) => e,
        }
    }
}

/// What the routine checkpoints besides the networks and the optimizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DqnState {
    replay: Replay,
    env: Env,
    steps: u64,
    updates: u64,
    returns: Vec<f64>,
    solved_at: Option<(usize, f64)>,
}

struct DqnRoutine<'a> {
    p: &'a DqnParams,
    learning: Learning,
    /// `train.learning_rate`, which the engine's schedule scales per round.
    base_lr: f64,
    agent: Agent,
    env: Env,
    /// A fresh validation environment per round, from (seed, round).
    make_val: Box<dyn Fn(u64) -> Env + 'a>,
    seed: u64,
    steps: u64,
    returns: Vec<f64>,
    solved_at: Option<(usize, f64)>,
}

/// Greedy episodes of `net` on `env`: the return of each (and the env after the last).
fn greedy_returns(net: &QNet, env: &mut Env, episodes: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(episodes);
    for _ in 0..episodes {
        let e = env.inner();
        e.reset();
        let mut s = e.state();
        let mut ret = 0.0;
        for _ in 0..e.max_steps() {
            let a = argmax(&net.q_values(&s));
            let StepResult {
                next_state,
                reward,
                done,
                truncated,
            } = e.step(a);
            ret += reward;
            s = next_state;
            if done || truncated {
                break;
            }
        }
        out.push(ret);
    }
    out
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

impl<'a> DqnRoutine<'a> {
    fn new(
        cfg: &'a RunConfig<DqnParams>,
        agent: Agent,
        env: Env,
        make_val: Box<dyn Fn(u64) -> Env + 'a>,
    ) -> Self {
        DqnRoutine {
            p: &cfg.params,
            learning: DqnFamily::learning(cfg),
            base_lr: cfg.train.learning_rate,
            agent,
            env,
            make_val,
            seed: cfg.seed,
            steps: 0,
            returns: Vec::new(),
            solved_at: None,
        }
    }
}

impl Routine for DqnRoutine<'_> {
    fn unit_len(&self) -> u64 {
        self.p.episodes_per_round as u64
    }

    fn optimizers(&self) -> Vec<(&'static str, f64)> {
        vec![("q", self.base_lr)]
    }

    /// The greedy validation return, or "solved" when the config has a solve line.
    fn monitor(&self) -> Option<Monitor> {
        Some(if self.p.solve_at.is_some() {
            Monitor::max("val_solved")
        } else {
            Monitor::max("val_return")
        })
    }

    fn train_unit(&mut self, _round: usize, ctx: &mut UnitContext) -> Result<Metrics> {
        self.learning.learning_rate = ctx.lr("q");
        let steps_before = self.steps;
        let mut losses = Vec::new();
        let mut round_returns = Vec::new();
        for _ in 0..self.p.episodes_per_round {
            let greedy = self.agent.online().valid();
            let env = self.env.inner();
            env.reset();
            let mut s = env.state();
            let mut ret = 0.0;
            loop {
                let eps = self.p.epsilon.at(self.steps);
                let a = self.agent.act(&greedy, &s, eps, &mut ctx.rng);
                let r = self.env.inner().step(a);
                self.agent
                    .replay
                    .push(&s, a, r.reward as f32, &r.next_state, r.done);
                self.steps += 1;
                ret += r.reward;
                if self.agent.replay.len() >= self.p.warmup.max(self.learning.batch)
                    && self.steps.is_multiple_of(self.p.train_every)
                {
                    let loss = self.agent.learn(&self.learning, &mut ctx.rng)?;
                    if !loss.is_finite() {
                        ctx.batch(loss)?;
                    }
                    losses.push(loss as f64);
                }
                s = r.next_state;
                if r.done || r.truncated {
                    break;
                }
            }
            ctx.batch(0.0)?;
            round_returns.push(ret);
            self.returns.push(ret);
        }
        ctx.examples((self.steps - steps_before) as usize);
        Ok(vec![
            ("train_return".into(), mean(&round_returns)),
            ("train_loss".into(), mean(&losses)),
            ("epsilon".into(), self.p.epsilon.at(self.steps)),
            ("episodes".into(), self.returns.len() as f64),
            ("steps".into(), self.steps as f64),
        ])
    }

    fn validate(&mut self, round: usize, _rng: &mut StdRng) -> Result<Metrics> {
        let net = self.agent.online().valid();
        let mut env =
            (self.make_val)(derive_seed(self.seed, round, engine::SeedPurpose::Data) ^ 0xe7a1);
        let rets = greedy_returns(&net, &mut env, self.p.eval_episodes);
        let val = mean(&rets);
        let mut solved = 0.0;
        if let Some(target) = self.p.solve_at {
            if self.solved_at.is_none() && val >= target {
                let mut env = (self.make_val)(
                    derive_seed(self.seed, round, engine::SeedPurpose::Device) ^ 0x100,
                );
                let hundred = mean(&greedy_returns(&net, &mut env, 100));
                eprintln!(
                    "greedy evaluation {val:.1} ≥ {target}: 100 greedy episodes average {hundred:.1}"
                );
                if hundred >= target {
                    self.solved_at = Some((self.returns.len(), hundred));
                }
            }
            if self.solved_at.is_some() {
                solved = 1.0;
            }
        }
        let mut m = vec![("val_return".into(), val)];
        if self.p.solve_at.is_some() {
            m.push(("val_solved".into(), solved));
        }
        Ok(m)
    }

    fn save(&self, ckpt: &mut Checkpoint) -> Result<()> {
        ckpt.module("online", self.agent.online())?;
        ckpt.module("target", &self.agent.target)?;
        ckpt.optimizer("optimizer", &self.agent.optim)?;
        ckpt.state(
            "dqn",
            &DqnState {
                replay: self.agent.replay.clone(),
                env: self.env.clone(),
                steps: self.steps,
                updates: self.agent.updates,
                returns: self.returns.clone(),
                solved_at: self.solved_at,
            },
        )
    }

    fn load(&mut self, ckpt: &CheckpointReader) -> Result<()> {
        let online = self.agent.online.take().expect("online network present");
        self.agent.online = Some(ckpt.module("online", online)?);
        self.agent.target = ckpt.module("target", self.agent.target.clone())?;
        self.agent.optim = ckpt.optimizer("optimizer", self.agent.optim.clone())?;
        let st: DqnState = ckpt.state("dqn")?;
        self.agent.replay = st.replay;
        self.agent.updates = st.updates;
        self.env = st.env;
        self.steps = st.steps;
        self.returns = st.returns;
        self.solved_at = st.solved_at;
        Ok(())
    }

    fn after_unit(&mut self, _round: usize, run: &RunDir) -> Result<Vec<(String, PathBuf)>> {
        reward_plot(run, &self.returns, self.p.solve_at)?;
        Ok(vec![("reward".into(), run.file("reward.png"))])
    }
}

/// `reward.png`: every training episode's return, their 100-episode moving mean and the
/// solve line.
fn reward_plot(run: &RunDir, returns: &[f64], solve_at: Option<f64>) -> Result<()> {
    let moving: Vec<(f64, f64)> = (0..returns.len())
        .map(|i| {
            let lo = (i + 1).saturating_sub(100);
            ((i + 1) as f64, mean(&returns[lo..=i]))
        })
        .collect();
    let mut series = vec![
        Series {
            name: "episode return",
            points: returns
                .iter()
                .enumerate()
                .map(|(i, r)| ((i + 1) as f64, *r))
                .collect(),
        },
        Series {
            name: "mean of the last 100",
            points: moving,
        },
    ];
    if let Some(t) = solve_at {
        series.push(Series {
            name: "solved",
            points: vec![(1.0, t), (returns.len().max(2) as f64, t)],
        });
    }
    line_chart(
        &run.file("reward.png"),
        "Training episodes (ε-greedy)",
        "episode",
        "return",
        &series,
    )
}

/// Builds an environment from a seed.
type MakeEnv = Box<dyn Fn(u64) -> Env>;

/// The environments of the three parts of a run.
struct Markets {
    train: MakeEnv,
    /// Greedy evaluation after every round.
    val: MakeEnv,
    /// The final evaluation, once.
    test: MakeEnv,
}

/// Greedy returns, and for trading (final portfolio, buy and hold).
type Played = (Vec<f64>, Option<(f64, f64)>);

pub struct DqnFamily;
pub static FAMILY: DqnFamily = DqnFamily;

fn cfg_err(doc: &ConfigDoc, field: &str, msg: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{}: params.{field}: {msg}", doc.source.display())
}

impl DqnFamily {
    fn checked(&self, doc: &ConfigDoc) -> Result<RunConfig<DqnParams>> {
        let cfg: RunConfig<DqnParams> = doc.typed()?;
        cfg.train
            .one_device("dqn")
            .map_err(|(f, m)| ConfigError::new(&doc.source, &f, m))?;
        let p = &cfg.params;
        if let (Some(_), Some(t)) = (p.solve_at, cfg.train.stop_at) {
            return Err(ConfigError::new(
                &doc.source,
                "train.stop_at",
                format!(
                    "{t}: params.solve_at already ends a solved run (after its 100-episode check); set one of the two"
                ),
            )
            .into());
        }
        if !matches!(p.env.kind.as_str(), "cartpole" | "trading") {
            return Err(cfg_err(
                doc,
                "env.kind",
                format!("{:?}: must be \"cartpole\" or \"trading\"", p.env.kind),
            ));
        }
        if !(0.0..=1.0).contains(&p.gamma) {
            return Err(cfg_err(doc, "gamma", "must be in [0, 1]"));
        }
        for (k, v) in [
            ("replay_size", p.replay_size),
            ("episodes_per_round", p.episodes_per_round),
            ("eval_episodes", p.eval_episodes),
        ] {
            if v == 0 {
                return Err(cfg_err(doc, k, "must be at least 1"));
            }
        }
        if p.hidden.contains(&0) {
            return Err(cfg_err(doc, "hidden", "layer widths must be at least 1"));
        }
        let e = &p.epsilon;
        if !(0.0..=1.0).contains(&e.start)
            || !(0.0..=1.0).contains(&e.end)
            || e.decay_steps.is_nan()
            || e.decay_steps <= 0.0
        {
            return Err(cfg_err(
                doc,
                "epsilon",
                "start and end in [0, 1], decay_steps positive",
            ));
        }
        if let TargetUpdate::Soft { tau } = p.target
            && !(tau > 0.0 && tau <= 1.0)
        {
            return Err(cfg_err(doc, "target.tau", "must be in (0, 1]"));
        }
        if cfg.train.batch_size == 0 {
            return Err(anyhow!(
                "{}: train.batch_size: must be at least 1 for DQN",
                doc.source.display()
            ));
        }
        Ok(cfg)
    }

    /// The market days of a trading config.
    fn market(&self, doc: &ConfigDoc, cfg: &RunConfig<DqnParams>) -> Result<Vec<trading::Day>> {
        match (&cfg.params.env.csv, &cfg.params.env.synthetic) {
            (Some(path), None) => trading::read_ohlcv(path),
            (None, Some(g)) => {
                if g.days <= trading::WINDOW || g.start_price.is_nan() || g.start_price <= 0.0 {
                    return Err(cfg_err(
                        doc,
                        "env.synthetic",
                        format!(
                            "needs more than {} days and a positive start price",
                            trading::WINDOW
                        ),
                    ));
                }
                Ok(g.generate(cfg.seed))
            }
            _ => Err(cfg_err(
                doc,
                "env",
                "trading needs either csv = \"FILE\" or synthetic = { … }",
            )),
        }
    }

    /// Constructors of the training, validation and test environments by seed. CartPole is
    /// one seeded game for all three. Trading splits the days in time order: training, then
    /// `train.validation_split` of them for the greedy pass after every round (early stopping
    /// and the monitor look only at these), then `params.env.test_fraction` for the one final
    /// greedy pass the report gives (`train`, `eval`, `play`). The validation and test markets
    /// start with the 20 days before their first day, so every traded day has its window.
    fn env_makers(&self, doc: &ConfigDoc, cfg: &RunConfig<DqnParams>) -> Result<Markets> {
        Ok(match cfg.params.env.kind.as_str() {
            "cartpole" => {
                cfg.train
                    .no_validation_split(
                        "dqn",
                        "CartPole validates on fresh greedy episodes, params.eval_episodes",
                    )
                    .map_err(|(f, m)| ConfigError::new(&doc.source, &f, m))?;
                let make = || -> MakeEnv { Box::new(|seed| Env::CartPole(CartPole::new(seed))) };
                Markets {
                    train: make(),
                    val: make(),
                    test: make(),
                }
            }
            _ => {
                let days = self.market(doc, cfg)?;
                let f = cfg.params.env.test_fraction;
                if !(f > 0.0 && f < 1.0) {
                    return Err(cfg_err(doc, "env.test_fraction", "must be in (0, 1)"));
                }
                let v = cfg.train.validation_split;
                if v <= 0.0 || v + f >= 1.0 {
                    return Err(anyhow!(
                        "{}: train.validation_split: trading validates on the days between training and test; \
                         give a fraction in (0, 1 - test_fraction), e.g. 0.15 (got {v})",
                        doc.source.display()
                    ));
                }
                let n = days.len();
                let n_test = (n as f64 * f).round() as usize;
                let n_val = (n as f64 * v).round() as usize;
                let cut = n.saturating_sub(n_test + n_val);
                if n_test < 2 || n_val < 2 || cut < trading::WINDOW + 2 {
                    return Err(cfg_err(
                        doc,
                        "env",
                        format!(
                            "{n} days are too few to trade on {cut}, validate on {n_val} and test on {n_test} with a {}-day window",
                            trading::WINDOW
                        ),
                    ));
                }
                let w = trading::WINDOW;
                let market = |part: Vec<trading::Day>| -> MakeEnv {
                    Box::new(move |_| Env::Trading(Trading::new(part.clone())))
                };
                Markets {
                    train: market(days[..cut].to_vec()),
                    val: market(days[cut - w..cut + n_val].to_vec()),
                    test: market(days[cut + n_val - w..].to_vec()),
                }
            }
        })
    }

    fn learning(cfg: &RunConfig<DqnParams>) -> Learning {
        let p = &cfg.params;
        Learning {
            gamma: p.gamma,
            batch: cfg.train.batch_size,
            learning_rate: cfg.train.learning_rate,
            loss: p.loss,
            double: p.double,
            target: p.target,
            reward_scale: p.reward_scale,
        }
    }

    fn agent(cfg: &RunConfig<DqnParams>, state_len: usize, actions: usize) -> Result<Agent> {
        let device = cfg.training_device()?;
        device.seed(cfg.seed);
        let online = QNet::new(state_len, &cfg.params.hidden, actions, &device);
        let eval_device = device.clone().inner();
        Ok(Agent {
            target: online.valid(),
            online: Some(online),
            optim: cfg.train.optimizer.init(),
            replay: Replay::new(cfg.params.replay_size, state_len),
            device,
            eval_device,
            updates: 0,
            actions,
        })
    }

    fn load_net(&self, ctx: &RunContext, cfg: &RunConfig<DqnParams>, env: &Env) -> Result<QNet> {
        let device = cfg.backend.device().map_err(anyhow::Error::msg)?;
        let e = env.view();
        let net = QNet::new(e.state_len(), &cfg.params.hidden, e.actions(), &device);
        load_model(&ctx.run, net)
    }

    /// Greedy episodes of the final evaluation (`train`'s report, `kiln eval`): 100 on
    /// CartPole, the one pass over the test market for trading.
    fn final_episodes(p: &DqnParams) -> usize {
        if p.env.kind == "cartpole" { 100 } else { 1 }
    }

    /// Greedy episodes of a finished run, with the trading accounts beside buy and hold.
    fn play_episodes(&self, ctx: &RunContext, episodes: usize, seed: u64) -> Result<Played> {
        let cfg = self.checked(&ctx.doc)?;
        let mut env = (self.env_makers(&ctx.doc, &cfg)?.test)(seed);
        let net = self.load_net(ctx, &cfg, &env)?;
        let rets = greedy_returns(&net, &mut env, episodes);
        let trading = match &env {
            Env::Trading(t) => Some((t.cash, t.buy_and_hold())),
            Env::CartPole(_) => None,
        };
        Ok((rets, trading))
    }
}

/// `summary.json`'s `trading` section after the final greedy evaluation (trading only).
fn trading_summary(env: &Env) -> Value {
    match env {
        Env::Trading(t) => json!({
            "final_value": t.cash,
            "buy_and_hold": t.buy_and_hold(),
            "start": trading::START_CASH,
            "test_days": t.days.len() - trading::WINDOW,
        }),
        Env::CartPole(_) => Value::Null,
    }
}

/// `report.md`'s rows beside the headline: solved, the portfolio, the counts.
fn report_rows(p: &DqnParams, routine: &DqnRoutine, eval_env: &Env) -> Vec<(String, String)> {
    let mut rows = vec![];
    if let Some(t) = p.solve_at {
        rows.push((
            format!("solved (100 greedy episodes ≥ {t})"),
            match routine.solved_at {
                Some((ep, m)) => format!("after {ep} training episodes (mean {m:.1})"),
                None => format!("not within {} episodes", routine.returns.len()),
            },
        ));
    }
    if let Env::Trading(t) = eval_env {
        rows.push((
            "final portfolio on the test days (greedy)".into(),
            format!("{:.2} (start {:.0})", t.cash, trading::START_CASH),
        ));
        rows.push((
            "buy and hold on the test days".into(),
            format!("{:.2}", t.buy_and_hold()),
        ));
    }
    rows.push((
        "episodes / steps / updates".into(),
        format!(
            "{} / {} / {}",
            routine.returns.len(),
            routine.steps,
            routine.agent.updates
        ),
    ));
    rows
}

impl Family for DqnFamily {
    fn name(&self) -> &'static str {
        "dqn"
    }
    fn about(&self) -> &'static str {
        "deep Q-learning: CartPole-v1 or the trading agent (replay memory, target network, Double DQN); kiln play"
    }
    fn check(&self, doc: &ConfigDoc) -> Result<()> {
        self.checked(doc).map(|_| ())
    }

    fn train(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = self.checked(&ctx.doc)?;
        let p = &cfg.params;
        let markets = self.env_makers(&ctx.doc, &cfg)?;
        let env = (markets.train)(cfg.seed);
        let (state_len, actions) = (env.view().state_len(), env.view().actions());
        let agent = Self::agent(&cfg, state_len, actions)?;
        let mut routine = DqnRoutine::new(&cfg, agent, env, markets.val);
        let mut opts = engine_options(&cfg.train, cfg.seed, ctx.resume);
        opts.unit_name = "round";
        if p.solve_at.is_some() {
            // Solved is the goal: the run stops there.
            opts.monitor = None;
            opts.stop_at = Some(1.0);
        }
        let device = routine.agent.device.clone();
        let outcome = engine::run(&mut routine, &ctx.run, &opts, Some(&device))?;
        let online = routine.agent.online().clone();
        save_weights(&online, &ctx.run.file(kiln_core::run::MODEL_FILE))?;
        reward_plot(&ctx.run, &routine.returns, p.solve_at)?;
        // The final greedy evaluation, on its own seed.
        let mut eval_env = (markets.test)(cfg.seed ^ 0xfeed);
        let episodes = Self::final_episodes(p);
        let final_mean = mean(&greedy_returns(&online.valid(), &mut eval_env, episodes));
        let fields = json!({
            "env": p.env.kind,
            "architecture": format!("{state_len}-{}-{actions} ReLU", p.hidden.iter().map(|h| h.to_string()).collect::<Vec<_>>().join("-")),
            "parameters": online.num_params(),
            "episodes": routine.returns.len(),
            "steps": routine.steps,
            "updates": routine.agent.updates,
            "solved_at_episode": routine.solved_at.map(|s| s.0),
            "solved_mean_100": routine.solved_at.map(|s| s.1),
            "final_greedy_mean": final_mean,
            "final_greedy_episodes": episodes,
            "trading": trading_summary(&eval_env),
        });
        let done = Finished {
            title: format!("DQN on {}", p.env.kind),
            fields,
            headline: vec![Figure::new(
                "final_greedy_mean",
                &format!("final greedy mean over {episodes} episode(s)"),
                final_mean,
                format!("{final_mean:.2}"),
            )],
            rows: report_rows(p, &routine, &eval_env),
            examples: "steps",
            notes: format!(
                "Picture: `reward.png` (training returns, their 100-episode mean{}). `kiln play {} --episodes 10` plays greedy episodes.\n",
                if p.solve_at.is_some() {
                    ", the solve line"
                } else {
                    ""
                },
                ctx.run.path().display()
            ),
        };
        ctx.finish(cfg.backend.as_str(), &outcome, done)
    }

    fn eval(&self, ctx: &RunContext) -> Result<Value> {
        let cfg = self.checked(&ctx.doc)?;
        let episodes = Self::final_episodes(&cfg.params);
        let (rets, trading) = self.play_episodes(ctx, episodes, cfg.seed ^ 0xfeed)?;
        Ok(
            json!({"greedy_mean": mean(&rets), "episodes": episodes, "trading": trading.map(|(v, b)| json!({"final_value": v, "buy_and_hold": b}))}),
        )
    }

    fn predict(&self, _ctx: &RunContext, _input: &PredictInput) -> Result<String> {
        bail!("dqn: use `kiln play RUN --episodes N` to watch the agent's greedy episodes")
    }

    /// Environment steps per second (random actions) and training updates per second.
    fn bench(&self, doc: &ConfigDoc, batches: usize) -> Result<Benchmark> {
        let cfg = self.checked(doc)?;
        let mut env = (self.env_makers(doc, &cfg)?.train)(cfg.seed);
        let (state_len, actions) = (env.view().state_len(), env.view().actions());
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let n = 100_000;
        let started = Instant::now();
        let mut agent = Self::agent(&cfg, state_len, actions)?;
        for t in 0..n {
            let a = t % actions;
            let s = env.view().state();
            let r = env.inner().step(a);
            if agent.replay.len() < cfg.params.replay_size {
                agent
                    .replay
                    .push(&s, a, r.reward as f32, &r.next_state, r.done);
            }
            if r.done || r.truncated {
                env.inner().reset();
            }
        }
        let env_rate = n as f64 / started.elapsed().as_secs_f64();
        let learning = Self::learning(&cfg);
        let updates = batches.max(10) * 10;
        for _ in 0..5 {
            agent.learn(&learning, &mut rng)?;
        }
        let started = Instant::now();
        for _ in 0..updates {
            agent.learn(&learning, &mut rng)?;
        }
        let update_rate = updates as f64 / started.elapsed().as_secs_f64();
        let net = agent.online().valid();
        let s = env.view().state();
        let started = Instant::now();
        for _ in 0..2000 {
            let _ = net.q_values(&s);
        }
        let act_rate = 2000.0 / started.elapsed().as_secs_f64();
        // The wall time to solve: the whole training run, in a temporary run directory.
        let tmp = std::env::temp_dir().join(format!("kiln-bench-dqn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let ctx = RunContext {
            run: RunDir::create(&tmp)?,
            doc: doc.clone(),
            resume: false,
        };
        let trained = self.train(&ctx);
        let _ = std::fs::remove_dir_all(&tmp);
        let s = trained?;
        let secs = s["training"]["seconds_this_process"]
            .as_f64()
            .unwrap_or(f64::NAN);
        let solve = match (s["solved_at_episode"].as_u64(), cfg.params.solve_at) {
            (Some(ep), _) => format!(
                "solved after {ep} training episodes in {secs:.1} s (the whole `kiln train` run)"
            ),
            (None, Some(t)) => format!(
                "not solved (≥ {t}) within {} episodes, {secs:.1} s",
                s["episodes"]
            ),
            (None, None) => format!("training run: {secs:.1} s (no solve_at in this config)"),
        };
        Ok(Benchmark {
            backend: cfg.backend.to_string(),
            unit: "updates".into(),
            notes: vec![
                format!("environment: {env_rate:.0} steps/s (random actions, {n} steps)"),
                format!(
                    "greedy action selection: {act_rate:.0} states/s (batch 1; the table's inference column)"
                ),
                solve,
            ],
            batch_size: cfg.train.batch_size,
            batches: updates,
            train_examples_per_second: update_rate,
            inference_examples_per_second: act_rate,
            epoch_seconds: 0.0,
            epoch_examples: 0,
            peak_rss_bytes: peak_rss(),
        })
    }
    fn agent(&self) -> Option<&dyn kiln_core::family::Agent> {
        Some(self)
    }

    /// The Q-network: `state` `[batch, state length]` → `q_values` `[batch, actions]` (the
    /// greedy action is the largest). The sample file holds the first eight states of a greedy
    /// test episode (seed 0) and kiln's Q-values for them.
    fn onnx(&self, ctx: &RunContext) -> Result<Option<kiln_core::onnx::OnnxExport>> {
        let cfg = self.checked(&ctx.doc)?;
        let mut env = (self.env_makers(&ctx.doc, &cfg)?.test)(0);
        let net = self.load_net(ctx, &cfg, &env)?;
        let (inputs, actions) = (env.view().state_len(), env.view().actions());
        let mut g = kiln_core::onnx::Graph::new("state", &[inputs]);
        let last = net.layers.len() - 1;
        let mut x = "state".to_string();
        for (i, l) in net.layers.iter().enumerate() {
            x = g.linear(&format!("layers.{i}"), l, &x);
            if i < last {
                x = g.node("Relu", &[&x], &[]);
            }
        }
        let out = g.node_as("Identity", &[&x], &[], "q_values");
        let (mut states, mut q) = (Vec::new(), Vec::new());
        let e = env.inner();
        e.reset();
        let mut s = e.state();
        for _ in 0..8 {
            let values = net.q_values(&s);
            let step = e.step(argmax(&values));
            states.extend(s);
            q.extend(values);
            s = if step.done || step.truncated {
                e.reset();
                e.state()
            } else {
                step.next_state
            };
        }
        Ok(Some(kiln_core::onnx::OnnxExport {
            model: g.finish(&out, &[actions]),
            sample: vec![
                ("state".into(), vec![8, inputs], states),
                ("q_values".into(), vec![8, actions], q),
            ],
        }))
    }
}

impl kiln_core::family::Agent for DqnFamily {
    fn play(&self, ctx: &RunContext, episodes: usize, seed: u64) -> Result<String> {
        let (rets, trading) = self.play_episodes(ctx, episodes, seed)?;
        let mut out: Vec<String> = rets
            .iter()
            .enumerate()
            .map(|(i, r)| format!("episode {}: return {r:.2}", i + 1))
            .collect();
        out.push(format!("mean return: {:.2}", mean(&rets)));
        if let Some((value, bh)) = trading {
            out.push(format!(
                "final portfolio {value:.2} vs buy and hold {bh:.2} (start {:.0})",
                trading::START_CASH
            ));
        }
        Ok(out.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use kiln_core::data::to_vec;

    /// A 5-state chain: start in the middle, move left or right; reaching the right end pays
    /// 1 and ends the episode, the left end ends it with nothing. The optimal policy is
    /// "right" everywhere, with Q*(s, right) = γ^(steps to the end − 1).
    struct Chain {
        pos: usize,
        steps: usize,
    }

    impl Environment for Chain {
        fn state_len(&self) -> usize {
            5
        }
        fn actions(&self) -> usize {
            2
        }
        fn max_steps(&self) -> usize {
            20
        }
        fn state(&self) -> Vec<f32> {
            (0..5)
                .map(|i| if i == self.pos { 1.0 } else { 0.0 })
                .collect()
        }
        fn step(&mut self, action: usize) -> StepResult {
            self.pos = if action == 1 {
                self.pos + 1
            } else {
                self.pos - 1
            };
            self.steps += 1;
            let done = self.pos == 0 || self.pos == 4;
            StepResult {
                next_state: self.state(),
                reward: if self.pos == 4 { 1.0 } else { 0.0 },
                done,
                truncated: !done && self.steps >= 20,
            }
        }
        fn reset(&mut self) {
            self.pos = 2;
            self.steps = 0;
        }
    }

    #[test]
    fn dqn_solves_the_chain_and_a_hard_update_copies() {
        let d = Device::flex().autodiff();
        d.seed(3);
        let online = QNet::new(5, &[16], 2, &d);
        let mut agent = Agent {
            target: online.valid(),
            online: Some(online),
            optim: kiln_core::optim::OptimizerConfig::default().init(),
            replay: Replay::new(1000, 5),
            eval_device: d.clone().inner(),
            device: d,
            updates: 0,
            actions: 2,
        };
        let learning = Learning {
            gamma: 0.9,
            batch: 32,
            learning_rate: 5e-3,
            loss: TdLoss::Mse,
            double: true,
            target: TargetUpdate::Hard { every: 50 },
            reward_scale: 1.0,
        };
        let mut rng = StdRng::seed_from_u64(1);
        let mut env = Chain { pos: 2, steps: 0 };
        for _ in 0..300 {
            env.reset();
            loop {
                let s = env.state();
                let greedy = agent.online().valid();
                let a = agent.act(&greedy, &s, 0.5, &mut rng);
                let r = env.step(a);
                agent
                    .replay
                    .push(&s, a, r.reward as f32, &r.next_state, r.done);
                if agent.replay.len() >= 32 {
                    agent.learn(&learning, &mut rng).unwrap();
                }
                if r.done || r.truncated {
                    break;
                }
            }
        }
        // Greedy: right from every inner state; Q(s, right) ≈ γ^(3 − s) for s = 1, 2, 3.
        let net = agent.online().valid();
        for s in 1..4 {
            let mut x = vec![0.0; 5];
            x[s] = 1.0;
            let q = net.q_values(&x);
            assert!(q[1] > q[0], "state {s}: {q:?}");
            let want = 0.9f32.powi(3 - s as i32);
            assert!(
                (q[1] - want).abs() < 0.1,
                "state {s}: Q(right) {} vs {want}",
                q[1]
            );
        }
        // A hard update every 50: right after the 50th multiple the target equals θ.
        while !agent.updates.is_multiple_of(50) {
            agent.learn(&learning, &mut rng).unwrap();
        }
        assert_eq!(
            to_vec(agent.target.layers[0].weight.val()),
            to_vec(agent.online().valid().layers[0].weight.val())
        );
    }

    fn trading_doc(extra: &str) -> ConfigDoc {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../configs/dqn-trading.toml"
        ))
        .unwrap();
        let mut doc = ConfigDoc::parse("dqn-trading.toml", &text).unwrap();
        for kv in extra.split_whitespace() {
            doc.set(kv).unwrap();
        }
        doc
    }

    /// Training, validation and test markets follow each other in time; the validation and
    /// test markets open with the 20 days before their first traded day and share no traded
    /// day; a validation split of 0 is a one-line error naming the field.
    #[test]
    fn trading_days_split_into_train_validation_and_test() {
        let doc = trading_doc("");
        let cfg = FAMILY.checked(&doc).unwrap();
        let days = FAMILY.market(&doc, &cfg).unwrap();
        let m = FAMILY.env_makers(&doc, &cfg).unwrap();
        let part = |make: &MakeEnv| match make(0) {
            Env::Trading(t) => t.days,
            Env::CartPole(_) => unreachable!(),
        };
        let (train, val, test) = (part(&m.train), part(&m.val), part(&m.test));
        let w = trading::WINDOW;
        assert_eq!((test.len() - w, val.len() - w), (225, 113));
        assert_eq!(train.len() + (val.len() - w) + (test.len() - w), days.len());
        assert_eq!(train, days[..train.len()]);
        assert_eq!(val, days[train.len() - w..train.len() + val.len() - w]);
        assert_eq!(test, days[days.len() - test.len()..]);

        let doc = trading_doc("train.validation_split=0");
        let cfg = FAMILY.checked(&doc).unwrap();
        let err = FAMILY.env_makers(&doc, &cfg).err().unwrap().to_string();
        assert!(
            err.starts_with("dqn-trading.toml: train.validation_split:") && !err.contains('\n'),
            "{err}"
        );
    }
}
