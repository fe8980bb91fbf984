//! Sharded runs (issue #13): N processes, each choosing its part from Slurm's or Kubernetes' variables,
//! one of them killed and resumed, together write exactly the files of one unsharded run.

use crate::util::{files_ending, model_arg, stderr};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PROMPTS: &str = "a corgi on a beach\n{\"prompt\": \"a red house\", \"seed\": 11}\n";

/// The experiment grid: 2 prompts × 2 images × 2 sizes (different costs) × 2 modes = 16 images.
fn grid_args(manifest: &str) -> Vec<String> {
    let model = model_arg();
    [
        "gen",
        "--model",
        &model,
        "--prompts",
        "prompts.txt",
        "--num-images",
        "2",
        "--sizes",
        "64,96x64",
        "--modes",
        "default,entropy",
        "--steps",
        "4",
        "--seed",
        "5",
        "--manifest",
        manifest,
        "-o",
        "out/{width}x{height}/{mode}/{prompt_index}-{image}.png",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn command(dir: &Path, args: &[String], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sdscale"));
    command
        .args(args)
        .current_dir(dir)
        .env("HF_HOME", dir.join("hf-home"))
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn run(dir: &Path, args: &[String], env: &[(&str, &str)]) -> String {
    let output = command(dir, args, env).output().unwrap();
    assert!(output.status.success(), "sdscale failed: {}", stderr(&output));
    stderr(&output)
}

/// Every PNG under `dir`, by path relative to it, with its bytes.
fn pngs(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_ending(dir, ".png")
        .into_iter()
        .map(|path| (path.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&path).unwrap()))
        .collect()
}

/// The image paths the manifests record whose files exist (relative to the manifests' folder).
fn recorded(dir: &Path) -> BTreeSet<PathBuf> {
    let mut paths = BTreeSet::new();
    for manifest in files_ending(dir, ".jsonl") {
        for line in std::fs::read_to_string(&manifest).unwrap().lines() {
            let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let path = PathBuf::from(record["path"].as_str().unwrap());
            assert!(record["seconds"].as_f64().unwrap() > 0.0);
            if dir.join(&path).is_file() {
                paths.insert(path);
            }
        }
    }
    paths
}

#[test]
fn shards_from_slurm_and_kubernetes_with_a_kill_and_resume_equal_the_unsharded_run() {
    let whole = tempfile::tempdir().unwrap();
    std::fs::write(whole.path().join("prompts.txt"), PROMPTS).unwrap();
    run(whole.path(), &grid_args("manifest.jsonl"), &[]);
    let expected = pngs(whole.path());
    assert_eq!(expected.len(), 16);
    assert_eq!(recorded(whole.path()), expected.keys().cloned().collect());

    let sharded = tempfile::tempdir().unwrap();
    let dir = sharded.path();
    std::fs::write(dir.join("prompts.txt"), PROMPTS).unwrap();
    let args = grid_args("manifest-{shard}.jsonl");
    // A Slurm array --array=10-12 (task 10 is shard 0) and a Kubernetes Indexed Job (index 1 of 3).
    let slurm = |id: &'static str| {
        [("SLURM_ARRAY_TASK_ID", id), ("SLURM_ARRAY_TASK_MIN", "10"), ("SLURM_ARRAY_TASK_COUNT", "3")]
    };
    let said = run(dir, &args, &slurm("10"));
    assert!(said.contains("shard 0 of 3 (Slurm array task 10 of 3)"), "{said}");
    let said = run(dir, &args, &[("JOB_COMPLETION_INDEX", "1"), ("SDSCALE_SHARDS", "3")]);
    assert!(said.contains("shard 1 of 3 (Kubernetes completion index 1 of 3)"), "{said}");

    // Shard 2 is killed once its first image is on disk, then restarted with --skip-existing.
    let before = pngs(dir).len();
    let mut child = command(dir, &args, &slurm("12")).spawn().unwrap();
    let started = Instant::now();
    while pngs(dir).len() == before {
        assert!(started.elapsed() < Duration::from_secs(120), "shard 2 wrote nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success(), "shard 2 finished before it could be killed");
    let after_kill = pngs(dir).len();
    assert!(after_kill < expected.len(), "shard 2 finished before it could be killed");
    let mut resume = args.clone();
    resume.push("--skip-existing".into());
    let said = run(dir, &resume, &slurm("12"));
    assert!(said.contains("skipping"), "{said}");

    // The union, byte for byte; every image recorded in some shard's manifest.
    assert_eq!(pngs(dir), expected);
    assert_eq!(recorded(dir), expected.keys().cloned().collect());
    assert_eq!(files_ending(dir, ".jsonl").len(), 3);
}

#[test]
fn shard_mistakes_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prompts.txt"), PROMPTS).unwrap();
    let mut args = grid_args("manifest.jsonl");
    args.extend(["--shard".into(), "0/2".into()]);
    let output = command(dir.path(), &args, &[]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("put {shard} in the name"), "{}", stderr(&output));

    let output = command(dir.path(), &grid_args("m-{shard}.jsonl"), &[("JOB_COMPLETION_INDEX", "0")]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--shards N"), "{}", stderr(&output));
    assert!(files_ending(dir.path(), ".png").is_empty());
}

/// The grid both cluster recipes run, made small: their own flags, with the fixture model, the CPU,
/// two cheap sizes and two steps.
const SMALL: [(&str, &str); 5] =
    [("MODEL", ""), ("DEVICE", "cpu"), ("SIZES", "64,96x64"), ("STEPS", "2"), ("NUM_IMAGES", "2")];

fn recipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster").join(name)
}

/// `scripts/cluster/slurm-array.sh` as Slurm runs it: once per array task, and once with no array.
#[test]
fn the_slurm_array_script_makes_the_unsharded_run_in_shards() {
    let model = model_arg();
    let run_script = |dir: &Path, task: Option<&str>| {
        let mut command = Command::new("bash");
        command.arg(recipe("slurm-array.sh")).current_dir(dir).env("SDSCALE", env!("CARGO_BIN_EXE_sdscale"));
        command
            .env("HF_HOME", dir.join("hf-home"))
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX");
        for (key, value) in SMALL {
            command.env(key, if key == "MODEL" { &model } else { value });
        }
        if let Some(task) = task {
            command.envs([
                ("SLURM_ARRAY_TASK_ID", task),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ]);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
    };
    let (whole, sharded) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [whole.path(), sharded.path()] {
        std::fs::write(dir.join("prompts.txt"), PROMPTS).unwrap();
    }
    run_script(whole.path(), None);
    for task in ["1", "2", "3"] {
        run_script(sharded.path(), Some(task));
    }
    // 2 prompts × 2 images × 2 sizes × the recipe's 4 modes.
    let expected = pngs(whole.path());
    assert_eq!(expected.len(), 32);
    assert_eq!(pngs(sharded.path()), expected);
    assert_eq!(files_ending(&sharded.path().join("table1"), ".jsonl").len(), 3);
    assert_eq!(recorded(&sharded.path().join("table1")).len(), 32);
}

/// `scripts/cluster/k8s-indexed-job.yaml`, parsed: an Indexed Job whose SDSCALE_SHARDS equals its
/// completions; its container's command, run once per completion index (paths under a temporary
/// folder instead of the volume, the small grid instead of Table 1's), makes the unsharded run.
#[test]
fn the_kubernetes_indexed_job_makes_the_unsharded_run_in_shards() {
    use yaml_rust2::{Yaml, YamlLoader};
    let text = std::fs::read_to_string(recipe("k8s-indexed-job.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("the Job manifest is valid YAML");
    let job = &docs[0];
    assert_eq!(job["kind"].as_str(), Some("Job"));
    assert_eq!(job["apiVersion"].as_str(), Some("batch/v1"));
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let completions = spec["completions"].as_i64().unwrap();
    let container = &spec["template"]["spec"]["containers"][0];
    let env_value = |name: &str| {
        container["env"].as_vec().unwrap().iter().find(|e| e["name"].as_str() == Some(name)).map(|e| e["value"].clone())
    };
    let shards = env_value("SDSCALE_SHARDS").and_then(|v| v.as_str().map(str::to_string)).unwrap();
    assert_eq!(shards, completions.to_string(), "SDSCALE_SHARDS must equal completions");
    assert_eq!(container["command"][0].as_str(), Some("sdscale"));

    // The container's args, with the volume moved into a temporary folder and the grid made small.
    let args: Vec<String> = container["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| match a {
            Yaml::String(s) => s.clone(),
            Yaml::Integer(i) => i.to_string(),
            other => panic!("unexpected argument {other:?}"),
        })
        .collect();
    let model = model_arg();
    let small = |args: &[String]| -> Vec<String> {
        let mut out = Vec::new();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let replacement = match arg.as_str() {
                "--model" => Some(model.as_str()),
                "--device" => Some("cpu"),
                "--sizes" => Some("64,96x64"),
                "--steps" => Some("2"),
                "--num-images" => Some("2"),
                _ => None,
            };
            out.push(arg.replace("/data/", ""));
            if let Some(value) = replacement {
                iter.next();
                out.push(value.to_string());
            }
        }
        out
    };
    let args = small(&args);
    let (whole, sharded) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [whole.path(), sharded.path()] {
        std::fs::write(dir.join("prompts.txt"), PROMPTS).unwrap();
    }
    run(whole.path(), &args, &[]);
    for index in 0..completions {
        let index = index.to_string();
        run(sharded.path(), &args, &[("JOB_COMPLETION_INDEX", &index), ("SDSCALE_SHARDS", &shards)]);
    }
    let expected = pngs(whole.path());
    assert_eq!(expected.len(), 32);
    assert_eq!(pngs(sharded.path()), expected);
    assert_eq!(files_ending(&sharded.path().join("table1"), ".jsonl").len() as i64, completions);
}
