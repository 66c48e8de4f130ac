//! `kiln sweep`: a config fanned out over a grid of overrides × seeds, each point an ordinary
//! `kiln train` run in one sweep directory, run here (several at once) or as a SLURM job
//! array, then gathered into one table and one plot.
//!
//! ```text
//! sweeps/logistic-20261130-101500/
//!   sweep.toml          the expansion: config, grid, seeds, one [[points]] entry per run
//!   sweep.sbatch        (--slurm) the job array, one task per point
//!   p00-…/              the run directory of point 0 (config.toml, metrics.csv, summary.json, …)
//!   logs/p00-….log      what the point's kiln printed; p00-….json: exit code and wall time
//!   results.csv/.md/.png  (--collect)
//! ```
//!
//! A point is done when its run directory has a `summary.json` without a failure status;
//! re-running a sweep skips those, resumes the ones with a checkpoint (`kiln resume`) and
//! starts the rest afresh.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use kiln_core::ConfigDoc;
use kiln_core::family::headline_of;
pub use kiln_core::family::lookup;
use kiln_core::plot::{ErrorSeries, error_bar_chart};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The expansion file in a sweep directory.
pub const SWEEP_FILE: &str = "sweep.toml";
const SBATCH_FILE: &str = "sweep.sbatch";
const JOB_FILE: &str = "slurm-job-id";

/// One swept key and its values (as typed on the command line, TOML syntax).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridKey {
    pub key: String,
    pub values: Vec<String>,
}

/// One run of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Its run directory's name inside the sweep directory.
    pub name: String,
    /// The grid values of this point, one per grid key, in grid order.
    pub values: Vec<String>,
    pub seed: u64,
    /// Every `--set` the point's `kiln train` gets (the sweep's own, the grid's, the seed).
    pub sets: Vec<String>,
}

/// `sweep.toml`: everything needed to run, re-run and collect the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// The config file every point starts from.
    pub config: PathBuf,
    /// `--set` overrides shared by every point.
    #[serde(default)]
    pub sets: Vec<String>,
    pub grid: Vec<GridKey>,
    pub seeds: Vec<u64>,
    /// Threads each run may use (`RAYON_NUM_THREADS`; SLURM: `--cpus-per-task`).
    pub threads: usize,
    pub points: Vec<Point>,
}

/// `KEY=V1,V2,…` → the key and its values. Commas inside `[…]`, `{…}` or quotes do not
/// split, so `params.hidden=[64,32],[128]` is two values.
pub fn parse_grid(arg: &str) -> Result<GridKey> {
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| anyhow!("--grid {arg}: expected KEY=V1,V2,…"))?;
    let key = key.trim();
    if key.is_empty() {
        bail!("--grid {arg}: the key is empty");
    }
    let mut values = Vec::new();
    let (mut depth, mut quote, mut cur) = (0i32, None::<char>, String::new());
    for c in raw.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                values.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    values.push(cur);
    let values: Vec<String> = values.iter().map(|v| v.trim().to_string()).collect();
    if values.iter().any(String::is_empty) {
        bail!("--grid {arg}: an empty value (give KEY=V1,V2,… with no empty entries)");
    }
    Ok(GridKey {
        key: key.to_string(),
        values,
    })
}

/// A value shortened for a directory name: letters, digits, `.`, `-`, `_` only.
fn slug(v: &str) -> String {
    let s: String = v
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_matches('_').to_string();
    s.chars().take(24).collect()
}

/// The last segment of a dotted key (`train.learning_rate` → `learning_rate`).
fn short(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// Every grid combination × every seed, in order (the last grid key varies fastest, seeds
/// fastest of all).
pub fn expand(sets: &[String], grid: &[GridKey], seeds: &[u64]) -> Vec<Point> {
    let mut combos: Vec<Vec<String>> = vec![vec![]];
    for g in grid {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                g.values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push(v.clone());
                    c
                })
            })
            .collect();
    }
    let n = combos.len() * seeds.len();
    let width = (n.max(2) - 1).to_string().len();
    let mut points = Vec::with_capacity(n);
    for combo in combos {
        for &seed in seeds {
            let i = points.len();
            let mut name = format!("p{i:0width$}");
            for (g, v) in grid.iter().zip(&combo) {
                name.push_str(&format!("-{}{}", short(&g.key), slug(v)));
            }
            name.push_str(&format!("-s{seed}"));
            let mut all = sets.to_vec();
            all.extend(
                grid.iter()
                    .zip(&combo)
                    .map(|(g, v)| format!("{}={v}", g.key)),
            );
            all.push(format!("seed={seed}"));
            points.push(Point {
                name,
                values: combo.clone(),
                seed,
                sets: all,
            });
        }
    }
    points
}

/// Each point's config, checked as `kiln train` would check it, before anything runs. A
/// wrong key or type is the usual config error, naming the `--grid` (or `--set`) it came from.
pub fn check_points(sweep: &Sweep) -> Result<()> {
    let base = ConfigDoc::read(&sweep.config)?;
    for p in &sweep.points {
        let mut doc = base.clone();
        for s in &p.sets {
            let origin = if sweep.sets.contains(s) {
                "--set"
            } else {
                "--grid"
            };
            doc.set(s).map_err(|e| anyhow!("{origin} {s}: {e}"))?;
            let fail = |e: anyhow::Error| anyhow!("{origin} {s}: {e:#}");
            let family = kiln_core::registry::family_for(&doc).map_err(fail)?;
            family.check(&doc).map_err(fail)?;
        }
    }
    Ok(())
}

impl Sweep {
    /// The config's name: its file stem (`configs/logistic.toml` → `logistic`).
    pub fn config_name(&self) -> String {
        self.config
            .file_stem()
            .map_or_else(|| "sweep".into(), |s| s.to_string_lossy().into_owned())
    }

    pub fn read(dir: &Path) -> Result<Sweep> {
        let path = dir.join(SWEEP_FILE);
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read (is this a sweep directory?)",
                path.display()
            )
        })?;
        toml::from_str(&text).map_err(|e| {
            anyhow!(
                "{}: {}",
                path.display(),
                e.to_string().lines().next().unwrap_or("")
            )
        })
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(SWEEP_FILE);
        let text = format!(
            "# kiln sweep: re-run with `kiln sweep {}`, gather with `kiln sweep --collect {}`\n{}",
            dir.display(),
            dir.display(),
            toml::to_string(self)?
        );
        fs::write(&path, text).with_context(|| format!("{}: cannot write", path.display()))
    }
}

/// Where a point stands, from its run directory and its log files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Running,
    /// Stopped with a checkpoint: `kiln resume` continues it.
    Interrupted,
    Failed,
    Done,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running => "running",
            State::Interrupted => "interrupted",
            State::Failed => "failed",
            State::Done => "done",
        }
    }
}

fn logs(dir: &Path) -> PathBuf {
    dir.join("logs")
}

/// The state of point `p` of the sweep in `dir`.
pub fn state(dir: &Path, p: &Point) -> State {
    let run = dir.join(&p.name);
    let marker = logs(dir).join(format!("{}.running", p.name));
    if marker.exists() {
        return State::Running;
    }
    let summary = fs::read_to_string(run.join(kiln_core::run::SUMMARY_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    match summary {
        Some(s) if s["status"] == "failed" => State::Failed,
        Some(s) if s["status"] == "interrupted" => State::Interrupted,
        Some(_) => State::Done,
        None if run
            .join("checkpoints")
            .join(kiln_core::engine::checkpoint::LATEST)
            .exists() =>
        {
            State::Interrupted
        }
        // Failed before its first checkpoint (kiln removed the empty run directory).
        None if last_attempt(dir, p).is_some_and(|a| a.exit_code != Some(0)) => State::Failed,
        None => State::Pending,
    }
}

/// What one attempt at a point left in `logs/<point>.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Attempt {
    exit_code: Option<i32>,
    seconds: f64,
    host: String,
}

fn last_attempt(dir: &Path, p: &Point) -> Option<Attempt> {
    let text = fs::read_to_string(logs(dir).join(format!("{}.json", p.name))).ok()?;
    serde_json::from_str(&text).ok()
}

fn host() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Run point `index` of the sweep in `dir` with the kiln binary `exe`: skipped when done,
/// `kiln resume` when it has a checkpoint, `kiln train` otherwise. Its output goes to
/// `logs/<point>.log`. Returns the point's state afterwards.
pub fn run_point(dir: &Path, sweep: &Sweep, index: usize, exe: &Path) -> Result<State> {
    let p = sweep.points.get(index).ok_or_else(|| {
        anyhow!(
            "{}: no point {index} (the sweep has {})",
            dir.join(SWEEP_FILE).display(),
            sweep.points.len()
        )
    })?;
    let before = state(dir, p);
    if before == State::Done {
        return Ok(State::Done);
    }
    let run = dir.join(&p.name);
    let mut cmd = Command::new(exe);
    if before == State::Interrupted {
        cmd.arg("resume").arg(&run);
    } else {
        if run.exists() {
            // Started but stopped before its first checkpoint: nothing to keep.
            fs::remove_dir_all(&run)
                .with_context(|| format!("{}: cannot remove", run.display()))?;
        }
        cmd.arg("train")
            .arg(sweep.config_name())
            .arg("--config")
            .arg(&sweep.config);
        for s in &p.sets {
            cmd.arg("--set").arg(s);
        }
        cmd.arg("--out").arg(&run);
    }
    let logs = logs(dir);
    fs::create_dir_all(&logs).with_context(|| format!("{}: cannot create", logs.display()))?;
    let log_path = logs.join(format!("{}.log", p.name));
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("{}: cannot write", log_path.display()))?;
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env("RAYON_NUM_THREADS", sweep.threads.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let marker = logs.join(format!("{}.running", p.name));
    fs::write(&marker, format!("{} {}\n", host(), std::process::id()))?;
    let started = Instant::now();
    let status = cmd.status();
    let _ = fs::remove_file(&marker);
    let status = status.with_context(|| format!("{}: cannot start", exe.display()))?;
    let attempt = Attempt {
        exit_code: status.code(),
        seconds: started.elapsed().as_secs_f64(),
        host: host(),
    };
    fs::write(
        logs.join(format!("{}.json", p.name)),
        serde_json::to_string_pretty(&attempt)?,
    )?;
    let after = state(dir, p);
    if !status.success() && after == State::Done {
        return Ok(State::Failed);
    }
    Ok(after)
}

/// The last line of a point's log (its one-line error when it failed).
fn last_log_line(dir: &Path, p: &Point) -> String {
    fs::read_to_string(logs(dir).join(format!("{}.log", p.name)))
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Run every point not yet done, at most `parallel` at once, a line per finished point.
/// Returns how many points failed.
pub fn run_local(dir: &Path, sweep: &Sweep, parallel: usize, exe: &Path) -> Result<usize> {
    let todo: Vec<usize> = (0..sweep.points.len())
        .filter(|&i| state(dir, &sweep.points[i]) != State::Done)
        .collect();
    let skipped = sweep.points.len() - todo.len();
    eprintln!(
        "sweep {}: {} points, {} to run ({} already done), {} at a time, {} thread(s) each",
        dir.display(),
        sweep.points.len(),
        todo.len(),
        skipped,
        parallel,
        sweep.threads
    );
    let next = std::sync::atomic::AtomicUsize::new(0);
    let finished = std::sync::atomic::AtomicUsize::new(skipped);
    let failed = std::sync::atomic::AtomicUsize::new(0);
    let total = sweep.points.len();
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1).min(todo.len().max(1)) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(&i) = todo.get(k) else { break };
                    let p = &sweep.points[i];
                    let started = Instant::now();
                    let state = run_point(dir, sweep, i, exe).unwrap_or_else(|e| {
                        eprintln!("{}: {e:#}", p.name);
                        State::Failed
                    });
                    let n = finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    let what = match state {
                        State::Done => {
                            let s = summary(dir, p);
                            let h = s.as_ref().and_then(headline_value);
                            match h {
                                Some((name, v)) => format!("done, {name} {v:.4}"),
                                None => "done".into(),
                            }
                        }
                        other => {
                            failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            format!("{}: {}", other.as_str(), last_log_line(dir, p))
                        }
                    };
                    eprintln!(
                        "[{n}/{total}] {} ({:.1} s): {what}",
                        p.name,
                        started.elapsed().as_secs_f64()
                    );
                }
            });
        }
    });
    Ok(failed.into_inner())
}

/// Options of `--slurm`, passed through to `#SBATCH` lines.
#[derive(Debug, Default, Clone)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub time: Option<String>,
    pub gres: Option<String>,
    /// Submit nothing: write `sweep.sbatch` only.
    pub dry_run: bool,
}

/// The job-array script: one task per point, each running `kiln sweep --task DIR --index I`
/// from the repository root (where configs and data paths resolve).
pub fn sbatch_script(
    dir: &Path,
    sweep: &Sweep,
    exe: &Path,
    root: &Path,
    opts: &SlurmOptions,
    gpu: bool,
) -> String {
    let name = sweep.config_name();
    let mut s = String::from("#!/bin/bash\n");
    s.push_str(&format!("#SBATCH --job-name=kiln-{name}\n"));
    s.push_str(&format!("#SBATCH --array=0-{}\n", sweep.points.len() - 1));
    s.push_str(&format!("#SBATCH --cpus-per-task={}\n", sweep.threads));
    s.push_str(&format!(
        "#SBATCH --output={}/slurm-%A_%a.out\n",
        logs(dir).display()
    ));
    if let Some(p) = &opts.partition {
        s.push_str(&format!("#SBATCH --partition={p}\n"));
    }
    if let Some(t) = &opts.time {
        s.push_str(&format!("#SBATCH --time={t}\n"));
    }
    match (&opts.gres, gpu) {
        (Some(g), _) => s.push_str(&format!("#SBATCH --gres={g}\n")),
        (None, true) => s.push_str("#SBATCH --gres=gpu:1\n"),
        (None, false) => {}
    }
    s.push_str(&format!(
        "# One task per point of {}; the directory must be on a filesystem every node sees.\n",
        dir.join(SWEEP_FILE).display()
    ));
    s.push_str("export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"\n");
    s.push_str(&format!(
        "cd {}\n",
        shell_quote(&root.display().to_string())
    ));
    s.push_str(&format!(
        "exec {} sweep --task {} --index \"$SLURM_ARRAY_TASK_ID\"\n",
        shell_quote(&exe.display().to_string()),
        shell_quote(&dir.display().to_string())
    ));
    s
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Is `program` on PATH?
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Before anything is written: `--slurm` needs `sbatch` unless it is a dry run.
pub fn check_sbatch(opts: &SlurmOptions) -> Result<()> {
    if !opts.dry_run && !on_path("sbatch") {
        bail!(
            "--slurm: sbatch is not on PATH (run on the cluster's login node, or add --dry-run to write {SBATCH_FILE} only)"
        );
    }
    Ok(())
}

/// Write `sweep.sbatch` and, unless a dry run, submit it; returns the job id when submitted.
pub fn submit(
    dir: &Path,
    sweep: &Sweep,
    exe: &Path,
    root: &Path,
    opts: &SlurmOptions,
    gpu: bool,
) -> Result<Option<String>> {
    let script = dir.join(SBATCH_FILE);
    fs::create_dir_all(logs(dir))?;
    fs::write(&script, sbatch_script(dir, sweep, exe, root, opts, gpu))
        .with_context(|| format!("{}: cannot write", script.display()))?;
    if opts.dry_run {
        return Ok(None);
    }
    let out = Command::new("sbatch")
        .arg("--parsable")
        .arg(&script)
        .output()
        .context("sbatch: cannot start")?;
    if !out.status.success() {
        bail!(
            "sbatch {}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " ")
        );
    }
    let id = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or("")
        .to_string();
    fs::write(dir.join(JOB_FILE), format!("{id}\n"))?;
    Ok(Some(id))
}

/// SLURM's view of the array's tasks (index → state), from `squeue`, then `sacct`.
fn slurm_states(dir: &Path) -> BTreeMap<usize, String> {
    let mut out = BTreeMap::new();
    let Ok(id) = fs::read_to_string(dir.join(JOB_FILE)) else {
        return out;
    };
    let id = id.trim();
    let mut parse = |text: &str| {
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(task), Some(state)) = (f.next(), f.next()) else {
                continue;
            };
            // `123_4` is task 4; `123_[5-9]` are pending tasks not yet split out.
            let Some((_, idx)) = task.split_once('_') else {
                continue;
            };
            if let Some(range) = idx.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                for part in range.split(',') {
                    let part = part.split('%').next().unwrap_or(part);
                    let (a, b) = part.split_once('-').unwrap_or((part, part));
                    if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                        for i in a..=b {
                            out.entry(i).or_insert_with(|| state.to_lowercase());
                        }
                    }
                }
            } else if let Ok(i) = idx.parse::<usize>() {
                out.entry(i).or_insert_with(|| state.to_lowercase());
            }
        }
    };
    if on_path("squeue")
        && let Ok(o) = Command::new("squeue")
            .args(["-h", "-r", "-j", id, "-o", "%i %T"])
            .output()
    {
        parse(&String::from_utf8_lossy(&o.stdout));
    }
    if on_path("sacct")
        && let Ok(o) = Command::new("sacct")
            .args(["-n", "-X", "-P", "-j", id, "-o", "JobID,State"])
            .output()
    {
        parse(&String::from_utf8_lossy(&o.stdout).replace('|', " "));
    }
    out
}

/// `kiln sweep --status DIR`: one line per point, then the counts.
pub fn status(dir: &Path) -> Result<String> {
    let sweep = Sweep::read(dir)?;
    let slurm = slurm_states(dir);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut lines = Vec::new();
    for (i, p) in sweep.points.iter().enumerate() {
        let mut st = state(dir, p);
        let mut note = String::new();
        if let Some(s) = slurm.get(&i) {
            note = format!(" (slurm: {s})");
            if st == State::Pending && s == "running" {
                st = State::Running;
            }
            if st == State::Pending && matches!(s.as_str(), "failed" | "cancelled" | "timeout") {
                st = State::Failed;
            }
        }
        if st == State::Done
            && let Some((name, v)) = summary(dir, p).as_ref().and_then(headline_value)
        {
            note.push_str(&format!(" {name} {v:.4}"));
        }
        if st == State::Failed {
            note.push_str(&format!(" {}", last_log_line(dir, p)));
        }
        *counts.entry(st.as_str()).or_default() += 1;
        lines.push(format!("{:<11} {}{note}", st.as_str(), p.name));
    }
    let total: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    lines.push(format!(
        "{} points: {}",
        sweep.points.len(),
        total.join(", ")
    ));
    Ok(lines.join("\n"))
}

fn summary(dir: &Path, p: &Point) -> Option<Value> {
    let text = fs::read_to_string(dir.join(&p.name).join(kiln_core::run::SUMMARY_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The number a run is judged by, with its dotted path in `summary.json`: the first of the
/// run's headline figures (the family names them; see [`kiln_core::Figure`]).
pub fn headline_value(s: &Value) -> Option<(String, f64)> {
    headline_of(s)
        .into_iter()
        .next()
        .map(|f| (f.metric, f.value))
}

/// One row of the results: a point and its numbers.
struct Row<'a> {
    point: &'a Point,
    value: Option<f64>,
    epochs: Option<f64>,
    seconds: Option<f64>,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// `kiln sweep --collect DIR [--metric PATH]`: `results.csv`, `results.md` and `results.png`.
/// Returns the Markdown table.
pub fn collect(dir: &Path, metric: Option<&str>) -> Result<String> {
    let sweep = Sweep::read(dir)?;
    let summaries: Vec<Option<Value>> = sweep.points.iter().map(|p| summary(dir, p)).collect();
    let metric = match metric {
        Some(m) => m.to_string(),
        None => summaries
            .iter()
            .flatten()
            .find_map(headline_value)
            .map(|(n, _)| n)
            .ok_or_else(|| {
                anyhow!(
                    "{}: no finished point to collect yet (`kiln sweep --status {}`)",
                    dir.display(),
                    dir.display()
                )
            })?,
    };
    let rows: Vec<Row> = sweep
        .points
        .iter()
        .zip(&summaries)
        .map(|(p, s)| {
            let done = state(dir, p) == State::Done;
            let s = s.as_ref().filter(|_| done);
            Row {
                point: p,
                value: s.and_then(|s| lookup(s, &metric)),
                epochs: s.and_then(|s| lookup(s, "training.units_run")),
                seconds: s.and_then(|s| lookup(s, "training.seconds")),
            }
        })
        .collect();
    if rows.iter().all(|r| r.value.is_none()) {
        bail!(
            "--metric {metric}: no finished point of {} has it in its summary.json",
            dir.display()
        );
    }
    let keys: Vec<&str> = sweep.grid.iter().map(|g| g.key.as_str()).collect();
    let num = |v: Option<f64>, prec: usize| v.map_or(String::new(), |v| format!("{v:.prec$}"));

    // results.csv
    let mut csv = String::from("point,");
    for k in &keys {
        csv.push_str(&format!("{k},"));
    }
    csv.push_str(&format!("seed,{metric},epochs,seconds\n"));
    for r in &rows {
        csv.push_str(&format!("{},", r.point.name));
        for v in &r.point.values {
            csv.push_str(&format!("\"{}\",", v.replace('"', "\"\"")));
        }
        csv.push_str(&format!(
            "{},{},{},{}\n",
            r.point.seed,
            r.value.map_or(String::new(), |v| v.to_string()),
            num(r.epochs, 0),
            num(r.seconds, 2)
        ));
    }
    fs::write(dir.join("results.csv"), csv)?;

    // results.md: every point, then mean ± std over seeds per grid point.
    let mut md = format!(
        "# Sweep of `{}`\n\n{} points ({} grid point(s) × {} seed(s)); headline `{metric}`.\n\n",
        sweep.config.display(),
        sweep.points.len(),
        sweep.points.len() / sweep.seeds.len().max(1),
        sweep.seeds.len()
    );
    md.push_str("| point | ");
    for k in &keys {
        md.push_str(&format!("{k} | "));
    }
    md.push_str(&format!("seed | {metric} | epochs | wall time (s) |\n|"));
    md.push_str(&"---|".repeat(keys.len() + 5));
    md.push('\n');
    for r in &rows {
        md.push_str(&format!("| {} | ", r.point.name));
        for v in &r.point.values {
            md.push_str(&format!("{v} | "));
        }
        md.push_str(&format!(
            "{} | {} | {} | {} |\n",
            r.point.seed,
            r.value.map_or("—".into(), |v| format!("{v:.4}")),
            num(r.epochs, 0),
            num(r.seconds, 1)
        ));
    }
    let groups = group(&rows);
    md.push_str(&format!(
        "\n## Over seeds\n\n| {} | {metric} mean ± std | runs |\n|",
        if keys.is_empty() {
            "grid point".to_string()
        } else {
            keys.join(" | ")
        }
    ));
    md.push_str(&"---|".repeat(keys.len().max(1) + 2));
    md.push('\n');
    for (values, vals) in &groups {
        let (m, s) = mean_std(vals);
        md.push_str(&format!(
            "| {} | {m:.4} ± {s:.4} | {} |\n",
            if values.is_empty() {
                "(all)".to_string()
            } else {
                values.join(" | ")
            },
            vals.len()
        ));
    }
    fs::write(dir.join("results.md"), &md)?;
    plot(dir, &sweep, &groups, &metric)?;
    Ok(md)
}

/// Finished values grouped by grid point, in the sweep's order.
fn group<'a>(rows: &[Row<'a>]) -> Vec<(&'a [String], Vec<f64>)> {
    let mut out: Vec<(&[String], Vec<f64>)> = Vec::new();
    for r in rows {
        let Some(v) = r.value else { continue };
        match out
            .iter_mut()
            .find(|(k, _)| *k == r.point.values.as_slice())
        {
            Some((_, vals)) => vals.push(v),
            None => out.push((&r.point.values, vec![v])),
        }
    }
    out
}

/// `results.png`: the headline against the first grid key (numbers on a numeric axis, other
/// values as categories), one line per combination of the other keys, error bars ± std.
fn plot(dir: &Path, sweep: &Sweep, groups: &[(&[String], Vec<f64>)], metric: &str) -> Result<()> {
    let Some(first) = sweep.grid.first() else {
        return Ok(());
    };
    let numeric = first.values.iter().all(|v| v.parse::<f64>().is_ok());
    let x_of = |v: &str| -> f64 {
        if numeric {
            v.parse().unwrap_or(0.0)
        } else {
            first.values.iter().position(|x| x == v).unwrap_or(0) as f64
        }
    };
    let mut series: Vec<ErrorSeries> = Vec::new();
    for (values, vals) in groups {
        let rest = values[1..].join(", ");
        let name = if rest.is_empty() {
            metric.to_string()
        } else {
            let keys: Vec<&str> = sweep.grid[1..].iter().map(|g| short(&g.key)).collect();
            format!("{} = {rest}", keys.join(", "))
        };
        let (m, s) = mean_std(vals);
        let point = (x_of(&values[0]), m, s);
        match series.iter_mut().find(|e| e.name == name) {
            Some(e) => e.points.push(point),
            None => series.push(ErrorSeries {
                name,
                points: vec![point],
            }),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    // A grid over orders of magnitude (learning rates) reads better on log10(x).
    let xs: Vec<f64> = first.values.iter().filter_map(|v| v.parse().ok()).collect();
    let (lo, hi) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let log_x = numeric && xs.len() > 2 && lo > 0.0 && hi / lo >= 20.0;
    let mut x_label = first.key.clone();
    if log_x {
        x_label = format!("log10({x_label})");
        for s in &mut series {
            for p in &mut s.points {
                p.0 = p.0.log10();
            }
        }
    }
    let categories: Option<&[String]> = (!numeric).then_some(first.values.as_slice());
    let name = sweep.config_name();
    error_bar_chart(
        &dir.join("results.png"),
        &format!("{name}: mean ± std over {} seed(s)", sweep.seeds.len()),
        &x_label,
        metric,
        &series,
        categories,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_values_split_on_top_level_commas_only() {
        let g = parse_grid("params.hidden=[64,32],[128], \"a,b\"").unwrap();
        assert_eq!(g.key, "params.hidden");
        assert_eq!(g.values, vec!["[64,32]", "[128]", "\"a,b\""]);
        for bad in [
            "train.learning_rate=",
            "train.learning_rate=0.1,,0.2",
            "=1,2",
            "lr",
        ] {
            let e = parse_grid(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--grid {bad}:")), "{e}");
        }
    }

    #[test]
    fn expansion_is_the_product_of_the_grid_and_the_seeds() {
        let grid = vec![
            parse_grid("train.learning_rate=0.1,0.01").unwrap(),
            parse_grid("params.activation=\"relu\",\"tanh\",\"sigmoid\"").unwrap(),
        ];
        let pts = expand(&["train.epochs=2".into()], &grid, &[1, 2]);
        assert_eq!(pts.len(), 12);
        assert_eq!(pts[0].name, "p00-learning_rate0.1-activationrelu-s1");
        assert_eq!(
            pts[0].sets,
            vec![
                "train.epochs=2",
                "train.learning_rate=0.1",
                "params.activation=\"relu\"",
                "seed=1"
            ]
        );
        assert_eq!(pts[11].values, vec!["0.01", "\"sigmoid\""]);
        assert_eq!(pts[11].seed, 2);
        let names: std::collections::HashSet<_> = pts.iter().map(|p| &p.name).collect();
        assert_eq!(names.len(), 12);
        // No grid: one point per seed.
        assert_eq!(expand(&[], &[], &[5]).len(), 1);
    }

    /// A sweep of `config` over two learning rates × `seeds`.
    fn two_rates(config: &str, seeds: &[u64], threads: usize) -> Sweep {
        let grid = vec![parse_grid("train.learning_rate=0.1,0.01").unwrap()];
        Sweep {
            config: config.into(),
            sets: vec![],
            points: expand(&[], &grid, seeds),
            grid,
            seeds: seeds.to_vec(),
            threads,
        }
    }

    #[test]
    fn the_sweep_file_round_trips() {
        let sweep = two_rates("configs/logistic.toml", &[42, 43], 1);
        let dir = tempfile::tempdir().unwrap();
        sweep.write(dir.path()).unwrap();
        assert_eq!(Sweep::read(dir.path()).unwrap(), sweep);
    }

    #[test]
    fn sbatch_has_one_task_per_point_and_passes_options_through() {
        let sweep = two_rates("/k/configs/logistic.toml", &[1, 2], 2);
        let opts = SlurmOptions {
            partition: Some("debug".into()),
            time: Some("00:10:00".into()),
            gres: None,
            dry_run: true,
        };
        let s = sbatch_script(
            Path::new("/k/sweeps/s"),
            &sweep,
            Path::new("/k/target/release/kiln"),
            Path::new("/k"),
            &opts,
            true,
        );
        for want in [
            "#SBATCH --array=0-3\n",
            "#SBATCH --cpus-per-task=2\n",
            "#SBATCH --partition=debug\n",
            "#SBATCH --time=00:10:00\n",
            "#SBATCH --gres=gpu:1\n",
            "cd /k\n",
            "exec /k/target/release/kiln sweep --task /k/sweeps/s --index \"$SLURM_ARRAY_TASK_ID\"\n",
        ] {
            assert!(s.contains(want), "{want:?} missing from\n{s}");
        }
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
        assert_eq!(mean_std(&[4.0]), (4.0, 0.0));
        let v: Value = serde_json::json!({
            "test": {"accuracy": 0.5},
            "headline": [{"metric": "test.accuracy", "label": "test accuracy", "value": 0.5, "text": "50.00%"}],
            "training": {"seconds": 2.0},
        });
        assert_eq!(headline_value(&v), Some(("test.accuracy".into(), 0.5)));
        assert_eq!(lookup(&v, "training.seconds"), Some(2.0));
        assert_eq!(lookup(&v, "training.nothing"), None);
    }
}
