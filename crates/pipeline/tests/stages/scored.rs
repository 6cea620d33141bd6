//! SFT on scored conversations (the seed's advanced techniques) on the tiny `llama-tied`
//! checkpoint and synthetic arithmetic conversations whose score follows the reply (worked
//! 5, bare answer 3, wrong 1): score conditioning steers generation, the critique task is
//! weighted and learnt, the contrastive loss learns to pair prompts with their replies, and
//! a score curriculum draws the best-rated rows first.

use std::path::{Path, PathBuf};

use crate::common::{metrics, root, tmp};
use align_data::scored::{CritiqueTask, DEFAULT_CRITIQUE_INSTRUCTION, ScoreCondition};
use align_data::synthetic::{arithmetic_problems, scored_conversation_rows};
use align_data::{ChatFormat, DatasetConfig, ScoredSft, sft_rows};
use align_model::backend::Cpu;
use align_model::{ChatMessage, Heads, load_pretrained};
use align_pipeline::sft::{SftConfig, run_sft};
use align_rollout::SamplingConfig;

/// `n` scored conversations from `seed` in `dir/name`.
fn scored_file(dir: &Path, name: &str, seed: u64, n: usize) -> PathBuf {
    let rows = scored_conversation_rows(&arithmetic_problems(seed, n, 9), seed, 3);
    let f = dir.join(name);
    std::fs::write(&f, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    f
}

fn config(out: &Path, data: &Path, extra: &str) -> SftConfig {
    let text = format!(
        "output_dir = \"{}\"\n[model]\npath = \"{}\"\n[data]\npath = \"{}\"\n[tokenize]\nmax_length = 256\nchat_format = \"role_markers\"\n{extra}",
        out.display(),
        root().join("fixtures/models/llama-tied").display(),
        data.display(),
    );
    toml::from_str(&text).unwrap()
}

/// Greedy replies (stopping at EOS, as `align generate`) of `model` to `conversations`, each cut at its first `</answer>`.
fn replies(model: &Path, conversations: &[Vec<ChatMessage>], max_new_tokens: usize) -> Vec<String> {
    let m = load_pretrained::<Cpu>(model, Heads::LM, &Default::default()).unwrap();
    let f = align_data::Formatter { format: ChatFormat::RoleMarkers, template: Err(String::new()) };
    let prompts: Vec<Vec<u32>> =
        conversations.iter().map(|c| m.tokenizer.encode(&f.render(c, true).unwrap(), false).unwrap()).collect();
    let cfg = SamplingConfig { max_new_tokens, temperature: 0.0, stop_token_ids: vec![0], ..Default::default() };
    let out = align_rollout::generate(&m.model, &prompts, 3, &cfg).unwrap();
    out.iter()
        .map(|c| {
            let text = m.tokenizer.decode(&c.tokens, true).unwrap();
            match text.find("</answer>") {
                Some(i) => text[..i + "</answer>".len()].to_string(),
                None => text,
            }
        })
        .collect()
}

const TRAINING: &str = "[training]\nper_device_train_batch_size = 4\nlearning_rate = 3e-3\nlr_scheduler_type = \"constant\"\nlogging_steps = 1\nsave_steps = 0\n";

/// `[score_conditioning]`: trained with each row's score in front of its prompt, the model
/// writes the working when asked for a 5 and leaves it out when asked for a 3, on
/// problems it has not seen.
#[test]
fn score_conditioning_steers_the_reply_by_the_target_score() {
    let d = tmp("scored-conditioning");
    let data = scored_file(&d, "train.jsonl", 1, 48);
    let cfg = config(&d.join("run"), &data, &format!("{TRAINING}max_steps = 300\n[score_conditioning]\n"));
    let final_dir = run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();

    let condition = ScoreCondition::new(align_data::scored::DEFAULT_SCORE_FORMAT).unwrap();
    let held_out = arithmetic_problems(77, 12, 9);
    let worked_share = |score: f64| {
        let asks: Vec<Vec<ChatMessage>> =
            held_out.iter().map(|p| vec![ChatMessage::new("user", condition.prompt(&p.prompt(), score))]).collect();
        let out = replies(&final_dir, &asks, 48);
        eprintln!("target {score}: {out:?}");
        out.iter().filter(|r| r.contains('=')).count() as f64 / out.len() as f64
    };
    let (high, low) = (worked_share(5.0), worked_share(3.0));
    eprintln!("replies with working: target 5 {high}, target 3 {low}");
    assert!(high >= 0.75 && high - low >= 0.5, "target 5: {high} with working; target 3: {low}");

    // `align generate --target-score` conditions the prompt the same way.
    for score in [5.0, 3.0] {
        let p = &held_out[0];
        let want = &replies(&final_dir, &[vec![ChatMessage::new("user", condition.prompt(&p.prompt(), score))]], 48)[0];
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
            .args(["generate", "--chat-format", "role_markers", "--max-new-tokens", "48", "--target-score"])
            .arg(score.to_string())
            .arg("--model")
            .arg(&final_dir)
            .args(["--prompt", &p.prompt()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with(want.as_str()),
            "align generate --target-score {score}: {text:?}, in-process {want:?}"
        );
    }

    // `target` is for the online stages' prompts: SFT refuses it, and they need it.
    let mut with_target = config(&d.join("target"), &data, "[score_conditioning]\ntarget = 5\n");
    let err = format!("{:#}", run_sft::<Cpu>(&with_target, false, &Default::default()).unwrap_err());
    assert!(err.contains("[score_conditioning] target"), "{err}");
    with_target.score_conditioning = Some(Default::default());
    with_target.grpo = Some(toml::from_str("rewards = [{ kind = \"coherence\" }]").unwrap());
    let err =
        format!("{:#}", align_pipeline::grpo::run_grpo::<Cpu>(&with_target, false, &Default::default()).unwrap_err());
    assert!(err.contains("the grpo stage needs the score its prompts ask for"), "{err}");

    // A row without a score cannot be conditioned: the error names the file and the row.
    let plain = d.join("plain.jsonl");
    std::fs::write(&plain, "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    let cfg = config(&d.join("plain"), &plain, "[score_conditioning]\n");
    let err = format!("{:#}", run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap_err());
    assert!(err.contains("plain.jsonl") && err.contains("example 1") && err.contains("meta_eval_score"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// `[self_critique]`: every scored conversation gives a second row, the critique; its
/// tokens weigh `weight` in the loss (checked exactly on one full-batch step), and after
/// training the model's critiques give the rows' scores.
#[test]
fn self_critique_weights_the_critique_task_and_learns_the_scores() {
    let d = tmp("scored-critique");
    let data = scored_file(&d, "train.jsonl", 2, 12);
    // One step over all 24 rows: the logged loss must be the weighted mean of the two parts.
    let cfg = config(
        &d.join("one"),
        &data,
        "[training]\nper_device_train_batch_size = 24\nmax_steps = 1\nlogging_steps = 1\nsave_steps = 0\n[self_critique]\nweight = 0.25\n",
    );
    run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("one"));
    let (reply, critique, loss) = (m[0].extra["critique/reply_loss"], m[0].extra["critique/loss"], m[0].loss.unwrap());
    let tok = load_pretrained::<Cpu>(&cfg.model.path, Heads::LM, &Default::default()).unwrap().tokenizer;
    let task = CritiqueTask::new(DEFAULT_CRITIQUE_INSTRUCTION, 5.0).unwrap();
    let rows = sft_rows(
        &tok,
        &DatasetConfig::new(&data),
        &cfg.tokenize,
        "t",
        ScoredSft { critique: Some(&task), ..Default::default() },
    )
    .unwrap();
    assert_eq!(rows.len(), 24);
    assert_eq!(rows.iter().filter(|r| r.critique).count(), 12);
    let tokens = |c: bool| -> f64 {
        rows.iter()
            .filter(|r| r.critique == c)
            .map(|r| r.seq.loss_mask.iter().skip(1).filter(|&&m| m).count() as f64)
            .sum()
    };
    let (nr, nc) = (tokens(false), tokens(true));
    let want = (reply * nr + 0.25 * critique * nc) / (nr + nc);
    eprintln!("reply loss {reply} over {nr} tokens, critique loss {critique} over {nc}: loss {loss}, want {want}");
    assert!((loss - want).abs() < 1e-5 * want, "loss {loss}, weighted mean {want}");

    // Trained, the critiques of the training conversations give their scores.
    let cfg = config(&d.join("run"), &data, &format!("{TRAINING}max_steps = 300\n[self_critique]\nweight = 0.5\n"));
    let final_dir = run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let examples = align_data::load_examples(&DatasetConfig::new(&data)).unwrap().0;
    let (asks, scores): (Vec<Vec<ChatMessage>>, Vec<f64>) = examples
        .iter()
        .map(|e| match e {
            align_data::Example::ScoredConversation { messages, score, .. } => {
                (vec![task.prompt(messages).unwrap()], *score)
            }
            other => panic!("{other:?}"),
        })
        .unzip();
    let m = load_pretrained::<Cpu>(&final_dir, Heads::LM, &Default::default()).unwrap();
    let f = align_data::Formatter { format: ChatFormat::RoleMarkers, template: Err(String::new()) };
    let prompts: Vec<Vec<u32>> =
        asks.iter().map(|c| m.tokenizer.encode(&f.render(c, true).unwrap(), false).unwrap()).collect();
    let out = align_rollout::generate(
        &m.model,
        &prompts,
        3,
        &SamplingConfig { max_new_tokens: 64, temperature: 0.0, ..Default::default() },
    )
    .unwrap();
    let right = out
        .iter()
        .zip(&scores)
        .filter(|(c, s)| {
            let text = m.tokenizer.decode(&c.tokens, true).unwrap();
            let cut = text.find("<|").map_or(text.as_str(), |i| &text[..i]);
            task.parse_score(cut) == Some(**s)
        })
        .count();
    let accuracy = right as f64 / scores.len() as f64;
    eprintln!("critique score accuracy {accuracy}");
    assert!(accuracy >= 0.75, "critique score accuracy {accuracy}");

    // `align generate --self-critique`: a draft, its critique with a score, a revision.
    let Some(align_data::Example::ScoredConversation { messages, .. }) = examples.first() else { unreachable!() };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["generate", "--chat-format", "role_markers", "--max-new-tokens", "40", "--self-critique"])
        .arg("--model")
        .arg(&final_dir)
        .args(["--prompt", &messages[0].content])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    for part in ["draft:\n", "\n\ncritique:\n", "\ncritique score: ", "\nrevision:\n"] {
        assert!(text.contains(part), "{part:?} missing from {text:?}");
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["generate", "--self-critique", "--prompt", "x", "--model"])
        .arg(&final_dir)
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("needs --chat or --chat-format"));
    std::fs::remove_dir_all(&d).ok();
}

/// `[contrastive]`: the auxiliary loss and its retrieval accuracy are logged every step;
/// training raises the accuracy of matching each prompt with its own reply among the
/// micro-batch's and lowers the contrastive loss.
#[test]
fn the_contrastive_loss_learns_to_pair_prompts_with_their_replies() {
    let d = tmp("scored-contrastive");
    let data = scored_file(&d, "train.jsonl", 3, 32);
    let cfg = config(
        &d.join("run"),
        &data,
        &format!("{TRAINING}max_steps = 120\n[contrastive]\nweight = 1.0\ntemperature = 0.07\n"),
    );
    run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    let mean = |k: &str, r: std::ops::Range<usize>| r.clone().map(|i| m[i].extra[k]).sum::<f64>() / r.len() as f64;
    let (loss0, loss1) = (mean("contrastive/loss", 0..8), mean("contrastive/loss", 112..120));
    let (acc0, acc1) = (mean("contrastive/accuracy", 0..8), mean("contrastive/accuracy", 112..120));
    eprintln!("contrastive loss {loss0} -> {loss1}, accuracy {acc0} -> {acc1}");
    assert!(loss1 < 0.5 * loss0, "contrastive loss {loss0} -> {loss1}");
    assert!(acc1 >= 0.75 && acc1 > acc0, "accuracy {acc0} -> {acc1}");

    // Packing mixes rows: refused by name.
    let mut cfg = config(&d.join("packed"), &data, "[contrastive]\n");
    cfg.packing = true;
    let err = format!("{:#}", run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap_err());
    assert!(err.contains("[contrastive]") && err.contains("packing"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// `[curriculum] measure = "score"`: the best-rated rows (difficulty 5 − score = 0) come
/// first, or the rows a `column` rates easiest; rows without a score or the column are
/// refused by name.
#[test]
fn a_score_curriculum_draws_the_best_rated_rows_first() {
    let d = tmp("scored-curriculum");
    let data = scored_file(&d, "train.jsonl", 4, 30);
    let cfg = config(
        &d.join("run"),
        &data,
        "[training]\nper_device_train_batch_size = 2\nlearning_rate = 1e-3\nmax_steps = 12\nlogging_steps = 1\nsave_steps = 0\n[curriculum]\nmeasure = \"score\"\ninitial = 0.3\nduration = 0.5\n",
    );
    run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let difficulty: Vec<f64> = metrics(&d.join("run")).iter().map(|r| r.extra["curriculum/difficulty"]).collect();
    eprintln!("mean 5 − score of the rows drawn {difficulty:?}");
    // The easiest 30 % are the 10 rows scored 5.
    assert_eq!(difficulty[0], 0.0);
    let late = difficulty[6..].iter().sum::<f64>() / 6.0;
    assert!(late > 1.0, "the second half draws all scores: mean difficulty {late}");

    // Or a column's number as each row's difficulty: rows 30, 29, … 1 here, so the last
    // rows come first.
    let text = std::fs::read_to_string(&data).unwrap();
    let with_column: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            row["difficulty"] = serde_json::json!(30 - i);
            format!("{row}\n")
        })
        .collect();
    let column_data = d.join("column.jsonl");
    std::fs::write(&column_data, with_column).unwrap();
    let training = "[training]\nper_device_train_batch_size = 2\nlearning_rate = 1e-3\nmax_steps = 4\nlogging_steps = 1\nsave_steps = 0\n";
    let curriculum = "[curriculum]\nmeasure = \"score\"\ncolumn = \"difficulty\"\ninitial = 0.3\nduration = 0.5\n";
    let cfg = config(&d.join("column"), &column_data, &format!("{training}{curriculum}"));
    run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let first = metrics(&d.join("column"))[0].extra["curriculum/difficulty"];
    assert!(first <= 9.0, "the first step draws from the 9 rows of difficulty 1–9: mean {first}");
    // A row without the column is an error naming the file, the line and the field.
    std::fs::write(&column_data, text).unwrap();
    let err = format!("{:#}", run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap_err());
    assert!(err.contains("column.jsonl:1") && err.contains("field `difficulty`"), "{err}");

    let plain = d.join("plain.jsonl");
    std::fs::write(&plain, "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    let cfg = config(&d.join("plain"), &plain, "[curriculum]\nmeasure = \"score\"\n");
    let err = format!("{:#}", run_sft::<Cpu>(&cfg, false, &Default::default()).unwrap_err());
    assert!(err.contains("meta_eval_score") && err.contains("row 1"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// The multi-objective rewards in an online stage: GRPO on scored conversations, its prompts
/// asking for a 5, rewarded by fluency (under the stage's reference model, filled in),
/// faithfulness and quality at the seed's weights. Each component is logged and in [0, 1],
/// and the reward is their weighted sum.
#[test]
fn grpo_trains_on_the_multi_objective_rewards_with_conditioned_prompts() {
    let d = tmp("scored-multi-objective");
    let data = scored_file(&d, "train.jsonl", 5, 8);
    let rewards = "rewards = [{ kind = \"fluency\", weight = 0.25 }, { kind = \"faithfulness\", weight = 0.25 }, { kind = \"quality\", field = \"score\", range = [0, 5], weight = 0.5 }]";
    let cfg = crate::common::rl_config(
        &d.join("run"),
        &data,
        "per_device_train_batch_size = 8\nmax_steps = 2\nsave_steps = 0\nlearning_rate = 1e-4",
        "grpo",
        &format!("num_generations = 4\nmax_completion_length = 8\n{rewards}"),
        "[tokenize]\nchat_format = \"role_markers\"\n[score_conditioning]\ntarget = 5\n",
    );
    align_pipeline::grpo::run_grpo::<Cpu>(&cfg, false, &Default::default()).unwrap();
    let m = metrics(&d.join("run"));
    assert_eq!(m.len(), 2);
    for r in m {
        let part = |k: &str| r.extra[&format!("rewards/{k}/mean")];
        for k in ["fluency", "faithfulness", "quality"] {
            assert!((0.0..=1.0).contains(&part(k)), "{k}: {}", part(k));
        }
        let sum = 0.25 * part("fluency") + 0.25 * part("faithfulness") + 0.5 * part("quality");
        assert!((r.extra["reward"] - sum).abs() < 1e-6, "reward {} against the weighted sum {sum}", r.extra["reward"]);
    }
    let rows = std::fs::read_to_string(d.join("run/completions.jsonl")).unwrap();
    let row: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    let prompt = row["prompt"].as_str().unwrap();
    assert!(prompt.contains("<score>5</score>\n"), "the prompt asks for a 5: {prompt:?}");
    std::fs::remove_dir_all(&d).ok();
}
