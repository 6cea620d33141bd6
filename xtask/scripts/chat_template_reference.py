"""transformers' renders of chat templates, for align-model's template tests.

Usage:
    $VENV/bin/python xtask/scripts/chat_template_reference.py --dir fixtures/chat_templates
For every DIR/NAME.jinja writes DIR/NAME.expected.json: conversations rendered by
transformers' own chat-template renderer (`apply_chat_template(..., tokenize=False)`),
with bos_token "<|begin_of_text|>" and eos_token "<|eot_id|>".
"""

import argparse
import glob
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "  Paris.  "},
                  {"role": "user", "content": "And of Italy?"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "add_generation_prompt": False},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    from transformers.utils.chat_template_utils import render_jinja_template

    for path in sorted(glob.glob(os.path.join(args.dir, "*.jinja"))):
        template = open(path, encoding="utf-8").read()
        cases = []
        for c in CONVERSATIONS:
            rendered, _ = render_jinja_template(
                conversations=[c["messages"]], chat_template=template,
                add_generation_prompt=c["add_generation_prompt"],
                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
            )
            cases.append({**c, "rendered": rendered[0]})
        out = path[: -len(".jinja")] + ".expected.json"
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "cases": cases}, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(out, json.dumps(cases[0]["rendered"]))


if __name__ == "__main__":
    main()
