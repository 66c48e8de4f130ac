//! `kiln bench` for image classifiers: the real training step on the config's data set.

use anyhow::Result;
use kiln_core::train::{Benchmark, benchmark};
use kiln_core::{ConfigDoc, Family};

use crate::{ImageFamily, ImageNet, ImageTask, preprocessing};

impl<N: ImageNet> ImageFamily<N> {
    /// Benchmark `doc` (its backend, batch size and optimizer) over `batches` batches.
    pub fn benchmark(&self, doc: &ConfigDoc, batches: usize) -> Result<Benchmark> {
        self.check(doc)?;
        let cfg = self.config(doc)?;
        let data = self.load(&cfg)?;
        let pre = preprocessing(&data, &self.dataset(&cfg));
        let task = ImageTask::<N> {
            params: &cfg.params.net,
            pre: &pre,
            augment: cfg.params.augment,
            start: None,
            frozen: self.frozen(doc, &cfg, &pre)?,
        };
        benchmark(
            &task,
            &data.train,
            &cfg.train,
            cfg.backend,
            cfg.seed,
            batches,
        )
    }
}
