//! The decoder-only transformer: one module for the Llama family (Llama, Mistral, Qwen2,
//! Qwen3, SmolLM) and GPT-2, written once for any Burn backend.
//!
//! ```text
//! h = embed(ids) [+ wpe(pos)]                       GPT-2 learns absolute positions
//! for each block:
//!     h = h + o(attn(rope(q(norm1 h)), rope(k(..)), v(..)))   causal, GQA, per-segment
//!     h = h + mlp(norm2 h)                           SwiGLU (Llama) or gelu_new (GPT-2)
//! logits = lm_head(norm h)                           or h @ embedᵀ when tied
//! ```
//!
//! Attention is restricted by *segment ids*: a query sees keys at or before it with the same
//! segment id. Left padding is segment 0 (pads only see pads, so no row is empty and real
//! tokens never see pads); packed sequences are segments 1, 2, …

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::{Dropout, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::{Bool, FloatDType, IndexingUpdateOp, Int, Tensor, TensorData};

use align_kernels::{
    FusedOps, HeadLogprobs, PackedMatrix, PackedWeight, lora_linear, masked_attention, packed_linear, rms_norm, swiglu,
};

use crate::config::{ModelConfig, RopeScaling};

/// RMSNorm (Llama) or LayerNorm with bias (GPT-2), over the last dimension.
#[derive(Module, Debug)]
pub struct Norm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    /// Present for LayerNorm only.
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub eps: f64,
    /// Subtract the mean first (LayerNorm) or not (RMSNorm).
    pub center: bool,
}

impl<B: FusedOps> Norm<B> {
    /// Normalised in f32 whatever the activations' dtype (bf16 training), then cast back
    /// before the weight, as transformers' `LlamaRMSNorm` does. RMSNorm runs as one fused
    /// op (`align_kernels::rms_norm`).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if !self.center && self.bias.is_none() {
            return rms_norm(x, self.weight.val(), self.eps);
        }
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let x = if self.center { x.clone() - x.mean_dim(D - 1) } else { x };
        let rms = (x.clone().square().mean_dim(D - 1) + self.eps).sqrt();
        let y = (x / rms).cast(dtype) * self.weight.val().unsqueeze();
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }
}

/// Multi-head attention with grouped key/value heads and rotary (or no) positions.
///
/// Queries, keys and values come from three projections (the Llama family) or from one
/// fused projection (GPT-2's Conv1D `c_attn`, `[q | k | v]` along its output), as the
/// checkpoint holds them: a LoRA adapter on `c_attn` is then one module, as in PEFT (one `A`
/// shared by q, k and v, `B`'s output rows q, k, v in that order).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// GPT-2's fused `c_attn` (`[hidden, 3 · heads · head_dim]`); `None` for the Llama family.
    pub qkv_proj: Option<Proj<B>>,
    /// The Llama family's separate projections; `None` when `qkv_proj` is fused.
    pub q_proj: Option<Proj<B>>,
    pub k_proj: Option<Proj<B>>,
    pub v_proj: Option<Proj<B>>,
    pub o_proj: Proj<B>,
    /// Qwen3's RMSNorm over each head of q and k.
    pub q_norm: Option<Norm<B>>,
    pub k_norm: Option<Norm<B>>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// The feed-forward block: `down(act(gate x) * up x)` (SwiGLU) when there is a gate,
/// else `down(gelu_new(up x))` (GPT-2).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Option<Proj<B>>,
    pub up_proj: Proj<B>,
    pub down_proj: Proj<B>,
}

impl<B: FusedOps> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = match &self.gate_proj {
            Some(gate) => swiglu(gate.forward(x.clone()), self.up_proj.forward(x)),
            None => gelu_new(self.up_proj.forward(x)),
        };
        self.down_proj.forward(h)
    }
}

/// A linear layer over `[batch, seq, d]` as one 2-D product (`align_kernels::matmul`, a
/// system BLAS on CPU when there is one): Burn backends run a 3-D input as one small
/// matmul per batch row, re-reading the weight each time (6x slower for batch-8 decoding
/// on CPU).
pub fn linear<B: FusedOps>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let y = align_kernels::matmul(x.reshape([b * t, d]), layer.weight.val());
    let y = match &layer.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    };
    let n = y.dims()[1];
    y.reshape([b, t, n])
}

/// A projection inside a block: a base weight plus, optionally, a trainable low-rank
/// delta `scale · dropout(x) A B` (LoRA; align-lora attaches, saves and merges it). The
/// base is dense (`linear`, `[in, out]`, Burn's layout) or, frozen under LoRA, kept
/// quantised (`packed`: QLoRA; `align_kernels::quant`). Exactly one of the two is set.
#[derive(Module, Debug)]
pub struct Proj<B: Backend> {
    pub linear: Option<Linear<B>>,
    pub packed: Option<PackedLinear<B>>,
    pub adapter: Option<LowRank<B>>,
}

/// A frozen base kept quantised (`[out, in]` blocks), shared by every copy of the module,
/// and its bias.
#[derive(Module, Debug)]
pub struct PackedLinear<B: Backend> {
    #[module(skip)]
    pub weight: PackedWeight,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

/// `scale · dropout(x) · a · b`, with `a: [in, r]`, `b: [r, out]`.
#[derive(Module, Debug)]
pub struct LowRank<B: Backend> {
    pub a: Param<Tensor<B, 2>>,
    pub b: Param<Tensor<B, 2>>,
    pub scale: f64,
    pub dropout: Dropout,
    /// Off: the projection is the base layer alone (e.g. the reference model under LoRA).
    pub enabled: bool,
    /// The delta has been added into the base weight (so it is not added again).
    pub merged: bool,
}

impl<B: Backend> Proj<B> {
    /// A dense projection.
    pub fn new(linear: Linear<B>) -> Self {
        Proj { linear: Some(linear), packed: None, adapter: None }
    }

    /// A frozen projection whose base stays quantised.
    pub fn packed(weight: PackedMatrix, bias: Option<Param<Tensor<B, 1>>>) -> Self {
        Proj { linear: None, packed: Some(PackedLinear { weight: PackedWeight::new(weight), bias }), adapter: None }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match (&self.linear, &self.packed) {
            (Some(l), _) => l.weight.dims(),
            (None, Some(p)) => {
                let [out, d_in] = p.weight.0.shape();
                [d_in, out]
            }
            (None, None) => [0, 0],
        }
    }

    /// The bias, dense or packed base alike.
    pub fn bias(&self) -> Option<&Param<Tensor<B, 1>>> {
        match (&self.linear, &self.packed) {
            (Some(l), _) => l.bias.as_ref(),
            (None, Some(p)) => p.bias.as_ref(),
            (None, None) => None,
        }
    }

    /// The base weight as a dense `[in, out]` tensor on `device` (dequantised when packed).
    pub fn base_weight(&self, device: &B::Device) -> Tensor<B, 2> {
        match (&self.linear, &self.packed) {
            (Some(l), _) => l.weight.val(),
            (None, Some(p)) => {
                align_kernels::quant::dequantized::<B>(&p.weight, device, burn::tensor::DType::F32).transpose()
            }
            (None, None) => Tensor::zeros([0, 0], device),
        }
    }

    /// Replace the base with a dense, frozen `w: [in, out]`, keeping the bias (a merge
    /// into a packed base dequantises it).
    pub fn set_base_weight(&mut self, w: Tensor<B, 2>) {
        let bias = self.bias().cloned();
        self.linear = Some(Linear { weight: Param::from_tensor(w.detach()).set_require_grad(false), bias });
        self.packed = None;
    }
}

impl<B: FusedOps> Proj<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let x = x.reshape([b * t, d]);
        let active = self.adapter.as_ref().filter(|ad| ad.enabled && !ad.merged);
        let (y, bias) = match (&self.linear, &self.packed) {
            (Some(l), _) => {
                let y = match active {
                    // Without dropout and with a frozen base: one fused node (`lora_linear`).
                    Some(ad) if ad.dropout.prob == 0.0 && !l.weight.val().is_require_grad() => {
                        lora_linear(x, l.weight.val(), ad.a.val(), ad.b.val(), ad.scale)
                    }
                    // Composed from Burn ops (LoRA dropout, or a trainable base).
                    Some(ad) => align_kernels::matmul(x.clone(), l.weight.val()) + low_rank(ad, x),
                    None => align_kernels::matmul(x, l.weight.val()),
                };
                (y, &l.bias)
            }
            (None, Some(p)) => {
                let y = match active {
                    // The delta rides in the packed node, as in `lora_linear`.
                    Some(ad) if ad.dropout.prob == 0.0 => {
                        packed_linear(x, &p.weight, Some((ad.a.val(), ad.b.val(), ad.scale)))
                    }
                    Some(ad) => packed_linear(x.clone(), &p.weight, None) + low_rank(ad, x),
                    None => packed_linear(x, &p.weight, None),
                };
                (y, &p.bias)
            }
            (None, None) => unreachable!("Proj::new and Proj::packed set one base"),
        };
        let y = match bias {
            Some(bias) => y + bias.val().unsqueeze(),
            None => y,
        };
        let n = y.dims()[1];
        y.reshape([b, t, n])
    }
}

/// `scale · dropout(x) A B` over `x: [n, in]`.
fn low_rank<B: FusedOps>(ad: &LowRank<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let dropped = crate::rng::dropout::apply(x, ad.dropout.prob);
    dropped.matmul(ad.a.val()).matmul(ad.b.val()) * ad.scale
}

/// GPT-2's tanh approximation of GELU.
pub fn gelu_new<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let c = (2.0f64 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715) * c;
    x * (inner.tanh() + 1.0) * 0.5
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub input_layernorm: Norm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: Norm<B>,
    pub mlp: Mlp<B>,
}

/// Keys and values of the positions seen so far, per layer, for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// `[batch, kv_heads, len, head_dim]` per layer, before the GQA repeat.
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// Segment id of every cached position, `[batch, len]`.
    segments: Option<Tensor<B, 2, Int>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(n_layers: usize) -> Self {
        KvCache { layers: vec![None; n_layers], segments: None, len: 0 }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache of a one-row batch repeated for `n` rows: a shared prefix (a multiple-choice
    /// context, a prompt sampled G times) computed once, continued by `n` rows.
    pub fn repeat_batch(&self, n: usize) -> Self {
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| l.as_ref().map(|(k, v)| (k.clone().repeat_dim(0, n), v.clone().repeat_dim(0, n))))
                .collect(),
            segments: self.segments.as_ref().map(|s| s.clone().repeat_dim(0, n)),
            len: self.len,
        }
    }
}

/// A batch of token ids with their positions and segment ids, all `[batch, seq]`.
#[derive(Debug, Clone)]
pub struct TokenBatch<B: Backend> {
    pub input_ids: Tensor<B, 2, Int>,
    pub positions: Tensor<B, 2, Int>,
    pub segments: Tensor<B, 2, Int>,
}

impl<B: Backend> TokenBatch<B> {
    /// One unpadded sequence.
    pub fn single(ids: &[u32], device: &B::Device) -> Self {
        Self::left_padded(&[ids.to_vec()], 0, device)
    }

    /// Sequences left-padded to a common length (for generation). Positions count real
    /// tokens only, so each row sees exactly what it would alone.
    pub fn left_padded(seqs: &[Vec<u32>], pad_id: u32, device: &B::Device) -> Self {
        Self::padded(seqs, pad_id, true, device)
    }

    /// Sequences right-padded to a common length (for training and scoring).
    pub fn right_padded(seqs: &[Vec<u32>], pad_id: u32, device: &B::Device) -> Self {
        Self::padded(seqs, pad_id, false, device)
    }

    /// Padding is segment 0 at position 0; each sequence is segment 1 from position 0.
    fn padded(seqs: &[Vec<u32>], pad_id: u32, left: bool, device: &B::Device) -> Self {
        let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut pos, mut seg) = (Vec::new(), Vec::new(), Vec::new());
        for s in seqs {
            let pad = width - s.len();
            let mut row_ids: Vec<i64> = s.iter().map(|&t| t as i64).collect();
            let mut row_pos: Vec<i64> = (0..s.len() as i64).collect();
            let mut row_seg = vec![1i64; s.len()];
            let at = if left { 0 } else { s.len() };
            row_ids.splice(at..at, std::iter::repeat_n(pad_id as i64, pad));
            row_pos.splice(at..at, std::iter::repeat_n(0, pad));
            row_seg.splice(at..at, std::iter::repeat_n(0, pad));
            ids.extend(row_ids);
            pos.extend(row_pos);
            seg.extend(row_seg);
        }
        Self::from_host(ids, pos, seg, [seqs.len(), width], device)
    }

    /// The next token of each row during decoding, continuing `positions` (`[batch]`).
    pub fn next_tokens(ids: &[u32], positions: &[i64], device: &B::Device) -> Self {
        let b = ids.len();
        Self::from_host(ids.iter().map(|&t| t as i64).collect(), positions.to_vec(), vec![1; b], [b, 1], device)
    }

    pub fn from_host(ids: Vec<i64>, pos: Vec<i64>, seg: Vec<i64>, shape: [usize; 2], device: &B::Device) -> Self {
        let t = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device);
        TokenBatch { input_ids: t(ids), positions: t(pos), segments: t(seg) }
    }

    pub fn dims(&self) -> [usize; 2] {
        self.input_ids.dims()
    }
}

/// The rotary `(cos, sin)` (`[batch, seq, head_dim]`; `None` for GPT-2) and the
/// attention mask (`[batch, kv_heads, groups · seq, keys]`, `true` = masked) every block of
/// a forward pass reads.
#[derive(Debug, Clone)]
pub struct BlockContext<B: Backend> {
    pub rope: Option<(Tensor<B, 3>, Tensor<B, 3>)>,
    pub mask: Tensor<B, 4, Bool>,
}

/// The whole network: embeddings, blocks, final norm, and the heads it was built with.
#[derive(Module, Debug)]
pub struct Transformer<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// GPT-2's learned absolute positions `[max_positions, hidden]`.
    pub position_embeddings: Option<Param<Tensor<B, 2>>>,
    pub layers: Vec<Block<B>>,
    pub norm: Norm<B>,
    /// `None` when the output projection is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    /// Sequence-classification head (`score.weight`, no bias): the reward model.
    pub score: Option<Linear<B>>,
    /// Scalar value head with bias (TRL's `v_head.summary`): a PPO critic on this trunk.
    pub value_head: Option<Linear<B>>,
    /// RoPE inverse frequencies `[head_dim / 2]`; `None` for GPT-2.
    pub inv_freq: Option<Tensor<B, 1>>,
    #[module(skip)]
    pub config: ModelConfig,
}

impl<B: Backend> Transformer<B> {
    /// Token (and, for GPT-2, position) embeddings of a batch, `[batch, seq, hidden]`.
    pub fn embed(&self, batch: &TokenBatch<B>) -> Tensor<B, 3> {
        let h = embedding(self.embed_tokens.val(), batch.input_ids.clone());
        match &self.position_embeddings {
            Some(wpe) => h + embedding(wpe.val(), batch.positions.clone()),
            None => h,
        }
    }

    /// What every block of one forward pass shares: the rotary angles of the batch's
    /// positions and the attention mask against `key_segments` (the cached keys' segments,
    /// then the batch's), with `past` positions already cached.
    pub fn block_context(
        &self,
        batch: &TokenBatch<B>,
        key_segments: Tensor<B, 2, Int>,
        past: usize,
        dtype: burn::tensor::DType,
    ) -> BlockContext<B> {
        let t = batch.dims()[1];
        let device = batch.input_ids.device();
        let rope = self.inv_freq.as_ref().map(|inv| {
            let (cos, sin) = rope_cos_sin(inv.clone(), batch.positions.clone());
            (cos.cast(dtype), sin.cast(dtype))
        });
        let c = &self.config;
        let mask = attention_mask::<B>(batch.segments.clone(), key_segments, past, &device);
        // Built once for all layers, in the grouped-query layout `Attention` uses.
        let groups = c.num_attention_heads / c.num_key_value_heads;
        let [b, _, _, tk] = mask.dims();
        let mask = mask.unsqueeze_dim::<5>(2).expand([b, c.num_key_value_heads, groups, t, tk]).reshape([
            b,
            c.num_key_value_heads,
            groups * t,
            tk,
        ]);
        BlockContext { rope, mask }
    }

    /// Every block projection with its HF module name (`model.layers.3.self_attn.q_proj`;
    /// GPT-2: `transformer.h.3.attn.c_attn`, the fused q/k/v, `attn.c_proj`, `mlp.c_fc`,
    /// `mlp.c_proj`).
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Proj<B>)> {
        use crate::names::{BlockPart, NameTable};
        let names = NameTable::of(self.config.architecture);
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            let parts = [
                (BlockPart::Qkv, a.qkv_proj.as_mut()),
                (BlockPart::Q, a.q_proj.as_mut()),
                (BlockPart::K, a.k_proj.as_mut()),
                (BlockPart::V, a.v_proj.as_mut()),
                (BlockPart::O, Some(&mut a.o_proj)),
                (BlockPart::Gate, m.gate_proj.as_mut()),
                (BlockPart::Up, Some(&mut m.up_proj)),
                (BlockPart::Down, Some(&mut m.down_proj)),
            ];
            for (part, proj) in parts {
                if let Some(p) = proj.filter(|_| names.lora_targets.contains(&part)) {
                    out.push((names.block(i, part), p));
                }
            }
        }
        out
    }

    /// How many block projections keep a packed (quantised) base, and its bytes.
    pub fn packed_size(&self) -> (usize, usize) {
        let mut found = (0, 0);
        for l in &self.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            let optional = [&a.qkv_proj, &a.q_proj, &a.k_proj, &a.v_proj, &m.gate_proj];
            let all = [&a.o_proj, &m.up_proj, &m.down_proj].into_iter().chain(optional.into_iter().flatten());
            for p in all {
                if let Some(packed) = &p.packed {
                    found = (found.0 + 1, found.1 + packed.weight.0.stored_bytes());
                }
            }
        }
        found
    }

    /// Turn every attached low-rank adapter on or off.
    pub fn set_adapters_enabled(&mut self, enabled: bool) {
        for (_, p) in self.projections_mut() {
            if let Some(a) = p.adapter.as_mut() {
                a.enabled = enabled;
            }
        }
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.layers.len())
    }
}

impl<B: FusedOps> Transformer<B> {
    /// Next-token logits `[batch, seq, vocab]` from final hidden states.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = hidden.dims();
        let x = hidden.reshape([b * t, d]);
        // `w_t` is the projection as `[vocab, hidden]`.
        let (w_t, bias) = self.head_weight();
        let v = w_t.dims()[0];
        // For a few rows (decoding), `(W xᵀ)ᵀ` runs ~3x faster on CPU than `x Wᵀ` with a
        // 49k-wide output; for many rows the plain product is faster.
        let y = if b * t <= 64 {
            align_kernels::matmul(w_t, x.transpose()).transpose()
        } else {
            align_kernels::matmul(x, w_t.transpose())
        };
        let y = match bias {
            Some(bias) => y + bias.unsqueeze(),
            None => y,
        };
        y.reshape([b, t, v])
    }

    /// The LM head as `[vocab, hidden]` and its bias.
    fn head_weight(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        match &self.lm_head {
            Some(head) => (head.weight.val().transpose(), head.bias.as_ref().map(|b| b.val())),
            None => (self.embed_tokens.val(), None),
        }
    }

    /// Score-head outputs `[batch, seq, num_labels]` in f32; `None` if built without one.
    pub fn scores(&self, hidden: Tensor<B, 3>) -> Option<Tensor<B, 3>> {
        self.score.as_ref().map(|s| linear(s, hidden).cast(FloatDType::F32))
    }

    /// Value-head outputs `[batch, seq]` in f32; `None` if built without one.
    pub fn values(&self, hidden: Tensor<B, 3>) -> Option<Tensor<B, 2>> {
        self.value_head.as_ref().map(|v| linear(v, hidden).squeeze_dim(2).cast(FloatDType::F32))
    }

    /// Final hidden states `[batch, seq, hidden]` (after the last norm). With a cache, the
    /// batch continues the cached positions and its keys/values are appended.
    pub fn forward_hidden(&self, batch: &TokenBatch<B>, mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let mut h = self.embed(batch);
        let past = cache.as_ref().map_or(0, |c| c.len);
        let key_segments = match cache.as_ref().and_then(|c| c.segments.clone()) {
            Some(s) => Tensor::cat(vec![s, batch.segments.clone()], 1),
            None => batch.segments.clone(),
        };
        let ctx = self.block_context(batch, key_segments.clone(), past, h.dtype());
        for (i, layer) in self.layers.iter().enumerate() {
            let x = layer.input_layernorm.forward(h.clone());
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            h = h + layer.self_attn.forward(x, ctx.rope.as_ref(), ctx.mask.clone(), layer_cache);
            let x = layer.post_attention_layernorm.forward(h.clone());
            h = h + layer.mlp.forward(x);
        }
        if let Some(c) = cache {
            c.segments = Some(key_segments);
            c.len = past + batch.dims()[1];
        }
        self.norm.forward(h)
    }

    /// Logits for a batch (no cache).
    pub fn forward(&self, batch: &TokenBatch<B>) -> Tensor<B, 3> {
        self.logits(self.forward_hidden(batch, None))
    }

    /// Next-token log-probs (at `temperature`) where a loss reads them, without forming the
    /// logits of any other position: `rows` index the flattened `[batch, seq]` hidden states
    /// and `targets[i]` is the token that row `rows[i]` predicts. The head runs as one fused,
    /// chunked op (`align_kernels::linear_logprobs`): never more than a chunk of
    /// `[rows, vocab]` logits, forward or backward.
    pub fn logprobs_at(
        &self,
        hidden: Tensor<B, 3>,
        rows: &[usize],
        targets: &[i64],
        temperature: f32,
        with_entropy: bool,
    ) -> HeadLogprobs<B> {
        debug_assert_eq!(rows.len(), targets.len());
        let [b, t, d] = hidden.dims();
        let device = hidden.device();
        let index = |v: Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), &device);
        let x = hidden.reshape([b * t, d]).select(0, index(rows.iter().map(|&r| r as i64).collect()));
        let (w, bias) = self.head_weight();
        // A head bias rides along as one more input column: x' = [x, 1], w' = [w, b].
        let (x, w) = match bias {
            Some(bias) => {
                let ones = Tensor::<B, 2>::ones([rows.len(), 1], &device).cast(x.dtype());
                (Tensor::cat(vec![x, ones], 1), Tensor::cat(vec![w, bias.unsqueeze_dim(1)], 1))
            }
            None => (x, w),
        };
        align_kernels::linear_logprobs(x, w, index(targets.to_vec()), temperature, with_entropy)
    }
}

/// Values computed at some cells of a `[batch, width]` grid (flattened indices `at`) placed
/// in a zero grid, differentiably: how per-position log-probs computed only where a loss
/// reads them return to the `[batch, width]` layout the losses take.
pub fn spread_rows<B: Backend>(values: Tensor<B, 1>, at: &[usize], shape: [usize; 2]) -> Tensor<B, 2> {
    let device = values.device();
    let index =
        Tensor::<B, 1, Int>::from_data(TensorData::new(at.iter().map(|&i| i as i64).collect(), [at.len()]), &device);
    Tensor::<B, 1>::zeros([shape[0] * shape[1]], &device)
        .cast(values.dtype())
        .select_assign(0, index, values, IndexingUpdateOp::Add)
        .reshape(shape)
}

/// `cos` and `sin` of every position's rotary angles, `[batch, seq, head_dim]`.
/// Computed in f32 as transformers does (it disables autocast for this step), so the
/// angles match a float64 reference run to f32 rounding.
fn rope_cos_sin<B: Backend>(inv_freq: Tensor<B, 1>, positions: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let [b, t] = positions.dims();
    let half = inv_freq.dims()[0];
    let freqs = positions.float().reshape([b, t, 1]) * inv_freq.reshape([1, 1, half]);
    let emb = Tensor::cat(vec![freqs.clone(), freqs], 2);
    (emb.clone().cos(), emb.sin())
}

/// Boolean mask `[batch, 1, q, k]`, `true` where attention is *not* allowed: a key
/// after the query, or in another segment.
fn attention_mask<B: Backend>(
    query_segments: Tensor<B, 2, Int>,
    key_segments: Tensor<B, 2, Int>,
    past: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let [b, tq] = query_segments.dims();
    let tk = key_segments.dims()[1];
    let q_idx =
        Tensor::<B, 1, Int>::arange(past as i64..(past + tq) as i64, device).reshape([1, tq, 1]).expand([b, tq, tk]);
    let k_idx = Tensor::<B, 1, Int>::arange(0..tk as i64, device).reshape([1, 1, tk]).expand([b, tq, tk]);
    let future = k_idx.greater(q_idx);
    let qs = query_segments.reshape([b, tq, 1]).expand([b, tq, tk]);
    let ks = key_segments.reshape([b, 1, tk]).expand([b, tq, tk]);
    let other_segment = qs.not_equal(ks);
    future.bool_or(other_segment).reshape([b, 1, tq, tk])
}

impl<B: FusedOps> Attention<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: Option<&(Tensor<B, 3>, Tensor<B, 3>)>,
        // `[batch, kv_heads, groups * seq, keys]`, built once per forward.
        mask: Tensor<B, 4, Bool>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // Heads split as [b, t, heads, hd] (the projection's own layout), normed (Qwen3) and
        // rotated there, then moved to [b, heads, t, hd].
        let split = |y: Tensor<B, 3>, n: usize, norm: Option<&Norm<B>>, rotate: bool| {
            let y = y.reshape([b, t, n, hd]);
            let y = match norm {
                Some(norm) => norm.forward(y),
                None => y,
            };
            let y = match rope {
                Some((cos, sin)) if rotate => align_kernels::rope(y, cos.clone(), sin.clone()),
                _ => y,
            };
            y.swap_dims(1, 2)
        };
        let (q, k, v) = match (&self.q_proj, &self.k_proj, &self.v_proj, &self.qkv_proj) {
            (Some(q), Some(k), Some(v), _) => (
                split(q.forward(x.clone()), nh, self.q_norm.as_ref(), true),
                split(k.forward(x.clone()), nkv, self.k_norm.as_ref(), true),
                split(v.forward(x), nkv, None, false),
            ),
            // GPT-2: one product, its output columns q | k | v.
            (.., Some(qkv)) => {
                let y = qkv.forward(x);
                let (nq, nk) = (nh * hd, nkv * hd);
                (
                    split(y.clone().narrow(2, 0, nq), nh, self.q_norm.as_ref(), true),
                    split(y.clone().narrow(2, nq, nk), nkv, self.k_norm.as_ref(), true),
                    split(y.narrow(2, nq + nk, nk), nkv, None, false),
                )
            }
            _ => unreachable!("attention is built with q, k and v projections or a fused one"),
        };
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        // GQA without copying keys/values: the `groups` query heads that share a kv head
        // (heads kv*groups .. kv*groups+groups, as transformers' repeat_kv pairs them) are
        // stacked along the query axis and attend to that kv head once.
        let groups = nh / nkv;
        let q = q.reshape([b, nkv, groups * t, hd]);
        let out = masked_attention(q, k, v, mask).reshape([b, nh, t, hd]);
        self.o_proj.forward(out.swap_dims(1, 2).reshape([b, t, nh * hd]))
    }
}

/// RoPE inverse frequencies for a config, in f32 as transformers computes them.
pub fn rope_inv_freq(config: &ModelConfig) -> Option<Vec<f32>> {
    let rope = config.rope.as_ref()?;
    let d = config.head_dim;
    let base = rope.theta as f32;
    let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32)).collect();
    Some(match &rope.scaling {
        RopeScaling::Default => inv,
        RopeScaling::Linear { factor } => inv.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, lo, hi) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
            let old = *original_max_position_embeddings as f32;
            let (low_wavelen, high_wavelen) = (old / lo, old / hi);
            inv.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                    if medium {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    })
}

/// Casts every float parameter of a module to `dtype` (bf16 training keeps the weights in
/// bf16 and its f32 masters in the optimizer). Trainable parameters stay trainable; the
/// RoPE frequencies are a constant and stay f32.
pub fn cast_float<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl<B: Backend> ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let trainable = tensor.is_require_grad();
            let t = tensor.cast(self.0).detach();
            Param::from_mapped_value(id, if trainable { t.require_grad() } else { t }, mapper)
        }
    }
    module.map(&mut Cast(dtype))
}
