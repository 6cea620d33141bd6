"""Run a TRL benchmark script with TRL's trainer configs in f32.

TRL's SFTConfig, DPOConfig and GRPOConfig default to bf16=True (autocast). On a CPU without
native bf16 (AVX512_BF16 or AMX) torch emulates those products and runs them tens of times
slower than in f32, so `cargo xtask bench --reference-f32` runs the same harness through this
wrapper: every TRL config is created with bf16=False (and fp16=False); nothing else changes.

Usage: python trl_f32.py SCRIPT.py [script arguments...]
"""

import runpy
import sys

import trl


def without_bf16(cls):
    post_init = cls.__post_init__

    def patched(self):
        self.bf16 = False
        self.fp16 = False
        post_init(self)

    cls.__post_init__ = patched


for name in ("SFTConfig", "DPOConfig", "GRPOConfig"):
    without_bf16(getattr(trl, name))

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
