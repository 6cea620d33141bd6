//! The reward-model scorer: a sequence-classification network's score of prompt +
//! completion, read where transformers reads it.

use align_data::{HostBatch, TokenizedSequence, pad_right};
use align_model::FusedOps;
use align_model::Transformer;
use align_model::burn::tensor::{Int, Tensor, TensorData};

/// Where transformers' `…ForSequenceClassification` reads each row's score: the last token
/// whose id is not `pad_token_id` (so when pad = EOS, as in SmolLM2, the token before a
/// trailing EOS), else the last real token.
pub fn score_positions(batch: &HostBatch, pad_token_id: Option<u32>) -> Vec<i64> {
    let [b, t] = batch.shape;
    (0..b)
        .map(|r| {
            let row = r * t..(r + 1) * t;
            let real = batch.segments[row.clone()].iter().filter(|&&s| s != 0).count().max(1);
            let ids = &batch.input_ids[row][..real];
            let last = match pad_token_id {
                Some(p) => ids.iter().rposition(|&id| id != p as i64).unwrap_or(real - 1),
                None => real - 1,
            };
            last as i64
        })
        .collect()
}

/// The reward model's score of each row, `[rows]`, read where transformers reads it
/// ([`score_positions`]), so an exported reward model scores the same in both.
pub fn last_token_scores<B: FusedOps>(model: &Transformer<B>, batch: &HostBatch, device: &B::Device) -> Tensor<B, 1> {
    let b = batch.shape[0];
    let last = score_positions(batch, model.config.pad_token_id);
    // Packed when that saves rows: the score reads the same token's hidden state either way.
    let layout = batch.forward_layout(model.config.pad_token_id.unwrap_or(0));
    let hidden = model.forward_hidden(&layout.batch.to_device::<B>(device), None);
    let [rows, t, d] = hidden.dims();
    let at: Vec<i64> = (0..b).map(|r| layout.cell[r * batch.shape[1] + last[r] as usize] as i64).collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(at, [b]), device);
    let states = hidden.reshape([rows * t, d]).select(0, idx).reshape([b, 1, d]);
    model.scores(states).expect("the reward model has a score head").narrow(2, 0, 1).reshape([b])
}

/// Scores of token sequences, `batch_size` right-padded rows per forward, in order.
pub fn score_sequences<B: FusedOps>(
    model: &Transformer<B>,
    seqs: &[&TokenizedSequence],
    pad_id: u32,
    batch_size: usize,
    device: &B::Device,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let s = last_token_scores(model, &pad_right(chunk, pad_id), device);
        out.extend(s.into_data().convert::<f64>().to_vec::<f64>().expect("float data"));
    }
    out
}

/// The reward model as a [`Reward`]: prompt + completion are tokenised as the reward stage
/// tokenised its pairs (the joint text, plus EOS when `append_eos`), scored in batches.
pub struct RewardModelScorer<B: FusedOps> {
    pub name: String,
    pub model: Transformer<B>,
    pub tokenizer: align_model::Tokenizer,
    pub batch_size: usize,
    pub append_eos: bool,
    pub device: B::Device,
}

impl<B: FusedOps> RewardModelScorer<B> {
    /// Load a sequence-classification checkpoint (HF directory or GGUF is refused: a GGUF
    /// has no score head).
    pub fn load(path: &std::path::Path, batch_size: usize, device: &B::Device) -> crate::Result<Self> {
        let heads = align_model::Heads { lm: false, score: true, value: false };
        let pre = align_model::load_pretrained::<B>(path, heads, device)
            .map_err(|source| crate::RewardError::Model { reward: "reward_model".into(), source })?;
        if pre.model.score.is_none() {
            return Err(crate::RewardError::Config(format!(
                "{}: not a reward model (no score head); train one with `align reward`",
                path.display()
            )));
        }
        Ok(RewardModelScorer {
            name: "reward_model".into(),
            model: pre.model,
            tokenizer: pre.tokenizer,
            batch_size,
            append_eos: true,
            device: device.clone(),
        })
    }

    fn tokens(&self, s: &crate::Sample) -> crate::Result<TokenizedSequence> {
        let mut ids = self
            .tokenizer
            .encode(&format!("{}{}", s.prompt, s.completion), false)
            .map_err(|source| crate::RewardError::Model { reward: self.name.clone(), source })?;
        if self.append_eos
            && let Some(e) = self.tokenizer.eos_token_id
        {
            ids.push(e);
        }
        let n = ids.len();
        Ok(TokenizedSequence { input_ids: ids, loss_mask: vec![true; n] })
    }
}

impl<B: FusedOps> crate::Reward for RewardModelScorer<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, s: &crate::Sample) -> crate::Result<crate::RewardOutput> {
        Ok(self.score_batch(std::slice::from_ref(s))?.remove(0))
    }
    fn score_batch(&self, samples: &[crate::Sample]) -> crate::Result<Vec<crate::RewardOutput>> {
        let seqs = samples.iter().map(|s| self.tokens(s)).collect::<crate::Result<Vec<_>>>()?;
        let refs: Vec<&TokenizedSequence> = seqs.iter().collect();
        let pad = self.tokenizer.pad_token_id.or(self.tokenizer.eos_token_id).unwrap_or(0);
        Ok(score_sequences(&self.model, &refs, pad, self.batch_size, &self.device)
            .into_iter()
            .map(crate::RewardOutput::scalar)
            .collect())
    }
}
