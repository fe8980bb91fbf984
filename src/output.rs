//! Every file the tool writes goes through here: PNGs with their generation parameters (and the
//! compare page), written to a temporary file in the target folder and moved into place, so a `.png`
//! on disk is always complete and an existing file is never replaced unless the user said
//! `--overwrite`. Output-name templates (`out/{index:04}-{seed}.png`) live here too.

use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The temporary file being written right now, so a second Ctrl-C (which exits at once) can still
/// remove it.
static CURRENT_TEMP: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Removes the temporary file being written, if any (called from the signal handler before exiting).
pub fn remove_current_temp() {
    if let Ok(mut current) = CURRENT_TEMP.try_lock() {
        if let Some(temp) = current.take() {
            let _ = fs::remove_file(temp);
        }
    }
}

/// Refuses, before any work is done, an output that exists (without `overwrite`) or a folder that
/// cannot be written; creates missing parent folders.
pub fn check_output(path: &Path, overwrite: bool) -> Result<()> {
    if path.is_dir() {
        bail!("output {} is a folder; pass a file name ending in .png", path.display());
    }
    if path.exists() && !overwrite {
        bail!("output {} already exists; pass --overwrite to replace it, or choose another -o", path.display());
    }
    let folder = parent_folder(path);
    fs::create_dir_all(&folder).with_context(|| format!("cannot create output folder {}", folder.display()))?;
    // Probe with a real temporary file: permissions, read-only mounts and full disks all show up here.
    let probe = temp_path(path);
    File::create(&probe).with_context(|| format!("cannot write to output folder {}", folder.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Writes `image` as a PNG with text chunks (`keyword`, `text`), atomically.
pub fn write_png(path: &Path, image: &RgbImage, text_chunks: &[(&str, String)], overwrite: bool) -> Result<()> {
    write_atomically(path, overwrite, |writer| {
        let mut encoder = png::Encoder::new(writer, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (keyword, text) in text_chunks {
            // tEXt (what AUTOMATIC1111 and most browsers read) when the text is Latin-1, as PIL does;
            // iTXt otherwise, which carries UTF-8 prompts intact.
            if text.chars().all(|c| (c as u32) < 0x100) {
                encoder.add_text_chunk(keyword.to_string(), text.clone())?;
            } else {
                encoder.add_itxt_chunk(keyword.to_string(), text.clone())?;
            }
        }
        let mut png_writer = encoder.write_header()?;
        png_writer.write_image_data(image.as_raw())?;
        png_writer.finish()?;
        Ok(())
    })
}

/// Writes a text file (the compare page) atomically.
pub fn write_text(path: &Path, text: &str, overwrite: bool) -> Result<()> {
    write_atomically(path, overwrite, |writer| Ok(writer.write_all(text.as_bytes())?))
}

/// Temp file beside `path` → `fill` → fsync → publish; the temp file never outlives a failure.
fn write_atomically(path: &Path, overwrite: bool, fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let temp = temp_path(path);
    if let Ok(mut current) = CURRENT_TEMP.lock() {
        *current = Some(temp.clone());
    }
    let result = write_file(&temp, fill).and_then(|()| publish(&temp, path, overwrite));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    if let Ok(mut current) = CURRENT_TEMP.lock() {
        *current = None;
    }
    result
}

fn write_file(temp: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let file = File::create(temp).with_context(|| format!("cannot create {}", temp.display()))?;
    let mut writer = BufWriter::new(file);
    fill(&mut writer).with_context(|| format!("writing {}", temp.display()))?;
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all().with_context(|| format!("writing {}", temp.display()))?;
    Ok(())
}

/// Moves the finished temporary file into place. Without `overwrite`, a hard link makes "create only if
/// absent" atomic even if another process raced us to the name.
fn publish(temp: &Path, path: &Path, overwrite: bool) -> Result<()> {
    if overwrite {
        return fs::rename(temp, path).with_context(|| format!("cannot move the image into {}", path.display()));
    }
    match fs::hard_link(temp, path) {
        Ok(()) => {
            fs::remove_file(temp).ok();
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("output {} appeared while generating; not overwriting it (pass --overwrite)", path.display())
        }
        // Filesystems without hard links: fall back to check-then-rename.
        Err(_) if !path.exists() => {
            fs::rename(temp, path).with_context(|| format!("cannot move the image into {}", path.display()))
        }
        Err(err) => Err(err).with_context(|| format!("cannot write {}", path.display())),
    }
}

fn parent_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `.NAME.PID.tmp` beside the target: hidden, and never ending in `.png`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent_folder(path).join(format!(".{name}.{}.tmp", std::process::id()))
}

/// A file-name-safe slug of a prompt: lowercase ASCII words joined by '-', at most `max_len` bytes.
pub fn slug(prompt: &str, max_len: usize) -> String {
    let mut slug = String::new();
    for word in prompt.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()) {
        let word = word.to_ascii_lowercase();
        let extra = if slug.is_empty() { word.len() } else { word.len() + 1 };
        if slug.len() + extra > max_len {
            if slug.is_empty() {
                slug.push_str(&word[..max_len]);
            }
            break;
        }
        if !slug.is_empty() {
            slug.push('-');
        }
        slug.push_str(&word);
    }
    if slug.is_empty() {
        slug.push_str("image");
    }
    slug
}

/// Refuses a file name that does not end in `.png` (any case): the one rule for `-o`, `-o` templates and
/// `--plot`. `flag` names the option the name came from (a template's caller adds it itself).
pub fn check_png_name(flag: Option<&str>, path: &Path) -> Result<()> {
    // `out.png/` has the extension too, but names a folder (found by tests/fuzz.rs).
    let folder = path.as_os_str().to_string_lossy().ends_with('/');
    if !folder && path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        return Ok(());
    }
    match flag {
        Some(flag) => bail!("{flag} {}: the output must be a .png file", path.display()),
        None => bail!("the output must be a .png file"),
    }
}

/// The longest `{prompt}` slug: file names stay well under the usual 255-byte limit.
pub const SLUG_LEN: usize = 60;

/// An output name with placeholders: `{index}`, `{seed}`, `{mode}`, `{width}`, `{height}`,
/// `{prompt}`, `{prompt_index}`, `{image}`; numbers take a width (`{index:04}` zero-pads, `{index:4}` too: spaces in file names
/// help nobody). `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Field { field: Field, width: usize },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    Index,
    Seed,
    Mode,
    Width,
    Height,
    Prompt,
    PromptIndex,
    Image,
}

/// The values one image gives a template.
pub struct Fields<'a> {
    pub index: usize,
    pub seed: u32,
    pub mode: &'a str,
    pub width: usize,
    pub height: usize,
    pub prompt: &'a str,
    /// The prompt's position among the run's prompts, and the image's among that prompt's images.
    pub prompt_index: usize,
    pub image: usize,
}

impl Template {
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            bail!("the name contains the control character {c:?}; use printable characters");
        }
        check_png_name(None, Path::new(text))?;
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let spec: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    let (name, width) = spec.split_once(':').unwrap_or((&spec, ""));
                    let field = match name {
                        "index" => Field::Index,
                        "seed" => Field::Seed,
                        "mode" => Field::Mode,
                        "width" => Field::Width,
                        "height" => Field::Height,
                        "prompt" => Field::Prompt,
                        "prompt_index" => Field::PromptIndex,
                        "image" => Field::Image,
                        _ => bail!("unknown placeholder {{{spec}}}; use {{index}}, {{seed}}, {{mode}}, {{width}}, {{height}}, {{prompt}}, {{prompt_index}} or {{image}} (write {{{{ for a literal brace)"),
                    };
                    let width = match width {
                        "" => 0,
                        _ if matches!(field, Field::Mode | Field::Prompt) => {
                            bail!("{{{spec}}}: only numbers take a width")
                        }
                        w => w.parse().ok().filter(|&w| w <= 20).with_context(|| {
                            format!("{{{spec}}}: the width must be a number up to 20, as in {{index:04}}")
                        })?,
                    };
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                    parts.push(Part::Field { field, width });
                }
                '}' => bail!("unmatched '}}' (write }}}} for a literal brace)"),
                c => literal.push(c),
            }
        }
        parts.push(Part::Literal(literal));
        Ok(Self { parts })
    }

    pub fn render(&self, fields: &Fields) -> PathBuf {
        let mut name = String::new();
        for part in &self.parts {
            match *part {
                Part::Literal(ref text) => name.push_str(text),
                Part::Field { field, width } => {
                    let number = |n: u64| format!("{n:0width$}");
                    name.push_str(&match field {
                        Field::Index => number(fields.index as u64),
                        Field::Seed => number(fields.seed.into()),
                        Field::Width => number(fields.width as u64),
                        Field::Height => number(fields.height as u64),
                        Field::Mode => fields.mode.to_string(),
                        Field::Prompt => slug(fields.prompt, SLUG_LEN),
                        Field::PromptIndex => number(fields.prompt_index as u64),
                        Field::Image => number(fields.image as u64),
                    });
                }
            }
        }
        PathBuf::from(name)
    }
}

// ---- disk space ---------------------------------------------------------------------------------

/// Bytes each image's metadata may take: both prompts (at most `prompts::MAX_PROMPT_BYTES` each) in the
/// `parameters` text and again in the JSON, where one character can take six bytes (`\u001b`).
fn text_bytes_bound(prompt: &str, negative_prompt: &str) -> u64 {
    7 * (prompt.len() + negative_prompt.len()) as u64 + 4096
}

/// An upper bound on the bytes of an 8-bit RGB PNG of `width` × `height` with `text_bytes` of text
/// chunks: the pixels as if deflate could not shrink them at all (noise-like images barely compress)
/// plus an eighth for encodings that grow incompressible data, a filter byte per row and the framing.
pub fn png_size_bound(width: usize, height: usize, text_bytes: u64) -> u64 {
    let raw = (width as u64 * 3 + 1) * height as u64;
    raw + raw / 8 + text_bytes + 4096
}

/// (path, upper bound on its bytes) of one planned image, for [`check_disk_space`].
pub fn planned_png(planned: &crate::plan::PlannedImage) -> (PathBuf, u64) {
    let text = text_bytes_bound(&planned.spec.prompt, planned.spec.negative_prompt.as_deref().unwrap_or(""));
    (planned.path.clone(), png_size_bound(planned.size.width, planned.size.height, text))
}

/// Widest label band a compare grid can have (DejaVu Sans Mono at 18 px: "seed 4294967295" is ~175 px).
const GRID_BAND_BOUND: usize = 256;

/// An upper bound on the bytes of a compare grid of `columns` × `rows` cells (cell size in pixels).
pub fn grid_png_bound(columns: usize, rows: usize, cell_width: usize, cell_height: usize, prompt: &str) -> u64 {
    let width = GRID_BAND_BOUND + columns * (cell_width + crate::grid::GAP as usize);
    let height = GRID_BAND_BOUND + rows * (cell_height + crate::grid::GAP as usize);
    png_size_bound(width, height, text_bytes_bound(prompt, "") * 2 + 64 * (columns * rows) as u64)
}

/// Refuses, before any work, files that cannot fit where they go: `outputs` are (path, upper bound
/// on its bytes), e.g. [`planned_png`] of each planned image. Folders need not exist yet (the nearest
/// existing one tells the filesystem); outputs on one filesystem are summed. Where the free space
/// cannot be read, nothing is refused.
pub fn check_disk_space(outputs: impl IntoIterator<Item = (PathBuf, u64)>) -> Result<()> {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    // Per filesystem (device): a folder on it, files, bytes. Many outputs share a folder: look each up once.
    let mut device_of: HashMap<PathBuf, Option<(u64, PathBuf)>> = HashMap::new();
    let mut needs: HashMap<u64, (PathBuf, usize, u64)> = HashMap::new();
    for (path, bytes) in outputs {
        let folder = parent_folder(&path);
        let found = device_of.entry(folder).or_insert_with_key(|folder| {
            let existing = folder.ancestors().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
            existing.filter_map(|p| Some((fs::metadata(p).ok().filter(|m| m.is_dir())?.dev(), p.to_path_buf()))).next()
        });
        if let Some((device, existing)) = found {
            let need = needs.entry(*device).or_insert_with(|| (existing.clone(), 0, 0));
            need.1 += 1;
            need.2 = need.2.saturating_add(bytes);
        }
    }
    for (folder, files, bytes) in needs.into_values() {
        let Some(free) = available_bytes(&folder) else { continue };
        if bytes > free {
            bail!(
                "not enough disk space: {files} file(s) of up to {} in all (uncompressed bound) go to the filesystem of {}, \
                 which has {} free; free some space, write elsewhere (-o) or make fewer or smaller images",
                human_bytes(bytes),
                folder.display(),
                human_bytes(free)
            );
        }
    }
    Ok(())
}

/// Bytes an unprivileged user may still write on `folder`'s filesystem (statvfs's f_bavail).
fn available_bytes(folder: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(folder.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes into the zero-initialised struct we pass; `path` is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// 1234567 → "1.2 MB" (bytes exactly below 1 kB).
fn human_bytes(bytes: u64) -> String {
    let units = [("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)];
    match units.iter().find(|(_, size)| bytes as f64 >= *size) {
        Some((unit, size)) => format!("{:.1} {unit}", bytes as f64 / size),
        None => format!("{bytes} bytes"),
    }
}

/// Two paths that name the same file as far as we can tell before creating it (`out/./a.png` and
/// `out/a.png`).
pub fn same_file_key(path: &Path) -> PathBuf {
    path.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
}

/// Text that came from a file, made one printable line for a message: control characters (newlines,
/// terminal escape sequences) are written as escapes (`\n`, `\u{1b}`), everything else as it is.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// A parser's error about a stranger's file, as one printable line.
pub fn printable_error(err: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(printable(&err.to_string()))
}

/// Flushes stdout line by line: scripts read the written paths as they appear.
pub fn print_path(path: &Path) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", path.display())?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_safe_and_bounded() {
        assert_eq!(slug("A corgi, on a beach!", 60), "a-corgi-on-a-beach");
        assert_eq!(slug("🐶🏖️", 60), "image");
        assert_eq!(slug("aaaa bbbb cccc", 9), "aaaa-bbbb");
        assert_eq!(slug("abcdefghij", 4), "abcd");
    }

    fn fields() -> Fields<'static> {
        Fields {
            index: 7,
            seed: 42,
            mode: "entropy",
            width: 224,
            height: 160,
            prompt: "A corgi, on a beach!",
            prompt_index: 3,
            image: 1,
        }
    }

    #[test]
    fn templates_fill_placeholders_with_widths() {
        let template = Template::parse("out/{index:04}-{seed}-{mode}-{width}x{height}-{prompt}.png").unwrap();
        assert_eq!(template.render(&fields()), Path::new("out/0007-42-entropy-224x160-a-corgi-on-a-beach.png"));
        let grid = Template::parse("{width}/{mode}/{prompt_index:03}-{image}.png").unwrap();
        assert_eq!(grid.render(&fields()), Path::new("224/entropy/003-1.png"));
        let plain = Template::parse("{{x}}.png").unwrap();
        assert_eq!(plain.render(&fields()), Path::new("{x}.png"));
    }

    #[test]
    fn bad_templates_are_refused() {
        for (bad, needle) in [
            ("{idx}.png", "unknown placeholder {idx}"),
            ("{index:x}.png", "width"),
            ("{mode:3}.png", "only numbers"),
            ("{index}.jpg", ".png"),
            ("a}.png", "unmatched"),
        ] {
            let err = Template::parse(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    /// `-o`, `-o` templates and `--plot` share one rule: a final `.png` extension, in any case.
    #[test]
    fn one_png_rule_for_every_output_name() {
        for good in ["a.png", "A.PNG", "out/x.Png", "{index:04}.png"] {
            assert!(check_png_name(Some("-o"), Path::new(good)).is_ok() && Template::parse(good).is_ok(), "{good}");
        }
        for bad in [".png", "a.png.jpg", "a", "png", "out/.png", "out.png/", "{index}.png/"] {
            assert!(check_png_name(Some("-o"), Path::new(bad)).is_err() && Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_clobber_and_no_temp_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        let image = RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]));
        write_png(&path, &image, &[("parameters", "x".into())], false).unwrap();
        assert!(check_output(&path, false).unwrap_err().to_string().contains("already exists"));
        assert!(write_png(&path, &image, &[], false).is_err());
        write_png(&path, &image, &[], true).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.png")]);
        assert_eq!(image::open(&path).unwrap().to_rgb8(), image);
    }

    /// Found by `fuzz_output_templates`: `out.png/` has a `.png` extension as far as `Path` is concerned.
    #[test]
    fn a_name_ending_in_a_slash_is_a_folder_not_a_png() {
        assert!(check_png_name(Some("-o"), Path::new("out.png/")).is_err());
        assert!(Template::parse("out/{index}.png/").unwrap_err().to_string().contains(".png file"));
    }

    #[test]
    fn templates_with_control_characters_are_refused_in_one_line() {
        let err = Template::parse("out/a\nb.png").unwrap_err().to_string();
        assert!(err.contains("control character '\\n'") && !err.contains('\n'), "{err}");
    }

    /// The bound holds for the worst case: pure noise, with the longest prompts, in the real writer.
    #[test]
    fn png_size_bound_holds_for_incompressible_images() {
        let dir = tempfile::tempdir().unwrap();
        let (width, height) = (200, 136);
        let mut state = 0x9e3779b97f4a7c15u64;
        let image = RgbImage::from_fn(width, height, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
        });
        let prompt = "\u{1b}é".repeat(crate::prompts::MAX_PROMPT_BYTES / 3);
        let json = serde_json::to_string(&prompt).unwrap();
        let path = dir.path().join("noise.png");
        write_png(&path, &image, &[("parameters", prompt.clone()), ("sdscale", json)], false).unwrap();
        let written = fs::metadata(&path).unwrap().len();
        let bound = png_size_bound(width as usize, height as usize, text_bytes_bound(&prompt, ""));
        assert!(written <= bound, "{written} > {bound}");
        assert!(written * 2 > bound, "the bound should not be absurdly loose: {written} vs {bound}");
    }

    /// The compare grid's bound holds with the widest labels it can have, at the smallest cells.
    #[test]
    fn grid_bound_covers_the_widest_labels() {
        let columns: Vec<String> = ["multidiffusion", "entropy"].map(String::from).to_vec();
        let rows: Vec<String> = ["seed 4294967295", "seed 0"].map(String::from).to_vec();
        let layout = crate::grid::Layout::new(64, 64, &columns, &rows);
        let (width, height) = layout.size();
        assert!(layout.left as usize <= GRID_BAND_BOUND && layout.top as usize <= GRID_BAND_BOUND, "{layout:?}");
        assert!(grid_png_bound(2, 2, 64, 64, "") >= png_size_bound(width as usize, height as usize, 0));
    }

    #[test]
    fn disk_space_is_checked_per_filesystem_before_folders_exist() {
        let dir = tempfile::tempdir().unwrap();
        let free = available_bytes(dir.path()).unwrap();
        let later = dir.path().join("not/yet/there.png");
        assert!(check_disk_space([(later.clone(), free / 4), (dir.path().join("b.png"), free / 4)]).is_ok());
        // Three quarters each: fine alone, too much together (both on one filesystem).
        let err = check_disk_space([(later, free / 4 * 3), (dir.path().join("b.png"), free / 4 * 3)]).unwrap_err();
        let err = err.to_string();
        assert!(err.starts_with("not enough disk space: 2 file(s)") && err.contains("free"), "{err}");
        assert!(!dir.path().join("not").exists(), "checking creates nothing");
        assert_eq!((human_bytes(999), human_bytes(1234)), ("999 bytes".to_string(), "1.2 kB".to_string()));
        assert_eq!(human_bytes(48_000_000), "48.0 MB");
    }
}
