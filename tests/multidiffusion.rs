//! MultiDiffusion against diffusers' `StableDiffusionPanoramaPipeline` (DDIM, eta 0, guidance 7.5,
//! `torch.Generator("cpu").manual_seed(seed)`, fp32 CPU) on the fixture model: several windows in both
//! directions, a ragged edge no window covers, a circular one-row panorama, a negative prompt, and the
//! original MultiDiffusion window rule at 224² (the paper's setting). Tolerance as for every image test:
//! mean |Δ| ≤ 0.1 and max |Δ| ≤ 4 levels of 255.
//!
//! sdscale's window is one training-size image; diffusers hard-codes 64 latents, SD's 512². The fixture
//! model is "trained" at 128 px, so the reference renders pass `--train-size 512x512` (with default
//! attention it changes only the window) to get diffusers' 64-latent windows.

use crate::util::{image_diff, read_json, reference, sdscale, stderr, tiny_model};
use std::path::{Path, PathBuf};

fn cases() -> Vec<serde_json::Value> {
    read_json("multidiffusion.json").as_array().unwrap().clone()
}

fn render(dir: &Path, case: &serde_json::Value, extra: &[&str]) -> PathBuf {
    let output = dir.join(case["file"].as_str().unwrap());
    let mut args: Vec<String> = vec!["gen".into(), "--model".into(), tiny_model().display().to_string()];
    args.extend(["--prompt".into(), case["prompt"].as_str().unwrap().into()]);
    if let Some(negative) = case["negative_prompt"].as_str().filter(|n| !n.is_empty()) {
        args.extend(["--negative-prompt".into(), negative.into()]);
    }
    for key in ["width", "height", "steps", "guidance", "seed", "mode"] {
        args.push(format!("--{key}"));
        args.push(case[key].to_string().trim_matches('"').to_string());
    }
    if case["circular"] == true {
        args.push("--circular".into());
    }
    args.extend(["--md-views".into(), case["views"].as_str().unwrap_or("diffusers").into()]);
    args.extend(["--train-size".into(), "512x512".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["-o".into(), output.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = sdscale(dir, &args);
    assert!(result.status.success(), "sdscale failed: {}", stderr(&result));
    output
}

fn check(name: &str, extra: &[&str]) {
    let case = cases().into_iter().find(|c| c["file"].as_str().is_some_and(|f| f.starts_with(name))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ours = render(dir.path(), &case, extra);
    let file = case["file"].as_str().unwrap();
    let (mean, max) = image_diff(&ours, &reference(&format!("images/{file}")));
    eprintln!("{file}: mean |Δ| {mean:.4}, max |Δ| {max}");
    assert!(mean <= 0.1 && max <= 4, "{file}: mean |Δ| {mean:.4}, max |Δ| {max} against diffusers");
}

#[test]
fn windows_in_both_directions() {
    check("md_grid", &[]);
}

/// Several windows per UNet call: the same image.
#[test]
fn windows_in_both_directions_batched() {
    check("md_grid", &["--view-batch", "4"]);
}

#[test]
fn a_ragged_edge_no_window_covers_stays_as_diffusers_leaves_it() {
    check("md_uncovered", &[]);
}

#[test]
fn circular_one_row_panorama() {
    check("md_circular", &[]);
}

#[test]
fn negative_prompt() {
    check("md_negative", &[]);
}

#[test]
fn the_original_rule_at_224_reproduces_the_papers_setting() {
    check("md_original", &[]);
}

/// At most the training size (128 px here) is one window: MultiDiffusion is then the plain pipeline,
/// bit for bit.
#[test]
fn one_window_is_the_plain_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model().display().to_string();
    let run = |mode: &str| {
        let out = dir.path().join(format!("{mode}.png"));
        let args = [
            "gen",
            "--model",
            &model,
            "--prompt",
            "a corgi",
            "--width",
            "128",
            "--height",
            "120",
            "--steps",
            "3",
            "--seed",
            "9",
            "--mode",
            mode,
            "-o",
            out.to_str().unwrap(),
        ];
        let result = sdscale(dir.path(), &args);
        assert!(result.status.success(), "{}", stderr(&result));
        image::open(out).unwrap().to_rgb8()
    };
    assert!(run("multidiffusion") == run("default"), "one window must be the plain pipeline");
}

#[test]
fn circular_needs_one_row_and_md_flags_need_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model().display().to_string();
    let base = ["gen", "--model", &model, "--prompt", "x", "--steps", "1", "--seed", "1", "-o", "x.png"];
    for (extra, needle) in [
        // One row of windows: at most the training height (the fixture's 128 px).
        (&["--mode", "multidiffusion", "--circular", "--height", "136", "--width", "1024"][..], "at most 128 px"),
        (&["--circular"][..], "applies to --mode multidiffusion only"),
        (&["--md-views", "original"][..], "applies to --mode multidiffusion only"),
    ] {
        let result = sdscale(dir.path(), &[&base[..], extra].concat());
        let message = stderr(&result);
        assert_eq!(result.status.code(), Some(2), "{extra:?}: {message}");
        assert!(message.contains(needle) && message.lines().count() == 1, "{extra:?}: {message}");
        assert!(!dir.path().join("x.png").exists());
    }
}

#[test]
fn compare_takes_all_four_modes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model().display().to_string();
    let args = [
        "compare",
        "--model",
        &model,
        "--prompt",
        "a corgi",
        "--width",
        "128",
        "--height",
        "128",
        "--steps",
        "2",
        "--seeds",
        "4",
        "--modes",
        "default,entropy,resize,multidiffusion",
        "--html",
        "-o",
        "grid.png",
    ];
    let result = sdscale(dir.path(), &args);
    assert!(result.status.success(), "{}", stderr(&result));
    for mode in ["default", "entropy", "resize", "multidiffusion"] {
        assert!(dir.path().join(format!("grid.{mode}.seed4.png")).is_file(), "no {mode} image");
    }
    let grid = image::open(dir.path().join("grid.png")).unwrap();
    assert!(grid.width() >= 4 * 128, "the grid should have four columns: {}", grid.width());
    let page = std::fs::read_to_string(dir.path().join("grid.html")).unwrap();
    assert!(page.contains("multidiffusion"));
}

/// The window rule, wrap-around and training size (which sizes the windows) are stored with the image,
/// so `gen --from` remakes it exactly; the PNG also says what it cost (without a manifest, which keeps
/// that instead).
#[test]
fn from_remakes_md_images_with_their_window_rule() {
    use sdscale::metadata::{read_image_metadata, Found};
    let model = tiny_model().display().to_string();
    for (rule, circular, size) in [("original", false, "96"), ("diffusers", true, "128")] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["gen", "--model", &model, "--prompt", "a panorama", "--mode", "multidiffusion"];
        args.extend(["--md-views", rule, "--width", size, "--height", "64", "--steps", "2", "--seed", "3"]);
        args.extend(["--train-size", "512x512", "-o", "first.png"]);
        if circular {
            args.push("--circular");
        }
        let result = sdscale(dir.path(), &args);
        assert!(result.status.success(), "{rule}: {}", stderr(&result));
        let first = dir.path().join("first.png");
        let Found::Sdscale(meta) = read_image_metadata(&first).unwrap() else { panic!("no sdscale chunk") };
        assert_eq!(serde_json::to_value(meta.md_views).unwrap(), rule);
        assert_eq!((meta.circular, meta.train_size), (circular, (512, 512)));
        assert!(meta.seconds.is_some_and(|s| s > 0.0), "{rule}: no seconds in the PNG");

        let result = sdscale(dir.path(), &["gen", "--from", "first.png", "-o", "again.png", "--manifest", "m.jsonl"]);
        assert!(result.status.success(), "{rule}: {}", stderr(&result));
        let again = dir.path().join("again.png");
        assert_eq!(image_diff(&first, &again), (0.0, 0), "{rule}: --from made another image");
        let Found::Sdscale(again_meta) = read_image_metadata(&again).unwrap() else { panic!() };
        assert_eq!((again_meta.md_views, again_meta.circular), (meta.md_views, meta.circular));
        assert_eq!(again_meta.seconds, None, "{rule}: with a manifest the timing lives there");
    }
}
