"""Check that transformers loads a reward model align exported (`align reward`'s final/) as
AutoModelForSequenceClassification and scores exactly what align scored.

Usage:
    target/debug/align score-reward --model DIR --data F [--adapter piqa_preference] --with-ids > scores.jsonl
    $VENV/bin/python xtask/scripts/check_reward_model.py --model DIR --scores scores.jsonl
Scores every id sequence in scores.jsonl (one row at a time, no padding), prints the max |Δ score|
and the pairwise accuracy both ways; exits 1 if |Δ| > 1e-4.
"""

import argparse
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--scores", required=True)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(2)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, local_files_only=True, dtype=torch.float32
    ).eval()
    rows = [json.loads(l) for l in open(args.scores)]
    worst, n, agree, acc_ours, acc_hf = 0.0, 0, 0, 0, 0
    for r in rows:
        got = {}
        for key, ids_key in [("score", "input_ids"), ("chosen", "chosen_ids"), ("rejected", "rejected_ids")]:
            if ids_key not in r:
                continue
            with torch.no_grad():
                logit = model(torch.tensor([r[ids_key]])).logits[0, 0].item()
            got[key] = logit
            worst = max(worst, abs(logit - r[key]))
            n += 1
        if "chosen" in got:
            acc_ours += r["chosen"] > r["rejected"]
            acc_hf += got["chosen"] > got["rejected"]
            agree += (r["chosen"] > r["rejected"]) == (got["chosen"] > got["rejected"])
    pairs = sum("chosen" in r for r in rows)
    print(f"{n} sequences; max |Δ score| align vs transformers = {worst:.3e}")
    if pairs:
        print(f"pairwise accuracy: align {acc_ours / pairs:.4f}, transformers {acc_hf / pairs:.4f}; "
              f"same preference on {agree}/{pairs} pairs")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
