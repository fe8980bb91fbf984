//! The CLIP BPE tokenizer, built to give exactly the ids transformers' `CLIPTokenizer` gives.
//!
//! SD 2.1-base ships `tokenizer/vocab.json` + `merges.txt` (no `tokenizer.json`). transformers 5's
//! `CLIPTokenizer` (models/clip/tokenization_clip.py) builds a `tokenizers` pipeline from them: NFC,
//! whitespace runs → " ", lowercase; split on CLIP's word regex, then byte-level; BPE with the `</w>`
//! end-of-word suffix; `<|startoftext|> … <|endoftext|>` around the ids. We assemble the same pipeline
//! as a tokenizer.json document and hand it to the `tokenizers` crate, so both sides run the same code.
//!
//! One quirk we keep on purpose: the special tokens (bos, eos, unk and SD 2.x's pad token `!`) are
//! "added tokens", matched in the raw text before any normalisation. So every `!` in a prompt becomes
//! id 0 on its own (never merged into `!!` or `!</w>`), and a literal `<|endoftext|>` ends the text early
//! for the text encoder's purposes. transformers does the same; the fixture ids pin it.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use tokenizers::Tokenizer;

/// CLIP's context length, used when the text encoder's config does not say (`max_position_embeddings`).
pub const MAX_LENGTH: usize = 77;

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    /// Every prompt becomes exactly this many ids: the text encoder's context length.
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

/// The result of tokenizing one prompt.
pub struct Tokens {
    /// Exactly `max_length` ids: bos, the prompt's tokens, eos, then padding.
    pub ids: Vec<u32>,
    /// The text that did not fit and was dropped (empty when nothing was).
    pub truncated_text: String,
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json` when present, else builds the tokenizer from `vocab.json` +
    /// `merges.txt` and the special tokens named in `special_tokens_map.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let special = read_special_tokens(dir)?;
        let json_path = dir.join("tokenizer.json");
        let tokenizer = if json_path.is_file() {
            Tokenizer::from_file(&json_path)
                .map_err(anyhow::Error::from_boxed)
                .with_context(|| format!("loading {}", json_path.display()))?
        } else {
            let document = clip_tokenizer_json(dir, &special)?;
            Tokenizer::from_bytes(serde_json::to_vec(&document)?)
                .map_err(anyhow::Error::from_boxed)
                .with_context(|| format!("building the CLIP tokenizer from {}", dir.display()))?
        };
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .with_context(|| format!("{}: special token {token:?} is not in the vocabulary", dir.display()))
        };
        Ok(Self {
            bos_id: id(&special.bos.content)?,
            eos_id: id(&special.eos.content)?,
            pad_id: id(&special.pad.content)?,
            tokenizer,
            max_length: MAX_LENGTH,
        })
    }

    /// The same tokenizer padding and truncating to `max_length` ids (the text encoder's context
    /// length, from its config; at least bos + eos).
    pub fn with_max_length(self, max_length: usize) -> Result<Self> {
        if max_length < 2 {
            bail!("a context length of {max_length} tokens leaves no room for the prompt");
        }
        Ok(Self { max_length, ..self })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The end-of-text id that closes every encoded prompt.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Tokenizes like `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`.
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let encoding = self.tokenizer.encode(prompt, false).map_err(anyhow::Error::from_boxed)?;
        let body = encoding.get_ids();
        let room = self.max_length - 2;
        let kept = &body[..body.len().min(room)];
        let truncated_text = if body.len() > room { self.decode(&body[room..])? } else { String::new() };
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(kept);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(Tokens { ids, truncated_text })
    }

    /// Readable text for ids, as CLIPTokenizer decodes: byte-level decode, `</w>` → space.
    fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self.tokenizer.decode(ids, true).map_err(anyhow::Error::from_boxed)?;
        let text = text.replace("</w>", " ").split_whitespace().collect::<Vec<_>>().join(" ");
        // Shown in a warning on the terminal: a prompt's control characters (escape sequences) are
        // written out, not sent.
        Ok(crate::text::printable(&text))
    }
}

/// One special token and how it is matched: a plain string in the config files means "match the raw
/// text exactly"; an AddedToken object carries its own flags (SD 2.x: bos/eos/unk are `normalized`,
/// so they also match after lowercasing; the pad `!` is a plain string).
#[derive(Clone)]
struct SpecialToken {
    content: String,
    flags: Value,
}

impl SpecialToken {
    fn from_config(value: &Value) -> Option<Self> {
        match value {
            Value::String(content) => Some(Self { content: content.clone(), flags: json!({}) }),
            Value::Object(object) => {
                let content = object.get("content")?.as_str()?.to_string();
                Some(Self { content, flags: value.clone() })
            }
            _ => None,
        }
    }

    fn flag(&self, name: &str, default: bool) -> bool {
        self.flags.get(name).and_then(Value::as_bool).unwrap_or(default)
    }
}

struct SpecialTokens {
    bos: SpecialToken,
    eos: SpecialToken,
    unk: SpecialToken,
    pad: SpecialToken,
}

/// Reads the special tokens as transformers does: `tokenizer_config.json`, overridden by
/// `special_tokens_map.json`; CLIPTokenizer's defaults for anything missing.
fn read_special_tokens(dir: &Path) -> Result<SpecialTokens> {
    let mut merged = serde_json::Map::new();
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let map: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(value) = map.get(key).filter(|v| !v.is_null()) {
                merged.insert(key.to_string(), value.clone());
            }
        }
    }
    let get = |key: &str, default: &str| {
        merged
            .get(key)
            .and_then(SpecialToken::from_config)
            .unwrap_or_else(|| SpecialToken { content: default.to_string(), flags: json!({}) })
    };
    Ok(SpecialTokens {
        bos: get("bos_token", "<|startoftext|>"),
        eos: get("eos_token", "<|endoftext|>"),
        unk: get("unk_token", "<|endoftext|>"),
        pad: get("pad_token", "<|endoftext|>"),
    })
}

/// The tokenizer.json that transformers' CLIPTokenizer builds from vocab.json + merges.txt.
fn clip_tokenizer_json(dir: &Path, special: &SpecialTokens) -> Result<Value> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&vocab_path).with_context(|| {
            format!(
                "reading {} (the model's tokenizer folder needs vocab.json and merges.txt, or tokenizer.json)",
                vocab_path.display()
            )
        })?)
        .with_context(|| format!("parsing {}", vocab_path.display()))?;
    let merges_text =
        std::fs::read_to_string(&merges_path).with_context(|| format!("reading {}", merges_path.display()))?;
    // Like transformers: skip the "#version" header and blank lines; each line is "left right".
    let merges = merges_text
        .lines()
        .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
        .map(|line| match line.split_once(' ') {
            Some((left, right)) => Ok(json!([left, right])),
            None => bail!("{}: malformed merge line {line:?}", merges_path.display()),
        })
        .collect::<Result<Vec<_>>>()?;

    // Added tokens in the order transformers registers them (pad, bos, eos; unk usually equals eos).
    let mut added_tokens = Vec::new();
    for token in [&special.pad, &special.bos, &special.eos, &special.unk] {
        let content = token.content.as_str();
        let id = vocab
            .get(content)
            .and_then(Value::as_u64)
            .with_context(|| format!("{}: special token {content:?} is missing", vocab_path.display()))?;
        if added_tokens.iter().any(|t: &Value| t["content"] == content) {
            continue;
        }
        added_tokens.push(json!({
            "id": id, "content": content, "special": true,
            "single_word": token.flag("single_word", false), "lstrip": token.flag("lstrip", false),
            "rstrip": token.flag("rstrip", false), "normalized": token.flag("normalized", false)
        }));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": special.unk.content, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    }))
}

// ---- WordPiece (BERT), for LDM-256 ----------------------------------------------------------------

/// BERT's uncased WordPiece tokenizer, as transformers' `BertTokenizer` builds it from `vocab.txt`
/// (LDM-256's `tokenizer/`: bert-base-uncased's vocabulary, no tokenizer.json): BertNormalizer (clean
/// the text, space out CJK characters, lower-case and strip accents), BertPreTokenizer (split on
/// whitespace and punctuation), WordPiece with `##` continuations, `[CLS] … [SEP]`, then `[PAD]` to the
/// context length. LDM's pipeline passes no attention mask, so the padding is attended to.
pub struct WordPieceTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    cls_id: u32,
    sep_id: u32,
    pad_id: u32,
}

impl WordPieceTokenizer {
    /// Reads `vocab.txt` (one token per line, the line number is the id) and the special tokens and
    /// casing of `tokenizer_config.json` / `special_tokens_map.json` (BertTokenizer's defaults otherwise).
    pub fn load(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.txt");
        let text = std::fs::read_to_string(&vocab_path).with_context(|| {
            format!("reading {} (an LDM model's tokenizer folder needs vocab.txt)", vocab_path.display())
        })?;
        let mut vocab = serde_json::Map::new();
        // transformers' load_vocab: every line, stripped of its newline, in order (duplicates keep the last id).
        for (id, token) in text.lines().enumerate() {
            vocab.insert(token.trim_end_matches('\r').to_string(), json!(id));
        }
        let config = read_config(dir)?;
        let flag = |key: &str, default: bool| config.get(key).and_then(Value::as_bool).unwrap_or(default);
        let special = |key: &str, default: &str| match config.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or(default).to_string(),
            _ => default.to_string(),
        };
        let (unk, cls, sep, pad, mask) = (
            special("unk_token", "[UNK]"),
            special("cls_token", "[CLS]"),
            special("sep_token", "[SEP]"),
            special("pad_token", "[PAD]"),
            special("mask_token", "[MASK]"),
        );
        let lowercase = flag("do_lower_case", true);
        // strip_accents null (the default) follows lowercase, as BertNormalizer does.
        let strip_accents = config.get("strip_accents").cloned().unwrap_or(Value::Null);
        let mut added_tokens = Vec::new();
        for token in [&pad, &unk, &cls, &sep, &mask] {
            let Some(id) = vocab.get(token.as_str()).and_then(Value::as_u64) else { continue };
            added_tokens.push(json!({
                "id": id, "content": token, "special": true, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false
            }));
        }
        let document = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                "handle_chinese_chars": flag("tokenize_chinese_chars", true),
                "strip_accents": strip_accents, "lowercase": lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": null,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": unk, "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100, "vocab": vocab}
        });
        let tokenizer = Tokenizer::from_bytes(serde_json::to_vec(&document)?)
            .map_err(anyhow::Error::from_boxed)
            .with_context(|| format!("building the WordPiece tokenizer from {}", vocab_path.display()))?;
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .with_context(|| format!("{}: special token {token:?} is not in the vocabulary", vocab_path.display()))
        };
        if tokenizer.token_to_id(&unk).is_none() {
            bail!("{}: the unknown token {unk:?} is not in the vocabulary", vocab_path.display());
        }
        Ok(Self { cls_id: id(&cls)?, sep_id: id(&sep)?, pad_id: id(&pad)?, tokenizer, max_length: MAX_LENGTH })
    }

    /// The same tokenizer padding and truncating to `max_length` ids (the text encoder's positions).
    pub fn with_max_length(self, max_length: usize) -> Result<Self> {
        if max_length < 2 {
            bail!("a context length of {max_length} tokens leaves no room for the prompt");
        }
        Ok(Self { max_length, ..self })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Like `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`: [CLS], at most
    /// max_length − 2 tokens, [SEP], then [PAD].
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let encoding = self.tokenizer.encode(prompt, false).map_err(anyhow::Error::from_boxed)?;
        let body = encoding.get_ids();
        let room = self.max_length - 2;
        let kept = &body[..body.len().min(room)];
        let truncated_text = if body.len() > room {
            self.tokenizer.decode(&body[room..], true).map_err(anyhow::Error::from_boxed)?
        } else {
            String::new()
        };
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.cls_id);
        ids.extend_from_slice(kept);
        ids.push(self.sep_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(Tokens { ids, truncated_text })
    }
}

/// `tokenizer_config.json` overridden by `special_tokens_map.json`, as transformers merges them.
fn read_config(dir: &Path) -> Result<serde_json::Map<String, Value>> {
    let mut merged = serde_json::Map::new();
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let map: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if let Value::Object(map) = map {
            merged.extend(map.into_iter().filter(|(_, v)| !v.is_null()));
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod wordpiece_tests {
    use super::*;

    /// A vocabulary written here, with bert-base-uncased's layout of specials ([PAD] = 0).
    fn tokenizer(dir: &Path) -> WordPieceTokenizer {
        let vocab =
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "corgi", "on", "beach", "cafe", "##s", ",", "!"];
        std::fs::write(dir.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
        WordPieceTokenizer::load(dir).unwrap()
    }

    #[test]
    fn lowercases_strips_accents_splits_punctuation_and_pads() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = tokenizer(dir.path()).encode("A CORGI on a Café, corgis!! zebra").unwrap();
        let body = [2, 5, 6, 7, 5, 9, 11, 6, 10, 12, 12, 1, 3];
        assert_eq!(&tokens.ids[..body.len()], &body);
        assert!(tokens.ids[body.len()..].iter().all(|&id| id == 0) && tokens.ids.len() == MAX_LENGTH);
        assert!(tokens.truncated_text.is_empty());
    }

    #[test]
    fn truncates_to_the_context_length_and_names_the_dropped_words() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = tokenizer(dir.path()).with_max_length(5).unwrap();
        let tokens = tokenizer.encode("a corgi on a beach").unwrap();
        assert_eq!(tokens.ids, [2, 5, 6, 7, 3]);
        assert_eq!(tokens.truncated_text, "a beach");
    }
}
