"""PIQA reference for align-eval: lm-eval's own multiple-choice scoring (lm-eval 0.4.13, HF
transformers backend) of an HF checkpoint on the local PIQA validation rows, one JSON line per
item with both log-likelihoods, plus a summary line.

Usage:
    $VENV/bin/python xtask/scripts/piqa_reference.py --hf-dir DIR --piqa ../shared/data/piqa/validation.jsonl \
        --out fixtures/eval/piqa_smollm2_lm_eval.jsonl [--dtype float32] [--limit N]
DIR is the dequantised SmolLM2 GGUF as transformers converts it (xtask/scripts/smollm2_reference.py
--hf-out DIR). The task is lm-eval's `piqa` definition (doc_to_text "Question: {{goal}}\\nAnswer:",
choices [sol1, sol2], target = label, metrics acc / acc_norm) with the data read from the local file
instead of the hub.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

TASK = """task: piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--piqa", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    import torch
    import lm_eval
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "piqa_local.yaml"), "w") as f:
        f.write(TASK.format(path=os.path.abspath(args.piqa)))
    t0 = time.time()
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={os.path.abspath(args.hf_dir)},dtype={args.dtype},device=cpu",
        tasks=["piqa_local"],
        task_manager=TaskManager(include_path=tmp),
        batch_size=args.batch_size,
        log_samples=True,
        limit=args.limit,
    )
    secs = time.time() - t0
    samples = sorted(res["samples"]["piqa_local"], key=lambda s: s["doc_id"])
    with open(args.out, "w") as f:
        for s in samples:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            f.write(json.dumps({"doc_id": s["doc_id"], "label": int(s["target"]), "loglikelihoods": lls,
                                "acc": s["acc"], "acc_norm": s["acc_norm"]}) + "\n")
        m = res["results"]["piqa_local"]
        f.write(json.dumps({"summary": {k: m[k] for k in m if k.startswith("acc")},
                            "num_examples": len(samples), "seconds": secs, "dtype": args.dtype,
                            "lm_eval": lm_eval.__version__, "torch": torch.__version__,
                            "command": " ".join([sys.executable] + sys.argv)}) + "\n")
    print(json.dumps(res["results"]["piqa_local"]))


if __name__ == "__main__":
    main()
