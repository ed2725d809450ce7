#!/usr/bin/env python3
"""Writes the PyTorch checkpoint fixtures used by tests/torch_loader.rs into tests/fixtures/torch/.

Run from the repository root:  python3 tests/golden/make_torch_fixtures.py

Each `<name>.pt` that holds readable tensors gets a `<name>.json` next to it:
    {"tensors": [{"name", "dtype", "shape", "strides", "storage_offset", "bits" | "ints"}, ...]}
in state-dict order, where "bits" are the u32 bit patterns of the row-major values converted to
float32 (exact for f32/f16/bf16; round-to-nearest for f64), and "ints" the values of integer tensors.
"""

import io
import json
import os
import struct
import zipfile
from collections import OrderedDict

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "torch")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(1234)


def expected(sd):
    out = []
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        rec = {
            "name": name,
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape),
            "strides": list(t.stride()),
            "storage_offset": t.storage_offset(),
        }
        if t.dtype.is_floating_point:
            flat = t.detach().float().contiguous().reshape(-1).tolist()
            rec["bits"] = [struct.unpack("<I", struct.pack("<f", v))[0] for v in flat]
        else:
            rec["ints"] = [int(v) for v in t.detach().contiguous().reshape(-1).tolist()]
        out.append(rec)
    return {"tensors": out}


def save(name, obj, sd):
    torch.save(obj, os.path.join(OUT, name + ".pt"))
    if sd is not None:
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(expected(sd), f, indent=None, separators=(",", ":"))
            f.write("\n")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 2)
        self.proj = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)


# (1) flat state dict: an nn.Module state dict (OrderedDict with `_metadata`, set by BUILD) plus
# assorted dtypes and shapes, and one nn.Parameter (pickled via _rebuild_parameter).
model = Tiny()
sd = model.state_dict()
sd["proj.weight"] = sd["proj.weight"].half()
sd["scalar"] = torch.tensor(3.25)
sd["vec"] = torch.randn(5)
sd["mat_f16"] = torch.randn(3, 4).half()
sd["f64"] = torch.randn(2, 3, dtype=torch.float64)
sd["ids"] = torch.arange(6, dtype=torch.int64) - 2
sd["param"] = torch.nn.Parameter(torch.randn(2, 2))
sd["empty"] = torch.zeros(0, 3)
save("flat", sd, sd)

# (2) MiniGPT-4 training-runner wrapper: only `model` entries are the state dict.
model2 = Tiny()
opt = torch.optim.AdamW(model2.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
for p in model2.parameters():
    p.grad = torch.randn_like(p)
opt.step()
sd2 = OrderedDict((k, v.half()) for k, v in model2.state_dict().items())
wrapper = {
    "model": sd2,
    "optimizer": opt.state_dict(),
    "config": {
        "run": {"task": "image_text_pretrain", "init_lr": 3e-5, "amp": True, "max_epoch": 5},
        "model": {"arch": "mini_gpt4", "freeze_vit": True, "prompt_path": "prompts/alignment.txt"},
        "tags": ["stage2", 7, None, 1.5],
    },
    "scaler": None,
    "epoch": 3,
}
save("wrapper", wrapper, sd2)

# (3) views sharing one storage: a slice, a transpose (non-contiguous), a column (stride 6).
a = torch.randn(8, 6)
shared = OrderedDict([("a", a), ("b", a[2:5]), ("c", a.t()), ("d", a[:, 1]), ("e", a[3, 2])])
save("shared", shared, shared)

# (4) bf16, also a transposed bf16 view.
w = torch.randn(5, 7).bfloat16()
bf = OrderedDict([("w", w), ("wt", w.t()), ("row", w[1:3, 2:6])])
save("bf16", bf, bf)

# (6) legacy (pre-1.6) format.
torch.save({"x": torch.randn(2)}, os.path.join(OUT, "legacy.pt"), _use_new_zipfile_serialization=False)


def write_zip(path, entries):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data)


# (5) malicious pickle: {'a': os.system('echo pwned')} built from raw opcodes.
evil = (
    b"\x80\x02"  # PROTO 2
    b"}q\x00"  # EMPTY_DICT, BINPUT 0
    b"X\x01\x00\x00\x00a"  # BINUNICODE 'a'
    b"cos\nsystem\n"  # GLOBAL 'os system'
    b"X\x0a\x00\x00\x00echo pwned"  # BINUNICODE
    b"\x85"  # TUPLE1
    b"R"  # REDUCE
    b"s"  # SETITEM
    b"."  # STOP
)
write_zip(
    os.path.join(OUT, "malicious.pt"),
    [("archive/data.pkl", evil), ("archive/byteorder", b"little"), ("archive/version", b"3\n")],
)

# (7) a storage record shorter than data.pkl claims: the `shared` checkpoint re-zipped under a
# different archive name with its only storage record cut in half.
with zipfile.ZipFile(os.path.join(OUT, "shared.pt")) as z:
    items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
cut = []
for name, data in items:
    rest = name.split("/", 1)[1]
    if rest.startswith("data/"):
        data = data[: len(data) // 2]
    cut.append(("oversized/" + rest, data))
write_zip(os.path.join(OUT, "oversized.pt"), cut)

# (8) the `shared` checkpoint re-zipped (Python zipfile layout, no 64-byte alignment) under a
# different archive name: must read the same values.
write_zip(os.path.join(OUT, "renamed.pt"), [("renamed_ckpt/" + n.split("/", 1)[1], d) for n, d in items])

total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, torch {torch.__version__}")
