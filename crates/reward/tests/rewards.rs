//! Every reward function, the composites, the config form, and the reward-model scorer.

use std::path::{Path, PathBuf};

use align_model::backend::Cpu;
use align_reward::{
    BestOfN, Candidate, Fluency, Reward, RewardModelScorer, RewardTerm, Sample, best_index, build_terms, lcs_len,
    rouge_l_f1, rouge_tokens, score_sequences, sigmoid,
};
use serde_json::json;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(rel)
}

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
    let chat = BestOfN::select(json!([{"role": "user", "content": "x?"}]), cands.clone()).unwrap();
    assert_eq!(chat.completion, json!([{"role": "assistant", "content": " b"}]));
    // The on-policy pair: best against worst, none when every candidate scores alike.
    assert_eq!(sel.pair(), Some(json!({"prompt": "Question: x\nAnswer:", "chosen": " b", "rejected": " c"})));
    assert_eq!(chat.pair().unwrap()["rejected"], json!([{"role": "assistant", "content": " c"}]));
    let tied: Vec<Candidate> = cands.iter().map(|c| Candidate { reward: 1.0, ..c.clone() }).collect();
    assert_eq!(BestOfN::select(json!("q"), tied).unwrap().pair(), None);
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

#[test]
fn rouge_l_matches_rouge_score() {
    // fixtures/reference/rewards/rouge_l.json: rouge-score 0.1.2's RougeScorer(["rougeL"]).
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference/rewards/rouge_l.json")).unwrap()).unwrap();
    let pairs = r["pairs"].as_array().unwrap();
    assert!(pairs.len() >= 10);
    for p in pairs {
        let (reference, completion) = (p["reference"].as_str().unwrap(), p["completion"].as_str().unwrap());
        let tokens = |k: &str| -> Vec<String> {
            p[k].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
        };
        let (rt, ct) = (rouge_tokens(reference), rouge_tokens(completion));
        assert_eq!(rt, tokens("reference_tokens"), "{reference:?}");
        assert_eq!(ct, tokens("completion_tokens"), "{completion:?}");
        if !ct.is_empty() {
            let precision = lcs_len(&rt, &ct) as f64 / ct.len() as f64;
            assert!((precision - p["precision"].as_f64().unwrap()).abs() < 1e-9, "{reference:?} / {completion:?}");
        }
        let f = rouge_l_f1(reference, completion);
        let want = p["fmeasure"].as_f64().unwrap();
        assert!((f - want).abs() < 1e-9, "{reference:?} / {completion:?}: {f} vs {want}");
    }
    // Rows as align-data writes them, through the reward (default: against both).
    let f = terms("[[rewards]]\nkind = \"faithfulness\"\n");
    for row in r["rows"].as_array().unwrap() {
        let out = f[0].0.score(&sample(row["completion"].as_str().unwrap(), &[], &row["example"])).unwrap();
        let (re, co) = (row["rouge_l_reference"].as_f64().unwrap(), row["rouge_l_context"].as_f64().unwrap());
        assert!((out.components["rouge_l_reference"] - re).abs() < 1e-9, "{row}: {out:?}");
        assert!((out.components["rouge_l_context"] - co).abs() < 1e-9, "{row}: {out:?}");
        assert!((out.score - (re + co) / 2.0).abs() < 1e-9);
    }
}

#[test]
fn faithfulness_reads_reply_and_context_from_each_row_kind() {
    let scored = json!({
        "schema": "scored_conversation",
        "messages": [
            {"role": "user", "content": "Name a red fruit."},
            {"role": "assistant", "content": "An apple."},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "A cherry is red too."},
        ],
        "score": 4.0,
        "reason": null,
    });
    let completion = "A cherry is red too.";
    let f = |against: &str| terms(&format!("[[rewards]]\nkind = \"faithfulness\"\nagainst = \"{against}\"\n"));
    let (reference, context, both) = (f("reference"), f("context"), f("both"));
    let r = reference[0].0.score(&sample(completion, &[], &scored)).unwrap();
    assert_eq!(reference[0].0.name(), "faithfulness");
    assert_eq!(r.score, 1.0, "the last assistant turn is the reference");
    assert_eq!(r.components.keys().collect::<Vec<_>>(), ["rouge_l_reference"]);
    let c = context[0].0.score(&sample(completion, &[], &scored)).unwrap();
    let want = rouge_l_f1("Name a red fruit.\nAn apple.\nAnother one?", completion);
    assert!(want > 0.0 && want < 1.0);
    assert_eq!(c.score, want, "every turn before it, joined");
    let b = both[0].0.score(&sample(completion, &[], &scored)).unwrap();
    assert_eq!(b.score, (1.0 + want) / 2.0);
    assert_eq!((b.components["rouge_l_reference"], b.components["rouge_l_context"]), (1.0, want));

    // prompt_completion, text or messages; prompt_answer.
    let pc = json!({"schema": "prompt_completion", "prompt": "Greet me.", "completion": " hi there"});
    let out = both[0].0.score(&sample("hi there", &[], &pc)).unwrap();
    assert_eq!((out.components["rouge_l_reference"], out.components["rouge_l_context"]), (1.0, 0.0));
    let pcm = json!({
        "schema": "prompt_completion",
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."}],
        "completion": [{"role": "assistant", "content": "Hi, kind friend."}],
    });
    let out = both[0].0.score(&sample("Say hi, kind friend", &[], &pcm)).unwrap();
    assert_eq!(out.components["rouge_l_reference"], rouge_l_f1("Hi, kind friend.", "Say hi, kind friend"));
    assert_eq!(out.components["rouge_l_context"], rouge_l_f1("Be kind.\nSay hi.", "Say hi, kind friend"));
    let pa = json!({"schema": "prompt_answer", "prompt": "2+2?", "answer": "four"});
    assert_eq!(
        reference[0].0.score(&sample("It is four.", &[], &pa)).unwrap().score,
        rouge_l_f1("four", "It is four.")
    );

    // No reference: an error naming the reward and the fields looked at; the context still works.
    let po = json!({"schema": "prompt_only", "prompt": "Tell me something."});
    let e = both[0].0.score(&sample("x", &[], &po)).unwrap_err().to_string();
    assert!(e.contains("faithfulness") && e.contains("reference") && e.contains("`completion`"), "{e}");
    assert!(context[0].0.score(&sample("Tell me", &[], &po)).unwrap().score > 0.0);
    let no_reply = json!({"schema": "conversation", "messages": [{"role": "user", "content": "hello"}]});
    assert!(reference[0].0.score(&sample("x", &[], &no_reply)).is_err());
    let unpaired = json!({"schema": "unpaired_preference", "prompt": "p", "completion": "bad", "label": false});
    assert!(reference[0].0.score(&sample("bad", &[], &unpaired)).is_err(), "an undesirable completion is no reference");
    let e = both[0].0.score(&sample("x", &[], &json!({"messages": "oops"}))).unwrap_err().to_string();
    assert!(e.contains("faithfulness") && e.contains("`messages`"), "{e}");
    let bad = toml::from_str::<Rewards>("[[rewards]]\nkind = \"faithfulness\"\nagainst = \"prompt\"\n");
    assert!(bad.err().unwrap().to_string().contains("prompt"));
}

#[test]
fn quality_normalises_the_row_score_to_the_unit_interval() {
    let f = terms("[[rewards]]\nkind = \"quality\"\n");
    assert_eq!(f[0].0.name(), "quality");
    let q = |score: f64| f[0].0.score(&sample("x", &[], &json!({"schema": "scored_conversation", "score": score})));
    let out = q(4.0).unwrap();
    assert_eq!((out.score, out.components["raw"]), (0.8, 4.0), "default range [0, 5]");
    assert_eq!((q(7.5).unwrap().score, q(-1.0).unwrap().score), (1.0, 0.0), "clamped");
    let custom = terms("[[rewards]]\nkind = \"quality\"\nfield = \"judge\"\nrange = [1, 10]\n");
    let out = custom[0].0.score(&sample("x", &[], &json!({"judge": 7}))).unwrap();
    assert!((out.score - 6.0 / 9.0).abs() < 1e-12);
    let e = f[0].0.score(&sample("x", &[], &json!({"score": "high"}))).unwrap_err().to_string();
    assert!(e.contains("quality") && e.contains("`score`"), "{e}");

    let build = |t: &str| {
        let r: Rewards = toml::from_str(t).unwrap();
        build_terms::<Cpu>(&r.rewards, &Default::default()).err().map(|e| e.to_string()).unwrap_or_default()
    };
    assert!(build("[[rewards]]\nkind = \"quality\"\nrange = [5, 5]\n").contains("range"));
    assert!(build("[[rewards]]\nkind = \"quality\"\nbatch_size = 4\n").contains("`batch_size`"));
    let both =
        format!("[[rewards]]\nkind = \"quality\"\nfield = \"score\"\nmodel = {:?}\n", fixture("models/llama-untied"));
    assert!(build(&both).contains("`model`"));
}

#[test]
fn quality_from_a_reward_model_is_its_sigmoid() {
    let dir = fixture("models/llama-untied");
    let f = terms(&format!("[[rewards]]\nkind = \"quality\"\nmodel = {dir:?}\nbatch_size = 2\n"));
    let rm = RewardModelScorer::<Cpu>::load(&dir, 2, &Default::default()).unwrap();
    let ex = json!({});
    let samples: Vec<Sample> = [" yes", " no, not at all", " perhaps"].iter().map(|t| sample(t, &[], &ex)).collect();
    let q = f[0].0.score_batch(&samples).unwrap();
    for (o, r) in q.iter().zip(rm.score_batch(&samples).unwrap()) {
        assert_eq!(o.components["raw"], r.score);
        assert!((o.score - 1.0 / (1.0 + (-r.score).exp())).abs() < 1e-12);
        assert!(o.score > 0.0 && o.score < 1.0);
    }
    assert_eq!((sigmoid(0.0), sigmoid(-800.0), sigmoid(800.0)), (0.5, 0.0, 1.0));
}

/// log p(ids[j] | ids[..j]) for j ≥ `from`, from the full logits, log-softmax in f64 here.
fn direct_logprobs(model: &align_model::Transformer<Cpu>, ids: &[u32], from: usize) -> Vec<f64> {
    let batch = align_model::TokenBatch::<Cpu>::right_padded(&[ids.to_vec()], 0, &Default::default());
    let logits = model.forward(&batch);
    let [_, t, v] = logits.dims();
    let logits: Vec<f64> = logits.into_data().convert::<f64>().to_vec::<f64>().unwrap();
    (from..t)
        .map(|j| {
            let row = &logits[(j - 1) * v..j * v];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            row[ids[j] as usize] - lse
        })
        .collect()
}

#[test]
fn fluency_is_the_reference_models_geometric_mean_token_probability() {
    let dir = fixture("models/llama-untied");
    let f = terms(&format!("[[rewards]]\nkind = \"fluency\"\npath = {dir:?}\nbatch_size = 2\n"));
    assert_eq!(f[0].0.name(), "fluency");
    let lm = Fluency::<Cpu>::load(&dir, 2, &Default::default()).unwrap();
    let ex = json!({});
    let texts =
        [" 4 </think> <answer> 4 </answer>", " the the the the the the", " Permission is hereby granted, free", ""];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| lm.tokenizer.encode(t, false).unwrap()).collect();
    // Token ids (as sampled) and text alone score alike when they agree.
    let by_ids: Vec<Sample> = texts.iter().zip(&ids).map(|(t, i)| sample(t, i, &ex)).collect();
    let by_text: Vec<Sample> = texts.iter().map(|t| sample(t, &[], &ex)).collect();
    let batched = f[0].0.score_batch(&by_ids).unwrap();
    let prompt = lm.tokenizer.encode(by_ids[0].prompt, false).unwrap();
    for (k, out) in batched.iter().enumerate() {
        let alone = f[0].0.score(&by_text[k]).unwrap();
        assert!((alone.score - out.score).abs() < 1e-6, "{k}: {alone:?} vs {out:?}");
        if ids[k].is_empty() {
            assert_eq!((out.score, out.components.get("mean_logprob")), (0.0, None), "nothing to score");
            continue;
        }
        let full: Vec<u32> = prompt.iter().chain(&ids[k]).copied().collect();
        let lp = direct_logprobs(&lm.model, &full, prompt.len());
        assert_eq!(lp.len(), ids[k].len(), "completion positions only");
        let mean = lp.iter().sum::<f64>() / lp.len() as f64;
        assert!((out.components["mean_logprob"] - mean).abs() < 1e-5, "{k}: {out:?} vs {mean}");
        assert!((out.score - mean.exp()).abs() < 1e-5, "{k}: {out:?} vs {}", mean.exp());
        assert!(out.score > 0.0 && out.score < 1.0);
    }
    // Without a model path it cannot be built until the stage fills in its reference model,
    // also inside ADLF; a path given is kept.
    let text = "[[rewards]]\nkind = \"fluency\"\n[[rewards]]\nkind = \"fluency\"\npath = \"elsewhere\"\n\
                [[rewards]]\nkind = \"adlf\"\nalpha = 0.5\ninternal = [{ kind = \"fluency\" }]\n";
    let mut r: Rewards = toml::from_str(text).unwrap();
    let e = build_terms::<Cpu>(&r.rewards, &Default::default()).err().unwrap().to_string();
    assert!(e.contains("fluency") && e.contains("`path`"), "{e}");
    align_reward::fill_reference_model(&mut r.rewards, &dir);
    let paths: Vec<Option<PathBuf>> = r
        .rewards
        .iter()
        .flat_map(|t| match &t.spec {
            align_reward::RewardSpec::Adlf { internal, .. } => internal.iter().collect(),
            _ => vec![t],
        })
        .map(|t| match &t.spec {
            align_reward::RewardSpec::Fluency { path, .. } => path.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(paths, [Some(dir.clone()), Some("elsewhere".into()), Some(dir.clone())]);
}

#[test]
fn multi_objective_weighted_sum_of_fluency_faithfulness_and_quality() {
    let dir = fixture("models/llama-untied");
    let f = terms(&format!(
        "rewards = [{{ kind = \"fluency\", path = {dir:?}, weight = 0.2 }}, \
         {{ kind = \"faithfulness\", weight = 0.3 }}, {{ kind = \"quality\", weight = 0.5 }}]\n"
    ));
    let sum = align_reward::WeightedSum { name: "reward".into(), terms: f };
    let ex = json!({
        "schema": "scored_conversation",
        "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}],
        "score": 3.0,
        "reason": null,
    });
    let out = sum.score(&sample(" Hello there.", &[], &ex)).unwrap();
    let (fl, fa, q) = (out.components["fluency"], out.components["faithfulness"], out.components["quality"]);
    assert_eq!((fa, q), ((1.0 + 0.0) / 2.0, 0.6));
    assert!((out.score - (0.2 * fl + 0.3 * fa + 0.5 * q)).abs() < 1e-12);
    assert!(out.components.contains_key("fluency/mean_logprob"));
    assert!(out.components.contains_key("faithfulness/rouge_l_context"));
}
