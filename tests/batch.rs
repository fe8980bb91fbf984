//! Batch generation from the shell (issue 3): prompt files and JSONL overrides, `{index}` templates,
//! batched UNet calls equal to one-at-a-time, collisions, no-clobber, resuming, interruption,
//! metadata round trips and resize mode.

use crate::util::{files_ending, image_diff, model_arg, sdscale, sdscale_with_stdin, stderr, stdout, success_lines};
use std::path::Path;
use std::process::{Command, Stdio};

/// Small and fast: 64×64 (the fixture's training size is 128), 2 steps.
fn gen_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["gen", "--model", model, "--steps", "2", "--width", "64", "--height", "64"];
    args.extend_from_slice(extra);
    args
}

fn json_lines(output: &std::process::Output) -> Vec<serde_json::Value> {
    success_lines(output).iter().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

fn info_json(dir: &Path, image: &str) -> serde_json::Value {
    let result = sdscale(dir, &["info", "--json", image]);
    serde_json::from_str(&success_lines(&result).join("\n")).unwrap()
}

#[test]
fn prompts_file_with_num_images_and_an_index_template() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    std::fs::write(dir.path().join("prompts.txt"), "# corgis\na corgi\n\n  a cat on a mat  \n").unwrap();
    let args = gen_args(
        &model,
        &["--prompts", "prompts.txt", "--num-images", "2", "--seed", "100", "-o", "out/{index:04}-{seed}-{mode}.png"],
    );
    let lines = success_lines(&sdscale(dir.path(), &args));
    assert_eq!(
        lines,
        [
            "out/0000-100-default.png",
            "out/0001-101-default.png",
            "out/0002-100-default.png",
            "out/0003-101-default.png"
        ]
    );
    // A prompt's image i uses seed + i whatever its line: the cat's first image is seed 100.
    assert_eq!(info_json(dir.path(), "out/0002-100-default.png")["prompt"], "a cat on a mat");
    assert_eq!(info_json(dir.path(), "out/0003-101-default.png")["seed"], 101);
}

#[test]
fn jsonl_on_stdin_overrides_per_line_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let input = r#"{"prompt": "a corgi", "seed": 5, "mode": "entropy", "width": 96}
{"prompt": "a red barn", "negative_prompt": "blurry", "steps": 1, "guidance": 1.0, "height": 72, "mode": "resize"}
"#;
    let args =
        gen_args(&model, &["--prompts", "-", "--seed", "9", "--json", "-o", "{prompt}-{seed}-{width}x{height}.png"]);
    let objects = json_lines(&sdscale_with_stdin(dir.path(), &args, input));
    assert_eq!(objects.len(), 2);
    let keys = [
        "path",
        "prompt",
        "negative_prompt",
        "seed",
        "width",
        "height",
        "steps",
        "guidance",
        "mode",
        "sampler",
        "schedule",
        "timestep_spacing",
        "model",
        "seconds",
        "peak_device_mib",
        "prompt_index",
        "image_index",
    ];
    for object in &objects {
        let mut got: Vec<&str> = object.as_object().unwrap().keys().map(String::as_str).collect();
        got.sort();
        let mut want = keys.to_vec();
        want.sort();
        assert_eq!(got, want);
    }
    assert_eq!(objects[0]["path"], "a-corgi-5-96x64.png");
    assert_eq!((objects[0]["mode"].as_str(), objects[0]["steps"].as_u64()), (Some("entropy"), Some(2)));
    assert_eq!(objects[1]["path"], "a-red-barn-9-64x72.png");
    assert_eq!(objects[1]["negative_prompt"], "blurry");
    assert_eq!((objects[1]["steps"].as_u64(), objects[1]["guidance"].as_f64()), (Some(1), Some(1.0)));
    assert_eq!(image::open(dir.path().join("a-corgi-5-96x64.png")).unwrap().width(), 96);
    assert_eq!(image::open(dir.path().join("a-red-barn-9-64x72.png")).unwrap().height(), 72);

    // The JSON output is valid JSONL input: feed it back (its path/model/seconds are ignored).
    let again: String = objects.iter().map(|o| format!("{o}\n")).collect();
    let args = gen_args(&model, &["--prompts", "-", "--json", "-o", "again/{index}.png"]);
    let replay = json_lines(&sdscale_with_stdin(dir.path(), &args, &again));
    assert_eq!(replay.len(), 2);
    assert_eq!(image_diff(&dir.path().join("again/0.png"), &dir.path().join("a-corgi-5-96x64.png")).1, 0);
}

#[test]
fn a_bad_line_is_named_and_nothing_is_generated() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let input = "a corgi\n# fine\n{\"prompt\": \"x\", \"width\": 100}\n";
    let result = sdscale_with_stdin(dir.path(), &gen_args(&model, &["--prompts", "-", "--seed", "1"]), input);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(stderr(&result).contains("stdin line 3: width 100 must be a multiple of 8"), "{}", stderr(&result));
    assert!(files_ending(dir.path(), ".png").is_empty());
}

/// Same prompts and seeds through the UNet 3 at a time and one at a time: the same images.
#[test]
fn batched_images_equal_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    std::fs::write(dir.path().join("p.txt"), "a corgi\na cat\na castle on a hill\n").unwrap();
    let common = ["--prompts", "p.txt", "--seed", "3", "--mode", "entropy", "--width", "96", "--height", "96"];
    let mut batched = gen_args(&model, &common);
    batched.extend(["--batch-size", "3", "-o", "batched/{index}.png"]);
    success_lines(&sdscale(dir.path(), &batched));
    let mut single = gen_args(&model, &common);
    single.extend(["--batch-size", "1", "-o", "single/{index}.png"]);
    success_lines(&sdscale(dir.path(), &single));
    for index in 0..3 {
        let (mean, max) = image_diff(
            &dir.path().join(format!("batched/{index}.png")),
            &dir.path().join(format!("single/{index}.png")),
        );
        assert!(mean <= 0.01 && max <= 1, "image {index}: mean |Δ| {mean}, max |Δ| {max}");
    }
    // And a batch is not the same image three times.
    assert!(image_diff(&dir.path().join("batched/0.png"), &dir.path().join("batched/1.png")).0 > 1.0);
}

#[test]
fn two_images_with_one_name_are_refused_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let result = sdscale(dir.path(), &gen_args(&model, &["--prompt", "x", "--num-images", "2", "-o", "out/same.png"]));
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(stderr(&result).contains("images 0 and 1 would both be written"), "{}", stderr(&result));
    assert!(!dir.path().join("out").exists() || files_ending(dir.path(), ".png").is_empty());
    // The same prompt twice with the same seed collides too, whatever the template lacks.
    std::fs::write(dir.path().join("p.txt"), "x\nx\n").unwrap();
    let result =
        sdscale(dir.path(), &gen_args(&model, &["--prompts", "p.txt", "--seed", "1", "-o", "{prompt}-{seed}.png"]));
    assert_eq!(result.status.code(), Some(2));
    assert!(files_ending(dir.path(), ".png").is_empty());
}

#[test]
fn existing_files_are_kept_and_skip_existing_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let run = |extra: &[&str]| {
        let mut args =
            gen_args(&model, &["--prompt", "a corgi", "--num-images", "3", "--seed", "1", "-o", "b/{index}.png"]);
        args.extend_from_slice(extra);
        sdscale(dir.path(), &args)
    };
    std::fs::create_dir(dir.path().join("b")).unwrap();
    std::fs::write(dir.path().join("b/1.png"), b"precious").unwrap();
    let refused = run(&[]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("b/1.png already exists") && stderr(&refused).contains("--skip-existing")
            || stderr(&refused).contains("--overwrite")
    );
    assert!(!dir.path().join("b/0.png").exists(), "nothing may be generated when refusing");

    let lines = success_lines(&run(&["--skip-existing"]));
    assert_eq!(lines, ["b/0.png", "b/2.png"]);
    assert_eq!(std::fs::read(dir.path().join("b/1.png")).unwrap(), b"precious");

    let lines = success_lines(&run(&["--overwrite"]));
    assert_eq!(lines.len(), 3);
    assert_eq!(image::open(dir.path().join("b/1.png")).unwrap().width(), 64);
    assert!(stdout(&run(&["--skip-existing"])).is_empty());
}

/// Starts a long batch, waits for its first image, then signals it; every PNG on disk must decode.
fn interrupt_batch(signal: &str) -> (tempfile::TempDir, std::process::Output) {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let args =
        gen_args(&model, &["--prompt", "a corgi", "--num-images", "40", "--seed", "1", "-o", "run/{index:03}.png"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdscale"))
        .args(&args)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert_eq!(first.trim(), "run/000.png");
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let output = child.wait_with_output().unwrap();
    let written = files_ending(dir.path(), ".png");
    assert!(!written.is_empty() && written.len() < 40, "{} images written", written.len());
    for png in &written {
        image::open(png).unwrap_or_else(|e| panic!("{} does not decode: {e}", png.display()));
    }
    (dir, output)
}

#[test]
fn interrupted_batch_leaves_only_whole_images_and_resumes() {
    let (dir, output) = interrupt_batch("-INT");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("interrupted: wrote"), "{}", stderr(&output));
    assert!(files_ending(dir.path(), ".tmp").is_empty(), "a temporary file was left behind");

    let model = model_arg();
    let args = gen_args(
        &model,
        &["--prompt", "a corgi", "--num-images", "40", "--seed", "1", "-o", "run/{index:03}.png", "--skip-existing"],
    );
    let before = files_ending(dir.path(), ".png").len();
    let lines = success_lines(&sdscale(dir.path(), &args));
    assert_eq!(lines.len(), 40 - before);
    assert_eq!(files_ending(dir.path(), ".png").len(), 40);
}

#[test]
fn killed_batch_leaves_only_whole_pngs() {
    let (dir, output) = interrupt_batch("-KILL");
    assert_eq!(output.status.code(), None, "killed by a signal");
    // A temporary file may remain after kill -9, but never under a .png name.
    for temp in files_ending(dir.path(), ".tmp") {
        assert!(temp.file_name().unwrap().to_string_lossy().starts_with('.'));
    }
}

#[test]
fn metadata_round_trips_through_info_and_from() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let args = gen_args(
        &model,
        &["--prompt", "a corgi, «unicode»", "--negative-prompt", "blurry", "--seed", "77", "--mode", "entropy"],
    );
    let mut args = args;
    args.extend(["--width", "96", "--guidance", "5.5", "-o", "a.png"]);
    success_lines(&sdscale(dir.path(), &args));

    let parameters = success_lines(&sdscale(dir.path(), &["info", "a.png"])).join("\n");
    assert!(
        parameters.starts_with("a corgi, «unicode»\nNegative prompt: blurry\nSteps: 2, Sampler: DDIM"),
        "{parameters}"
    );
    assert!(parameters.contains("CFG scale: 5.5, Seed: 77, Size: 96x64") && parameters.ends_with("Mode: entropy"));
    let json = info_json(dir.path(), "a.png");
    for (key, want) in [("tool", "sdscale"), ("mode", "entropy"), ("dtype", "f32"), ("device", "cpu")] {
        assert_eq!(json[key], want, "{key}");
    }
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["model"], model.as_str());

    // --from reproduces the image; flags override single settings.
    success_lines(&sdscale(dir.path(), &["gen", "--from", "a.png", "-o", "b.png"]));
    assert_eq!(image_diff(&dir.path().join("a.png"), &dir.path().join("b.png")).1, 0);
    success_lines(&sdscale(dir.path(), &["gen", "--from", "a.png", "--mode", "default", "-o", "c.png"]));
    let c = info_json(dir.path(), "c.png");
    assert_eq!((c["mode"].as_str(), c["seed"].as_u64(), c["width"].as_u64()), (Some("default"), Some(77), Some(96)));
    assert!(image_diff(&dir.path().join("a.png"), &dir.path().join("c.png")).0 > 0.5);

    // Not our image: a clean refusal.
    image::RgbImage::new(8, 8).save(dir.path().join("plain.png")).unwrap();
    let result = sdscale(dir.path(), &["info", "plain.png"]);
    assert_eq!(result.status.code(), Some(2));
    assert!(stderr(&result).contains("no generation metadata"));
}

/// resize = default scale at ≈ the training pixel count with the target's aspect, then Lanczos3.
#[test]
fn resize_mode_renders_near_the_training_size_then_resizes() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let common = ["--prompt", "a corgi", "--seed", "4"];
    let mut resize = gen_args(&model, &common);
    resize.extend(["--mode", "resize", "--width", "192", "--height", "96", "-o", "resize.png"]);
    success_lines(&sdscale(dir.path(), &resize));
    let json = info_json(dir.path(), "resize.png");
    // P = 128², aspect 2:1: 8·round(√(P·2)/8) = 184, 8·round(√(P/2)/8) = 88.
    assert_eq!(json["render_size"], serde_json::json!([184, 88]));
    let parameters = success_lines(&sdscale(dir.path(), &["info", "resize.png"])).join("\n");
    assert!(parameters.contains("Mode: resize, Render size: 184x88"), "{parameters}");

    let mut rendered = gen_args(&model, &common);
    rendered.extend(["--mode", "default", "--width", "184", "--height", "88", "-o", "render.png"]);
    success_lines(&sdscale(dir.path(), &rendered));
    let render = image::open(dir.path().join("render.png")).unwrap().to_rgb8();
    let expected = image::imageops::resize(&render, 192, 96, image::imageops::FilterType::Lanczos3);
    let got = image::open(dir.path().join("resize.png")).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), (192, 96));
    assert!(got == expected, "resize must be the default-scale render resized with Lanczos3");
}

#[test]
fn help_documents_exit_codes_and_completions_work() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["--help"][..], &["gen", "--help"]] {
        let help = success_lines(&sdscale(dir.path(), args)).join("\n");
        assert!(help.contains("Exit codes:") && help.contains("2  bad usage"), "{help}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let script = success_lines(&sdscale(dir.path(), &["completions", shell])).join("\n");
        assert!(script.contains("sdscale") && script.contains("batch-size"), "{shell}");
    }
}
