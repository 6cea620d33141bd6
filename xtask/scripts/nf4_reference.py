"""NF4 (QLoRA's 4-bit NormalFloat) reference: bitsandbytes' code books applied in numpy.

Usage:
    $VENV/bin/python xtask/scripts/nf4_reference.py --out fixtures/reference/quant/nf4.json

The NF4 table is `bitsandbytes.functional.get_4bit_type("nf4")` and the double-quantisation
map `create_dynamic_map(signed=True)`, both read from bitsandbytes 0.50.2. The quantisation
itself is numpy, as QLoRA defines it: blocks of 64 over the flattened matrix, each scaled by
its absmax, every value mapped to the nearest code; with double quantisation the absmaxes'
mean is subtracted and the rest quantised to the nearest dynamic-map code in blocks of 256,
each scaled by its absmax. When bitsandbytes' own `quantize_4bit` runs on this CPU, its
dequantised values are compared too and the agreement recorded.

The inputs are made by an integer generator both sides can repeat exactly (see `inputs`),
so the fixture holds only results: codes (hex, one digit per value), the absmax of every
block as stored, and the dequantised values.
"""

import argparse
import json
import os

import numpy as np

MASK = (1 << 64) - 1


def inputs(seed: int, n: int) -> np.ndarray:
    """SplitMix64 draws; each value is (sum of 4 uniforms of 24 bits − 2) · 0.05, in f32,
    and every 97th value is multiplied by 8 (outliers set a block's absmax)."""
    state = seed & MASK
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        s = np.float32(0.0)
        for _ in range(4):
            state = (state + 0x9E3779B97F4A7C15) & MASK
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
            z = z ^ (z >> 31)
            s = np.float32(s + np.float32((z >> 40) / float(1 << 24)))
        v = np.float32(np.float32(s - np.float32(2.0)) * np.float32(0.05))
        if i % 97 == 0:
            v = np.float32(v * np.float32(8.0))
        out[i] = v
    return out


def nearest(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    # argmin takes the first (lower) code on a tie.
    return np.argmin(np.abs(x[:, None].astype(np.float32) - table[None, :]), axis=1).astype(np.uint8)


def nf4(values: np.ndarray, nf4_table: np.ndarray, dyn: np.ndarray, double_quant: bool) -> dict:
    blocks = [values[i : i + 64] for i in range(0, len(values), 64)]
    absmax = np.array([np.max(np.abs(b)) for b in blocks], dtype=np.float32)
    codes = []
    for a, b in zip(absmax, blocks):
        codes.append(nearest(nf4_table, (b / a).astype(np.float32)) if a > 0 else np.full(len(b), 7, np.uint8))
    codes = np.concatenate(codes)
    case = {"double_quant": double_quant}
    if double_quant:
        offset = np.float32(np.mean(absmax.astype(np.float64)))
        centred = (absmax - offset).astype(np.float32)
        qcodes, scales = [], []
        for i in range(0, len(centred), 256):
            c = centred[i : i + 256]
            s = np.float32(np.max(np.abs(c)))
            scales.append(s)
            qcodes.append(nearest(dyn, (c / s).astype(np.float32)))
        qcodes = np.concatenate(qcodes)
        scales = np.array(scales, dtype=np.float32)
        stored = (dyn[qcodes] * np.repeat(scales, 256)[: len(qcodes)]).astype(np.float32) + offset
        stored = stored.astype(np.float32)
        case.update(offset=float(offset), scale_codes=bytes(qcodes.tolist()).hex(), scales=scales.tolist())
    else:
        stored = absmax
    deq = (nf4_table[codes] * np.repeat(stored, 64)[: len(codes)]).astype(np.float32)
    case.update(
        codes="".join(f"{c:x}" for c in codes),
        absmax=[float(f"{x:.9g}") for x in stored.astype(np.float32)],
        dequantized=[float(f"{x:.9g}") for x in deq],  # 9 digits round-trip an f32
    )
    return case, deq


def bitsandbytes_agrees(values: np.ndarray, shape, double_quant: bool, deq: np.ndarray):
    """bitsandbytes' own quantize_4bit on this CPU, when it runs: its max |difference|."""
    try:
        import torch
        import bitsandbytes.functional as F

        t = torch.tensor(values.reshape(shape))
        q, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        back = F.dequantize_4bit(q, state).reshape(-1).numpy()
        return float(np.max(np.abs(back - deq)))
    except Exception as e:  # CPU support varies by bitsandbytes build
        return f"not run: {type(e).__name__}: {e}"[:200]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import bitsandbytes
    import bitsandbytes.functional as F

    nf4_table = np.array(F.get_4bit_type("nf4", device="cpu").tolist(), dtype=np.float32)
    dyn = np.array(F.create_dynamic_map(signed=True).tolist(), dtype=np.float32)
    out = {
        "bitsandbytes": bitsandbytes.__version__,
        "nf4_code": nf4_table.tolist(),
        "dynamic_map": dyn.tolist(),
        "cases": [],
    }
    # [3, 100]: blocks span rows and the last is partial; [5, 3300]: 258 blocks, so the
    # double quantisation has two scale blocks, the second partial.
    for seed, shape, dq in [(7, (3, 100), False), (8, (3, 100), True), (9, (5, 3300), True)]:
        n = shape[0] * shape[1]
        values = inputs(seed, n)
        case, deq = nf4(values, nf4_table, dyn, dq)
        case.update(seed=seed, shape=list(shape), bitsandbytes_max_diff=bitsandbytes_agrees(values, shape, dq, deq))
        out["cases"].append(case)
        print(shape, "double_quant" if dq else "", "bitsandbytes:", case["bitsandbytes_max_diff"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
