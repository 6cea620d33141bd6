"""Compare align's multiple-choice results (`align eval mc`'s <task>.jsonl) with a reference
made by xtask/scripts/piqa_reference.py (lm-eval on transformers), item by item.

Usage:
    python3 xtask/scripts/compare_mc.py --ours runs/eval/piqa.jsonl --reference fixtures/eval/piqa_smollm2_lm_eval.jsonl
Prints: items compared, the fraction whose chosen answer (acc's argmax) agrees, the largest
|Δ log-likelihood|, and every disagreement with the reference's own |ll_0 − ll_1| gap (a
disagreement on a near-tie, gap < 1e-3, is rounding, not a bug). Exits 1 if agreement < 99.5%
or a disagreement is not a near-tie.
"""

import argparse
import json
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", required=True)
    ap.add_argument("--reference", required=True)
    args = ap.parse_args()
    ours = [json.loads(l) for l in open(args.ours)]
    ref = [r for r in (json.loads(l) for l in open(args.reference)) if "doc_id" in r]
    if len(ours) != len(ref):
        sys.exit(f"{len(ours)} items vs {len(ref)} in the reference")
    agree, worst, bad = 0, 0.0, []
    for o, r in zip(ours, ref):
        a, b = o["loglikelihoods"], r["loglikelihoods"]
        worst = max(worst, max(abs(x - y) for x, y in zip(a, b)))
        pa = max(range(len(a)), key=lambda i: a[i])
        pb = max(range(len(b)), key=lambda i: b[i])
        if pa == pb:
            agree += 1
        else:
            gap = abs(sorted(b)[-1] - sorted(b)[-2])
            bad.append((o["doc_id"], gap, a, b))
    n = len(ours)
    print(f"{n} items; chosen answer agrees on {agree} ({agree / n:.4%}); max |Δ loglikelihood| = {worst:.3e}")
    for d, gap, a, b in bad:
        print(f"  item {d}: reference gap {gap:.2e}; align {a} vs reference {b}")
    ok = agree / n >= 0.995 and all(gap < 1e-3 for _, gap, _, _ in bad)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
