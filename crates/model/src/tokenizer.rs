//! Tokenizers: HF `tokenizer.json` through the `tokenizers` crate, or one rebuilt from GGUF
//! metadata (tokens, merges, pre-tokenizer name, special ids) as the equivalent
//! `tokenizer.json`, so both paths run the same, well-tested code — and a GGUF model can
//! be exported with a `tokenizer.json` that transformers reads.

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

    /// Rebuild the tokenizer a GGUF file describes (`tokenizer.ggml.model == "gpt2"`,
    /// byte-level BPE, with the pre-tokenizer named by `tokenizer.ggml.pre`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let err = |m: String| ModelError::format(path, m);
        let model = g.meta("tokenizer.ggml.model").and_then(MetaValue::as_str).unwrap_or("");
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model {model:?} is not supported (only \"gpt2\", byte-level BPE)"
            )));
        }
        let pre = g.meta("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
        let pre_tokenizer = pre_tokenizer_for(pre).ok_or_else(|| {
            err(format!("tokenizer.ggml.pre {pre:?} is not supported (gpt-2, default, llama-bpe, qwen2, smollm)"))
        })?;
        let strings = |key: &str| -> Result<Vec<&str>> {
            g.meta(key)
                .and_then(MetaValue::as_array)
                .ok_or_else(|| err(format!("metadata `{key}` missing or not an array")))?
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_str().ok_or_else(|| err(format!("metadata `{key}[{i}]` is not a string"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match g.meta("tokenizer.ggml.token_type").and_then(MetaValue::as_array) {
            Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let mut vocab = Map::new();
        let mut added = Vec::new();
        for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
            vocab.insert(tok.to_string(), json!(id));
            // 3 = control, 4 = user-defined: matched whole in the input, as HF's added tokens.
            if ty == 3 || ty == 4 {
                added.push(json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3}));
            }
        }
        let special = |k: &str| g.meta(k).and_then(MetaValue::as_u64).map(|v| v as u32);
        let bos = special("tokenizer.ggml.bos_token_id");
        let eos = special("tokenizer.ggml.eos_token_id");
        let pad = special("tokenizer.ggml.padding_token_id");
        let add_bos = g.meta("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(false);
        let token_str = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).map(|s| s.to_string());
        let post_processor = match (add_bos, token_str(bos)) {
            (true, Some(b)) => json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b.clone(): {"id": b, "ids": [bos], "tokens": [b]}}}),
            _ => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        };
        let tokenizer_json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                // Llama 3's tokenizer looks whole words up before merging.
                "ignore_merges": pre == "llama-bpe",
                "vocab": vocab, "merges": merges},
        });
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json.to_string().as_bytes())
            .map_err(|e| err(format!("building the tokenizer from metadata: {e}")))?;
        let template = g.meta("tokenizer.chat_template").and_then(MetaValue::as_str);
        let config_json = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token_str(bos),
            "eos_token": token_str(eos),
            "pad_token": token_str(pad),
            "add_bos_token": add_bos,
            "clean_up_tokenization_spaces": false,
            "chat_template": template,
        });
        Ok(assemble(inner, [bos, eos, pad], template, (token_str(bos), token_str(eos)), path, config_json))
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
