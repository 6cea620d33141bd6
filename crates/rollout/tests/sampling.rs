//! Rollouts return the log-probs a fresh forward pass gives, lay groups out prompt-major,
//! and sample top-k / top-p from the truncated distribution (chi-square on a tiny model).

use std::path::Path;

use align_model::backend::Cpu;
use align_model::burn::tensor::Tensor;
use align_model::{Heads, TokenBatch, Transformer, load_pretrained};
use align_rollout::{SamplingConfig, generate, generate_groups_until};

fn tiny() -> align_model::Pretrained<Cpu> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama-untied");
    load_pretrained::<Cpu>(&dir, Heads::LM, &Default::default()).unwrap()
}

/// log softmax(logits / T) of every position of one unpadded sequence, in f64.
fn fresh_logprobs(model: &Transformer<Cpu>, ids: &[u32], temperature: f64) -> Vec<Vec<f64>> {
    let logits: Tensor<Cpu, 3> = model.forward(&TokenBatch::single(ids, &Default::default()));
    let [_, t, v] = logits.dims();
    let data: Vec<f32> = logits.into_data().convert::<f32>().to_vec().unwrap();
    (0..t)
        .map(|i| {
            let row: Vec<f64> = data[i * v..(i + 1) * v].iter().map(|&x| x as f64 / temperature).collect();
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = row.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
            row.iter().map(|x| x - lse).collect()
        })
        .collect()
}

#[test]
fn returned_logprobs_equal_a_fresh_forward_pass() {
    let m = tiny();
    let prompts: Vec<Vec<u32>> = ["The answer is", "Once upon a time there was a"]
        .iter()
        .map(|p| m.tokenizer.encode(p, false).unwrap())
        .collect();
    assert_ne!(prompts[0].len(), prompts[1].len(), "left padding is exercised");
    // min_new_tokens masks the stop token while sampling; the returned log-prob is still
    // the model's (what the trainer recomputes), not the masked distribution's.
    let cfg = SamplingConfig {
        temperature: 0.7,
        top_p: 0.9,
        max_new_tokens: 12,
        min_new_tokens: 4,
        stop_token_ids: vec![0],
        seed: 3,
        ..Default::default()
    };
    let g = 3;
    let out = generate_groups_until(&m.model, &prompts, g, 3, &cfg, |_, _| false).unwrap();
    assert_eq!(out.len(), prompts.len() * g);
    let mut worst = 0.0f64;
    for (r, c) in out.iter().enumerate() {
        let prompt = &prompts[r / g];
        assert!(c.tokens.len() >= cfg.min_new_tokens && c.tokens.len() <= cfg.max_new_tokens);
        assert_eq!(c.tokens.len(), c.logprobs.len());
        let ids: Vec<u32> = prompt.iter().chain(&c.tokens).copied().collect();
        let fresh = fresh_logprobs(&m.model, &ids, cfg.temperature as f64);
        for (k, (&tok, &lp)) in c.tokens.iter().zip(&c.logprobs).enumerate() {
            let want = fresh[prompt.len() - 1 + k][tok as usize];
            worst = worst.max((want - lp as f64).abs());
        }
    }
    assert!(worst < 1e-4, "worst |Δ logp| {worst}");
    // The G samples of one prompt differ (they are independent draws).
    assert!(out[0].tokens != out[1].tokens || out[1].tokens != out[2].tokens);
}

#[test]
fn group_of_one_is_plain_generation() {
    let m = tiny();
    let prompts = vec![m.tokenizer.encode("The answer is", false).unwrap()];
    let cfg = SamplingConfig { max_new_tokens: 8, seed: 11, ..Default::default() };
    let a = generate(&m.model, &prompts, 3, &cfg).unwrap();
    let b = generate_groups_until(&m.model, &prompts, 1, 3, &cfg, |_, _| false).unwrap();
    assert_eq!(a, b);
}

/// Pearson's chi-square of observed counts against probabilities (renormalised), merging
/// cells whose expectation is below 5 into one.
fn chi_square(counts: &[usize], probs: &[f64]) -> (f64, usize) {
    let n: usize = counts.iter().sum();
    let z: f64 = probs.iter().sum();
    let (mut chi, mut cells, mut rest_o, mut rest_e) = (0.0, 0usize, 0.0, 0.0);
    for (&o, &p) in counts.iter().zip(probs) {
        let e = n as f64 * p / z;
        if e < 5.0 {
            rest_o += o as f64;
            rest_e += e;
        } else {
            chi += (o as f64 - e).powi(2) / e;
            cells += 1;
        }
    }
    if rest_e > 0.0 {
        chi += (rest_o - rest_e).powi(2) / rest_e;
        cells += 1;
    }
    (chi, cells - 1)
}

/// Upper 0.1% points of chi-square (df 1..=30) by the Wilson–Hilferty approximation.
fn critical_001(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.090_232; // Φ⁻¹(0.999)
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

#[test]
fn sampling_follows_the_truncated_distribution() {
    let m = tiny();
    let prompt = m.tokenizer.encode("Once upon a time", false).unwrap();
    let fresh = fresh_logprobs(&m.model, &prompt, 1.0);
    let first: Vec<f64> = fresh[prompt.len() - 1].iter().map(|x| x.exp()).collect();
    let mut order: Vec<usize> = (0..first.len()).collect();
    order.sort_by(|&a, &b| first[b].total_cmp(&first[a]));
    let draws = 6000;
    for (name, cfg, kept) in [
        ("no truncation", SamplingConfig::default(), order.clone()),
        ("top_k = 6", SamplingConfig { top_k: 6, ..Default::default() }, order[..6].to_vec()),
        ("top_p = 0.05", SamplingConfig { top_p: 0.05, ..Default::default() }, {
            let mut mass = 0.0;
            let mut keep = vec![];
            for &i in &order {
                mass += first[i];
                keep.push(i);
                if mass >= 0.05 {
                    break;
                }
            }
            keep
        }),
    ] {
        assert!(kept.len() >= 3, "{name}: a truncation that keeps several tokens ({})", kept.len());
        // One prompt, `draws` samples of its first token: one prefill, the cache repeated.
        let cfg = SamplingConfig { max_new_tokens: 1, seed: 5, ..cfg };
        let out = generate_groups_until(&m.model, std::slice::from_ref(&prompt), draws, 3, &cfg, |_, _| false).unwrap();
        let mut counts = vec![0usize; kept.len()];
        for c in &out {
            let at = kept.iter().position(|&k| k as u32 == c.tokens[0]);
            let at = at.unwrap_or_else(|| panic!("{name}: sampled token {} outside the kept set", c.tokens[0]));
            counts[at] += 1;
        }
        let probs: Vec<f64> = kept.iter().map(|&i| first[i]).collect();
        let (chi, df) = chi_square(&counts, &probs);
        assert!(df >= 2, "{name}: enough cells");
        assert!(chi < critical_001(df), "{name}: chi-square {chi:.2} with {df} df (counts {counts:?})");
    }
}
