//! HiDiffusion and Deep Shrink (issue 21) against their references on tiny-sd-hires (SD 2.1-base's
//! layout with block_out_channels [16, 24, 32, 32], trained at 128 px): PyPI hidiffusion 0.1.10's
//! `apply_hidiffusion(pipe)` and diffusers' community kohya_hires_fix.py, DDIM, 5 steps, guidance 7.5,
//! fp32 CPU (scripts/fixture_hires.py). Tolerance as for every image test: mean |Δ| ≤ 0.1 and max |Δ| ≤ 4
//! levels of 255. Then the compositions with the entropy scale: bit for bit the plain method where it
//! is inactive at the training size, different where it acts. The SDXL rules at the end, on
//! tiny-sdxl-hires (reference/hires/sdxl.json).

use crate::util::{fixtures, image_diff, read_json, reference, sdscale, stderr};
use sdscale::hires::hidiffusion::shift_step;
use sdscale::rng::TorchGenerator;
use std::path::{Path, PathBuf};

fn model() -> PathBuf {
    fixtures().join("tiny-sd-hires")
}

/// tiny-sdxl's text encoders, tokenizers and VAE with a UNet the reference recognises as SDXL
/// (transformer_layers_per_block [1, 2, 10], block_out_channels [8, 16, 8]; trained at 128 px).
fn sdxl_model() -> PathBuf {
    fixtures().join("tiny-sdxl-hires")
}

fn cases() -> Vec<serde_json::Value> {
    read_json("hires/hires.json").as_array().unwrap().clone()
}

fn sdxl_cases() -> Vec<serde_json::Value> {
    read_json("hires/sdxl.json").as_array().unwrap().clone()
}

fn case(name: &str) -> serde_json::Value {
    cases().into_iter().chain(sdxl_cases()).find(|c| c["file"] == format!("{name}.png")).unwrap()
}

/// The model a reference case was made with.
fn model_of(case: &serde_json::Value) -> PathBuf {
    if case["file"].as_str().unwrap().starts_with("xl") {
        sdxl_model()
    } else {
        model()
    }
}

fn gen(dir: &Path, file: &str, args: &[String]) -> PathBuf {
    gen_with(&model(), dir, file, args)
}

fn gen_with(model: &Path, dir: &Path, file: &str, args: &[String]) -> PathBuf {
    let output = dir.join(file);
    let mut all: Vec<String> = vec!["gen".into(), "--model".into(), model.display().to_string()];
    all.extend(args.iter().cloned());
    all.extend(["-o".into(), output.display().to_string()]);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let result = sdscale(dir, &all);
    assert!(result.status.success(), "sdscale failed: {}", stderr(&result));
    output
}

/// The flags that render a reference case.
fn case_args(case: &serde_json::Value) -> Vec<String> {
    with_method(case, true)
}

/// The case's flags; without its method, its mode becomes the plain one of the same attention scale.
fn with_method(case: &serde_json::Value, method: bool) -> Vec<String> {
    let mut args: Vec<String> = vec![];
    args.extend(["--prompt".into(), case["prompt"].as_str().unwrap().into()]);
    args.extend(["--negative-prompt".into(), case["negative_prompt"].as_str().unwrap().into()]);
    for key in ["width", "height", "steps", "guidance", "seed", "mode", "eta"] {
        args.push(format!("--{key}"));
        args.push(case[key].to_string().trim_matches('"').to_string());
    }
    if !method {
        let mode = args.iter_mut().find(|a| a.starts_with("hidiffusion") || a.starts_with("deepshrink")).unwrap();
        *mode = if mode.ends_with("+entropy") { "entropy" } else { "default" }.into();
        return args;
    }
    if let Some(entries) = case["deepshrink"].as_array() {
        for entry in entries {
            let e = entry.as_array().unwrap();
            args.extend(["--deepshrink".into(), format!("{}:{}:{}", e[0], e[1], e[2])]);
        }
    }
    if let Some(ratios) = case["ratios"].as_array() {
        args.extend(["--hidiffusion-ratios".into(), format!("{}:{}", ratios[0], ratios[1])]);
    }
    args
}

fn check(name: &str) {
    let case = case(name);
    let dir = tempfile::tempdir().unwrap();
    let file = case["file"].as_str().unwrap();
    let ours = gen_with(&model_of(&case), dir.path(), file, &case_args(&case));
    let (mean, max) = image_diff(&ours, &reference(&format!("hires/{file}")));
    eprintln!("{file}: mean |Δ| {mean:.4}, max |Δ| {max}");
    assert!(mean <= 0.1 && max <= 4, "{file}: mean |Δ| {mean:.4}, max |Δ| {max} against the reference");
}

#[test]
fn hidiffusion_at_twice_the_training_size() {
    check("hd_2x");
}

#[test]
fn hidiffusion_at_three_times_the_training_size() {
    check("hd_3x");
}

#[test]
fn hidiffusion_non_square() {
    check("hd_wide");
}

/// 25×33 latents: odd windows (resized to even and back), an odd stride-4 downsample.
#[test]
fn hidiffusion_odd_latent_sides() {
    check("hd_odd");
}

#[test]
fn hidiffusion_at_the_training_size() {
    check("hd_train");
}

/// T2 active (ratios 0.6:0.4, overridden in the reference): down_blocks.1 pools (ceil, odd sides) and
/// up_blocks.2 resizes back.
#[test]
fn hidiffusion_with_the_t2_pool() {
    check("hd_t2");
}

/// eta 1, the call the hidiffusion README recommends: the step noise continues the image's generator.
#[test]
fn hidiffusion_with_eta_one() {
    check("hd_eta1");
}

/// Windows with the entropy scale: N = a window's keys, T = level 0's training count.
#[test]
fn hidiffusion_with_the_entropy_scale() {
    check("hde_2x");
}

#[test]
fn deepshrink_default() {
    check("ds_default");
}

#[test]
fn deepshrink_non_square() {
    check("ds_wide");
}

/// 400:0.7:1 shrinks 8 → 5 latents: an odd size, so diffusers' ×2 upsampling (6) and the skip (5) differ.
#[test]
fn deepshrink_another_timestep_and_scale() {
    check("ds_other");
}

#[test]
fn deepshrink_several_entries_out_of_order() {
    check("ds_multi");
}

#[test]
fn deepshrink_with_the_entropy_scale() {
    check("dse_default");
}

/// The window shifts: the image's generator gives the reference's recorded torch.rand draws, in order.
#[test]
fn hidiffusion_shift_draws_match_the_reference() {
    let mut checked = 0;
    for case in cases().iter().chain(&sdxl_cases()).filter(|c| c["rand"].is_array()) {
        let mut generator = TorchGenerator::new(case["seed"].as_u64().unwrap() as u32);
        for (i, value) in case["rand"].as_array().unwrap().iter().enumerate() {
            let expected = value.as_f64().unwrap() as f32;
            let ours = generator.rand_f32();
            assert_eq!(ours.to_bits(), expected.to_bits(), "{}: draw {i}: {ours} vs {expected}", case["file"]);
            assert_eq!(shift_step(ours), shift_step(expected));
            checked += 1;
        }
    }
    assert!(checked >= 25 + 6 * 50, "{checked} draws");
}

fn same_png(a: &Path, b: &Path) -> bool {
    let (a, b) = (image::open(a).unwrap().to_rgb8(), image::open(b).unwrap().to_rgb8());
    a.as_raw() == b.as_raw()
}

fn render(dir: &Path, file: &str, size: usize, mode: &str, extra: &[&str]) -> PathBuf {
    render_with(&model(), dir, file, size, mode, extra)
}

fn render_with(model: &Path, dir: &Path, file: &str, size: usize, mode: &str, extra: &[&str]) -> PathBuf {
    let mut args: Vec<String> = ["--prompt", "a corgi on a beach", "--steps", "4", "--seed", "5", "--mode", mode]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--width".into(), size.to_string(), "--height".into(), size.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    gen_with(model, dir, file, &args)
}

/// At the training size with Deep Shrink inactive (t > 1000 never holds) the entropy scale changes
/// nothing: deepshrink+entropy = deepshrink = default, bit for bit. Where it shrinks, a shrunk level
/// has fewer keys than its training count, and the images differ.
#[test]
fn deepshrink_entropy_equals_deepshrink_where_inactive_and_differs_where_it_acts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let off = ["--deepshrink", "1000:0.5:1"];
    let plain = render(d, "ds.png", 128, "deepshrink", &off);
    let scaled = render(d, "dse.png", 128, "deepshrink+entropy", &off);
    let default = render(d, "default.png", 128, "default", &[]);
    assert!(same_png(&plain, &scaled) && same_png(&plain, &default));
    let plain = render(d, "ds-on.png", 128, "deepshrink", &[]);
    let scaled = render(d, "dse-on.png", 128, "deepshrink+entropy", &[]);
    assert!(!same_png(&plain, &scaled), "the entropy scale changed nothing where Deep Shrink acts");
    assert!(!same_png(&plain, &default), "Deep Shrink changed nothing at t > 600");
}

/// HiDiffusion inactive at the training size (ratios 0:0, no windows): hidiffusion+entropy =
/// hidiffusion = default, bit for bit. Where it acts (windows, RAU-Net) the entropy scale sees fewer
/// keys than the level's training count, and the images differ.
#[test]
fn hidiffusion_entropy_equals_hidiffusion_where_inactive_and_differs_where_it_acts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let off = ["--hidiffusion-ratios", "0:0", "--hidiffusion-no-window"];
    let plain = render(d, "hd.png", 128, "hidiffusion", &off);
    let scaled = render(d, "hde.png", 128, "hidiffusion+entropy", &off);
    let default = render(d, "default.png", 128, "default", &[]);
    assert!(same_png(&plain, &scaled) && same_png(&plain, &default));
    let plain = render(d, "hd-on.png", 256, "hidiffusion", &[]);
    let scaled = render(d, "hde-on.png", 256, "hidiffusion", &["--entropy-scale"]);
    assert!(!same_png(&plain, &scaled), "the entropy scale changed nothing where HiDiffusion acts");
}

/// The reference recognises SD 1.5 / 2.1-base by module names; tiny-sd's UNet ([16, 16, 32, 32]: no
/// conv_shortcut in down_blocks.1) is not, and neither is it here: one line, exit 2, nothing written.
#[test]
fn hidiffusion_refuses_a_unet_the_reference_does_not_recognise() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let tiny = fixtures().join("tiny-sd").display().to_string();
    let args =
        ["gen", "--model", &tiny, "--prompt", "x", "--seed", "1", "--mode", "hidiffusion", "-o", out.to_str().unwrap()];
    let result = sdscale(dir.path(), &args);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(stderr(&result).contains("--mode hidiffusion supports the SD 1.5 / 2.1-base and SDXL UNet layouts"));
    assert_eq!(stderr(&result).trim().lines().count(), 1, "{}", stderr(&result));
    assert!(!out.exists());
}

/// The references are not the plain network: every case, rendered without its method (default or
/// entropy attention only), is far outside the tolerance, so the checks above test the methods.
#[test]
fn every_reference_differs_from_the_plain_network() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases().into_iter().chain(sdxl_cases()) {
        let plain_args = with_method(&case, false);
        let file = case["file"].as_str().unwrap();
        let ours = gen_with(&model_of(&case), dir.path(), &format!("plain-{file}"), &plain_args);
        let (mean, max) = image_diff(&ours, &reference(&format!("hires/{file}")));
        eprintln!("{file} without its method: mean |Δ| {mean:.2}, max |Δ| {max}");
        assert!(mean > 0.1 || max > 4, "{file}: the method changed nothing (mean {mean:.4}, max {max})");
    }
}

/// `gen --from` remakes a Deep Shrink image with its stored entries, bit for bit; `--mode default`
/// from it drops them.
#[test]
fn deepshrink_entries_round_trip_through_the_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let first = render(d, "first.png", 256, "deepshrink", &["--deepshrink", "400:0.7:1", "--deepshrink", "800:0.5:2"]);
    let again = gen(d, "again.png", &["--from".into(), first.display().to_string()]);
    assert!(same_png(&first, &again), "--from lost the Deep Shrink entries");
    let info = sdscale(d, &["info", "--json", first.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("800:0.5:2,400:0.7:1"), "{}", stderr(&info));
    gen(d, "plain.png", &["--from".into(), first.display().to_string(), "--mode".into(), "default".into()]);
}

/// Each image draws its window shifts from its own seed: two HiDiffusion images batched through the
/// UNet together are the images made one at a time (to float rounding), and differ from each other.
#[test]
fn hidiffusion_images_do_not_depend_on_their_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common = ["--num-images", "2", "--seed", "7", "--mode", "hidiffusion+entropy"];
    let run = |batch: &str| {
        let mut args: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        args.extend(["--batch-size".into(), batch.into(), "--prompt".into(), "a corgi".into()]);
        args.extend(["--width".into(), "256".into(), "--height".into(), "200".into(), "--steps".into(), "3".into()]);
        gen(d, &format!("b{batch}-{{seed}}.png"), &args)
    };
    run("1");
    run("2");
    for seed in [7, 8] {
        let (mean, max) = image_diff(&d.join(format!("b1-{seed}.png")), &d.join(format!("b2-{seed}.png")));
        assert!(mean <= 0.01 && max <= 1, "seed {seed}: mean |Δ| {mean}, max |Δ| {max}");
    }
    assert!(image_diff(&d.join("b2-7.png"), &d.join("b2-8.png")).0 > 1.0);
}

// ---------------------------------------------------------------------------------------------
// SDXL: the reference's `model == 'sdxl'` rules on tiny-sdxl-hires (reference/hires/sdxl.json,
// StableDiffusionXLPipeline, DDIM, guidance 7.5). Latents under 512 on a side: the aggressive RAU-Net.
// Seen (candle CPU f32, mean |Δ| / max |Δ|): xl_2x 0.0186 / 1, xl_wide 0.0046 / 1, xl_odd 0.0004 / 1,
// xl_train 0.0278 / 1, xl_t1t2 0.0013 / 1, xle_2x 0.0035 / 1. Without the method each is 3.5–7.8 mean
// away; xl_wide without the aggressive downsampler (ratios 0.4:0) 4.8, xl_2x without windows 6.2.

/// 32² latents, 5 steps: the pool in down_blocks.1 / up_blocks.1 at steps 0 and 1, ten windowed
/// transformer blocks per call.
#[test]
fn hidiffusion_sdxl_at_twice_the_training_size() {
    check("xl_2x");
}

/// 32×48 latents, 7 steps: the stride-4 downsampler at step 0 (int(0.16·7) = 1), the pool at step 1.
#[test]
fn hidiffusion_sdxl_non_square() {
    check("xl_wide");
}

/// 33×25 latents: odd level-1 sides (windows resized to even and back), an odd pool.
#[test]
fn hidiffusion_sdxl_odd_latent_sides() {
    check("xl_odd");
}

/// The training size: the aggressive rule still pools at steps 0 and 1 (it only asks for latents
/// under 512), and the windows run.
#[test]
fn hidiffusion_sdxl_at_the_training_size() {
    check("xl_train");
}

/// Ratios 0.6:0.4 (the reference with is_aggressive_raunet off and 'sdxl_2048' overridden): the pool
/// (T1, steps 0–2) and the stride-4 downsampler (T2, steps 0–1) together.
#[test]
fn hidiffusion_sdxl_with_t1_and_t2() {
    check("xl_t1t2");
}

/// Windows with the entropy scale on SDXL: N = a window's keys, T = level 1's training count.
#[test]
fn hidiffusion_sdxl_with_the_entropy_scale() {
    check("xle_2x");
}

/// SDXL with HiDiffusion inactive at the training size (ratios 0:0, no windows): hidiffusion+entropy =
/// hidiffusion = default, bit for bit; with the default rules (active at the training size too: the
/// aggressive pool and the windows) the entropy scale changes the image.
#[test]
fn hidiffusion_sdxl_entropy_equals_hidiffusion_where_inactive_and_differs_where_it_acts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = sdxl_model();
    let off = ["--hidiffusion-ratios", "0:0", "--hidiffusion-no-window"];
    let plain = render_with(&m, d, "hd.png", 128, "hidiffusion", &off);
    let scaled = render_with(&m, d, "hde.png", 128, "hidiffusion+entropy", &off);
    let default = render_with(&m, d, "default.png", 128, "default", &[]);
    assert!(same_png(&plain, &scaled) && same_png(&plain, &default));
    let plain = render_with(&m, d, "hd-on.png", 128, "hidiffusion", &[]);
    let scaled = render_with(&m, d, "hde-on.png", 128, "hidiffusion+entropy", &[]);
    assert!(!same_png(&plain, &scaled), "the entropy scale changed nothing where HiDiffusion acts");
    assert!(!same_png(&plain, &default), "HiDiffusion changed nothing at the training size");
}

/// tiny-sdxl's UNet (transformer_layers_per_block [1, 2, 2], block_out_channels [16, 32, 32]) lacks
/// modules of sdxl_module_key.txt: refused in one line, exit 2, nothing written. So are the families
/// the reference has no rules for (LDM).
#[test]
fn hidiffusion_refuses_sdxl_and_ldm_unets_the_reference_does_not_recognise() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["tiny-sdxl", "tiny-ldm"] {
        let out = dir.path().join(format!("{model}.png"));
        let path = fixtures().join(model).display().to_string();
        let args = ["gen", "--model", &path, "--prompt", "x", "--seed", "1", "--mode", "hidiffusion", "-o"];
        let result = sdscale(dir.path(), &[&args[..], &[out.to_str().unwrap()]].concat());
        assert_eq!(result.status.code(), Some(2), "{model}: {}", stderr(&result));
        assert!(stderr(&result).contains("--mode hidiffusion supports"), "{model}: {}", stderr(&result));
        assert_eq!(stderr(&result).trim().lines().count(), 1, "{model}: {}", stderr(&result));
        assert!(!out.exists());
    }
}
