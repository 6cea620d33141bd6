"""Float64 next-token log-probs of checkpoints, each optionally under a PEFT adapter: what
align-lora's tests compare our own adapters and merged exports against.

Usage:
    $VENV/bin/python xtask/scripts/peft_logprobs.py --ids IDS.json --case BASE[:ADAPTER] [--case ...]
IDS.json is a list of token-id lists. Each case is a transformers checkpoint directory,
with a PEFT adapter directory on top after a colon. Prints {"peft": version, "cases": [[[log-prob
of token t+1 given tokens ..t, for every t] per sequence] per case]} as JSON on stdout.
"""

import argparse
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--case", action="append", required=True)
    args = ap.parse_args()
    import peft
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with open(args.ids, encoding="utf-8") as f:
        seqs = json.load(f)
    cases = []
    for case in args.case:
        base, _, adapter = case.partition(":")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        model = model.double().eval()
        rows = []
        for ids in seqs:
            x = torch.tensor([ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x).logits[0], -1)
            rows.append(logp[:-1].gather(-1, x[0, 1:, None])[:, 0].tolist())
        cases.append(rows)
    print(json.dumps({"peft": peft.__version__, "cases": cases}))


if __name__ == "__main__":
    main()
