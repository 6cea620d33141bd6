//! Batching invariants on every reference checkpoint: a left-padded (generation) or
//! right-padded (training) batch, a packed row, and incremental decoding with the KV cache
//! all give each sequence the logits it gets alone.

use std::path::{Path, PathBuf};

use align_model::backend::Cpu;
use align_model::burn::tensor::Tensor;
use align_model::{Heads, TokenBatch, Transformer, load_pretrained};

const TOL: f32 = 2e-5;

fn models() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models");
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("config.json").exists()).collect();
    v.sort();
    v
}

fn host(t: Tensor<Cpu, 3>) -> (Vec<f32>, [usize; 3]) {
    let d = t.dims();
    (t.into_data().to_vec().unwrap(), d)
}

/// Logits of one sequence alone, `[len][vocab]`.
fn alone(m: &Transformer<Cpu>, ids: &[u32]) -> Vec<Vec<f32>> {
    let (v, [_, t, vocab]) = host(m.forward(&TokenBatch::single(ids, &Default::default())));
    (0..t).map(|i| v[i * vocab..(i + 1) * vocab].to_vec()).collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d < TOL, "{what}: max |Δ| {d:e}");
}

fn seqs() -> Vec<Vec<u32>> {
    vec![(5..25).collect(), (40..47).collect(), vec![300, 2, 99, 17, 4, 250, 11, 12, 13, 14, 15, 16]]
}

#[test]
fn padded_batches_match_each_sequence_alone() {
    let dev = Default::default();
    for dir in models() {
        let m = load_pretrained::<Cpu>(&dir, Heads::LM, &dev).unwrap().model;
        let seqs = seqs();
        let singles: Vec<_> = seqs.iter().map(|s| alone(&m, s)).collect();
        let (left, [_, w, vocab]) = host(m.forward(&TokenBatch::left_padded(&seqs, 0, &dev)));
        let (right, _) = host(m.forward(&TokenBatch::right_padded(&seqs, 0, &dev)));
        for (r, s) in seqs.iter().enumerate() {
            let pad = w - s.len();
            for i in 0..s.len() {
                let l = &left[(r * w + pad + i) * vocab..][..vocab];
                let rr = &right[(r * w + i) * vocab..][..vocab];
                assert_close(l, &singles[r][i], &format!("{} left-padded row {r} pos {i}", dir.display()));
                assert_close(rr, &singles[r][i], &format!("{} right-padded row {r} pos {i}", dir.display()));
            }
        }
    }
}

#[test]
fn packed_row_matches_sequences_alone() {
    let dev = Default::default();
    for dir in models() {
        let m = load_pretrained::<Cpu>(&dir, Heads::LM, &dev).unwrap().model;
        let seqs = seqs();
        let (mut ids, mut pos, mut seg) = (vec![], vec![], vec![]);
        for (k, s) in seqs.iter().enumerate() {
            ids.extend(s.iter().map(|&t| t as i64));
            pos.extend(0..s.len() as i64);
            seg.extend(std::iter::repeat_n(k as i64 + 1, s.len()));
        }
        let n = ids.len();
        let (out, [_, _, vocab]) = host(m.forward(&TokenBatch::from_host(ids, pos, seg, [1, n], &dev)));
        let mut off = 0;
        for s in &seqs {
            for (i, want) in alone(&m, s).iter().enumerate() {
                assert_close(&out[(off + i) * vocab..][..vocab], want, &format!("{} packed", dir.display()));
            }
            off += s.len();
        }
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let dev = Default::default();
    for dir in models() {
        let m = load_pretrained::<Cpu>(&dir, Heads::LM, &dev).unwrap().model;
        let seqs = seqs();
        let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| s[..4].to_vec()).collect();
        let singles: Vec<_> = seqs.iter().map(|s| alone(&m, s)).collect();
        let mut cache = m.new_cache();
        m.forward_hidden(&TokenBatch::left_padded(&prompts, 0, &dev), Some(&mut cache));
        // Feed each row's true continuation one token at a time (rows run out at their length).
        for step in 4..seqs.iter().map(Vec::len).min().unwrap() {
            let next: Vec<u32> = seqs.iter().map(|s| s[step]).collect();
            let pos = vec![step as i64; seqs.len()];
            let h = m.forward_hidden(&TokenBatch::next_tokens(&next, &pos, &dev), Some(&mut cache));
            let (out, [_, _, vocab]) = host(m.logits(h));
            for r in 0..seqs.len() {
                assert_close(
                    &out[r * vocab..][..vocab],
                    &singles[r][step],
                    &format!("{} cached step {step} row {r}", dir.display()),
                );
            }
        }
    }
}
