//! Every file the tool writes goes through here: PNGs with their generation parameters, written to a
//! temporary file in the target folder and moved into place, so a `.png` on disk is always complete
//! and an existing file is never replaced unless the user said `--overwrite`.

use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

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
    let temp = temp_path(path);
    let result = write_png_file(&temp, image, text_chunks).and_then(|()| publish(&temp, path, overwrite));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn write_png_file(temp: &Path, image: &RgbImage, text_chunks: &[(&str, String)]) -> Result<()> {
    let file = File::create(temp).with_context(|| format!("cannot create {}", temp.display()))?;
    let mut writer = BufWriter::new(file);
    {
        let mut encoder = png::Encoder::new(&mut writer, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (keyword, text) in text_chunks {
            // tEXt is Latin-1 only; iTXt carries UTF-8 prompts intact.
            encoder.add_itxt_chunk(keyword.to_string(), text.clone())?;
        }
        let mut png_writer = encoder.write_header()?;
        png_writer.write_image_data(image.as_raw())?;
        png_writer.finish()?;
    }
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

/// `a-corgi-on-a-beach-42-entropy.png`: prompt, seed and mode, so runs that differ in any of them do
/// not collide.
pub fn default_output_name(prompt: &str, seed: u32, mode: &str) -> PathBuf {
    PathBuf::from(format!("{}-{seed}-{mode}.png", slug(prompt, 60)))
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
}
