"""A PEFT LoRA adapter on a tiny fixture checkpoint, with reference log-probs of the adapted
model, for align-lora's parity test.

Usage:
    $VENV/bin/python xtask/scripts/make_peft_adapter.py --base fixtures/models/llama-untied \
        --texts fixtures/models/texts.jsonl --out fixtures/adapters/llama-untied-lora [--seed 0]
    $VENV/bin/python xtask/scripts/make_peft_adapter.py --base fixtures/models/gpt2 \
        --texts fixtures/models/texts.jsonl --out fixtures/adapters/gpt2-lora \
        --target-modules c_attn,c_proj,c_fc
Writes OUT/adapter_config.json + adapter_model.safetensors (PEFT's own save_pretrained) and
OUT/reference.json: per text, input ids and float64 per-token log-probs of every position's
next token under the adapted model.
LoRA: r=4, lora_alpha=8, init_lora_weights=False (B is random, so the adapter changes the
output), on --target-modules (default all-linear: every linear layer of the blocks). GPT-2's
projections are Conv1D: fan_in_fan_out=True there, as PEFT wants for Conv1D.
"""

import argparse
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-modules", default="all-linear", help="all-linear, or comma-separated module names")
    args = ap.parse_args()
    import peft
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, attn_implementation="eager")
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    conv1d = base.config.model_type == "gpt2"
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False,
                     fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # PEFT's random init of B is small; make the effect visible (x3 keeps f32 within 1e-4 of f64)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    model.save_pretrained(args.out)
    card = os.path.join(args.out, "README.md")  # PEFT's empty model card: not part of the fixture
    if os.path.exists(card):
        os.remove(card)
    tok = Tokenizer.from_file(os.path.join(args.base, "tokenizer.json"))
    m64 = model.double().eval()
    rows = []
    for line in open(args.texts, encoding="utf-8"):
        r = json.loads(line)
        ids = tok.encode(r["prompt"] + r["completion"], add_special_tokens=False).ids
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(m64(input_ids=x).logits[0], -1)
        rows.append({"input_ids": ids, "next_token_logprobs": logp[:-1].gather(-1, x[0, 1:, None])[:, 0].tolist()})
    out = {"peft": peft.__version__, "r": 4, "lora_alpha": 8, "rows": rows}
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(out, f)
    print(os.listdir(args.out))


if __name__ == "__main__":
    main()
