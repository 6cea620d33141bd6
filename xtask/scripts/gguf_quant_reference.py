"""A small GGUF file with one tensor of every ggml type align dequantises, and the values
the `gguf` package (llama.cpp's own Python reader) dequantises them to.

Usage:
    $VENV/bin/python xtask/scripts/gguf_quant_reference.py --out fixtures/gguf
Writes quant_types.gguf and quant_types.expected.json ({name: {"type", "shape", "values"}}).

F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors are quantised from seeded normal data by `gguf.quants`;
Q4_K and Q6_K (which gguf-py can only dequantise) are seeded random bytes with finite,
moderate f16 scales, so every bit of the block layout is exercised.
"""

import argparse
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(1234)
    rows, cols = 4, 512  # 512 = two K-quant super-blocks per row
    w = GGUFWriter(os.path.join(args.out, "quant_types.gguf"), arch="llama")
    w.add_string("align.purpose", "dequantisation test vectors")
    expected = {}
    for ty in [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K]:
        name = f"t_{ty.name.lower()}"
        block, type_size = GGML_QUANT_SIZES[ty]
        if ty in (T.Q4_K, T.Q6_K):
            n_blocks = rows * cols // block
            raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
            scale = np.float16(rng.uniform(0.001, 0.05, size=n_blocks)).view(np.uint8).reshape(n_blocks, 2)
            if ty == T.Q4_K:  # d, dmin at the start of the block
                raw[:, 0:2] = scale
                raw[:, 2:4] = np.float16(rng.uniform(0.001, 0.05, size=n_blocks)).view(np.uint8).reshape(n_blocks, 2)
            else:  # d at the end
                raw[:, -2:] = scale
            data = raw.reshape(rows, cols // block * type_size)
        else:
            f = rng.normal(0, 1, size=(rows, cols)).astype(np.float32)
            data = quants.quantize(f, ty) if ty != T.F32 else f
        values = quants.dequantize(data, ty).astype(np.float32)
        assert values.shape == (rows, cols), values.shape
        w.add_tensor(name, data, raw_shape=data.shape if ty == T.F32 else None, raw_dtype=ty)
        expected[name] = {"type": ty.name, "shape": [rows, cols], "values": values.reshape(-1).tolist()}
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(os.path.join(args.out, "quant_types.expected.json"), "w") as f:
        json.dump(expected, f)
    print({k: v["type"] for k, v in expected.items()})


if __name__ == "__main__":
    main()
