//! `cargo xtask fuzz`: seeded mutations of every input format `align` reads (GGUF,
//! safetensors, config.json, tokenizer.json, tokenizer_config.json, JSONL, Parquet, stage and
//! pipeline TOML), each run through the real `align` command in a child process with an
//! address-space limit (setrlimit), a CPU-time limit and a wall-clock limit.
//!
//! A mutant must end in rc 0 or a clean error (`Error: …` and a nonzero exit code). A panic,
//! an abort, a failed allocation, a crash (any other signal) or a hang is a bug: the mutant
//! is saved as a regression case under `fixtures/fuzz/<format>/<kind>-<hash>/`, one per
//! distinct failure (the format and where in our code it failed), and every later run
//! replays the saved cases first (`--replay` runs only them).
//!
//! The valid inputs: the text seeds of `fixtures/fuzz/seeds/`, the tiny checkpoints of
//! `fixtures/models/`, the Parquet files of `fixtures/data/schemas_parquet/`, and a "mini"
//! Llama built here, as safetensors and as GGUF, from the fixtures' BPE vocabulary (see
//! `fixtures/fuzz/README.md`). Every run first checks that each unmutated seed runs clean.

use std::collections::BTreeMap;
use std::fs;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Mutants per format (the default is what CI runs: about a minute on 2 cores)
    #[arg(long, default_value_t = 400)]
    iterations: usize,
    /// Seed of the whole run: mutant I of format F is the same mutant for the same seed
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Only these formats (repeatable; default all)
    #[arg(long = "format", value_enum)]
    formats: Vec<Format>,
    /// A child that has used this many seconds of CPU is a hang (a busy loop or a runaway
    /// slow path; an unmutated run uses under 0.1 s). CPU time, unlike wall time, does not
    /// grow when the machine is busy, so the verdict does not depend on what else runs
    #[arg(long, default_value_t = 2.0)]
    cpu_s: f64,
    /// A child still running after this many wall-clock seconds is a hang (one blocked
    /// without using CPU)
    #[arg(long, default_value_t = 30.0)]
    timeout_s: f64,
    /// Address-space limit of each child (RLIMIT_AS), in MiB. An unmutated run needs under
    /// 300 MiB (single-threaded rayon and OpenBLAS, as the children run)
    #[arg(long, default_value_t = 2048)]
    memory_mib: u64,
    /// Children at a time
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Only replay the saved regression cases of fixtures/fuzz/
    #[arg(long)]
    replay: bool,
    /// Only replay these saved cases (their directories); repeatable
    #[arg(long = "case")]
    cases: Vec<PathBuf>,
    /// The `align` binary (default: `cargo build -p align-pipeline --bin align`, dev profile)
    #[arg(long)]
    align: Option<PathBuf>,
    /// One line per mutant: what was mutated, the command, and how it ended
    #[arg(long)]
    verbose: bool,
}

pub fn run(a: &FuzzArgs) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root").to_path_buf();
    let work = root.join("target/fuzz");
    ensure!(a.jobs > 0, "--jobs must be at least 1");
    ensure!(a.timeout_s > 0.0 && a.cpu_s > 0.0, "--timeout-s and --cpu-s must be positive");
    let scratch = Scratch::new(work.join(format!("work/{}", std::process::id())))?;
    let (align, align_source) = align_binary(a.align.as_deref(), &root, &scratch.0)?;
    let corpus = Corpus::load(&root)?;
    let formats = if a.formats.is_empty() { Format::ALL.to_vec() } else { a.formats.clone() };
    let ctx = Ctx {
        align,
        align_source,
        root: root.clone(),
        fuzz_dir: root.join("fixtures/fuzz"),
        work,
        scratch: scratch.0.clone(),
        limits: Limits {
            timeout: Duration::from_secs_f64(a.timeout_s),
            cpu: Duration::from_secs_f64(a.cpu_s),
            memory_bytes: a.memory_mib << 20,
        },
        jobs: a.jobs,
        seed: a.seed,
        iterations: a.iterations,
        corpus,
        tty: std::io::stderr().is_terminal() && !a.verbose,
        verbose: a.verbose,
    };
    let found = Mutex::new(Found::load(&ctx.fuzz_dir)?);
    let mut rows = Vec::new();

    let only_cases = !a.cases.is_empty();
    let cases = if only_cases {
        a.cases.iter().map(|d| Case::load(d)).collect::<Result<Vec<_>>>()?
    } else {
        Case::all(&ctx.fuzz_dir)?
    };
    if !cases.is_empty() {
        rows.push(("replay".to_string(), replay(&ctx, &cases, &found)?));
    }
    if !a.replay && !only_cases {
        for &format in &formats {
            check_seeds(&ctx, format)?;
            rows.push((format.name().to_string(), fuzz_format(&ctx, format, &found)?));
        }
    }
    drop(scratch);

    let found = found.into_inner().map_err(|_| anyhow::anyhow!("a fuzz worker panicked"))?;
    print_table(&rows);
    found.print(&ctx.root);
    write_summary(&ctx, &rows, &found)?;
    let failed: usize = rows.iter().map(|(_, s)| s.failures()).sum();
    if failed > 0 {
        bail!("fuzz: {failed} runs ended in a panic, abort, OOM, crash or hang (cases under fixtures/fuzz/)");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Formats, the seeds they start from, and the commands that read them
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Gguf,
    Safetensors,
    Config,
    Tokenizer,
    TokenizerConfig,
    Jsonl,
    Parquet,
    StageToml,
    PipelineToml,
}

impl Format {
    const ALL: [Format; 9] = [
        Format::Gguf,
        Format::Safetensors,
        Format::Config,
        Format::Tokenizer,
        Format::TokenizerConfig,
        Format::Jsonl,
        Format::Parquet,
        Format::StageToml,
        Format::PipelineToml,
    ];

    fn name(self) -> &'static str {
        match self {
            Format::Gguf => "gguf",
            Format::Safetensors => "safetensors",
            Format::Config => "config",
            Format::Tokenizer => "tokenizer",
            Format::TokenizerConfig => "tokenizer-config",
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
            Format::StageToml => "stage-toml",
            Format::PipelineToml => "pipeline-toml",
        }
    }

    fn from_name(s: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// How a file is laid out, which picks its structured mutators.
#[derive(Clone, Copy, Debug)]
enum Encoding {
    Gguf,
    Safetensors,
    Json,
    Jsonl,
    Toml,
    Parquet,
}

/// One way a format reaches `align`: the file that is mutated (relative to the work
/// directory), its valid contents, the model directory written as `model/`, and the command.
#[derive(Clone)]
struct Variant {
    model: String,
    path: String,
    seed: Vec<u8>,
    encoding: Encoding,
    args: Vec<String>,
}

/// The fixture checkpoints whose config.json is fuzzed (each architecture reads other keys).
const CONFIG_MODELS: [&str; 8] =
    ["mini", "llama-tied", "llama-untied", "gpt2", "qwen3", "mistral", "llama3-rope", "qwen2-tied-legacy-rope"];

fn args(s: &str) -> Vec<String> {
    s.split(' ').map(String::from).collect()
}

/// `align` commands on `model` (a directory or a GGUF file): batched scoring, greedy
/// generation, and generation through the chat template.
fn model_commands(model: &str, chat: bool) -> Vec<Vec<String>> {
    let mut v = vec![
        args(&format!("score --model {model} --data rows.jsonl")),
        args(&format!("generate --model {model} --max-new-tokens 4 --prompt")),
    ];
    v[1].push("The quick brown fox".into());
    if chat {
        let mut c = args(&format!("generate --model {model} --chat --max-new-tokens 4 --prompt"));
        c.push("Hi there".into());
        v.push(c);
    }
    v
}

fn variants(format: Format, corpus: &Corpus) -> Result<Vec<Variant>> {
    let variant = |model: &str, path: &str, seed: Vec<u8>, encoding, args| Variant {
        model: model.into(),
        path: path.into(),
        seed,
        encoding,
        args,
    };
    let mini_file = |name: &str| corpus.model_file("mini", name);
    Ok(match format {
        Format::Gguf => model_commands("model.gguf", true)
            .into_iter()
            .map(|a| variant("mini", "model.gguf", corpus.gguf.clone(), Encoding::Gguf, a))
            .collect(),
        Format::Safetensors => {
            let seed = mini_file("model.safetensors")?;
            model_commands("model", false)
                .into_iter()
                .map(|a| variant("mini", "model/model.safetensors", seed.clone(), Encoding::Safetensors, a))
                .collect()
        }
        Format::Config => {
            let mut v = Vec::new();
            for m in CONFIG_MODELS {
                let seed = corpus.model_file(m, "config.json")?;
                for a in model_commands("model", false) {
                    v.push(variant(m, "model/config.json", seed.clone(), Encoding::Json, a));
                }
            }
            v
        }
        Format::Tokenizer => {
            let seed = mini_file("tokenizer.json")?;
            model_commands("model", true)
                .into_iter()
                .map(|a| variant("mini", "model/tokenizer.json", seed.clone(), Encoding::Json, a))
                .collect()
        }
        Format::TokenizerConfig => {
            let seed = mini_file("tokenizer_config.json")?;
            let mut cmds = model_commands("model", true);
            cmds.push(args("sft --config sft.toml"));
            cmds.into_iter()
                .map(|a| variant("mini", "model/tokenizer_config.json", seed.clone(), Encoding::Json, a))
                .collect()
        }
        Format::Jsonl => [
            ("train.jsonl", "sft --config sft.toml"),
            ("rows.jsonl", "score --model model --data rows.jsonl"),
            ("prefs.jsonl", "dpo --config dpo.toml"),
            ("prompts.jsonl", "grpo --config grpo.toml"),
        ]
        .into_iter()
        .map(|(file, cmd)| Ok(variant("mini", file, corpus.text_file(file)?, Encoding::Jsonl, args(cmd))))
        .collect::<Result<_>>()?,
        Format::Parquet => {
            let mut v: Vec<Variant> = corpus.parquet[..3]
                .iter()
                .map(|p| {
                    variant(
                        "mini",
                        "train.parquet",
                        p.clone(),
                        Encoding::Parquet,
                        args("sft --config sft-parquet.toml"),
                    )
                })
                .collect();
            let prefs = corpus.parquet[3].clone();
            v.push(variant("mini", "prefs.parquet", prefs, Encoding::Parquet, args("dpo --config dpo-parquet.toml")));
            v
        }
        Format::StageToml => [("sft.toml", "sft"), ("dpo.toml", "dpo"), ("grpo.toml", "grpo")]
            .into_iter()
            .map(|(file, stage)| {
                Ok(variant(
                    "mini",
                    file,
                    corpus.text_file(file)?,
                    Encoding::Toml,
                    args(&format!("{stage} --config {file}")),
                ))
            })
            .collect::<Result<_>>()?,
        Format::PipelineToml => vec![variant(
            "mini",
            "pipeline.toml",
            corpus.text_file("pipeline.toml")?,
            Encoding::Toml,
            args("pipeline pipeline.toml"),
        )],
    })
}

/// Every valid input, in memory: written into each work directory before the mutated file.
struct Corpus {
    /// fixtures/fuzz/seeds/*: stage and pipeline TOML, JSONL rows
    text: Vec<(String, Vec<u8>)>,
    /// "mini" (built here) and fixtures/models/<name>: file name → contents
    models: BTreeMap<String, Vec<(String, Vec<u8>)>>,
    /// the mini model as GGUF
    gguf: Vec<u8>,
    /// fixtures/data/schemas_parquet/part-00..03: text, prompt/completion, messages, preference
    parquet: Vec<Vec<u8>>,
}

impl Corpus {
    fn load(root: &Path) -> Result<Corpus> {
        let read = |p: PathBuf| fs::read(&p).with_context(|| p.display().to_string());
        let seeds = root.join("fixtures/fuzz/seeds");
        let mut text = Vec::new();
        for e in fs::read_dir(&seeds).with_context(|| seeds.display().to_string())? {
            let e = e?;
            if e.file_type()?.is_file() {
                text.push((e.file_name().to_string_lossy().into_owned(), read(e.path())?));
            }
        }
        text.sort();
        let mut models = BTreeMap::new();
        for m in CONFIG_MODELS.into_iter().filter(|m| *m != "mini") {
            let dir = root.join("fixtures/models").join(m);
            let files = [
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
            ]
            .into_iter()
            .filter(|f| dir.join(f).exists())
            .map(|f| Ok((f.to_string(), read(dir.join(f))?)))
            .collect::<Result<Vec<_>>>()?;
            models.insert(m.to_string(), files);
        }
        let mini = MiniModel::build(&models["llama-tied"])?;
        let gguf = mini.gguf()?;
        models.insert("mini".into(), mini.hf_files()?);
        let parquet = (0..4)
            .map(|i| read(root.join(format!("fixtures/data/schemas_parquet/part-{i:02}.parquet"))))
            .collect::<Result<Vec<_>>>()?;
        // Kept for whoever wants to look at (or load) the seeds by hand.
        let out = root.join("target/fuzz/seeds");
        fs::create_dir_all(out.join("mini"))?;
        fs::write(out.join("mini.gguf"), &gguf)?;
        for (name, bytes) in &models["mini"] {
            fs::write(out.join("mini").join(name), bytes)?;
        }
        Ok(Corpus { text, models, gguf, parquet })
    }

    fn text_file(&self, name: &str) -> Result<Vec<u8>> {
        let f = self.text.iter().find(|(n, _)| n == name);
        Ok(f.with_context(|| format!("fixtures/fuzz/seeds/{name} is missing"))?.1.clone())
    }

    fn model_file(&self, model: &str, name: &str) -> Result<Vec<u8>> {
        let files = self.models.get(model).with_context(|| format!("no model {model:?}"))?;
        Ok(files.iter().find(|(n, _)| n == name).with_context(|| format!("model {model} has no {name}"))?.1.clone())
    }

    /// Write the seeds, `model/` and then `files` (the mutated ones) into a fresh `dir`.
    fn materialize(&self, dir: &Path, model: &str, files: &[(String, Vec<u8>)]) -> Result<()> {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| dir.display().to_string())?;
        }
        fs::create_dir_all(dir.join("model")).with_context(|| dir.display().to_string())?;
        for (name, bytes) in &self.text {
            fs::write(dir.join(name), bytes)?;
        }
        let model_files = self.models.get(model).with_context(|| format!("no model {model:?}"))?;
        for (name, bytes) in model_files {
            fs::write(dir.join("model").join(name), bytes)?;
        }
        for (rel, bytes) in files {
            let p = dir.join(checked_relative(rel)?);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(&p, bytes).with_context(|| p.display().to_string())?;
        }
        Ok(())
    }
}

/// A path inside a work directory: relative, and never climbing out of it.
fn checked_relative(rel: &str) -> Result<&Path> {
    let p = Path::new(rel);
    let inside = p.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    ensure!(inside && !rel.is_empty(), "case file path {rel:?} must be relative and inside the case");
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// The mini model: a 2-layer Llama (hidden 32) with the fixtures' BPE vocabulary, written as
// an HF directory (safetensors) and as GGUF, so saved binary cases stay a few dozen KB
// ---------------------------------------------------------------------------------------

struct MiniModel {
    config: Value,
    tokenizer_json: Vec<u8>,
    tokenizer_config: Vec<u8>,
    /// HF name, PyTorch shape, values
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

const MINI_HIDDEN: usize = 32;
const MINI_FFN: usize = 64;
const MINI_LAYERS: usize = 2;
const MINI_HEADS: usize = 2;
const MINI_KV_HEADS: usize = 1;
const MINI_HEAD_DIM: usize = 16;
const MINI_CONTEXT: usize = 512;

impl MiniModel {
    /// llama-tied's config with smaller sizes, its tokenizer, and random weights.
    fn build(llama_tied: &[(String, Vec<u8>)]) -> Result<MiniModel> {
        let file = |name: &str| {
            llama_tied
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| b.clone())
                .with_context(|| format!("llama-tied/{name}"))
        };
        let mut config: Value = serde_json::from_slice(&file("config.json")?).context("llama-tied/config.json")?;
        for (k, v) in [
            ("hidden_size", MINI_HIDDEN),
            ("intermediate_size", MINI_FFN),
            ("num_hidden_layers", MINI_LAYERS),
            ("num_attention_heads", MINI_HEADS),
            ("num_key_value_heads", MINI_KV_HEADS),
            ("head_dim", MINI_HEAD_DIM),
            ("max_position_embeddings", MINI_CONTEXT),
        ] {
            config[k] = json!(v);
        }
        let vocab = config["vocab_size"].as_u64().context("llama-tied/config.json: vocab_size")? as usize;
        let mut rng = Rng::new(7);
        let mut tensors = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, norm: bool| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| if norm { 1.0 + rng.unit() * 0.1 } else { rng.unit() * 0.2 }).collect();
            tensors.push((name, shape, data));
        };
        let (h, kv) = (MINI_HIDDEN, MINI_KV_HEADS * MINI_HEAD_DIM);
        add("model.embed_tokens.weight".into(), vec![vocab, h], false);
        for l in 0..MINI_LAYERS {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), vec![h], true);
            add(format!("{p}.self_attn.q_proj.weight"), vec![MINI_HEADS * MINI_HEAD_DIM, h], false);
            add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], false);
            add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], false);
            add(format!("{p}.self_attn.o_proj.weight"), vec![h, MINI_HEADS * MINI_HEAD_DIM], false);
            add(format!("{p}.post_attention_layernorm.weight"), vec![h], true);
            add(format!("{p}.mlp.gate_proj.weight"), vec![MINI_FFN, h], false);
            add(format!("{p}.mlp.up_proj.weight"), vec![MINI_FFN, h], false);
            add(format!("{p}.mlp.down_proj.weight"), vec![h, MINI_FFN], false);
        }
        add("model.norm.weight".into(), vec![h], true);
        Ok(MiniModel {
            config,
            tokenizer_json: file("tokenizer.json")?,
            tokenizer_config: file("tokenizer_config.json")?,
            tensors,
        })
    }

    fn hf_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(vec![
            ("config.json".into(), serde_json::to_vec_pretty(&self.config)?),
            ("model.safetensors".into(), self.safetensors()),
            ("tokenizer.json".into(), self.tokenizer_json.clone()),
            ("tokenizer_config.json".into(), self.tokenizer_config.clone()),
        ])
    }

    /// Matrices in BF16, norms in F32: both dtypes the loader converts.
    fn safetensors(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut data = Vec::new();
        for (name, shape, values) in &self.tensors {
            let start = data.len();
            let dtype = if shape.len() == 2 {
                data.extend(values.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()));
                "BF16"
            } else {
                data.extend(values.iter().flat_map(|&x| x.to_le_bytes()));
                "F32"
            };
            header.insert(name.clone(), json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}));
        }
        safetensors_bytes(&Value::Object(header).to_string(), None, &data)
    }

    /// llama.cpp's layout: GGUF names, q/k rows permuted, several ggml types.
    fn gguf(&self) -> Result<Vec<u8>> {
        let tok: Value = serde_json::from_slice(&self.tokenizer_json).context("tokenizer.json")?;
        let tok_cfg: Value = serde_json::from_slice(&self.tokenizer_config).context("tokenizer_config.json")?;
        let vocab = tok["model"]["vocab"].as_object().context("tokenizer.json: model.vocab")?;
        let mut tokens = vec![String::new(); vocab.len()];
        for (t, id) in vocab {
            let id = id.as_u64().context("tokenizer.json: a vocab id")? as usize;
            *tokens.get_mut(id).context("tokenizer.json: vocab ids are not 0..n")? = t.clone();
        }
        let special: Vec<u64> = tok["added_tokens"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t["id"].as_u64()).collect())
            .unwrap_or_default();
        let types = (0..tokens.len() as u64).map(|i| if special.contains(&i) { 3 } else { 1 }).collect();
        let merges = tok["model"]["merges"]
            .as_array()
            .context("tokenizer.json: model.merges")?
            .iter()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(p) => Ok(p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")),
                _ => bail!("tokenizer.json: a merge is neither \"a b\" nor [a, b]"),
            })
            .collect::<Result<Vec<_>>>()?;
        let u = |v: usize| GgufValue::U32(v as u32);
        let mut kv = vec![
            ("general.architecture", GgufValue::Str("llama".into())),
            ("general.name", GgufValue::Str("fuzz-mini".into())),
            ("general.alignment", u(32)),
            ("llama.context_length", u(MINI_CONTEXT)),
            ("llama.embedding_length", u(MINI_HIDDEN)),
            ("llama.block_count", u(MINI_LAYERS)),
            ("llama.feed_forward_length", u(MINI_FFN)),
            ("llama.attention.head_count", u(MINI_HEADS)),
            ("llama.attention.head_count_kv", u(MINI_KV_HEADS)),
            ("llama.attention.key_length", u(MINI_HEAD_DIM)),
            ("llama.attention.value_length", u(MINI_HEAD_DIM)),
            ("llama.rope.freq_base", GgufValue::F32(10_000.0)),
            ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5)),
            ("llama.vocab_size", u(tokens.len())),
            ("tokenizer.ggml.model", GgufValue::Str("gpt2".into())),
            ("tokenizer.ggml.pre", GgufValue::Str("gpt-2".into())),
            ("tokenizer.ggml.tokens", GgufValue::StrArray(tokens)),
            ("tokenizer.ggml.token_type", GgufValue::I32Array(types)),
            ("tokenizer.ggml.merges", GgufValue::StrArray(merges)),
            ("tokenizer.ggml.bos_token_id", u(0)),
            ("tokenizer.ggml.eos_token_id", u(0)),
            ("tokenizer.ggml.padding_token_id", u(3)),
            ("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
        ];
        if let Some(t) = tok_cfg["chat_template"].as_str() {
            kv.push(("tokenizer.chat_template", GgufValue::Str(t.into())));
        }
        let tensors = self
            .tensors
            .iter()
            .map(|(name, shape, values)| {
                let (gguf_name, ty) = gguf_name_and_type(name)?;
                let values = match gguf_name.rsplit('.').nth(1) {
                    Some("attn_q") => permute_rows(values, shape, MINI_HEADS),
                    Some("attn_k") => permute_rows(values, shape, MINI_KV_HEADS),
                    _ => values.clone(),
                };
                // ggml lists dimensions fastest first: a PyTorch [out, in] matrix is [in, out].
                let dims = shape.iter().rev().map(|&d| d as u64).collect();
                Ok((gguf_name, dims, ty, quantize(ty, &values)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(gguf_bytes(&kv, &tensors))
    }
}

/// HF name → llama.cpp name and the ggml type it is stored as (a mix, so that the
/// dequantisers are on the path: F32, F16, BF16, Q8_0, Q4_0).
fn gguf_name_and_type(hf: &str) -> Result<(String, GgmlType)> {
    use GgmlType::*;
    let fixed =
        [("model.embed_tokens.weight", "token_embd.weight", Q8_0), ("model.norm.weight", "output_norm.weight", F32)];
    if let Some((_, g, t)) = fixed.iter().find(|(h, _, _)| *h == hf) {
        return Ok((g.to_string(), *t));
    }
    let rest = hf.strip_prefix("model.layers.").with_context(|| format!("no GGUF name for {hf}"))?;
    let (layer, part) = rest.split_once('.').with_context(|| format!("no GGUF name for {hf}"))?;
    let (name, ty) = match part {
        "input_layernorm.weight" => ("attn_norm", F32),
        "self_attn.q_proj.weight" => ("attn_q", F32),
        "self_attn.k_proj.weight" => ("attn_k", F16),
        "self_attn.v_proj.weight" => ("attn_v", Q4_0),
        "self_attn.o_proj.weight" => ("attn_output", BF16),
        "post_attention_layernorm.weight" => ("ffn_norm", F32),
        "mlp.gate_proj.weight" => ("ffn_gate", Q8_0),
        "mlp.up_proj.weight" => ("ffn_up", F16),
        "mlp.down_proj.weight" => ("ffn_down", Q4_0),
        _ => bail!("no GGUF name for {hf}"),
    };
    Ok((format!("blk.{layer}.{name}.weight"), ty))
}

/// llama.cpp's `permute(w, n_head)` of q/k rows: within each head, the two rotary halves
/// interleaved (the GGUF loader undoes it).
fn permute_rows(values: &[f32], shape: &[usize], heads: usize) -> Vec<f32> {
    let (rows, width) = (shape[0], shape[1]);
    let (head_dim, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let (dst, src) = (h * head_dim + i * 2 + s, h * head_dim + s * half + i);
                out[dst * width..(dst + 1) * width].copy_from_slice(&values[src * width..(src + 1) * width]);
            }
        }
    }
    out
}

#[derive(Clone, Copy)]
enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
}

impl GgmlType {
    fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }
}

/// ggml's reference quantisers (blocks of 32 along a row; rows here are multiples of 32).
fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x.iter().flat_map(|&v| f16(v)).collect(),
        GgmlType::BF16 => x.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => x
            .chunks(32)
            .flat_map(|b| {
                let d = b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let qs = b.iter().map(|v| (v * id).round() as i8 as u8);
                f16(d).into_iter().chain(qs).collect::<Vec<_>>()
            })
            .collect(),
        GgmlType::Q4_0 => x
            .chunks(32)
            .flat_map(|b| {
                let max = b.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
                let qs = (0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4));
                f16(d).into_iter().chain(qs).collect::<Vec<_>>()
            })
            .collect(),
    }
}

enum GgufValue {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

/// A GGUF v3 file: header, metadata, tensor directory, then the data aligned to 32.
fn gguf_bytes(kv: &[(&str, GgufValue)], tensors: &[(String, Vec<u64>, GgmlType, Vec<u8>)]) -> Vec<u8> {
    fn string(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (key, value) in kv {
        string(&mut b, key);
        match value {
            GgufValue::U32(v) => b.extend(4u32.to_le_bytes().into_iter().chain(v.to_le_bytes())),
            GgufValue::F32(v) => b.extend(6u32.to_le_bytes().into_iter().chain(v.to_le_bytes())),
            GgufValue::Bool(v) => b.extend(7u32.to_le_bytes().into_iter().chain([*v as u8])),
            GgufValue::Str(s) => {
                b.extend(8u32.to_le_bytes());
                string(&mut b, s);
            }
            GgufValue::StrArray(items) => {
                b.extend(9u32.to_le_bytes().into_iter().chain(8u32.to_le_bytes()));
                b.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|s| string(&mut b, s));
            }
            GgufValue::I32Array(items) => {
                b.extend(9u32.to_le_bytes().into_iter().chain(5u32.to_le_bytes()));
                b.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|v| b.extend(v.to_le_bytes()));
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(ty.id().to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset = (offset + data.len() as u64).next_multiple_of(32);
    }
    for (_, _, _, data) in tensors {
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend(data);
    }
    b
}

/// A safetensors file: the 8-byte header length (`length`, or the real one), the JSON header
/// padded with spaces to a multiple of 8 (as the reference writer does), then the data.
fn safetensors_bytes(header: &str, length: Option<u64>, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut b = length.unwrap_or(h.len() as u64).to_le_bytes().to_vec();
    b.extend(h);
    b.extend(data);
    b
}

// ---------------------------------------------------------------------------------------
// Seeded randomness: splitmix64
// ---------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Mutant `i` of `format` under the run's `seed`, independent of the order children run in.
    fn for_mutant(seed: u64, format: Format, i: usize) -> Rng {
        let f = (format as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut r = Rng(seed ^ f ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        Rng(r.next())
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (0 when n is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// A random element (`xs` is never empty: a programming invariant of every caller).
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    fn range(&mut self, r: &Range<usize>) -> usize {
        r.start + self.below(r.end.saturating_sub(r.start))
    }
}

// ---------------------------------------------------------------------------------------
// Mutators
// ---------------------------------------------------------------------------------------

/// A mutated file: its bytes, what was done (for the case file), and the fields touched
/// (for telling one failure from another).
struct Mutant {
    bytes: Vec<u8>,
    notes: Vec<String>,
    targets: Vec<String>,
}

impl Mutant {
    fn target(&self) -> String {
        let mut t = self.targets.clone();
        t.sort();
        t.dedup();
        t.join("+")
    }
}

/// One structured mutation: what was done and the field it hit; `None` when the file no
/// longer parses (an earlier byte-level mutation), and bytes are mutated instead.
type Edit = Option<(String, String)>;

fn mutate(v: &Variant, rng: &mut Rng) -> Mutant {
    let mut m = Mutant { bytes: v.seed.clone(), notes: Vec::new(), targets: Vec::new() };
    // Mostly one mutation, so a failure points at its cause; sometimes several at once.
    let n = match rng.below(100) {
        0..60 => 1,
        60..85 => 2,
        _ => 3 + rng.below(2),
    };
    // Text formats get few byte-level edits: nearly all of them end at the parser.
    let structured_percent = match v.encoding {
        Encoding::Json | Encoding::Jsonl | Encoding::Toml => 90,
        Encoding::Gguf | Encoding::Safetensors | Encoding::Parquet => 75,
    };
    for _ in 0..n {
        let edit = if rng.percent(structured_percent) { structured(v.encoding, &mut m.bytes, rng) } else { None };
        let (note, target) = match edit {
            Some(e) => e,
            None => {
                let region = byte_region(v.encoding, &m.bytes, rng);
                mutate_bytes(&mut m.bytes, region, rng)
            }
        };
        m.notes.push(note);
        m.targets.push(target);
    }
    m
}

fn structured(encoding: Encoding, b: &mut Vec<u8>, rng: &mut Rng) -> Edit {
    match encoding {
        Encoding::Gguf => mutate_gguf(b, rng),
        Encoding::Safetensors => mutate_safetensors(b, rng),
        Encoding::Json => mutate_json_file(b, rng),
        Encoding::Jsonl => mutate_jsonl(b, rng),
        Encoding::Toml => mutate_toml(b, rng),
        Encoding::Parquet => mutate_parquet(b, rng),
    }
}

/// Where byte-level mutations land: mostly on the headers that steer the reader (GGUF's
/// metadata and tensor directory, safetensors' JSON header, Parquet's footer), where a
/// flipped byte means a wrong length or offset rather than a different weight.
fn byte_region(encoding: Encoding, b: &[u8], rng: &mut Rng) -> Range<usize> {
    let whole = 0..b.len();
    if !rng.percent(75) {
        return whole;
    }
    match encoding {
        Encoding::Gguf => parse_gguf(b).map_or(whole, |l| 0..l.data_start),
        Encoding::Safetensors => b
            .get(..8)
            .map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes")))
            .and_then(|n| usize::try_from(n).ok()?.checked_add(8))
            .map_or(whole, |end| 0..end.min(b.len())),
        Encoding::Parquet => parquet_footer(b).unwrap_or(whole),
        _ => whole,
    }
}

/// Integer extremes written over a field of `width` bytes (besides values near the old one).
const INT_EXTREMES: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    1 << 53,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

fn int_extreme(old: u64, width: usize, rng: &mut Rng) -> u64 {
    let v = match rng.below(10) {
        0 => old.wrapping_add(1),
        1 => old.wrapping_sub(1),
        2 => old.wrapping_mul(2),
        3 => old.wrapping_mul(1000),
        4 => rng.next(),
        _ => *rng.pick(&INT_EXTREMES),
    };
    if width >= 8 { v } else { v & ((1u64 << (8 * width)) - 1) }
}

fn read_uint(b: &[u8], at: usize, width: usize) -> u64 {
    let mut x = [0u8; 8];
    x[..width].copy_from_slice(&b[at..at + width]);
    u64::from_le_bytes(x)
}

fn write_uint(b: &mut [u8], at: usize, width: usize, v: u64) {
    b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
}

/// Truncation, bit flips, inserted, deleted or duplicated bytes, integer extremes.
fn mutate_bytes(b: &mut Vec<u8>, region: Range<usize>, rng: &mut Rng) -> (String, String) {
    let region = if region.start < region.end && region.end <= b.len() { region } else { 0..b.len() };
    if b.is_empty() {
        b.extend((0..1 + rng.below(16)).map(|_| rng.next() as u8));
        return ("filled an empty file with random bytes".into(), "bytes".into());
    }
    let at = rng.range(&region);
    let room = region.end - at;
    match rng.below(7) {
        0 => {
            let cut = if rng.percent(70) { rng.range(&(region.start..region.end + 1)) } else { rng.below(b.len() + 1) };
            b.truncate(cut);
            (format!("truncated to {cut} bytes"), "truncate".into())
        }
        1 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let i = rng.range(&region);
                b[i] ^= 1 << rng.below(8);
            }
            (format!("flipped {n} bits in {region:?}"), "bytes".into())
        }
        2 => {
            let n = 1 + rng.below(16);
            let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            b.splice(at..at, junk);
            (format!("inserted {n} random bytes at {at}"), "bytes".into())
        }
        3 => {
            let n = 1 + rng.below(room.min(64));
            b.drain(at..at + n);
            (format!("deleted {n} bytes at {at}"), "bytes".into())
        }
        4 => {
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let at = at.min(b.len().saturating_sub(width));
            let width = width.min(b.len() - at);
            let v = int_extreme(read_uint(b, at, width), width, rng);
            write_uint(b, at, width, v);
            (format!("wrote {v:#x} as a {width}-byte integer at {at}"), "bytes".into())
        }
        5 => {
            let n = 1 + rng.below(room.min(256));
            let chunk = b[at..at + n].to_vec();
            let to = rng.below(b.len() + 1);
            b.splice(to..to, chunk);
            (format!("copied {n} bytes from {at} to {to}"), "bytes".into())
        }
        _ => {
            let n = 1 + rng.below(room.min(16));
            let fill = *rng.pick(&[0x00u8, 0xff, 0x80, 0x7f]);
            b[at..at + n].fill(fill);
            (format!("set {n} bytes at {at} to {fill:#x}"), "bytes".into())
        }
    }
}

// ----- JSON (config.json, tokenizer.json, tokenizer_config.json, rows, safetensors header) -----

/// Text spliced into serialised JSON or TOML where a placeholder string stands: numbers
/// neither format's value type holds (1e400, 2^64, NaN), and duplicated keys.
#[derive(Default)]
struct Raws(Vec<(String, String)>);

impl Raws {
    fn value(&mut self, raw: impl Into<String>) -> String {
        let s = format!("FUZZRAW{}SENTINEL", self.0.len());
        self.0.push((s.clone(), raw.into()));
        s
    }

    fn splice(&self, mut text: String) -> String {
        for (placeholder, raw) in &self.0 {
            for quoted in [format!("\"{placeholder}\""), format!("'{placeholder}'")] {
                text = text.replace(&quoted, raw);
            }
        }
        text
    }
}

/// Numbers as text: boundaries of every integer width, and floats (all valid JSON and TOML).
const RAW_NUMBERS: [&str; 21] = [
    "0",
    "-1",
    "1",
    "2",
    "255",
    "65536",
    "2147483647",
    "2147483648",
    "-2147483649",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "-9223372036854775808",
    "1e308",
    "-1e308",
    "1e-300",
    "0.5",
    "-0.0",
    "1.5",
    "1e30",
];

/// Numbers past what the value types hold, or not numbers in JSON at all: parse errors,
/// unless a reader is lenient about them.
const BAD_NUMBERS: [&str; 7] =
    ["9223372036854775808", "18446744073709551615", "18446744073709551616", "1e400", "NaN", "Infinity", "-Infinity"];

fn raw_number(rng: &mut Rng) -> &'static str {
    let numbers: &[&'static str] = if rng.percent(15) { &BAD_NUMBERS } else { &RAW_NUMBERS };
    numbers[rng.below(numbers.len())]
}

fn string_extreme(rng: &mut Rng) -> String {
    match rng.below(14) {
        0 => String::new(),
        1 => " ".into(),
        2 => "x".into(),
        3 => "\0".into(),
        4 => "é😀\u{202e}".into(),
        5 => "{{ messages[0]['content'] }}{% for m in messages %}{{ m.role }}".into(),
        6 => "{% for %}{{".into(),
        7 => "<|im_start|><|endoftext|><|pad|>".into(),
        8 => "-1".into(),
        9 => "null".into(),
        10 => "\u{feff}".into(),
        11 => "\\u0000\n\r\t".into(),
        12 => "ab".repeat(1 + rng.below(8)),
        _ => "a".repeat(1 << 16),
    }
}

#[derive(Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A JSON or TOML document as a tree: a random child of a non-empty map or array.
trait Tree {
    /// The child's path segment, its label piece and the child.
    fn child(&self, rng: &mut Rng) -> Option<(Seg, String, &Self)>;
}

impl Tree for Value {
    fn child(&self, rng: &mut Rng) -> Option<(Seg, String, &Self)> {
        match self {
            Value::Object(m) if !m.is_empty() => {
                let (k, child) = m.iter().nth(rng.below(m.len())).expect("index below len");
                Some((Seg::Key(k.clone()), map_label(k, m.len()), child))
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                Some((Seg::Index(i), "[]".into(), &a[i]))
            }
            _ => None,
        }
    }
}

impl Tree for toml::Value {
    fn child(&self, rng: &mut Rng) -> Option<(Seg, String, &Self)> {
        match self {
            toml::Value::Table(t) if !t.is_empty() => {
                let (k, child) = t.iter().nth(rng.below(t.len())).expect("index below len");
                Some((Seg::Key(k.clone()), map_label(k, t.len()), child))
            }
            toml::Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                Some((Seg::Index(i), "[]".into(), &a[i]))
            }
            _ => None,
        }
    }
}

/// The label of a map key: the keys of big maps (vocabularies) are all one field.
fn map_label(key: &str, len: usize) -> String {
    format!(".{}", if len > 64 { "*" } else { key })
}

/// A random node: walk down from the root, stopping at each level with some chance. Also a
/// label naming it without instance details (indices → `[]`, keys of big maps → `*`), so
/// that "vocab entry 17" and "vocab entry 301" count as the same field.
fn random_path<T: Tree>(root: &T, rng: &mut Rng) -> (Vec<Seg>, String) {
    let (mut path, mut label, mut v) = (Vec::new(), String::new(), root);
    loop {
        // Mostly down to a leaf: a value is where the reader's logic (not its parser) runs.
        if !path.is_empty() && rng.percent(10) {
            break;
        }
        match v.child(rng) {
            Some((seg, piece, child)) => {
                path.push(seg);
                label.push_str(&piece);
                v = child;
            }
            None => break,
        }
    }
    (path, if label.is_empty() { "<root>".into() } else { label.trim_start_matches('.').to_string() })
}

/// The exact path, for notes: `model.vocab["Ġt"]`, `added_tokens[2].content`.
fn path_text(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => s.push_str(&format!(".{k}")),
            Seg::Key(k) => s.push_str(&format!("[{k:?}]")),
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    if s.is_empty() { "<root>".into() } else { s.trim_start_matches('.').to_string() }
}

fn json_node<'a>(root: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    path.iter().try_fold(root, |v, s| match s {
        Seg::Key(k) => v.get_mut(k.as_str()),
        Seg::Index(i) => v.get_mut(*i),
    })
}

/// A JSON value of another kind than `old`, or an extreme of the same kind.
fn json_replacement(old: &Value, raws: &mut Raws, rng: &mut Rng) -> (Value, String) {
    let extreme = rng.percent(80);
    match old {
        Value::Number(n) if extreme => {
            let raw = match (rng.below(3), n.as_f64()) {
                (0, Some(x)) => {
                    let y = *rng.pick(&[x * 1000.0, -x, x + 1.0, x - 1.0, x * 1_048_576.0, x / 3.0]);
                    if y.fract() == 0.0 && y.abs() < 1e18 { format!("{}", y as i64) } else { format!("{y:e}") }
                }
                _ => raw_number(rng).to_string(),
            };
            (Value::String(raws.value(raw.clone())), raw)
        }
        Value::String(_) if extreme => {
            let s = string_extreme(rng);
            let note = format!("{:?}", if s.len() > 40 { format!("{:.8}… ({} bytes)", s, s.len()) } else { s.clone() });
            (Value::String(s), note)
        }
        Value::Bool(b) if extreme => (Value::Bool(!b), (!b).to_string()),
        Value::Array(a) if extreme && !a.is_empty() => {
            let n = *rng.pick(&[0usize, 1, 1000]);
            let v: Vec<Value> = a.iter().cycle().take(n * a.len().min(4)).cloned().collect();
            (Value::Array(v), format!("the array with {n}x its first elements"))
        }
        _ => {
            let choices = [
                Value::Null,
                json!(true),
                json!(7),
                json!(-1),
                json!("7"),
                json!([]),
                json!({}),
                json!([old.clone()]),
                json!({"value": old.clone()}),
            ];
            let v = rng.pick(&choices).clone();
            let note = format!("{:.60}", v.to_string());
            (v, note)
        }
    }
}

/// `[[[[…]]]]` nested deeper than any parser's recursion limit.
fn deep_nesting(rng: &mut Rng) -> String {
    let depth = *rng.pick(&[200usize, 5_000, 100_000]);
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// One mutation of a parsed JSON document: a field set to an extreme or another type,
/// deleted, duplicated (a repeated key, or a repeated array element), or nested too deep.
fn mutate_json_value(root: &mut Value, raws: &mut Raws, rng: &mut Rng) -> (String, String) {
    let (path, label) = random_path(root, rng);
    let exact = path_text(&path);
    let (parent_path, last) = match path.split_last() {
        Some((last, parent)) => (parent.to_vec(), Some(last.clone())),
        None => (Vec::new(), None),
    };
    let op = rng.below(100);
    let deletable = last.is_some();
    if deletable && (60..75).contains(&op) {
        let parent = json_node(root, &parent_path).expect("the path was just walked");
        match (parent, &last) {
            (Value::Object(m), Some(Seg::Key(k))) => {
                m.remove(k.as_str());
            }
            (Value::Array(a), Some(Seg::Index(i))) => {
                a.remove(*i);
            }
            _ => {}
        }
        return (format!("{exact}: deleted"), label);
    }
    if deletable && (75..88).contains(&op) {
        let node = json_node(root, &path).expect("the path was just walked").clone();
        let (dup, dup_note) =
            if rng.percent(50) { (node, "itself".to_string()) } else { json_replacement(&node, raws, rng) };
        let parent = json_node(root, &parent_path).expect("the path was just walked");
        match (parent, &last) {
            (Value::Object(m), Some(Seg::Key(k))) => {
                // serde_json keeps one value per key: a placeholder key becomes the duplicate.
                let placeholder = raws.value(serde_json::to_string(k).expect("a string serialises"));
                m.insert(placeholder, dup);
            }
            (Value::Array(a), Some(Seg::Index(i))) => a.insert(*i, dup),
            _ => {}
        }
        return (format!("{exact}: duplicated (the copy = {dup_note})"), label);
    }
    let node = json_node(root, &path).expect("the path was just walked");
    if (88..94).contains(&op) {
        *node = Value::String(raws.value(deep_nesting(rng)));
        return (format!("{exact}: deeply nested arrays"), label);
    }
    let (v, note) = json_replacement(node, raws, rng);
    *node = v;
    (format!("{exact} = {note}"), label)
}

fn serialize_json(v: &Value, raws: &Raws, rng: &mut Rng) -> String {
    let text = if rng.percent(50) { serde_json::to_string_pretty(v) } else { serde_json::to_string(v) };
    raws.splice(text.expect("a serde_json::Value always serialises"))
}

/// Jinja that a chat template (shipped with the model, run on every chat prompt) can hold:
/// runaway loops, repetition and recursion, arithmetic traps, missing variables.
const TEMPLATE_TRAPS: [&str; 15] = [
    "{% for i in range(1000000000) %}{{ i }}{% endfor %}",
    "{{ 'ab' * 1000000000 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ 9223372036854775807 + 1 }}{{ -9223372036854775808 - 1 }}",
    "{{ 1 // 0 }}{{ 1 % 0 }}",
    "{{ messages[1000000] }}{{ messages[-1000000]['content'] }}",
    "{{ raise_exception('fuzz') }}",
    "{{ range(9223372036854775807) | length }}",
    "{{ messages | tojson(indent=1000000000) }}",
    "{{ 'x' | indent(1000000000) }}",
    "{{ 'x' | indent(10000000000) }}",
    "{{ 'x'.center(10000000000) }}{{ 'x'.ljust(10000000000) }}",
    "{{ messages[0]['content'] | wordwrap(1) | indent(100000) }}",
    "{% for m in messages %}{{ m['content'][::-1][1000000:] }}{% endfor %}{{ undefined_name.attr }}",
    "{{",
];

/// The chat template replaced by a trap, or the real one cut short or with a trap inside.
fn mutate_chat_template(v: &mut Value, rng: &mut Rng) -> Option<String> {
    let template = v.get("chat_template")?.as_str()?.to_string();
    let trap = *rng.pick(&TEMPLATE_TRAPS);
    let (new, note) = match rng.below(3) {
        0 => (trap.to_string(), format!("chat_template = {trap:?}")),
        1 => {
            let cut = template.char_indices().nth(rng.below(template.chars().count())).map_or(0, |(i, _)| i);
            (template[..cut].to_string(), format!("chat_template cut at byte {cut}"))
        }
        _ => {
            let at = template.char_indices().nth(rng.below(template.chars().count())).map_or(0, |(i, _)| i);
            (
                format!("{}{trap}{}", &template[..at], &template[at..]),
                format!("chat_template with {trap:?} at byte {at}"),
            )
        }
    };
    v["chat_template"] = Value::String(new);
    Some(note)
}

fn mutate_json_file(b: &mut Vec<u8>, rng: &mut Rng) -> Edit {
    let mut v: Value = serde_json::from_slice(b).ok()?;
    if v.get("chat_template").is_some()
        && rng.percent(35)
        && let Some(note) = mutate_chat_template(&mut v, rng)
    {
        *b = serde_json::to_vec_pretty(&v).expect("a serde_json::Value always serialises");
        return Some((note, "json:chat_template (jinja)".into()));
    }
    let mut raws = Raws::default();
    let (note, label) = mutate_json_value(&mut v, &mut raws, rng);
    *b = serialize_json(&v, &raws, rng).into_bytes();
    Some((note, format!("json:{label}")))
}

/// A row rewritten, deleted, duplicated or swapped, an odd line added, or the line endings
/// changed.
fn mutate_jsonl(b: &mut Vec<u8>, rng: &mut Rng) -> Edit {
    let text = std::str::from_utf8(b).ok()?;
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.is_empty() {
        return None;
    }
    let i = rng.below(lines.len());
    let (note, target) = match rng.below(10) {
        0..5 => {
            let mut v: Value = serde_json::from_str(&lines[i]).ok()?;
            let mut raws = Raws::default();
            let (note, label) = mutate_json_value(&mut v, &mut raws, rng);
            lines[i] = raws.splice(v.to_string());
            (format!("line {}: {note}", i + 1), format!("row:{label}"))
        }
        5 => {
            lines.remove(i);
            (format!("deleted line {}", i + 1), "line".into())
        }
        6 => {
            lines.insert(i, lines[i].clone());
            (format!("duplicated line {}", i + 1), "line".into())
        }
        7 => {
            let odd = match rng.below(9) {
                0 => String::new(),
                1 => "{}".into(),
                2 => "[]".into(),
                3 => "null".into(),
                4 => "\"text\"".into(),
                5 => "{".into(),
                6 => deep_nesting(rng),
                7 => json!({"text": "a ".repeat(1 << 15), "prompt": "p", "completion": "c"}).to_string(),
                _ => "\u{feff}{\"text\": \"bom\"}".into(),
            };
            let note = format!("inserted line {}: {:.40}", i + 1, odd);
            lines.insert(i, odd);
            (note, "line".into())
        }
        8 => {
            let text = if rng.percent(50) { lines.join("\r\n") } else { lines.join("\n").trim_end().to_string() };
            *b = text.into_bytes();
            return Some(("CRLF line ends, or no final newline".into(), "line".into()));
        }
        _ => {
            let j = rng.below(lines.len());
            lines.swap(i, j);
            (format!("swapped lines {} and {}", i + 1, j + 1), "line".into())
        }
    };
    *b = (lines.join("\n") + "\n").into_bytes();
    Some((note, target))
}

// ----- safetensors -----

const SAFETENSORS_DTYPES: [&str; 12] =
    ["F16", "BF16", "F32", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "I8", "U64", "Q4"];

/// Header fields (shapes, offsets, dtypes), deleted, duplicated or swapped tensors, or the
/// 8-byte header length.
fn mutate_safetensors(b: &mut Vec<u8>, rng: &mut Rng) -> Edit {
    let n = usize::try_from(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)).ok()?;
    let end = n.checked_add(8).filter(|&e| e <= b.len())?;
    let mut header: Value = serde_json::from_slice(&b[8..end]).ok()?;
    let data = b[end..].to_vec();
    let names: Vec<String> = header.as_object()?.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if names.is_empty() {
        return None;
    }
    let name = rng.pick(&names).clone();
    let label = digits_to_hash(&name);
    let mut raws = Raws::default();
    let mut length = None;
    let (note, target) = match rng.below(10) {
        0 | 1 => safetensors_shape(header.get_mut(&name)?, &mut raws, rng),
        2 | 3 => safetensors_offsets(header.get_mut(&name)?, &data, &mut raws, rng),
        4 => {
            let d = *rng.pick(&SAFETENSORS_DTYPES);
            header[&name]["dtype"] = json!(d);
            (format!("dtype {d}"), "dtype".into())
        }
        5 => {
            header.as_object_mut()?.remove(&name);
            ("deleted".into(), "tensor deleted".into())
        }
        6 => {
            let mut copy = header[&name].clone();
            let note = safetensors_shape(&mut copy, &mut raws, rng).0;
            let placeholder = raws.value(serde_json::to_string(&name).ok()?);
            header.as_object_mut()?.insert(placeholder, copy);
            (format!("duplicated (copy: {note})"), "tensor duplicated".into())
        }
        7 => {
            let other = rng.pick(&names).clone();
            let (a, c) = (header[&name].clone(), header[&other].clone());
            header[&name] = c;
            header[&other] = a;
            (format!("swapped with {other}"), "tensors swapped".into())
        }
        8 => {
            let (note, label) = mutate_json_value(&mut header, &mut raws, rng);
            *b = safetensors_bytes(&raws.splice(header.to_string()), None, &data);
            return Some((format!("header: {note}"), format!("safetensors:{label}")));
        }
        _ => {
            let v = int_extreme(n as u64, 8, rng);
            length = Some(v);
            (format!("header length {v}"), "header length".into())
        }
    };
    *b = safetensors_bytes(&raws.splice(header.to_string()), length, &data);
    let note = if target == "header length" { note } else { format!("{name}: {note}") };
    let target = if target == "header length" {
        "safetensors:header length".into()
    } else {
        format!("safetensors:{label}:{target}")
    };
    Some((note, target))
}

fn safetensors_shape(entry: &mut Value, raws: &mut Raws, rng: &mut Rng) -> (String, String) {
    let Some(shape) = entry.get_mut("shape").and_then(Value::as_array_mut) else {
        return ("no shape".into(), "shape".into());
    };
    let note = match rng.below(5) {
        0 if !shape.is_empty() => {
            let i = rng.below(shape.len());
            let raw = rng.pick(&[
                "0",
                "1",
                "-1",
                "2147483648",
                "4294967296",
                "9223372036854775807",
                "18446744073709551615",
                "1.5",
            ]);
            shape[i] = Value::String(raws.value(*raw));
            format!("shape[{i}] = {raw}")
        }
        1 => {
            shape.push(json!(1));
            "shape with an extra 1".into()
        }
        2 => {
            shape.pop();
            "shape without its last dimension".into()
        }
        3 => {
            shape.reverse();
            "shape reversed (same size)".into()
        }
        _ => {
            shape.clear();
            "shape []".into()
        }
    };
    (note, "shape".into())
}

fn safetensors_offsets(entry: &mut Value, data: &[u8], raws: &mut Raws, rng: &mut Rng) -> (String, String) {
    let get = |e: &Value, i: usize| e["data_offsets"][i].as_u64().unwrap_or(0);
    let (a, z, len) = (get(entry, 0), get(entry, 1), data.len() as u64);
    let (x, y) = match rng.below(7) {
        0 => (z, a),
        1 => (a, z.saturating_add(1)),
        2 => (a, z.saturating_sub(1)),
        3 => (a, len + 1),
        4 => (a.saturating_add(1), z.saturating_add(1)),
        5 => (0, 0),
        _ => (int_extreme(a, 8, rng), int_extreme(z, 8, rng)),
    };
    entry["data_offsets"] = json!([Value::String(raws.value(x.to_string())), Value::String(raws.value(y.to_string()))]);
    (format!("data_offsets [{a}, {z}] -> [{x}, {y}]"), "data_offsets".into())
}

fn digits_to_hash(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ----- GGUF -----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FieldKind {
    Count,
    Length,
    ValueType,
    Int,
    Float,
    Dims,
    Dim,
    TensorType,
    Offset,
}

/// A number in a GGUF header that the reader trusts: where it is, how wide, what it means.
struct GgufField {
    at: usize,
    width: usize,
    kind: FieldKind,
    label: String,
}

/// The header of a GGUF file as byte ranges, for mutating it in place.
struct GgufLayout {
    fields: Vec<GgufField>,
    kvs: Vec<(Range<usize>, String)>,
    tensors: Vec<(Range<usize>, String)>,
    header_end: usize,
    data_start: usize,
    alignment: usize,
}

struct GgufParser<'a> {
    b: &'a [u8],
    pos: usize,
    fields: Vec<GgufField>,
}

impl GgufParser<'_> {
    fn num(&mut self, width: usize, kind: FieldKind, label: &str, record: bool) -> Option<u64> {
        let end = self.pos.checked_add(width).filter(|&e| e <= self.b.len())?;
        if record {
            self.fields.push(GgufField { at: self.pos, width, kind, label: label.to_string() });
        }
        let v = read_uint(self.b, self.pos, width);
        self.pos = end;
        Some(v)
    }

    fn string(&mut self, label: &str, record: bool) -> Option<String> {
        let n = usize::try_from(self.num(8, FieldKind::Length, label, record)?).ok()?;
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len())?;
        let s = String::from_utf8_lossy(&self.b[self.pos..end]).into_owned();
        self.pos = end;
        Some(s)
    }

    /// A metadata value; of an array's elements only the first is recorded (a 512-token
    /// vocabulary would otherwise drown every other field).
    fn value(&mut self, ty: u64, label: &str, record: bool, depth: usize) -> Option<()> {
        let int = |w| (w, FieldKind::Int);
        let (width, kind) = match ty {
            0 | 1 | 7 => int(1),
            2 | 3 => int(2),
            4 | 5 => int(4),
            6 => (4, FieldKind::Float),
            10 | 11 => int(8),
            12 => (8, FieldKind::Float),
            8 => return self.string(&format!("{label} length"), record).map(drop),
            9 if depth < 3 => {
                let item = self.num(4, FieldKind::ValueType, &format!("{label} item type"), record)?;
                let n = self.num(8, FieldKind::Length, &format!("{label} array length"), record)?;
                for i in 0..n {
                    self.value(item, label, record && i == 0, depth + 1)?;
                }
                return Some(());
            }
            _ => return None,
        };
        self.num(width, kind, label, record).map(drop)
    }
}

fn parse_gguf(b: &[u8]) -> Option<GgufLayout> {
    if b.get(..4)? != b"GGUF" {
        return None;
    }
    let mut p = GgufParser { b, pos: 4, fields: Vec::new() };
    p.num(4, FieldKind::Int, "version", true)?;
    let n_tensors = p.num(8, FieldKind::Count, "tensor count", true)?;
    let n_kv = p.num(8, FieldKind::Count, "metadata count", true)?;
    let (mut kvs, mut tensors, mut alignment) = (Vec::new(), Vec::new(), 32);
    for _ in 0..n_kv {
        let start = p.pos;
        let key = p.string("key length", true)?;
        let ty = p.num(4, FieldKind::ValueType, &format!("{key} type"), true)?;
        p.value(ty, &key, true, 0)?;
        if key == "general.alignment" && ty == 4 {
            alignment = read_uint(b, p.pos - 4, 4) as usize;
        }
        kvs.push((start..p.pos, key));
    }
    for _ in 0..n_tensors {
        let start = p.pos;
        let name = p.string("tensor name length", true)?;
        let label = digits_to_hash(&name);
        let n_dims = p.num(4, FieldKind::Dims, &format!("{label} n_dims"), true)?;
        for _ in 0..n_dims.min(8) {
            p.num(8, FieldKind::Dim, &format!("{label} dim"), true)?;
        }
        p.num(4, FieldKind::TensorType, &format!("{label} type"), true)?;
        p.num(8, FieldKind::Offset, &format!("{label} offset"), true)?;
        tensors.push((start..p.pos, name));
    }
    // The reader refuses other alignments; the layout of a mutant with one keeps 32.
    let alignment = if alignment.is_power_of_two() { alignment } else { 32 };
    let data_start = p.pos.next_multiple_of(alignment);
    Some(GgufLayout { fields: p.fields, kvs, tensors, header_end: p.pos, data_start, alignment })
}

const FLOAT_EXTREMES: [f64; 10] =
    [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -0.0, -1.0, 1e30, 1e-30, 3.4e38, 1e-45];
const GGML_TYPE_IDS: [u64; 18] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 12, 14, 15, 16, 24, 28, 30, 39, 0xffff_ffff];

/// A header number set to an extreme, a metadata entry or tensor deleted or duplicated.
fn mutate_gguf(b: &mut Vec<u8>, rng: &mut Rng) -> Edit {
    let layout = parse_gguf(b)?;
    match rng.below(10) {
        0 => splice_gguf(b, &layout, rng, true),
        1 if !layout.tensors.is_empty() => splice_gguf(b, &layout, rng, false),
        _ => {
            // Half the time a metadata value: the model's sizes are a handful of fields among
            // the hundred-odd of the tensor directory, and the likeliest to size an allocation.
            let values: Vec<&GgufField> = layout
                .fields
                .iter()
                .filter(|f| matches!(f.kind, FieldKind::Int | FieldKind::Float) && f.label != "version")
                .collect();
            let f = if !values.is_empty() && rng.percent(50) { *rng.pick(&values) } else { rng.pick(&layout.fields) };
            let old = read_uint(b, f.at, f.width);
            let new = match f.kind {
                FieldKind::Float => {
                    let x = *rng.pick(&FLOAT_EXTREMES);
                    if f.width == 4 { (x as f32).to_bits() as u64 } else { x.to_bits() }
                }
                FieldKind::ValueType => rng.below(14) as u64 | if rng.percent(10) { 0xffff_ff00 } else { 0 },
                FieldKind::TensorType => *rng.pick(&GGML_TYPE_IDS),
                FieldKind::Dims => rng.below(6) as u64,
                _ => int_extreme(old, f.width, rng),
            };
            write_uint(b, f.at, f.width, new);
            Some((format!("{}: {old:#x} -> {new:#x}", f.label), format!("gguf:{}", digits_to_hash(&f.label))))
        }
    }
}

/// Delete or duplicate a metadata entry (`kv`) or a tensor-directory entry, fixing the
/// count in the header and keeping the data where the alignment puts it, so that the only
/// change the reader sees is the missing or repeated entry.
fn splice_gguf(b: &mut Vec<u8>, l: &GgufLayout, rng: &mut Rng, kv: bool) -> Edit {
    let (entries, count_at, what) = if kv { (&l.kvs, 16, "metadata") } else { (&l.tensors, 8, "tensor") };
    let (range, name) = rng.pick(entries).clone();
    let duplicate = rng.percent(50);
    let mut head = b[..l.header_end].to_vec();
    let count = read_uint(&head, count_at, 8);
    if duplicate {
        let copy = head[range.clone()].to_vec();
        head.splice(range.end..range.end, copy);
        write_uint(&mut head, count_at, 8, count.wrapping_add(1));
    } else {
        head.drain(range);
        write_uint(&mut head, count_at, 8, count.saturating_sub(1));
    }
    head.resize(head.len().next_multiple_of(l.alignment), 0);
    head.extend_from_slice(&b[l.data_start.min(b.len())..]);
    *b = head;
    let op = if duplicate { "duplicated" } else { "deleted" };
    Some((format!("{what} `{name}` {op}"), format!("gguf:{what} {} {op}", digits_to_hash(&name))))
}

// ----- TOML (stage and pipeline configs) -----

/// Keys whose size is the amount of work asked for: a huge value there is a legitimate
/// request for a long run (or many samples), not a bug, so they only get small or wrong
/// values, and are never deleted (their defaults are full-size: 2000 synthetic problems,
/// epochs instead of one step).
const WORK_KEYS: [&str; 14] = [
    "max_steps",
    "num_train_epochs",
    "gradient_accumulation_steps",
    "num_generations",
    "num_iterations",
    "max_new_tokens",
    "max_completion_length",
    "num_ppo_epochs",
    "num_mini_batches",
    "train",
    "eval",
    "k",
    "n",
    "rloo_k",
];

fn toml_node<'a>(root: &'a mut toml::Value, path: &[Seg]) -> Option<&'a mut toml::Value> {
    path.iter().try_fold(root, |v, s| match (v, s) {
        (toml::Value::Table(t), Seg::Key(k)) => t.get_mut(k),
        (toml::Value::Array(a), Seg::Index(i)) => a.get_mut(*i),
        _ => None,
    })
}

/// A TOML value of another type, or an extreme of the same type (mild for [`WORK_KEYS`]).
fn toml_replacement(old: &toml::Value, key: &str, raws: &mut Raws, rng: &mut Rng) -> (toml::Value, String) {
    use toml::Value as T;
    let work = WORK_KEYS.contains(&key);
    // Another type only fails serde's typing (deny_unknown_fields configs): mostly extremes.
    let extreme = rng.percent(85);
    match old {
        T::Integer(_) if extreme && work => {
            let v = *rng.pick(&[0i64, -1, 1, 2, 3]);
            (T::Integer(v), v.to_string())
        }
        T::Integer(x) if extreme => {
            let v = *rng.pick(&[
                0,
                -1,
                1,
                x.wrapping_mul(1000),
                x.wrapping_neg(),
                i32::MAX as i64,
                i32::MAX as i64 + 1,
                u32::MAX as i64,
                i64::MAX,
                i64::MIN,
            ]);
            if rng.percent(10) {
                let raw = *rng.pick(&BAD_NUMBERS[..4]);
                return (T::String(raws.value(raw)), raw.into());
            }
            (T::Integer(v), v.to_string())
        }
        T::Float(_) if extreme => {
            let v = *rng.pick(&FLOAT_EXTREMES);
            (T::Float(v), v.to_string())
        }
        T::String(_) if extreme => {
            let s = string_extreme(rng);
            let note = format!("{:?}", if s.len() > 40 { format!("{:.8}… ({} bytes)", s, s.len()) } else { s.clone() });
            (T::String(s), note)
        }
        T::Boolean(b) if extreme => (T::Boolean(!b), (!b).to_string()),
        T::Array(a) if extreme && !a.is_empty() => {
            let n = if work { 2 } else { *rng.pick(&[0usize, 2, 50]) };
            let v: Vec<T> = a.iter().cycle().take(n * a.len()).cloned().collect();
            (T::Array(v), format!("the array repeated {n}x"))
        }
        _ => {
            let mut table = toml::Table::new();
            table.insert("fuzz".into(), T::Integer(1));
            let choices = [
                T::Integer(7),
                T::Integer(-1),
                T::Float(0.5),
                T::String("7".into()),
                T::String(String::new()),
                T::Boolean(true),
                T::Array(Vec::new()),
                T::Array(vec![old.clone()]),
                T::Table(table),
            ];
            let v = rng.pick(&choices).clone();
            let note = format!("{:.60}", v.to_string());
            (v, note)
        }
    }
}

/// A field set to an extreme or another type, deleted, added unknown, or an array element
/// duplicated (a second stage of the same name, say); or a line-level edit: a repeated key
/// or table header, a deleted line.
fn mutate_toml(b: &mut Vec<u8>, rng: &mut Rng) -> Edit {
    let text = std::str::from_utf8(b).ok()?.to_string();
    if rng.percent(12) {
        return mutate_toml_lines(b, &text, rng);
    }
    let mut root = toml::Value::Table(text.parse::<toml::Table>().ok()?);
    let mut raws = Raws::default();
    let (path, label) = random_path(&root, rng);
    let exact = path_text(&path);
    let key = match path.iter().rev().find_map(|s| if let Seg::Key(k) = s { Some(k.clone()) } else { None }) {
        Some(k) => k,
        None => return mutate_toml_lines(b, &text, rng),
    };
    let (parent_path, last) = path.split_last().map(|(l, p)| (p.to_vec(), l.clone()))?;
    let op = match rng.below(100) {
        0..15 if matches!(&last, Seg::Key(k) if WORK_KEYS.contains(&k.as_str())) => 20,
        op => op,
    };
    let note = match op {
        0..15 => {
            match (toml_node(&mut root, &parent_path)?, &last) {
                (toml::Value::Table(t), Seg::Key(k)) => {
                    t.remove(k);
                }
                (toml::Value::Array(a), Seg::Index(i)) => {
                    a.remove(*i);
                }
                _ => {}
            }
            format!("{exact}: deleted")
        }
        15..20 => {
            let node = toml_node(&mut root, &path)?.clone();
            match toml_node(&mut root, &parent_path)? {
                toml::Value::Table(t) => {
                    t.insert("fuzz_unknown_key".into(), node);
                }
                toml::Value::Array(a) => a.push(node),
                _ => {}
            }
            format!("{exact}: copied under an unknown key, or appended again")
        }
        _ => {
            let node = toml_node(&mut root, &path)?;
            let (v, note) = toml_replacement(node, &key, &mut raws, rng);
            *node = v;
            format!("{exact} = {note}")
        }
    };
    let out = toml::to_string(&root).ok()?;
    *b = raws.splice(out).into_bytes();
    Some((note, format!("toml:{}", digits_to_hash(&label))))
}

/// A number written over a TOML line: any raw number, but only a small or wrong one for a
/// key that sizes the work (a huge `max_steps` is a legitimate request for a long run).
fn line_number(key: &str, rng: &mut Rng) -> String {
    if WORK_KEYS.contains(&key) {
        rng.pick(&["0", "-1", "1", "2", "3"]).to_string()
    } else {
        raw_number(rng).to_string()
    }
}

fn mutate_toml_lines(b: &mut Vec<u8>, text: &str, rng: &mut Rng) -> Edit {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let keyed: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            let l = lines[i].trim_start();
            !l.is_empty() && !l.starts_with('#')
        })
        .collect();
    if keyed.is_empty() {
        return None;
    }
    let i = *rng.pick(&keyed);
    let line = lines[i].clone();
    let key = line.split('=').next().unwrap_or("").trim().to_string();
    let op = match rng.below(3) {
        1 if WORK_KEYS.contains(&key.as_str()) => 0,
        op => op,
    };
    let (note, target) = match op {
        0 => {
            let copy = match line.split_once('=') {
                Some((k, _)) if rng.percent(50) => format!("{k}= {}", line_number(&key, rng)),
                _ => line.clone(),
            };
            lines.insert(i + 1, copy);
            (format!("line {} repeated: {line:.60}", i + 1), format!("toml-line:{key} repeated"))
        }
        1 => {
            lines.remove(i);
            (format!("line {} deleted: {line:.60}", i + 1), format!("toml-line:{key} deleted"))
        }
        _ => match line.split_once('=') {
            Some((k, _)) => {
                let raw = line_number(&key, rng);
                lines[i] = format!("{k}= {raw}");
                (format!("line {}: {} = {raw}", i + 1, k.trim()), format!("toml-line:{key} raw"))
            }
            None => {
                lines.insert(i, line.clone());
                (format!("header line {} repeated: {line}", i + 1), format!("toml-line:{key} repeated"))
            }
        },
    };
    *b = (lines.join("\n") + "\n").into_bytes();
    Some((note, digits_to_hash(&target)))
}

// ----- Parquet -----

/// The Thrift-encoded file metadata just before the footer: `<metadata><u32 len>PAR1`.
fn parquet_footer(b: &[u8]) -> Option<Range<usize>> {
    let n = b.len();
    if n < 12 || &b[n - 4..] != b"PAR1" {
        return None;
    }
    let len = read_uint(b, n - 8, 4) as usize;
    let start = (n - 8).checked_sub(len)?;
    Some(start..n - 8)
}

/// The footer length, varints blown up inside the metadata, or metadata bytes.
fn mutate_parquet(b: &mut Vec<u8>, rng: &mut Rng) -> Edit {
    let meta = parquet_footer(b)?;
    let n = b.len();
    match rng.below(4) {
        0 => {
            let old = read_uint(b, n - 8, 4);
            let v = int_extreme(old, 4, rng);
            write_uint(b, n - 8, 4, v);
            Some((format!("footer length {old} -> {v}"), "parquet:footer length".into()))
        }
        1 if !meta.is_empty() => {
            // A ten-byte varint is as long as a Thrift reader takes: the largest lengths and counts.
            let at = rng.range(&meta);
            let bomb = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
            let end = (at + bomb.len()).min(meta.end);
            b[at..end].copy_from_slice(&bomb[..end - at]);
            Some((format!("huge varint at {at} in the metadata"), "parquet:metadata varint".into()))
        }
        _ => {
            let (note, _) = mutate_bytes(b, meta, rng);
            Some((format!("metadata: {note}"), "parquet:metadata bytes".into()))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running a child and judging how it ended
// ---------------------------------------------------------------------------------------

struct Limits {
    timeout: Duration,
    cpu: Duration,
    memory_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Clean,
    Panic,
    Abort,
    Oom,
    Crash,
    Hang,
}

impl Outcome {
    const ALL: [Outcome; 7] =
        [Outcome::Ok, Outcome::Clean, Outcome::Panic, Outcome::Abort, Outcome::Oom, Outcome::Crash, Outcome::Hang];

    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Clean => "clean",
            Outcome::Panic => "panic",
            Outcome::Abort => "abort",
            Outcome::Oom => "oom",
            Outcome::Crash => "crash",
            Outcome::Hang => "hang",
        }
    }

    fn failed(self) -> bool {
        !matches!(self, Outcome::Ok | Outcome::Clean)
    }
}

/// How a child ended.
struct End {
    outcome: Outcome,
    /// "exit 1", "SIGABRT", "killed after 15 s"
    how: String,
    stderr: String,
    elapsed: Duration,
    /// A hang's stacks when it was killed (gdb's `thread apply all bt`), if gdb could attach.
    stacks: Option<String>,
}

/// Run `align ARGS` in `dir` under the limits. Children are single-threaded (rayon and
/// OpenBLAS), so two of them share two cores and the memory they need stays predictable.
/// `backtrace`: with `RUST_BACKTRACE=1`, for finding where a failure happened.
fn run_child(align: &Path, dir: &Path, args: &[String], limits: &Limits, backtrace: bool) -> Result<End> {
    let stderr_path = dir.join(".stderr");
    let stderr = fs::File::create(&stderr_path).with_context(|| stderr_path.display().to_string())?;
    let mut cmd = Command::new(align);
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .env("RUST_BACKTRACE", if backtrace { "1" } else { "0" })
        .env("RUST_LIB_BACKTRACE", "0")
        .env("RAYON_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("RUST_LOG", "warn");
    // The kernel's CPU limit is only a backstop (where /proc cannot be read): past it the
    // child dies of SIGXCPU, without the stacks that polling takes first.
    let (memory, cpu_backstop) = (limits.memory_bytes, limits.cpu.as_secs() + 2);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (setpgid, setrlimit, prctl).
    unsafe {
        cmd.pre_exec(move || limit_self(memory, cpu_backstop));
    }
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {}", align.display()))?;
    let waited = wait_within(&mut child, limits.timeout, Some(limits.cpu))?;
    let elapsed = start.elapsed();
    let (status, stacks) = match waited {
        Waited::Exited(status) => (Ok(status), None),
        over => {
            let stacks = gdb_stacks(child.id(), dir);
            // Its own process group: whatever it started goes with it.
            // SAFETY: kill(2) on the group this child leads; no memory is touched.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            child.wait()?;
            let how = match over {
                Waited::Cpu(cpu) => format!("killed after {:.1} s of CPU", cpu.as_secs_f64()),
                _ => format!("killed after {:.0} s", elapsed.as_secs_f64()),
            };
            (Err(how), stacks)
        }
    };
    let stderr = read_capped(&stderr_path, 1 << 20)?;
    Ok(End { stacks, ..judge(status, stderr, elapsed) })
}

enum Waited {
    Exited(ExitStatus),
    /// Still running at the wall-clock limit
    Wall,
    /// Past the CPU limit, having used this much
    Cpu(Duration),
}

/// Wait for `child` until it exits, `timeout` passes, or it has used more than `cpu` of
/// CPU time (read from /proc every 50 ms; not checked where /proc is missing).
fn wait_within(child: &mut std::process::Child, timeout: Duration, cpu: Option<Duration>) -> Result<Waited> {
    let start = Instant::now();
    let mut tick = 0u64;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Waited::Exited(status));
        }
        if start.elapsed() >= timeout {
            return Ok(Waited::Wall);
        }
        tick += 1;
        if let Some(limit) = cpu
            && tick.is_multiple_of(10)
            && let Some(used) = cpu_time(child.id())
            && used > limit
        {
            return Ok(Waited::Cpu(used));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// User plus system CPU time of a process, all its threads, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3: utime is 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// Where a hung child is stuck, from gdb: the stacks of its threads. `None` when gdb is not
/// installed, may not attach (ptrace restrictions) or takes over a minute; the hang is then
/// told apart by the fields mutated instead.
fn gdb_stacks(pid: u32, dir: &Path) -> Option<String> {
    let out_path = dir.join(".gdb");
    let out = fs::File::create(&out_path).ok()?;
    let mut gdb = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt 40"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    if !matches!(wait_within(&mut gdb, Duration::from_secs(60), None).ok()?, Waited::Exited(_)) {
        let _ = gdb.kill();
        let _ = gdb.wait();
        return None;
    }
    let text = fs::read_to_string(&out_path).ok()?;
    text.lines().any(|l| l.starts_with("#0")).then_some(text)
}

/// In the child, before exec: a process group of its own, the address-space limit, no
/// core files (an abort must not litter the disk), a cap on file sizes, and death with
/// the parent (a killed `cargo xtask fuzz` leaves no hung children behind).
fn limit_self(memory: u64, cpu_seconds: u64) -> std::io::Result<()> {
    // SAFETY: plain system calls on this process.
    unsafe {
        if libc::setpgid(0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let limits = [
            (libc::RLIMIT_AS, memory),
            (libc::RLIMIT_CORE, 0),
            (libc::RLIMIT_FSIZE, 1 << 30),
            (libc::RLIMIT_CPU, cpu_seconds),
        ];
        for (resource, limit) in limits {
            let r = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: limit as libc::rlim_t };
            if libc::setrlimit(resource, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        #[cfg(target_os = "linux")]
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    Ok(())
}

/// The file, or its first and last `cap` bytes when it is longer.
fn read_capped(path: &Path, cap: u64) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| path.display().to_string())?;
    let len = f.metadata()?.len();
    let mut buf = Vec::new();
    if len <= 2 * cap {
        f.read_to_end(&mut buf)?;
    } else {
        Read::by_ref(&mut f).take(cap).read_to_end(&mut buf)?;
        buf.extend_from_slice(b"\n[...]\n");
        f.seek(SeekFrom::End(-(cap as i64)))?;
        f.read_to_end(&mut buf)?;
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// `status`: how it exited, or how the harness killed it (a hang).
fn judge(status: Result<ExitStatus, String>, stderr: String, elapsed: Duration) -> End {
    let end = |outcome, how: String| End { outcome, how, stderr: stderr.clone(), elapsed, stacks: None };
    let status = match status {
        Ok(s) => s,
        Err(how) => return end(Outcome::Hang, how),
    };
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => signal_name(s),
        (None, None) => "ended".into(),
    };
    let outcome = if stderr.contains("memory allocation of") && stderr.contains("failed") {
        Outcome::Oom
    } else if stderr.contains("panicked at") || status.code() == Some(101) {
        Outcome::Panic
    } else {
        match (status.code(), status.signal()) {
            (Some(0), _) => Outcome::Ok,
            (Some(_), _) if stderr.lines().any(|l| l.starts_with("Error:")) => Outcome::Clean,
            // Not ours: the kernel's OOM killer.
            (None, Some(libc::SIGKILL)) => Outcome::Oom,
            // The CPU-limit backstop.
            (None, Some(libc::SIGXCPU)) => Outcome::Hang,
            (None, Some(libc::SIGABRT)) => Outcome::Abort,
            _ => Outcome::Crash,
        }
    };
    end(outcome, how)
}

fn signal_name(s: i32) -> String {
    let name = match s {
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {s}"),
    };
    name.into()
}

/// `file:line:col` of the first panic in `stderr`, and its message.
fn panic_site(stderr: &str) -> Option<(String, String)> {
    let at = stderr.find("panicked at ")? + "panicked at ".len();
    let rest = &stderr[at..];
    let (first, tail) = rest.split_once('\n').unwrap_or((rest, ""));
    let location = first.trim_end_matches(':').to_string();
    let message = tail.lines().next().unwrap_or("").to_string();
    Some((location, message))
}

/// Is `location` (`file:line:col` as a panic or a backtrace prints it) in this workspace's
/// own code? Panics there print `crates/…`, backtraces the absolute path.
fn workspace_relative(location: &str) -> Option<&str> {
    let at = location.find("crates/")?;
    let outside = ["/.cargo/", "/rustc/", "/.rustup/"].iter().any(|p| location.contains(p));
    (!outside).then(|| &location[at..])
}

/// A location outside the workspace without the machine's paths: `tokenizers-0.23.2/src/…`
/// for a registry crate, `library/…` for std.
fn portable_location(location: &str) -> &str {
    if let Some(at) = location.find("/registry/src/") {
        let rest = &location[at + "/registry/src/".len()..];
        return rest.split_once('/').map_or(rest, |(_, crate_path)| crate_path);
    }
    location.find("/library/").map_or(location, |at| &location[at + 1..])
}

/// The innermost frame of a `RUST_BACKTRACE=1` trace in this workspace's code, as
/// `file:line` (the column varies with nothing that matters here).
fn workspace_frame(trace: &str) -> Option<String> {
    trace.lines().filter_map(|l| l.trim_start().strip_prefix("at ")).find_map(|loc| {
        let rel = workspace_relative(loc)?;
        Some(rel.rsplit_once(':').map_or(rel, |(file_line, _)| file_line).to_string())
    })
}

/// The innermost frame in this workspace's code of gdb's stacks (`#2  unpermute_rows () at
/// crates/model/src/gguf.rs:593`), as `file:line`.
fn gdb_frame(stacks: &str) -> Option<String> {
    stacks.lines().filter(|l| l.starts_with('#')).find_map(|l| {
        let (_, location) = l.rsplit_once(" at ")?;
        workspace_relative(location.trim()).map(String::from)
    })
}

/// The frames of gdb's stacks in this workspace's code, innermost first, for the case file.
fn gdb_workspace_frames(stacks: &str) -> Vec<String> {
    stacks
        .lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| {
            let (head, location) = l.rsplit_once(" at ")?;
            let function = head.split_whitespace().rev().nth(1).unwrap_or("?");
            workspace_relative(location.trim()).map(|loc| format!("{function} at {loc}"))
        })
        .collect()
}

/// Where it failed, when it is not already in the first run's stderr: a panic inside a
/// dependency (Burn's shape checks, say: the caller is the bug), an allocation failure, an
/// abort or a crash. `None` when the trace names no frame of ours (or is not printed, as
/// for a stack overflow or a signal).
fn needs_trace(end: &End) -> bool {
    match end.outcome {
        Outcome::Panic => panic_site(&end.stderr).is_none_or(|(loc, _)| workspace_relative(&loc).is_none()),
        Outcome::Oom | Outcome::Abort | Outcome::Crash => true,
        _ => false,
    }
}

/// Where in our code a failure happened and the workspace frames around it (innermost
/// first): a hang's from the stacks gdb took before it was killed; a panic in a dependency,
/// an allocation failure, an abort or a crash's from a second run of the same work
/// directory with `RUST_BACKTRACE=1`; a panic in our code needs neither (its message says).
fn locate(
    ctx: &Ctx,
    dir: &Path,
    model: &str,
    files: &[(String, Vec<u8>)],
    args: &[String],
    end: &End,
) -> Result<(Option<String>, Vec<String>)> {
    if end.outcome == Outcome::Hang {
        let stacks = end.stacks.as_deref().unwrap_or_default();
        return Ok((gdb_frame(stacks), gdb_workspace_frames(stacks)));
    }
    if !needs_trace(end) {
        return Ok((None, Vec::new()));
    }
    ctx.corpus.materialize(dir, model, files)?;
    let trace = run_child(&ctx.align, dir, args, &ctx.limits, true)?.stderr;
    Ok((workspace_frame(&trace), workspace_frames(&trace)))
}

/// What tells this failure apart from others: the format (the check that is missing is
/// usually in that format's reader, even when two formats crash at the same place), and
/// where in our code it happened (the panic's location, or the innermost workspace frame
/// of the rerun's backtrace); failing that, its kind, command, the fields mutated and how
/// stderr ends (digits blurred).
fn failure_key(format: Format, args: &[String], target: &str, end: &End, site: Option<&str>) -> String {
    let panic_at = panic_site(&end.stderr).map(|(loc, _)| loc);
    let what = match (end.outcome, panic_at.as_deref().and_then(workspace_relative), site) {
        (Outcome::Panic, Some(loc), _) => format!("panic at {loc}"),
        (Outcome::Panic, None, Some(site)) => {
            format!("panic at {} via {site}", portable_location(&panic_at.unwrap_or_default()))
        }
        (outcome, _, Some(site)) => format!("{} at {site}", outcome.name()),
        _ => {
            let last = end.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            let last: String = digits_to_hash(last).chars().take(80).collect();
            format!("{} | {} | {target} | {last}", end.outcome.name(), args[0])
        }
    };
    format!("{}: {what}", format.name())
}

/// The line of stderr that says what happened (the panic message, the error, the abort),
/// or for a hang where it was stuck.
fn headline(end: &End) -> String {
    if end.outcome == Outcome::Hang {
        let stuck = end.stacks.as_deref().and_then(gdb_frame).map(|f| format!(", stuck at {f}")).unwrap_or_default();
        return format!("{}{stuck}", end.how);
    }
    if let Some((location, message)) = panic_site(&end.stderr) {
        return format!("panicked at {}: {message}", portable_location(&location));
    }
    let lines: Vec<&str> = end.stderr.lines().collect();
    if let Some(i) = lines.iter().position(|l| l.starts_with("Error:")) {
        // anyhow's report: the message, then "Caused by:" and one indented line per cause.
        let causes = lines[i + 1..]
            .iter()
            .map(|l| l.trim())
            .skip_while(|l| l.is_empty() || *l == "Caused by:")
            .take_while(|l| !l.is_empty() && !l.starts_with("Stack backtrace"))
            .map(|l| l.split_once(": ").filter(|(n, _)| n.parse::<u32>().is_ok()).map_or(l, |(_, m)| m));
        let text = std::iter::once(lines[i]).chain(causes).collect::<Vec<_>>().join(": ");
        return text.chars().take(300).collect();
    }
    let interesting = ["memory allocation of", "overflowed its stack", "fatal runtime error"];
    let line = lines
        .iter()
        .find(|l| interesting.iter().any(|i| l.contains(i)))
        .or_else(|| lines.iter().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or(&"(no output)");
    line.chars().take(300).collect()
}

// ---------------------------------------------------------------------------------------
// The fuzzing loop
// ---------------------------------------------------------------------------------------

struct Ctx {
    /// The pinned copy the children run
    align: PathBuf,
    /// What it was copied from, for the commands printed to reproduce a failure by hand
    align_source: PathBuf,
    root: PathBuf,
    fuzz_dir: PathBuf,
    /// target/fuzz: the summary and the kept replay directories
    work: PathBuf,
    /// target/fuzz/work/<pid>: this run's binary and work directories
    scratch: PathBuf,
    limits: Limits,
    jobs: usize,
    seed: u64,
    iterations: usize,
    corpus: Corpus,
    tty: bool,
    verbose: bool,
}

#[derive(Default, Clone)]
struct Stats {
    runs: usize,
    counts: [usize; 7],
    child_seconds: f64,
    wall_seconds: f64,
}

impl Stats {
    fn add(&mut self, end: &End) {
        self.runs += 1;
        self.counts[Outcome::ALL.iter().position(|&o| o == end.outcome).expect("every outcome is listed")] += 1;
        self.child_seconds += end.elapsed.as_secs_f64();
    }

    fn count(&self, o: Outcome) -> usize {
        self.counts[Outcome::ALL.iter().position(|&x| x == o).expect("every outcome is listed")]
    }

    fn failures(&self) -> usize {
        Outcome::ALL.iter().filter(|o| o.failed()).map(|&o| self.count(o)).sum()
    }
}

/// Distinct failures: those saved by earlier runs (by key) and those seen in this one.
struct Found {
    saved: BTreeMap<String, PathBuf>,
    seen: Vec<Failure>,
}

struct Failure {
    key: String,
    format: Format,
    outcome: Outcome,
    headline: String,
    case: PathBuf,
    new: bool,
    count: usize,
    args: Vec<String>,
}

impl Found {
    fn load(fuzz_dir: &Path) -> Result<Found> {
        let saved = Case::all(fuzz_dir)?.into_iter().map(|c| (c.key, c.dir)).collect();
        Ok(Found { saved, seen: Vec::new() })
    }

    fn print(&self, root: &Path) {
        if self.seen.is_empty() {
            return;
        }
        println!("\ndistinct failures:");
        for f in &self.seen {
            let case = f.case.strip_prefix(root).unwrap_or(&f.case).display().to_string();
            println!(
                "  {} {} ({}x, {}): {}\n    align {}\n    case: {case}{}",
                f.format.name(),
                f.outcome.name(),
                f.count,
                f.key,
                f.headline,
                f.args.join(" "),
                if f.new { " (new)" } else { "" }
            );
        }
    }
}

/// Each unmutated seed must run clean: otherwise every mutant's verdict is meaningless.
fn check_seeds(ctx: &Ctx, format: Format) -> Result<()> {
    let dir = ctx.scratch.join("seed");
    for v in variants(format, &ctx.corpus)? {
        ctx.corpus.materialize(&dir, &v.model, &[(v.path.clone(), v.seed.clone())])?;
        let end = run_child(&ctx.align, &dir, &v.args, &ctx.limits, false)?;
        ensure!(
            end.outcome == Outcome::Ok,
            "fuzz: the unmutated {} seed fails ({}): align {} (model {})\n{}",
            format.name(),
            end.how,
            v.args.join(" "),
            v.model,
            end.stderr
        );
    }
    Ok(())
}

fn fuzz_format(ctx: &Ctx, format: Format, found: &Mutex<Found>) -> Result<Stats> {
    let variants = variants(format, &ctx.corpus)?;
    let next = AtomicUsize::new(0);
    let stats = Mutex::new(Stats::default());
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..ctx.jobs)
            .map(|w| {
                let (next, stats, variants) = (&next, &stats, &variants);
                s.spawn(move || -> Result<()> {
                    let dir = ctx.scratch.join(format!("{}-{w}", format.name()));
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= ctx.iterations {
                            return Ok(());
                        }
                        let end = fuzz_one(ctx, format, variants, i, &dir, found)?;
                        let mut st = stats.lock().map_err(|_| anyhow::anyhow!("stats lock poisoned"))?;
                        st.add(&end);
                        if ctx.tty {
                            eprint!("\r{}: {}/{}  ", format.name(), st.runs, ctx.iterations);
                        } else if ctx.iterations >= 1000 && st.runs % (ctx.iterations / 10) == 0 {
                            // A long run in a log: a line every tenth, with what it found so far.
                            eprintln!(
                                "fuzz: {} {}/{} ({} failures, {:.0} s)",
                                format.name(),
                                st.runs,
                                ctx.iterations,
                                st.failures(),
                                start.elapsed().as_secs_f64()
                            );
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("a fuzz worker panicked"))??;
        }
        Ok(())
    })?;
    let mut stats = stats.into_inner().map_err(|_| anyhow::anyhow!("stats lock poisoned"))?;
    stats.wall_seconds = start.elapsed().as_secs_f64();
    if ctx.tty {
        eprint!("\r");
    }
    eprintln!(
        "fuzz: {:<16} {} mutants, {} ok, {} clean errors, {} failures, {:.1} s",
        format.name(),
        stats.runs,
        stats.count(Outcome::Ok),
        stats.count(Outcome::Clean),
        stats.failures(),
        stats.wall_seconds
    );
    Ok(stats)
}

/// Mutant `i`: mutate, write the work directory, run, and save the case if it is a new failure.
fn fuzz_one(
    ctx: &Ctx,
    format: Format,
    variants: &[Variant],
    i: usize,
    dir: &Path,
    found: &Mutex<Found>,
) -> Result<End> {
    let mut rng = Rng::for_mutant(ctx.seed, format, i);
    let v = rng.pick(variants);
    let m = mutate(v, &mut rng);
    let files = [(v.path.clone(), m.bytes.clone())];
    ctx.corpus.materialize(dir, &v.model, &files)?;
    let end = run_child(&ctx.align, dir, &v.args, &ctx.limits, false)?;
    if ctx.verbose {
        let what = if end.outcome == Outcome::Ok { String::new() } else { format!(": {}", headline(&end)) };
        eprintln!("{} #{i} [{}] align {}: {}{what}", format.name(), m.notes.join("; "), v.args[0], end.outcome.name());
    }
    if end.outcome.failed() {
        let (site, frames) = locate(ctx, dir, &v.model, &files, &v.args, &end)?;
        let key = failure_key(format, &v.args, &m.target(), &end, site.as_deref());
        let mut found = found.lock().map_err(|_| anyhow::anyhow!("found lock poisoned"))?;
        if let Some(f) = found.seen.iter_mut().find(|f| f.key == key) {
            f.count += 1;
        } else {
            let (case, new) = match found.saved.get(&key) {
                Some(dir) => (dir.clone(), false),
                None => (save_case(ctx, format, v, &m, &end, &key, i, &frames)?, true),
            };
            eprintln!(
                "fuzz: {} {}: {} -> {}",
                format.name(),
                end.outcome.name(),
                headline(&end),
                case.strip_prefix(&ctx.root).unwrap_or(&case).display()
            );
            found.saved.insert(key.clone(), case.clone());
            found.seen.push(Failure {
                key,
                format,
                outcome: end.outcome,
                headline: headline(&end),
                case,
                new,
                count: 1,
                args: v.args.clone(),
            });
        }
    }
    Ok(end)
}

// ---------------------------------------------------------------------------------------
// Regression cases
// ---------------------------------------------------------------------------------------

/// A saved failing mutant: `case.json` and the mutated file(s), in
/// `fixtures/fuzz/<format>/<kind>-<hash>/`.
struct Case {
    dir: PathBuf,
    format: Format,
    key: String,
    /// The fields mutated (the fallback key when no backtrace locates the failure).
    target: String,
    model: String,
    files: Vec<String>,
    args: Vec<String>,
}

#[allow(clippy::too_many_arguments)] // one call site; a struct of these would only rename them
fn save_case(
    ctx: &Ctx,
    format: Format,
    v: &Variant,
    m: &Mutant,
    end: &End,
    key: &str,
    i: usize,
    frames: &[String],
) -> Result<PathBuf> {
    let hash = hex(&Sha256::digest(key.as_bytes()))[..10].to_string();
    let dir = ctx.fuzz_dir.join(format.name()).join(format!("{}-{hash}", end.outcome.name()));
    let file = dir.join(checked_relative(&v.path)?);
    if let Some(parent) = file.parent() {
        fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    }
    fs::write(&file, &m.bytes).with_context(|| file.display().to_string())?;
    let rel = dir.strip_prefix(&ctx.root).unwrap_or(&dir).display().to_string();
    let lines: Vec<&str> = end.stderr.lines().collect();
    let case = json!({
        "format": format.name(),
        "kind": end.outcome.name(),
        "key": key,
        "target": m.target(),
        "headline": headline(end),
        "model": v.model,
        "files": [v.path],
        "args": v.args,
        "seed": ctx.seed,
        "iteration": i,
        "mutations": m.notes,
        "ended": end.how,
        "seconds": (end.elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "stderr_tail": lines[lines.len().saturating_sub(20)..],
        "backtrace": frames,
        "replay": format!("cargo xtask fuzz --case {rel}"),
    });
    fs::write(dir.join("case.json"), serde_json::to_string_pretty(&case)? + "\n")?;
    Ok(dir)
}

/// The frames of a backtrace in this workspace's code, innermost first: function and
/// location, enough to find the bug without the dozens of std and Burn frames around them.
fn workspace_frames(trace: &str) -> Vec<String> {
    let lines: Vec<&str> = trace.lines().collect();
    lines
        .windows(2)
        .filter_map(|w| {
            let rel = workspace_relative(w[1].trim_start().strip_prefix("at ")?)?;
            let function = w[0].trim_start().split_once(": ").map_or(w[0].trim(), |(_, f)| f);
            Some(format!("{function} at {rel}"))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Case {
    fn load(dir: &Path) -> Result<Case> {
        let path = dir.join("case.json");
        let text = fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let v: Value = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
        let s = |k: &str| v[k].as_str().map(String::from).with_context(|| format!("{}: no \"{k}\"", path.display()));
        let list = |k: &str| -> Result<Vec<String>> {
            v[k].as_array()
                .with_context(|| format!("{}: no \"{k}\" list", path.display()))?
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(String::from)
                        .with_context(|| format!("{}: \"{k}\" holds a non-string", path.display()))
                })
                .collect()
        };
        let format = s("format")?;
        let case = Case {
            dir: dir.to_path_buf(),
            format: Format::from_name(&format)
                .with_context(|| format!("{}: unknown format {format:?}", path.display()))?,
            key: s("key")?,
            target: v["target"].as_str().unwrap_or_default().to_string(),
            model: s("model")?,
            files: list("files")?,
            args: list("args")?,
        };
        ensure!(!case.args.is_empty(), "{}: empty \"args\"", path.display());
        Ok(case)
    }

    /// Every `fixtures/fuzz/<format>/<case>/case.json`, in a stable order.
    fn all(fuzz_dir: &Path) -> Result<Vec<Case>> {
        let mut cases = Vec::new();
        for f in Format::ALL {
            let dir = fuzz_dir.join(f.name());
            if !dir.is_dir() {
                continue;
            }
            let mut dirs: Vec<PathBuf> = fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
            dirs.sort();
            for d in dirs.into_iter().filter(|d| d.join("case.json").exists()) {
                cases.push(Case::load(&d)?);
            }
        }
        Ok(cases)
    }
}

/// Run every saved case again; the work directories of those still failing are kept
/// (target/fuzz/replay/<format>-<case>/) for running `align` there by hand. A case still
/// failing is filed under its key in today's code (line numbers move as code is edited),
/// so that a mutant hitting the same bug later in the run is not saved a second time.
fn replay(ctx: &Ctx, cases: &[Case], found: &Mutex<Found>) -> Result<Stats> {
    let mut stats = Stats::default();
    let start = Instant::now();
    let replay_dir = ctx.work.join("replay");
    // What an earlier replay kept belongs to cases that may be fixed or gone by now.
    if replay_dir.exists() {
        fs::remove_dir_all(&replay_dir).with_context(|| replay_dir.display().to_string())?;
    }
    for c in cases {
        let name = c.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = replay_dir.join(format!("{}-{name}", c.format.name()));
        let files = c
            .files
            .iter()
            .map(|f| {
                Ok((
                    f.clone(),
                    fs::read(c.dir.join(checked_relative(f)?)).with_context(|| format!("{}/{f}", c.dir.display()))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        ctx.corpus.materialize(&dir, &c.model, &files)?;
        let end = run_child(&ctx.align, &dir, &c.args, &ctx.limits, false)?;
        stats.add(&end);
        let rel = c.dir.strip_prefix(&ctx.root).unwrap_or(&c.dir).display().to_string();
        if end.outcome.failed() {
            let (site, _) = locate(ctx, &dir, &c.model, &files, &c.args, &end)?;
            let key = failure_key(c.format, &c.args, &c.target, &end, site.as_deref());
            let mut found = found.lock().map_err(|_| anyhow::anyhow!("found lock poisoned"))?;
            found.saved.insert(key.clone(), c.dir.clone());
            found.seen.push(Failure {
                key,
                format: c.format,
                outcome: end.outcome,
                headline: headline(&end),
                case: c.dir.clone(),
                new: false,
                count: 1,
                args: c.args.clone(),
            });
            ctx.corpus.materialize(&dir, &c.model, &files)?;
            eprintln!(
                "fuzz: replay {rel}: still {} ({}): {}\n      cd {} && {} {}",
                end.outcome.name(),
                end.how,
                headline(&end),
                dir.display(),
                ctx.align_source.display(),
                c.args.join(" ")
            );
        } else {
            eprintln!("fuzz: replay {rel}: {} ({})", end.outcome.name(), headline(&end));
            fs::remove_dir_all(&dir).with_context(|| dir.display().to_string())?;
        }
    }
    stats.wall_seconds = start.elapsed().as_secs_f64();
    Ok(stats)
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn print_table(rows: &[(String, Stats)]) {
    println!(
        "\n| format | runs | ok | clean errors | panics | aborts | OOM | crashes | hangs | s/run | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut total = Stats::default();
    for (name, s) in rows {
        print_row(name, s);
        total.runs += s.runs;
        for (t, c) in total.counts.iter_mut().zip(s.counts) {
            *t += c;
        }
        total.child_seconds += s.child_seconds;
        total.wall_seconds += s.wall_seconds;
    }
    print_row("total", &total);
}

fn print_row(name: &str, s: &Stats) {
    let c: Vec<String> = Outcome::ALL.iter().map(|&o| s.count(o).to_string()).collect();
    let per_run = if s.runs > 0 { s.child_seconds / s.runs as f64 } else { 0.0 };
    println!("| {name} | {} | {} | {per_run:.3} | {:.1} |", s.runs, c.join(" | "), s.wall_seconds);
}

fn write_summary(ctx: &Ctx, rows: &[(String, Stats)], found: &Found) -> Result<()> {
    let rows: Vec<Value> = rows
        .iter()
        .map(|(name, s)| {
            let mut r = json!({
                "format": name,
                "runs": s.runs,
                "seconds_per_run": if s.runs > 0 { s.child_seconds / s.runs as f64 } else { 0.0 },
                "wall_seconds": s.wall_seconds,
            });
            for o in Outcome::ALL {
                r[o.name()] = json!(s.count(o));
            }
            r
        })
        .collect();
    let failures: Vec<Value> = found
        .seen
        .iter()
        .map(|f| {
            json!({
                "format": f.format.name(),
                "kind": f.outcome.name(),
                "key": f.key,
                "headline": f.headline,
                "count": f.count,
                "new": f.new,
                "args": f.args,
                "case": f.case.strip_prefix(&ctx.root).unwrap_or(&f.case),
            })
        })
        .collect();
    let summary = json!({
        "seed": ctx.seed,
        "iterations_per_format": ctx.iterations,
        "timeout_s": ctx.limits.timeout.as_secs_f64(),
        "cpu_s": ctx.limits.cpu.as_secs_f64(),
        "memory_mib": ctx.limits.memory_bytes >> 20,
        "rows": rows,
        "failures": failures,
    });
    let out = ctx.work.join("summary.json");
    let mut f = fs::File::create(&out).with_context(|| out.display().to_string())?;
    f.write_all((serde_json::to_string_pretty(&summary)? + "\n").as_bytes())?;
    eprintln!("fuzz: wrote {}", out.strip_prefix(&ctx.root).unwrap_or(&out).display());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The binary under test
// ---------------------------------------------------------------------------------------

/// This run's own directory under target/fuzz/work/: two runs at once (a long one in the
/// background, a replay in the foreground) never share work directories. Removed at the
/// end, also when the run fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: PathBuf) -> Result<Scratch> {
        if let Some(parent) = dir.parent() {
            sweep_dead_runs(parent);
        }
        fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        Ok(Scratch(dir))
    }
}

/// Remove the directories of runs that were killed (a signal skips `Drop`): those named
/// after a process that no longer exists.
fn sweep_dead_runs(work: &Path) {
    let Ok(entries) = fs::read_dir(work) else { return };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // SAFETY: signal 0 only asks whether the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `--align`, or a fresh dev build; copied into this run's scratch directory so that a
/// rebuild during the run cannot swap the binary between two mutants.
fn align_binary(given: Option<&Path>, root: &Path, scratch: &Path) -> Result<(PathBuf, PathBuf)> {
    let built = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(&cargo)
                .args(["build", "-p", "align-pipeline", "--bin", "align"])
                .current_dir(root)
                .status()
                .with_context(|| format!("running {cargo} build"))?;
            ensure!(status.success(), "cargo build -p align-pipeline --bin align failed");
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
            root.join(target).join("debug/align")
        }
    };
    let pinned = scratch.join("align");
    fs::copy(&built, &pinned).with_context(|| format!("copying {} to {}", built.display(), pinned.display()))?;
    let pinned = pinned.canonicalize().with_context(|| pinned.display().to_string())?;
    Ok((pinned, built.canonicalize().unwrap_or(built)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
    }

    fn mini() -> MiniModel {
        let dir = root().join("fixtures/models/llama-tied");
        let files: Vec<(String, Vec<u8>)> = ["config.json", "tokenizer.json", "tokenizer_config.json"]
            .into_iter()
            .map(|f| (f.to_string(), fs::read(dir.join(f)).expect("fixture")))
            .collect();
        MiniModel::build(&files).expect("mini model")
    }

    #[test]
    fn gguf_layout_finds_every_entry_and_splices_keep_it_readable() {
        let b = mini().gguf().expect("gguf");
        let l = parse_gguf(&b).expect("parses");
        assert_eq!(l.tensors.len(), 2 + 9 * MINI_LAYERS);
        assert!(l.kvs.iter().any(|(_, k)| k == "llama.block_count"));
        assert_eq!(l.data_start % 32, 0);
        let block_count = l.fields.iter().find(|f| f.label == "llama.block_count").expect("field");
        assert_eq!(read_uint(&b, block_count.at, block_count.width), MINI_LAYERS as u64);
        // Deleting and duplicating entries fixes the counts: the result parses again.
        for seed in 0..20 {
            let mut m = b.clone();
            splice_gguf(&mut m, &l, &mut Rng::new(seed), seed % 2 == 0).expect("spliced");
            let l2 = parse_gguf(&m).expect("still parses");
            let (before, after) = (l.kvs.len() + l.tensors.len(), l2.kvs.len() + l2.tensors.len());
            assert_eq!(before.abs_diff(after), 1, "one entry deleted or duplicated");
            assert_eq!(l2.data_start % 32, 0);
        }
    }

    #[test]
    fn mutants_depend_only_on_seed_format_and_index() {
        let v = Variant {
            model: "mini".into(),
            path: "model/config.json".into(),
            seed: serde_json::to_vec(&mini().config).expect("json"),
            encoding: Encoding::Json,
            args: args("score"),
        };
        let a = mutate(&v, &mut Rng::for_mutant(1, Format::Config, 7));
        let b = mutate(&v, &mut Rng::for_mutant(1, Format::Config, 7));
        let c = mutate(&v, &mut Rng::for_mutant(1, Format::Config, 8));
        assert_eq!((a.bytes.clone(), a.notes.clone()), (b.bytes, b.notes));
        assert_ne!(a.bytes, c.bytes);
    }

    /// The mutators themselves must never panic, whatever an earlier mutation left behind
    /// (a field at i64::MIN negated, an offset at u64::MAX incremented, …).
    #[test]
    fn mutators_survive_thousands_of_mutants_of_every_format() {
        let corpus = Corpus::load(&root()).expect("corpus");
        for format in Format::ALL {
            let variants = variants(format, &corpus).expect("variants");
            for i in 0..6000 {
                let mut rng = Rng::for_mutant(3, format, i);
                let v = rng.pick(&variants);
                let m = mutate(v, &mut rng);
                assert!(!m.notes.is_empty() && !m.target().is_empty(), "{} #{i}", format.name());
            }
        }
    }

    #[test]
    fn children_ends_are_judged() {
        let t = Duration::from_secs(1);
        let judged = |code: i32, stderr: &str| judge(Ok(ExitStatus::from_raw(code)), stderr.into(), t).outcome;
        assert_eq!(judged(0, ""), Outcome::Ok);
        assert_eq!(judged(1 << 8, "Error: bad\n"), Outcome::Clean);
        assert_eq!(judged(101 << 8, "thread 'main' panicked at crates/a.rs:1:2:\nboom\n"), Outcome::Panic);
        assert_eq!(judged(libc::SIGABRT, "memory allocation of 8 bytes failed\n"), Outcome::Oom);
        assert_eq!(judged(libc::SIGABRT, "thread 'main' has overflowed its stack\n"), Outcome::Abort);
        assert_eq!(judged(libc::SIGKILL, ""), Outcome::Oom);
        assert_eq!(judged(libc::SIGSEGV, ""), Outcome::Crash);
        assert_eq!(judged(3 << 8, "odd\n"), Outcome::Crash);
        assert_eq!(judged(libc::SIGXCPU, ""), Outcome::Hang);
        assert_eq!(judge(Err("killed".into()), String::new(), t).outcome, Outcome::Hang);
    }

    #[test]
    fn failures_are_keyed_by_format_and_workspace_site() {
        let end = |outcome, stderr: &str| End {
            outcome,
            how: String::new(),
            stderr: stderr.into(),
            elapsed: Duration::ZERO,
            stacks: None,
        };
        let ours = end(Outcome::Panic, "thread 'main' panicked at crates/data/src/x.rs:3:4:\nboom\n");
        assert_eq!(
            failure_key(Format::Jsonl, &args("sft"), "t", &ours, None),
            "jsonl: panic at crates/data/src/x.rs:3:4"
        );
        let theirs = end(
            Outcome::Panic,
            "thread 'main' panicked at /h/.cargo/registry/src/index.crates.io-1/tok-1.0/src/a.rs:9:1:\nx\n",
        );
        let trace = "  10: from_dir\n             at /w/crates/model/src/tokenizer.rs:75:21\n";
        let site = workspace_frame(trace);
        assert_eq!(site.as_deref(), Some("crates/model/src/tokenizer.rs:75"));
        assert_eq!(
            failure_key(Format::Tokenizer, &args("score"), "t", &theirs, site.as_deref()),
            "tokenizer: panic at tok-1.0/src/a.rs:9:1 via crates/model/src/tokenizer.rs:75"
        );
        let oom = end(Outcome::Oom, "memory allocation of 8 bytes failed\n");
        assert_eq!(
            failure_key(Format::Gguf, &args("score"), "t", &oom, site.as_deref()),
            "gguf: oom at crates/model/src/tokenizer.rs:75"
        );
    }
}
