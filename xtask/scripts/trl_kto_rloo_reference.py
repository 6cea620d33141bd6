"""KTO and RLOO reference cases from TRL's own code, for crates/losses/tests/reference.rs.

TRL computes both objectives inline in trainer methods (KTOTrainer._compute_loss,
RLOOTrainer._generate_and_score_completions and RLOOTrainer._compute_loss), not in pure
functions. This script takes those methods' source from the installed TRL, cuts out the
lines that turn log-probs and rewards into losses and advantages (the cut points are
asserted, so a TRL release that moves them fails here instead of drifting), and executes
them unchanged on seeded float64 inputs. Everything model-related is an input.

    /work/venv/bin/python xtask/scripts/trl_kto_rloo_reference.py \
        > fixtures/reference/losses/trl_kto_rloo.json
"""

import collections
import inspect
import json
import platform
import sys
import textwrap
import types

import torch
import torch.nn.functional as F
import trl
from trl.trainer import kto_trainer, rloo_trainer
from trl.trainer.utils import nanstd

SEED = 0


def cut(method, start, end, before=0):
    """The lines of `method` from the one containing `start` (less `before` lines) to the one
    containing `end`."""
    lines = inspect.getsource(method).splitlines()
    i = next(k for k, l in enumerate(lines) if start in l) - before
    j = next(k for k, l in enumerate(lines) if k >= i and end in l)
    return textwrap.dedent("\n".join(lines[i : j + 1]))


class Identity:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def fake_self(**kw):
    return types.SimpleNamespace(accelerator=Identity(), _metrics={"train": collections.defaultdict(list)}, **kw)


def kto_cases():
    g = torch.Generator().manual_seed(SEED)
    n = 6
    labels = [True, False, True, True, False, False]
    logps = -torch.rand(n, generator=g, dtype=torch.float64) * 20 - 5
    ref_logps = logps + torch.randn(n, generator=g, dtype=torch.float64) * 2
    kl_logps = -torch.rand(n, generator=g, dtype=torch.float64) * 20 - 5
    ref_kl_logps = kl_logps - torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.25
    code = cut(
        kto_trainer.KTOTrainer._compute_loss,
        "kl = (KL_logps - ref_KL_logps).mean().detach()",
        'self._metrics[mode]["kl"].append(kl.item())',
        before=1,
    )
    assert code.startswith("if self.calculate_KL:"), code
    assert "chosen_losses = 1 - F.sigmoid(self.beta * (chosen_logratios - kl))" in code, code
    cases = []
    configs = [
        {"loss_type": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
        {"loss_type": "kto", "beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.8},
        {"loss_type": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, "kl_shift": -3.0},
        {"loss_type": "apo_zero_unpaired", "beta": 0.2, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    ]
    for cfg in configs:
        # kl_shift moves the policy's mismatched log-probs so the batch KL is negative (clamped to 0).
        shift = cfg.get("kl_shift", 0.0)
        lab = torch.tensor(labels)
        chosen_idx = torch.nonzero(lab).view(-1)
        rejected_idx = torch.nonzero(~lab).view(-1)
        me = fake_self(
            calculate_KL=cfg["loss_type"] != "apo_zero_unpaired",
            loss_type=cfg["loss_type"],
            beta=cfg["beta"],
            desirable_weight=cfg["desirable_weight"],
            undesirable_weight=cfg["undesirable_weight"],
        )
        ns = {
            "self": me,
            "torch": torch,
            "F": F,
            "mode": "train",
            "KL_logps": kl_logps + shift,
            "ref_KL_logps": ref_kl_logps,
            "chosen_logps": logps[chosen_idx],
            "rejected_logps": logps[rejected_idx],
            "ref_chosen_logps": ref_logps[chosen_idx],
            "ref_rejected_logps": ref_logps[rejected_idx],
        }
        exec(code, ns)
        losses = ns["losses"]
        cases.append(
            {
                "config": cfg,
                "outputs": {
                    "loss": losses.nanmean().item(),
                    "kl": ns["kl"].item(),
                    "chosen_losses": (ns["chosen_losses"] * cfg["desirable_weight"]).tolist(),
                    "rejected_losses": (ns["rejected_losses"] * cfg["undesirable_weight"]).tolist(),
                    "chosen_rewards": ns["chosen_rewards"].tolist(),
                    "rejected_rewards": ns["rejected_rewards"].tolist(),
                },
            }
        )
    return {
        "source": "executes trl/trainer/kto_trainer.py KTOTrainer._compute_loss from `if self.calculate_KL:` to "
        "`losses = torch.cat(...)` (TRL %s); loss = losses.nanmean() as that method returns it" % trl.__version__,
        "formula": "kl = clamp(mean(KL_logps - ref_KL_logps), min=0); kto: desirable w_d*(1 - sigmoid(beta*(r - kl))), "
        "undesirable w_u*(1 - sigmoid(beta*(kl - r))), r = logp - ref_logp; apo_zero_unpaired: 1 - sigmoid(beta*r) and "
        "sigmoid(beta*r); rewards = beta*r; kl_shift is added to KL_logps before the call",
        "inputs": {
            "labels": labels,
            "policy_logps": logps.tolist(),
            "ref_logps": ref_logps.tolist(),
            "policy_kl_logps": kl_logps.tolist(),
            "ref_kl_logps": ref_kl_logps.tolist(),
        },
        "cases": cases,
    }


def rloo_advantage_cases():
    nan = float("nan")
    rewards_per_func = [
        [1.0, 0.5], [0.0, 0.5], [1.0, 0.0], [0.0, 1.0],
        [0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5],
        [2.0, nan], [1.0, 0.25], [nan, nan], [0.0, 0.75],
        [nan, nan], [3.0, 0.0], [nan, nan], [nan, nan],
    ]
    weights = [1.0, 0.5]
    g = torch.Generator().manual_seed(SEED + 1)
    kl = (torch.randn(len(rewards_per_func), generator=g, dtype=torch.float64) * 2).tolist()
    code = cut(rloo_trainer.RLOOTrainer._generate_and_score_completions, "unscorable_mask = ", "advantages = torch.nan_to_num(")
    assert "baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)" in code, code
    # The KL term needs old/ref per-token log-probs: given as one token each holding the sequence KL.
    cases = []
    for cfg in [
        {"beta": 0.0, "normalize_advantages": False, "reward_clip_range": None},
        {"beta": 0.05, "normalize_advantages": False, "reward_clip_range": None},
        {"beta": 0.1, "normalize_advantages": True, "reward_clip_range": None},
        {"beta": 0.0, "normalize_advantages": True, "reward_clip_range": [0.0, 1.0]},
    ]:
        me = fake_self(
            beta=cfg["beta"],
            normalize_advantages=cfg["normalize_advantages"],
            reward_clip_range=cfg["reward_clip_range"],
            reward_weights=torch.tensor(weights, dtype=torch.float64),
        )
        ns = {
            "self": me,
            "torch": torch,
            "nanstd": nanstd,
            "gather": lambda x: x,
            "device": torch.device("cpu"),
            "rewards_per_func": torch.tensor(rewards_per_func, dtype=torch.float64),
            "num_generations": 4,
            "old_per_token_logps": torch.tensor(kl, dtype=torch.float64).unsqueeze(1),
            "ref_per_token_logps": torch.zeros(len(kl), 1, dtype=torch.float64),
            "completion_mask": torch.ones(len(kl), 1, dtype=torch.float64),
        }
        exec(code, ns)
        advantages = torch.nan_to_num(ns["advantages"], nan=0.0)
        rewards = ns["rewards"]
        # NaN (unscorable) rewards are written as null.
        rewards = [None if x != x else x for x in rewards.tolist()]
        cases.append({"config": cfg, "outputs": {"rewards": rewards, "advantages": advantages.tolist()}})
    return {
        "source": "executes trl/trainer/rloo_trainer.py RLOOTrainer._generate_and_score_completions from "
        "`unscorable_mask = ` to `advantages = torch.nan_to_num(...)` (TRL %s)" % trl.__version__,
        "formula": "r = nansum(w*r_f), NaN when no function scored; clamp to reward_clip_range; r -= beta*sequence_kl; "
        "A_i = r_i - (sum_scorable(r) - r_i)/(n_scorable - 1); normalize: (A - nanmean)/(nanstd + 1e-4); NaN -> 0",
        "inputs": {
            "rewards_per_func": [[None if x != x else x for x in r] for r in rewards_per_func],
            "reward_weights": weights,
            "sequence_kl": kl,
            "num_generations": 4,
        },
        "cases": cases,
    }


def rloo_loss_cases():
    g = torch.Generator().manual_seed(SEED + 2)
    b, t = 6, 5
    per_token_logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0],
                                    [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    old_logps = (per_token_logps * completion_mask).sum(1) + torch.randn(b, generator=g, dtype=torch.float64) * 0.3
    advantages = torch.randn(b, generator=g, dtype=torch.float64)
    code = cut(rloo_trainer.RLOOTrainer._compute_loss, "logps = (per_token_logps * completion_mask).sum(1)", "loss = per_sequence_loss.mean()")
    clip = cut(rloo_trainer.RLOOTrainer._compute_loss, "is_low_clipped = ", "is_region_clipped = ")
    cases = []
    for cfg in [{"epsilon_low": 0.2, "epsilon_high": 0.2}, {"epsilon_low": 0.2, "epsilon_high": 0.28}, {"epsilon_low": 0.05, "epsilon_high": 0.1}]:
        me = fake_self(epsilon_low=cfg["epsilon_low"], epsilon_high=cfg["epsilon_high"])
        ns = {
            "self": me,
            "torch": torch,
            "per_token_logps": per_token_logps,
            "completion_mask": completion_mask,
            "inputs": {"old_logps": old_logps, "advantages": advantages},
        }
        exec(code + "\n" + clip, ns)
        cases.append(
            {
                "config": cfg,
                "outputs": {
                    "loss": ns["loss"].item(),
                    "per_sequence_loss": ns["per_sequence_loss"].tolist(),
                    "clip_ratio/low_mean": ns["is_low_clipped"].double().mean().item(),
                    "clip_ratio/high_mean": ns["is_high_clipped"].double().mean().item(),
                    "clip_ratio/region_mean": ns["is_region_clipped"].double().mean().item(),
                },
            }
        )
    return {
        "source": "executes trl/trainer/rloo_trainer.py RLOOTrainer._compute_loss from the sequence log-probs to "
        "`loss = per_sequence_loss.mean()` and its clip indicators (TRL %s)" % trl.__version__,
        "formula": "logp = sum_t(per_token_logps*mask); rho = exp(logp - old_logps); loss_i = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A); loss = mean",
        "inputs": {
            "per_token_logps": per_token_logps.tolist(),
            "completion_mask": completion_mask.tolist(),
            "old_logps": old_logps.tolist(),
            "advantages": advantages.tolist(),
        },
        "cases": cases,
    }


def main():
    torch.manual_seed(SEED)
    out = {
        "seed": SEED,
        "dtype": "float64",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "trl": trl.__version__},
        "command": "trl_kto_rloo_reference.py (TRL %s)" % trl.__version__,
        "kto": kto_cases(),
        "rloo_advantages": rloo_advantage_cases(),
        "rloo_loss": rloo_loss_cases(),
    }
    json.dump(out, sys.stdout, indent=1, allow_nan=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
