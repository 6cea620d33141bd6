//! Packed forwards give what each sequence gives alone: RL completion batches (log-probs,
//! the states a value head reads), DPO pair batches (completion log-probs) and reward-model
//! scores, on batches uneven enough that packing takes fewer rows.

use std::path::Path;

use align_data::{HostBatch, TokenizedSequence};
use align_model::backend::Cpu;
use align_model::burn::tensor::Tensor;
use align_model::{Heads, TokenBatch, Transformer, load_pretrained};
use align_pipeline::preference::{Pair, pair_batch, pair_forward};
use align_pipeline::rl::{completion_batch, completion_forward};
use align_reward::model::last_token_scores;

fn tiny(heads: Heads) -> Transformer<Cpu> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama-untied");
    load_pretrained::<Cpu>(&dir, heads, &Default::default()).unwrap().model
}

fn host<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

/// One sequence alone: its hidden states `[t][d]` and `log p(token j | < j)` for j ≥ 1.
fn alone(model: &Transformer<Cpu>, ids: &[u32]) -> (Vec<Vec<f64>>, Vec<f64>) {
    let hidden = model.forward_hidden(&TokenBatch::single(ids, &Default::default()), None);
    let d = hidden.dims()[2];
    let h = host(hidden.clone());
    let logits = host(model.logits(hidden));
    let v = logits.len() / ids.len();
    let lp = (1..ids.len())
        .map(|j| {
            let row = &logits[(j - 1) * v..j * v];
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            row[ids[j] as usize] - lse
        })
        .collect();
    (h.chunks(d).map(<[f64]>::to_vec).collect(), lp)
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what}: {a} vs {b}");
}

#[test]
fn rl_completions_pack_and_read_what_each_gives_alone() {
    let model = tiny(Heads::LM);
    let prompts: Vec<Vec<u32>> = vec![vec![5, 6, 7], vec![5, 6, 7], vec![9, 10, 11, 12, 13], vec![9, 10, 11, 12, 13]];
    let completions: Vec<Vec<u32>> = vec![
        (20..38).collect(), // long: fills a row
        vec![40, 41],
        vec![50],
        (60..66).collect(),
    ];
    let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let c: Vec<&[u32]> = completions.iter().map(Vec::as_slice).collect();
    let cb = completion_batch::<Cpu>(&p, &c, 0, &Default::default());
    assert!(cb.tokens.dims()[0] < 4, "uneven completions pack into fewer rows: {:?}", cb.tokens.dims());
    let f = completion_forward(&model, &cb, 0.7, false);
    let cw = cb.completion_width;
    let (logps, states) = (host(f.logps), host(f.hidden));
    let d = states.len() / (4 * cw);
    for r in 0..4 {
        let ids: Vec<u32> = prompts[r].iter().chain(&completions[r]).copied().collect();
        let (h, _) = alone(&model, &ids);
        // At temperature 0.7: recompute from the hidden states' logits.
        let logits = host(model.logits(model.forward_hidden(&TokenBatch::single(&ids, &Default::default()), None)));
        let v = logits.len() / ids.len();
        for (k, &tok) in completions[r].iter().enumerate() {
            let j = prompts[r].len() + k;
            let row: Vec<f64> = logits[(j - 1) * v..j * v].iter().map(|x| x / 0.7).collect();
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let want = row[tok as usize] - m - row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            close(logps[r * cw + k], want, &format!("row {r} token {k}"));
        }
        for k in 0..cw {
            let j = (prompts[r].len() + k - 1).min(ids.len() - 1);
            for i in 0..d {
                close(states[(r * cw + k) * d + i], h[j][i], &format!("state row {r} cell {k}"));
            }
        }
        for k in completions[r].len()..cw {
            assert_eq!(logps[r * cw + k], 0.0, "no log-prob past the completion");
        }
    }
}

fn pair(prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> Pair {
    let seq = |c: &[u32]| TokenizedSequence {
        input_ids: prompt.iter().chain(c).copied().collect(),
        loss_mask: prompt.iter().map(|_| false).chain(c.iter().map(|_| true)).collect(),
    };
    Pair { chosen: seq(chosen), rejected: seq(rejected), margin: None }
}

#[test]
fn dpo_pairs_pack_and_score_what_each_gives_alone() {
    let model = tiny(Heads::LM);
    let pairs = [
        pair(&[3, 4, 5], &(30..50).collect::<Vec<_>>(), &[60, 61]),
        pair(&[7, 8], &[70], &[80, 81, 82]),
        pair(&[9, 10, 11, 12], &[90, 91, 92, 93], &[100]),
    ];
    let refs: Vec<&Pair> = pairs.iter().collect();
    let batch: HostBatch = pair_batch(&refs, 0);
    assert!(batch.repacked(0).is_some(), "these pairs pack");
    let f = pair_forward(&model, &batch, false, false, &Default::default());
    let got = host(f.logps);
    let rows: Vec<&TokenizedSequence> =
        pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect();
    for (r, s) in rows.iter().enumerate() {
        let (_, lp) = alone(&model, &s.input_ids);
        let want: f64 = (1..s.input_ids.len()).filter(|&j| s.loss_mask[j]).map(|j| lp[j - 1]).sum();
        close(got[r], want, &format!("sequence {r}"));
    }
}

#[test]
fn reward_scores_pack_and_read_each_sequences_last_token() {
    let model = tiny(Heads { lm: false, score: true, value: false });
    let pairs = [pair(&[3, 4, 5], &(30..50).collect::<Vec<_>>(), &[60, 61]), pair(&[7, 8], &[70], &[80, 81, 82])];
    let refs: Vec<&Pair> = pairs.iter().collect();
    let batch = pair_batch(&refs, 0);
    assert!(batch.repacked(0).is_some());
    let got = host(last_token_scores(&model, &batch, &Default::default()));
    let rows = [&pairs[0].chosen, &pairs[1].chosen, &pairs[0].rejected, &pairs[1].rejected];
    for (r, s) in rows.iter().enumerate() {
        let hidden = model.forward_hidden(&TokenBatch::single(&s.input_ids, &Default::default()), None);
        let t = s.input_ids.len();
        let want = host(model.scores(hidden.narrow(1, t - 1, 1)).unwrap())[0];
        close(got[r], want, &format!("sequence {r}"));
    }
}
