//! PNG plots (plotters, bitmap backend, with an embedded DejaVu Sans so no system fonts are
//! needed): training curves and 2-D decision regions.

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow};
use plotters::coord::types::RangedCoordf64;
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

/// The chart of every plot here: f64 on both axes, drawn into a PNG.
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draw the series' legend (labels in `font` px) and write the PNG.
fn legend_and_save<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    root: &DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    path: &Path,
    font: u32,
) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", font))
        .draw()
        .map_err(plot_err(path))?;
    root.present().map_err(plot_err(path))?;
    Ok(())
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
    // Epochs and rounds are whole numbers: label only the whole ticks (1, 2, 3, not 2.5).
    let whole_x = series
        .iter()
        .flat_map(|s| s.points.iter())
        .all(|p| p.0.fract() == 0.0);
    let x_tick = |x: &f64| {
        if !whole_x {
            tick(*x)
        } else if (x - x.round()).abs() < 1e-9 {
            format!("{x:.0}")
        } else {
            String::new()
        }
    };
    let x_ticks = if whole_x {
        ((x1 - x0).round() as usize + 1).clamp(2, 10)
    } else {
        10
    };
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_labels(x_ticks)
        .x_label_formatter(&x_tick)
        .y_label_formatter(&|y| tick(*y))
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
    legend_and_save(&mut chart, &root, path, 14)
}

/// A short axis label: up to four decimals, trailing zeros dropped (`-1.4`, not
/// `-1.4000000000000001`); scientific notation for very small or large magnitudes.
fn tick(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) {
        return format!("{x:.2e}");
    }
    let s = format!("{x:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// One line of an error-bar chart: `(x, mean, std)` per point.
pub struct ErrorSeries {
    pub name: String,
    pub points: Vec<(f64, f64, f64)>,
}

/// Means with ± std error bars against x, one line per series (a sweep's headline against
/// the swept value). With `categories`, x is an index into them and the axis shows the names.
pub fn error_bar_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[ErrorSeries],
    categories: Option<&[String]>,
) -> Result<()> {
    ensure_font();
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err(path))?;
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1) = range(pts().map(|p| p.0));
    if categories.is_some() {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    let (y0, y1) = range(pts().flat_map(|p| [p.1 - p.2, p.1 + p.2]));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err(path))?;
    let label = |x: &f64| match categories {
        Some(c) => {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                c.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        }
        None => tick(*x),
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .x_label_formatter(&label);
    if let Some(c) = categories {
        mesh.x_labels(c.len() * 2 + 1);
    }
    mesh.draw().map_err(plot_err(path))?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(plot_err(path))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|&(x, m, sd)| {
                ErrorBar::new_vertical(x, m - sd, m, m + sd, color.filled(), 10)
            }))
            .map_err(plot_err(path))?;
    }
    legend_and_save(&mut chart, &root, path, 14)
}

/// A scatter of 2-D points coloured by class, with a legend (e.g. a VAE's latent codes).
pub fn scatter(
    path: &Path,
    title: &str,
    points: &[(f64, f64, usize)],
    classes: &[String],
) -> Result<()> {
    ensure_font();
    // The legend has a column of its own, right of the plot, so it never covers a cluster.
    let legend_width = 150;
    let root = BitMapBackend::new(path, (800 + legend_width, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err(path))?;
    let (plot_area, legend_area) = root.split_horizontally(800);
    let (x0, x1) = range(points.iter().map(|p| p.0));
    let (y0, y1) = range(points.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err(path))?;
    chart
        .configure_mesh()
        .x_desc("z₁")
        .y_desc("z₂")
        .x_label_formatter(&|x| tick(*x))
        .y_label_formatter(&|y| tick(*y))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err(path))?;
    // Ten classes need more colours than the palette's eight: hues around the circle.
    let colour = |c: usize| HSLColor(c as f64 / classes.len().max(1) as f64, 0.8, 0.45);
    for (c, name) in classes.iter().enumerate() {
        let pts = points
            .iter()
            .filter(|p| p.2 == c)
            .map(|p| Circle::new((p.0, p.1), 2, colour(c).filled()));
        chart.draw_series(pts).map_err(plot_err(path))?;
        let y = 60 + 24 * c as i32;
        legend_area
            .draw(&Circle::new((12, y), 5, colour(c).filled()))
            .map_err(plot_err(path))?;
        legend_area
            .draw(&Text::new(
                name.clone(),
                (24, y - 7),
                ("sans-serif", 14).into_font(),
            ))
            .map_err(plot_err(path))?;
    }
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
    legend_and_save(&mut chart, &root, path, 14)
}

/// Confusion matrix as a heat map with counts: rows are true classes, columns predictions.
pub fn confusion_matrix(
    path: &Path,
    title: &str,
    classes: &[String],
    counts: &[Vec<usize>],
) -> Result<()> {
    ensure_font();
    let k = classes.len();
    let root = BitMapBackend::new(path, (760, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err(path))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(90)
        .y_label_area_size(110)
        .build_cartesian_2d((0..k).into_segmented(), (0..k).into_segmented())
        .map_err(plot_err(path))?;
    // Segmented axes put each label at the centre of its cell.
    let label = |v: &SegmentValue<usize>, flip: bool| match v {
        SegmentValue::CenterOf(i) if *i < k => classes[if flip { k - 1 - i } else { *i }].clone(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("predicted")
        .y_desc("true")
        .x_labels(k)
        .y_labels(k)
        .x_label_formatter(&|v| label(v, false))
        .y_label_formatter(&|v| label(v, true))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err(path))?;
    let max = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let at = |x: usize, y: usize| (SegmentValue::Exact(x), SegmentValue::Exact(y));
    for (t, row) in counts.iter().enumerate() {
        for (p, &c) in row.iter().enumerate() {
            let y = k - 1 - t;
            let shade = (c as f64 / max).sqrt();
            let color = RGBColor(
                (255.0 - shade * 255.0) as u8,
                (255.0 - shade * 141.0) as u8,
                (255.0 - shade * 77.0) as u8,
            );
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [at(p, y), at(p + 1, y + 1)],
                    color.filled(),
                )))
                .map_err(plot_err(path))?;
            let text_color = if shade > 0.6 { WHITE } else { BLACK };
            let (px, py) = chart.backend_coord(&at(p, y + 1));
            let (qx, qy) = chart.backend_coord(&at(p + 1, y));
            root.draw(&Text::new(
                c.to_string(),
                (
                    (px + qx) / 2 - 4 * c.to_string().len() as i32,
                    (py + qy) / 2 - 7,
                ),
                ("sans-serif", 14).into_font().color(&text_color),
            ))
            .map_err(plot_err(path))?;
        }
    }
    root.present().map_err(plot_err(path))?;
    Ok(())
}

/// A grid of images (intensities in [0, 1]: `height × width` grey values, or `3 × height ×
/// width` red, green and blue planes), each with a caption underneath.
pub fn image_grid(
    path: &Path,
    title: &str,
    images: &[(Vec<f32>, usize, usize, String)],
    columns: usize,
) -> Result<()> {
    ensure_font();
    let cell = 96u32;
    let caption = 22u32;
    let cols = columns.max(1);
    let rows = images.len().div_ceil(cols).max(1);
    let (w, h) = (cols as u32 * cell, 40 + rows as u32 * (cell + caption));
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err(path))?;
    root.draw(&Text::new(
        title.to_string(),
        (10, 10),
        ("sans-serif", 20).into_font(),
    ))
    .map_err(plot_err(path))?;
    for (n, (pixels, height, width, label)) in images.iter().enumerate() {
        let (x0, y0) = (
            (n % cols) as i32 * cell as i32,
            40 + (n / cols) as i32 * (cell + caption) as i32,
        );
        let side = (cell as usize - 8) / (*height).max(*width).max(1);
        let plane = height * width;
        let rgb = pixels.len() >= 3 * plane;
        let byte = |i: usize| (pixels[i].clamp(0.0, 1.0) * 255.0) as u8;
        for r in 0..*height {
            for c in 0..*width {
                let i = r * width + c;
                let colour = if rgb {
                    RGBColor(byte(i), byte(plane + i), byte(2 * plane + i))
                } else {
                    RGBColor(byte(i), byte(i), byte(i))
                };
                let (x, y) = (x0 + 4 + (c * side) as i32, y0 + 4 + (r * side) as i32);
                root.draw(&Rectangle::new(
                    [(x, y), (x + side as i32, y + side as i32)],
                    colour.filled(),
                ))
                .map_err(plot_err(path))?;
            }
        }
        root.draw(&Text::new(
            label.clone(),
            (x0 + 4, y0 + cell as i32 - 2),
            ("sans-serif", 13).into_font(),
        ))
        .map_err(plot_err(path))?;
    }
    root.present().map_err(plot_err(path))?;
    Ok(())
}

/// The words around a grid of images ([`labelled_tiles`]).
#[derive(Debug, Clone, Default)]
pub struct GridText {
    pub title: String,
    /// A label over each column (a conditional GAN's class names).
    pub columns: Vec<String>,
    /// The horizontal axis: its name and a value under each column (a manifold's z₁).
    pub x_axis: Option<(String, Vec<String>)>,
    /// The vertical axis: its name and a value beside each row, top row first (z₂).
    pub y_axis: Option<(String, Vec<String>)>,
}

/// Tile grey images (intensities in [0, 1], each `height × width`, row-major) into a grid of
/// `columns` columns, each image pixel a `zoom × zoom` block, with a title, column labels and
/// axes as `text` asks, and write it as a PNG.
pub fn labelled_tiles(
    path: &Path,
    images: &[Vec<f32>],
    (height, width): (usize, usize),
    columns: usize,
    zoom: usize,
    text: &GridText,
) -> Result<()> {
    ensure_font();
    let cols = columns.max(1);
    let rows = images.len().div_ceil(cols).max(1);
    let (gap, z) = (2i32, zoom.max(1) as i32);
    let (cell_w, cell_h) = (width as i32 * z + gap, height as i32 * z + gap);
    let top = 34 + if text.columns.is_empty() { 0 } else { 20 };
    let left = if text.y_axis.is_some() { 70 } else { 6 };
    let bottom = if text.x_axis.is_some() { 48 } else { 6 };
    let grid_w = cols as i32 * cell_w + gap;
    let title_w = text.title.chars().count() as i32 * 10 + 12;
    let (w, h) = (
        (left + grid_w + 6).max(title_w),
        top + rows as i32 * cell_h + gap + bottom,
    );
    let root = BitMapBackend::new(path, (w as u32, h as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err(path))?;
    root.draw(&Text::new(
        text.title.clone(),
        (6, 8),
        ("sans-serif", 18).into_font(),
    ))
    .map_err(plot_err(path))?;
    root.draw(&Rectangle::new(
        [
            (left, top),
            (left + grid_w, top + rows as i32 * cell_h + gap),
        ],
        RGBColor(128, 128, 128).filled(),
    ))
    .map_err(plot_err(path))?;
    for (n, pixels) in images.iter().enumerate() {
        let (x0, y0) = (
            left + gap + (n % cols) as i32 * cell_w,
            top + gap + (n / cols) as i32 * cell_h,
        );
        for r in 0..height {
            for c in 0..width {
                let v = pixels.get(r * width + c).copied().unwrap_or(0.0);
                let v = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                let (x, y) = (x0 + c as i32 * z, y0 + r as i32 * z);
                root.draw(&Rectangle::new(
                    [(x, y), (x + z, y + z)],
                    RGBColor(v, v, v).filled(),
                ))
                .map_err(plot_err(path))?;
            }
        }
    }
    let centre = |i: usize| left + gap + i as i32 * cell_w + (cell_w - gap) / 2;
    let small = ("sans-serif", 13).into_font();
    let centred = |s: &str| s.chars().count() as i32 * 7 / 2;
    for (i, label) in text.columns.iter().enumerate().take(cols) {
        root.draw(&Text::new(
            label.clone(),
            (centre(i) - centred(label), top - 18),
            small.clone(),
        ))
        .map_err(plot_err(path))?;
    }
    let grid_bottom = top + rows as i32 * cell_h + gap;
    if let Some((name, ticks)) = &text.x_axis {
        for (i, t) in ticks.iter().enumerate().take(cols) {
            root.draw(&Text::new(
                t.clone(),
                (centre(i) - centred(t), grid_bottom + 4),
                small.clone(),
            ))
            .map_err(plot_err(path))?;
        }
        root.draw(&Text::new(
            name.clone(),
            (left + grid_w / 2 - centred(name), grid_bottom + 24),
            ("sans-serif", 15).into_font(),
        ))
        .map_err(plot_err(path))?;
    }
    if let Some((name, ticks)) = &text.y_axis {
        for (i, t) in ticks.iter().enumerate().take(rows) {
            let y = top + gap + i as i32 * cell_h + (cell_h - gap) / 2 - 7;
            root.draw(&Text::new(
                t.clone(),
                (left - 8 - 2 * centred(t), y),
                small.clone(),
            ))
            .map_err(plot_err(path))?;
        }
        let middle = top + (rows as i32 * cell_h) / 2 - 8;
        root.draw(&Text::new(
            name.clone(),
            (6, middle),
            ("sans-serif", 15).into_font(),
        ))
        .map_err(plot_err(path))?;
    }
    root.present().map_err(plot_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(-1.4000000000000001), "-1.4");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(0.05), "0.05");
        assert_eq!(tick(-0.0), "0");
        assert_eq!(tick(1e-4), "1.00e-4");
    }

    #[test]
    fn error_bars_with_categories_write_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.png");
        let cats = ["relu".to_string(), "tanh".to_string()];
        error_bar_chart(
            &path,
            "sweep",
            "activation",
            "accuracy",
            &[ErrorSeries {
                name: "lr 0.1".into(),
                points: vec![(0.0, 0.9, 0.01), (1.0, 0.8, 0.05)],
            }],
            Some(&cats),
        )
        .unwrap();
        assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
    }

    /// The latent map's legend sits right of the plot (x ≥ 800), where no point can be: the PNG
    /// is 950 pixels wide and the legend's swatches are drawn there.
    #[test]
    fn scatter_keeps_its_legend_beside_the_points() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latent.png");
        let points: Vec<(f64, f64, usize)> = (0..200)
            .map(|i| ((i % 17) as f64, (i % 13) as f64, i % 3))
            .collect();
        let classes: Vec<String> = ["T-shirt", "Trouser", "Bag"].map(String::from).to_vec();
        scatter(&path, "latent codes", &points, &classes).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((width, height), (950, 700));
    }

    /// Column labels and axes make room for themselves: the grid's top-left image pixel moves
    /// down and right, and the picture grows by the margins.
    #[test]
    fn labelled_tiles_leave_room_for_their_words() {
        let dir = tempfile::tempdir().unwrap();
        let white = vec![vec![1.0f32; 4]; 4];
        let plain = dir.path().join("plain.png");
        let words = dir.path().join("words.png");
        let title = GridText {
            title: "t".into(),
            ..GridText::default()
        };
        labelled_tiles(&plain, &white, (2, 2), 2, 3, &title).unwrap();
        let text = GridText {
            title: "t".into(),
            columns: vec!["a".into(), "b".into()],
            x_axis: Some(("z1".into(), vec!["-1".into(), "1".into()])),
            y_axis: Some(("z2".into(), vec!["1".into(), "-1".into()])),
        };
        labelled_tiles(&words, &white, (2, 2), 2, 3, &text).unwrap();
        let (a, b) = (
            image::open(&plain).unwrap().to_rgb8(),
            image::open(&words).unwrap().to_rgb8(),
        );
        assert!(
            b.height() == a.height() + 20 + 42,
            "{:?} {:?}",
            a.dimensions(),
            b.dimensions()
        );
        // The first image's top-left pixel: white, at (6 + 2, 34 + 2) plain, (70 + 2, 54 + 2) with words.
        assert_eq!(a.get_pixel(8, 36).0, [255, 255, 255]);
        assert_eq!(b.get_pixel(72, 56).0, [255, 255, 255]);
        assert_eq!(
            b.get_pixel(8, 40).0,
            [255, 255, 255],
            "the margin left of the grid is blank"
        );
    }

    /// Each chart kind writes its own PNG file (three paths, three decodable images).
    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let (curve, matrix, grid) = (
            dir.path().join("loss.png"),
            dir.path().join("confusion.png"),
            dir.path().join("grid.png"),
        );
        line_chart(
            &curve,
            "loss",
            "epoch",
            "loss",
            &[Series {
                name: "train",
                points: vec![(1.0, 2.0), (2.0, 1.0), (3.0, f64::NAN)],
            }],
        )
        .unwrap();
        let classes: Vec<String> = ["a", "b"].map(String::from).to_vec();
        confusion_matrix(&matrix, "c", &classes, &[vec![3, 1], vec![0, 4]]).unwrap();
        image_grid(
            &grid,
            "g",
            &[(vec![0.0, 1.0, 0.5, 0.2], 2, 2, "a→b".into())],
            4,
        )
        .unwrap();
        let bytes: Vec<Vec<u8>> = [&curve, &matrix, &grid]
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        for b in &bytes {
            assert_eq!(&b[1..4], b"PNG");
        }
        assert!(bytes[0] != bytes[1] && bytes[1] != bytes[2]);
    }
}
