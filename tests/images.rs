//! Whole images from the real binary against diffusers' `StableDiffusionPipeline` (DDIMScheduler,
//! `torch.Generator("cpu").manual_seed(seed)`, fp32 CPU) on the fixture model.
//! Tolerance (issue #2): mean |Δ| ≤ 0.1 and max |Δ| ≤ 4 levels of 255.

use crate::util::{image_diff, read_json, reference, sdscale, stderr, stdout, tiny_model};
use std::path::{Path, PathBuf};

fn render(dir: &Path, case: &serde_json::Value) -> PathBuf {
    let output = dir.join(case["file"].as_str().unwrap());
    let mut args: Vec<String> = vec!["gen".into(), "--model".into(), tiny_model().display().to_string()];
    args.extend(["--prompt".into(), case["prompt"].as_str().unwrap().into()]);
    if let Some(negative) = case["negative_prompt"].as_str() {
        args.extend(["--negative-prompt".into(), negative.into()]);
    }
    for key in ["width", "height", "steps", "guidance", "seed", "mode"] {
        args.push(format!("--{key}"));
        args.push(case[key].to_string().trim_matches('"').to_string());
    }
    args.extend(["-o".into(), output.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = sdscale(dir, &args);
    assert!(result.status.success(), "sdscale failed: {}", stderr(&result));
    assert_eq!(stdout(&result).trim(), output.display().to_string(), "stdout must be the written path");
    output
}

fn case(name: &str) -> serde_json::Value {
    read_json("images.json")
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
        .clone()
}

fn check(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ours = render(dir.path(), &case(name));
    let (mean, max) = image_diff(&ours, &reference(&format!("images/{name}")));
    eprintln!("{name}: mean |Δ| {mean:.4}, max |Δ| {max}");
    assert!(mean <= 0.1 && max <= 4, "{name}: mean |Δ| {mean:.4}, max |Δ| {max} against diffusers");
}

#[test]
fn square_non_training_size_default() {
    check("sq192_default.png");
}

#[test]
fn square_non_training_size_entropy() {
    check("sq192_entropy.png");
}

#[test]
fn training_size_default() {
    check("train128_default.png");
}

#[test]
fn training_size_entropy() {
    check("train128_entropy.png");
}

#[test]
fn non_square_default() {
    check("wide160x96_default.png");
}

#[test]
fn non_square_entropy() {
    check("wide160x96_entropy.png");
}

/// 72×88 px → 11×9 latents → 6×5 → 3×3 → 2×2: diffusers' upsample_size path.
#[test]
fn odd_latent_size_default() {
    check("odd72x88_default.png");
}

#[test]
fn odd_latent_size_entropy() {
    check("odd72x88_entropy.png");
}

/// A prompt over 77 tokens (truncated, with a warning naming the dropped words) and a negative prompt.
#[test]
fn long_prompt_with_negative_prompt() {
    check("long_negative_entropy.png");
}

/// guidance ≤ 1: the conditional branch only, as diffusers does.
#[test]
fn guidance_one_runs_the_conditional_branch_only() {
    check("guidance1_entropy.png");
}

/// The paper's claim made testable on the fixture: the modes differ clearly away from the training
/// size, and are the same image, bit for bit, at it.
#[test]
fn modes_differ_off_the_training_size_and_agree_at_it() {
    let dir = tempfile::tempdir().unwrap();
    let default = render(dir.path(), &case("sq192_default.png"));
    let entropy = render(dir.path(), &case("sq192_entropy.png"));
    let (mean, _) = image_diff(&default, &entropy);
    assert!(mean >= 2.0, "modes should differ clearly at 192x192, mean |Δ| is {mean:.3}");

    let default = render(dir.path(), &case("train128_default.png"));
    let entropy = render(dir.path(), &case("train128_entropy.png"));
    let a = image::open(default).unwrap().to_rgb8();
    let b = image::open(entropy).unwrap().to_rgb8();
    assert!(a == b, "at the training size both modes must give bit-identical images");
}

#[test]
fn truncation_warning_names_the_dropped_words() {
    let dir = tempfile::tempdir().unwrap();
    let words: Vec<String> = (0..80).map(|i| format!("word{i}")).collect();
    let prompt = format!("{} zebra", words.join(" "));
    let model = tiny_model().display().to_string();
    let result = sdscale(
        dir.path(),
        &[
            "gen", "--model", &model, "--prompt", &prompt, "--steps", "1", "--seed", "1", "-o", "x.png", "--width",
            "64", "--height", "64",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let log = stderr(&result);
    assert!(log.contains("77 tokens") && log.contains("zebra"), "no truncation warning naming the words: {log}");
}
