//! Reproducible train/test splits.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// Shuffle `0..n` with `seed` and cut off the last `round(n·test_fraction)` indices as the
/// test set. Returns `(train, test)`, each sorted.
pub fn shuffled_split(n: usize, test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_test = ((n as f64) * test_fraction).round() as usize;
    let mut test = idx.split_off(n - n_test.min(n));
    idx.sort_unstable();
    test.sort_unstable();
    (idx, test)
}

/// Like [`shuffled_split`] but per class, so the test set keeps the class proportions
/// (scikit-learn's `train_test_split(..., stratify=y)`).
pub fn stratified_split(
    labels: &[usize],
    test_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let classes = labels.iter().copied().max().map_or(0, |m| m + 1);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        let (tr, te) = shuffled_split(members.len(), test_fraction, seed.wrapping_add(c as u64));
        train.extend(tr.into_iter().map(|i| members[i]));
        test.extend(te.into_iter().map(|i| members[i]));
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_a_partition_and_reproducible() {
        let (a, b) = shuffled_split(10, 0.3, 1);
        assert_eq!((a.len(), b.len()), (7, 3));
        let mut all: Vec<usize> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(shuffled_split(10, 0.3, 1), (a, b));
    }

    #[test]
    fn stratified_keeps_proportions() {
        let labels: Vec<usize> = (0..30).map(|i| i / 10).collect();
        let (_, test) = stratified_split(&labels, 0.2, 3);
        for c in 0..3 {
            assert_eq!(test.iter().filter(|&&i| labels[i] == c).count(), 2);
        }
    }
}
