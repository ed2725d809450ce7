"""Reference dequantisation of GGUF block types by gguf-py (llama.cpp's own Python package).

Writes tests/fixtures/gguf/blocks.json: for each type, random raw blocks (with finite f16
scales) and the values `gguf.quants.dequantize` gives for them. Run: python3 this_file.py
"""
import json
import pathlib

import numpy as np
import gguf
from gguf import quants

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "gguf" / "blocks.json"
rng = np.random.default_rng(1234)
cases = {}
for name, scale_offsets in [
    ("Q4_0", [0]),
    ("Q4_1", [0, 2]),
    ("Q8_0", [0]),
    ("Q4_K", [0, 2]),
    ("Q6_K", [208]),
]:
    ty = gguf.GGMLQuantizationType[name]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[ty]
    n_blocks = 3
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for b in range(n_blocks):
        for off in scale_offsets:
            raw[b, off:off + 2] = np.frombuffer(np.float16(rng.uniform(-0.05, 0.05)).tobytes(), dtype=np.uint8)
    values = quants.dequantize(raw.reshape(-1), ty).reshape(-1).astype(np.float32)
    assert values.size == n_blocks * block_elems and np.isfinite(values).all()
    cases[name] = {
        "raw": raw.reshape(-1).tolist(),
        "n": int(values.size),
        "values_f32_bits": values.view(np.uint32).tolist(),
    }

OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(json.dumps({"script": "tests/golden/make_gguf_block_goldens.py", "gguf": getattr(gguf, "__version__", "0.19.0"), "numpy": np.__version__, "cases": cases}))
print(OUT, OUT.stat().st_size)
