//! The IDX format of MNIST and Fashion-MNIST (raw or gzip-compressed).
//!
//! A file is a big-endian header — magic `0x0000_08NN` where `08` means unsigned bytes and `NN`
//! is the number of dimensions — then one u32 per dimension, then the bytes, row-major.
//! Images are `idx3` (count × rows × cols), labels `idx1` (count).

use std::io::Read;
use std::path::Path;

use crate::images::ImageSet;
use crate::tabular::DataError;

/// Decoded IDX content: the dimensions and the bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

fn err(path: &Path, message: impl Into<String>) -> DataError {
    DataError {
        file: path.display().to_string(),
        message: message.into(),
    }
}

/// Read a whole file, transparently gunzipping it when it starts with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| err(path, format!("corrupt gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parse IDX bytes with `expected_dims` dimensions of unsigned bytes.
pub fn parse(path: &Path, bytes: &[u8], expected_dims: usize) -> Result<Idx, DataError> {
    if bytes.len() < 4 {
        return Err(err(
            path,
            "not an IDX file: shorter than its 4-byte magic number",
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(err(
            path,
            format!(
                "not an IDX file of unsigned bytes: bad magic {:02x}{:02x}{:02x}{:02x}",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims != expected_dims {
        return Err(err(
            path,
            format!("expected an IDX file with {expected_dims} dimensions, found {ndims}"),
        ));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(err(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let expected: usize = dims.iter().product();
    let body = &bytes[header..];
    if body.len() != expected {
        return Err(err(
            path,
            format!(
                "IDX header promises {} ({} bytes) but the file holds {} bytes{}",
                dims.iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(" × "),
                expected,
                body.len(),
                if body.len() < expected {
                    " (truncated download?)"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(Idx {
        dims,
        data: body.to_vec(),
    })
}

/// Images (`count × rows × cols`) and labels from two IDX files; the counts must agree.
pub fn read_pair(images: &Path, labels: &Path) -> Result<ImageSet, DataError> {
    let img = parse(images, &read_maybe_gz(images)?, 3)?;
    let lab = parse(labels, &read_maybe_gz(labels)?, 1)?;
    if img.dims[0] != lab.dims[0] {
        return Err(err(
            labels,
            format!(
                "{} labels for {} images in {}",
                lab.dims[0],
                img.dims[0],
                images.display()
            ),
        ));
    }
    Ok(ImageSet {
        n: img.dims[0],
        channels: 1,
        height: img.dims[1],
        width: img.dims[2],
        pixels: img.data,
        labels: lab.data,
    })
}

/// Encode IDX bytes (for tests and for tools that write data sets).
pub fn encode(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn p() -> &'static Path {
        Path::new("t.idx")
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let idx = parse(p(), &bytes, 3).unwrap();
        assert_eq!(idx.dims, vec![2, 2, 3]);
        assert_eq!(idx.data[11], 12);
    }

    #[test]
    fn bad_magic_wrong_count_short_read() {
        let mut bytes = encode(&[2], &[1, 2]);
        bytes[2] = 0x0d; // float
        assert!(
            parse(p(), &bytes, 1)
                .unwrap_err()
                .to_string()
                .contains("bad magic")
        );
        let bytes = encode(&[3], &[1, 2]);
        let e = parse(p(), &bytes, 1).unwrap_err().to_string();
        assert!(
            e.contains("promises 3 (3 bytes) but the file holds 2 bytes (truncated"),
            "{e}"
        );
        assert!(
            parse(p(), &[0, 0], 1)
                .unwrap_err()
                .to_string()
                .contains("shorter")
        );
        assert!(
            parse(p(), &encode(&[1], &[1]), 3)
                .unwrap_err()
                .to_string()
                .contains("3 dimensions")
        );
    }

    #[test]
    fn reads_gzip_and_checks_pair_counts() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&encode(&[2, 1, 1], &[7, 9])).unwrap();
        std::fs::write(&img, gz.finish().unwrap()).unwrap();
        let lab = dir.path().join("lab");
        std::fs::write(&lab, encode(&[2], &[0, 1])).unwrap();
        let set = read_pair(&img, &lab).unwrap();
        assert_eq!((set.n, set.height, set.width), (2, 1, 1));
        assert_eq!((set.pixels, set.labels), (vec![7, 9], vec![0, 1]));
        std::fs::write(&lab, encode(&[3], &[0, 1, 2])).unwrap();
        assert!(
            read_pair(&img, &lab)
                .unwrap_err()
                .to_string()
                .contains("3 labels for 2 images")
        );
        std::fs::write(&img, [0x1f, 0x8b, 1, 2, 3]).unwrap();
        assert!(
            read_pair(&img, &lab)
                .unwrap_err()
                .to_string()
                .contains("corrupt gzip")
        );
    }
}
