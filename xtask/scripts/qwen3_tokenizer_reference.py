"""Expected outputs of the Qwen3 tokenizer and chat template under transformers, for
align-model's tokenizer tests.

Usage:
    $VENV/bin/python xtask/scripts/qwen3_tokenizer_reference.py --dir fixtures/tokenizers/qwen3-hf
Writes DIR/expected.json: token ids of a few strings (tokenizers, no special tokens added)
and `apply_chat_template(..., tokenize=False)` renders of conversations.
"""

import argparse
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. 1234567 apples!",
    "Unicode: café, naïve, 日本語, emoji 😀 → ≠ ±.",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "  leading spaces\n\n\ttabs and\r\nnewlines   ",
]

CONVERSATIONS = {
    "two_turn": {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Italy?"},
        ],
        "add_generation_prompt": True,
    },
    "system_and_thinking": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n4"},
        ],
        "add_generation_prompt": False,
    },
    "no_thinking": {
        "messages": [{"role": "user", "content": "Say hi."}],
        "add_generation_prompt": True,
        "enable_thinking": False,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    raw = tokenizers.Tokenizer.from_file(os.path.join(args.dir, "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(args.dir, local_files_only=True)
    out = {
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "encode": [{"text": t, "ids": raw.encode(t, add_special_tokens=False).ids} for t in TEXTS],
        "chat": {},
    }
    for name, c in CONVERSATIONS.items():
        kwargs = {k: v for k, v in c.items() if k not in ("messages", "add_generation_prompt")}
        rendered = tok.apply_chat_template(
            c["messages"], tokenize=False, add_generation_prompt=c["add_generation_prompt"], **kwargs
        )
        out["chat"][name] = {**c, "rendered": rendered}
    with open(os.path.join(args.dir, "expected.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(json.dumps(out["chat"]["two_turn"]["rendered"]))


if __name__ == "__main__":
    main()
