//! Your own images: `dataset = "folder:DIR"`, the layout of torchvision's `ImageFolder` and
//! Keras' `image_dataset_from_directory` — one sub-folder per class, named after it, holding
//! PNG or JPEG files of any size:
//!
//! ```text
//! DIR/cat/001.png  DIR/cat/002.jpg  …  DIR/dog/…
//! ```
//!
//! or, with a test set of your own, `DIR/train/<class>/…` and `DIR/test/<class>/…`. Every image
//! is resized to 28×28 (the size of the networks' MNIST configs; [`Sizing`] chooses another, or
//! none) and kept as bytes (scale 255): grey when every file is stored grey, else RGB — three
//! channels, grey files repeated in each (torchvision's `ImageFolder` reads everything as RGB;
//! Keras' `color_mode` chooses). Without a `test/` folder, every fifth image of each class (in file-name
//! order) is the test set — the same split every run. The training images are dealt in a fixed
//! shuffled order, so the validation part (the last share of the training split) holds every
//! class.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::images::{ImageData, ImageSet};

/// The side images are resized to.
pub const SIDE: usize = 28;

/// The prefix of a folder data set's config name.
pub const PREFIX: &str = "folder:";

/// The folder of a `folder:DIR` config name.
pub fn dir_of(dataset: &str) -> Option<&Path> {
    dataset.strip_prefix(PREFIX).map(Path::new)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the image folder", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    Ok(v)
}

/// The classes of a folder (its sub-folders, sorted) and each one's image files.
fn classes_in(dir: &Path, at_least: usize) -> Result<Vec<(String, Vec<PathBuf>)>> {
    if !dir.is_dir() {
        bail!("{}: dataset: no such image folder", dir.display());
    }
    let mut classes = Vec::new();
    for sub in sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()) {
        let files: Vec<PathBuf> = sorted_entries(&sub)?
            .into_iter()
            .filter(|p| is_image(p))
            .collect();
        if files.is_empty() {
            bail!("{}: class folder with no PNG or JPEG images", sub.display());
        }
        let name = sub
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        classes.push((name, files));
    }
    if classes.len() < at_least {
        bail!(
            "{}: dataset: an image folder needs one sub-folder per class, at least {at_least} (found {})",
            dir.display(),
            classes.len()
        );
    }
    if classes.len() > 256 {
        bail!(
            "{}: dataset: {} classes, at most 256",
            dir.display(),
            classes.len()
        );
    }
    Ok(classes)
}

/// `(train, test)` class lists: `DIR/train` and `DIR/test` when both exist, else `DIR` itself.
fn split_dirs(dir: &Path) -> (PathBuf, Option<PathBuf>) {
    let (train, test) = (dir.join("train"), dir.join("test"));
    if train.is_dir() && test.is_dir() {
        (train, Some(test))
    } else {
        (dir.to_path_buf(), None)
    }
}

/// The size folder images take: resized to `height × width` (default 28×28, the networks'
/// MNIST size), or kept as stored (`params.resize = false`: every image must have one size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizing {
    Resize { height: usize, width: usize },
    Keep,
}

impl Default for Sizing {
    fn default() -> Self {
        Sizing::Resize {
            height: SIDE,
            width: SIDE,
        }
    }
}

/// `(channels, height, width, classes)` of a folder data set, reading only the files' headers.
pub fn shape(dir: &Path, sizing: Sizing) -> Result<(usize, usize, usize, usize)> {
    let (train, test) = split_dirs(dir);
    let classes = classes_in(&train, 2)?;
    let k = classes.len();
    let mut files: Vec<PathBuf> = classes.into_iter().flat_map(|(_, f)| f).collect();
    if let Some(t) = test {
        files.extend(classes_in(&t, 1)?.into_iter().flat_map(|(_, f)| f));
    }
    let (c, h, w) = layout(&files, sizing)?;
    Ok((c, h, w, k))
}

/// `(channels, height, width)` of a set of files from their headers: 3 channels when any is
/// stored in colour, else 1; the size `sizing` asks for, or the one size they all share.
fn layout<'a>(
    files: impl IntoIterator<Item = &'a PathBuf>,
    sizing: Sizing,
) -> Result<(usize, usize, usize)> {
    let mut channels = 1;
    let mut first: Option<(&Path, (u32, u32))> = None;
    for f in files {
        let (colour, (w, h)) = header(f)?;
        if colour {
            channels = 3;
        }
        if sizing == Sizing::Keep {
            match first {
                None => first = Some((f, (w, h))),
                Some((p, (w0, h0))) if (w, h) != (w0, h0) => bail!(
                    "{}: {w}×{h} pixels, but {} is {w0}×{h0}; with params.resize = false every image needs the same size",
                    f.display(),
                    p.display()
                ),
                Some(_) => {}
            }
        }
    }
    Ok(match (sizing, first) {
        (Sizing::Resize { height, width }, _) => (channels, height, width),
        (Sizing::Keep, Some((_, (w, h)))) => (channels, h as usize, w as usize),
        (Sizing::Keep, None) => (channels, SIDE, SIDE),
    })
}

/// Whether an image file is stored in colour, and its (width, height), from its header.
fn header(path: &Path) -> Result<(bool, (u32, u32))> {
    let decoder = image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .into_decoder()
        .map_err(|e| anyhow::anyhow!("{}: cannot read image: {e}", path.display()))?;
    Ok((
        image::ImageDecoder::color_type(&decoder).has_color(),
        image::ImageDecoder::dimensions(&decoder),
    ))
}

/// One image file at `height × width`: grey bytes, or (`channels` = 3) its red, green and blue
/// planes one after the other.
fn read(path: &Path, (channels, height, width): (usize, usize, usize)) -> Result<Vec<u8>> {
    let img = image::open(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read image: {e}", path.display()))?;
    let (w, h) = (width as u32, height as u32);
    let filter = image::imageops::FilterType::Triangle;
    if channels == 1 {
        return Ok(image::imageops::resize(&img.to_luma8(), w, h, filter).into_raw());
    }
    let rgb = image::imageops::resize(&img.to_rgb8(), w, h, filter).into_raw();
    Ok((0..3)
        .flat_map(|c| rgb.iter().skip(c).step_by(3).copied())
        .collect())
}

fn set(items: &[(PathBuf, u8)], (c, h, w): (usize, usize, usize)) -> Result<ImageSet> {
    let mut pixels = Vec::with_capacity(items.len() * c * h * w);
    for (path, _) in items {
        pixels.extend(read(path, (c, h, w))?);
    }
    Ok(ImageSet {
        n: items.len(),
        channels: c,
        height: h,
        width: w,
        pixels,
        labels: items.iter().map(|(_, l)| *l).collect(),
    })
}

/// Load a folder data set (see the module docs), its images sized as `sizing` says.
pub fn load(dir: &Path, sizing: Sizing) -> Result<ImageData> {
    let (train_dir, test_dir) = split_dirs(dir);
    let classes = classes_in(&train_dir, 2)?;
    let names: Vec<String> = classes.iter().map(|(n, _)| n.clone()).collect();
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (label, (_, files)) in classes.iter().enumerate() {
        for (i, f) in files.iter().enumerate() {
            if test_dir.is_none() && i % 5 == 4 {
                test.push((f.clone(), label as u8));
            } else {
                train.push((f.clone(), label as u8));
            }
        }
    }
    if let Some(t) = &test_dir {
        for (name, files) in classes_in(t, 1)? {
            let Some(label) = names.iter().position(|n| *n == name) else {
                bail!(
                    "{}: a test class the training folder does not have (classes: {})",
                    t.join(&name).display(),
                    names.join(", ")
                );
            };
            test.extend(files.into_iter().map(|f| (f, label as u8)));
        }
    }
    if test.is_empty() {
        bail!(
            "{}: no test images (each class needs at least 5 images, or give DIR/test/)",
            dir.display()
        );
    }
    train.shuffle(&mut StdRng::seed_from_u64(0));
    let layout = layout(train.iter().chain(&test).map(|(f, _)| f), sizing)?;
    Ok(ImageData {
        name: dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        classes: names,
        scale: 255.0,
        train: set(&train, layout)?,
        test: set(&test, layout)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, class: &str, n: usize, shade: u8, size: u32) {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..n {
            let img = image::GrayImage::from_pixel(size, size + i as u32, image::Luma([shade]));
            img.save(dir.join(class).join(format!("{i:03}.png")))
                .unwrap();
        }
    }

    #[test]
    fn classes_from_folder_names_every_fifth_image_is_test() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "light", 10, 220, 40);
        write(tmp.path(), "dark", 5, 20, 12);
        assert_eq!(
            shape(tmp.path(), Sizing::default()).unwrap(),
            (1, 28, 28, 2)
        );
        let d = load(tmp.path(), Sizing::default()).unwrap();
        assert_eq!(d.classes, ["dark", "light"]);
        assert_eq!((d.train.n, d.test.n), (12, 3));
        assert_eq!(d.test.labels, [0, 1, 1]);
        // Resized to 28×28 whatever the size; the shade survives.
        assert_eq!(d.train.pixels.len(), 12 * 28 * 28);
        let i = d.train.labels.iter().position(|&l| l == 0).unwrap();
        assert!(
            d.train.pixels[i * 784..(i + 1) * 784]
                .iter()
                .all(|&p| p == 20)
        );
    }

    #[test]
    fn train_and_test_folders_and_one_line_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(&root.join("train"), "a", 3, 10, 8);
        write(&root.join("train"), "b", 3, 200, 8);
        write(&root.join("test"), "b", 2, 200, 8);
        let d = load(root, Sizing::default()).unwrap();
        assert_eq!(
            (d.train.n, d.test.n, d.test.labels.clone()),
            (6, 2, vec![1, 1])
        );
        write(&root.join("test"), "c", 1, 0, 8);
        assert!(
            load(root, Sizing::default())
                .unwrap_err()
                .to_string()
                .contains("a test class the training folder does not have")
        );

        let empty = root.join("empty");
        write(&empty, "x", 5, 0, 8);
        std::fs::create_dir_all(empty.join("y")).unwrap();
        let e = load(&empty, Sizing::default()).unwrap_err().to_string();
        assert!(
            e.contains("empty/y: class folder with no PNG or JPEG images"),
            "{e}"
        );
        std::fs::write(empty.join("y").join("bad.png"), b"not a png").unwrap();
        let e = load(&empty, Sizing::default()).unwrap_err().to_string();
        assert!(e.contains("bad.png: cannot read image"), "{e}");
        let e = shape(&root.join("nowhere"), Sizing::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nowhere: dataset: no such image folder"), "{e}");
    }

    #[test]
    fn a_colour_file_makes_the_set_rgb_planes_in_channel_order() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "grey", 5, 100, 10);
        std::fs::create_dir_all(root.join("red")).unwrap();
        for i in 0..5 {
            image::RgbImage::from_pixel(12, 9, image::Rgb([250, 10, 40]))
                .save(root.join("red").join(format!("{i}.png")))
                .unwrap();
        }
        assert_eq!(shape(root, Sizing::default()).unwrap(), (3, 28, 28, 2));
        let d = load(root, Sizing::default()).unwrap();
        assert_eq!((d.train.channels, d.test.channels), (3, 3));
        assert_eq!(d.train.pixels_per_image(), 3 * 28 * 28);
        let plane = |i: usize, c: usize| {
            let img = d.train.image(i);
            img[c * 784..(c + 1) * 784].to_vec()
        };
        let red = d.train.labels.iter().position(|&l| l == 1).unwrap();
        for (c, v) in [(0, 250), (1, 10), (2, 40)] {
            assert!(plane(red, c).iter().all(|&p| p == v), "channel {c}");
        }
        // A grey file in a colour set: the same intensities in every channel.
        let grey = d.train.labels.iter().position(|&l| l == 0).unwrap();
        for c in 0..3 {
            assert!(plane(grey, c).iter().all(|&p| p == 100), "channel {c}");
        }
    }

    #[test]
    fn another_size_or_the_stored_one() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "a", 5, 10, 16); // 16×16, 16×17, … (width × height)
        write(root, "b", 5, 200, 16);
        let to = Sizing::Resize {
            height: 12,
            width: 20,
        };
        assert_eq!(shape(root, to).unwrap(), (1, 12, 20, 2));
        let d = load(root, to).unwrap();
        assert_eq!((d.train.height, d.train.width), (12, 20));
        assert_eq!(d.train.pixels.len(), d.train.n * 240);
        // Kept as stored: the sizes differ, so one line names two files and their sizes.
        let e = shape(root, Sizing::Keep).unwrap_err().to_string();
        assert!(
            e.contains("001.png: 16×17 pixels, but") && e.contains("000.png is 16×16"),
            "{e}"
        );
        assert!(load(root, Sizing::Keep).is_err());
        let same = root.join("same");
        for (class, shade) in [("x", 0), ("y", 255)] {
            std::fs::create_dir_all(same.join(class)).unwrap();
            for i in 0..5 {
                image::GrayImage::from_pixel(9, 7, image::Luma([shade]))
                    .save(same.join(class).join(format!("{i}.png")))
                    .unwrap();
            }
        }
        assert_eq!(shape(&same, Sizing::Keep).unwrap(), (1, 7, 9, 2));
        let d = load(&same, Sizing::Keep).unwrap();
        assert_eq!((d.test.height, d.test.width, d.test.n), (7, 9, 2));
    }
}
