//! One weight-name table per architecture: where each tensor lives in transformers' names
//! and in llama.cpp's (GGUF). Loading, export, LoRA target names and GGUF import all read
//! it, so a new architecture is one table here.

use crate::config::Architecture;

/// A tensor of a decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockPart {
    InputNorm,
    /// GPT-2's fused q/k/v (Conv1D `c_attn`).
    Qkv,
    Q,
    K,
    V,
    O,
    QNorm,
    KNorm,
    PostAttentionNorm,
    Gate,
    Up,
    Down,
}

/// The names of one architecture's tensors (module paths, without `.weight` / `.bias`).
#[derive(Debug)]
pub struct NameTable {
    /// The trunk's module (`model`, GPT-2's `transformer`).
    pub prefix: &'static str,
    /// The block list under the prefix (`layers`, GPT-2's `h`).
    pub blocks: &'static str,
    /// `(HF, GGUF)` of the token embeddings, the learned position embeddings (GPT-2) and the
    /// final norm.
    pub embed: (&'static str, &'static str),
    pub position_embed: Option<(&'static str, &'static str)>,
    pub final_norm: (&'static str, &'static str),
    /// `(part, HF path in a block, GGUF name in a block)`.
    pub block: &'static [(BlockPart, &'static str, &'static str)],
    /// The projections LoRA may adapt, in PEFT's order.
    pub lora_targets: &'static [BlockPart],
}

/// Llama, Mistral, Qwen2/3, SmolLM: `model.layers.N.self_attn.q_proj`, …
pub const LLAMA: NameTable = NameTable {
    prefix: "model",
    blocks: "layers",
    embed: ("embed_tokens", "token_embd"),
    position_embed: None,
    final_norm: ("norm", "output_norm"),
    block: &[
        (BlockPart::InputNorm, "input_layernorm", "attn_norm"),
        (BlockPart::Q, "self_attn.q_proj", "attn_q"),
        (BlockPart::K, "self_attn.k_proj", "attn_k"),
        (BlockPart::V, "self_attn.v_proj", "attn_v"),
        (BlockPart::O, "self_attn.o_proj", "attn_output"),
        (BlockPart::QNorm, "self_attn.q_norm", "attn_q_norm"),
        (BlockPart::KNorm, "self_attn.k_norm", "attn_k_norm"),
        (BlockPart::PostAttentionNorm, "post_attention_layernorm", "ffn_norm"),
        (BlockPart::Gate, "mlp.gate_proj", "ffn_gate"),
        (BlockPart::Up, "mlp.up_proj", "ffn_up"),
        (BlockPart::Down, "mlp.down_proj", "ffn_down"),
    ],
    lora_targets: &[
        BlockPart::Q,
        BlockPart::K,
        BlockPart::V,
        BlockPart::O,
        BlockPart::Gate,
        BlockPart::Up,
        BlockPart::Down,
    ],
};

/// GPT-2: `transformer.h.N.attn.c_attn`, Conv1D weights stored `[in, out]`.
pub const GPT2: NameTable = NameTable {
    prefix: "transformer",
    blocks: "h",
    embed: ("wte", "token_embd"),
    position_embed: Some(("wpe", "position_embd")),
    final_norm: ("ln_f", "output_norm"),
    block: &[
        (BlockPart::InputNorm, "ln_1", "attn_norm"),
        (BlockPart::Qkv, "attn.c_attn", "attn_qkv"),
        (BlockPart::O, "attn.c_proj", "attn_output"),
        (BlockPart::PostAttentionNorm, "ln_2", "ffn_norm"),
        (BlockPart::Up, "mlp.c_fc", "ffn_up"),
        (BlockPart::Down, "mlp.c_proj", "ffn_down"),
    ],
    // PEFT's GPT-2 targets: the fused c_attn (one adapter for q, k and v), c_proj, c_fc, c_proj.
    lora_targets: &[BlockPart::Qkv, BlockPart::O, BlockPart::Up, BlockPart::Down],
};

impl NameTable {
    pub fn of(arch: Architecture) -> &'static NameTable {
        match arch {
            Architecture::Gpt2 => &GPT2,
            _ => &LLAMA,
        }
    }

    /// The HF module path of a trunk tensor (`model.embed_tokens`).
    pub fn trunk(&self, module: &str) -> String {
        format!("{}.{module}", self.prefix)
    }

    /// The HF module path of `part` in block `layer`.
    pub fn block(&self, layer: usize, part: BlockPart) -> String {
        let path = self.block.iter().find(|(p, ..)| *p == part).map_or("", |(_, hf, _)| hf);
        format!("{}.{}.{layer}.{path}", self.prefix, self.blocks)
    }

    /// The HF name of a llama.cpp tensor name (`blk.3.attn_q.weight`), if the table has it.
    pub fn hf_from_gguf(&self, gguf: &str) -> Option<String> {
        let (module, kind) = gguf.rsplit_once('.')?;
        let trunk = [Some(self.embed), self.position_embed, Some(self.final_norm)];
        if let Some((hf, _)) = trunk.into_iter().flatten().find(|(_, g)| *g == module) {
            return Some(format!("{}.{hf}.{kind}", self.prefix));
        }
        if module == "output" {
            return Some(format!("lm_head.{kind}"));
        }
        let (layer, tail) = module.strip_prefix("blk.")?.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (part, ..) = self.block.iter().find(|(_, _, g)| *g == tail)?;
        Some(format!("{}.{kind}", self.block(layer, *part)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_transformers_names() {
        let l = NameTable::of(Architecture::Llama);
        assert_eq!(l.hf_from_gguf("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(l.hf_from_gguf("output_norm.weight").as_deref(), Some("model.norm.weight"));
        assert_eq!(l.hf_from_gguf("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(l.hf_from_gguf("blk.11.attn_q.weight").as_deref(), Some("model.layers.11.self_attn.q_proj.weight"));
        assert_eq!(
            l.hf_from_gguf("blk.0.attn_k_norm.weight").as_deref(),
            Some("model.layers.0.self_attn.k_norm.weight")
        );
        assert_eq!(l.hf_from_gguf("blk.2.ffn_gate.weight").as_deref(), Some("model.layers.2.mlp.gate_proj.weight"));
        assert_eq!(l.hf_from_gguf("blk.2.nonsense.weight"), None);
        let g = NameTable::of(Architecture::Gpt2);
        assert_eq!(g.hf_from_gguf("position_embd.weight").as_deref(), Some("transformer.wpe.weight"));
        assert_eq!(g.hf_from_gguf("output_norm.bias").as_deref(), Some("transformer.ln_f.bias"));
        assert_eq!(g.hf_from_gguf("blk.1.attn_qkv.bias").as_deref(), Some("transformer.h.1.attn.c_attn.bias"));
        assert_eq!(g.hf_from_gguf("blk.1.ffn_up.weight").as_deref(), Some("transformer.h.1.mlp.c_fc.weight"));
        assert_eq!(g.block(4, BlockPart::Down), "transformer.h.4.mlp.c_proj");
    }
}
