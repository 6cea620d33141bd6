"""The tiny Llama checkpoint (fixtures/models/llama-untied) as a GGUF file whose block
projections are quantised the way llama.cpp stores them, for the GGUF-native (packed base)
tests: attention q/k/down in Q8_0, v/o in Q4_1, gate/up in Q4_0; embeddings, norms and the
LM head in F32. q/k rows are permuted as llama.cpp's converter does.

Usage:
    $VENV/bin/python xtask/scripts/make_tiny_gguf.py --out fixtures/gguf/llama-untied-mixed.gguf

Needs numpy, safetensors and gguf (llama.cpp's Python package).
"""

import argparse
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants
from safetensors.numpy import load_file


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf `permute`: the two rotary halves of each head interleaved.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fixtures/models/llama-untied")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    tok = json.load(open(os.path.join(args.model, "tokenizer.json")))
    weights = load_file(os.path.join(args.model, "model.safetensors"))

    w = GGUFWriter(args.out, arch="llama")
    w.add_name("llama-untied-mixed")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])

    # Byte-level BPE, as tokenizer.json has it.
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    added = {a["id"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])

    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    kinds = {"q_proj": T.Q8_0, "k_proj": T.Q8_0, "v_proj": T.Q4_1, "o_proj": T.Q4_1,
             "gate_proj": T.Q4_0, "up_proj": T.Q4_0, "down_proj": T.Q8_0}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}

    def put(name: str, t: np.ndarray, kind=T.F32) -> None:
        t = t.astype(np.float32)
        if kind == T.F32:
            w.add_tensor(name, t)
        else:
            w.add_tensor(name, quants.quantize(t, kind), raw_dtype=kind)

    put("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        put(f"blk.{i}.attn_norm.weight", weights[f"{p}.input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", weights[f"{p}.post_attention_layernorm.weight"])
        for proj, kind in kinds.items():
            module = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            t = weights[f"{p}.{module}.{proj}.weight"]
            if proj == "q_proj":
                t = permute(t, n_head)
            elif proj == "k_proj":
                t = permute(t, n_kv)
            put(f"blk.{i}.{names[proj]}.weight", t, kind)
    put("output_norm.weight", weights["model.norm.weight"])
    put("output.weight", weights["lm_head.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", args.out, os.path.getsize(args.out), "bytes")


if __name__ == "__main__":
    main()
