//! `sdscale eval` against pytorch-fid 0.3.0 and torchmetrics 1.9.0 (`make_fixtures.py --only eval`, see
//! scripts/eval_fixtures.py): pytorch-fid's own InceptionV3 with formula weights (rebuilt here, never
//! committed) and a tiny random transformers CLIP, on 6 generated and 6 reference PNGs of differing sizes.

use crate::util::{fixtures, sdscale, stderr, stdout};
use candle_core::{Device, Tensor};
use sdscale::eval::clip_score::{self, ClipScorer};
use sdscale::eval::{fid, inception_features, load_inception};
use sdscale::models::inception::FEATURES;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub(crate) fn eval_dir() -> PathBuf {
    fixtures().join("eval")
}

fn eval_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(eval_dir().join("eval.json")).unwrap()).unwrap()
}

fn images(folder: &str) -> Vec<PathBuf> {
    eval_json()[folder]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| eval_dir().join(folder).join(name.as_str().unwrap()))
        .collect()
}

fn relative_error(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

// ---- the formula weights (the same numbers as scripts/eval_fixtures.py's formula_value) -----------

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn uniform01(seed: u64, index: u64) -> f64 {
    let mut z = seed.wrapping_add((index + 1).wrapping_mul(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^= z >> 31;
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn formula_value(name: &str, shape: &[usize]) -> Vec<f32> {
    let seed = fnv1a64(name);
    let count: usize = shape.iter().product();
    let value: Box<dyn Fn(f64) -> f64> = if name.ends_with("conv.weight") {
        let fan_in: usize = shape[1..].iter().product();
        let bound = (6.0 / fan_in as f64).sqrt();
        Box::new(move |u| (2.0 * u - 1.0) * bound)
    } else if name.ends_with("bn.weight") || name.ends_with("bn.running_var") {
        Box::new(|u| 0.5 + u)
    } else if name.ends_with("bn.bias") || name.ends_with("bn.running_mean") {
        Box::new(|u| 0.1 * (2.0 * u - 1.0))
    } else if name == "fc.weight" {
        let scale = 1.0 / (shape[1] as f64).sqrt();
        Box::new(move |u| (2.0 * u - 1.0) * scale)
    } else if name == "fc.bias" {
        Box::new(|u| 0.01 * (2.0 * u - 1.0))
    } else {
        panic!("no formula for {name}")
    };
    (0..count as u64).map(|i| value(uniform01(seed, i)) as f32).collect()
}

/// The formula Inception written as scripts/convert_inception.py writes the real one: every tensor
/// named in inception_layout.json (the converter's output, checked by the fixture script).
pub(crate) fn formula_inception() -> &'static Path {
    static FILE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = FILE.get_or_init(|| {
        let layout: Vec<(String, Vec<usize>)> =
            serde_json::from_str(&std::fs::read_to_string(eval_dir().join("inception_layout.json")).unwrap()).unwrap();
        let tensors: HashMap<String, Tensor> = layout
            .iter()
            .map(|(name, shape)| {
                (name.clone(), Tensor::from_vec(formula_value(name, shape), shape.as_slice(), &Device::Cpu).unwrap())
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pt_inception-2015-12-05-formula.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        (dir, path)
    });
    path
}

/// The formula gives the fixture script's numbers bit for bit (first values of a few tensors).
#[test]
fn formula_weights_match_the_fixture_script() {
    let layout: Vec<(String, Vec<usize>)> =
        serde_json::from_str(&std::fs::read_to_string(eval_dir().join("inception_layout.json")).unwrap()).unwrap();
    let samples = eval_json()["formula_samples"].as_object().unwrap().clone();
    assert_eq!(samples.len(), 4);
    for (name, want) in samples {
        let shape = &layout.iter().find(|(n, _)| *n == name).unwrap().1;
        let want: Vec<f32> = serde_json::from_value(want).unwrap();
        assert_eq!(formula_value(&name, shape)[..4], want[..], "{name}");
    }
}

// ---- FID ---------------------------------------------------------------------------------------

/// Our pool3 features of the fixture images, in eval.json's order.
fn our_features(folder: &str) -> Vec<Vec<f32>> {
    let model = load_inception(formula_inception(), &Device::Cpu).unwrap();
    images(folder)
        .iter()
        .map(|path| {
            let image = image::open(path).unwrap().to_rgb8();
            inception_features(&model, &[image], &Device::Cpu).unwrap().remove(0)
        })
        .collect()
}

fn their_features(name: &str) -> Vec<Vec<f32>> {
    let tensors =
        candle_core::safetensors::load(eval_dir().join("inception_features.safetensors"), &Device::Cpu).unwrap();
    tensors[name].to_vec2().unwrap()
}

fn stats(features: &[Vec<f32>]) -> fid::Statistics {
    fid::Statistics::of(&features.iter().map(Vec::as_slice).collect::<Vec<_>>(), FEATURES).unwrap()
}

/// The Fréchet distance alone: pytorch-fid's own activations through our statistics and symmetric
/// square root give pytorch-fid's number to 1e-5 relative (measured: 3e-6; pytorch-fid keeps the means
/// in float32 and takes scipy's sqrtm of the singular Σ₁Σ₂).
#[test]
fn frechet_distance_of_pytorch_fid_activations_matches_pytorch_fid() {
    let want = eval_json()["fid"].as_f64().unwrap();
    let got =
        fid::frechet_distance(&stats(&their_features("generated")), &stats(&their_features("reference"))).unwrap();
    assert!(relative_error(got, want) < 1e-5, "FID {got} vs pytorch-fid {want}");
}

/// The 2048-d features of every image (sizes 40×88 to 320×256: bilinear up- and downscaling to 299)
/// agree with pytorch-fid's within 1e-4 of the largest feature, and the FID from them within 1e-3.
#[test]
fn inception_features_and_fid_match_pytorch_fid() {
    let mut all = HashMap::new();
    for folder in ["generated", "reference"] {
        let ours = our_features(folder);
        let theirs = their_features(folder);
        let scale = theirs.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-4 * scale, "{folder} image {i}: features differ by {diff} (largest feature {scale})");
            eprintln!("{folder} image {i}: features differ by at most {:.2e} of the largest", diff / scale);
        }
        all.insert(folder, ours);
    }
    let want = eval_json()["fid"].as_f64().unwrap();
    let got = fid::frechet_distance(&stats(&all["generated"]), &stats(&all["reference"])).unwrap();
    assert!(relative_error(got, want) < 1e-3, "FID {got} vs pytorch-fid {want}");
    eprintln!("FID {got} vs pytorch-fid {want}: relative error {:.1e}", relative_error(got, want));
}

// ---- CLIP score --------------------------------------------------------------------------------

pub(crate) fn tiny_clip() -> PathBuf {
    eval_dir().join("tiny-clip")
}

/// Token ids (with the cut at 77 for the long prompt), pixel values (Pillow's integer bicubic,
/// centre crop, normalisation) and per-image scores against torchmetrics; the total to 1e-3.
#[test]
fn clip_score_matches_torchmetrics() {
    let json = eval_json();
    let scorer = ClipScorer::load(&tiny_clip(), &Device::Cpu).unwrap();
    let pixels = candle_core::safetensors::load(eval_dir().join("clip_pixels.safetensors"), &Device::Cpu).unwrap();
    let mut scores = Vec::new();
    for (i, (path, case)) in images("generated").iter().zip(json["clip_per_image"].as_array().unwrap()).enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let ids = scorer.input_ids(prompt).unwrap();
        assert_eq!(ids, want_ids, "ids of {prompt:?}");

        // Pixel values: every 7th row and column to 1e-5, and the sum over all of them, where one 8-bit
        // level anywhere moves it by ~0.015 (float rounding over 150k values: ~0.002).
        let image = image::open(path).unwrap().to_rgb8();
        let want: Vec<f32> = pixels[&format!("pixel_values_{i}")].flatten_all().unwrap().to_vec1().unwrap();
        let got = scorer.pixel_values(&image);
        assert_eq!(got.len(), 3 * 224 * 224);
        let sampled: Vec<f32> = (0..3)
            .flat_map(|c| (0..224).step_by(7).flat_map(move |y| (0..224).step_by(7).map(move |x| (c, y, x))))
            .map(|(c, y, x)| got[(c * 224 + y) * 224 + x])
            .collect();
        let diff = sampled.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(sampled.len() == want.len() && diff < 1e-5, "image {i}: pixel values differ by {diff}");
        let abs_sum: f64 = got.iter().map(|v| v.abs() as f64).sum();
        let want_abs_sum = case["pixel_abs_sum"].as_f64().unwrap();
        assert!((abs_sum - want_abs_sum).abs() < 5e-3, "image {i}: |pixel values| sum {abs_sum} vs {want_abs_sum}");

        let image_features = scorer.image_features(&[image]).unwrap().remove(0);
        let text_features = scorer.text_features(prompt).unwrap();
        let score = clip_score::scaled_cosine(&image_features, &text_features);
        let want = case["score"].as_f64().unwrap();
        assert!((score - want).abs() < 1e-3 * want.abs().max(1.0), "image {i}: score {score} vs {want}");
        scores.push(score);
    }
    let want = json["clip_score"].as_f64().unwrap();
    let got = clip_score::clip_score(&scores).unwrap();
    assert!(relative_error(got, want) < 1e-3, "CLIP score {got} vs torchmetrics {want}");
    eprintln!("CLIP score {got} vs torchmetrics {want}: relative error {:.1e}", relative_error(got, want));
}

// ---- the command ---------------------------------------------------------------------------------

/// A manifest line as `gen --manifest` writes it (plus a field eval does not know).
fn record(path: &str, prompt: &str, size: usize, mode: &str, seconds: f64, mib: Option<f64>) -> String {
    serde_json::json!({
        "path": path, "prompt": prompt, "negative_prompt": "", "seed": 7, "width": size, "height": size,
        "steps": 50, "guidance": 7.5, "mode": mode, "model": "tiny", "seconds": seconds,
        "peak_device_mib": mib, "prompt_index": 0, "image_index": 0, "written_by": "test"
    })
    .to_string()
        + "\n"
}

/// Two shards' manifests in their own folders, image paths relative to them: all six fixture images as
/// the 224² entropy row (in two manifests), copies of two of them as a 512² default row.
fn lay_out_run(dir: &Path) -> Vec<String> {
    let prompts: Vec<String> = serde_json::from_value(eval_json()["prompts"].clone()).unwrap();
    let mut manifests = Vec::new();
    for (shard, range) in [(0, 0..3), (1, 3..6)] {
        let folder = dir.join(format!("shard{shard}"));
        std::fs::create_dir_all(folder.join("out")).unwrap();
        let mut text = String::new();
        for i in range {
            std::fs::copy(eval_dir().join("generated").join(format!("{i}.png")), folder.join(format!("out/{i}.png")))
                .unwrap();
            text += &record(&format!("out/{i}.png"), &prompts[i], 224, "entropy", i as f64, None);
        }
        if shard == 1 {
            for (i, seconds, mib) in [(3, 10.0, 100.0), (4, 20.0, 300.5)] {
                std::fs::copy(folder.join(format!("out/{i}.png")), folder.join(format!("out/{i}-512.png"))).unwrap();
                text += &record(&format!("out/{i}-512.png"), &prompts[i], 512, "default", seconds, Some(mib));
            }
        }
        std::fs::write(folder.join("manifest.jsonl"), text).unwrap();
        manifests.push(format!("shard{shard}/manifest.jsonl"));
    }
    manifests
}

fn eval_args<'a>(manifests: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["eval", "--manifest"];
    args.extend(manifests.iter().map(String::as_str));
    args.extend(extra);
    args
}

#[test]
fn eval_prints_the_table_and_computes_only_new_features() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = lay_out_run(dir.path());
    let (inception, clip, reference) = (
        formula_inception().display().to_string(),
        tiny_clip().display().to_string(),
        eval_dir().join("reference").display().to_string(),
    );
    let flags =
        ["--inception", &inception, "--reference", &reference, "--clip", &clip, "--device", "cpu", "--format", "json"];
    let out = sdscale(dir.path(), &eval_args(&manifests, &flags));
    assert!(out.status.success(), "eval failed: {}", stderr(&out));
    let table: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let rows = table["rows"].as_array().unwrap();
    let keys: Vec<String> =
        rows.iter().map(|r| format!("{}x{} {}", r["width"], r["height"], r["mode"].as_str().unwrap())).collect();
    assert_eq!(keys, ["224x224 entropy", "512x512 default"]);

    let json = eval_json();
    let entropy = &rows[0];
    assert_eq!(entropy["images"], 6);
    let fid = entropy["fid"].as_f64().unwrap();
    assert!(relative_error(fid, json["fid"].as_f64().unwrap()) < 1e-3, "FID {fid}");
    let score = entropy["clip_score"].as_f64().unwrap();
    assert!(relative_error(score, json["clip_score"].as_f64().unwrap()) < 1e-3, "CLIP score {score}");
    assert!(entropy["gpu_mib"].is_null());
    assert_eq!(entropy["seconds_per_image"], 2.5); // mean of 0..=5
    let default = &rows[1];
    assert_eq!((default["images"].as_u64(), default["gpu_mib"].as_f64()), (Some(2), Some(300.5)));
    assert!(default["fid"].as_f64().is_some());
    let log = stderr(&out);
    assert!(log.contains("FID features (reference): 6 computed, 0 from the cache"), "{log}");
    assert!(log.contains("FID features (generated): 8 computed, 0 from the cache"), "{log}");

    // A grown run: one more image in shard 0. Only it is computed; the table follows.
    std::fs::copy(eval_dir().join("generated/5.png"), dir.path().join("shard0/out/new.png")).unwrap();
    let prompt = json["prompts"][0].as_str().unwrap();
    let mut manifest = std::fs::read_to_string(dir.path().join("shard0/manifest.jsonl")).unwrap();
    manifest += &record("out/new.png", prompt, 224, "entropy", 1.0, None);
    std::fs::write(dir.path().join("shard0/manifest.jsonl"), manifest).unwrap();
    let out = sdscale(dir.path(), &eval_args(&manifests, &flags));
    assert!(out.status.success(), "eval failed: {}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("FID features (reference): 0 computed, 6 from the cache"), "{log}");
    assert!(log.contains("FID features (generated): 1 computed, 8 from the cache"), "{log}");
    assert!(log.contains("CLIP image features: 1 computed, 8 from the cache"), "{log}");
    let table: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(table["rows"][0]["images"], 7);
}

#[test]
fn without_weights_the_table_says_what_was_skipped_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = lay_out_run(dir.path());
    let out = sdscale(dir.path(), &eval_args(&manifests, &[]));
    assert!(out.status.success(), "eval failed: {}", stderr(&out));
    let md = stdout(&out);
    assert!(md.starts_with("| size | mode | images | FID | CLIP score | GPU MiB | s/image |\n"), "{md}");
    assert!(md.contains("| 224×224 | entropy | 6 | – | – | – | 2.50 |"), "{md}");
    assert!(md.contains("| 512×512 | default | 2 | – | – | 300 | 15.00 |"), "{md}");
    assert!(md.contains("FID: skipped (pass --inception and --reference)."), "{md}");
    assert!(md.contains("CLIP score: skipped (pass --clip)."), "{md}");

    let csv = stdout(&sdscale(dir.path(), &eval_args(&manifests, &["--format", "csv"])));
    assert_eq!(
        csv,
        "width,height,mode,images,fid,clip_score,gpu_mib,seconds_per_image\n\
         224,224,\"entropy\",6,,,,2.5\n512,512,\"default\",2,,,300.5,15\n"
    );

    // --output writes the file (atomically) and prints its path; it is never replaced silently.
    let out = sdscale(dir.path(), &eval_args(&manifests, &["--format", "json", "-o", "table.json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("table.json")).unwrap()).unwrap();
    assert_eq!(written["rows"][1]["gpu_mib"], 300.5);
    let again = sdscale(dir.path(), &eval_args(&manifests, &["-o", "table.json"]));
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
}

#[test]
fn user_mistakes_get_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = lay_out_run(dir.path());
    let inception = formula_inception().display().to_string();
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--inception", &inception], "--inception needs --reference DIR"),
        (vec!["--clip", "no-such-dir"], "--clip no-such-dir: no config.json there"),
        (vec!["--batch-size", "0"], "--batch-size 0 is out of range"),
        (vec!["--inception", "missing.safetensors", "--reference", "."], "no such file"),
    ];
    for (extra, message) in cases {
        let out = sdscale(dir.path(), &eval_args(&manifests, &extra));
        let log = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {log}");
        assert!(log.contains(message) && log.trim().lines().count() == 1, "{extra:?}: {log}");
    }

    std::fs::remove_file(dir.path().join("shard1/out/4.png")).unwrap();
    let out = sdscale(dir.path(), &eval_args(&manifests, &[]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("4.png listed in the manifests does not exist"), "{}", stderr(&out));

    std::fs::write(dir.path().join("bad.jsonl"), "{\"path\": \"x.png\"}\n").unwrap();
    let out = sdscale(dir.path(), &["eval", "--manifest", "bad.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("bad.jsonl line 1: not a manifest record"), "{}", stderr(&out));
}
