//! PNG line charts with plotters' bitmap backend. Text goes through ab_glyph
//! (pure Rust) with a TrueType font read at run time from the usual Debian
//! places, so the build needs no fontconfig or freetype. Without a font the
//! runner skips the plots and says so in the report.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Fonts tried in order (fonts-dejavu-core, fonts-liberation, fonts-freefont).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers a sans-serif font for plot text. Returns the font's path, or
/// None when no font was found (then no plot can be drawn).
pub fn init_fonts() -> Option<&'static str> {
    static FONT: OnceLock<Option<&'static str>> = OnceLock::new();
    *FONT.get_or_init(|| {
        let extra = std::env::var("DM_BENCH_FONT").ok();
        let mut paths: Vec<String> = extra.into_iter().collect();
        paths.extend(FONT_PATHS.iter().map(|s| s.to_string()));
        for p in paths {
            if let Ok(bytes) = std::fs::read(&p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Some(Box::leak(p.into_boxed_str()) as &'static str);
                }
            }
        }
        None
    })
}

/// One line of a chart.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// A line chart. With `x_log2`, x values are plotted on a log2 axis and
/// labelled through `x_fmt` with the real value.
pub struct LineChart {
    /// Title above the chart.
    pub title: String,
    /// x axis caption.
    pub x_label: String,
    /// y axis caption.
    pub y_label: String,
    /// Plot x on a log2 scale.
    pub x_log2: bool,
    /// Labels an x value (the real one, not its log).
    pub x_fmt: fn(f64) -> String,
    /// The lines.
    pub series: Vec<Series>,
}

/// Formats a byte count as a short size label (`64K`, `1G`).
pub fn size_label(v: f64) -> String {
    let v = v.round() as u64;
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if v >= 1 << shift {
            let x = v as f64 / (1u64 << shift) as f64;
            return if (x - x.round()).abs() < 0.05 {
                format!("{}{unit}", x.round())
            } else {
                format!("{x:.1}{unit}")
            };
        }
    }
    format!("{v}")
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Draws `charts` in a grid of `cols` columns into one PNG at `path`, each
/// panel `w` x `h` pixels.
pub fn draw(path: &Path, charts: &[LineChart], cols: usize, w: u32, h: u32) -> Result<()> {
    if init_fonts().is_none() {
        return Err(anyhow!("no TrueType font found for plot text"));
    }
    let cols = cols.max(1);
    let rows = charts.len().div_ceil(cols).max(1);
    let root = BitMapBackend::new(path, (w * cols as u32, h * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let panels = root.split_evenly((rows, cols));
    for (chart, area) in charts.iter().zip(panels.iter()) {
        draw_one(area, chart).map_err(|e| anyhow!("plot {}: {e}", chart.title))?;
    }
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

fn draw_one(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    c: &LineChart,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let tx = |x: f64| if c.x_log2 { x.max(1e-12).log2() } else { x };
    let pts = || c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(tx(p.0)), b.max(tx(p.0)))
    });
    let mut y1 = pts().fold(0f64, |a, p| a.max(p.1));
    if x0 >= x1 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let pad = (x1 - x0) * 0.04;
    let mut chart = ChartBuilder::on(area)
        .caption(&c.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0 - pad)..(x1 + pad), 0f64..y1 * 1.3)?;
    let log2 = c.x_log2;
    let fmt = c.x_fmt;
    let x_fmt = move |v: &f64| if log2 { fmt(2f64.powf(*v)) } else { fmt(*v) };
    let n_x = if log2 {
        ((x1 - x0).round() as usize + 1).min(12)
    } else {
        8
    };
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .x_labels(n_x)
        .x_label_formatter(&x_fmt)
        .label_style(("sans-serif", 13))
        .light_line_style(WHITE)
        .draw()?;
    for (i, s) in c.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let data: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (tx(x), y)).collect();
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(data.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(size_label(65536.0), "64K");
        assert_eq!(size_label((1u64 << 30) as f64), "1G");
        assert_eq!(size_label(1.5 * (1u64 << 20) as f64), "1.5M");
    }

    #[test]
    fn draws_a_png_when_a_font_is_present() {
        if init_fonts().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.png");
        let chart = LineChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_log2: true,
            x_fmt: size_label,
            series: vec![Series {
                label: "a".into(),
                points: vec![(4096.0, 1.0), (65536.0, 2.0)],
            }],
        };
        draw(&p, &[chart], 1, 400, 300).unwrap();
        assert!(std::fs::metadata(&p).unwrap().len() > 1000);
    }
}
