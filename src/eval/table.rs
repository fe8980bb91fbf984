//! The paper's table (Jin et al. 2023, supplementary Table 1): a row per (size, mode) with FID,
//! CLIP score, GPU memory and time per image, as Markdown, CSV or JSON.

use serde::Serialize;

/// The output formats of `sdscale eval --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Md,
    Csv,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub width: usize,
    pub height: usize,
    pub mode: String,
    pub images: usize,
    pub fid: Option<f64>,
    pub clip_score: Option<f64>,
    /// Largest `peak_device_mib` of the row's images; None when every one ran on the CPU.
    pub gpu_mib: Option<f64>,
    pub seconds_per_image: Option<f64>,
}

/// The order the modes are listed in; modes sdscale does not know come after, alphabetically.
const MODE_ORDER: [&str; 4] = ["default", "entropy", "resize", "multidiffusion"];

/// Sorts rows by pixel count, then width, then mode (in `MODE_ORDER`).
pub fn sort(rows: &mut [Row]) {
    // A row of a run that mixes samplers is "mode · sampler": ranked by its mode.
    let mode_rank = |row: &str| {
        let mode = row.split(" · ").next().unwrap_or(row);
        MODE_ORDER.iter().position(|m| *m == mode).unwrap_or(MODE_ORDER.len())
    };
    rows.sort_by(|a, b| {
        (a.width * a.height, a.width, a.height, mode_rank(&a.mode), &a.mode).cmp(&(
            b.width * b.height,
            b.width,
            b.height,
            mode_rank(&b.mode),
            &b.mode,
        ))
    });
}

/// A finished table: rows plus the notes that say what was skipped or compared against.
#[derive(Debug, Serialize)]
pub struct Table {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

const DASH: &str = "–";

fn fixed(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| DASH.to_string(), |v| format!("{v:.decimals$}"))
}

fn plain(value: Option<f64>) -> String {
    value.map_or_else(String::new, |v| v.to_string())
}

impl Table {
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Md => self.markdown(),
            Format::Csv => self.csv(),
            Format::Json => serde_json::to_string_pretty(self).expect("a table serialises") + "\n",
        }
    }

    fn markdown(&self) -> String {
        let mut out = String::from("| size | mode | images | FID | CLIP score | GPU MiB | s/image |\n");
        out += "|---|---|---:|---:|---:|---:|---:|\n";
        for row in &self.rows {
            out += &format!(
                "| {}×{} | {} | {} | {} | {} | {} | {} |\n",
                row.width,
                row.height,
                row.mode,
                row.images,
                fixed(row.fid, 2),
                fixed(row.clip_score, 2),
                fixed(row.gpu_mib, 0),
                fixed(row.seconds_per_image, 2)
            );
        }
        if !self.notes.is_empty() {
            out += "\n";
            for note in &self.notes {
                out += &format!("{note}\n");
            }
        }
        out
    }

    /// Full precision, empty cells for missing values; notes are not part of CSV.
    fn csv(&self) -> String {
        let mut out = String::from("width,height,mode,images,fid,clip_score,gpu_mib,seconds_per_image\n");
        for row in &self.rows {
            // Modes are plain words; quote anyway in case a future one has a comma.
            out += &format!(
                "{},{},\"{}\",{},{},{},{},{}\n",
                row.width,
                row.height,
                row.mode.replace('"', "\"\""),
                row.images,
                plain(row.fid),
                plain(row.clip_score),
                plain(row.gpu_mib),
                plain(row.seconds_per_image)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(width: usize, height: usize, mode: &str) -> Row {
        Row {
            width,
            height,
            mode: mode.into(),
            images: 1,
            fid: None,
            clip_score: None,
            gpu_mib: None,
            seconds_per_image: None,
        }
    }

    #[test]
    fn rows_sort_by_size_then_the_mode_order() {
        let mut rows = vec![
            row(512, 512, "default"),
            row(224, 224, "multidiffusion"),
            row(224, 224, "zeta"),
            row(224, 224, "default"),
            row(224, 224, "resize"),
            row(224, 224, "entropy"),
        ];
        sort(&mut rows);
        let order: Vec<_> = rows.iter().map(|r| format!("{}:{}", r.width, r.mode)).collect();
        assert_eq!(
            order,
            ["224:default", "224:entropy", "224:resize", "224:multidiffusion", "224:zeta", "512:default"]
        );
    }

    #[test]
    fn missing_values_show_as_dashes_in_markdown_and_empty_in_csv() {
        let mut full = row(224, 224, "entropy");
        (full.fid, full.clip_score, full.gpu_mib, full.seconds_per_image) =
            (Some(12.345), Some(31.0), Some(4312.5), Some(2.5));
        let table = Table { rows: vec![full, row(512, 512, "default")], notes: vec!["FID: skipped".into()] };
        let md = table.render(Format::Md);
        assert!(md.contains("| 224×224 | entropy | 1 | 12.35 | 31.00 | 4312 | 2.50 |"), "{md}");
        assert!(md.contains("| 512×512 | default | 1 | – | – | – | – |"), "{md}");
        assert!(md.ends_with("FID: skipped\n"), "{md}");
        let csv = table.render(Format::Csv);
        assert!(csv.contains("\n512,512,\"default\",1,,,,\n"), "{csv}");
        let json: serde_json::Value = serde_json::from_str(&table.render(Format::Json)).unwrap();
        assert_eq!(json["rows"][0]["fid"], 12.345);
        assert!(json["rows"][1]["fid"].is_null());
    }
}
