//! Pictures of images without captions: sample grids, reconstructions, interpolation strips.
//! Pixel-exact (each image pixel becomes a `zoom × zoom` block), written with the `image`
//! crate, so a grid of 64 samples costs milliseconds per epoch.

use std::path::Path;

use anyhow::{Context, Result};
use image::{GrayImage, Luma};

/// Screen pixels per image pixel in picture grids: 28×28 images become 84×84, 8×8 ones 80×80.
pub fn zoom(height: usize) -> usize {
    (84 / height.max(1)).max(1)
}

/// Tile `images` (intensities in [0, 1], each `height × width`, row-major) into a grid of
/// `columns` columns with a 2-pixel grey gap, and write it as a PNG.
pub fn tiles(
    path: &Path,
    images: &[Vec<f32>],
    height: usize,
    width: usize,
    columns: usize,
    zoom: usize,
) -> Result<()> {
    let cols = columns.max(1);
    let rows = images.len().div_ceil(cols).max(1);
    let (gap, z) = (2usize, zoom.max(1));
    let cell_w = width * z + gap;
    let cell_h = height * z + gap;
    let mut img = GrayImage::from_pixel(
        (cols * cell_w + gap) as u32,
        (rows * cell_h + gap) as u32,
        Luma([128]),
    );
    for (n, pixels) in images.iter().enumerate() {
        let (x0, y0) = (gap + (n % cols) * cell_w, gap + (n / cols) * cell_h);
        for r in 0..height * z {
            for c in 0..width * z {
                let v = pixels.get((r / z) * width + c / z).copied().unwrap_or(0.0);
                let v = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                img.put_pixel((x0 + c) as u32, (y0 + r) as u32, Luma([v]));
            }
        }
    }
    img.save(path)
        .with_context(|| format!("{}: cannot write image", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_has_the_expected_size_and_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.png");
        let white = vec![1.0; 4];
        let black = vec![0.0; 4];
        tiles(&path, &[white, black.clone(), black], 2, 2, 2, 3).unwrap();
        let img = image::open(&path).unwrap().to_luma8();
        // 2 columns of 2·3 px + gaps, 2 rows.
        assert_eq!(img.dimensions(), (2 + 2 * 8, 2 + 2 * 8));
        assert_eq!(img.get_pixel(2, 2).0[0], 255);
        assert_eq!(img.get_pixel(10, 2).0[0], 0);
        assert_eq!(img.get_pixel(0, 0).0[0], 128);
    }
}
