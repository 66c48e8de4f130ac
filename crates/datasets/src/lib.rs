//! kiln-datasets: reading, splitting and scaling the data kiln's models train on.

pub mod split;
pub mod tabular;

pub use split::{shuffled_split, stratified_split};
pub use tabular::{Standardizer, Table, parse_rows};
