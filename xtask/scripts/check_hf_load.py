"""Check that transformers loads a checkpoint align wrote, and that it computes what a
reference checkpoint computes.

Usage:
    $VENV/bin/python xtask/scripts/check_hf_load.py --ours DIR --reference DIR [--text "..."]
Loads both with AutoModelForCausalLM + AutoTokenizer (offline), prints the max |Δ logit|
on the text and whether the token ids agree; exits 1 if ids differ or |Δ| > 1e-4.
"""

import argparse
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--text", default="The capital of France is Paris. 12345 café 😀")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for name, d in [("ours", args.ours), ("reference", args.reference)]:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
        ids = tok(args.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out[name] = (ids, model(ids).logits)
    same_ids = torch.equal(out["ours"][0], out["reference"][0])
    d = (out["ours"][1] - out["reference"][1]).abs().max().item() if same_ids else float("inf")
    print(f"token ids equal: {same_ids}; max |Δ logit| = {d:.3e}")
    sys.exit(0 if same_ids and d <= 1e-4 else 1)


if __name__ == "__main__":
    main()
