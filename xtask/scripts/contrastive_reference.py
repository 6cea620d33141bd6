"""InfoNCE contrastive-loss reference cases, for crates/losses/tests/reference.rs.

The loss is computed as CLIP's reference training loss does it (Radford et al. 2021, the
paper's Figure 3 pseudocode; open_clip `ClipLoss`): L2-normalise both sides with
`F.normalize` (eps 1e-12 on the norm), `logits = prompt @ response.T / temperature`,
`F.cross_entropy(logits, arange(N))` (mean), and for the symmetric loss the mean of that and
`F.cross_entropy(logits.T, arange(N))`. The one-directional `prompt_to_response` loss is the
first term alone (InfoNCE, van den Oord et al. 2018; SimCSE, Gao et al. 2021, with in-batch
negatives). Accuracy is `mean(argmax(logits, 1) == arange(N))` (torch's argmax takes the
first of tied maxima), and the response->prompt one the same on `logits.T`. Gradients of
the loss with respect to both inputs come from torch's autograd. All in float64.

    /work/venv/bin/python xtask/scripts/contrastive_reference.py \
        > fixtures/reference/losses/contrastive.json
"""

import json
import platform
import sys

import torch
import torch.nn.functional as F

SEED = 0


def info_nce(prompt, response, temperature, direction):
    prompt = prompt.clone().requires_grad_(True)
    response = response.clone().requires_grad_(True)
    p = F.normalize(prompt, dim=-1)
    r = F.normalize(response, dim=-1)
    logits = p @ r.T / temperature
    labels = torch.arange(logits.shape[0])
    loss_p2r = F.cross_entropy(logits, labels)
    if direction == "symmetric":
        loss = (loss_p2r + F.cross_entropy(logits.T, labels)) / 2
    elif direction == "prompt_to_response":
        loss = loss_p2r
    else:
        raise ValueError(direction)
    loss.backward()
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == labels).double().mean()
        accuracy_r2p = (logits.T.argmax(dim=1) == labels).double().mean()
    return {
        "loss": loss.item(),
        "logits": logits.detach().tolist(),
        "accuracy": accuracy.item(),
        "accuracy_response_to_prompt": accuracy_r2p.item(),
        "grad_prompt": prompt.grad.tolist(),
        "grad_response": response.grad.tolist(),
    }


def cases():
    g = torch.Generator().manual_seed(SEED)

    def randn(n, d):
        return torch.randn(n, d, generator=g, dtype=torch.float64)

    def pairs(n, d, noise):
        """Prompts and responses that are the prompts plus `noise` (0: unrelated draws)."""
        prompt = randn(n, d)
        response = prompt + noise * randn(n, d) if noise else randn(n, d)
        return prompt, response

    out = []

    def add(note, prompt, response, temperature, direction):
        out.append(
            {
                "note": note,
                "config": {"direction": direction, "temperature": temperature},
                "inputs": {"prompt": prompt.tolist(), "response": response.tolist()},
                "outputs": info_nce(prompt, response, temperature, direction),
            }
        )

    for n, d, noise, temperature, direction in [
        (2, 3, 0.0, 0.07, "symmetric"),
        (4, 16, 0.0, 0.07, "symmetric"),
        (4, 16, 0.5, 0.07, "symmetric"),
        (8, 16, 1.0, 1.0, "symmetric"),
        (8, 3, 0.5, 0.07, "symmetric"),
        (2, 3, 0.5, 1.0, "prompt_to_response"),
        (4, 16, 0.0, 1.0, "prompt_to_response"),
        (8, 16, 0.5, 0.07, "prompt_to_response"),
        (8, 3, 1.0, 0.07, "prompt_to_response"),
        (6, 16, 0.5, 0.07, "symmetric"),  # N not a power of two: the means' 1/N
    ]:
        prompt, response = pairs(n, d, noise)
        add(f"random N={n} D={d}, response = prompt + {noise}*noise" if noise else f"random N={n} D={d}",
            prompt, response, temperature, direction)

    # A zero row on each side: F.normalize's eps clamp (the row normalises to 0; its
    # gradient is 1/eps times the upstream one).
    for direction in ["symmetric", "prompt_to_response"]:
        prompt, response = pairs(4, 3, 0.5)
        prompt[1] = 0.0
        response[2] = 0.0
        add("N=4 D=3, prompt row 1 and response row 2 are zero vectors", prompt, response, 0.07, direction)

    # All rows identical: every logit ties, the loss is log N, argmax takes column 0.
    for direction in ["symmetric", "prompt_to_response"]:
        row = randn(1, 16)
        prompt = row.repeat(4, 1)
        response = (row * 2.5).repeat(4, 1)
        add("N=4 D=16, all prompt rows identical, all response rows the same direction", prompt, response, 0.07,
            direction)

    # One pair: the only column is the positive, the loss is 0.
    prompt, response = pairs(1, 16, 0.0)
    add("N=1 D=16: no negatives, loss 0", prompt, response, 0.07, "symmetric")
    return out


def main():
    torch.manual_seed(SEED)
    out = {
        "seed": SEED,
        "dtype": "float64",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": "contrastive_reference.py (torch %s)" % torch.__version__,
        "contrastive": {
            "source": "CLIP's loss (Radford et al. 2021, Figure 3; open_clip ClipLoss) in torch: F.normalize "
            "(p=2, eps=1e-12), logits = prompt_n @ response_n.T / temperature, F.cross_entropy with labels "
            "arange(N), mean reduction; gradients by torch.autograd",
            "formula": "symmetric: (CE(logits, arange) + CE(logits.T, arange)) / 2; prompt_to_response: "
            "CE(logits, arange); accuracy = mean(argmax_j logits[i, j] == i), accuracy_response_to_prompt "
            "the same on logits.T (first maximum on ties)",
            "cases": cases(),
        },
    }
    json.dump(out, sys.stdout, indent=1, allow_nan=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
