//! The Turbo models (issue #22): `tests/fixtures/tiny-sdxl-turbo` (laid out like stabilityai/sdxl-turbo:
//! SDXL at 512², Euler a with trailing spacing) and `tests/fixtures/tiny-sd-turbo` (SD-Turbo: SD 2.1 at
//! 512², Euler with trailing spacing), both made by `scripts/make_fixtures.py --only turbo` from the tiny
//! SDXL / SD weights. `sdscale gen --sampler model --guidance 0` matches diffusers'
//! `AutoPipelineForText2Image` on the same call (`reference/families/turbo.json`) within mean |Δ| ≤ 0.1,
//! max |Δ| ≤ 4 levels, at 1 step (the training size and another) and at 2 and 4 steps.

use crate::util::{fixtures, image_diff, sdscale, stderr};
use std::path::{Path, PathBuf};

fn references() -> serde_json::Value {
    let path = fixtures().join("reference/families/turbo.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Renders one reference case with the real binary (no negative prompt); `sampler` are the sampler
/// arguments (`--sampler model` for the model's own scheduler).
fn render(dir: &Path, model_args: &[String], case: &serde_json::Value, sampler: &[&str]) -> PathBuf {
    let out = dir.join(case["file"].as_str().unwrap());
    let mut args: Vec<String> = vec!["gen".into()];
    args.extend(model_args.iter().cloned());
    args.extend(["--prompt".into(), case["prompt"].as_str().unwrap().into()]);
    args.extend(sampler.iter().map(|s| s.to_string()));
    for key in ["width", "height", "steps", "guidance", "seed"] {
        args.extend([format!("--{key}"), case[key].to_string()]);
    }
    args.extend(["-o".into(), out.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = sdscale(dir, &args);
    assert!(result.status.success(), "sdscale failed: {}", stderr(&result));
    out
}

/// Every case of one model against diffusers; prints each and the worst, then asserts the bound.
fn check_model(key: &str) {
    let refs = references();
    let folder = fixtures().join(refs[key]["model"].as_str().unwrap()).display().to_string();
    let cases = refs[key]["cases"].as_array().unwrap();
    assert!(cases.len() >= 4, "{key}: {} cases", cases.len());
    check_cases(key, &["--model".into(), folder], cases, &["--sampler", "model"]);
}

/// `cases` rendered with `model_args` and `sampler` against diffusers' images.
fn check_cases(key: &str, model_args: &[String], cases: &[serde_json::Value], sampler: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut worst = (0.0f64, 0u8);
    let mut failures = Vec::new();
    for case in cases {
        let png = render(dir.path(), model_args, case, sampler);
        let file = case["file"].as_str().unwrap();
        let (mean, max) = image_diff(&png, &fixtures().join("reference/families/turbo").join(file));
        eprintln!("{file}: mean |Δ| {mean:.4}, max |Δ| {max}");
        worst = (worst.0.max(mean), worst.1.max(max));
        if mean > 0.1 || max > 4 {
            failures.push(format!("{file}: mean |Δ| {mean:.4}, max |Δ| {max}"));
        }
    }
    eprintln!("{key}: worst mean |Δ| {:.4}, worst max |Δ| {}", worst.0, worst.1);
    assert!(failures.is_empty(), "against diffusers' AutoPipelineForText2Image: {failures:#?}");
}

/// The fixtures carry the Turbo configs: the pipeline class, the scheduler (trailing spacing) and a
/// 512 px training size; the reference says which pipeline and scheduler diffusers picked.
#[test]
fn turbo_fixtures_hold_the_turbo_configs() {
    let refs = references();
    for (key, pipeline, scheduler) in [
        ("sdxl_turbo", "StableDiffusionXLPipeline", "EulerAncestralDiscreteScheduler"),
        ("sd_turbo", "StableDiffusionPipeline", "EulerDiscreteScheduler"),
    ] {
        let folder = fixtures().join(refs[key]["model"].as_str().unwrap());
        assert_eq!(refs[key]["pipeline"], pipeline, "{key}");
        assert_eq!(refs[key]["scheduler"], scheduler, "{key}");
        assert_eq!(json(&folder.join("model_index.json"))["_class_name"], pipeline, "{key}");
        let config = json(&folder.join("scheduler/scheduler_config.json"));
        assert_eq!(
            (config["_class_name"].as_str(), config["timestep_spacing"].as_str()),
            (Some(scheduler), Some("trailing"))
        );
        assert_eq!(json(&folder.join("unet/config.json"))["sample_size"], 64, "{key}");
        // One step starts at t = 999 from σ_max (trailing: no √(σ²+1)).
        let first = &refs[key]["cases"][0];
        assert_eq!((first["steps"].as_u64(), first["timesteps"][0].as_f64()), (Some(1), Some(999.0)));
    }
    // The default size is the training size, 512²: a render without --width/--height says so.
    let dir = tempfile::tempdir().unwrap();
    let folder = fixtures().join("tiny-sd-turbo").display().to_string();
    let result = sdscale(
        dir.path(),
        &[
            "gen",
            "--model",
            &folder,
            "--prompt",
            "x",
            "--steps",
            "1",
            "--guidance",
            "0",
            "--sampler",
            "model",
            "-o",
            "x.png",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let image = image::open(dir.path().join("x.png")).unwrap();
    assert_eq!((image.width(), image.height()), (512, 512));
}

/// SDXL-Turbo: Euler a (trailing) through SDXL's pipeline, guidance 0 (the conditional branch only).
#[test]
fn sdxl_turbo_matches_diffusers_auto_pipeline() {
    check_model("sdxl_turbo");
}

/// SD-Turbo: Euler (trailing) through SD 2.x's pipeline, guidance 0.
#[test]
fn sd_turbo_matches_diffusers_auto_pipeline() {
    check_model("sd_turbo");
}

/// SD-Turbo as a single file (`sd_turbo.safetensors`, SD 2.x's LDM layout): the tiny SD 2.x file holds the
/// very weights of tiny-sd-turbo/, so with `--config` pointing at an SD-Turbo folder it renders the
/// folder's references with `--sampler model`; with SD 2.1-base's configs instead (`--config tiny-sd`,
/// PNDM) `--sampler euler --timestep-spacing trailing` is the same sampler.
#[test]
fn sd_turbo_single_file_renders_the_references() {
    let refs = references();
    let cases = refs["sd_turbo"]["cases"].as_array().unwrap();
    let pick = |file: &str| cases.iter().find(|c| c["file"] == file).unwrap().clone();
    let file = fixtures().join("tiny-sd-single-file.safetensors").display().to_string();
    let turbo = fixtures().join("tiny-sd-turbo").display().to_string();
    let sd21 = fixtures().join("tiny-sd").display().to_string();
    let chosen = [pick("sd_turbo_train512_1step.png"), pick("sd_turbo_tall256x384_4steps.png")];
    check_cases(
        "sd_turbo single file",
        &["--model".into(), file.clone(), "--config".into(), turbo],
        &chosen,
        &["--sampler", "model"],
    );
    check_cases(
        "sd_turbo single file, SD 2.1 configs",
        &["--model".into(), file, "--config".into(), sd21],
        &chosen[1..],
        &["--sampler", "euler", "--timestep-spacing", "trailing"],
    );
}
