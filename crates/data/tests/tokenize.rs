//! Tokenising examples: loss masks per schema, EOS that survives `pad == eos`, truncation
//! counts, and the packing equivalence through align-model.

use std::path::{Path, PathBuf};

use align_data::{
    Adapter, ChatFormat, Content, DatasetConfig, Example, ExampleTokenizer, TokenizeConfig, Tokenized,
    TokenizedSequence, Truncation, load_examples, pack, pad_right,
};
use align_model::backend::Cpu;
use align_model::burn::tensor::activation::log_softmax;
use align_model::{ChatMessage, Heads, Tokenizer, load_pretrained};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&root().join("models/llama-tied")).unwrap()
}

fn seq(t: Tokenized) -> TokenizedSequence {
    match t {
        Tokenized::Sequence(s) => s,
        other => panic!("{other:?}"),
    }
}

fn masked_text(tok: &Tokenizer, s: &TokenizedSequence) -> String {
    let ids: Vec<u32> = s.input_ids.iter().zip(&s.loss_mask).filter(|(_, m)| **m).map(|(i, _)| *i).collect();
    tok.decode(&ids, false).unwrap()
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "Bye"),
        ChatMessage::new("assistant", "Goodbye."),
    ]
}

#[test]
fn masks_per_schema() {
    let tok = tokenizer();
    let eos = tok.eos_token_id.unwrap();
    let mut t = ExampleTokenizer::new(&tok, TokenizeConfig::default());

    let s = seq(t.tokenize(&Example::Text { text: "the cat sat".into() }).unwrap());
    assert!(s.loss_mask.iter().all(|&m| m));
    assert_eq!(*s.input_ids.last().unwrap(), eos);

    let s = seq(t
        .tokenize(&Example::PromptCompletion {
            prompt: Content::Text("Q: two plus two?\nA:".into()),
            completion: Content::Text(" four".into()),
        })
        .unwrap());
    let n_prompt = tok.encode("Q: two plus two?\nA:", false).unwrap().len();
    assert!(s.loss_mask[..n_prompt].iter().all(|&m| !m));
    assert_eq!(masked_text(&tok, &s), " four<|endoftext|>");

    // The model's ChatML template: assistant turns with their end marker are trained on.
    let s = seq(t.tokenize(&Example::Conversation { messages: conversation() }).unwrap());
    assert_eq!(masked_text(&tok, &s), "Hello!<|im_end|>\nGoodbye.<|im_end|>\n");
    let all = tok.decode(&s.input_ids, false).unwrap();
    assert!(all.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"), "{all:?}");

    // Named formats.
    for (format, want) in [
        (ChatFormat::RoleMarkers, "Hello!\nGoodbye.\n"),
        (ChatFormat::TurnMarkers, "Hello!\n\nGoodbye.\n\n"),
        (ChatFormat::Standard, "Hello!\n\nGoodbye.\n\n"),
    ] {
        let mut t = ExampleTokenizer::new(&tok, TokenizeConfig { chat_format: format, ..Default::default() });
        let s = seq(t.tokenize(&Example::Conversation { messages: conversation() }).unwrap());
        assert_eq!(masked_text(&tok, &s), want, "{format:?}");
    }

    // Conversational prompt/completion: completion = the assistant turn as the template renders it.
    let s = seq(t
        .tokenize(&Example::PromptCompletion {
            prompt: Content::Messages(vec![ChatMessage::new("user", "Hi")]),
            completion: Content::Messages(vec![ChatMessage::new("assistant", "Hello!")]),
        })
        .unwrap());
    assert_eq!(masked_text(&tok, &s), "Hello!<|im_end|>\n");
}

#[test]
fn eos_stays_in_the_loss_when_pad_is_eos() {
    let mut tok = tokenizer();
    tok.pad_token_id = tok.eos_token_id;
    let eos = tok.eos_token_id.unwrap();
    let mut t = ExampleTokenizer::new(&tok, TokenizeConfig::default());
    let a = seq(t
        .tokenize(&Example::PromptCompletion {
            prompt: Content::Text("a b".into()),
            completion: Content::Text(" c".into()),
        })
        .unwrap());
    let b = seq(t.tokenize(&Example::Text { text: "a much longer text row here".into() }).unwrap());
    let batch = pad_right(&[&a, &b], eos);
    let [_, w] = batch.shape;
    // row 0: its real EOS is a target; the padding EOS ids after it are not.
    let (targets, mask) = batch.shifted_targets();
    let last_real = a.len() - 1;
    assert_eq!(targets[last_real - 1], eos as i64);
    assert!(mask[last_real - 1], "the real EOS is in the loss");
    assert!(mask[last_real..w - 1].iter().all(|&m| !m), "padding is not");
    assert!(batch.input_ids[last_real + 1..w].iter().all(|&i| i == eos as i64));
}

#[test]
fn preference_pairs_share_the_prompt_and_truncate_with_counts() {
    let tok = tokenizer();
    let eos = tok.eos_token_id.unwrap();
    let mut t = ExampleTokenizer::new(&tok, TokenizeConfig::default());
    let ex = Example::Preference {
        prompt: Content::Text("The sky is".into()),
        chosen: Content::Text(" blue.".into()),
        rejected: Content::Text(" green and purple.".into()),
        margin: None,
    };
    let Tokenized::Pair { prompt_ids, chosen_ids, rejected_ids, .. } = t.tokenize(&ex).unwrap() else { panic!() };
    assert_eq!(prompt_ids, tok.encode("The sky is", false).unwrap());
    assert_eq!(*chosen_ids.last().unwrap(), eos);
    assert_eq!(*rejected_ids.last().unwrap(), eos);
    assert_eq!(tok.decode(&chosen_ids, false).unwrap(), " blue.<|endoftext|>");

    let cfg = TokenizeConfig {
        max_prompt_length: Some(2),
        max_length: Some(5),
        prompt_truncation: Truncation::KeepEnd,
        ..Default::default()
    };
    let mut t = ExampleTokenizer::new(&tok, cfg);
    let Tokenized::Pair { prompt_ids: p, chosen_ids: c, rejected_ids: r, .. } = t.tokenize(&ex).unwrap() else {
        panic!()
    };
    assert_eq!(p, prompt_ids[prompt_ids.len() - 2..].to_vec(), "keep_end keeps the prompt's last tokens");
    assert!(c.len() <= 3 && r.len() == 3);
    let dropped = (prompt_ids.len() - 2) + (chosen_ids.len() - c.len()) + (rejected_ids.len() - r.len());
    assert_eq!((t.stats.rows, t.stats.truncated_rows, t.stats.dropped_tokens), (1, 1, dropped));
}

/// A packed batch gives each sequence the same per-token log-probs as the sequence alone.
#[test]
fn packed_batch_matches_unpacked_logprobs() {
    let dir = root().join("models/llama-untied");
    let dev = Default::default();
    let m = load_pretrained::<Cpu>(&dir, Heads::LM, &dev).unwrap();
    let cfg = DatasetConfig {
        adapter: Some(Adapter::Gsm8kSft),
        limit: Some(6),
        ..DatasetConfig::new(root().join("data/gsm8k_train_head.jsonl"))
    };
    let (examples, _) = load_examples(&cfg).unwrap();
    let mut t = ExampleTokenizer::new(
        &m.tokenizer,
        TokenizeConfig { max_length: Some(200), max_prompt_length: Some(120), ..Default::default() },
    );
    let seqs: Vec<TokenizedSequence> = examples.iter().map(|e| seq(t.tokenize(e).unwrap())).collect();
    let refs: Vec<&TokenizedSequence> = seqs.iter().collect();
    let packed = pack(&refs, 512, m.tokenizer.pad_token_id.unwrap()).unwrap();
    assert!(packed.shape[0] < seqs.len(), "several sequences share a row: {:?}", packed.shape);

    // Per row, per segment: the log-probs of that segment's loss tokens, in order.
    let segment_logprobs = |batch: &align_data::HostBatch| -> Vec<Vec<Vec<f32>>> {
        let [b, w] = batch.shape;
        let logp: Vec<f32> =
            log_softmax(m.model.forward(&batch.to_device::<Cpu>(&dev)), 2).into_data().to_vec().unwrap();
        let v = logp.len() / (b * w);
        let (targets, mask) = batch.shifted_targets();
        (0..b)
            .map(|r| {
                let mut per_segment: Vec<Vec<f32>> = vec![];
                for j in 0..w - 1 {
                    let seg = batch.segments[r * w + j + 1] as usize;
                    if mask[r * (w - 1) + j] {
                        per_segment.resize(per_segment.len().max(seg), vec![]);
                        per_segment[seg - 1].push(logp[(r * w + j) * v + targets[r * (w - 1) + j] as usize]);
                    }
                }
                per_segment
            })
            .collect()
    };
    let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let bins = align_data::pack_best_fit_decreasing(&lengths, 512).unwrap();
    let packed_lp = segment_logprobs(&packed);
    let mut compared = 0;
    for (r, members) in bins.iter().enumerate() {
        for (k, &i) in members.iter().enumerate() {
            let alone = &segment_logprobs(&pad_right(&[refs[i]], 0))[0][0];
            let in_pack = &packed_lp[r][k];
            assert_eq!(alone.len(), seqs[i].loss_tokens(), "sequence {i}");
            assert_eq!(in_pack.len(), alone.len(), "sequence {i}");
            for (a, b) in in_pack.iter().zip(alone) {
                assert!((a - b).abs() < 2e-5, "sequence {i}: packed {a} vs alone {b}");
            }
            compared += 1;
        }
    }
    assert_eq!(compared, seqs.len());
}

#[test]
fn parallel_tokenisation_equals_sequential() {
    let tok = tokenizer();
    let cfg = DatasetConfig {
        adapter: Some(Adapter::Gsm8kSft),
        ..DatasetConfig::new(root().join("data/gsm8k_train_head.jsonl"))
    };
    let (examples, _) = load_examples(&cfg).unwrap();
    let tc = TokenizeConfig { max_length: Some(300), max_prompt_length: Some(200), ..Default::default() };
    let mut seq_t = ExampleTokenizer::new(&tok, tc.clone());
    let one: Vec<Tokenized> = examples.iter().map(|e| seq_t.tokenize(e).unwrap()).collect();
    let mut par_t = ExampleTokenizer::new(&tok, tc);
    let many = par_t.tokenize_all(&examples, 3).unwrap();
    assert_eq!(one, many);
    assert_eq!(seq_t.stats, par_t.stats);
    assert!(par_t.stats.truncated_rows > 0);
}

#[test]
fn conversational_preference_and_scored_conversations_tokenise() {
    let tok = tokenizer();
    let mut t = ExampleTokenizer::new(&tok, TokenizeConfig::default());
    let ex = Example::Preference {
        prompt: Content::Messages(vec![ChatMessage::new("user", "Best pet?")]),
        chosen: Content::Messages(vec![ChatMessage::new("assistant", "A cat.")]),
        rejected: Content::Messages(vec![ChatMessage::new("assistant", "A rock.")]),
        margin: None,
    };
    let Tokenized::Pair { prompt_ids, chosen_ids, rejected_ids, .. } = t.tokenize(&ex).unwrap() else { panic!() };
    assert_eq!(
        tok.decode(&prompt_ids, false).unwrap(),
        "<|im_start|>user\nBest pet?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(tok.decode(&chosen_ids, false).unwrap(), "A cat.<|im_end|>\n");
    assert_eq!(tok.decode(&rejected_ids, false).unwrap(), "A rock.<|im_end|>\n");

    let scored = Example::ScoredConversation {
        messages: vec![ChatMessage::new("user", "Joke?"), ChatMessage::new("assistant", "Knock knock.")],
        score: 7.5,
        reason: None,
    };
    let s = seq(t.tokenize(&scored).unwrap());
    assert_eq!(masked_text(&tok, &s), "Knock knock.<|im_end|>\n");
}
