//! Tokenizers: HF `tokenizer.json` through the `tokenizers` crate, or one rebuilt from GGUF
//! metadata (tokens and their types, byte-level BPE's merges and pre-tokenizer name or
//! SentencePiece's scores, special ids) as the equivalent `tokenizer.json`, so both paths
//! run the same, well-tested code — and a GGUF model can be exported with a `tokenizer.json`
//! that transformers reads.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::chat::ChatTemplate;
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, MetaValue};

/// A `[start, end)` byte range of the encoded text.
pub type ByteSpan = (usize, usize);

/// A tokenizer with its special tokens and (optional) chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub chat_template: Option<ChatTemplate>,
    /// Why the checkpoint's chat template could not be compiled (naming its file): kept
    /// rather than raised at load, so commands that never render a conversation (`score`,
    /// `convert`) still work; [`Tokenizer::template`] reports it when one is needed.
    pub chat_template_error: Option<String>,
    /// `tokenizer_config.json` to write beside `tokenizer.json` on export.
    pub config_json: Value,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("pad_token_id", &self.pad_token_id)
            .finish()
    }
}

/// Pre-tokenizer splits of llama.cpp's `tokenizer.ggml.pre` names, in `tokenizer.json` form.
fn pre_tokenizer_for(pre: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    Some(match pre {
        // GPT-2's regex is ByteLevel's built-in one.
        "gpt-2" | "default" | "gpt2" => byte_level(true),
        "llama-bpe" | "llama3" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        "qwen2" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        // SmolLM: every digit on its own, then GPT-2's split.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        _ => return None,
    })
}

impl Tokenizer {
    /// Load `tokenizer.json` from a directory, with `tokenizer_config.json` (special tokens,
    /// chat template) when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&tj).map_err(|e| ModelError::io(&tj, e))?;
        // Parsed as plain JSON first: serde_json refuses nesting past its recursion limit
        // with an error, where the tokenizers crate panics on such a file.
        serde_json::from_str::<Value>(&text).map_err(|e| ModelError::format(&tj, format!("invalid JSON: {e}")))?;
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tj.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config_json = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| ModelError::format(&cfg_path, format!("invalid JSON: {e}")))?
        } else {
            json!({})
        };
        let token_field = |k: &str| -> Option<String> {
            match config_json.get(k)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
                _ => None,
            }
        };
        let id = |k: &str| token_field(k).and_then(|t| inner.token_to_id(&t));
        let (bos, eos, pad) = (id("bos_token"), id("eos_token"), id("pad_token"));
        let template = match config_json.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => {
                let jinja = dir.join("chat_template.jinja");
                jinja
                    .exists()
                    .then(|| std::fs::read_to_string(&jinja))
                    .transpose()
                    .map_err(|e| ModelError::io(&jinja, e))?
            }
        };
        let origin =
            if config_json.get("chat_template").is_some() { cfg_path } else { dir.join("chat_template.jinja") };
        let specials = (token_field("bos_token"), token_field("eos_token"));
        Ok(assemble(inner, [bos, eos, pad], template.as_deref(), specials, &origin, config_json))
    }

    /// A whitespace word-level tokenizer over `words` (the built-in demo's, built in-process:
    /// no download). Ids: `<unk>`, `<pad>`, `<eos>` first, then `words` in order (duplicates
    /// once). Decoding joins words with single spaces, so text written with single spaces
    /// round-trips exactly.
    pub fn word_level<S: AsRef<str>>(words: &[S]) -> Result<Self> {
        let specials = ["<unk>", "<pad>", "<eos>"];
        let mut vocab = Map::new();
        for w in specials.iter().copied().chain(words.iter().map(AsRef::as_ref)) {
            if w.chars().any(char::is_whitespace) || w.is_empty() {
                return Err(ModelError::Tokenizer(format!(
                    "word-level vocabulary entry {w:?} is empty or has whitespace"
                )));
            }
            let next = vocab.len();
            vocab.entry(w.to_string()).or_insert(json!(next));
        }
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(id, t)| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        });
        let inner: tokenizers::Tokenizer =
            tj.to_string().parse().map_err(|e| ModelError::Tokenizer(format!("word-level tokenizer: {e}")))?;
        Ok(Tokenizer {
            inner,
            bos_token_id: None,
            eos_token_id: Some(2),
            pad_token_id: Some(1),
            chat_template: None,
            chat_template_error: None,
            config_json: json!({"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}),
        })
    }

    /// Rebuild the tokenizer a GGUF file describes: `tokenizer.ggml.model` "gpt2" (byte-level
    /// BPE, with the pre-tokenizer named by `tokenizer.ggml.pre`) or "llama" (SentencePiece,
    /// with byte fallback).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.meta("tokenizer.ggml.model").and_then(MetaValue::as_str).unwrap_or("");
        match model {
            "gpt2" => gguf_byte_level_bpe(g),
            "llama" => gguf_sentencepiece(g),
            _ => Err(ModelError::format(
                g.path(),
                format!(
                    "tokenizer.ggml.model {model:?} is not supported (\"gpt2\", byte-level BPE; \"llama\", SentencePiece)"
                ),
            )),
        }
    }

    /// The chat template, or why there is none usable (missing, or failed to compile).
    pub fn template(&self) -> Result<&ChatTemplate> {
        match (&self.chat_template, &self.chat_template_error) {
            (Some(t), _) => Ok(t),
            (None, Some(e)) => Err(ModelError::ChatTemplate(e.clone())),
            (None, None) => Err(ModelError::ChatTemplate("the tokenizer has no chat template".into())),
        }
    }

    /// The longest token's text in bytes (an upper bound on the bytes one token covers).
    pub fn max_token_bytes(&self) -> usize {
        self.inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1)
    }

    /// The largest token id the tokenizer can produce (added tokens included).
    pub fn max_token_id(&self) -> Option<u32> {
        self.inner.get_vocab(true).into_values().max()
    }

    /// Token ids of `text`. `add_special` adds what the tokenizer's post-processor adds
    /// (BOS for Llama 3); special tokens written in the text are always recognised.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special)
            .map_err(|e| ModelError::Tokenizer(format!("encoding: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Token ids with the byte range of `text` each token came from.
    pub fn encode_with_offsets(&self, text: &str, add_special: bool) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let e = self.inner.encode(text, add_special).map_err(|e| ModelError::Tokenizer(format!("encoding: {e}")))?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| ModelError::Tokenizer(format!("decoding: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = self.inner.to_string(false).map_err(|e| ModelError::Tokenizer(format!("serialising: {e}")))?;
        crate::weights::write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
        let cfg = serde_json::to_string_pretty(&self.config_json).expect("JSON value serialises");
        crate::weights::write_atomic(&dir.join("tokenizer_config.json"), cfg.as_bytes())
    }
}

/// A tokenizer with its special ids (BOS, EOS, pad) and its chat template compiled with the
/// BOS/EOS strings `specials`; a template that fails to compile is kept as a message naming
/// `origin`.
fn assemble(
    inner: tokenizers::Tokenizer,
    [bos, eos, pad]: [Option<u32>; 3],
    template: Option<&str>,
    (bos_str, eos_str): (Option<String>, Option<String>),
    origin: &Path,
    config_json: Value,
) -> Tokenizer {
    let (chat_template, chat_template_error) = match template.map(|t| ChatTemplate::new(t, bos_str, eos_str)) {
        None => (None, None),
        Some(Ok(t)) => (Some(t), None),
        Some(Err(e)) => (None, Some(format!("{}: {e}", origin.display()))),
    };
    Tokenizer {
        inner,
        bos_token_id: bos,
        eos_token_id: eos,
        pad_token_id: pad,
        chat_template,
        chat_template_error,
        config_json,
    }
}

// llama.cpp's `tokenizer.ggml.token_type` values that change how a token is built.
const TOKEN_NORMAL: i64 = 1;
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// A GGUF file's token list with each token's llama.cpp type: what both tokenizer kinds are
/// built from. Every read error names the file and the metadata key.
struct GgufVocab<'a> {
    file: &'a GgufFile,
    tokens: Vec<&'a str>,
    types: Vec<i64>,
}

/// The special tokens a GGUF tokenizer declares, and which of them encoding adds.
struct GgufSpecials {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl<'a> GgufVocab<'a> {
    fn read(file: &'a GgufFile) -> Result<Self> {
        let key = "tokenizer.ggml.tokens";
        let err = |m: String| ModelError::format(file.path(), m);
        let tokens: Vec<&str> = file
            .meta(key)
            .and_then(MetaValue::as_array)
            .ok_or_else(|| err(format!("metadata `{key}` missing or not an array")))?
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_str().ok_or_else(|| err(format!("metadata `{key}[{i}]` is not a string"))))
            .collect::<Result<_>>()?;
        // Tokens are looked up by their text: a text listed twice would lose one of its ids
        // (llama.cpp refuses such a file too).
        let mut ids = std::collections::HashMap::with_capacity(tokens.len());
        for (id, tok) in tokens.iter().enumerate() {
            if let Some(first) = ids.insert(*tok, id) {
                return Err(err(format!("metadata `{key}` lists {tok:?} twice (ids {first} and {id})")));
            }
        }
        let mut vocab = GgufVocab { file, types: Vec::new(), tokens };
        vocab.types = match file.meta("tokenizer.ggml.token_type") {
            None => vec![TOKEN_NORMAL; vocab.tokens.len()],
            Some(_) => vocab.per_token("tokenizer.ggml.token_type", "an integer", MetaValue::as_i64)?,
        };
        Ok(vocab)
    }

    fn err(&self, message: String) -> ModelError {
        ModelError::format(self.file.path(), message)
    }

    /// The array `key` of one value per token, each read by `value` (`what` it must be).
    fn per_token<T>(&self, key: &str, what: &str, value: impl Fn(&MetaValue) -> Option<T>) -> Result<Vec<T>> {
        let items = self
            .file
            .meta(key)
            .and_then(MetaValue::as_array)
            .ok_or_else(|| self.err(format!("metadata `{key}` missing or not an array")))?;
        if items.len() != self.tokens.len() {
            return Err(self.err(format!(
                "metadata `{key}` has {} entries for {} tokens",
                items.len(),
                self.tokens.len()
            )));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, v)| value(v).ok_or_else(|| self.err(format!("metadata `{key}[{i}]` is not {what}"))))
            .collect()
    }

    /// The boolean at `key`, `default` where absent.
    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.file.meta(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(format!("metadata `{key}` is not a boolean"))),
        }
    }

    /// The token id at `key`, `default` where absent. An id past the token list is dropped
    /// with a warning rather than refused: llama.cpp loads such files the same way.
    fn special(&self, key: &str, default: Option<u32>) -> Result<Option<u32>> {
        let id = match self.file.meta(key) {
            None => default,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| self.err(format!("metadata `{key}` is not a token id")))?,
            ),
        };
        Ok(id.filter(|&id| {
            let known = (id as usize) < self.tokens.len();
            if !known {
                tracing::warn!(
                    "{}: metadata `{key}` = {id} is past the {} tokens; ignored",
                    self.file.path().display(),
                    self.tokens.len()
                );
            }
            known
        }))
    }

    fn text(&self, id: Option<u32>) -> Option<&'a str> {
        id.and_then(|i| self.tokens.get(i as usize)).copied()
    }

    /// `tokenizer.json`'s model vocabulary: every token to its id.
    fn vocab_json(&self) -> Map<String, Value> {
        self.tokens.iter().enumerate().map(|(id, tok)| (tok.to_string(), json!(id))).collect()
    }

    /// `tokenizer.json`'s added tokens: those of the types `special` and `plain`, matched
    /// whole in the input before the model sees it (only `special` ones are skipped when
    /// decoding with `skip_special`).
    fn added_tokens(&self, special: &[i64], plain: &[i64]) -> Vec<Value> {
        self.tokens
            .iter()
            .zip(&self.types)
            .enumerate()
            .filter(|(_, (_, ty))| special.contains(ty) || plain.contains(ty))
            .map(|(id, (tok, ty))| {
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special.contains(ty)})
            })
            .collect()
    }

    /// The tokenizer `tokenizer_json` describes, with the file's chat template and the
    /// `tokenizer_config.json` transformers needs to load it as exported.
    fn finish(&self, tokenizer_json: Value, s: GgufSpecials) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json.to_string().as_bytes())
            .map_err(|e| self.err(format!("building the tokenizer from metadata: {e}")))?;
        let template = self.file.meta("tokenizer.chat_template").and_then(MetaValue::as_str);
        let config_json = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.text(s.bos),
            "eos_token": self.text(s.eos),
            "unk_token": self.text(s.unk),
            "pad_token": self.text(s.pad),
            "add_bos_token": s.add_bos,
            "add_eos_token": s.add_eos,
            "clean_up_tokenization_spaces": false,
            "chat_template": template,
        });
        let specials = (self.text(s.bos).map(str::to_string), self.text(s.eos).map(str::to_string));
        Ok(assemble(inner, [s.bos, s.eos, s.pad], template, specials, self.file.path(), config_json))
    }
}

impl GgufSpecials {
    /// A post-processor putting BOS before and EOS after each sequence (each where asked
    /// and declared), as HF's Llama tokenizers do; `None` where it would add nothing.
    fn template(&self, v: &GgufVocab) -> Option<Value> {
        let pick = |asked: bool, id: Option<u32>| v.text(id).zip(id).filter(|_| asked);
        let (bos, eos) = (pick(self.add_bos, self.bos), pick(self.add_eos, self.eos));
        (bos.is_some() || eos.is_some()).then(|| bos_eos_template(bos, eos))
    }
}

/// `TemplateProcessing` with `bos` before and `eos` after each sequence (each where given).
fn bos_eos_template(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Value {
    let around = |seq: &str, type_id: u32| -> Vec<Value> {
        let special = |(tok, _): (&str, u32)| json!({"SpecialToken": {"id": tok, "type_id": type_id}});
        bos.map(special)
            .into_iter()
            .chain([json!({"Sequence": {"id": seq, "type_id": type_id}})])
            .chain(eos.map(special))
            .collect()
    };
    let special_tokens: Map<String, Value> = bos
        .into_iter()
        .chain(eos)
        .map(|(tok, id)| (tok.to_string(), json!({"id": tok, "ids": [id], "tokens": [tok]})))
        .collect();
    let pair = [around("A", 0), around("B", 1)].concat();
    json!({"type": "TemplateProcessing", "single": around("A", 0), "pair": pair, "special_tokens": special_tokens})
}

/// `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the merges the file lists and the
/// pre-tokenizer `tokenizer.ggml.pre` names.
fn gguf_byte_level_bpe(g: &GgufFile) -> Result<Tokenizer> {
    let v = GgufVocab::read(g)?;
    let pre = g.meta("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
    let pre_tokenizer = pre_tokenizer_for(pre).ok_or_else(|| {
        v.err(format!("tokenizer.ggml.pre {pre:?} is not supported (gpt-2, default, llama-bpe, qwen2, smollm)"))
    })?;
    let key = "tokenizer.ggml.merges";
    let merges: Vec<&str> = g
        .meta(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| v.err(format!("metadata `{key}` missing or not an array")))?
        .iter()
        .enumerate()
        .map(|(i, m)| m.as_str().ok_or_else(|| v.err(format!("metadata `{key}[{i}]` is not a string"))))
        .collect::<Result<_>>()?;
    let specials = GgufSpecials {
        bos: v.special("tokenizer.ggml.bos_token_id", None)?,
        eos: v.special("tokenizer.ggml.eos_token_id", None)?,
        unk: None,
        pad: v.special("tokenizer.ggml.padding_token_id", None)?,
        add_bos: v.flag("tokenizer.ggml.add_bos_token", false)?,
        add_eos: v.flag("tokenizer.ggml.add_eos_token", false)?,
    };
    let post_processor = specials.template(&v).unwrap_or_else(
        || json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
    );
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        // Control and user-defined tokens: matched whole in the input, as HF's added tokens.
        "added_tokens": v.added_tokens(&[TOKEN_CONTROL], &[TOKEN_USER_DEFINED]),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            // Llama 3's tokenizer looks whole words up before merging.
            "ignore_merges": pre == "llama-bpe",
            "vocab": v.vocab_json(), "merges": merges},
    });
    v.finish(tokenizer_json, specials)
}

/// `tokenizer.ggml.model == "llama"`: SentencePiece BPE as llama.cpp runs it, in the shape
/// of HF's `LlamaTokenizerFast`: spaces written `▁` (and one prepended unless
/// `tokenizer.ggml.add_space_prefix` is false), pieces merged best score first, and a
/// character outside the vocabulary spelt as its UTF-8 bytes (the `<0xNN>` tokens).
fn gguf_sentencepiece(g: &GgufFile) -> Result<Tokenizer> {
    let v = GgufVocab::read(g)?;
    let scores = match g.meta("tokenizer.ggml.scores") {
        // As llama.cpp reads a file without scores.
        None => vec![0.0; v.tokens.len()],
        Some(_) => v.per_token("tokenizer.ggml.scores", "a finite number", |s| s.as_f64().filter(|s| s.is_finite()))?,
    };
    // The defaults are llama.cpp's for "llama" files.
    let specials = GgufSpecials {
        bos: v.special("tokenizer.ggml.bos_token_id", Some(1))?,
        eos: v.special("tokenizer.ggml.eos_token_id", Some(2))?,
        unk: v.special("tokenizer.ggml.unknown_token_id", Some(0))?,
        pad: v.special("tokenizer.ggml.padding_token_id", None)?,
        add_bos: v.flag("tokenizer.ggml.add_bos_token", true)?,
        add_eos: v.flag("tokenizer.ggml.add_eos_token", false)?,
    };
    let space_prefix = v.flag("tokenizer.ggml.add_space_prefix", true)?;
    let escape_spaces = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    let normalizer = if space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, escape_spaces]})
    } else {
        escape_spaces
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        // The prepended space is not part of the text: dropped from the (fused) start.
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": v.added_tokens(&[TOKEN_UNKNOWN, TOKEN_CONTROL], &[TOKEN_USER_DEFINED]),
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": specials.template(&v),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": v.text(specials.unk),
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": v.vocab_json(), "merges": sentencepiece_merges(&v.tokens, &scores)},
    });
    v.finish(tokenizer_json, specials)
}

/// BPE merges that make HF's BPE merge as SentencePiece does (llama.cpp's
/// `llm_tokenizer_spm`): there any two neighbouring pieces whose concatenation is a token
/// merge, the best-scoring result first. So each way of cutting a token into two tokens is a
/// merge, ranked by that token's score.
fn sentencepiece_merges<'a>(tokens: &[&'a str], scores: &[f64]) -> Vec<[&'a str; 2]> {
    let known: std::collections::HashSet<&str> = tokens.iter().copied().collect();
    let mut merges: Vec<(usize, [&str; 2])> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        for (at, _) in tok.char_indices().skip(1) {
            let (left, right) = tok.split_at(at);
            if known.contains(left) && known.contains(right) {
                merges.push((id, [left, right]));
            }
        }
    }
    // Among equal scores SentencePiece merges the leftmost pair first, which BPE's ranks
    // cannot say; ranking the longer result, then the longer left piece, first makes a run of
    // pieces scored alike (Llama's whitespace tokens, all at -1e9) grow from its left end as
    // it does there.
    merges.sort_by(|(a, [a_left, _]), (b, [b_left, _])| {
        (scores[*b].total_cmp(&scores[*a]))
            .then(tokens[*b].len().cmp(&tokens[*a].len()))
            .then(b_left.len().cmp(&a_left.len()))
            .then(a.cmp(b))
    });
    merges.into_iter().map(|(_, merge)| merge).collect()
}
