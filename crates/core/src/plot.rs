//! PNG plots (plotters, bitmap backend, with an embedded DejaVu Sans so no system fonts are
//! needed): training curves and 2-D decision regions.

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn ensure_font() {
    REGISTER.call_once(|| {
        // The font is compiled in; failure here would be a broken build, not bad input.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Colours for series and classes, colour-blind friendly (Okabe–Ito).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
];

/// Maps 2-D points to class indices (for decision regions).
pub type Classifier<'a> = dyn Fn(&[(f64, f64)]) -> Vec<usize> + 'a;

pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

fn plot_err<E: std::fmt::Debug>(path: &Path) -> impl FnOnce(E) -> anyhow::Error + '_ {
    move |e| anyhow!("{}: cannot draw plot: {e:?}", path.display())
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

/// A line chart of one or more series (e.g. train and validation loss per epoch).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    ensure_font();
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err(path))?;
    let (x0, x1) = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let (y0, y1) = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err(path))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err(path))?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(plot_err(path))?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(plot_err(path))?;
    root.present().map_err(plot_err(path))?;
    Ok(())
}

/// Decision regions of a 2-feature classifier: the background of each grid cell is coloured
/// by `classify(x, y)`, and the labelled points are drawn on top.
pub fn decision_regions(
    path: &Path,
    title: &str,
    labels: (&str, &str),
    classify: &Classifier,
    points: &[(f64, f64, usize)],
    class_names: &[String],
) -> Result<()> {
    ensure_font();
    let root = BitMapBackend::new(path, (800, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err(path))?;
    let (x0, x1) = range(points.iter().map(|p| p.0));
    let (y0, y1) = range(points.iter().map(|p| p.1));
    let (x0, x1, y0, y1) = (x0 - 0.3, x1 + 0.3, y0 - 0.3, y1 + 0.3);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err(path))?;
    chart
        .configure_mesh()
        .x_desc(labels.0)
        .y_desc(labels.1)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err(path))?;

    const N: usize = 150;
    let (dx, dy) = ((x1 - x0) / N as f64, (y1 - y0) / N as f64);
    let centres: Vec<(f64, f64)> = (0..N * N)
        .map(|k| {
            (
                x0 + (k % N) as f64 * dx + dx / 2.0,
                y0 + (k / N) as f64 * dy + dy / 2.0,
            )
        })
        .collect();
    let classes = classify(&centres);
    chart
        .draw_series(centres.iter().zip(&classes).map(|(&(cx, cy), &c)| {
            let color = PALETTE[c % PALETTE.len()].mix(0.25);
            Rectangle::new(
                [
                    (cx - dx / 2.0, cy - dy / 2.0),
                    (cx + dx / 2.0, cy + dy / 2.0),
                ],
                color.filled(),
            )
        }))
        .map_err(plot_err(path))?;
    for (c, name) in class_names.iter().enumerate() {
        let color = PALETTE[c % PALETTE.len()];
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|p| p.2 == c)
                    .map(|p| Circle::new((p.0, p.1), 4, color.filled())),
            )
            .map_err(plot_err(path))?
            .label(name.as_str())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(plot_err(path))?;
    root.present().map_err(plot_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        line_chart(
            &path,
            "loss",
            "epoch",
            "loss",
            &[Series {
                name: "train",
                points: vec![(1.0, 2.0), (2.0, 1.0), (3.0, f64::NAN)],
            }],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
