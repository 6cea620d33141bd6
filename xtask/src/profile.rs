//! `cargo xtask bench --profile`: where one SFT LoRA step of SmolLM2-135M (8 × 256 tokens,
//! r = 16 on every linear layer) spends its time, part by part, forward and backward.
//!
//! Each part runs alone on inputs of the step's shapes that require a gradient, and its
//! backward is timed on `Σ y·r` for a fixed random `r`. A block part is timed on one layer
//! and multiplied by the number of layers (every layer has the same shapes). The last rows
//! compare the sum of the parts with a whole step timed as the trainer runs it; the
//! difference is what the parts miss (autodiff bookkeeping across parts, memory traffic).

use std::path::Path;
use std::time::Instant;

use align_lora::LoraConfig;
use align_model::backend::{Autodiff, Cpu};
use align_model::burn::optim::GradientsParams;
use align_model::burn::tensor::module::attention;
use align_model::burn::tensor::ops::AttentionModuleOptions;
use align_model::burn::tensor::{Distribution, Int, Tensor, TensorData, activation};
use align_model::{Heads, TokenBatch, load_pretrained};
use align_model::{masked_attention, rope, swiglu};
use align_pipeline::optim::{AdamW, AdamWConfig};
use anyhow::Result;
use serde_json::{Value, json};

type B = Autodiff<Cpu>;

const ROWS: usize = 8;
const LEN: usize = 256;

/// One part: median seconds of one forward and one backward, how many times a step runs
/// it, and the same for Burn's composition of that part where a fused op replaced it.
struct Row {
    name: String,
    forward: f64,
    backward: f64,
    times: usize,
    composed: Option<(f64, f64)>,
}

/// Median forward and backward seconds of `part` over `reps` runs after a warm-up.
fn time_part<const D: usize, const E: usize>(
    reps: usize,
    input: &Tensor<B, D>,
    part: impl Fn(Tensor<B, D>) -> Tensor<B, E>,
) -> (f64, f64) {
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let mut r: Option<Tensor<B, E>> = None;
    for i in 0..=reps {
        let x = input.clone().detach().require_grad();
        let t = Instant::now();
        let y = part(x);
        let _ = y.clone().inner().into_data(); // flex is eager; this only waits on other backends
        let f = t.elapsed().as_secs_f64();
        let r = r.get_or_insert_with(|| Tensor::random(y.shape(), Distribution::Normal(0.0, 1.0), &y.device())).clone();
        let t = Instant::now();
        let grads = (y * r).sum().backward();
        drop(grads);
        let b = t.elapsed().as_secs_f64();
        if i > 0 {
            fwd.push(f);
            bwd.push(b);
        }
    }
    (crate::bench::median(fwd), crate::bench::median(bwd))
}

pub fn run(gguf: &Path, reps: usize) -> Result<Value> {
    let device = Default::default();
    let pre = load_pretrained::<B>(gguf, Heads::LM, &device)?.model;
    let lora = LoraConfig { r: 16, lora_alpha: 32.0, lora_dropout: 0.0, ..Default::default() };
    let model = align_lora::attach(pre, &lora, 0)?.0;
    let c = model.config.clone();
    let (layers, d, hd) = (c.num_hidden_layers, c.hidden_size, c.head_dim);
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    let ids = crate::bench::synthetic_ids(ROWS, LEN + 1, c.vocab_size, 3);
    let inputs: Vec<Vec<u32>> = ids.iter().map(|s| s[..LEN].to_vec()).collect();
    let targets: Vec<i64> = ids.iter().flat_map(|s| s[1..].iter().map(|&t| t as i64)).collect();
    let batch = TokenBatch::<B>::right_padded(&inputs, 0, &device);
    let ctx = model.block_context(&batch, batch.segments.clone(), 0, align_model::burn::tensor::DType::F32);
    let hidden = Tensor::<B, 3>::random([ROWS, LEN, d], Distribution::Normal(0.0, 1.0), &device);
    let inter = Tensor::<B, 3>::random([ROWS, LEN, c.intermediate_size], Distribution::Normal(0.0, 1.0), &device);
    let heads = |n: usize| Tensor::<B, 4>::random([ROWS, n, LEN, hd], Distribution::Normal(0.0, 1.0), &device);
    let layer = &model.layers[0];
    let (attn, mlp) = (&layer.self_attn, &layer.mlp);
    let (Some(q_proj), Some(k_proj), Some(v_proj)) = (&attn.q_proj, &attn.k_proj, &attn.v_proj) else {
        anyhow::bail!("profile: {} has no separate q/k/v projections (a Llama-family GGUF is needed)", gguf.display());
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut add = |name: &str, (f, b): (f64, f64), times: usize, composed: Option<(f64, f64)>| {
        eprintln!("profile: {name}: {:.1} ms forward, {:.1} ms backward (×{times})", f * 1e3, b * 1e3);
        rows.push(Row { name: name.to_string(), forward: f, backward: b, times, composed });
    };

    let ids_t = batch.input_ids.clone();
    let embed = model.embed_tokens.val();
    add(
        "embedding",
        time_part(reps, &embed, |w| align_model::burn::tensor::module::embedding(w, ids_t.clone())),
        1,
        None,
    );
    let norm = &layer.input_layernorm;
    add(
        "RMSNorm (2 per layer)",
        time_part(reps, &hidden, |x| norm.forward(x)),
        2 * layers,
        Some(time_part(reps, &hidden, |x| {
            x.clone() / (x.square().mean_dim(2) + norm.eps).sqrt() * norm.weight.val().unsqueeze()
        })),
    );
    add(
        "q, k, v, o projections (LoRA)",
        time_part(reps, &hidden, |x| {
            let q = q_proj.forward(x.clone());
            let k = k_proj.forward(x.clone());
            let v = v_proj.forward(x);
            // o_proj reads q's shape (nh · hd = d for SmolLM2); the sum keeps k and v in the graph.
            attn.o_proj.forward(q) + (k.sum() + v.sum()).reshape([1, 1, 1])
        }),
        layers,
        None,
    );
    let (cos, sin) = ctx.rope.clone().expect("SmolLM2 has RoPE");
    // RoPE runs on [b, t, heads, hd], before the heads move to the second axis.
    let q_rows = Tensor::<B, 4>::random([ROWS, LEN, nh, hd], Distribution::Normal(0.0, 1.0), &device);
    add(
        "RoPE on q and k",
        time_part(reps, &q_rows, |q| rope(q, cos.clone(), sin.clone())),
        2 * layers,
        Some(time_part(reps, &q_rows, |x| {
            let x1 = x.clone().narrow(3, 0, hd / 2);
            let x2 = x.clone().narrow(3, hd / 2, hd / 2);
            let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
            x * cos.clone().unsqueeze_dim(2) + rotated * sin.clone().unsqueeze_dim(2)
        })),
    );
    let (k, v) = (heads(nkv), heads(nkv));
    add(
        "attention core (scores, mask, softmax, ·V)",
        time_part(reps, &heads(nh), |q| {
            masked_attention(q.reshape([ROWS, nkv, (nh / nkv) * LEN, hd]), k.clone(), v.clone(), ctx.mask.clone())
        }),
        layers,
        Some(time_part(reps, &heads(nh), |q| {
            let q = q.reshape([ROWS, nkv, (nh / nkv) * LEN, hd]);
            attention(q, k.clone(), v.clone(), Some(ctx.mask.clone()), None, AttentionModuleOptions::default())
        })),
    );
    add(
        "MLP projections gate, up, down (LoRA)",
        time_part(reps, &hidden, |x| {
            let g = mlp.gate_proj.as_ref().expect("SwiGLU").forward(x.clone());
            let u = mlp.up_proj.forward(x);
            mlp.down_proj.forward(g + u)
        }),
        layers,
        None,
    );
    let up = inter.clone();
    add(
        "SwiGLU silu(gate)·up",
        time_part(reps, &inter, |g| swiglu(g, up.clone())),
        layers,
        Some(time_part(reps, &inter, |g| activation::silu(g) * up.clone())),
    );
    add("residual adds (2 per layer)", time_part(reps, &hidden, |x| x.clone() + x), 2 * layers, None);
    let t2 = Tensor::<B, 2, Int>::from_data(TensorData::new(targets.clone(), [ROWS, LEN]), &device);
    let rows_all: Vec<usize> = (0..ROWS * LEN).collect();
    add(
        "LM head + log-softmax + gather (fused, chunked)",
        time_part(reps, &hidden, |x| model.logprobs_at(x, &rows_all, &targets, 1.0, false).logprobs),
        1,
        Some(time_part(reps, &hidden, |x| align_losses::token_logprobs(model.logits(x), t2.clone(), 1.0))),
    );

    // The optimizer on the LoRA parameters, from real gradients.
    let owned = sequences(&inputs);
    let host = align_data::pad_right(&owned.iter().collect::<Vec<_>>(), 0);
    let mut opt = AdamW::<B>::new(AdamWConfig::default());
    let mut m = model.clone();
    let mut opt_times = Vec::new();
    for i in 0..=reps {
        let (sum, _) = align_pipeline::sft::nll_sum(&m, &host, &device);
        let g = GradientsParams::from_grads(sum.backward(), &m);
        let t = Instant::now();
        m = opt.step(m, g, 1e-5, 1.0);
        let _ = m.embed_tokens.val().inner().into_data();
        if i > 0 {
            opt_times.push(t.elapsed().as_secs_f64());
        }
    }
    add("AdamW step (LoRA parameters)", (crate::bench::median(opt_times), 0.0), 1, None);

    // The whole step, as the trainer runs it.
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for i in 0..=reps {
        let t = Instant::now();
        let (sum, n) = align_pipeline::sft::nll_sum(&model, &host, &device);
        let loss = sum / n as f64;
        let _ = loss.clone().inner().into_data();
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let g = GradientsParams::from_grads(loss.backward(), &model);
        drop(g);
        if i > 0 {
            fwd.push(f);
            bwd.push(t.elapsed().as_secs_f64());
        }
    }
    let (whole_f, whole_b) = (crate::bench::median(fwd), crate::bench::median(bwd));
    let opt_s = rows.last().map_or(0.0, |r| r.forward);
    let whole = whole_f + whole_b + opt_s;

    println!(
        "| part of one SFT LoRA step (8 × 256, SmolLM2-135M, CPU) | forward ms | backward ms | share of step | Burn composition fwd / bwd ms |"
    );
    println!("|---|---|---|---|---|");
    let mut parts = 0.0;
    let mut report = Vec::new();
    for Row { name, forward, backward, times, composed } in &rows {
        let n = *times as f64;
        let (f, b) = (forward * n, backward * n);
        parts += f + b;
        let before = composed.map_or(String::new(), |(cf, cb)| format!("{:.0} / {:.0}", cf * n * 1e3, cb * n * 1e3));
        println!("| {name} | {:.0} | {:.0} | {:.1}% | {before} |", f * 1e3, b * 1e3, 100.0 * (f + b) / whole);
        report.push(json!({
            "part": name, "forward_s": f, "backward_s": b, "share": (f + b) / whole,
            "composed_s": composed.map(|(cf, cb)| [cf * n, cb * n]),
        }));
    }
    println!("| sum of the parts | | | {:.1}% | |", 100.0 * parts / whole);
    println!(
        "| whole step: forward, backward (optimizer {:.0} ms) | {:.0} | {:.0} | 100% | |",
        opt_s * 1e3,
        whole_f * 1e3,
        whole_b * 1e3
    );
    Ok(json!({
        "parts": report,
        "whole_step_s": whole,
        "whole_forward_s": whole_f,
        "whole_backward_s": whole_b,
    }))
}

fn sequences(inputs: &[Vec<u32>]) -> Vec<align_data::TokenizedSequence> {
    inputs
        .iter()
        .map(|s| align_data::TokenizedSequence { input_ids: s.clone(), loss_mask: vec![true; s.len()] })
        .collect()
}
