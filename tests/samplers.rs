//! Every sampler against diffusers 0.42.1, made by `scripts/make_fixtures.py --only samplers`
//! (scripts/fixture_samplers.py):
//! - `schedulers.json`: each scheduler built as `Class.from_config(model config, **overrides)`, its
//!   timesteps, init_noise_sigma and UNet calls, and a trajectory with a stand-in model
//!   (output = 0.5·input + 0.001·t) and the noise generator seeded 7, so the sampler arithmetic is
//!   checked alone, step by step, on four real scheduler configs (SD 2.1-base's PNDM file, SD 2.1-v,
//!   SDXL base's Euler file, SDXL-Turbo's Euler a file);
//! - `images.json`: whole images from the tiny SD 2.1-base fixture, every sampler and mode.

use crate::util::*;
use candle_core::{Device, Tensor};
use sdscale::rng::{randn, TorchGenerator};
use sdscale::sampler::{SamplerChoice, SamplerKind, Schedule, SchedulerConfig, Spacing};
use std::path::PathBuf;

fn samplers_reference(name: &str) -> PathBuf {
    reference("samplers").join(name)
}

fn base_config(base: &str) -> SchedulerConfig {
    let path = match base {
        "sd21" => tiny_model().join("scheduler/scheduler_config.json"),
        "sd21v" => fixtures().join("tiny-sd21v/scheduler/scheduler_config.json"),
        "sdxl" => samplers_reference("configs/sdxl-base-1.0/scheduler_config.json"),
        "sdxl_turbo" => samplers_reference("configs/sdxl-turbo/scheduler_config.json"),
        other => panic!("unknown base {other}"),
    };
    SchedulerConfig::load(&path).unwrap()
}

fn choice_of(case: &serde_json::Value) -> SamplerChoice {
    let sampler = case["sampler"].as_str().unwrap();
    SamplerChoice {
        kind: if sampler == "model" { None } else { Some(SamplerKind::parse(sampler).unwrap()) },
        schedule: case["schedule"].as_str().map(|s| Schedule::parse(s).unwrap()),
        spacing: case["timestep_spacing_override"].as_str().map(|s| Spacing::parse(s).unwrap()),
    }
}

/// Timesteps, start noise, UNet calls and the whole trajectory of every scheduler case.
#[test]
fn every_sampler_steps_as_diffusers_does() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(samplers_reference("schedulers.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(samplers_reference("schedulers.safetensors"), &Device::Cpu).unwrap();
    let mut checked = 0;
    let mut worst = (0f32, String::new());
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let config = base_config(case["base"].as_str().unwrap());
        let steps = case["steps"].as_u64().unwrap() as usize;
        let resolved = config.resolve(&choice_of(case));
        // diffusers silently drops use_karras_sigmas on DDIM, PNDM and Euler a; sdscale refuses instead.
        let ignored = case["ignored_overrides"].as_array().is_some_and(|o| !o.is_empty());
        if case["refused"].as_bool() == Some(true) || ignored {
            assert!(resolved.and_then(|spec| config.build(&spec, steps, 0.0)).is_err(), "{name}: diffusers refuses it");
            continue;
        }
        let spec = resolved.unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let mut sampler = config.build(&spec, steps, 0.0).unwrap_or_else(|e| panic!("{name}: {e:#}"));

        let want_calls: Vec<f64> = serde_json::from_value(case["model_call_timesteps"].clone()).unwrap();
        let got_calls = sampler.timesteps().to_vec();
        assert_eq!(got_calls.len(), want_calls.len(), "{name}: UNet calls");
        for (got, want) in got_calls.iter().zip(&want_calls) {
            assert!((got - want).abs() <= 1e-3, "{name}: timesteps {got_calls:?} vs {want_calls:?}");
        }
        let init = case["init_noise_sigma"].as_f64().unwrap();
        assert!((sampler.init_noise_sigma() as f64 - init).abs() <= 1e-5 * init, "{name}: init_noise_sigma");

        // The trajectory: x = randn·init_noise_sigma, then per call the stand-in model and a step, with
        // the step's noise continuing the same generator.
        let mut generator = TorchGenerator::new(7);
        let x0 = Tensor::from_vec(randn(&mut generator, 256), (1, 4, 8, 8), &Device::Cpu).unwrap();
        let mut x = (x0 * sampler.init_noise_sigma() as f64).unwrap();
        let (diff, _) = max_abs_diff(&x, &tensors[&format!("{name}/x0")]);
        assert!(diff <= 1e-5, "{name}: initial latents differ by {diff}");
        for (index, &t) in got_calls.iter().enumerate() {
            let x_in = sampler.scale_model_input(&x, index).unwrap();
            let (diff, scale) = max_abs_diff(&x_in, &tensors[&format!("{name}/in{index}")]);
            assert!(diff <= 1e-5 * scale.max(1.0), "{name}: model input {index} differs by {diff}");
            let model_output = ((&x_in * 0.5).unwrap() + (0.001f32 * t as f32) as f64).unwrap();
            let mut noise = |shape: &[usize]| -> anyhow::Result<Tensor> {
                assert_eq!(shape, [1, 4, 8, 8]);
                Ok(Tensor::from_vec(randn(&mut generator, 256), (1, 4, 8, 8), &Device::Cpu)?)
            };
            x = sampler.step(&model_output, index, &x, &mut noise).unwrap();
            let (diff, scale) = max_abs_diff(&x, &tensors[&format!("{name}/step{index}")]);
            let relative = diff / scale.max(1.0);
            if relative > worst.0 {
                worst = (relative, format!("{name} step {index}"));
            }
            assert!(relative <= 2e-5, "{name}: after call {index} the sample differs by {diff} (scale {scale})");
        }
        checked += 1;
    }
    eprintln!("worst relative difference {:.2e} at {}", worst.0, worst.1);
    assert!(checked >= 150, "only {checked} cases");
}

fn image_cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(samplers_reference("images.json")).unwrap();
    serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap()
}

/// `--sampler`, `--schedule`, `--timestep-spacing` and the rest of a case as flags.
fn case_flags(case: &serde_json::Value) -> Vec<String> {
    let mut args: Vec<String> = vec!["--model".into(), tiny_model().display().to_string()];
    args.extend(["--prompt".into(), case["prompt"].as_str().unwrap().into()]);
    if let Some(negative) = case["negative_prompt"].as_str() {
        args.extend(["--negative-prompt".into(), negative.into()]);
    }
    for key in ["width", "height", "steps", "guidance", "seed", "sampler"] {
        args.push(format!("--{key}"));
        args.push(case[key].to_string().trim_matches('"').to_string());
    }
    if let Some(schedule) = case["schedule"].as_str() {
        args.extend(["--schedule".into(), schedule.into()]);
    }
    if let Some(spacing) = case["timestep_spacing"].as_str() {
        args.extend(["--timestep-spacing".into(), spacing.into()]);
    }
    args
}

fn check_image(ours: &std::path::Path, file: &str, spread: &serde_json::Value, worst: &mut (f64, u8, String)) {
    let (mean, max) = image_diff(ours, &samplers_reference(file));
    eprintln!("{file}: mean |Δ| {mean:.4}, max |Δ| {max} (diffusers' own 1-vs-2-thread spread: max {})", spread["max"]);
    if mean > worst.0 || max > worst.1 {
        *worst = (worst.0.max(mean), worst.1.max(max), file.to_string());
    }
    assert!(mean <= 0.1 && max <= 4, "{file}: mean |Δ| {mean:.4}, max |Δ| {max} against diffusers");
}

/// Every single-image case but MultiDiffusion, through one prompt file (JSON lines setting sampler,
/// schedule, spacing, size, steps, guidance and mode per line): one model load for ~50 images.
#[test]
fn every_sampler_makes_diffusers_images_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<serde_json::Value> =
        image_cases().into_iter().filter(|c| c["num_images"] == 1 && c.get("pipeline").is_none()).collect();
    let mut lines = String::new();
    for case in &cases {
        let mut line = serde_json::json!({
            "prompt": case["prompt"], "width": case["width"], "height": case["height"], "steps": case["steps"],
            "guidance": case["guidance"], "seed": case["seed"], "mode": case["mode"], "sampler": case["sampler"],
        });
        for key in ["negative_prompt", "schedule", "timestep_spacing"] {
            if !case[key].is_null() {
                line[key] = case[key].clone();
            }
        }
        lines.push_str(&format!("{line}\n"));
    }
    std::fs::write(dir.path().join("cases.jsonl"), lines).unwrap();
    let model = tiny_model().display().to_string();
    let args = ["gen", "--model", &model, "--prompts", "cases.jsonl", "-o", "{index:03}.png"];
    let output = sdscale(dir.path(), &args);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut worst = (0.0, 0, String::new());
    for (index, case) in cases.iter().enumerate() {
        let ours = dir.path().join(format!("{index:03}.png"));
        check_image(&ours, case["file"].as_str().unwrap(), &case["thread_spread"], &mut worst);
    }
    eprintln!("worst: mean {:.4}, max {} ({})", worst.0, worst.1, worst.2);
    assert!(cases.len() >= 45, "only {} cases", cases.len());
}

/// Two images of one prompt in one batch: each continues its own generator (diffusers with one
/// generator per image), so stochastic samplers give each the image it gets alone.
#[test]
fn stochastic_samplers_draw_each_images_noise_from_its_own_generator() {
    for case in image_cases().into_iter().filter(|c| c["num_images"] == 2) {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["gen".to_string()];
        args.extend(case_flags(&case));
        args.extend(["--num-images", "2", "--batch-size", "2", "-o", "{image}.png"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = sdscale(dir.path(), &args);
        assert!(output.status.success(), "{}", stderr(&output));
        let mut worst = (0.0, 0, String::new());
        for (i, file) in case["files"].as_array().unwrap().iter().enumerate() {
            check_image(
                &dir.path().join(format!("{i}.png")),
                file.as_str().unwrap(),
                &case["thread_spread"],
                &mut worst,
            );
        }
    }
}

/// MultiDiffusion keeps one sampler state per window, as diffusers' panorama pipeline does, also for
/// multistep (DPM++, PNDM) and stochastic (Euler a) samplers.
#[test]
fn multidiffusion_keeps_a_sampler_state_per_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut worst = (0.0, 0, String::new());
    for case in image_cases().into_iter().filter(|c| c.get("pipeline").is_some()) {
        let mut args = vec!["gen".to_string()];
        args.extend(case_flags(&case));
        args.extend(["--mode", "multidiffusion", "--train-size", "512x512", "--md-views"].map(String::from));
        args.push(case["views"].as_str().unwrap().into());
        let file = case["file"].as_str().unwrap();
        args.extend(["-o".into(), file.into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = sdscale(dir.path(), &args);
        assert!(output.status.success(), "{}", stderr(&output));
        check_image(&dir.path().join(file), file, &case["thread_spread"], &mut worst);
    }
}

/// At the training size N = T in every layer, so the entropy scale is 1/√d bit for bit under every
/// sampler: `--samplers` × `--modes` at 128² (the fixture's training size) gives pairs of equal images.
#[test]
fn at_the_training_size_entropy_equals_default_under_every_sampler() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let samplers: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.as_str()).collect();
    let samplers = samplers.join(",");
    let args = [
        "gen",
        "--model",
        &model,
        "--prompt",
        "a corgi",
        "--steps",
        "3",
        "--seed",
        "5",
        "--samplers",
        &samplers,
        "--modes",
        "default,entropy",
    ];
    let output = sdscale(dir.path(), &args);
    assert!(output.status.success(), "{}", stderr(&output));
    let written = success_lines(&output);
    // The default name gains -{sampler} when --samplers lists several.
    assert_eq!(written.len(), 18, "{written:?}");
    for kind in SamplerKind::ALL {
        let [default, entropy] =
            ["default", "entropy"].map(|mode| dir.path().join(format!("a-corgi-5-{mode}-{}.png", kind.as_str())));
        let (default, entropy) = (image::open(&default).unwrap().to_rgb8(), image::open(&entropy).unwrap().to_rgb8());
        assert!(default == entropy, "{}: entropy differs from default at the training size", kind.as_str());
    }
}

/// The sampler reaches the metadata in both forms, `info` shows A1111's, and `--from` remakes it.
#[test]
fn the_sampler_is_recorded_and_remade_by_from() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let args = [
        "gen",
        "--model",
        &model,
        "--prompt",
        "a corgi",
        "--steps",
        "3",
        "--seed",
        "5",
        "--width",
        "64",
        "--height",
        "64",
        "--sampler",
        "dpmpp_2m",
        "--schedule",
        "karras",
        "-o",
        "a.png",
        "--json",
    ];
    let output = sdscale(dir.path(), &args);
    assert!(output.status.success(), "{}", stderr(&output));
    let record: serde_json::Value = serde_json::from_str(&success_lines(&output)[0]).unwrap();
    assert_eq!((record["sampler"].as_str(), record["schedule"].as_str()), (Some("dpmpp_2m"), Some("karras")));
    assert_eq!(record["timestep_spacing"], "linspace", "SD 2.1's config names none: DPM++'s default");
    let parameters = success_lines(&sdscale(dir.path(), &["info", "a.png"])).join("\n");
    assert!(parameters.contains("Sampler: DPM++ 2M, Schedule type: Karras, CFG scale"), "{parameters}");
    let again = sdscale(dir.path(), &["gen", "--model", &model, "--from", "a.png", "-o", "b.png"]);
    assert!(again.status.success(), "{}", stderr(&again));
    let (a, b) = (
        image::open(dir.path().join("a.png")).unwrap().to_rgb8(),
        image::open(dir.path().join("b.png")).unwrap().to_rgb8(),
    );
    assert!(a == b, "--from must remake the DPM++ 2M Karras image");
    let ddim = sdscale(dir.path(), &["gen", "--model", &model, "--from", "a.png", "--sampler", "ddim", "-o", "c.png"]);
    assert!(ddim.status.success(), "a stored schedule goes with its stored sampler: {}", stderr(&ddim));
    let parameters = success_lines(&sdscale(dir.path(), &["info", "c.png"])).join("\n");
    assert!(parameters.contains("Sampler: DDIM, CFG scale"), "{parameters}");
}

/// An AUTOMATIC1111 PNG names its sampler in one of two forms; each is remade with that sampler (the
/// image equals sdscale's own with the same flags), and a sampler sdscale lacks is refused.
#[test]
fn a1111_pngs_are_remade_with_their_sampler() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    let pixels = image::RgbImage::new(8, 8);
    let cases = [
        ("Sampler: DDIM", &["--sampler", "ddim"][..]),
        ("Sampler: PLMS", &["--sampler", "pndm"][..]),
        ("Sampler: Euler", &["--sampler", "euler"][..]),
        ("Sampler: Euler a", &["--sampler", "euler_ancestral"][..]),
        ("Sampler: Heun", &["--sampler", "heun"][..]),
        ("Sampler: LMS", &["--sampler", "lms"][..]),
        (
            "Sampler: DPM++ 2M, Schedule type: Karras, Version: v1.9.4",
            &["--sampler", "dpmpp_2m", "--schedule", "karras"][..],
        ),
        ("Sampler: DPM++ 2M Karras", &["--sampler", "dpmpp_2m", "--schedule", "karras"][..]),
        ("Sampler: DPM++ 2M, Version: v1.10.1", &["--sampler", "dpmpp_2m", "--schedule", "karras"][..]),
        (
            "Sampler: DPM++ 2M SDE, Schedule type: Automatic, Version: v1.9.0",
            &["--sampler", "dpmpp_2m_sde", "--schedule", "exponential"][..],
        ),
        ("Sampler: DPM++ 2M SDE Karras", &["--sampler", "dpmpp_2m_sde", "--schedule", "karras"][..]),
        ("Sampler: UniPC", &["--sampler", "uni_pc"][..]),
    ];
    for (i, (fields, flags)) in cases.iter().enumerate() {
        let text = format!("a corgi\nSteps: 3, {fields}, CFG scale: 7, Seed: 9, Size: 64x64, Model: x");
        let png = dir.path().join(format!("a1111-{i}.png"));
        sdscale::output::write_png(&png, &pixels, &[("parameters", text)], true).unwrap();
        let from = sdscale(
            dir.path(),
            &["gen", "--model", &model, "--from", png.to_str().unwrap(), "-o", &format!("from-{i}.png")],
        );
        assert!(from.status.success(), "{fields}: {}", stderr(&from));
        let mut args =
            vec!["gen", "--model", &model, "--prompt", "a corgi", "--steps", "3", "--guidance", "7", "--seed", "9"];
        args.extend(["--width", "64", "--height", "64"]);
        args.extend_from_slice(flags);
        let want = format!("want-{i}.png");
        args.extend(["-o", &want]);
        let direct = sdscale(dir.path(), &args);
        assert!(direct.status.success(), "{}", stderr(&direct));
        let info = success_lines(&sdscale(dir.path(), &["info", &format!("from-{i}.png")])).join("\n");
        let (got, want) = (
            image::open(dir.path().join(format!("from-{i}.png"))).unwrap(),
            image::open(dir.path().join(want)).unwrap(),
        );
        assert!(got.to_rgb8() == want.to_rgb8(), "{fields}: --from did not use {flags:?} ({info})");
    }
    let text = "a corgi\nSteps: 3, Sampler: DPM++ SDE, CFG scale: 7, Seed: 9, Size: 64x64".to_string();
    let png = dir.path().join("unknown.png");
    sdscale::output::write_png(&png, &pixels, &[("parameters", text)], true).unwrap();
    let refused = sdscale(dir.path(), &["gen", "--model", &model, "--from", "unknown.png", "-o", "x.png"]);
    assert_eq!(refused.status.code(), Some(2));
    let message = stderr(&refused);
    assert!(message.contains("DPM++ SDE") && message.contains("DPM++ 2M") && message.lines().count() == 1, "{message}");
    assert!(!dir.path().join("x.png").exists());
}

/// Bad sampler input: one line, exit 2, nothing written.
#[test]
fn bad_sampler_input_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_arg();
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"sampler\": \"dpm_fast\"}\n",
    )
    .unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--sampler", "dpm_fast"], "\"dpm_fast\" is not a sampler"),
        (&["--sampler", "ddim", "--schedule", "karras"], "does not apply to --sampler ddim"),
        (&["--sampler", "pndm", "--schedule", "exponential"], "does not apply to --sampler pndm"),
        (&["--timestep-spacing", "sideways"], "\"sideways\" is not a spacing"),
        (&["--sampler", "euler", "--eta", "0.5"], "--eta is DDIM's"),
        (&["--prompts", "bad.jsonl"], "bad.jsonl line 2"),
    ];
    for (flags, expected) in cases {
        let mut args = vec!["gen", "--model", &model, "--steps", "2", "-o", "out.png"];
        if !flags.contains(&"--prompts") {
            args.extend(["--prompt", "a corgi"]);
        }
        args.extend_from_slice(flags);
        let output = sdscale(dir.path(), &args);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {message}");
        assert!(message.contains(expected) && message.trim().lines().count() == 1, "{flags:?}: {message}");
        assert!(!dir.path().join("out.png").exists());
    }
}
