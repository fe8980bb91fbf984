//! The other model families (issue #11) against diffusers: each tiny fixture (`tests/fixtures/tiny-*`,
//! laid out like its real Hub repo) renders its reference images (`reference/families/<name>.json`,
//! made by `scripts/make_fixtures.py --only <name>`) within the usual tolerance (mean |Δ| ≤ 0.1, max
//! |Δ| ≤ 4 levels), in both modes, and the two modes are bit-identical at the family's training size.

use crate::util::{copy_dir, fixtures, image_diff, sdscale, stderr, stdout};
use sdscale::weights::{ModelFiles, ModelSource};
use std::path::{Path, PathBuf};

fn model(name: &str) -> PathBuf {
    fixtures().join(format!("tiny-{name}"))
}

fn references(name: &str) -> serde_json::Value {
    let path = fixtures().join("reference/families").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn case(family: &str, file: &str) -> serde_json::Value {
    references(family)["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"] == file)
        .unwrap_or_else(|| panic!("no case {file} for {family}"))
        .clone()
}

/// Renders a reference case with the real binary on `model_dir`; returns the PNG's path.
fn render_with(dir: &Path, model_dir: &Path, case: &serde_json::Value, extra: &[&str]) -> PathBuf {
    let output = dir.join(case["file"].as_str().unwrap());
    let mut args: Vec<String> = vec!["gen".into(), "--model".into(), model_dir.display().to_string()];
    args.extend(["--prompt".into(), case["prompt"].as_str().unwrap().into()]);
    if let Some(negative) = case["negative_prompt"].as_str() {
        args.extend(["--negative-prompt".into(), negative.into()]);
    }
    for key in ["width", "height", "steps", "guidance", "seed", "mode", "eta"] {
        args.push(format!("--{key}"));
        args.push(case[key].to_string().trim_matches('"').to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["-o".into(), output.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = sdscale(dir, &args);
    assert!(result.status.success(), "sdscale failed: {}", stderr(&result));
    output
}

/// Renders a reference case in `dir` and compares it with diffusers' image; returns our PNG.
fn check_in(dir: &Path, family: &str, file: &str) -> PathBuf {
    let ours = render_with(dir, &model(family), &case(family, file), &[]);
    let reference = fixtures().join("reference/families").join(family).join(file);
    let (mean, max) = image_diff(&ours, &reference);
    eprintln!("{family}/{file}: mean |Δ| {mean:.4}, max |Δ| {max}");
    assert!(mean <= 0.1 && max <= 4, "{family}/{file}: mean |Δ| {mean:.4}, max |Δ| {max} against diffusers");
    ours
}

fn check(family: &str, file: &str) {
    check_in(tempfile::tempdir().unwrap().path(), family, file);
}

/// Both modes at the family's training size: diffusers' image, and the same image bit for bit.
fn check_training_size(family: &str, default: &str, entropy: &str) {
    let dir = tempfile::tempdir().unwrap();
    let a = check_in(dir.path(), family, default);
    let b = check_in(dir.path(), family, entropy);
    assert!(
        image::open(a).unwrap().to_rgb8() == image::open(b).unwrap().to_rgb8(),
        "{family}: at the training size both modes must give bit-identical images"
    );
}

/// The case with one DDIM step, for tests about everything but the pixels.
fn one_step(mut case: serde_json::Value) -> serde_json::Value {
    case["steps"] = 1.into();
    case
}

fn files(family: &str) -> ModelFiles {
    ModelFiles::resolve(&ModelSource::Dir(model(family)), candle_core::DType::F32).unwrap()
}

fn training_size(family: &str) -> (usize, usize) {
    let size = sdscale::pipeline::training_size_of(&files(family)).unwrap().pixels;
    (size.width, size.height)
}

/// The `sdscale` chunk of a PNG, as `sdscale info --json` prints it.
fn info_json(dir: &Path, png: &Path) -> serde_json::Value {
    let result = sdscale(dir, &["info", "--json", &png.display().to_string()]);
    assert!(result.status.success(), "{}", stderr(&result));
    serde_json::from_str(&stdout(&result)).unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

// ---- SD 1.5 ---------------------------------------------------------------------------------------

/// What makes tiny-sd15 a stand-in for stable-diffusion-v1-5 (diffusers 0.6.0's files).
#[test]
fn sd15_fixture_is_laid_out_like_the_hub_repo() {
    let dir = model("sd15");
    let index = json(&dir.join("model_index.json"));
    assert_eq!(index["safety_checker"], serde_json::json!(["stable_diffusion", "StableDiffusionSafetyChecker"]));
    assert!(dir.join("safety_checker/config.json").is_file() && dir.join("feature_extractor").is_dir());
    let unet = json(&dir.join("unet/config.json"));
    assert!(unet["attention_head_dim"].is_u64(), "an int: the same head count at every level");
    assert!(unet.get("use_linear_projection").is_none(), "0.6.0 wrote no use_linear_projection: conv projections");
    assert_eq!(unet["_diffusers_version"], "0.6.0");
    assert_eq!(json(&dir.join("text_encoder/config.json"))["hidden_act"], "quick_gelu");
    assert!(json(&dir.join("scheduler/scheduler_config.json")).get("prediction_type").is_none());
    assert_eq!(json(&dir.join("tokenizer/special_tokens_map.json"))["pad_token"], "<|endoftext|>");
}

/// diffusers reads a sample_size below 64 in a UNet config older than 0.9 as 64 (the fixture's says 16,
/// written by "0.6.0"), so SD 1.x's training size is 512 px; its T per level 4096, 1024, 256, 64.
#[test]
fn sd15_training_size_follows_diffusers_old_config_rule() {
    assert_eq!(training_size("sd15"), (512, 512));
}

#[test]
fn sd15_tokenizer_pads_with_endoftext() {
    let files = files("sd15");
    let tokenizer = sdscale::tokenizer::ClipTokenizer::load(&files.tokenizer_dir).unwrap();
    for entry in references("sd15")["tokens"].as_array().unwrap() {
        let ids: Vec<u32> = entry["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let prompt = entry["prompt"].as_str().unwrap();
        assert_eq!(tokenizer.encode(prompt).unwrap().ids, ids, "{prompt:?}");
    }
}

#[test]
fn sd15_non_square_default() {
    check("sd15", "wide160x96_default.png");
}

#[test]
fn sd15_non_square_entropy() {
    check("sd15", "wide160x96_entropy.png");
}

#[test]
fn sd15_modes_are_bit_identical_at_the_training_size() {
    check_training_size("sd15", "train512_default.png", "train512_entropy.png");
}

/// eta 0.5 with a negative prompt: the step noise continues each image's seeded generator, as
/// StableDiffusionPipeline passes its generator to DDIMScheduler.step.
#[test]
fn sd15_eta_draws_the_step_noise_like_diffusers() {
    check("sd15", "eta_wide160x96_entropy.png");
}

/// The safety checker's and feature extractor's files are never opened: each is replaced by a named
/// pipe, which would block a reader forever; the render still finishes. Metadata names the family.
#[test]
fn sd15_ignores_the_safety_checker_and_records_its_family() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("model");
    copy_dir(&model("sd15"), &copy);
    for folder in ["safety_checker", "feature_extractor"] {
        for entry in std::fs::read_dir(copy.join(folder)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::remove_file(&path).unwrap();
            assert!(std::process::Command::new("mkfifo").arg(&path).status().unwrap().success());
        }
    }
    let png = render_with(dir.path(), &copy, &one_step(case("sd15", "wide160x96_entropy.png")), &[]);
    assert_eq!(info_json(dir.path(), &png)["family"], "SD 1.x");
}

// ---- SD 2.1 (768, v-prediction) ------------------------------------------------------------------

#[test]
fn sd21v_fixture_is_laid_out_like_the_hub_repo() {
    let dir = model("sd21v");
    assert_eq!(json(&dir.join("scheduler/scheduler_config.json"))["prediction_type"], "v_prediction");
    assert_eq!(json(&dir.join("unet/config.json"))["upcast_attention"], true);
    // Its own training size (T from its sample_size), unlike 2.1-base's fixture (128 px).
    assert_eq!(training_size("sd21v"), (96, 96));
    let unet = files("sd21v").family.unet_config(&dir.join("unet/config.json")).unwrap();
    assert!(unet.upcast_attention);
}

#[test]
fn sd21v_non_square_default() {
    check("sd21v", "wide160x96_default.png");
}

#[test]
fn sd21v_non_square_entropy() {
    check("sd21v", "wide160x96_entropy.png");
}

#[test]
fn sd21v_modes_are_bit_identical_at_the_training_size() {
    check_training_size("sd21v", "train96_default.png", "train96_entropy.png");
}

#[test]
fn sd21v_eta_draws_the_step_noise_like_diffusers() {
    check("sd21v", "eta_sq128_entropy.png");
}

#[test]
fn sd21v_metadata_records_the_family() {
    let dir = tempfile::tempdir().unwrap();
    let png = render_with(dir.path(), &model("sd21v"), &one_step(case("sd21v", "train96_default.png")), &[]);
    assert_eq!(info_json(dir.path(), &png)["family"], "SD 2.x v-prediction");
}

// ---- LDM-256 -------------------------------------------------------------------------------------

/// What makes tiny-ldm a stand-in for CompVis/ldm-text2im-large-256 at refs/pr/10.
#[test]
fn ldm_fixture_is_laid_out_like_the_hub_repo() {
    let dir = model("ldm");
    assert_eq!(json(&dir.join("model_index.json"))["_class_name"], "LDMTextToImagePipeline");
    for file in ["bert/config.json", "bert/model.safetensors", "vqvae/config.json", "tokenizer/vocab.txt"] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    assert!(!dir.join("tokenizer/tokenizer.json").exists() && !dir.join("vae").exists());
    assert_eq!(json(&dir.join("scheduler/scheduler_config.json"))["beta_schedule"], "linear");
    let bert = json(&dir.join("bert/config.json"));
    let inner = bert["encoder_attention_heads"].as_u64().unwrap() * bert["head_dim"].as_u64().unwrap();
    assert_ne!(inner, bert["d_model"].as_u64().unwrap(), "LDMBert's attention is narrower than the model");
    assert_eq!(files("ldm").family, sdscale::family::Family::LatentDiffusion);
    assert_eq!(training_size("ldm"), (64, 64));
}

/// The WordPiece ids transformers' BertTokenizer gives on the fixture's vocabulary (lower-casing,
/// accents, punctuation, unknown words, CJK, specials typed in the prompt, truncation).
#[test]
fn ldm_tokenizer_matches_bert_tokenizer() {
    let tokenizer = sdscale::tokenizer::WordPieceTokenizer::load(&files("ldm").tokenizer_dir).unwrap();
    for entry in references("ldm")["tokens"].as_array().unwrap() {
        let ids: Vec<u32> = entry["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let prompt = entry["prompt"].as_str().unwrap();
        assert_eq!(tokenizer.encode(prompt).unwrap().ids, ids, "{prompt:?}");
    }
}

#[test]
fn ldm_non_square_default() {
    check("ldm", "wide192x128_default.png");
}

#[test]
fn ldm_non_square_entropy() {
    check("ldm", "wide192x128_entropy.png");
}

#[test]
fn ldm_modes_are_bit_identical_at_the_training_size() {
    check_training_size("ldm", "train64_default.png", "train64_entropy.png");
}

/// guidance 1 (diffusers' LDM default): the conditional branch alone.
#[test]
fn ldm_guidance_one_runs_the_conditional_branch_only() {
    check("ldm", "guidance1_wide160x96_entropy.png");
}

/// LDM guides whenever guidance ≠ 1, so 0.5 still runs both branches (SD would not).
#[test]
fn ldm_guidance_below_one_still_guides() {
    check("ldm", "guidance05_sq128_default.png");
}

/// The model card's guidance 6 with eta 0.3 (noise from the seeded generator, see the fixture script).
#[test]
fn ldm_eta_matches_diffusers_given_the_same_generator() {
    check("ldm", "eta_sq128_entropy.png");
}

#[test]
fn ldm_refuses_a_negative_prompt_and_records_its_family() {
    let dir = tempfile::tempdir().unwrap();
    let png = render_with(dir.path(), &model("ldm"), &one_step(case("ldm", "train64_default.png")), &[]);
    assert_eq!(info_json(dir.path(), &png)["family"], "LDM text2im");
    let model = model("ldm").display().to_string();
    let args =
        ["gen", "--model", &model, "--prompt", "x", "--negative-prompt", "blurry", "--seed", "1", "-o", "negative.png"];
    let result = sdscale(dir.path(), &args);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    let message = stderr(&result);
    assert!(message.contains("negative prompt") && message.lines().count() == 1, "{message}");
    assert!(!dir.path().join("negative.png").exists());
}

/// Offline, the LDM repo fails in one line naming the revision it would fetch (its main branch has
/// only pickles, so refs/pr/10 is taken by default).
#[test]
fn ldm_hub_offline_error_names_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_sdscale"))
        .args(["gen", "--model", "CompVis/ldm-text2im-large-256", "--prompt", "a corgi", "-o", "x.png"])
        .current_dir(dir.path())
        .env("HF_HOME", dir.path().join("hf-home"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    let message = stderr(&result);
    let errors: Vec<&str> = message.lines().filter(|l| l.starts_with("sdscale: error:")).collect();
    assert_eq!(errors.len(), 1, "{message}");
    assert!(errors[0].contains("refs/pr/10"), "{message}");
}

// ---- every family --------------------------------------------------------------------------------

/// `sdscale entropy` measures every family's self-attention layers (the training size included).
#[test]
fn entropy_works_for_every_family() {
    for family in ["sd15", "sd21v", "ldm"] {
        let dir = tempfile::tempdir().unwrap();
        let model = model(family).display().to_string();
        let args = [
            "entropy", "--model", &model, "--prompt", "a corgi", "--sizes", "64", "--steps", "1", "--seed", "1",
            "--json",
        ];
        let result = sdscale(dir.path(), &args);
        assert!(result.status.success(), "{family}: {}", stderr(&result));
        let lines: Vec<serde_json::Value> =
            stdout(&result).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert!(lines.iter().any(|l| l["mode"] == "entropy" && l["width"] == 64), "{family}");
        assert!(lines.iter().all(|l| l["entropy"].as_f64().is_some_and(f64::is_finite)), "{family}");
    }
}

/// `sdscale compare` renders every family in its three default modes.
#[test]
fn compare_works_for_every_family() {
    for family in ["sd15", "sd21v", "ldm"] {
        let dir = tempfile::tempdir().unwrap();
        let model = model(family).display().to_string();
        let args = [
            "compare", "--model", &model, "--prompt", "a corgi", "--width", "64", "--height", "64", "--steps", "1",
            "--seeds", "1", "-o", "grid.png",
        ];
        let result = sdscale(dir.path(), &args);
        assert!(result.status.success(), "{family}: {}", stderr(&result));
        assert_eq!(stdout(&result).lines().count(), 4, "{family}: three images and the grid");
    }
}

// ---- defaults that follow the family ---------------------------------------------------------------

/// Runs `gen` with `--json`; returns the PNG and its JSON record.
fn gen_json(dir: &Path, model_dir: &Path, name: &str, extra: &[&str]) -> (PathBuf, serde_json::Value) {
    let model = model_dir.display().to_string();
    let mut args = vec!["gen", "--model", &model, "--prompt", "a corgi", "--width", "64", "--height", "64"];
    args.extend(["--steps", "2", "--seed", "3", "--json", "-o", name]);
    args.extend(extra);
    let result = sdscale(dir, &args);
    assert!(result.status.success(), "{}", stderr(&result));
    (dir.join(name), serde_json::from_str(stdout(&result).trim()).unwrap())
}

/// Without --guidance each family takes its pipeline's default: LDM-256 1 (diffusers'
/// LDMTextToImagePipeline), Stable Diffusion 7.5. The image equals the one with that value given, not
/// the other family's, and --json and the PNG record the value used.
#[test]
fn guidance_defaults_to_the_familys() {
    for (family, default, other) in [("ldm", 1.0, 7.5), ("sd15", 7.5, 1.0)] {
        let dir = tempfile::tempdir().unwrap();
        let (unset, record) = gen_json(dir.path(), &model(family), "unset.png", &[]);
        let (given, _) = gen_json(dir.path(), &model(family), "given.png", &["--guidance", &default.to_string()]);
        let (others, _) = gen_json(dir.path(), &model(family), "other.png", &["--guidance", &other.to_string()]);
        assert_eq!(image_diff(&unset, &given), (0.0, 0), "{family}: no --guidance must be --guidance {default}");
        assert_ne!(image_diff(&unset, &others), (0.0, 0), "{family}: --guidance {other} must change the image");
        assert_eq!(record["guidance"].as_f64(), Some(default), "{family}: --json");
        assert_eq!(info_json(dir.path(), &unset)["guidance"].as_f64(), Some(default), "{family}: metadata");
    }
}

/// LDM's default reaches every path that takes a guidance: a prompt-file line without one (beside a
/// line with its own), `--from` (the metadata carries the value used) and `compare`.
#[test]
fn ldm_default_guidance_reaches_prompt_files_from_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.jsonl"),
        "{\"prompt\": \"a corgi\"}\n{\"prompt\": \"a corgi\", \"guidance\": 6}\n",
    )
    .unwrap();
    let ldm = model("ldm").display().to_string();
    let mut args = vec!["gen", "--model", &ldm, "--prompts", "p.jsonl", "--width", "64", "--height", "64"];
    args.extend(["--steps", "2", "--seed", "3", "--json", "-o", "line{prompt_index}.png"]);
    let result = sdscale(dir.path(), &args);
    assert!(result.status.success(), "{}", stderr(&result));
    let guidance: Vec<Option<f64>> = stdout(&result)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["guidance"].as_f64())
        .collect();
    assert_eq!(guidance, [Some(1.0), Some(6.0)]);
    let (plain, _) = gen_json(dir.path(), &model("ldm"), "plain.png", &[]);
    assert_eq!(image_diff(&plain, &dir.path().join("line0.png")), (0.0, 0));

    let result = sdscale(dir.path(), &["gen", "--from", "line1.png", "--json", "-o", "again.png"]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(image_diff(&dir.path().join("line1.png"), &dir.path().join("again.png")), (0.0, 0));

    let mut args = vec!["compare", "--model", &ldm, "--prompt", "a corgi", "--width", "64", "--height", "64"];
    args.extend(["--steps", "2", "--seeds", "3", "--modes", "default", "-o", "grid.png"]);
    let result = sdscale(dir.path(), &args);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(image_diff(&plain, &dir.path().join("grid.default.seed3.png")), (0.0, 0));
    assert_eq!(info_json(dir.path(), &dir.path().join("grid.png"))["guidance"].as_f64(), Some(1.0));
}

/// MultiDiffusion's window is one training-size image: tiny-sd21v's 12 latents (its "768²"), tiny-ldm's
/// 8 (its "256²"). Windows per side: 1 up to the window, else (side − window) // 8 + 1.
#[test]
fn multidiffusion_windows_follow_the_training_size() {
    use sdscale::mode::{Denoiser, Mode};
    use sdscale::size::PixelSize;
    let blocks = |side: usize, window: usize| if side <= window { 1 } else { (side - window) / 8 + 1 };
    for (family, window, (width, height)) in
        [("sd21v", 12, (160, 96)), ("ldm", 8, (192, 128)), ("sd15", 64, (640, 576))]
    {
        let training = sdscale::pipeline::training_size_of(&files(family)).unwrap();
        let plan = Mode::Multidiffusion.plan(PixelSize::new(width, height), training, Default::default());
        let Denoiser::Views(views) = plan.denoiser else { panic!("{family}: MultiDiffusion denoises windows") };
        assert_eq!((views.window.height, views.window.width), (window, window), "{family}");
        let (rows, cols) = (height / 8, width / 8);
        let windows = views.windows(rows, cols);
        assert_eq!(windows.len(), blocks(rows, window) * blocks(cols, window), "{family} at {width}x{height}");
        assert!(windows.len() > 1, "{family}: the size should need several windows");
    }
}

/// On a family whose window is not diffusers' 64: at the training size MultiDiffusion is one window,
/// the plain pipeline bit for bit; above it, `--from` remakes the image exactly.
#[test]
fn multidiffusion_on_sd21v_is_plain_at_its_training_size_and_remade_by_from() {
    let dir = tempfile::tempdir().unwrap();
    let sd21v = model("sd21v").display().to_string();
    let run = |mode: &str, width: &str, name: &str| {
        let mut args = vec!["gen", "--model", &sd21v, "--prompt", "a corgi", "--width", width, "--height", "96"];
        args.extend(["--steps", "2", "--seed", "5", "--mode", mode, "-o", name]);
        let result = sdscale(dir.path(), &args);
        assert!(result.status.success(), "{}", stderr(&result));
        dir.path().join(name)
    };
    let md = run("multidiffusion", "96", "md96.png");
    assert_eq!(image_diff(&md, &run("default", "96", "default96.png")), (0.0, 0), "one window is the plain pipeline");
    let wide = run("multidiffusion", "160", "md160.png");
    assert_ne!(image_diff(&wide, &run("default", "160", "default160.png")), (0.0, 0), "two windows are not");
    let result = sdscale(dir.path(), &["gen", "--from", "md160.png", "-o", "again.png"]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(image_diff(&wide, &dir.path().join("again.png")), (0.0, 0), "--from made another image");
}
