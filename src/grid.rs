//! The `compare` grid: a column per mode, a row per seed, a header band naming each mode and a left
//! band naming each seed. Text is rendered from a shipped font (DejaVu Sans Mono, Bitstream Vera
//! licence: assets/fonts/LICENSE-DejaVu.txt) with ab_glyph's anti-aliased rasteriser.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};

static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([24, 24, 24]);
/// Space between cells and around the grid, pixels.
pub const GAP: u32 = 4;
/// Padding around labels, pixels.
const PAD: u32 = 6;
/// Label size in pixels, shrunk (down to MIN_TEXT_PX) when a column is too narrow for its mode name.
const TEXT_PX: f32 = 18.0;
const MIN_TEXT_PX: f32 = 9.0;

/// Where everything goes; computed before drawing so metadata and the page can name cell positions.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub cell_width: u32,
    pub cell_height: u32,
    pub columns: usize,
    pub rows: usize,
    /// Width of the left band (seed labels) and height of the header band (mode labels).
    pub left: u32,
    pub top: u32,
    text_px: f32,
}

impl Layout {
    pub fn new(cell_width: u32, cell_height: u32, column_labels: &[String], row_labels: &[String]) -> Self {
        let font = font();
        let widest_column = column_labels.iter().map(|l| text_width(&font, l, TEXT_PX)).fold(0.0, f32::max);
        let room = cell_width.saturating_sub(2) as f32;
        let text_px =
            if widest_column > room { (TEXT_PX * room / widest_column).max(MIN_TEXT_PX).floor() } else { TEXT_PX };
        let widest_row = row_labels.iter().map(|l| text_width(&font, l, text_px)).fold(0.0, f32::max);
        let line_height = font.as_scaled(PxScale::from(text_px)).height();
        Layout {
            cell_width,
            cell_height,
            columns: column_labels.len(),
            rows: row_labels.len(),
            left: widest_row.ceil() as u32 + 2 * PAD,
            top: line_height.ceil() as u32 + 2 * PAD,
            text_px,
        }
    }

    /// Top-left corner of the cell in `row`, `column`.
    pub fn cell(&self, row: usize, column: usize) -> (u32, u32) {
        (self.left + column as u32 * (self.cell_width + GAP), self.top + row as u32 * (self.cell_height + GAP))
    }

    pub fn size(&self) -> (u32, u32) {
        let (x, y) = self.cell(self.rows, self.columns);
        (x, y) // one GAP past the last cell on the right and at the bottom: the margin
    }
}

/// Draws the grid: `cells[row][column]` must all be `layout.cell_width` × `layout.cell_height`.
pub fn draw(layout: &Layout, column_labels: &[String], row_labels: &[String], cells: &[Vec<RgbImage>]) -> RgbImage {
    let (width, height) = layout.size();
    let mut grid = RgbImage::from_pixel(width, height, BACKGROUND);
    let font = font();
    let scale = PxScale::from(layout.text_px);
    for (column, label) in column_labels.iter().enumerate() {
        let (x, _) = layout.cell(0, column);
        let text_x = x as f32 + (layout.cell_width as f32 - text_width(&font, label, layout.text_px)) / 2.0;
        draw_text(&mut grid, &font, scale, label, text_x.max(x as f32), PAD as f32);
    }
    let line_height = font.as_scaled(scale).height();
    for (row, label) in row_labels.iter().enumerate() {
        let (_, y) = layout.cell(row, 0);
        let text_y = y as f32 + (layout.cell_height as f32 - line_height) / 2.0;
        let text_x = layout.left as f32 - PAD as f32 - text_width(&font, label, layout.text_px);
        draw_text(&mut grid, &font, scale, label, text_x, text_y);
    }
    for (row, images) in cells.iter().enumerate() {
        for (column, image) in images.iter().enumerate() {
            let (x, y) = layout.cell(row, column);
            image::imageops::replace(&mut grid, image, x.into(), y.into());
        }
    }
    grid
}

fn font() -> FontRef<'static> {
    FontRef::try_from_slice(FONT_BYTES).expect("the shipped font parses")
}

fn text_width(font: &FontRef, text: &str, px: f32) -> f32 {
    let scaled = font.as_scaled(PxScale::from(px));
    text.chars().map(|c| scaled.h_advance(scaled.glyph_id(c))).sum()
}

/// Draws one line of text with its top-left at (x, y), blending coverage over the background.
fn draw_text(image: &mut RgbImage, font: &FontRef, scale: PxScale, text: &str, x: f32, y: f32) {
    let scaled = font.as_scaled(scale);
    let mut caret = x;
    for c in text.chars() {
        let glyph = scaled.scaled_glyph(c).clone();
        let id = glyph.id;
        let glyph = ab_glyph::Glyph { position: ab_glyph::point(caret, y + scaled.ascent()), ..glyph };
        caret += scaled.h_advance(id);
        let Some(outlined) = font.outline_glyph(glyph) else { continue };
        let bounds = outlined.px_bounds();
        outlined.draw(|gx, gy, coverage| {
            let px = bounds.min.x as i64 + gx as i64;
            let py = bounds.min.y as i64 + gy as i64;
            if px < 0 || py < 0 || px >= image.width() as i64 || py >= image.height() as i64 {
                return;
            }
            let pixel = image.get_pixel_mut(px as u32, py as u32);
            for (channel, ink) in pixel.0.iter_mut().zip(INK.0) {
                *channel = (*channel as f32 * (1.0 - coverage) + ink as f32 * coverage).round() as u8;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_cells_after_the_bands() {
        let modes: Vec<String> = ["default", "entropy"].map(String::from).into();
        let seeds: Vec<String> = ["seed 1", "seed 22", "seed 333"].map(String::from).into();
        let layout = Layout::new(64, 48, &modes, &seeds);
        assert!(layout.left > 0 && layout.top > 0);
        assert_eq!(layout.cell(1, 1), (layout.left + 64 + GAP, layout.top + 48 + GAP));
        assert_eq!(layout.size(), (layout.left + 2 * (64 + GAP), layout.top + 3 * (48 + GAP)));
    }

    #[test]
    fn labels_leave_ink_in_the_bands() {
        let modes = vec!["entropy".to_string()];
        let seeds = vec!["seed 7".to_string()];
        let layout = Layout::new(64, 64, &modes, &seeds);
        let cell = RgbImage::from_pixel(64, 64, Rgb([200, 0, 0]));
        let grid = draw(&layout, &modes, &seeds, &[vec![cell]]);
        let dark = |x0: u32, y0: u32, x1: u32, y1: u32| {
            (y0..y1)
                .flat_map(|y| (x0..x1).map(move |x| (x, y)))
                .filter(|&(x, y)| grid.get_pixel(x, y).0[1] < 100)
                .count()
        };
        assert!(dark(layout.left, 0, grid.width(), layout.top) > 20, "no header text");
        assert!(dark(0, layout.top, layout.left, grid.height()) > 20, "no seed text");
        assert_eq!(*grid.get_pixel(layout.left, layout.top), Rgb([200, 0, 0]));
    }
}
