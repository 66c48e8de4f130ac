//! TensorBoard's event files, written by a handler (`train.tensorboard = true`) and read back.
//!
//! The format: a file `events.out.tfevents.<time>.<host>` of TFRecords — each record is its
//! length (u64, little-endian), the masked CRC-32C of those 8 bytes, the bytes of one `Event`
//! protocol buffer, and their masked CRC-32C. An `Event` is
//! `{ wall_time: double = 1, step: int64 = 2, file_version: string = 3, summary: Summary = 5 }`,
//! a `Summary` a list of `Value { tag: string = 1, simple_value: float = 2, image: Image = 4 }`,
//! an `Image` `{ height = 1, width = 2, colorspace = 3, encoded_image_string: bytes = 4 }`
//! (TensorFlow's `event.proto` and `summary.proto`). The few messages are encoded here by hand.
//!
//! The handler writes every metric of every unit as a scalar (step = the unit) and the
//! pictures a routine draws after a unit as images. On a resume it rewrites the file from the
//! history, so the file never holds a unit twice.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::StopReason;
use super::handlers::{Handler, Started, Stopped, UnitCompleted};
use crate::proto::{Wire, fields, put_bytes, put_f32, put_f64, put_varint_field};
use crate::run::EpochRecord;

/// The folder of the run directory the event files go in.
pub const DIR: &str = "tensorboard";

/// Writes the run's scalars and pictures as TensorBoard events.
#[derive(Default)]
pub struct TensorBoard {
    out: Option<EventWriter>,
}

impl Handler for TensorBoard {
    fn started(&mut self, ev: &Started) -> Result<Option<StopReason>> {
        let dir = ev.run.file(DIR);
        if dir.is_dir() {
            for entry in fs::read_dir(&dir)?.flatten() {
                if entry.file_name().to_string_lossy().contains("tfevents") {
                    fs::remove_file(entry.path())?;
                }
            }
        }
        let mut out = EventWriter::create(&dir)?;
        for r in &ev.state.history {
            out.scalars(r)?;
        }
        out.flush()?;
        self.out = Some(out);
        Ok(None)
    }
    fn unit_completed(
        &mut self,
        ev: &UnitCompleted,
        _: Option<StopReason>,
    ) -> Result<Option<StopReason>> {
        if let (Some(out), Some(r)) = (&mut self.out, ev.state.history.last()) {
            out.scalars(r)?;
            out.flush()?;
        }
        Ok(None)
    }
    fn unit_pictures(&mut self, unit: usize, pictures: &[(String, PathBuf)]) -> Result<()> {
        if let Some(out) = &mut self.out {
            for (tag, path) in pictures {
                out.png(unit as i64, tag, path)?;
            }
            out.flush()?;
        }
        Ok(())
    }
    fn stopped(&mut self, _: &Stopped) -> Result<()> {
        if let Some(out) = &mut self.out {
            out.flush()?;
        }
        Ok(())
    }
}

/// One event file being written.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir`, starting with the file-version event.
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let path = dir.join(format!("events.out.tfevents.{}.kiln", now() as u64));
        let file =
            File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = EventWriter {
            path,
            file: BufWriter::new(file),
        };
        let mut event = Vec::new();
        put_f64(&mut event, 1, now());
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every value of one `metrics.csv` row as a scalar at step = the unit.
    pub fn scalars(&mut self, r: &EpochRecord) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in &r.values {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_f32(&mut value, 2, *v as f32);
            put_bytes(&mut summary, 1, &value);
        }
        self.summary(r.epoch as i64, &summary)
    }

    /// A PNG file as an image summary.
    pub fn png(&mut self, step: i64, tag: &str, path: &Path) -> Result<()> {
        let bytes = fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let Some((w, h, colour)) = png_header(&bytes) else {
            bail!("{}: not a PNG file", path.display());
        };
        let mut image = Vec::new();
        put_varint_field(&mut image, 1, h as u64);
        put_varint_field(&mut image, 2, w as u64);
        put_varint_field(&mut image, 3, colour);
        put_bytes(&mut image, 4, &bytes);
        let mut value = Vec::new();
        put_bytes(&mut value, 1, tag.as_bytes());
        put_bytes(&mut value, 4, &image);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &value);
        self.summary(step, &summary)
    }

    fn summary(&mut self, step: i64, summary: &[u8]) -> Result<()> {
        let mut event = Vec::new();
        put_f64(&mut event, 1, now());
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, summary);
        self.record(&event)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let io = |e| anyhow::anyhow!("{}: cannot write: {e}", self.path.display());
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&buf).map_err(io)
    }

    pub fn flush(&mut self) -> Result<()> {
        let path = self.path.display().to_string();
        self.file
            .flush()
            .map_err(|e| anyhow::anyhow!("{path}: cannot write: {e}"))
    }
}

/// (width, height, TensorBoard colour space: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) of a PNG.
fn png_header(b: &[u8]) -> Option<(u32, u32, u64)> {
    if b.len() < 26 || &b[..8] != b"\x89PNG\r\n\x1a\n" || &b[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(b[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(b[20..24].try_into().ok()?);
    let colour = match b[25] {
        0 => 1,
        4 => 2,
        6 => 4,
        _ => 3,
    };
    Some((w, h, colour))
}

/// TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One event read back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    /// (tag, value)
    pub scalars: Vec<(String, f32)>,
    /// (tag, width, height, PNG bytes)
    pub images: Vec<(String, u32, u32, Vec<u8>)>,
}

/// Read an event file back, checking every record's checksums.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let bad = |what: &str, at: usize| anyhow::anyhow!("{}: {what} at byte {at}", path.display());
    let mut events = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad("truncated record", at))?;
        let len = u64::from_le_bytes(head[..8].try_into()?) as usize;
        if masked_crc(&head[..8]) != u32::from_le_bytes(head[8..12].try_into()?) {
            return Err(bad("length checksum mismatch", at));
        }
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| bad("truncated record", at))?;
        let crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| bad("truncated record", at))?;
        if masked_crc(data) != u32::from_le_bytes(crc.try_into()?) {
            return Err(bad("data checksum mismatch", at));
        }
        events.push(parse_event(data).ok_or_else(|| bad("malformed event", at))?);
        at += 16 + len;
    }
    Ok(events)
}

/// The event files in a run's `tensorboard/` folder.
pub fn event_files(run_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(run_dir.join(DIR))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains("tfevents"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn parse_event(data: &[u8]) -> Option<Event> {
    let mut e = Event::default();
    for (field, w) in fields(data)? {
        match (field, w) {
            (1, Wire::Fixed64(b)) => e.wall_time = f64::from_le_bytes(b),
            (2, Wire::Varint(v)) => e.step = v as i64,
            (3, Wire::Bytes(b)) => e.file_version = Some(String::from_utf8_lossy(b).into_owned()),
            (5, Wire::Bytes(summary)) => {
                for (f, value) in fields(summary)? {
                    let (1, Wire::Bytes(value)) = (f, value) else {
                        continue;
                    };
                    let (mut tag, mut scalar, mut image) = (String::new(), None, None);
                    for (f, w) in fields(value)? {
                        match (f, w) {
                            (1, Wire::Bytes(b)) => tag = String::from_utf8_lossy(b).into_owned(),
                            (2, Wire::Fixed32(b)) => scalar = Some(f32::from_le_bytes(b)),
                            (4, Wire::Bytes(b)) => {
                                let (mut w, mut h, mut png) = (0, 0, Vec::new());
                                for (f, v) in fields(b)? {
                                    match (f, v) {
                                        (1, Wire::Varint(v)) => h = v as u32,
                                        (2, Wire::Varint(v)) => w = v as u32,
                                        (4, Wire::Bytes(b)) => png = b.to_vec(),
                                        _ => {}
                                    }
                                }
                                image = Some((w, h, png));
                            }
                            _ => {}
                        }
                    }
                    if let Some(v) = scalar {
                        e.scalars.push((tag.clone(), v));
                    }
                    if let Some((w, h, png)) = image {
                        e.images.push((tag, w, h, png));
                    }
                }
            }
            _ => {}
        }
    }
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TFRecord's masked CRC of known bytes, as TensorFlow's `crc32c.Mask` computes it.
    #[test]
    fn masked_crc_matches_tensorflow() {
        // crc32c("123456789") = 0xe3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn scalars_and_images_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        let r = EpochRecord {
            epoch: 3,
            values: vec![("train_loss".into(), 0.25), ("lr".into(), 1e-3)],
        };
        w.scalars(&r).unwrap();
        let png = dir.path().join("p.png");
        let img = image::RgbImage::from_pixel(5, 4, image::Rgb([10, 20, 30]));
        img.save(&png).unwrap();
        w.png(3, "samples", &png).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(events[1].step, 3);
        assert_eq!(
            events[1].scalars,
            [("train_loss".to_string(), 0.25), ("lr".to_string(), 1e-3)]
        );
        let (tag, w, h, bytes) = &events[2].images[0];
        assert_eq!((tag.as_str(), *w, *h), ("samples", 5, 4));
        assert_eq!(bytes, &std::fs::read(&png).unwrap());
        // A flipped byte is found.
        let mut damaged = std::fs::read(&path).unwrap();
        let last = damaged.len() - 20;
        damaged[last] ^= 1;
        std::fs::write(&path, damaged).unwrap();
        assert!(
            read_events(&path)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
    }
}
