//! The closed-form solution gradient descent should reach.
//!
//! With the design matrix X (a leading column of ones for the intercept) and targets y, the
//! least-squares coefficients minimise ‖Xβ − y‖² and solve the normal equations
//! (XᵀX) β = Xᵀy. Solved here in f64 by Gaussian elimination with partial pivoting
//! (13 × 13 at most for Boston housing, so no library is needed).

/// Returns `[intercept, w₁, …, w_d]`, or `None` when XᵀX is singular.
pub fn solve(rows: &[Vec<f64>], y: &[f64]) -> Option<Vec<f64>> {
    let d = rows.first()?.len() + 1;
    // Augmented matrix [XᵀX | Xᵀy].
    let mut a = vec![vec![0.0f64; d + 1]; d];
    for (row, &target) in rows.iter().zip(y) {
        let x: Vec<f64> = std::iter::once(1.0).chain(row.iter().copied()).collect();
        for i in 0..d {
            for j in 0..d {
                a[i][j] += x[i] * x[j];
            }
            a[i][d] += x[i] * target;
        }
    }
    for col in 0..d {
        let pivot = (col..d).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (v, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *v -= f * p;
                }
            }
        }
    }
    Some((0..d).map(|i| a[i][d] / a[i][i]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_an_exact_plane() {
        // y = 1 + 2·a − 3·b
        let rows = vec![
            vec![0.0, 0.0],
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![2.0, 5.0],
        ];
        let y: Vec<f64> = rows.iter().map(|r| 1.0 + 2.0 * r[0] - 3.0 * r[1]).collect();
        let beta = solve(&rows, &y).unwrap();
        for (b, e) in beta.iter().zip([1.0, 2.0, -3.0]) {
            assert!((b - e).abs() < 1e-10, "{beta:?}");
        }
    }

    /// Course deck 4's two points (1,3), (2,5) lie on y = 2x + 1.
    #[test]
    fn least_squares_fits_the_worked_example_line() {
        let beta = solve(&[vec![1.0], vec![2.0]], &[3.0, 5.0]).unwrap();
        assert!((beta[0] - 1.0).abs() < 1e-12 && (beta[1] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn singular_is_none() {
        assert!(
            solve(
                &[vec![1.0, 1.0], vec![2.0, 2.0], vec![3.0, 3.0]],
                &[1.0, 2.0, 3.0]
            )
            .is_none()
        );
    }
}
