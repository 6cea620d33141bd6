//! Every reward function, the composites, the config form, and the reward-model scorer.

use std::path::Path;

use align_model::backend::Cpu;
use align_reward::{
    BestOfN, Candidate, Reward, RewardModelScorer, RewardTerm, Sample, best_index, build_terms, score_sequences,
};
use serde_json::json;

fn sample<'a>(completion: &'a str, ids: &'a [u32], example: &'a serde_json::Value) -> Sample<'a> {
    Sample { prompt: "Q: 2+2?\nA: <think>", completion, completion_ids: ids, example }
}

#[derive(serde::Deserialize)]
struct Rewards {
    rewards: Vec<RewardTerm>,
}

fn terms(toml_text: &str) -> Vec<(Box<dyn Reward>, f64)> {
    let r: Rewards = toml::from_str(toml_text).unwrap();
    build_terms::<Cpu>(&r.rewards, &Default::default()).unwrap()
}

#[test]
fn r1_zero_scores_format_and_answer_from_a_gsm8k_answer_field() {
    let f = terms("[[rewards]]\nkind = \"r1_zero\"\n");
    let (r1, w) = &f[0];
    assert_eq!(*w, 1.0);
    let ex = json!({"schema": "prompt_answer", "prompt": "…", "answer": "She pays 2 * 500 = 1000.\n#### 1,000"});
    let good = r1.score(&sample(" 2*500 </think> <answer> $1,000 </answer>", &[], &ex)).unwrap();
    assert_eq!(good.score, 1.0);
    assert_eq!(good.components["format_reward"], 1.0);
    let wrong = r1.score(&sample(" x </think> <answer> 999 </answer>", &[], &ex)).unwrap();
    assert_eq!((wrong.score, wrong.components["format_reward"], wrong.components["answer_reward"]), (0.0, 1.0, 0.0));
    let unformatted = r1.score(&sample(" 1000 </think><answer>1000</answer>", &[], &ex)).unwrap();
    assert_eq!(unformatted.components["format_reward"], 0.0);
    // A format bonus shapes the reward when asked for.
    let shaped = terms("[[rewards]]\nkind = \"r1_zero\"\nformat_weight = 0.25\n");
    let s = shaped[0].0.score(&sample(" x </think> <answer> 999 </answer>", &[], &ex)).unwrap();
    assert_eq!(s.score, 0.25);
    // A missing ground truth is an error that names the field.
    let e = r1.score(&sample("x", &[], &json!({"prompt": "p"}))).unwrap_err().to_string();
    assert!(e.contains("r1_zero") && e.contains("`answer`"), "{e}");
}

#[test]
fn r1_zero_format_gives_partial_credit_in_order() {
    let f = terms("[[rewards]]\nkind = \"r1_zero_format\"\n");
    let ex = json!({});
    let score = |t: &str| f[0].0.score(&sample(t, &[], &ex)).unwrap();
    assert_eq!(score(" no tags at all").score, 0.0);
    assert_eq!(score(" reasoning </think> The answer is 6").score, 0.25);
    assert_eq!(score(" x </think>\n<answer> 6").score, 0.5);
    assert_eq!(score(" x </think><answer>6</answer>").score, 0.75);
    let full = score(" x </think> <answer> 6 </answer>");
    assert_eq!(full.score, 1.0);
    assert_eq!(full.components["exact"], 1.0);
    // Out of order earns only what comes in order.
    assert_eq!(score(" <answer> 6 </answer> then </think>").score, 0.25);
}

#[test]
fn gsm8k_match_strict_and_flexible() {
    let f = terms("[[rewards]]\nkind = \"gsm8k\"\nmode = \"strict\"\n[[rewards]]\nkind = \"gsm8k\"\n");
    assert_eq!(f[0].0.name(), "gsm8k");
    assert_eq!(f[1].0.name(), "gsm8k_2", "a second function of a kind is renamed");
    let ex = json!({"answer": "#### 72"});
    let s = sample("So 48 + 24 = 72 clips.", &[], &ex);
    assert_eq!((f[0].0.score(&s).unwrap().score, f[1].0.score(&s).unwrap().score), (0.0, 1.0));
    let s = sample("48/2 = 24 and 48+24 = 72\n#### 72", &[], &ex);
    assert_eq!((f[0].0.score(&s).unwrap().score, f[1].0.score(&s).unwrap().score), (1.0, 1.0));
}

#[test]
fn soft_overlong_penalty_ramps_to_minus_one() {
    let f = terms("[[rewards]]\nkind = \"length\"\nmax_tokens = 10\ncache_tokens = 4\n");
    let ex = json!({});
    let at = |n: usize| f[0].0.score(&sample("x", &vec![1; n], &ex)).unwrap().score;
    assert_eq!([at(3), at(6), at(8), at(10), at(12)], [0.0, 0.0, -0.5, -1.0, -1.0]);
    assert!(f[0].0.score(&sample("text", &[], &ex)).is_err(), "needs token ids");
}

#[test]
fn coherence_is_low_for_loops_and_byte_soup() {
    let f = terms("[[rewards]]\nkind = \"coherence\"\n");
    let ex = json!({});
    let c = |t: &str| f[0].0.score(&sample(t, &[], &ex)).unwrap().score;
    let fluent = c("She sells the remaining nine eggs at the market for two dollars each.");
    let looped = c("the answer is the answer is the answer is the answer is the answer is");
    let soup = c("\u{fffd}\u{fffd}\u{1F3B3}\u{2622} ¡İ \u{fffd}\u{fffd}");
    assert_eq!(fluent, 1.0);
    assert!(looped < 0.5, "{looped}");
    assert!(soup < 0.5, "{soup}");
    assert_eq!(c("   "), 0.0);
}

#[test]
fn weighted_sum_and_adlf_mix() {
    let f = terms(
        r#"
[[rewards]]
kind = "adlf"
alpha = 0.3
external_range = [1.0, 10.0]
internal = [{ kind = "coherence", weight = 0.5 }, { kind = "length", max_tokens = 10, cache_tokens = 4, weight = 2.0 }]
"#,
    );
    let ex = json!({"schema": "scored_conversation", "score": 7.0});
    let ids = vec![1u32; 8];
    let out = f[0].0.score(&sample("Plain words here.", &ids, &ex)).unwrap();
    let external = (7.0 - 1.0) / 9.0;
    let internal = 0.5 * 1.0 + 2.0 * -0.5;
    assert!((out.score - (0.7 * external + 0.3 * internal)).abs() < 1e-12, "{out:?}");
    assert!((out.components["external"] - external).abs() < 1e-12);
    assert_eq!(out.components["internal"], internal);
    assert_eq!(out.components["coherence"], 1.0);
    assert_eq!(out.components["coherence/distinct"], 1.0);
    assert_eq!(out.components["length"], -0.5);
    let e = f[0].0.score(&sample("x", &ids, &json!({}))).unwrap_err().to_string();
    assert!(e.contains("`score`"), "{e}");
}

#[test]
fn config_errors_name_the_problem() {
    let bad = |t: &str| toml::from_str::<Rewards>(t).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(bad("[[rewards]]\nkind = \"r1zero\"\n").contains("r1zero"));
    assert!(bad("[[rewards]]\nkind = \"coherence\"\nm = 2\n").contains("`m`"));
    assert!(bad("[[rewards]]\nkind = \"r1_zero\"\nweight = \"a\"\n").contains("weight"));
    let r: Rewards = toml::from_str("[[rewards]]\nkind = \"adlf\"\nalpha = 1.5\ninternal = []\n").unwrap();
    assert!(build_terms::<Cpu>(&r.rewards, &Default::default()).err().unwrap().to_string().contains("alpha"));
    let r: Rewards = toml::from_str("rewards = []\n").unwrap();
    assert!(build_terms::<Cpu>(&r.rewards, &Default::default()).is_err());
}

#[test]
fn reward_model_scorer_batches_as_it_scores_alone() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama-untied");
    // The tiny LM gets a fresh score head: a reward model in shape.
    let rm = RewardModelScorer::<Cpu>::load(&dir, 3, &Default::default()).unwrap();
    let ex = json!({});
    let texts = [" yes", " no, not at all", " perhaps", " it depends on the weather today", ""];
    let samples: Vec<Sample> = texts.iter().map(|t| sample(t, &[], &ex)).collect();
    let batched: Vec<f64> = rm.score_batch(&samples).unwrap().into_iter().map(|o| o.score).collect();
    for (s, b) in samples.iter().zip(&batched) {
        let alone = rm.score(s).unwrap().score;
        assert!((alone - b).abs() < 1e-5, "{alone} vs {b}");
        // The joint text plus EOS, read at the last non-pad token.
        let mut ids = rm.tokenizer.encode(&format!("{}{}", s.prompt, s.completion), false).unwrap();
        ids.extend(rm.tokenizer.eos_token_id);
        let seq = align_data::TokenizedSequence { loss_mask: vec![true; ids.len()], input_ids: ids };
        let direct = score_sequences(&rm.model, &[&seq], 3, 1, &Default::default())[0];
        assert!((direct - b).abs() < 1e-5);
    }
    assert!(batched.windows(2).any(|w| (w[0] - w[1]).abs() > 1e-6), "scores differ by text");
}

#[test]
fn best_of_n_picks_the_highest_and_writes_an_sft_row() {
    assert_eq!(best_index(&[0.1, f64::NAN, 0.7, 0.7, -1.0]), Some(2));
    assert_eq!(best_index(&[f64::NAN]), None);
    let cands = vec![
        Candidate { completion: " a".into(), reward: 0.2 },
        Candidate { completion: " b".into(), reward: 1.5 },
        Candidate { completion: " c".into(), reward: -0.3 },
    ];
    let sel = BestOfN::select(json!("Question: x\nAnswer:"), cands.clone()).unwrap();
    assert_eq!((sel.best, sel.completion.as_str(), sel.reward), (1, Some(" b"), 1.5));
    let chat = BestOfN::select(json!([{"role": "user", "content": "x?"}]), cands).unwrap();
    assert_eq!(chat.completion, json!([{"role": "assistant", "content": " b"}]));
    // The selections file is a prompt/completion dataset as it stands.
    let dir = std::env::temp_dir().join(format!("align-bon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("sel.jsonl");
    std::fs::write(&f, serde_json::to_string(&sel).unwrap() + "\n").unwrap();
    let (examples, _) = align_data::load_examples(&align_data::DatasetConfig::new(&f)).unwrap();
    match &examples[0] {
        align_data::Example::PromptCompletion { prompt, completion } => {
            assert_eq!(prompt, &align_data::Content::Text("Question: x\nAnswer:".into()));
            assert_eq!(completion, &align_data::Content::Text(" b".into()));
        }
        other => panic!("not an SFT row: {other:?}"),
    }
    std::fs::remove_dir_all(&dir).ok();
}
