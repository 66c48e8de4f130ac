//! Checkpoints: `checkpoints/epoch-NNNN/` holds any number of named modules (`<name>.bpk`),
//! optimizers (`<name>.bpk`) and JSON states (`<name>.json`); `checkpoints/latest` names the
//! newest complete one. A checkpoint is written completely, then `latest` flips atomically,
//! then the directories older than the one before it are removed: the last two complete units
//! stay, so a kill at any moment leaves a loadable `latest`, and a `latest` damaged afterwards
//! (a disk error, a truncated file) still leaves the unit before it to resume from.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::run::{RunDir, write_atomic};

/// The pointer file naming the newest complete checkpoint directory.
pub const LATEST: &str = "latest";
/// The engine's own loop state inside each checkpoint.
pub const ENGINE_STATE: &str = "state";

fn epoch_dir(run: &RunDir, epoch: usize) -> PathBuf {
    run.checkpoints().join(format!("epoch-{epoch:04}"))
}

/// A checkpoint being written; nothing is visible to `resume` until [`Checkpoint::commit`].
pub struct Checkpoint {
    run: RunDir,
    epoch: usize,
    dir: PathBuf,
}

impl Checkpoint {
    pub fn begin(run: &RunDir, epoch: usize) -> Result<Self> {
        let dir = epoch_dir(run, epoch);
        fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        Ok(Checkpoint {
            run: run.clone(),
            epoch,
            dir,
        })
    }

    /// Save a module's parameters as `<name>.bpk`.
    pub fn module<M: Module>(&mut self, name: &str, module: &M) -> Result<()> {
        let path = self.dir.join(format!("{name}.bpk"));
        module
            .clone()
            .save_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot save {name}: {e}", path.display()))
    }

    /// Save an optimizer's state (moments, step counts) as `<name>.bpk`.
    pub fn optimizer(&mut self, name: &str, optim: &ModuleOptimizer) -> Result<()> {
        let path = self.dir.join(format!("{name}.bpk"));
        optim
            .save(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot save {name}: {e}", path.display()))
    }

    /// Save any serialisable state (a replay buffer, ε, a generator's fixed noise) as JSON.
    pub fn state<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<()> {
        write_atomic(
            &self.dir.join(format!("{name}.json")),
            serde_json::to_string(value)?.as_bytes(),
        )
    }

    /// Make this checkpoint the one `resume` loads, and remove those older than the one
    /// before it.
    pub fn commit(self) -> Result<()> {
        write_atomic(
            &self.run.checkpoints().join(LATEST),
            self.dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .as_bytes(),
        )?;
        let units = unit_dirs(&self.run)?;
        let previous = units
            .iter()
            .map(|(n, _)| *n)
            .filter(|&n| n < self.epoch)
            .max();
        for (n, dir) in units {
            if previous.is_some_and(|p| n < p) {
                let _ = fs::remove_dir_all(dir);
            }
        }
        Ok(())
    }
}

/// The unit of a checkpoint directory's name, `epoch-NNNN`.
fn unit_of(name: &str) -> Option<usize> {
    name.strip_prefix("epoch-")?.parse().ok()
}

/// The `epoch-NNNN` directories of `run`, with their unit numbers, newest first.
fn unit_dirs(run: &RunDir) -> Result<Vec<(usize, PathBuf)>> {
    let dir = run.checkpoints();
    let mut units: Vec<(usize, PathBuf)> = fs::read_dir(&dir)
        .with_context(|| format!("{}: cannot read", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let n = unit_of(&e.file_name().to_string_lossy())?;
            e.path().is_dir().then(|| (n, e.path()))
        })
        .collect();
    units.sort_by_key(|u| std::cmp::Reverse(u.0));
    Ok(units)
}

/// The checkpoints `resume` may load, best first: the one `latest` names, then the complete
/// ones before it (newest first). Directories of later units are not complete (`latest` never
/// named them) and are left out. Empty when no checkpoint was ever committed.
pub fn candidates(run: &RunDir) -> Result<Vec<CheckpointReader>> {
    let Some(newest) = latest(run)? else {
        return Ok(Vec::new());
    };
    let newest_unit = newest
        .dir
        .file_name()
        .and_then(|n| unit_of(&n.to_string_lossy()));
    let mut out = vec![newest];
    if let Some(u) = newest_unit {
        out.extend(
            unit_dirs(run)?
                .into_iter()
                .filter(|(n, _)| *n < u)
                .map(|(_, dir)| CheckpointReader { dir }),
        );
    }
    Ok(out)
}

/// A complete checkpoint to load from.
pub struct CheckpointReader {
    dir: PathBuf,
}

/// The newest complete checkpoint of `run`, if any.
pub fn latest(run: &RunDir) -> Result<Option<CheckpointReader>> {
    let latest = run.checkpoints().join(LATEST);
    if !latest.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&latest)
        .with_context(|| format!("{}: cannot read", latest.display()))?;
    let dir = run.checkpoints().join(name.trim());
    if !dir.is_dir() {
        anyhow::bail!(
            "{}: names {}, which does not exist",
            latest.display(),
            dir.display()
        );
    }
    Ok(Some(CheckpointReader { dir }))
}

impl CheckpointReader {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Load `<name>.bpk` into `module` (built with the same config).
    pub fn module<M: Module>(&self, name: &str, module: M) -> Result<M> {
        let path = self.dir.join(format!("{name}.bpk"));
        module
            .try_load_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load checkpoint: {e}", path.display()))
    }

    /// Load `<name>.bpk` into an optimizer of the same kind.
    pub fn optimizer(&self, name: &str, optim: ModuleOptimizer) -> Result<ModuleOptimizer> {
        let path = self.dir.join(format!("{name}.bpk"));
        optim
            .load(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load checkpoint: {e}", path.display()))
    }

    /// Read `<name>.json`.
    pub fn state<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let path = self.dir.join(format!("{name}.json"));
        let text = fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: corrupt checkpoint state", path.display()))
    }
}
