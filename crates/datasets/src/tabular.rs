//! CSV tables with a header row, and feature standardisation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A data-file error: names the file and, where known, the line and column.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct DataError {
    pub file: String,
    pub message: String,
}

fn data_error(file: &Path, message: impl Into<String>) -> DataError {
    DataError {
        file: file.display().to_string(),
        message: message.into(),
    }
}

/// A CSV table read as text: header names and rows of cells. Numeric access checks every
/// cell and reports the first bad one by line and column.
#[derive(Debug, Clone)]
pub struct Table {
    pub path: PathBuf,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn read(path: &Path) -> Result<Table, DataError> {
        if !path.is_file() {
            return Err(data_error(path, "data file not found (see data/README.md)"));
        }
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .from_path(path)
            .map_err(|e| data_error(path, format!("cannot open: {e}")))?;
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| data_error(path, format!("cannot read header: {e}")))?
            .iter()
            .map(str::to_string)
            .collect();
        let mut rows = Vec::new();
        for (i, rec) in reader.records().enumerate() {
            let rec = rec.map_err(|e| data_error(path, format!("line {}: {e}", i + 2)))?;
            rows.push(rec.iter().map(str::to_string).collect());
        }
        if rows.is_empty() {
            return Err(data_error(path, "no data rows"));
        }
        Ok(Table {
            path: path.to_path_buf(),
            header,
            rows,
        })
    }

    /// The position of the column `name` (exact spelling); the error suggests a column that
    /// differs only in case or surrounding spaces.
    pub fn column_index(&self, name: &str) -> Result<usize, DataError> {
        self.header.iter().position(|h| h == name).ok_or_else(|| {
            let near = self
                .header
                .iter()
                .find(|h| h.trim().eq_ignore_ascii_case(name.trim()))
                .map(|h| format!("did you mean {h:?}? names match exactly; "))
                .unwrap_or_default();
            data_error(
                &self.path,
                format!(
                    "no column {name:?} ({near}columns: {})",
                    self.header.join(", ")
                ),
            )
        })
    }

    /// The named columns as numbers, row-major: `rows × names.len()`.
    pub fn numeric(&self, names: &[String]) -> Result<Vec<Vec<f64>>, DataError> {
        let cols: Vec<usize> = names
            .iter()
            .map(|n| self.column_index(n))
            .collect::<Result<_, _>>()?;
        self.rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                cols.iter()
                    .map(|&c| {
                        let cell = &row[c];
                        cell.parse::<f64>()
                            .ok()
                            .filter(|v| v.is_finite())
                            .ok_or_else(|| {
                                data_error(
                                    &self.path,
                                    format!(
                                        "line {}, column {:?}: not a number: {cell:?}",
                                        i + 2,
                                        self.header[c]
                                    ),
                                )
                            })
                    })
                    .collect()
            })
            .collect()
    }

    /// A text column (e.g. class names).
    pub fn text(&self, name: &str) -> Result<Vec<String>, DataError> {
        let c = self.column_index(name)?;
        Ok(self.rows.iter().map(|r| r[c].clone()).collect())
    }
}

/// Parse user rows for prediction: either a CSV file (header optional) or one row of
/// comma-separated values. Every row must have `expected` numbers.
pub fn parse_rows(
    input: &str,
    expected: usize,
    feature_names: &[String],
) -> anyhow::Result<Vec<Vec<f64>>> {
    let path = Path::new(input);
    let (source, text) = if path.is_file() {
        (
            path.display().to_string(),
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?,
        )
    } else {
        ("--input".to_string(), input.to_string())
    };
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let parsed: Result<Vec<f64>, _> = cells.iter().map(|c| c.parse::<f64>()).collect();
        match parsed {
            Ok(v) => {
                if v.len() != expected {
                    anyhow::bail!(
                        "{source}: line {}: expected {expected} values ({}), got {}",
                        i + 1,
                        feature_names.join(", "),
                        v.len()
                    );
                }
                rows.push(v);
            }
            // A header row is allowed as the first line of a file.
            Err(_) if i == 0 && source != "--input" => continue,
            Err(_) => {
                let bad = cells
                    .iter()
                    .find(|c| c.parse::<f64>().is_err())
                    .unwrap_or(&"");
                anyhow::bail!("{source}: line {}: not a number: {bad:?}", i + 1);
            }
        }
    }
    if rows.is_empty() {
        anyhow::bail!("{source}: no values to predict on");
    }
    Ok(rows)
}

/// z-score standardisation fitted on the training set: z = (x − μ) / σ, per column
/// (population σ, as scikit-learn's `StandardScaler`). A constant column gets σ = 1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Standardizer {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Standardizer {
    pub fn fit(rows: &[Vec<f64>]) -> Standardizer {
        let d = rows.first().map_or(0, Vec::len);
        let n = rows.len().max(1) as f64;
        let mean: Vec<f64> = (0..d)
            .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n)
            .collect();
        let std = (0..d)
            .map(|j| {
                let var = rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n;
                if var > 0.0 { var.sqrt() } else { 1.0 }
            })
            .collect();
        Standardizer { mean, std }
    }

    pub fn transform(&self, rows: &[Vec<f64>]) -> Vec<Vec<f64>> {
        rows.iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .map(|(j, x)| (x - self.mean[j]) / self.std[j])
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn reads_numeric_columns() {
        let (_d, p) = write("a,b,c\n1,2,x\n3,4,y\n");
        let t = Table::read(&p).unwrap();
        assert_eq!(
            t.numeric(&["b".into(), "a".into()]).unwrap(),
            vec![vec![2.0, 1.0], vec![4.0, 3.0]]
        );
        assert_eq!(t.text("c").unwrap(), vec!["x", "y"]);
    }

    #[test]
    fn non_numeric_cell_names_line_and_column() {
        let (_d, p) = write("a,b\n1,2\n3,oops\n");
        let err = Table::read(&p)
            .unwrap()
            .numeric(&["a".into(), "b".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3, column \"b\": not a number: \"oops\""),
            "{err}"
        );
        assert!(err.starts_with(&p.display().to_string()));
    }

    #[test]
    fn a_column_in_another_case_is_suggested() {
        let (_d, p) = write("date,close\n1,2\n");
        let t = Table::read(&p).unwrap();
        let e = t.column_index("Close").unwrap_err().to_string();
        assert!(
            e.contains("no column \"Close\" (did you mean \"close\"? names match exactly"),
            "{e}"
        );
    }

    #[test]
    fn missing_file_and_column() {
        assert!(
            Table::read(Path::new("/nonexistent.csv"))
                .unwrap_err()
                .to_string()
                .contains("not found")
        );
        let (_d, p) = write("a\n1\n");
        assert!(Table::read(&p).unwrap().numeric(&["z".into()]).is_err());
    }

    #[test]
    fn standardizer_gives_zero_mean_unit_variance() {
        let rows = vec![vec![1.0, 5.0], vec![3.0, 5.0]];
        let s = Standardizer::fit(&rows);
        assert_eq!(s.mean, vec![2.0, 5.0]);
        assert_eq!(s.std, vec![1.0, 1.0]);
        assert_eq!(s.transform(&rows), vec![vec![-1.0, 0.0], vec![1.0, 0.0]]);
    }

    #[test]
    fn parse_rows_checks_width() {
        let names = vec!["a".to_string(), "b".to_string()];
        assert_eq!(parse_rows("1, 2", 2, &names).unwrap(), vec![vec![1.0, 2.0]]);
        let err = parse_rows("1,2,3", 2, &names).unwrap_err().to_string();
        assert!(err.contains("expected 2 values"), "{err}");
        let (_d, p) = write("a,b\n1,2\n3,4\n");
        assert_eq!(parse_rows(p.to_str().unwrap(), 2, &names).unwrap().len(), 2);
    }
}
