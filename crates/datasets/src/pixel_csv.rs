//! Images as CSV rows: `dataset = "csv:FILE"` (or `"csv:TRAIN,TEST"`), the layout of Kaggle's
//! Sign Language MNIST — a header, then one row per image: a `label` column and one column per
//! pixel (grey, 0–255, row by row; their number a square: 784 = 28×28).
//!
//! The classes are the distinct labels, in numeric order, named by their values. With one file,
//! every fifth row is the test set (the same split every run); the training rows are dealt in a
//! fixed shuffled order, so the validation part holds every class.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::images::{ImageData, ImageSet};

/// The prefix of a CSV image data set's config name.
pub const PREFIX: &str = "csv:";

/// `(train file, test file)` of a `csv:…` config name.
pub fn files_of(dataset: &str) -> Option<(&Path, Option<&Path>)> {
    let rest = dataset.strip_prefix(PREFIX)?;
    Some(match rest.split_once(',') {
        Some((a, b)) => (Path::new(a), Some(Path::new(b.trim()))),
        None => (Path::new(rest), None),
    })
}

/// One image row: its label and its pixels.
type Row = (i64, Vec<u8>);

/// The rows of one file, and the image side.
fn read(path: &Path) -> Result<(Vec<Row>, usize)> {
    let mut r = csv::Reader::from_path(path)
        .with_context(|| format!("{}: cannot read the image CSV", path.display()))?;
    let header = r
        .headers()
        .with_context(|| format!("{}: no header row", path.display()))?
        .clone();
    let Some(label_col) = header.iter().position(|h| h.eq_ignore_ascii_case("label")) else {
        bail!(
            "{}: no column \"label\" (columns: {}…)",
            path.display(),
            header.iter().take(3).collect::<Vec<_>>().join(", ")
        );
    };
    let pixels = header.len() - 1;
    let side = (pixels as f64).sqrt().round() as usize;
    if side * side != pixels || side < 2 {
        bail!(
            "{}: {pixels} pixel columns are not a square image",
            path.display()
        );
    }
    let mut rows = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let line = i + 2;
        let rec = rec.with_context(|| format!("{}: line {line}: not CSV", path.display()))?;
        if rec.len() != header.len() {
            bail!(
                "{}: line {line}: {} cells, the header has {}",
                path.display(),
                rec.len(),
                header.len()
            );
        }
        let mut label = 0;
        let mut px = Vec::with_capacity(pixels);
        for (c, cell) in rec.iter().enumerate() {
            let v: i64 = cell.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "{}: line {line}, column {}: {cell:?} is not a whole number",
                    path.display(),
                    &header[c]
                )
            })?;
            if c == label_col {
                label = v;
            } else if (0..=255).contains(&v) {
                px.push(v as u8);
            } else {
                bail!(
                    "{}: line {line}, column {}: {v} is not a pixel value in 0..=255",
                    path.display(),
                    &header[c]
                );
            }
        }
        rows.push((label, px));
    }
    if rows.is_empty() {
        bail!("{}: no image rows", path.display());
    }
    Ok((rows, side))
}

fn set(rows: &[&Row], labels: &[i64], side: usize) -> ImageSet {
    ImageSet {
        n: rows.len(),
        channels: 1,
        height: side,
        width: side,
        pixels: rows.iter().flat_map(|(_, p)| p.iter().copied()).collect(),
        labels: rows
            .iter()
            .map(|(l, _)| labels.iter().position(|x| x == l).unwrap_or(0) as u8)
            .collect(),
    }
}

/// `(height, width, classes)` of a CSV image data set (reads the files).
pub fn shape(train: &Path) -> Result<(usize, usize, usize)> {
    let (rows, side) = read(train)?;
    let mut labels: Vec<i64> = rows.iter().map(|(l, _)| *l).collect();
    labels.sort_unstable();
    labels.dedup();
    Ok((side, side, labels.len()))
}

/// Load a CSV image data set (see the module docs).
pub fn load(train_file: &Path, test_file: Option<&Path>) -> Result<ImageData> {
    let (rows, side) = read(train_file)?;
    let mut labels: Vec<i64> = rows.iter().map(|(l, _)| *l).collect();
    labels.sort_unstable();
    labels.dedup();
    if labels.len() < 2 || labels.len() > 256 {
        bail!(
            "{}: {} classes; between 2 and 256 are needed",
            train_file.display(),
            labels.len()
        );
    }
    let test_rows;
    let (mut train, test): (Vec<&Row>, Vec<&Row>) = match test_file {
        Some(t) => {
            let (r, s) = read(t)?;
            if s != side {
                bail!(
                    "{}: {s}×{s} images, the training file's are {side}×{side}",
                    t.display()
                );
            }
            if let Some((l, _)) = r.iter().find(|(l, _)| !labels.contains(l)) {
                bail!(
                    "{}: label {l} is not among the training labels",
                    t.display()
                );
            }
            test_rows = r;
            (rows.iter().collect(), test_rows.iter().collect())
        }
        None => {
            let (test, train): (Vec<_>, Vec<_>) =
                rows.iter().enumerate().partition(|(i, _)| i % 5 == 4);
            (
                train.into_iter().map(|(_, r)| r).collect(),
                test.into_iter().map(|(_, r)| r).collect(),
            )
        }
    };
    train.shuffle(&mut StdRng::seed_from_u64(0));
    Ok(ImageData {
        name: train_file.file_stem().map_or_else(
            || train_file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        classes: labels.iter().map(i64::to_string).collect(),
        scale: 255.0,
        train: set(&train, &labels, side),
        test: set(&test, &labels, side),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_square_pixels_every_fifth_row_is_test() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("signs.csv");
        let mut text = String::from("label,p1,p2,p3,p4\n");
        for i in 0..10 {
            text.push_str(&format!("{},{},0,0,255\n", [3, 7][i % 2], i * 10));
        }
        std::fs::write(&f, text).unwrap();
        assert_eq!(shape(&f).unwrap(), (2, 2, 2));
        let d = load(&f, None).unwrap();
        assert_eq!(d.classes, ["3", "7"]);
        assert_eq!((d.train.n, d.test.n), (8, 2));
        // Rows 4 and 9 (labels 3 and 7) are the test set.
        assert_eq!(d.test.labels, [0, 1]);
        assert_eq!(&d.test.pixels[..4], &[40, 0, 0, 255]);
        assert_eq!(
            files_of("csv:a.csv, b.csv"),
            Some((Path::new("a.csv"), Some(Path::new("b.csv"))))
        );
    }

    #[test]
    fn bad_files_are_one_line_naming_line_and_column() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("bad.csv");
        std::fs::write(&f, "label,a,b,c\n1,0,0,0\n").unwrap();
        assert!(
            load(&f, None)
                .unwrap_err()
                .to_string()
                .contains("3 pixel columns are not a square image")
        );
        std::fs::write(&f, "label,a,b,c,d\n1,0,0,0,300\n").unwrap();
        let e = load(&f, None).unwrap_err().to_string();
        assert!(
            e.contains("line 2, column d: 300 is not a pixel value"),
            "{e}"
        );
        std::fs::write(&f, "y,a,b,c,d\n1,0,0,0,3\n").unwrap();
        assert!(
            load(&f, None)
                .unwrap_err()
                .to_string()
                .contains("no column \"label\"")
        );
    }
}
