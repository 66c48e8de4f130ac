//! `kiln`: train, evaluate, predict with and resume any model in the zoo.
//!
//! ```text
//! kiln list
//! kiln train <config> [--config PATH] [--backend NAME] [--set key=value]... [--out DIR] [--seed N]
//! kiln eval <run-dir>
//! kiln predict <run-dir> --input <csv file | comma-separated values>
//! kiln resume <run-dir>
//! kiln sample <run-dir> [--n 64] [--seed S] [--out FILE]
//! kiln play <dqn-run-dir> [--episodes N] [--seed S]
//! kiln sample <char-run-dir> [--prompt TEXT] [--len N] [--temperature T] [--top-k K] [--seed S]
//! kiln sweep <config> --grid KEY=V1,V2,… [--seeds N] [--parallel K] [--slurm [--dry-run]]
//! kiln sweep <sweep-dir> | --status <sweep-dir> | --collect <sweep-dir> [--metric PATH]
//! ```

// The doc comments of the CLI's arguments are its `--help` text, written for a terminal
// (`runs/<name>-<timestamp>`), not HTML.
#![allow(rustdoc::invalid_html_tags)]

mod docs;
mod registry;
mod sweep;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use kiln_core::run::timestamp;
use kiln_core::{
    BackendName, ConfigDoc, Family, PredictInput, RunContext, RunDir, SampleRequest, TextRequest,
};

// Burn's CPU backends allocate many small tensors; with the system allocator a flex MLP
// epoch spends as much time in the kernel as in the math, and mimalloc halves it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train the classic deep-learning models on Burn, on CPU or GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the configs, the model families and the backends compiled in.
    List {
        /// List the run directories under runs/ instead: config, status, headline number.
        #[arg(long)]
        runs: bool,
        /// With --runs: the folder of run directories to list (default: runs/).
        #[arg(long, requires = "runs")]
        root: Option<PathBuf>,
    },
    /// Train a model from `configs/<name>.toml` (or --config) into a new run directory.
    Train {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Backend: flex, ndarray, wgpu, cuda, tch (overrides the config's `backend`).
        #[arg(long)]
        backend: Option<String>,
        /// Run directory (default: runs/<name>-<timestamp>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seed (overrides the config's `seed`).
        #[arg(long)]
        seed: Option<u64>,
        /// Local directory holding the data set's files (image models: the four IDX files).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// GAN: a finished kiln cnn (or mlp) run that judges the samples (sets params.judge).
        #[arg(long)]
        judge: Option<PathBuf>,
        /// Train data parallel on these devices of the backend, e.g. `--devices 0,1` (sets
        /// train.devices; cuda and wgpu only).
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<usize>>,
    },
    /// Render the results tables of README.md and docs/ from docs/results.toml.
    Docs {
        /// Change nothing; fail if a rendered file is out of date (what the tests run).
        #[arg(long)]
        check: bool,
    },
    /// Write a finished run's weights as a safetensors file (PyTorch's names where the family
    /// has a PyTorch twin, else Burn's module paths), or its image classifier as an ONNX graph.
    Export {
        /// The run directory.
        run: PathBuf,
        /// The file to write (default: <run>/model.safetensors or <run>/model.onnx).
        #[arg(long)]
        out: Option<PathBuf>,
        /// safetensors (the weights) or onnx (the inference graph: image classifiers, the
        /// decoder of an autoencoder or VAE, a GAN's generator, a DQN's Q-network).
        #[arg(long, default_value = "safetensors", value_parser = ["safetensors", "onnx"])]
        format: String,
        /// Keep Burn's module paths even where a PyTorch twin has names of its own.
        #[arg(long)]
        burn_names: bool,
    },
    /// Re-evaluate a finished run's model on its test set.
    Eval { run: PathBuf },
    /// Predict with a finished run's model: its run directory, or the safetensors file
    /// `kiln export` wrote from it.
    Predict {
        /// The run directory or an exported `.safetensors` file.
        run: PathBuf,
        /// A CSV file, or comma-separated feature values.
        #[arg(long, required_unless_present = "image")]
        input: Option<String>,
        /// An image file (image models).
        #[arg(long, conflicts_with = "input")]
        image: Option<PathBuf>,
    },
    /// Continue a run from its latest checkpoint (after a crash or kill).
    Resume { run: PathBuf },
    /// Generate with a finished generative run: images (autoencoder, vae, gan) into a PNG
    /// grid, or text (char-rnn) continuing a prompt.
    Sample {
        /// The run directory or an exported `.safetensors` file (then the grid goes beside it).
        run: PathBuf,
        /// Text models: the text to continue.
        #[arg(long, default_value = "")]
        prompt: String,
        /// Text models: how many characters to generate.
        #[arg(long, default_value_t = 500)]
        len: usize,
        /// Text models: softmax temperature (below 1: safer, above 1: wilder).
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Text models: draw only among the k most likely characters.
        #[arg(long)]
        top_k: Option<usize>,
        /// How many samples.
        #[arg(long, default_value_t = 64)]
        n: usize,
        /// Seed of the noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// PNG file to write (default: samples-seed-<seed>.png in the run directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// GAN: draw each noise coordinate from N(0, 1) truncated to [−ψ, ψ] (BigGAN's
        /// truncation trick: more typical, less varied samples).
        #[arg(long, value_name = "PSI")]
        truncation: Option<f64>,
        /// GAN: judge the samples with a finished kiln cnn (or mlp) run (confident share, class
        /// histogram, Fréchet distance to the test set).
        #[arg(long, value_name = "CNN_RUN")]
        judge: Option<PathBuf>,
        /// Class-conditional GAN: draw only this class, by name or index (default: the classes
        /// in turn, one per column).
        #[arg(long, value_name = "CLASS")]
        class: Option<String>,
    },
    /// Play greedy episodes with a finished reinforcement-learning run (dqn).
    Play {
        /// The run directory or an exported `.safetensors` file.
        run: PathBuf,
        /// How many episodes.
        #[arg(long, default_value_t = 10)]
        episodes: usize,
        /// Seed of the environment's starts.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Many runs of one config: a grid of overrides × seeds, run here (several at once) or as
    /// a SLURM job array, gathered into results.csv/.md/.png. `kiln sweep <sweep-dir>` re-runs
    /// what is not done (resuming interrupted points).
    Sweep(SweepArgs),
    /// Training and inference throughput, epoch time and peak memory of a config, on each
    /// CPU backend compiled in (or the one given).
    Bench {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Only this backend.
        #[arg(long)]
        backend: Option<String>,
        /// Timed training batches per backend.
        #[arg(long, default_value_t = 50)]
        batches: usize,
    },
}

/// `kiln sweep`.
#[derive(clap::Args)]
struct SweepArgs {
    /// Config name (or a sweep directory to re-run).
    #[arg(required_unless_present_any = ["status", "collect", "task"])]
    target: Option<String>,
    /// Config file to use instead of `configs/<name>.toml`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// An override shared by every point, e.g. `--set train.epochs=5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A swept key and its values, e.g. `--grid train.learning_rate=0.1,0.01` (repeatable:
    /// the points are every combination).
    #[arg(long = "grid", value_name = "KEY=V1,V2,...")]
    grid: Vec<String>,
    /// Seeds per grid point: the config's seed, seed + 1, … (default 1).
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// Runs at once (default: the cores divided by --threads).
    #[arg(long)]
    parallel: Option<usize>,
    /// Threads each run uses (RAYON_NUM_THREADS; SLURM --cpus-per-task, which is accepted
    /// as another name for it).
    #[arg(long, visible_alias = "cpus-per-task", default_value_t = 1)]
    threads: usize,
    /// Sweep directory (default: sweeps/<config>-<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Submit the points as a SLURM job array (sbatch) instead of running them here.
    #[arg(long)]
    slurm: bool,
    /// With --slurm: write sweep.sbatch, submit nothing.
    #[arg(long, requires = "slurm")]
    dry_run: bool,
    /// SLURM partition.
    #[arg(long, requires = "slurm")]
    partition: Option<String>,
    /// SLURM time limit per task, e.g. 00:30:00.
    #[arg(long, requires = "slurm")]
    time: Option<String>,
    /// SLURM generic resources per task (default gpu:1 for backend = "cuda").
    #[arg(long, requires = "slurm")]
    gres: Option<String>,
    /// Show each point's state: pending, running, interrupted, failed, done.
    #[arg(long, value_name = "SWEEP_DIR", conflicts_with_all = ["collect", "task"])]
    status: Option<PathBuf>,
    /// Gather the finished points into results.csv, results.md and results.png.
    #[arg(long, value_name = "SWEEP_DIR", conflicts_with = "task")]
    collect: Option<PathBuf>,
    /// With --collect: the summary.json number to compare (default: the test accuracy, MSE,
    /// loss, … whichever the runs report), e.g. `test.r2`.
    #[arg(long, requires = "collect")]
    metric: Option<String>,
    /// Run one point of a sweep (what each SLURM array task does).
    #[arg(long, value_name = "SWEEP_DIR", requires = "index", hide = true)]
    task: Option<PathBuf>,
    /// With --task: the point's index.
    #[arg(long, hide = true)]
    index: Option<usize>,
}

/// Which config to use and how to override it (shared by `train` and `bench`).
#[derive(clap::Args)]
struct ConfigArgs {
    /// Config name (`kiln list`), e.g. `linear` or `cnn`.
    name: String,
    /// Config file to use instead of `configs/<name>.toml`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set train.epochs=5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl ConfigArgs {
    fn read(&self) -> Result<ConfigDoc> {
        load_config(&self.name, self.config.as_deref())
    }

    fn apply_sets(&self, doc: &mut ConfigDoc) -> Result<()> {
        for s in &self.set {
            doc.set(s)?;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string().replace('\n', " ");
        eprintln!("error: internal error (please report): {msg}");
    }));
    let cli = Cli::parse();
    kiln_core::registry::install(registry::FAMILIES);
    kiln_core::backend::flush_denormals();
    // A file-size limit (`ulimit -f`) reached while writing a checkpoint or a picture: the
    // write fails with EFBIG and the run stops with a one-line error, keeping the last
    // complete checkpoint, instead of the process being killed by SIGXFSZ mid-write.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN before any other thread runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Ctrl-C: the engine drops the unfinished epoch, keeps the last checkpoint and the error
    // says how to resume. A second Ctrl-C ends the process at once.
    let _ = ctrlc::set_handler(|| {
        static PRESSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if PRESSED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this batch (Ctrl-C again to quit at once)");
        kiln_core::engine::request_stop();
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Upper bounds on the sizes a user types, so that no request grows without bound in memory
/// or time: each is a one-line error naming the flag and the limit.
mod limits {
    use anyhow::{Result, bail};

    /// `kiln sample --n`: images in one grid (100 × 100; the judge's statistics are stable
    /// from about 1,000).
    pub const SAMPLES: usize = 10_000;
    /// `kiln sample --len`: characters generated in one call.
    pub const TEXT_LEN: usize = 100_000;
    /// `kiln play --episodes`.
    pub const EPISODES: usize = 10_000;
    /// `kiln sweep`: runs in one sweep (grid points × seeds).
    pub const SWEEP_RUNS: usize = 10_000;

    /// `value` in 1..=`max`, else an error naming `flag`.
    pub fn check(flag: &str, value: usize, max: usize) -> Result<()> {
        if value == 0 {
            bail!("{flag}: must be at least 1");
        }
        if value > max {
            bail!("{flag}: at most {max}, got {value}");
        }
        Ok(())
    }
}

/// The kiln checkout a command runs in: the nearest directory, from `start` upwards, that holds
/// `configs/` and `crates/runner/`.
fn find_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join("configs").is_dir() && d.join("crates/runner").is_dir())
        .map(Path::to_path_buf)
}

/// `p` made absolute against `cwd` (paths the user typed keep meaning what they meant where
/// they were typed).
fn absolute(cwd: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = cwd.join(&*p);
    }
}

impl Command {
    /// Make every path argument absolute against `cwd`: `--input` too when it names a file.
    fn absolutize(&mut self, cwd: &Path) {
        let abs_opt = |p: &mut Option<PathBuf>| {
            if let Some(p) = p {
                absolute(cwd, p);
            }
        };
        match self {
            Command::List { root, .. } => abs_opt(root),
            Command::Train {
                cfg,
                out,
                data_dir,
                judge,
                ..
            } => {
                abs_opt(&mut cfg.config);
                abs_opt(out);
                abs_opt(data_dir);
                abs_opt(judge);
            }
            Command::Eval { run } | Command::Resume { run } => absolute(cwd, run),
            Command::Docs { .. } => {}
            Command::Export { run, out, .. } => {
                absolute(cwd, run);
                abs_opt(out);
            }
            Command::Predict { run, input, image } => {
                absolute(cwd, run);
                abs_opt(image);
                if let Some(v) = input
                    && cwd.join(&*v).is_file()
                {
                    *v = cwd.join(&*v).display().to_string();
                }
            }
            Command::Sample {
                run, out, judge, ..
            } => {
                absolute(cwd, run);
                abs_opt(out);
                abs_opt(judge);
            }
            Command::Bench { cfg, .. } => abs_opt(&mut cfg.config),
            Command::Sweep(a) => {
                abs_opt(&mut a.config);
                abs_opt(&mut a.out);
                abs_opt(&mut a.status);
                abs_opt(&mut a.collect);
                abs_opt(&mut a.task);
                if let Some(t) = &mut a.target
                    && cwd.join(&*t).join(sweep::SWEEP_FILE).is_file()
                {
                    *t = cwd.join(&*t).display().to_string();
                }
            }
            Command::Play { run, .. } => absolute(cwd, run),
        }
    }
}

/// Paths: kiln runs in its checkout's root, wherever inside the checkout it is started. Paths
/// on the command line are taken relative to where it was started; paths inside configs and
/// `--set` values (`data/iris.csv`, `params.data.text`) relative to the root, where `runs/`
/// is too.
fn enter_root(command: &mut Command) -> Result<()> {
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let Some(root) = find_root(&cwd) else {
        if matches!(command, Command::List { runs: true, .. }) && cwd.join("runs").is_dir() {
            // Listing the runs/ of a copied or moved set of runs needs no checkout.
            return Ok(());
        }
        let built = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "a kiln checkout".into());
        bail!(
            "{}: not inside a kiln checkout: kiln needs the repository's directory (the one holding configs/, data/ and crates/) or any directory below it, e.g. cd {built}",
            cwd.display()
        );
    };
    if root != cwd {
        command.absolutize(&cwd);
        std::env::set_current_dir(&root)
            .with_context(|| format!("{}: cannot enter the repository root", root.display()))?;
    }
    Ok(())
}

fn run(mut cli: Cli) -> Result<()> {
    enter_root(&mut cli.command)?;
    match cli.command {
        Command::List { runs: false, .. } => list(),
        Command::List { runs: true, root } => {
            list_runs(root.as_deref().unwrap_or(Path::new("runs")))
        }
        Command::Train {
            cfg,
            backend,
            out,
            seed,
            data_dir,
            judge,
            devices,
        } => {
            let mut doc = cfg.read()?;
            if let Some(b) = backend {
                set_backend(&mut doc, &b)?;
            }
            if let Some(d) = devices {
                let list: Vec<String> = d.iter().map(|i| i.to_string()).collect();
                doc.set(&format!("train.devices=[{}]", list.join(",")))?;
            }
            if let Some(s) = seed {
                doc.set(&format!("seed={s}"))?;
            }
            if let Some(d) = data_dir {
                doc.table.insert(
                    "data_dir".into(),
                    toml::Value::String(d.display().to_string()),
                );
            }
            if let Some(j) = judge {
                let mut params = match doc.table.remove("params") {
                    Some(toml::Value::Table(t)) => t,
                    _ => toml::Table::new(),
                };
                params.insert("judge".into(), toml::Value::String(j.display().to_string()));
                doc.table
                    .insert("params".into(), toml::Value::Table(params));
            }
            cfg.apply_sets(&mut doc)?;
            let family = kiln_core::registry::family_for(&doc)?;
            family.resolve(&mut doc)?;
            family.check(&doc)?;
            let typed = doc.typed::<toml::Value>()?;
            typed
                .backend
                .devices(&typed.train.devices)
                .map_err(|e| anyhow::anyhow!("{}: {e}", doc.source.display()))?;
            let run = match out {
                Some(out) => RunDir::create(&out)?,
                None => RunDir::create_unique(&default_run_dir(&doc.name()))?,
            };
            run.write_config(&doc)?;
            eprintln!("run directory: {}", run.path().display());
            let ctx = RunContext {
                run,
                doc,
                resume: false,
            };
            if let Err(e) = family.train(&ctx) {
                return Err(record_failure(&ctx.run, e));
            }
            finish(&ctx)
        }
        Command::Resume { run } => {
            let (family, ctx) = open_run(&run, true)?;
            if let Err(e) = family.train(&ctx) {
                return Err(record_failure(&ctx.run, e));
            }
            finish(&ctx)
        }
        Command::Sample {
            run,
            n,
            seed,
            out,
            prompt,
            len,
            temperature,
            top_k,
            truncation,
            judge,
            class,
        } => {
            limits::check("--len", len, limits::TEXT_LEN)?;
            limits::check("--n", n, limits::SAMPLES)?;
            let (family, ctx, unpacked) = open_model(&run)?;
            // From an exported file, the picture goes beside the file, not into the
            // temporary run.
            let out = match (out, &unpacked) {
                (None, Some(_)) => {
                    let stem = run.file_stem().unwrap_or_default().to_string_lossy();
                    Some(run.with_file_name(format!("{stem}-samples-seed-{seed}.png")))
                }
                (out, _) => out,
            };
            if let Some(generator) = family.text_generator() {
                if truncation.is_some() || judge.is_some() || class.is_some() {
                    bail!(
                        "--truncation, --judge and --class: for image generators (gan); this {} run generates text",
                        family.name()
                    );
                }
                if !(temperature.is_finite() && temperature > 0.0) {
                    bail!("--temperature: must be a positive number, got {temperature}");
                }
                if top_k == Some(0) {
                    bail!("--top-k: must be at least 1");
                }
                let req = TextRequest {
                    prompt,
                    len,
                    temperature,
                    top_k,
                    seed,
                };
                println!("{}", generator.generate(&ctx, &req)?);
                return Ok(());
            }
            if !prompt.is_empty() {
                bail!(
                    "--prompt: a {} run generates images, not text",
                    family.name()
                );
            }
            if let Some(psi) = truncation
                && !(psi.is_finite() && psi > 0.0)
            {
                bail!("--truncation: must be a positive number, got {psi}");
            }
            let req = SampleRequest {
                n,
                seed,
                out,
                truncation,
                judge,
                class,
            };
            let Some(sampler) = family.image_sampler() else {
                bail!(
                    "{}: a {} run cannot generate samples (kiln sample needs a generative model: {})",
                    ctx.run.path().display(),
                    family.name(),
                    able(|f| f.image_sampler().is_some() || f.text_generator().is_some())
                );
            };
            let path = sampler.sample(&ctx, &req)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Bench {
            cfg,
            backend,
            batches,
        } => {
            let mut doc = cfg.read()?;
            cfg.apply_sets(&mut doc)?;
            let family = kiln_core::registry::family_for(&doc)?;
            let backends = match backend {
                Some(b) => vec![BackendName::parse(&b).map_err(anyhow::Error::msg)?],
                None => BackendName::compiled()
                    .into_iter()
                    .filter(|b| b.is_cpu())
                    .collect(),
            };
            family.resolve(&mut doc)?;
            let mut notes = Vec::new();
            for (i, b) in backends.into_iter().enumerate() {
                set_backend(&mut doc, b.as_str())?;
                let r = family.bench(&doc, batches)?;
                if i == 0 {
                    let u = &r.unit;
                    println!(
                        "| backend | batch | train {u}/s | inference {u}/s | epoch (est.) | peak RSS |"
                    );
                    println!("|---|---|---|---|---|---|");
                }
                notes.extend(r.notes.iter().map(|n| format!("{}: {n}", r.backend)));
                println!(
                    "| {} | {} | {:.0} | {:.0} | {:.1} s ({} {}) | {} |",
                    r.backend,
                    r.batch_size,
                    r.train_examples_per_second,
                    r.inference_examples_per_second,
                    r.epoch_seconds,
                    r.epoch_examples,
                    r.unit,
                    r.peak_rss_bytes
                        .map(|b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64))
                        .unwrap_or_else(|| "?".into())
                );
            }
            for n in notes {
                println!("{n}");
            }
            Ok(())
        }
        Command::Sweep(args) => run_sweep(args),
        Command::Play {
            run,
            episodes,
            seed,
        } => {
            limits::check("--episodes", episodes, limits::EPISODES)?;
            let (family, ctx, _unpacked) = open_model(&run)?;
            let Some(agent) = family.agent() else {
                bail!(
                    "{}: a {} run does not play episodes (kiln play needs a run of {})",
                    ctx.run.path().display(),
                    family.name(),
                    able(|f| f.agent().is_some())
                );
            };
            println!("{}", agent.play(&ctx, episodes, seed)?);
            Ok(())
        }
        Command::Docs { check } => {
            let root = std::env::current_dir()?;
            let files = docs::run(&root, check)?;
            let names: Vec<String> = files
                .iter()
                .map(|f| f.strip_prefix(&root).unwrap_or(f).display().to_string())
                .collect();
            println!(
                "{} {}",
                if check { "up to date:" } else { "rendered:" },
                names.join(", ")
            );
            Ok(())
        }
        Command::Export {
            run,
            out,
            format,
            burn_names,
        } => {
            let (family, ctx) = open_run(&run, false)?;
            if format == "onnx" {
                let Some(export) = family.onnx(&ctx)? else {
                    bail!(
                        "{}: {} runs have no ONNX export (image classifiers, autoencoder/vae decoders, gan generators and dqn Q-networks have)",
                        run.display(),
                        family.name()
                    );
                };
                let out = out.unwrap_or_else(|| ctx.run.file("model.onnx"));
                kiln_core::run::write_atomic(&out, &export.model)
                    .with_context(|| format!("{}: cannot write", out.display()))?;
                let sample = out.with_extension("sample.safetensors");
                kiln_core::export::write_safetensors(&sample, &export.sample)?;
                let g = kiln_core::onnx::read_graph(&export.model)?;
                eprintln!(
                    "ONNX opset {}: {} nodes, {} initializers; input {:?}, output {:?}",
                    g.opset,
                    g.ops.len(),
                    g.initializers.len(),
                    g.inputs,
                    g.outputs
                );
                eprintln!(
                    "{}: sample inputs and kiln's outputs for them",
                    sample.display()
                );
                println!("{}", out.display());
                return Ok(());
            }
            let torch = if burn_names {
                None
            } else {
                family.torch_names(&ctx)?
            };
            let out = out.unwrap_or_else(|| kiln_core::export::default_path(&ctx.run));
            let written = kiln_core::export::safetensors(&ctx.run, &out, torch.as_ref())?;
            for t in &written {
                eprintln!("{} {:?}", t.name, t.shape);
            }
            eprintln!(
                "{} tensors, {} names",
                written.len(),
                if torch.is_some() { "PyTorch" } else { "Burn" }
            );
            println!("{}", out.display());
            Ok(())
        }
        Command::Eval { run } => {
            let (family, ctx) = open_run(&run, false)?;
            let metrics = family.eval(&ctx)?;
            println!("{}", serde_json::to_string_pretty(&metrics)?);
            Ok(())
        }
        Command::Predict { run, input, image } => {
            let (family, ctx, _unpacked) = open_model(&run)?;
            let input = match (input, image) {
                (Some(v), _) => PredictInput::Values(v),
                (None, Some(p)) => PredictInput::Image(p),
                (None, None) => bail!("predict needs --input or --image"),
            };
            println!("{}", family.predict(&ctx, &input)?);
            Ok(())
        }
    }
}

/// `kiln sweep`: a new sweep, a re-run, `--status`, `--collect` or one SLURM task.
fn run_sweep(a: SweepArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the kiln binary")?;
    if let Some(dir) = a.status {
        println!("{}", sweep::status(&dir)?);
        return Ok(());
    }
    if let Some(dir) = a.collect {
        println!("{}", sweep::collect(&dir, a.metric.as_deref())?);
        eprintln!(
            "wrote {}/results.csv, results.md, results.png",
            dir.display()
        );
        return Ok(());
    }
    if let (Some(dir), Some(i)) = (a.task, a.index) {
        let s = sweep::Sweep::read(&dir)?;
        let state = sweep::run_point(&dir, &s, i, &exe)?;
        eprintln!("{}: {state:?}", s.points[i].name);
        if state != sweep::State::Done {
            bail!(
                "{}: point {} ended {state:?}",
                dir.display(),
                s.points[i].name
            );
        }
        return Ok(());
    }
    let slurm = a.slurm.then(|| sweep::SlurmOptions {
        partition: a.partition.clone(),
        time: a.time.clone(),
        gres: a.gres.clone(),
        dry_run: a.dry_run,
    });
    if let Some(opts) = &slurm {
        sweep::check_sbatch(opts)?;
    }
    let target = a.target.unwrap_or_default();
    let existing = Path::new(&target).join(sweep::SWEEP_FILE).is_file();
    let (dir, s) = if existing {
        if !a.grid.is_empty() || !a.set.is_empty() || a.config.is_some() {
            bail!(
                "{target}: is a sweep directory: it re-runs as it was expanded (--grid, --set and --config belong to a new sweep)"
            );
        }
        let dir = PathBuf::from(&target);
        let s = sweep::Sweep::read(&dir)?;
        (dir, s)
    } else {
        if a.seeds == 0 {
            bail!("--seeds: must be at least 1");
        }
        if a.threads == 0 {
            bail!("--threads: must be at least 1");
        }
        let doc = load_config(&target, a.config.as_deref())?;
        let config = doc.source.canonicalize().unwrap_or(doc.source.clone());
        let grid = a
            .grid
            .iter()
            .map(|g| sweep::parse_grid(g))
            .collect::<Result<Vec<_>>>()?;
        if let Some(k) = grid
            .iter()
            .enumerate()
            .find_map(|(i, g)| grid[..i].iter().any(|h| h.key == g.key).then_some(&g.key))
        {
            bail!("--grid {k}: the key is swept twice");
        }
        if grid.iter().any(|g| g.key == "seed") {
            bail!("--grid seed: use --seeds N for seeds");
        }
        let runs = grid
            .iter()
            .try_fold(a.seeds, |n, g| n.checked_mul(g.values.len()))
            .unwrap_or(usize::MAX);
        if runs > limits::SWEEP_RUNS {
            bail!(
                "--grid/--seeds: at most {} runs in one sweep, got {}",
                limits::SWEEP_RUNS,
                if runs == usize::MAX {
                    "more than usize::MAX".to_string()
                } else {
                    runs.to_string()
                }
            );
        }
        let base: u64 = doc.typed::<toml::Value>()?.seed;
        let seeds: Vec<u64> = (0..a.seeds as u64).map(|i| base + i).collect();
        let s = sweep::Sweep {
            points: sweep::expand(&a.set, &grid, &seeds),
            config,
            sets: a.set.clone(),
            grid,
            seeds,
            threads: a.threads,
        };
        sweep::check_points(&s)?;
        let dir = match a.out {
            Some(d) => d,
            None => PathBuf::from("sweeps").join(format!("{}-{}", doc.name(), timestamp())),
        };
        if dir.join(sweep::SWEEP_FILE).exists() {
            bail!(
                "{}: already holds a sweep (re-run it with `kiln sweep {}`)",
                dir.display(),
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let dir = dir.canonicalize()?;
        s.write(&dir)?;
        (dir, s)
    };
    if let Some(opts) = slurm {
        let root = std::env::current_dir()?;
        // A GPU per task when the points train on cuda (the config's backend after the
        // first point's overrides).
        let gpu = ConfigDoc::read(&s.config)
            .ok()
            .and_then(|mut d| {
                for set in s.points.first().map_or(&[][..], |p| &p.sets[..]) {
                    d.set(set).ok()?;
                }
                d.typed::<toml::Value>().ok()
            })
            .is_some_and(|c| c.backend == BackendName::Cuda);
        match sweep::submit(&dir, &s, &exe, &root, &opts, gpu)? {
            Some(id) => println!(
                "submitted job array {id}: {} tasks; `kiln sweep --status {}`",
                s.points.len(),
                dir.display()
            ),
            None => println!(
                "wrote {} (submit it with sbatch)",
                dir.join("sweep.sbatch").display()
            ),
        }
        return Ok(());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parallel = a.parallel.unwrap_or((cores / s.threads).max(1));
    if parallel == 0 {
        bail!("--parallel: must be at least 1");
    }
    let failed = sweep::run_local(&dir, &s, parallel, &exe)?;
    if failed > 0 {
        bail!(
            "{failed} of {} points did not finish (logs in {}/logs; `kiln sweep {}` re-runs them)",
            s.points.len(),
            dir.display(),
            dir.display()
        );
    }
    println!("{}", sweep::collect(&dir, None)?);
    eprintln!("sweep directory: {}", dir.display());
    Ok(())
}

fn set_backend(doc: &mut ConfigDoc, name: &str) -> Result<()> {
    BackendName::parse(name).map_err(anyhow::Error::msg)?;
    doc.set(&format!("backend=\"{name}\""))?;
    Ok(())
}

/// A training that failed: with no checkpoint, nothing of value is in the run directory and
/// it is removed; with one, `summary.json` says the run failed and how to resume it.
/// Returns the error, with the resume command added when there is something to resume.
fn record_failure(run: &RunDir, e: anyhow::Error) -> anyhow::Error {
    let has_checkpoint = run
        .checkpoints()
        .join(kiln_core::engine::checkpoint::LATEST)
        .exists();
    if !has_checkpoint {
        let _ = std::fs::remove_dir_all(run.path());
        return e;
    }
    let interrupted = e.downcast_ref::<kiln_core::engine::Interrupted>().is_some();
    let resume = format!("kiln resume {}", run.path().display());
    let summary = serde_json::json!({
        "status": if interrupted { "interrupted" } else { "failed" },
        "error": format!("{e:#}").replace('\n', " "),
        "resume": resume,
    });
    let _ = run.write_summary(&summary);
    if interrupted {
        anyhow::anyhow!("{e:#}; continue with `{resume}`")
    } else {
        e
    }
}

/// `kiln list --runs`: every run directory under `root` with its config, status and headline.
fn list_runs(root: &Path) -> Result<()> {
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(root) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join(kiln_core::run::CONFIG_FILE).is_file())
            .collect(),
        Err(_) => {
            println!("no runs yet ({} does not exist)", root.display());
            return Ok(());
        }
    };
    dirs.sort();
    println!("{:<40} {:<20} {:<12} result", "run", "config", "status");
    for dir in dirs {
        let run = RunDir::open(&dir)?;
        let config = run
            .config()
            .ok()
            .and_then(|d| d.model().ok().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        let summary = run.read_summary().ok();
        let (status, headline) = match &summary {
            Some(s) if s["status"] == "failed" || s["status"] == "interrupted" => (
                s["status"].as_str().unwrap_or("failed").to_string(),
                s["error"].as_str().unwrap_or("").to_string(),
            ),
            Some(s) => ("done".to_string(), headline(s)),
            None if run.checkpoints().join("latest").exists() => (
                "stopped".to_string(),
                format!("kiln resume {}", dir.display()),
            ),
            None => ("running?".to_string(), String::new()),
        };
        println!(
            "{:<40} {:<20} {:<12} {headline}",
            dir.display(),
            config,
            status
        );
    }
    Ok(())
}

/// The figure a run is judged by, from its `summary.json`'s headline.
fn headline(s: &serde_json::Value) -> String {
    kiln_core::family::headline_of(s)
        .first()
        .map(|f| format!("{} {}", f.label, f.text))
        .unwrap_or_default()
}

/// The names of the registry's families that `can`, for error messages.
fn able(can: impl Fn(&dyn Family) -> bool) -> String {
    registry::FAMILIES
        .iter()
        .filter(|f| can(**f))
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A finished or interrupted run: its family and context.
fn open_run(path: &Path, resume: bool) -> Result<(&'static dyn Family, RunContext)> {
    let run = RunDir::open(path)?;
    let doc = run.config()?;
    let family = kiln_core::registry::family_for(&doc)?;
    Ok((family, RunContext { run, doc, resume }))
}

/// A model to use (predict, sample, play): a run directory, or a file `kiln export` wrote,
/// unpacked into a temporary run that lives as long as the returned guard.
fn open_model(
    path: &Path,
) -> Result<(
    &'static dyn Family,
    RunContext,
    Option<kiln_core::export::Unpacked>,
)> {
    if !path.exists() {
        bail!(
            "{}: no such run directory or exported model file",
            path.display()
        );
    }
    if path.is_file() {
        let unpacked = kiln_core::export::unpack(path)?;
        let (family, ctx) = open_run(unpacked.run.path(), false)?;
        return Ok((family, ctx, Some(unpacked)));
    }
    let (family, ctx) = open_run(path, false)?;
    Ok((family, ctx, None))
}

/// After training: print the run's report and where it is.
fn finish(ctx: &RunContext) -> Result<()> {
    let report =
        std::fs::read_to_string(ctx.run.file(kiln_core::run::REPORT_FILE)).unwrap_or_default();
    println!("{report}");
    eprintln!("run directory: {}", ctx.run.path().display());
    Ok(())
}

fn list() -> Result<()> {
    println!("model families:");
    for f in registry::FAMILIES {
        println!("  {:<10} {}", f.name(), f.about());
    }
    println!("\nconfigs (kiln train <name>):");
    match configs_dir() {
        Some(dir) => {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            entries.sort();
            for p in entries {
                let model = ConfigDoc::read(&p)
                    .ok()
                    .and_then(|d| d.model().ok().map(str::to_string))
                    .unwrap_or_else(|| "?".into());
                println!(
                    "  {:<22} {model:<10} {}",
                    p.file_stem().unwrap_or_default().to_string_lossy(),
                    p.display()
                );
            }
        }
        None => println!("  (no configs/ directory found; run kiln from the repository root)"),
    }
    println!("\nbackends (compiled in, and whether a device answers on this machine):");
    for b in BackendName::ALL {
        let state = if !b.is_compiled() {
            format!("not compiled in (cargo feature `{b}`)")
        } else {
            match b.probe() {
                Ok(()) if b.is_cpu() => "usable (CPU)".to_string(),
                Ok(()) => "usable (a device answered)".to_string(),
                Err(e) => format!("compiled in, not usable: {e}"),
            }
        };
        println!("  {:<8} {state}", b.as_str());
    }
    Ok(())
}

/// `configs/` of the checkout (the working directory after [`enter_root`]).
fn configs_dir() -> Option<PathBuf> {
    let here = PathBuf::from("configs");
    here.is_dir().then_some(here)
}

fn load_config(name: &str, explicit: Option<&Path>) -> Result<ConfigDoc> {
    if let Some(path) = explicit {
        return Ok(ConfigDoc::read(path)?);
    }
    let dir = configs_dir().context("no configs/ directory in the repository root")?;
    let path = dir.join(format!("{name}.toml"));
    if !path.is_file() {
        let known: Vec<String> = std::fs::read_dir(&dir)?
            .flatten()
            .filter_map(|e| {
                e.path()
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
            })
            .collect();
        let mut known = known;
        known.sort();
        bail!(
            "unknown model {name:?}: no {} (known: {})",
            path.display(),
            known.join(", ")
        );
    }
    Ok(ConfigDoc::read(&path)?)
}

/// runs/<name>-<timestamp> (a `-2`, `-3`, … suffix is added if it is taken).
fn default_run_dir(name: &str) -> PathBuf {
    PathBuf::from("runs").join(format!("{name}-{}", timestamp()))
}
