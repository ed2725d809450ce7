#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/seed-* from the test fixtures (and, for
the SentencePiece target, the LLaMA tokenizer.model cut down to its first pieces). Run from the
repository root: python3 fuzz/make_seeds.py [path/to/llama/tokenizer.model]"""
import os
import shutil
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def read(*p):
    with open(os.path.join(FIX, *p), "rb") as f:
        return f.read()


# ---- GGUF: a tiny "llama" (SentencePiece-like) and a tiny "gpt2" tokenizer, tensors of every
# supported type
def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(kv, tensors, align=32):
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, ty, val in kv:
        out += gstr(k) + struct.pack("<I", ty) + val
    off = 0
    infos, datas = b"", []
    for name, dims, ty, data in tensors:
        infos += gstr(name) + struct.pack("<I", len(dims))
        infos += b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", ty, off)
        datas.append(data)
        off += -(-len(data) // align) * align
    out += infos
    out += b"\0" * (-len(out) % align)
    for d in datas:
        out += d + b"\0" * (-len(d) % align)
    return out


def arr(ety, items):
    return struct.pack("<IQ", ety, len(items)) + b"".join(items)


u32 = lambda v: struct.pack("<I", v)
f32 = lambda v: struct.pack("<f", v)
gbool = lambda v: bytes([1 if v else 0])

toks = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % i for i in range(256)] + [
    "▁", "h", "e", "l", "o", "▁h", "he", "ll", "lo", "▁he", "llo", "▁hello", "w", "r", "d"]
types = [2, 3, 3] + [6] * 256 + [1] * 15
scores = [0.0] * 259 + [-float(i) for i in range(15)]
kv_llama = [
    ("general.architecture", 8, gstr("llama")),
    ("general.alignment", 4, u32(32)),
    ("llama.block_count", 4, u32(1)),
    ("llama.embedding_length", 4, u32(32)),
    ("llama.attention.head_count", 4, u32(2)),
    ("llama.feed_forward_length", 4, u32(64)),
    ("llama.context_length", 4, u32(64)),
    ("tokenizer.ggml.model", 8, gstr("llama")),
    ("tokenizer.ggml.tokens", 9, arr(8, [gstr(t) for t in toks])),
    ("tokenizer.ggml.scores", 9, arr(6, [f32(s) for s in scores])),
    ("tokenizer.ggml.token_type", 9, arr(5, [struct.pack("<i", t) for t in types])),
    ("tokenizer.ggml.bos_token_id", 4, u32(1)),
    ("tokenizer.ggml.eos_token_id", 4, u32(2)),
    ("tokenizer.ggml.add_bos_token", 7, gbool(True)),
]
blocks = [
    ("t.f32", [4, 2], 0, bytes(range(32))),
    ("t.f16", [8], 1, bytes(range(16))),
    ("t.bf16", [8], 30, bytes(range(16))),
    ("t.q4_0", [32], 2, bytes(range(18))),
    ("t.q4_1", [32], 3, bytes(range(20))),
    ("t.q8_0", [32], 8, bytes(range(34))),
    ("t.q4_k", [256], 12, bytes(i % 251 for i in range(144))),
    ("t.q6_k", [256], 14, bytes(i % 251 for i in range(210))),
]
put("gguf", "llama", gguf(kv_llama, blocks))
g2 = ["a", "b", "ab", "Ġ", "Ġa", "<|endoftext|>"]
kv_gpt2 = [
    ("general.architecture", 8, gstr("llama")),
    ("tokenizer.ggml.model", 8, gstr("gpt2")),
    ("tokenizer.ggml.pre", 8, gstr("smollm")),
    ("tokenizer.ggml.tokens", 9, arr(8, [gstr(t) for t in g2])),
    ("tokenizer.ggml.token_type", 9, arr(5, [struct.pack("<i", t) for t in [1, 1, 1, 1, 1, 3]])),
    ("tokenizer.ggml.merges", 9, arr(8, [gstr("a b"), gstr("Ġ a")])),
    ("tokenizer.ggml.eos_token_id", 4, u32(5)),
    ("nested", 9, arr(9, [arr(4, [u32(1), u32(2)]), arr(8, [gstr("x")])])),
]
put("gguf", "gpt2", gguf(kv_gpt2, blocks[:2]))

# ---- safetensors: small files of every dtype, one with metadata, one empty
def st(entries, meta=None):
    import json
    h, data = {}, b""
    if meta is not None:
        h["__metadata__"] = meta
    for name, dtype, shape, raw in entries:
        h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    hb = json.dumps(h).encode()
    hb += b" " * (-(8 + len(hb)) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


put("safetensors", "dtypes", st([
    ("a", "F32", [2, 2], bytes(16)), ("b", "F16", [3], bytes(6)), ("c", "BF16", [1, 2], bytes(4)),
    ("d", "F64", [1], bytes(8)), ("e", "I64", [1], bytes(8)), ("f", "I32", [2], bytes(8)),
    ("g", "I16", [1], bytes(2)), ("h", "I8", [3], bytes(3)), ("i", "U8", [2, 1], bytes(2)),
    ("j", "BOOL", [1], bytes(1)), ("k", "F32", [0, 4], b"")], {"format": "pt"}))
put("safetensors", "empty", st([]))

# ---- torch: the checkpoint fixtures as they are
for n in ["bf16", "flat", "legacy", "malicious", "oversized", "renamed", "shared", "wrapper"]:
    put("torch", n, read("torch", n + ".pt"))

# ---- SentencePiece: LLaMA's model cut to its first pieces (specials, the 256 bytes, some
# merges), with its trainer and normalizer specs
def varint(b, i):
    v, s = 0, 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return v, i


spm = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/llama-tokenizer/tokenizer.model"
if os.path.isfile(spm):
    b = open(spm, "rb").read()
    i, pieces, rest = 0, 0, b""
    out = b""
    while i < len(b):
        start = i
        key, i = varint(b, i)
        assert key & 7 == 2
        n, i = varint(b, i)
        i += n
        if key >> 3 == 1:
            if pieces < 400:
                out += b[start:i]
            pieces += 1
        else:
            rest += b[start:i]
    put("sentencepiece", "llama400", out + rest)
else:
    print("no SentencePiece model at", spm, "- sentencepiece seeds not written", file=sys.stderr)

# ---- images: the small fixtures (every decoder path), JPEG-only ones for the jpeg target
small = []
for n in sorted(os.listdir(os.path.join(FIX, "images"))):
    p = os.path.join(FIX, "images", n)
    if n.endswith((".jpg", ".png", ".webp")) and ".rgb." not in n and ".224." not in n \
            and os.path.getsize(p) <= 4096:
        small.append(n)
for n in small:
    put("image", n, read("images", n))
    if n.endswith(".jpg"):
        put("jpeg", n, read("images", n))

# ---- package: config + NUL + index; a shard's header and first data bytes
pkg = ("minigpt4", "vicuna0_tiny_pkg")
put("package_config", "vicuna0_tiny", read(*pkg, "config.json") + b"\0" + read(*pkg, "model.safetensors.index.json"))
shard = read(*pkg, "model-00001-of-00001.safetensors")
hl = struct.unpack("<Q", shard[:8])[0]
put("package_shard", "head", bytes([3]) + shard[: 8 + hl + 4096])
put("package_shard", "head_bytewise", bytes([0]) + shard[: 8 + hl + 64])

# ---- tokenizer.json: a small byte-fallback BPE with a BOS template (as the converter writes
# them) + tokenizer_config.json, and a byte-level one
import json

vocab = {t: i for i, t in enumerate(toks)}
bpe = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])],
    "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
    "pre_tokenizer": None,
    "post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
              "vocab": vocab, "merges": [["▁", "h"], ["h", "e"], ["l", "l"], ["l", "o"], ["▁h", "e"],
                                         ["l", "lo"], ["▁he", "llo"]]},
}
cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>"}
put("tokenizer_json", "spm_bpe", json.dumps(bpe, ensure_ascii=False).encode() + b"\0" + json.dumps(cfg).encode())
bl = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": 5, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True}],
    "normalizer": None,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": {t: i for i, t in enumerate(g2)}, "merges": [["a", "b"], ["Ġ", "a"]]},
}
put("tokenizer_json", "byte_level", json.dumps(bl, ensure_ascii=False).encode())
