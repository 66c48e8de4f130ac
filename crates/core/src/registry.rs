//! The registry of model families the running program knows: the `kiln` binary installs its
//! list once at start ([`install`]); the CLI and the families themselves look families up here
//! by name and ask what each can do. A GAN finds its judge this way — any family that
//! offers [`crate::Family::classifier`] — without depending on the classifier crates.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, bail};

use crate::classify::ImageClassifier;
use crate::config::ConfigDoc;
use crate::family::Family;
use crate::run::RunDir;

static FAMILIES: OnceLock<&'static [&'static dyn Family]> = OnceLock::new();

/// Make `families` the registry (the first call wins; later calls change nothing).
pub fn install(families: &'static [&'static dyn Family]) {
    let _ = FAMILIES.set(families);
}

/// The installed families (none before [`install`]).
pub fn families() -> &'static [&'static dyn Family] {
    FAMILIES.get().copied().unwrap_or(&[])
}

/// The family named by the config's `model` key.
pub fn family_for(doc: &ConfigDoc) -> Result<&'static dyn Family> {
    let name = doc.model()?;
    match families().iter().find(|f| f.name() == name) {
        Some(f) => Ok(*f),
        None => {
            let known: Vec<&str> = families().iter().map(|f| f.name()).collect();
            bail!(
                "{}: model: unknown model family {name:?} (known: {})",
                doc.source.display(),
                known.join(", ")
            )
        }
    }
}

/// A finished run of any family that classifies images, opened as a classifier.
pub fn open_classifier(dir: &Path) -> Result<Box<dyn ImageClassifier>> {
    let run = RunDir::open(dir)?;
    let doc = run.config()?;
    let family = family_for(&doc)?;
    match family.classifier() {
        Some(opener) => opener.open(dir),
        None => {
            let able: Vec<&str> = families()
                .iter()
                .filter(|f| f.classifier().is_some())
                .map(|f| f.name())
                .collect();
            bail!(
                "{}: not an image classifier run (model = {:?}); it must be a finished run of {}",
                dir.display(),
                family.name(),
                able.join(" or ")
            )
        }
    }
}
