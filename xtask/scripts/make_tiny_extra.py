"""Tiny random checkpoints for the architectures ../shared/peer/make_tiny.py does not build:
Qwen3 (q/k RMSNorm, explicit head_dim), Mistral, and Llama with llama3 RoPE scaling.

Usage:
    $VENV/bin/python xtask/scripts/make_tiny_extra.py --peer ../shared/peer \
        --arch {qwen3,mistral,llama3-rope} --out DIR [--seed N]

Same recipe as make_tiny.py (whose helpers it imports from --peer): the locally trained
byte-level BPE tokenizer, initializer_range 0.1, biases ~ N(0, 0.1) and norm weights
~ 1 + N(0, 0.1) so a port that drops one is caught; float32 save_pretrained.
"""

import argparse
import json
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", required=True, help="directory of the peer harness (make_tiny.py, peer_common.py)")
    ap.add_argument("--arch", required=True, choices=["qwen3", "mistral", "llama3-rope"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.peer))
    import peer_common as pc  # sets the offline environment before HF imports
    import make_tiny as mt

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config

    s = mt.SIZES["tiny"]
    os.makedirs(args.out, exist_ok=True)
    tok, corpus_info = pc.train_tokenizer(s["vocab"])
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(pc.tokenizer_config(), f, indent=2)
        f.write("\n")
    eos, pad = tok.token_to_id(pc.EOS_TOKEN), tok.token_to_id(pc.PAD_TOKEN)
    common = dict(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=s["max_pos"], hidden_act="silu", initializer_range=mt.INIT_RANGE,
        eos_token_id=eos, pad_token_id=pad, bos_token_id=eos,
    )
    if args.arch == "qwen3":
        # head_dim 32 != hidden/heads (16): exercises an explicit head_dim as real Qwen3 has.
        config = Qwen3Config(head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                             attention_bias=False, use_sliding_window=False, **common)
    elif args.arch == "mistral":
        config = MistralConfig(rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    else:
        # Llama 3.1-style scaling with a small original context so every band (long,
        # medium, short wavelengths) is present at head_dim 16.
        config = LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=True, mlp_bias=False,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}, **common)
    pc.seed_everything(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturbed = mt.perturb_(model, torch)
    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    info = {
        "arch": args.arch, "seed": args.seed, "perturbed": perturbed, "tokenizer": corpus_info,
        "sha256": {n: mt.sha256_file(os.path.join(args.out, n)) for n in ["model.safetensors", "tokenizer.json"]},
        "versions": pc.versions(), "command": " ".join([sys.executable] + sys.argv),
    }
    pc.write_json(os.path.join(args.out, "peer_info.json"), info)
    print(json.dumps({k: info[k] for k in ["arch", "seed", "sha256"]}))


if __name__ == "__main__":
    main()
