//! The run directory every `kiln train` leaves behind:
//!
//! ```text
//! runs/<config>-<timestamp>/
//!   config.toml        resolved config (overrides applied); `resume` and `eval` read it
//!   metrics.csv        one row per epoch (deterministic: no wall-clock columns)
//!   loss.png, accuracy.png, ...   curves and model-specific plots
//!   checkpoints/       epoch-NNNN/{model.bpk, optimizer.bpk, state.json}, `latest` pointer
//!   model.bpk          final weights, what `eval` and `predict` load
//!   summary.json       final numbers, machine-readable
//!   report.md          the same for people
//! ```
//!
//! Every file is written atomically (temporary file, then rename), so a run killed at any
//! moment leaves either the old or the new version, never half a file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::ConfigDoc;

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.csv";
pub const SUMMARY_FILE: &str = "summary.json";
pub const REPORT_FILE: &str = "report.md";
pub const MODEL_FILE: &str = "model.bpk";
pub const CHECKPOINT_DIR: &str = "checkpoints";

#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

/// One row of `metrics.csv`: the epoch and named values in a fixed order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub values: Vec<(String, f64)>,
}

impl EpochRecord {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

impl RunDir {
    /// Create a fresh run directory (it must not exist or be empty). Claiming it is atomic:
    /// of two runs started on the same path at once, one gets it and the other an error.
    pub fn create(path: &Path) -> Result<Self> {
        let taken = || {
            anyhow::anyhow!(
                "{}: run directory already exists and is not empty (use `kiln resume` to continue it, or another --out)",
                path.display()
            )
        };
        if path.exists() && fs::read_dir(path)?.next().is_some() {
            return Err(taken());
        }
        fs::create_dir_all(path)
            .with_context(|| format!("{}: cannot create run directory", path.display()))?;
        match fs::create_dir(path.join(CHECKPOINT_DIR)) {
            Ok(()) => Ok(RunDir {
                path: path.to_path_buf(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(taken()),
            Err(e) => {
                Err(e).with_context(|| format!("{}: cannot create run directory", path.display()))
            }
        }
    }

    /// Create `base`, or `base-2`, `base-3`, … if that is taken (runs started in the same
    /// second get distinct directories).
    pub fn create_unique(base: &Path) -> Result<Self> {
        for n in 1..1000 {
            let candidate = match n {
                1 => base.to_path_buf(),
                _ => PathBuf::from(format!("{}-{n}", base.display())),
            };
            if candidate.exists() {
                continue;
            }
            match RunDir::create(&candidate) {
                Ok(run) => return Ok(run),
                Err(_) if candidate.join(CHECKPOINT_DIR).exists() => continue,
                Err(e) => return Err(e),
            }
        }
        bail!("{}: too many runs with this name", base.display())
    }

    /// Open an existing run directory; a directory without `config.toml` is not a run.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            bail!("{}: no such run directory", path.display());
        }
        if !path.join(CONFIG_FILE).is_file() {
            bail!(
                "{}: not a kiln run directory (no {CONFIG_FILE}; runs are made by `kiln train`)",
                path.display()
            );
        }
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.path.join(CHECKPOINT_DIR)
    }

    pub fn config(&self) -> Result<ConfigDoc> {
        Ok(ConfigDoc::read(&self.file(CONFIG_FILE))?)
    }

    pub fn write_config(&self, doc: &ConfigDoc) -> Result<()> {
        let header = format!(
            "# Resolved config of this run (from {}, overrides applied).\n",
            doc.source.display()
        );
        write_atomic(
            &self.file(CONFIG_FILE),
            (header + &doc.to_toml()).as_bytes(),
        )
    }

    /// Rewrite `metrics.csv` from the full history (small; keeps it consistent with the
    /// checkpoint after a crash).
    /// The first column is named after the unit (`epoch`, or `round` for DQN).
    pub fn write_metrics(&self, unit_name: &str, history: &[EpochRecord]) -> Result<()> {
        let mut out = String::from(unit_name);
        if let Some(first) = history.first() {
            for (k, _) in &first.values {
                out.push(',');
                out.push_str(k);
            }
        }
        out.push('\n');
        for rec in history {
            out.push_str(&rec.epoch.to_string());
            for (_, v) in &rec.values {
                out.push_str(&format!(",{v}"));
            }
            out.push('\n');
        }
        write_atomic(&self.file(METRICS_FILE), out.as_bytes())
    }

    pub fn write_summary(&self, summary: &serde_json::Value) -> Result<()> {
        let text = serde_json::to_string_pretty(summary)?;
        write_atomic(&self.file(SUMMARY_FILE), text.as_bytes())
    }

    pub fn read_summary(&self) -> Result<serde_json::Value> {
        let path = self.file(SUMMARY_FILE);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read (has the run finished?)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
    }

    /// Write a JSON file of the run (e.g. the preprocessing `predict` needs).
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        write_atomic(
            &self.file(name),
            serde_json::to_string_pretty(value)?.as_bytes(),
        )
    }

    /// Read a JSON file written by [`RunDir::write_json`].
    pub fn read_json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T> {
        let path = self.file(name);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: invalid", path.display()))
    }

    pub fn write_report(&self, text: &str) -> Result<()> {
        write_atomic(&self.file(REPORT_FILE), text.as_bytes())
    }
}

/// Write a file so that readers see either the old or the new content: write a sibling
/// temporary file, rename it over the target. (No fsync: this guards against a killed
/// process, which is what the checkpoints are for, at no cost per epoch.)
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path);
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
    }
    fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))?;
    Ok(())
}

pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Seconds since the Unix epoch formatted as `YYYYMMDD-HHMMSS` (UTC), for run names.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
    }

    #[test]
    fn metrics_csv_has_header_and_rows() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("r")).unwrap();
        let rec = |e| EpochRecord {
            epoch: e,
            values: vec![("train_loss".into(), 1.5), ("val_loss".into(), 2.0)],
        };
        run.write_metrics("epoch", &[rec(1), rec(2)]).unwrap();
        let text = fs::read_to_string(run.file(METRICS_FILE)).unwrap();
        assert_eq!(text, "epoch,train_loss,val_loss\n1,1.5,2\n2,1.5,2\n");
    }

    /// Runs started at the same moment under the same name each get their own directory.
    #[test]
    fn concurrent_runs_get_distinct_directories() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("mlp-20261124-094832");
        let paths: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| RunDir::create_unique(&base).unwrap().path().to_path_buf()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut unique = paths.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 8, "{paths:?}");
        // An explicit path that is already taken is an error, not a shared directory.
        let err = RunDir::create(&base).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
    }

    #[test]
    fn open_rejects_non_runs() {
        let dir = tempfile::tempdir().unwrap();
        let err = RunDir::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a kiln run directory"), "{err}");
    }
}
