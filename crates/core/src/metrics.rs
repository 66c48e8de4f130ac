//! Evaluation metrics on plain numbers (what `summary.json` reports), with the formulas from
//! the course (course deck 1). The training losses themselves are Burn's (`burn::nn::loss`).

/// Mean squared error: MSE = (1/N) Σᵢ (yᵢ − ŷᵢ)².
pub fn mse(y: &[f64], y_hat: &[f64]) -> f64 {
    y.iter()
        .zip(y_hat)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        / y.len().max(1) as f64
}

/// Mean absolute error: MAE = (1/N) Σᵢ |yᵢ − ŷᵢ|.
pub fn mae(y: &[f64], y_hat: &[f64]) -> f64 {
    y.iter().zip(y_hat).map(|(a, b)| (a - b).abs()).sum::<f64>() / y.len().max(1) as f64
}

/// Coefficient of determination: R² = 1 − Σ(yᵢ − ŷᵢ)² / Σ(yᵢ − ȳ)².
pub fn r2(y: &[f64], y_hat: &[f64]) -> f64 {
    let mean = y.iter().sum::<f64>() / y.len().max(1) as f64;
    let ss_res: f64 = y.iter().zip(y_hat).map(|(a, b)| (a - b).powi(2)).sum();
    let ss_tot: f64 = y.iter().map(|a| (a - mean).powi(2)).sum();
    1.0 - ss_res / ss_tot
}

/// Fraction of predictions equal to the labels.
pub fn accuracy(labels: &[usize], predicted: &[usize]) -> f64 {
    let right = labels.iter().zip(predicted).filter(|(a, b)| a == b).count();
    right as f64 / labels.len().max(1) as f64
}

/// `confusion[true][predicted]` counts.
pub fn confusion(labels: &[usize], predicted: &[usize], classes: usize) -> Vec<Vec<usize>> {
    let mut m = vec![vec![0; classes]; classes];
    for (&t, &p) in labels.iter().zip(predicted) {
        if t < classes && p < classes {
            m[t][p] += 1;
        }
    }
    m
}

/// A confusion matrix as a Markdown table: rows the true class, columns the predicted one,
/// `corner` in the top-left cell.
pub fn confusion_markdown(corner: &str, classes: &[String], counts: &[Vec<usize>]) -> String {
    let mut out = format!("| {corner} | {} |\n|---|", classes.join(" | "));
    out.push_str(&"---|".repeat(classes.len()));
    out.push('\n');
    for (c, row) in classes.iter().zip(counts) {
        let cells: Vec<String> = row.iter().map(usize::to_string).collect();
        out.push_str(&format!("| {c} | {} |\n", cells.join(" | ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Course deck 1: labels 30, 50, 100; predictions 29, 53, 98.
    #[test]
    fn mse_and_mae_match_the_worked_example() {
        let (y, y_hat) = ([30.0, 50.0, 100.0], [29.0, 53.0, 98.0]);
        assert!((mse(&y, &y_hat) - 14.0 / 3.0).abs() < 1e-12);
        assert!((mae(&y, &y_hat) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn r2_of_perfect_and_mean_predictions() {
        let y = [1.0, 2.0, 3.0];
        assert_eq!(r2(&y, &y), 1.0);
        assert_eq!(r2(&y, &[2.0, 2.0, 2.0]), 0.0);
    }

    #[test]
    fn accuracy_and_confusion() {
        assert_eq!(accuracy(&[0, 1, 1], &[0, 1, 0]), 2.0 / 3.0);
        assert_eq!(
            confusion(&[0, 1, 1], &[0, 1, 0], 2),
            vec![vec![1, 0], vec![1, 1]]
        );
    }
}
