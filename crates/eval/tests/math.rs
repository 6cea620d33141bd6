//! r1_zero evaluation resumes: samples of whole batches already written are kept and the
//! rest generated with the same per-batch seeds, equal to an uninterrupted run.

use std::path::Path;

use align_data::DatasetConfig;
use align_eval::math::{R1ZeroEvalConfig, eval_r1_zero, load_gsm8k, summarize_math};
use align_model::backend::Cpu;
use align_model::{Heads, load_pretrained};

#[test]
fn an_interrupted_r1_zero_eval_resumes_to_the_same_samples() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let m = load_pretrained::<Cpu>(&root.join("models/llama-tied"), Heads::LM, &Default::default()).unwrap();
    let items =
        load_gsm8k(&DatasetConfig { limit: Some(5), ..DatasetConfig::new(root.join("data/gsm8k_test_head.jsonl")) })
            .unwrap();
    let cfg = R1ZeroEvalConfig { max_new_tokens: 12, batch_size: 2, seed: 3, ..Default::default() };
    let mut batches = vec![];
    let full = eval_r1_zero(&m.model, &m.tokenizer, &items, &cfg, vec![], |b| {
        batches.push(b.len());
        Ok(())
    })
    .unwrap();
    assert_eq!(batches, vec![2, 2, 1]);
    let resumed = eval_r1_zero(&m.model, &m.tokenizer, &items, &cfg, full[..2].to_vec(), |_| Ok(())).unwrap();
    assert_eq!(resumed, full);
    assert_eq!(summarize_math(&full, 1.0).generated_tokens, full.iter().map(|s| s.completion_tokens).sum::<usize>());
    // A partial batch or another run's samples are refused.
    assert!(eval_r1_zero(&m.model, &m.tokenizer, &items, &cfg, full[..1].to_vec(), |_| Ok(())).is_err());
    let mut other = full[..2].to_vec();
    other[0].prompt = "another question".into();
    assert!(eval_r1_zero(&m.model, &m.tokenizer, &items, &cfg, other, |_| Ok(())).is_err());
}
