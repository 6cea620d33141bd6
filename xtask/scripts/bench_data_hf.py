"""Baseline for `cargo xtask bench --data`: the same tokenise + pack work with HF `datasets.map`
and the fast tokenizer, then TRL's best-fit-decreasing `pack_dataset`.

Usage:
    $VENV/bin/python xtask/scripts/bench_data_hf.py --data ../shared/data/gsm8k/train.jsonl \
        --tokenizer HF_DIR --max-length 1024 --reps 3 --json-out FILE
Work per row (as align's Gsm8kSft adapter + tokenizer do): prompt = r1_zero prompt of the
question; completion = " {worked steps without <<..>>} </think> <answer> {N} </answer>";
prompt and prompt+completion tokenised, split at their common prefix, EOS appended,
prompt cut to 512 and the whole to max-length. Timed: map (tokenise) and pack, medians.
"""

import argparse
import json
import os
import re
import statistics
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

R1 = ("A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant "
      "first thinks about the reasoning process in the mind and then provides the User with the answer. The reasoning "
      "process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, respectively, "
      "i.e., <think> reasoning process here </think> <answer> answer here </answer>.\nUser: {question}\nAssistant: <think>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-prompt-length", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()
    import datasets
    from transformers import AutoTokenizer
    from trl.data_utils import pack_dataset

    datasets.disable_caching()
    datasets.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    eos = tok.eos_token_id
    raw = datasets.load_dataset("json", data_files=args.data, split="train", keep_in_memory=True)

    def build(batch):
        prompts, fulls = [], []
        for q, a in zip(batch["question"], batch["answer"]):
            steps, gt = a.rsplit("#### ", 1)
            steps = re.sub(r"<<[^>]*>>", "", steps).strip()
            p = R1.replace("{question}", q)
            prompts.append(p)
            fulls.append(p + f" {steps} </think> <answer> {gt.strip().replace(',', '')} </answer>")
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        f_ids = tok(fulls, add_special_tokens=False)["input_ids"]
        out_ids, out_mask = [], []
        for p, f in zip(p_ids, f_ids):
            n = 0
            while n < min(len(p), len(f)) and p[n] == f[n]:
                n += 1
            prompt, comp = f[:n], f[n:] + [eos]
            prompt = prompt[-min(args.max_prompt_length, args.max_length):]
            comp = comp[: max(0, args.max_length - len(prompt))]
            out_ids.append(prompt + comp)
            out_mask.append([0] * len(prompt) + [1] * len(comp))
        return {"input_ids": out_ids, "completion_mask": out_mask}

    map_times, pack_times = [], []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        tokd = raw.map(build, batched=True, remove_columns=raw.column_names, keep_in_memory=True)
        t1 = time.perf_counter()
        packed = pack_dataset(tokd, seq_length=args.max_length, strategy="bfd", map_kwargs={"keep_in_memory": True})
        t2 = time.perf_counter()
        map_times.append(t1 - t0)
        pack_times.append(t2 - t1)
    map_times, pack_times = map_times[1:], pack_times[1:]
    tokens = sum(len(x) for x in tokd["input_ids"])
    out = {"rows": len(raw), "tokens": tokens, "packed_rows": len(packed),
           "tokenize_seconds": statistics.median(map_times), "pack_seconds": statistics.median(pack_times)}
    with open(args.json_out, "w") as f:
        json.dump(out, f)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
