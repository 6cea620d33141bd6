//! A stop string spanning two tokens ends the completion at the token that completes it,
//! kept in (or cut from) the text.

use std::path::Path;

use align_model::backend::Cpu;
use align_model::{Heads, load_pretrained};
use align_rollout::{SamplingConfig, generate, generate_text};

#[test]
fn a_stop_string_spanning_two_tokens_stops_there() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama-untied");
    let m = load_pretrained::<Cpu>(&dir, Heads::LM, &Default::default()).unwrap();
    let prompt = m.tokenizer.encode("The answer is", false).unwrap();
    let cfg = SamplingConfig { temperature: 0.0, max_new_tokens: 24, ..Default::default() };
    let free = generate(&m.model, std::slice::from_ref(&prompt), 0, &cfg).unwrap().remove(0).tokens;
    // Tokens 5 and 6 of the greedy continuation, as text: a stop string across two tokens
    // (skip pairs whose text is empty or already appears earlier).
    let (k, stop) = (3..free.len() - 1)
        .find_map(|k| {
            let s = m.tokenizer.decode(&free[k..k + 2], true).unwrap();
            let earlier = m.tokenizer.decode(&free[..k + 1], true).unwrap();
            let single = m.tokenizer.decode(&free[k + 1..k + 2], true).unwrap();
            (s.trim().len() >= 2 && !earlier.contains(&s) && !single.contains(&s)).then_some((k, s))
        })
        .expect("a two-token stop string");
    for keep in [true, false] {
        let out = generate_text(
            &m.model,
            &m.tokenizer,
            std::slice::from_ref(&prompt),
            0,
            &cfg,
            std::slice::from_ref(&stop),
            keep,
        )
        .unwrap()
        .remove(0);
        assert_eq!(out.completion.tokens, free[..k + 2].to_vec(), "stops at the token completing {stop:?}");
        assert!(out.completion.stopped);
        assert_eq!(out.stop_string.as_deref(), Some(stop.as_str()));
        let full = m.tokenizer.decode(&free[..k + 2], true).unwrap();
        let at = full.find(&stop).unwrap();
        let want = if keep { &full[..at + stop.len()] } else { &full[..at] };
        assert_eq!(out.text, want);
    }
}
