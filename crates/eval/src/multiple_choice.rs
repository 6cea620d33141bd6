//! Multiple choice by log-likelihood, as lm-eval's `output_type: multiple_choice` defines it:
//! each choice is the continuation `target_delimiter + choice` of the (few-shot) context;
//! context and continuation are tokenised together and split at the context's token count
//! (trailing spaces of the context move to the continuation first); the score of a choice
//! is the summed log-probability of its continuation tokens. `acc` takes the argmax of the
//! sums, `acc_norm` of the sums per character of the choice, `acc_bytes` per UTF-8 byte;
//! standard errors are the sample standard deviation over √n.
//!
//! A task is a TOML file of Jinja templates over a row's fields (lm-eval's `doc_to_text`,
//! `doc_to_choice`, `doc_to_target`), so a new multiple-choice set needs no code.

use std::path::{Path, PathBuf};

use align_data::{DatasetConfig, HostBatch, Record, RecordReader, TokenizedSequence, pad_right};
use align_model::FusedOps;
use align_model::burn::tensor::{Int, Tensor, TensorData};
use align_model::{TokenBatch, Tokenizer, Transformer};
use anyhow::{Context, Result, bail};
use minijinja::Environment;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A multiple-choice task (TOML). Templates see the row's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McTask {
    pub name: String,
    /// The context, e.g. `"Question: {{goal}}\nAnswer:"` (lm-eval `doc_to_text`).
    pub context: String,
    /// One template per choice (`["{{sol1}}", "{{sol2}}"]`), or …
    #[serde(default)]
    pub choices: Vec<String>,
    /// … a field holding the list of choices (`choices_field = "choices.text"`; dots walk
    /// into objects).
    #[serde(default)]
    pub choices_field: Option<String>,
    /// Template giving the gold choice: an index (`"{{label}}"`) or, with `gold_labels`, a
    /// label such as `"{{answerKey}}"`.
    pub gold: String,
    /// Labels in choice order (`["A", "B", "C", "D"]`) when `gold` renders a label. Default none.
    #[serde(default)]
    pub gold_labels: Option<Vec<String>>,
    /// Between the context and a choice. Default `" "`.
    #[serde(default = "space")]
    pub target_delimiter: String,
    /// Worked examples before each item. Default 0.
    #[serde(default)]
    pub num_fewshot: usize,
    /// Where the few-shot examples come from (their first `num_fewshot` rows). Default none.
    #[serde(default)]
    pub fewshot_data: Option<PathBuf>,
    /// Between few-shot examples and the item. Default `"\n\n"`.
    #[serde(default = "blank_line")]
    pub fewshot_delimiter: String,
}

fn space() -> String {
    " ".into()
}
fn blank_line() -> String {
    "\n\n".into()
}

impl McTask {
    /// lm-eval's `piqa`.
    pub fn piqa() -> Self {
        McTask {
            name: "piqa".into(),
            context: "Question: {{goal}}\nAnswer:".into(),
            choices: vec!["{{sol1}}".into(), "{{sol2}}".into()],
            choices_field: None,
            gold: "{{label}}".into(),
            gold_labels: None,
            target_delimiter: " ".into(),
            num_fewshot: 0,
            fewshot_data: None,
            fewshot_delimiter: "\n\n".into(),
        }
    }

    /// A built-in task by name, or a TOML task file.
    pub fn resolve(spec: &str) -> Result<Self> {
        match spec {
            "piqa" => Ok(Self::piqa()),
            path => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("{path}: not a built-in task (piqa) nor a readable file"))?;
                toml::from_str(&text).with_context(|| format!("{path}: invalid task"))
            }
        }
    }
}

/// One item: its context (few-shot examples included), continuations and gold index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McItem {
    pub context: String,
    /// The bare choices (what acc_norm divides by).
    pub choices: Vec<String>,
    pub gold: usize,
}

fn lookup<'a>(fields: &'a serde_json::Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = fields.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    Some(v)
}

struct Renderer<'a> {
    env: Environment<'a>,
    task: &'a McTask,
}

impl<'a> Renderer<'a> {
    fn new(task: &'a McTask) -> Result<Self> {
        if task.choices.is_empty() == task.choices_field.is_none() {
            bail!("task {}: give either `choices` templates or a `choices_field`", task.name);
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        Ok(Renderer { env, task })
    }

    fn render(&self, template: &str, r: &Record, what: &str) -> Result<String> {
        self.env
            .render_str(template, &r.fields)
            .with_context(|| format!("{}: {what} template {template:?}", r.location))
    }

    /// Context without few-shot examples, choices and gold of a row.
    fn item(&self, r: &Record) -> Result<McItem> {
        let t = self.task;
        let context = self.render(&t.context, r, "context")?;
        let choices: Vec<String> = match &t.choices_field {
            Some(f) => match lookup(&r.fields, f) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        other => Ok(other.to_string()),
                    })
                    .collect::<Result<_>>()?,
                Some(other) => bail!("{}: field `{f}` is not a list of choices: {other}", r.location),
                None => bail!("{}: field `{f}` missing", r.location),
            },
            None => t.choices.iter().map(|c| self.render(c, r, "choice")).collect::<Result<_>>()?,
        };
        let g = self.render(&t.gold, r, "gold")?;
        let gold = match &t.gold_labels {
            Some(labels) => labels
                .iter()
                .position(|l| *l == g.trim())
                .with_context(|| format!("{}: gold label {g:?} is not one of {labels:?}", r.location))?,
            None => g.trim().parse::<usize>().with_context(|| format!("{}: gold {g:?} is not an index", r.location))?,
        };
        if gold >= choices.len() {
            bail!("{}: gold index {gold} but {} choices", r.location, choices.len());
        }
        Ok(McItem { context, choices, gold })
    }
}

/// The items of a task over a data file (`skip`/`limit` as in [`DatasetConfig`]).
pub fn load_items(task: &McTask, data: &DatasetConfig) -> Result<Vec<McItem>> {
    let r = Renderer::new(task)?;
    let mut shots = String::new();
    if task.num_fewshot > 0 {
        let path = task
            .fewshot_data
            .as_ref()
            .with_context(|| format!("task {}: num_fewshot needs fewshot_data", task.name))?;
        for rec in RecordReader::open(path)?.take(task.num_fewshot) {
            let it = r.item(&rec?)?;
            shots.push_str(&format!(
                "{}{}{}{}",
                it.context, task.target_delimiter, it.choices[it.gold], task.fewshot_delimiter
            ));
        }
    }
    let mut items = vec![];
    for rec in RecordReader::open(&data.path)?.skip(data.skip).take(data.limit.unwrap_or(usize::MAX)) {
        let mut it = r.item(&rec?)?;
        it.context = format!("{shots}{}", it.context);
        items.push(it);
    }
    Ok(items)
}

/// lm-eval's `_encode_pair`: trailing context spaces move to the continuation; the whole is
/// tokenised and split at the context's token count. Returns (the context's own ids, the
/// whole's ids after that count) — as lm-eval, even where a token straddles the boundary,
/// so every choice of an item shares the same context ids.
pub fn encode_pair(tok: &Tokenizer, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let (context, continuation) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
    let whole = tok.encode(&format!("{context}{continuation}"), true)?;
    let ctx = tok.encode(context, true)?;
    if ctx.is_empty() {
        bail!("the context encodes to no tokens");
    }
    let n = ctx.len().min(whole.len());
    Ok((ctx, whole[n..].to_vec()))
}

/// One scored item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McResult {
    pub doc_id: usize,
    pub gold: usize,
    pub loglikelihoods: Vec<f64>,
    /// Whether each continuation is the greedy decode of its context (lm-eval's is_greedy).
    pub is_greedy: Vec<bool>,
    pub acc: f64,
    pub acc_norm: f64,
    pub acc_bytes: f64,
}

fn argmax(v: impl Iterator<Item = f64>) -> usize {
    // The first maximum, as numpy's argmax.
    v.enumerate().fold((0, f64::NEG_INFINITY), |(bi, bv), (i, x)| if x > bv { (i, x) } else { (bi, bv) }).0
}

/// Score items on `model`: with `shared_context`, each item's context runs once and its
/// choices continue it from a KV cache (fewer FLOPs for long few-shot contexts); otherwise
/// every (context, choice) row runs whole, `batch_size` rows per forward, longest first.
#[allow(clippy::too_many_arguments)]
pub fn score_items<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    task: &McTask,
    items: &[McItem],
    batch_size: usize,
    shared_context: bool,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<McResult>> {
    let mut per_item: Vec<(Vec<f64>, Vec<bool>)> = vec![];
    if shared_context {
        for (i, it) in items.iter().enumerate() {
            per_item
                .push(score_item_shared_context(model, tok, task, it, device).with_context(|| format!("item {i}"))?);
            progress(it.choices.len());
        }
    } else {
        // Every (item, choice) as one row: context + continuation, loss on the continuation.
        let mut rows: Vec<TokenizedSequence> = vec![];
        let context = model.config.max_position_embeddings;
        for (i, it) in items.iter().enumerate() {
            for c in &it.choices {
                let (ctx, cont) = encode_pair(tok, &it.context, &format!("{}{c}", task.target_delimiter))?;
                if cont.is_empty() {
                    bail!("item {i}: choice {c:?} adds no tokens to its context");
                }
                let n = ctx.len();
                let mut row = TokenizedSequence {
                    loss_mask: (0..n + cont.len()).map(|j| j >= n).collect(),
                    input_ids: ctx.into_iter().chain(cont).collect(),
                };
                // As lm-eval, a row longer than the model's positions keeps its end.
                if row.len() > context {
                    let cut = row.len() - context;
                    row.input_ids.drain(..cut);
                    row.loss_mask.drain(..cut);
                }
                rows.push(row);
            }
        }
        // Longest first keeps padding low; results go back to their rows.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&r| std::cmp::Reverse(rows[r].len()));
        let mut ll = vec![0.0f64; rows.len()];
        let mut greedy = vec![false; rows.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let seqs: Vec<&TokenizedSequence> = chunk.iter().map(|&r| &rows[r]).collect();
            let batch = pad_right(&seqs, tok.pad_token_id.or(tok.eos_token_id).unwrap_or(0));
            let (sums, all_greedy) = continuation_logprobs(model, &batch, device);
            for (k, &r) in chunk.iter().enumerate() {
                ll[r] = sums[k];
                greedy[r] = all_greedy[k];
            }
            progress(chunk.len());
        }
        let mut r = 0;
        for it in items {
            let n = it.choices.len();
            per_item.push((ll[r..r + n].to_vec(), greedy[r..r + n].to_vec()));
            r += n;
        }
    }
    Ok(items
        .iter()
        .zip(per_item)
        .enumerate()
        .map(|(i, (it, (lls, g)))| {
            let pick = argmax(lls.iter().copied());
            let pick_norm = argmax(lls.iter().zip(&it.choices).map(|(l, c)| l / c.chars().count().max(1) as f64));
            let pick_bytes = argmax(lls.iter().zip(&it.choices).map(|(l, c)| l / c.len().max(1) as f64));
            let hit = |p: usize| if p == it.gold { 1.0 } else { 0.0 };
            McResult {
                doc_id: i,
                gold: it.gold,
                acc: hit(pick),
                acc_norm: hit(pick_norm),
                acc_bytes: hit(pick_bytes),
                loglikelihoods: lls,
                is_greedy: g,
            }
        })
        .collect())
}

/// Log-likelihoods of an item's choices with its context run once: the context fills a KV
/// cache, repeated for the choices, whose continuations then run as one right-padded batch.
/// Returns (log-likelihoods, is_greedy) per choice.
pub fn score_item_shared_context<B: FusedOps>(
    model: &Transformer<B>,
    tok: &Tokenizer,
    task: &McTask,
    item: &McItem,
    device: &B::Device,
) -> Result<(Vec<f64>, Vec<bool>)> {
    let mut ctx: Option<Vec<u32>> = None;
    let mut conts = vec![];
    for c in &item.choices {
        let (cx, cont) = encode_pair(tok, &item.context, &format!("{}{c}", task.target_delimiter))?;
        if cont.is_empty() {
            bail!("choice {c:?} adds no tokens to its context");
        }
        ctx = Some(cx);
        conts.push(cont);
    }
    let ctx = ctx.context("an item without choices")?;
    let n = conts.len();
    let mut cache = model.new_cache();
    let hidden = model.forward_hidden(&TokenBatch::single(&ctx, device), Some(&mut cache));
    let last = hidden.narrow(1, ctx.len() - 1, 1);
    let first: Vec<f32> = align_model::burn::tensor::activation::log_softmax(model.logits(last), 2)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("float data");
    let mut cache = cache.repeat_batch(n);
    let width = conts.iter().map(Vec::len).max().unwrap_or(1);
    let (mut ids, mut pos, mut seg) = (vec![], vec![], vec![]);
    for c in &conts {
        for j in 0..width {
            let real = j < c.len();
            ids.push(if real { c[j] as i64 } else { 0 });
            pos.push(if real { (ctx.len() + j) as i64 } else { 0 });
            seg.push(if real { 1 } else { 0 });
        }
    }
    let batch = TokenBatch::<B>::from_host(ids, pos, seg, [n, width], device);
    let logits = model.logits(model.forward_hidden(&batch, Some(&mut cache)));
    let v = model.config.vocab_size;
    let lp: Vec<f32> = align_model::burn::tensor::activation::log_softmax(logits, 2)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("float data");
    let argmax = |row: &[f32]| {
        row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0
    };
    let mut lls = vec![];
    let mut greedy = vec![];
    for (k, c) in conts.iter().enumerate() {
        let mut ll = first[c[0] as usize] as f64;
        let mut g = argmax(&first) == c[0] as usize;
        for j in 1..c.len() {
            let row = &lp[(k * width + j - 1) * v..(k * width + j) * v];
            ll += row[c[j] as usize] as f64;
            g &= argmax(row) == c[j] as usize;
        }
        lls.push(ll);
        greedy.push(g);
    }
    Ok((lls, greedy))
}

/// Summed log-probs of each row's loss tokens and whether each is the argmax.
fn continuation_logprobs<B: FusedOps>(
    model: &Transformer<B>,
    batch: &HostBatch,
    device: &B::Device,
) -> (Vec<f64>, Vec<bool>) {
    let [b, t] = batch.shape;
    let (targets, mask) = batch.shifted_targets();
    let at = batch.loss_positions(&targets, &mask);
    // Logits of the continuation positions only (not of contexts or padding).
    let hidden = model.forward_hidden(&batch.to_device::<B>(device), None);
    let d = hidden.dims()[2];
    let rows = Tensor::<B, 1, Int>::from_data(
        TensorData::new(at.rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [at.rows.len()]),
        device,
    );
    let logits = model.logits(hidden.reshape([b * t, d]).select(0, rows).unsqueeze_dim(0));
    let tg = Tensor::<B, 2, Int>::from_data(TensorData::new(at.targets.clone(), [1, at.targets.len()]), device);
    let argmax_at: Vec<i64> = logits.clone().argmax(2).into_data().convert::<i64>().to_vec().expect("int data");
    let lp_at: Vec<f64> =
        align_losses::token_logprobs(logits, tg, 1.0).into_data().convert::<f64>().to_vec().expect("float data");
    let (mut lp, mut argmax) = (vec![0.0; b * (t - 1)], vec![0i64; b * (t - 1)]);
    for (i, &cell) in at.cells.iter().enumerate() {
        lp[cell] = lp_at[i];
        argmax[cell] = argmax_at[i];
    }
    let mut sums = vec![0.0; b];
    let mut greedy = vec![true; b];
    for r in 0..b {
        for j in 0..t - 1 {
            let k = r * (t - 1) + j;
            if mask[k] {
                sums[r] += lp[k];
                greedy[r] &= argmax[k] == targets[k];
            }
        }
    }
    (sums, greedy)
}

/// A metric with its standard error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WithStderr {
    pub value: f64,
    /// Sample standard deviation (n − 1) over √n, as lm-eval's `mean_stderr`.
    pub stderr: f64,
}

pub fn mean_with_stderr(xs: &[f64]) -> WithStderr {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return WithStderr { value: f64::NAN, stderr: f64::NAN };
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    WithStderr { value: mean, stderr: (var / n).sqrt() }
}

/// The task's summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McSummary {
    pub task: String,
    pub num_examples: usize,
    pub acc: WithStderr,
    pub acc_norm: WithStderr,
    pub acc_bytes: WithStderr,
    pub seconds: f64,
}

pub fn summarize(task: &McTask, results: &[McResult], seconds: f64) -> McSummary {
    let col = |f: fn(&McResult) -> f64| mean_with_stderr(&results.iter().map(f).collect::<Vec<_>>());
    McSummary {
        task: task.name.clone(),
        num_examples: results.len(),
        acc: col(|r| r.acc),
        acc_norm: col(|r| r.acc_norm),
        acc_bytes: col(|r| r.acc_bytes),
        seconds,
    }
}

/// Where results go: `<dir>/<task>.jsonl` (per item) and `<dir>/<task>.json` (summary).
pub fn write_results(dir: &Path, summary: &McSummary, results: &[McResult]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let mut lines = String::new();
    for r in results {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    align_model::weights::write_atomic(&dir.join(format!("{}.jsonl", summary.task)), lines.as_bytes())?;
    align_model::weights::write_atomic(
        &dir.join(format!("{}.json", summary.task)),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )?;
    Ok(())
}
