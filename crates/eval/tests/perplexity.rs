//! Rolling perplexity: one window equals a direct forward from the start token; windows
//! predict every token once.

use std::path::Path;

use align_eval::perplexity::perplexity;
use align_model::backend::Cpu;
use align_model::burn::tensor::activation::log_softmax;
use align_model::{Heads, TokenBatch, load_pretrained};

#[test]
fn one_window_is_a_direct_forward() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama-untied");
    let m = load_pretrained::<Cpu>(&dir, Heads::LM, &Default::default()).unwrap();
    let text = "The quick brown fox jumps over the lazy dog.".to_string();
    let ids = m.tokenizer.encode(&text, false).unwrap();
    let start = m.tokenizer.bos_token_id.or(m.tokenizer.eos_token_id).unwrap();
    let row: Vec<u32> = std::iter::once(start).chain(ids.iter().copied()).collect();
    let batch = TokenBatch::<Cpu>::single(&row, &Default::default());
    let lp: Vec<f32> = log_softmax(m.model.forward(&batch), 2).into_data().to_vec().unwrap();
    let v = m.model.config.vocab_size;
    let direct: f64 = (0..ids.len()).map(|i| -(lp[i * v + ids[i] as usize] as f64)).sum();
    let s =
        perplexity(&m.model, &m.tokenizer, std::slice::from_ref(&text), 1024, 4, &Default::default(), |_| {}).unwrap();
    assert_eq!(s.tokens, ids.len());
    assert!((s.nll - direct).abs() < 1e-3, "{} vs {direct}", s.nll);
    assert!((s.token_perplexity - (direct / ids.len() as f64).exp()).abs() < 1e-3);
    // Short windows still predict every token once (with less context).
    let w = perplexity(&m.model, &m.tokenizer, std::slice::from_ref(&text), 3, 4, &Default::default(), |_| {}).unwrap();
    assert_eq!(w.tokens, ids.len());
    assert!(w.nll.is_finite() && (w.nll - direct).abs() > 1e-6);
}
