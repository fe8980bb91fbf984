//! `sdscale entropy --plot`: measured entropy against log N, one panel per UNet level and denoising
//! point, one line per layer and mode; below each, the same as Ent/log N, where the drift the paper
//! predicts stays visible even when attention is nearly uniform and Ent hugs log N. Drawn with plotters' bitmap backend into memory (the caller
//! writes the PNG atomically); text goes through ab_glyph with a committed font, so the picture is the
//! same on machines without any system fonts.

use super::Measurement;
use crate::mode::Mode;
use anyhow::{anyhow, Context, Result};
use image::RgbImage;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::sync::OnceLock;

/// DejaVu Sans cut down to Latin, Greek and a few math signs (see assets/fonts/README.md).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

const PANEL: (u32, u32) = (440, 360);
const TITLE_HEIGHT: u32 = 56;
const DEFAULT_COLOUR: RGBColor = RGBColor(31, 119, 180);
const ENTROPY_COLOUR: RGBColor = RGBColor(214, 39, 40);

fn colour(mode: Mode) -> RGBColor {
    match mode {
        Mode::Entropy | Mode::HidiffusionEntropy | Mode::DeepshrinkEntropy => ENTROPY_COLOUR,
        // `entropy` measures the two attention scales only; resize and MultiDiffusion render with the
        // default one.
        Mode::Default | Mode::Resize | Mode::Multidiffusion | Mode::Hidiffusion | Mode::Deepshrink => DEFAULT_COLOUR,
    }
}

/// Renders the plot. `title` goes on top (prompt, seed, steps…).
pub fn plot(lines: &[Measurement], title: &str) -> Result<RgbImage> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered = REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    anyhow::ensure!(*registered, "the plot font (assets/fonts/DejaVuSans-subset.ttf) does not parse");

    let mut levels: Vec<usize> = lines.iter().map(|l| l.level).collect();
    levels.sort_unstable();
    levels.dedup();
    let mut ats: Vec<f64> = Vec::new();
    for line in lines {
        if !ats.contains(&line.at) {
            ats.push(line.at);
        }
    }
    anyhow::ensure!(!levels.is_empty(), "nothing was measured, so there is nothing to plot");
    let width = PANEL.0 * levels.len() as u32;
    let height = TITLE_HEIGHT + PANEL.1 * 2 * ats.len() as u32;
    let mut buffer = vec![0u8; (width * height * 3) as usize];
    draw(&mut buffer, (width, height), lines, &levels, &ats, title).map_err(|e| anyhow!("drawing the plot: {e}"))?;
    RgbImage::from_raw(width, height, buffer).context("plot buffer has an unexpected size")
}

fn draw(
    buffer: &mut [u8],
    size: (u32, u32),
    lines: &[Measurement],
    levels: &[usize],
    ats: &[f64],
    title: &str,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buffer, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(TITLE_HEIGHT);
    header.draw_text(title, &(FAMILY, 20).into_font().color(&BLACK), (12, 8))?;
    let legend = "blue: default 1/√d   red: entropy √(log_T N / d)   grey: Ent = log N (uniform)   dashed: log T";
    header.draw_text(legend, &(FAMILY, 15).into_font().color(&BLACK), (12, 34))?;

    // Rows: for each denoising point, entropy then normalised entropy; columns: levels.
    let panels = body.split_evenly((2 * ats.len(), levels.len()));
    for (index, panel) in panels.iter().enumerate() {
        let row = index / levels.len();
        let (at, normalized) = (ats[row / 2], row % 2 == 1);
        let level = levels[index % levels.len()];
        let value = |line: &Measurement| if normalized { line.normalized() } else { Some(line.entropy) };
        let here: Vec<&Measurement> = lines.iter().filter(|l| l.at == at && l.level == level).collect();
        if here.is_empty() {
            continue;
        }
        let t = here[0].t;
        let log_t = (t as f64).ln();
        let (mut x0, mut x1) = (log_t, log_t);
        let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
        for line in &here {
            x0 = x0.min(line.log_n());
            x1 = x1.max(line.log_n());
            if let Some(y) = value(line) {
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
            if !normalized {
                y1 = y1.max(line.log_n());
            }
        }
        if !y0.is_finite() {
            continue;
        }
        let pad_x = ((x1 - x0) * 0.08).max(0.1);
        let pad_y = ((y1 - y0) * 0.08).max(if normalized { 0.002 } else { 0.1 });
        let (x0, x1, y0, y1) = (x0 - pad_x, x1 + pad_x, (y0 - pad_y).max(0.0), y1 + pad_y);
        let (caption, y_desc) = if normalized {
            (format!("level {level}: Ent / log N, at {at}"), "Ent / log N")
        } else {
            (format!("level {level} (T = {t}): Ent, at {at}"), "entropy (nats)")
        };

        let mut chart = ChartBuilder::on(panel)
            .caption(caption, (FAMILY, 16))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("log N")
            .y_desc(y_desc)
            .label_style((FAMILY, 12))
            .axis_desc_style((FAMILY, 13))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        let grey = RGBColor(150, 150, 150);
        if !normalized {
            chart.draw_series(LineSeries::new([(x0, x0), (x1, x1)], grey.stroke_width(1)))?;
        }
        chart.draw_series(DashedLineSeries::new([(log_t, y0), (log_t, y1)], 5, 4, grey.stroke_width(1)))?;

        let mut layers: Vec<&str> = Vec::new();
        for line in &here {
            if !layers.contains(&line.layer.as_str()) {
                layers.push(&line.layer);
            }
        }
        for layer in layers {
            for mode in [Mode::Default, Mode::Entropy] {
                let mut points: Vec<(f64, f64)> = here
                    .iter()
                    .filter(|l| l.layer == layer && l.mode == mode)
                    .filter_map(|l| Some((l.log_n(), value(l)?)))
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                let style = colour(mode).mix(0.75).stroke_width(1);
                chart.draw_series(LineSeries::new(points.iter().copied(), style))?;
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 2, colour(mode).filled())))?;
            }
        }
    }
    root.present()?;
    Ok(())
}
