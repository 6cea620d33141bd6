//! Fluency: how likely a language model (the stage's reference model) finds the
//! completion after the prompt, as a per-token probability in [0, 1].

use std::collections::BTreeMap;

use align_data::{TokenizedSequence, pad_right};
use align_model::burn::tensor::Tensor;
use align_model::{FusedOps, Transformer};

use crate::{Result, Reward, RewardError, RewardOutput, Sample};

/// Per row of `seqs`, the sum of the model's log-probs of its loss tokens (each predicted
/// from the tokens before it) and how many there are; `batch_size` right-padded rows per
/// forward, and the LM head runs on the loss positions alone (as the SFT loss does).
pub fn loss_token_logprobs<B: FusedOps>(
    model: &Transformer<B>,
    seqs: &[&TokenizedSequence],
    pad_id: u32,
    batch_size: usize,
    device: &B::Device,
) -> Vec<(f64, usize)> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let mut sums = vec![(0.0, 0); chunk.len()];
        let batch = pad_right(chunk, pad_id);
        let (targets, mask) = batch.shifted_targets();
        let at = batch.loss_positions(&targets, &mask);
        if !at.rows.is_empty() {
            let hidden = model.forward_hidden(&batch.to_device::<B>(device), None);
            let lp: Tensor<B, 1> = model.logprobs_at(hidden, &at.rows, &at.targets, 1.0, false).logprobs;
            let lp = lp.into_data().convert::<f64>().to_vec::<f64>().expect("float data");
            // `cells` index the `[rows, width − 1]` grid of shifted targets.
            let w = batch.shape[1] - 1;
            for (cell, v) in at.cells.iter().zip(lp) {
                let (sum, n) = &mut sums[cell / w];
                *sum += v;
                *n += 1;
            }
        }
        out.extend(sums);
    }
    out
}

/// Fluency in [0, 1]: `exp(mean log p(completion token | prompt, earlier tokens))` under a
/// causal LM, the geometric-mean token probability, which is 1 / perplexity. With the
/// stage's reference (starting) model it rewards text that model finds natural: the
/// length-normalised LM log-probability that Kann et al. 2018 ("Sentence-Level Fluency
/// Evaluation: References Help, But Can Be Spared!") study as a fluency score; normalised
/// by length, so long replies are not penalised for being long.
///
/// The prompt is tokenised as the policy's prompts are (no special tokens added); the
/// completion is `completion_ids` when given (what the policy sampled, EOS included), else
/// its text tokenised. A prompt that tokenises to nothing leaves the first completion token
/// unscored (nothing predicts it); a completion with no scored token scores 0.
/// Component `mean_logprob` (absent when no token is scored).
pub struct Fluency<B: FusedOps> {
    pub name: String,
    pub model: Transformer<B>,
    pub tokenizer: align_model::Tokenizer,
    pub batch_size: usize,
    pub device: B::Device,
}

impl<B: FusedOps> Fluency<B> {
    /// Load a causal LM (HF directory or GGUF) with its LM head.
    pub fn load(path: &std::path::Path, batch_size: usize, device: &B::Device) -> Result<Self> {
        let pre = align_model::load_pretrained::<B>(path, align_model::Heads::LM, device)
            .map_err(|source| RewardError::Model { reward: "fluency".into(), source })?;
        Ok(Fluency {
            name: "fluency".into(),
            model: pre.model,
            tokenizer: pre.tokenizer,
            batch_size,
            device: device.clone(),
        })
    }

    /// Prompt + completion tokens, the completion in the loss.
    pub fn tokens(&self, s: &Sample) -> Result<TokenizedSequence> {
        let encode = |text: &str| {
            self.tokenizer
                .encode(text, false)
                .map_err(|source| RewardError::Model { reward: self.name.clone(), source })
        };
        let prompt = encode(s.prompt)?;
        let completion = if s.completion_ids.is_empty() { encode(s.completion)? } else { s.completion_ids.to_vec() };
        Ok(TokenizedSequence::completion(&prompt, &completion))
    }
}

impl<B: FusedOps> Reward for Fluency<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, s: &Sample) -> Result<RewardOutput> {
        Ok(self.score_batch(std::slice::from_ref(s))?.remove(0))
    }
    fn score_batch(&self, samples: &[Sample]) -> Result<Vec<RewardOutput>> {
        let seqs = samples.iter().map(|s| self.tokens(s)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&TokenizedSequence> = seqs.iter().collect();
        let pad = self.tokenizer.pad_token_id.or(self.tokenizer.eos_token_id).unwrap_or(0);
        Ok(loss_token_logprobs(&self.model, &refs, pad, self.batch_size, &self.device)
            .into_iter()
            .map(|(sum, n)| match n {
                0 => RewardOutput::scalar(0.0),
                n => {
                    let mean = sum / n as f64;
                    RewardOutput { score: mean.exp(), components: BTreeMap::from([("mean_logprob".into(), mean)]) }
                }
            })
            .collect())
    }
}
