//! The VAE: diffusers' tiled decode (`--vae-tiling`, and automatic when the whole decode would not fit;
//! issue 21) and a replacement VAE (`--vae DIR|FILE`; issue 22), against diffusers' images made by
//! `scripts/make_fixtures.py --only vae-tiling|vae-swap` (scripts/fixture_vae.py).
//! Tolerance (issue #2): mean |Δ| ≤ 0.1 and max |Δ| ≤ 4 levels of 255.

use crate::util::{fixtures, image_diff, model_arg, read_json, reference, sdscale, stderr, success_lines};
use std::path::{Path, PathBuf};

fn case(file: &str, name: &str) -> serde_json::Value {
    read_json(file)
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"] == name)
        .unwrap_or_else(|| panic!("no case {name} in {file}"))
        .clone()
}

/// `gen` of one reference case plus `extra` flags, written to `out` in `dir`; returns the image and stderr.
fn render(dir: &Path, case: &serde_json::Value, out: &str, extra: &[&str]) -> (PathBuf, String) {
    let mut args: Vec<String> = vec!["gen".into(), "--model".into(), model_arg()];
    args.extend(["--prompt".into(), case["prompt"].as_str().unwrap().into()]);
    for key in ["width", "height", "steps", "guidance", "seed", "mode"] {
        args.push(format!("--{key}"));
        args.push(case[key].to_string().trim_matches('"').to_string());
    }
    args.extend(["-o".into(), out.into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = sdscale(dir, &args);
    success_lines(&result);
    (dir.join(out), stderr(&result))
}

fn info_json(dir: &Path, image: &Path) -> serde_json::Value {
    let lines = success_lines(&sdscale(dir, &["info", "--json", image.to_str().unwrap()]));
    serde_json::from_str(&lines.join("\n")).unwrap()
}

fn assert_matches(name: &str, ours: &Path) -> (f64, u8) {
    let (mean, max) = image_diff(ours, &reference(&format!("images/{name}")));
    eprintln!("{name}: mean |Δ| {mean:.4}, max |Δ| {max}");
    assert!(mean <= 0.1 && max <= 4, "{name}: mean |Δ| {mean:.4}, max |Δ| {max} against diffusers");
    (mean, max)
}

// ---- tiled decode -------------------------------------------------------------------------------

fn check_tiled(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let case = case("vae_tiling.json", name);
    let (ours, _) = render(dir.path(), &case, "tiled.png", &["--vae-tiling"]);
    assert_matches(name, &ours);
    assert_eq!(info_json(dir.path(), &ours)["vae_tiling"], true, "metadata records the tiled decode");
}

/// Latents 56×40: 5×4 tiles of 16 latents every 12, blended over 32 px.
#[test]
fn tiled_decode_matches_diffusers() {
    check_tiled("vae_tiled_320x448.png");
}

/// Latents 25×17: the last row of tiles is 1 latent high, the last column 5 wide (entropy mode).
#[test]
fn tiled_decode_with_thin_edge_tiles_matches_diffusers() {
    check_tiled("vae_tiled_136x200.png");
}

/// A latent of one tile (16×16) is decoded whole, as diffusers does: the same image as untiled.
#[test]
fn tiled_decode_of_one_tile_is_the_whole_decode() {
    check_tiled("vae_tiled_128.png");
}

/// The check above can fail: the untiled decode of the same latents differs from diffusers' tiled image
/// by the amount the reference script measured, and records no tiling.
#[test]
fn untiled_decode_differs_from_the_tiled_reference() {
    let dir = tempfile::tempdir().unwrap();
    let name = "vae_tiled_320x448.png";
    let case = case("vae_tiling.json", name);
    let (ours, log) = render(dir.path(), &case, "whole.png", &[]);
    assert!(!log.contains("tiles"), "no tiling without the flag on a machine with memory: {log}");
    let (mean, max) = image_diff(&ours, &reference(&format!("images/{name}")));
    let expected = case["vs_untiled"]["max"].as_f64().unwrap();
    assert!(max as f64 >= expected - 4.0 && mean > 1.0, "untiled vs tiled: mean {mean:.3}, max {max}");
    assert!(info_json(dir.path(), &ours).get("vae_tiling").is_none(), "untiled images record nothing");
}

/// When the whole decode would not fit in the memory available (here: SDSCALE_MEMORY_MIB says 1 MiB),
/// the run decodes in tiles, says so once on stderr, records it, and `--from` remakes the same image.
#[test]
fn decode_is_tiled_when_memory_is_short() {
    let dir = tempfile::tempdir().unwrap();
    let name = "vae_tiled_320x448.png";
    let case = case("vae_tiling.json", name);
    let mut args: Vec<String> = vec!["gen".into(), "--model".into(), model_arg()];
    args.extend(["--prompt".into(), case["prompt"].as_str().unwrap().into(), "--num-images".into(), "2".into()]);
    for key in ["width", "height", "steps", "guidance", "seed", "mode"] {
        args.push(format!("--{key}"));
        args.push(case[key].to_string().trim_matches('"').to_string());
    }
    args.extend(["-o".into(), "auto-{index}.png".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_sdscale"))
        .args(&args)
        .current_dir(dir.path())
        .env("SDSCALE_MEMORY_MIB", "1")
        .output()
        .unwrap();
    let log = stderr(&result);
    assert!(result.status.success(), "{log}");
    let notes: Vec<&str> = log.lines().filter(|l| l.contains("in tiles")).collect();
    assert_eq!(notes.len(), 1, "said once: {log}");
    assert!(notes[0].contains("320x448") && notes[0].contains("--vae-tiling"), "{log}");
    let first = dir.path().join("auto-0.png");
    assert_matches(name, &first);
    assert_eq!(info_json(dir.path(), &first)["vae_tiling"], true);
    // --from on a machine with memory: the stored setting still tiles.
    let again = success_lines(&sdscale(dir.path(), &["gen", "--from", "auto-0.png", "-o", "again.png"]));
    assert_eq!(again, ["again.png"]);
    assert_matches(name, &dir.path().join("again.png"));
}

// ---- a replacement VAE ---------------------------------------------------------------------------

fn swap_folder() -> PathBuf {
    fixtures().join("tiny-vae-ft-mse")
}

fn swap_file() -> PathBuf {
    fixtures().join("tiny-vae-ft-mse-840000-ema-pruned.safetensors")
}

fn check_swap(name: &str, vae: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let case = case("vae_swap.json", name);
    let vae = vae.display().to_string();
    let (ours, _) = render(dir.path(), &case, "swap.png", &["--vae", &vae]);
    assert_matches(name, &ours);
    assert_eq!(info_json(dir.path(), &ours)["vae"], vae.as_str(), "metadata records the VAE");
}

/// sd-vae-ft-mse's folder layout (config.json of 2022, legacy attention names, a .bin never opened).
#[test]
fn replacement_vae_folder_matches_diffusers() {
    check_swap("vae_swap_192.png", &swap_folder());
}

/// vae-ft-mse-840000-ema-pruned.safetensors's layout: LDM names, no prefix; the model's VAE config.
#[test]
fn replacement_vae_single_file_matches_diffusers() {
    check_swap("vae_swap_192.png", &swap_file());
    check_swap("vae_swap_160x96_entropy.png", &swap_file());
}

/// A whole model folder given as `--vae` lends its `vae/`: here the model's own, so the image is the
/// model's own image (images.json's sq192_default, the same case as vae_swap_192).
#[test]
fn a_model_folder_as_vae_lends_its_vae_folder() {
    let dir = tempfile::tempdir().unwrap();
    let case = case("vae_swap.json", "vae_swap_192.png");
    let (ours, _) = render(dir.path(), &case, "own.png", &["--vae", &model_arg()]);
    let (mean, max) = image_diff(&ours, &reference("images/sq192_default.png"));
    assert!(mean <= 0.1 && max <= 4, "mean |Δ| {mean:.4}, max |Δ| {max}");
}

/// `--from` an image made with `--vae` uses that VAE again; the model's own VAE makes another image.
#[test]
fn from_remakes_an_image_with_its_replacement_vae() {
    let dir = tempfile::tempdir().unwrap();
    let name = "vae_swap_192.png";
    let case = case("vae_swap.json", name);
    let vae = swap_folder().display().to_string();
    render(dir.path(), &case, "first.png", &["--vae", &vae]);
    success_lines(&sdscale(dir.path(), &["gen", "--from", "first.png", "-o", "again.png"]));
    assert_matches(name, &dir.path().join("again.png"));
    let (own, _) = render(dir.path(), &case, "own.png", &[]);
    let (_, max) = image_diff(&own, &reference(&format!("images/{name}")));
    assert!(max > 4, "the model's own VAE must make another image (max |Δ| {max})");
}

/// Bad `--vae` paths: one line naming the problem, exit 2, nothing written.
#[test]
fn bad_vae_paths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let pickle = dir.path().join("vae.ckpt");
    std::fs::write(&pickle, "not a pickle").unwrap();
    let unet = fixtures().join("tiny-sd/unet/diffusion_pytorch_model.safetensors");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let cases: [(String, &str); 5] = [
        (dir.path().join("missing").display().to_string(), "no such file or folder"),
        (empty.display().to_string(), "config.json"),
        (pickle.display().to_string(), "pickle"),
        (unet.display().to_string(), "no VAE decoder"),
        (text.display().to_string(), ".safetensors"),
    ];
    for (vae, needle) in &cases {
        let args = ["gen", "--model", &model, "--prompt", "a corgi", "--steps", "1", "--vae", vae, "-o", "x.png"];
        let result = sdscale(dir.path(), &args);
        let log = stderr(&result);
        assert_eq!(result.status.code(), Some(2), "--vae {vae}: {log}");
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "--vae {vae}: one line: {log}");
        assert!(errors[0].contains("--vae") && errors[0].contains(needle), "--vae {vae}: {log}");
        assert!(!dir.path().join("x.png").exists());
    }
}
