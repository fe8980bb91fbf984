//! Shared helpers: fixture paths, the fixture pipeline, running the real binary, comparing images.

use candle_core::{DType, Device, Tensor};
use sdscale::family::{ClipTextEncoder, LatentScaling, SdVae};
use sdscale::pipeline::Pipeline;
use sdscale::weights::{ModelFiles, ModelSource};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_model() -> PathBuf {
    fixtures().join("tiny-sd")
}

pub fn reference(name: &str) -> PathBuf {
    fixtures().join("reference").join(name)
}

pub fn read_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(reference(name)).unwrap()).unwrap()
}

pub fn load_tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(reference(name), &Device::Cpu).unwrap()
}

/// The fixture model, loaded once per test process (f32, CPU, as the references were made).
pub fn pipeline() -> &'static Pipeline {
    static PIPELINE: OnceLock<Pipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| Pipeline::load(&fixture_files(), &Device::Cpu, DType::F32).unwrap())
}

fn fixture_files() -> ModelFiles {
    ModelFiles::resolve(&ModelSource::Dir(tiny_model()), DType::F32).unwrap()
}

fn cpu_f32_backends() -> sdscale::backend::Backends {
    sdscale::backend::Backends::choose(&Device::Cpu, DType::F32).unwrap()
}

/// The fixture's CLIP tokenizer and text encoder on their own (f32, CPU), for the network tests.
pub fn clip() -> &'static ClipTextEncoder {
    static CLIP: OnceLock<ClipTextEncoder> = OnceLock::new();
    CLIP.get_or_init(|| {
        let files = fixture_files();
        ClipTextEncoder::load(
            &files.tokenizer_dir,
            &files.text_encoder_config,
            &files.text_encoder_weights,
            &Device::Cpu,
            DType::F32,
            &cpu_f32_backends(),
        )
        .unwrap()
    })
}

/// The fixture's VAE decoder on its own (f32, CPU).
pub fn vae() -> &'static SdVae {
    static VAE: OnceLock<SdVae> = OnceLock::new();
    VAE.get_or_init(|| {
        let files = fixture_files();
        let backends = cpu_f32_backends();
        SdVae::load(&files.vae_config, &files.vae_weights, &Device::Cpu, DType::F32, &backends, LatentScaling::Divide)
            .unwrap()
    })
}

/// Largest absolute difference and largest reference magnitude, for relative tolerances.
pub fn max_abs_diff(got: &Tensor, want: &Tensor) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    (diff, scale)
}

/// Runs the real `sdscale` binary in `dir`.
pub fn sdscale(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdscale"))
        .args(args)
        .current_dir(dir)
        .env("HF_HOME", dir.join("hf-home"))
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .output()
        .expect("running sdscale")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// (mean, max) absolute difference in 8-bit levels between two images of the same size.
pub fn image_diff(a: &Path, b: &Path) -> (f64, u8) {
    let a = image::open(a).unwrap().to_rgb8();
    let b = image::open(b).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let diffs: Vec<u8> = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).collect();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    (mean, diffs.into_iter().max().unwrap())
}

/// Runs the real `sdscale` binary in `dir` with `input` on stdin.
pub fn sdscale_with_stdin(dir: &Path, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdscale"))
        .args(args)
        .current_dir(dir)
        .env("HF_HOME", dir.join("hf-home"))
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running sdscale");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// The fixture model's path as a string, for argument lists.
pub fn model_arg() -> String {
    tiny_model().display().to_string()
}

/// Every file under `dir` (recursively) whose name ends with `suffix`, sorted.
pub fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_ending(&path, suffix));
        } else if path.file_name().unwrap().to_string_lossy().ends_with(suffix) {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// Asserts success and returns stdout's lines.
pub fn success_lines(output: &Output) -> Vec<String> {
    assert!(output.status.success(), "sdscale failed ({:?}): {}", output.status, stderr(output));
    stdout(output).lines().map(str::to_string).collect()
}

/// Copies a folder tree (a fixture model to alter in a temporary directory).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
