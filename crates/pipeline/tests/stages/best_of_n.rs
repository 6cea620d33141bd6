//! Best-of-N: N candidates per prompt, each scored by the reward model exactly as the
//! scorer scores it alone, the best selected, and the rows train the SFT stage as is.

use crate::common::{root, tmp};

use align_data::generation_prompts;
use align_eval::best_of_n;
use align_model::backend::Cpu;
use align_model::{Heads, load_pretrained};
use align_reward::{Reward, RewardModelScorer, Sample};
use align_rollout::Generation;

#[test]
fn best_of_n_selects_the_highest_scored_candidate() {
    let d = tmp("bon");
    let tiny = root().join("fixtures/models/llama-tied");
    let f = d.join("prompts.jsonl");
    std::fs::write(&f, "{\"prompt\": \"Question: how to open a jar?\\nAnswer:\"}\n{\"prompt\": \"Question: how to dry shoes?\\nAnswer:\"}\n{\"prompt\": \"Question: how to cut bread?\\nAnswer:\"}\n").unwrap();
    let policy = load_pretrained::<Cpu>(&tiny, Heads::LM, &Default::default()).unwrap();
    let rm = RewardModelScorer::<Cpu>::load(&tiny, 4, &Default::default()).unwrap();
    let prompts =
        generation_prompts(&policy.tokenizer, &align_data::DatasetConfig::new(&f), &Default::default(), "p").unwrap();
    let sampling = Generation {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: 6,
        min_new_tokens: 0,
        stop_strings: vec![],
        include_stop_str_in_output: true,
    };
    let n = 5;
    let sel = best_of_n(&policy.model, &policy.tokenizer, &rm, &prompts, n, &sampling, 3).unwrap();
    assert_eq!(sel.len(), 3);
    let ex = serde_json::json!({});
    for (s, p) in sel.iter().zip(&prompts) {
        assert_eq!(s.candidates.len(), n);
        let rewards: Vec<f64> = s.candidates.iter().map(|c| c.reward).collect();
        let max = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(s.reward, max);
        assert_eq!(s.completion.as_str(), Some(s.candidates[s.best].completion.as_str()));
        assert_eq!(&s.prompt, &p.example["prompt"], "the row's own prompt");
        // Each reward is the scorer's score of that candidate alone.
        let alone = rm
            .score(&Sample {
                prompt: &p.text,
                completion: &s.candidates[0].completion,
                completion_ids: &[],
                example: &ex,
            })
            .unwrap()
            .score;
        assert!((alone - rewards[0]).abs() < 1e-5, "{alone} vs {}", rewards[0]);
        assert!(rewards.windows(2).any(|w| w[0] != w[1]), "candidates differ: {rewards:?}");
    }
    std::fs::remove_dir_all(&d).ok();
}
