//! Win rate: a model against itself ties everywhere (0.5); against another model the
//! verdicts follow the judge's scores.

use std::path::Path;

use align_eval::win_rate::{Contender, reward_scores, win_rate};
use align_model::backend::Cpu;
use align_model::{Heads, load_pretrained};
use align_rollout::SamplingConfig;

#[test]
fn self_play_ties_and_verdicts_follow_the_judge() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models");
    let dev = Default::default();
    let a = load_pretrained::<Cpu>(&root.join("llama-tied"), Heads::LM, &dev).unwrap();
    let b = load_pretrained::<Cpu>(&root.join("llama-untied"), Heads::LM, &dev).unwrap();
    let judge =
        load_pretrained::<Cpu>(&root.join("llama-tied"), Heads { lm: false, score: true, value: false }, &dev).unwrap();
    let c = Contender::of;
    let prompts: Vec<String> =
        ["The sky is", "Two plus two", "My favourite food"].iter().map(|s| s.to_string()).collect();
    let cfg = SamplingConfig { temperature: 0.0, max_new_tokens: 8, ..Default::default() };
    let (_, same) = win_rate(&c(&a), &c(&a), &c(&judge), &prompts, &cfg, 2, &dev).unwrap();
    assert_eq!(same.win_rate.value, 0.5);
    let (samples, s) = win_rate(&c(&a), &c(&b), &c(&judge), &prompts, &cfg, 2, &dev).unwrap();
    for x in &samples {
        let want = if x.reward_a > x.reward_b {
            1.0
        } else if x.reward_a == x.reward_b {
            0.5
        } else {
            0.0
        };
        assert_eq!(x.win, want);
        // the judge's score does not depend on the batch it is in
        let alone =
            reward_scores(&c(&judge), std::slice::from_ref(&x.prompt), std::slice::from_ref(&x.completion_a), 1, &dev)
                .unwrap();
        assert!((alone[0] - x.reward_a).abs() < 1e-4, "{} vs {}", alone[0], x.reward_a);
    }
    assert_eq!(s.num_prompts, 3);
    // A model with no score head is not a judge.
    assert!(win_rate(&c(&a), &c(&b), &c(&a), &prompts, &cfg, 2, &dev).is_err());
}
