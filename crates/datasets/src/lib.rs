//! kiln-datasets: reading, splitting and scaling the data kiln's models train on.

pub mod folder;
pub mod idx;
pub mod images;
pub mod pixel_csv;
pub mod split;
pub mod tabular;

pub use images::{ImageData, ImageSet};
pub use split::{shuffled_split, stratified_split};
pub use tabular::{DataError, Standardizer, Table, parse_rows};
