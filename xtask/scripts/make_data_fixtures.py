"""Data fixtures for align-data's tests: small slices of the real sets and one file per
schema in each format.

Usage:
    $VENV/bin/python xtask/scripts/make_data_fixtures.py --shared ../shared/data --out fixtures/data
Writes gsm8k_train_head.jsonl (first 32 rows), gsm8k_test_head.jsonl (first 16), piqa_head.jsonl
(first 32), their licences, and schemas.{jsonl,json,parquet}: the same rows of every schema
(the parquet with two row groups, nested message lists as list<struct<role, content>>).
"""

import argparse
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

MSG = lambda r, c: {"role": r, "content": c}  # noqa: E731

SCHEMA_ROWS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "Question: 2+2?\nAnswer:", "completion": " 4"},
    {"messages": [MSG("system", "Be brief."), MSG("user", "Hi"), MSG("assistant", "Hello!"),
                  MSG("user", "Bye"), MSG("assistant", "Goodbye.")]},
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."},
    {"prompt": [MSG("user", "Best pet?")], "chosen": [MSG("assistant", "A cat.")], "rejected": [MSG("assistant", "A rock.")]},
    {"chosen": [MSG("user", "2+2?"), MSG("assistant", "4")], "rejected": [MSG("user", "2+2?"), MSG("assistant", "5")]},
    {"prompt": "Water boils at", "completion": " 100 C at sea level.", "label": True},
    {"prompt": "Natalia sold 48 clips. How many?", "answer": "72"},
    {"conversation": [{"role": "human", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the chicken cross the road?"}],
     "meta_eval_score": 7.5, "score_reason": "funny enough"},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for src, dst, n in [("gsm8k/train.jsonl", "gsm8k_train_head.jsonl", 32), ("gsm8k/test.jsonl", "gsm8k_test_head.jsonl", 16),
                        ("piqa/validation.jsonl", "piqa_head.jsonl", 32)]:
        with open(os.path.join(args.shared, src)) as f, open(os.path.join(args.out, dst), "w") as g:
            for i, line in enumerate(f):
                if i >= n:
                    break
                g.write(line)
    shutil.copy(os.path.join(args.shared, "gsm8k/LICENSE"), os.path.join(args.out, "GSM8K_LICENSE"))
    with open(os.path.join(args.out, "schemas.jsonl"), "w") as f:
        for r in SCHEMA_ROWS:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(args.out, "schemas.json"), "w") as f:
        json.dump(SCHEMA_ROWS, f, indent=1)
    # Parquet needs one table schema: one file per schema, the conversational ones nested.
    pq_dir = os.path.join(args.out, "schemas_parquet")
    os.makedirs(pq_dir, exist_ok=True)
    groups = {}
    for i, r in enumerate(SCHEMA_ROWS):
        groups.setdefault(tuple(sorted(r.keys())) + (str(type(r.get("chosen", r.get("prompt")))),), []).append((i, r))
    for k, (key, rows) in enumerate(groups.items()):
        table = pa.Table.from_pylist([r for _, r in rows] * 3)
        pq.write_table(table, os.path.join(pq_dir, f"part-{rows[0][0]:02d}.parquet"), row_group_size=2)
    print(sorted(os.listdir(pq_dir)))


if __name__ == "__main__":
    main()
