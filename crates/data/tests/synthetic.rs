//! The demo task: reproducible from its seed, correct answers, every word in the
//! vocabulary, and rows that load as the schemas the stages read.

use align_data::synthetic::{
    ReplyKind, arithmetic_problems, arithmetic_vocabulary, preference_rows, prompt_answer_rows,
    scored_conversation_rows, sft_rows,
};
use align_data::{DatasetConfig, Example, load_examples};

#[test]
fn problems_are_reproducible_correct_and_covered_by_the_vocabulary() {
    let a = arithmetic_problems(3, 300, 20);
    assert_eq!(a, arithmetic_problems(3, 300, 20));
    assert_ne!(a, arithmetic_problems(4, 300, 20));
    let vocab: std::collections::HashSet<String> = arithmetic_vocabulary(20).into_iter().collect();
    for p in &a {
        let c = match p.op {
            '+' => p.a + p.b,
            '-' => p.a - p.b,
            _ => p.a * p.b,
        };
        assert_eq!(p.answer(), c);
        assert!(p.answer() >= 0);
        let text = format!("{}{}", p.prompt(), p.solution());
        for w in text.split_whitespace() {
            assert!(vocab.contains(w), "{w:?} of {text:?} is not in the vocabulary");
        }
        let graded = align_reward_free_grade(&p.solution(), p.answer());
        assert!(graded, "{}", p.solution());
    }
    for op in ['+', '-', '*'] {
        assert!(a.iter().any(|p| p.op == op), "{op} appears");
    }
    // The word-level tokenizer over this vocabulary gives the text back.
    let tok = align_model::Tokenizer::word_level(&arithmetic_vocabulary(20)).unwrap();
    let text = format!("{}{}", a[0].prompt(), a[0].solution());
    let ids = tok.encode(&text, false).unwrap();
    assert!(!ids.contains(&0), "no unknown words");
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
}

/// The r1_zero format condition, without depending on align-reward (data sits below it).
fn align_reward_free_grade(solution: &str, answer: i64) -> bool {
    solution.contains("</think> <answer>") && solution.trim_end().ends_with(&format!("<answer> {answer} </answer>"))
}

#[test]
fn rows_load_as_the_stage_schemas() {
    let problems = arithmetic_problems(9, 20, 20);
    let dir = std::env::temp_dir().join(format!("align-synthetic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, rows: Vec<serde_json::Value>| {
        let f = dir.join(name);
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(&f, text).unwrap();
        load_examples(&DatasetConfig::new(&f)).unwrap().0
    };
    let sft = write("sft.jsonl", sft_rows(&problems));
    assert!(sft.iter().all(|e| matches!(e, Example::PromptCompletion { .. })));
    let pref = write("pref.jsonl", preference_rows(&problems, 1, 5));
    for e in &pref {
        match e {
            Example::Preference { chosen, rejected, .. } => assert_ne!(chosen, rejected),
            other => panic!("{other:?}"),
        }
    }
    let rl = write("rl.jsonl", prompt_answer_rows(&problems));
    assert!(rl.iter().all(|e| matches!(e, Example::PromptAnswer { .. })));
    // Scored conversations: the score follows the reply (worked 5, bare 3, wrong 1), every
    // word of reply and reason is in the vocabulary, and the reason names the right answer.
    let rows = scored_conversation_rows(&problems, 2, 5);
    let scored = write("scored.jsonl", rows);
    let vocab: std::collections::HashSet<String> = arithmetic_vocabulary(20).into_iter().collect();
    for (i, (e, p)) in scored.iter().zip(&problems).enumerate() {
        let Example::ScoredConversation { messages, score, reason: Some(reason) } = e else { panic!("{e:?}") };
        let kind = [ReplyKind::Worked, ReplyKind::Bare, ReplyKind::Wrong][i % 3];
        assert_eq!(*score, kind.score());
        let reply = &messages[1].content;
        let right = align_reward_free_grade(&format!(" {reply}"), p.answer());
        assert_eq!(right, kind != ReplyKind::Wrong, "{reply}");
        assert_eq!(reply.contains('='), kind != ReplyKind::Bare, "{reply}");
        assert!(reason.contains(&p.answer().to_string()) || kind == ReplyKind::Worked && reason.contains("right"));
        for w in format!("{} {reply} {reason}", messages[0].content).split_whitespace() {
            assert!(vocab.contains(w), "{w:?} is not in the vocabulary");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
