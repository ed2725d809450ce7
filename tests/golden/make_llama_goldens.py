#!/usr/bin/env python3
"""Tiny random LLaMA checkpoints plus reference logits from HuggingFace transformers.

Writes tests/fixtures/llama/<name>/ for four configurations:

  mha_untied_hd64   fp32 safetensors, one file (model.safetensors)
  gqa_tied_hd64     fp32 safetensors, sharded (model-0000i-of-0000n.safetensors + index)
  gqa_untied_hd128  fp16 PyTorch pickle, sharded (pytorch_model-0000i-of-0000n.bin + index)
  mha_tied_hd128    fp32 PyTorch pickle, one file (pytorch_model.bin)

and in each directory golden.safetensors with
  input_ids      int32   [T]         T = 12 random ids in [3, vocab)
  logits         float32 [T, vocab]  one forward over all T tokens, no KV cache
  logits_cached  float32 [T, vocab]  prefill of the first 5 tokens, then 7 single-token
                                     decode steps through past_key_values
and metadata {"meta": JSON string} (versions, config name, max |logits - logits_cached|).

Run from anywhere, CPU only: python3 tests/golden/make_llama_goldens.py
Deterministic for a given torch version (torch.manual_seed per config).

Notes
- transformers 5 save_pretrained writes only safetensors, so the .bin checkpoints are written
  here with torch.save (the default zip-based format) and huggingface_hub's shard splitter, in
  the layout transformers 4 used (pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin with
  pytorch_model.bin.index.json = {"metadata": {"total_size": N}, "weight_map": {name: file}}).
  Their config.json is rewritten in the transformers 4 layout (top-level "rope_theta" and
  "torch_dtype", no "rope_parameters"), as old .bin checkpoints ship; the safetensors ones keep
  the transformers 5 layout (nested "rope_parameters": {"rope_theta", "rope_type"}, "dtype").
  Every checkpoint is reloaded with from_pretrained and must reproduce the golden logits.
- Tied checkpoints contain no lm_head.weight tensor (transformers drops it on save and ties it
  back to model.embed_tokens.weight on load); the script asserts that.
- gqa_untied_hd128 is stored in fp16; its golden logits come from the fp32 model whose weights
  were rounded to fp16 and back, so loading the file and computing in f32 reproduces them.
"""

import inspect
import json
import os
import shutil
import sys

import numpy as np
import safetensors
import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.numpy import save_file
from safetensors.torch import load_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "llama")

T = 12
PREFILL = 5

COMMON = dict(
    vocab_size=320,
    intermediate_size=224,
    max_position_embeddings=64,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    "mha_untied_hd64": dict(
        seed=1,
        fmt="safetensors",
        dtype=torch.float32,
        shard=None,
        cfg=dict(
            hidden_size=128,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
        ),
    ),
    "gqa_tied_hd64": dict(
        seed=2,
        fmt="safetensors",
        dtype=torch.float32,
        shard="1500KB",
        cfg=dict(
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
        ),
    ),
    "gqa_untied_hd128": dict(
        seed=3,
        fmt="bin",
        dtype=torch.float16,
        shard="1MB",
        cfg=dict(
            hidden_size=256,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_hidden_layers=3,
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
        ),
    ),
    "mha_tied_hd128": dict(
        seed=4,
        fmt="bin",
        dtype=torch.float32,
        shard=None,
        cfg=dict(
            hidden_size=256,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=2,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
        ),
    ),
}


def versions():
    import gguf  # noqa: F401  (recorded for completeness; not used here)
    from importlib.metadata import version

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "gguf": version("gguf"),
        "python": sys.version.split()[0],
    }


def reinit(model, cfg):
    """Replaces the default init (std 0.02, norms = 1) by one that makes every part matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    if cfg["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        # named_parameters() lists a shared parameter once, so it was initialised once
        assert "lm_head.weight" not in dict(model.named_parameters())


@torch.no_grad()
def full_logits(model, ids):
    out = model(input_ids=ids[None], use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def cached_logits(model, ids):
    # transformers 5.24 renamed forward(past_key_values=) to forward(cache=); accept both
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=ids[None, :PREFILL],
        position_ids=torch.arange(PREFILL)[None],
        use_cache=True,
        **{kw: cache},
    )
    rows = [out.logits[0]]
    for t in range(PREFILL, len(ids)):
        assert cache.get_seq_length() == t
        out = model(
            input_ids=ids[None, t : t + 1],
            position_ids=torch.tensor([[t]]),
            use_cache=True,
            **{kw: cache},
        )
        rows.append(out.logits[0])
    return torch.cat(rows, 0).float()


def save_bin(model, path, dtype, shard, cfg_dict):
    """Writes a transformers-4-style PyTorch checkpoint (single or sharded)."""
    sd = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    if cfg_dict["tie_word_embeddings"]:
        # transformers drops the tied copy on save; do the same
        del sd["lm_head.weight"]
    if shard is None:
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    else:
        split = split_torch_state_dict_into_shards(
            sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=shard
        )
        assert split.is_sharded and len(split.filename_to_tensors) >= 2, split.filename_to_tensors
        for fname, names in split.filename_to_tensors.items():
            torch.save({n: sd[n] for n in names}, os.path.join(path, fname))
        index = {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")


def legacy_config(path, dtype):
    """Rewrites config.json in the transformers 4 layout (what old .bin checkpoints ship)."""
    p = os.path.join(path, "config.json")
    with open(p) as f:
        c = json.load(f)
    rope = c.pop("rope_parameters")
    assert rope == {"rope_theta": rope["rope_theta"], "rope_type": "default"}, rope
    c["rope_theta"] = rope["rope_theta"]
    c["rope_scaling"] = None
    c.pop("dtype", None)
    c["torch_dtype"] = {torch.float16: "float16", torch.float32: "float32"}[dtype]
    with open(p, "w") as f:
        json.dump(dict(sorted(c.items())), f, indent=2)
        f.write("\n")


def stored_tensor_names(path):
    names = set()
    for fname in os.listdir(path):
        if fname.endswith(".safetensors") and fname != "golden.safetensors":
            names |= set(load_file(os.path.join(path, fname)).keys())
        elif fname.endswith(".bin"):
            names |= set(torch.load(os.path.join(path, fname), weights_only=True).keys())
    return names


def make(name, spec, vers):
    path = os.path.join(OUT, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)

    torch.manual_seed(spec["seed"])
    cfg = LlamaConfig(**COMMON, **spec["cfg"])
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    reinit(model, spec["cfg"])
    if spec["dtype"] == torch.float16:
        # the logits must be those of the weights as stored
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    ids = torch.randint(3, cfg.vocab_size, (T,), dtype=torch.long)

    logits = full_logits(model, ids)
    logits_cached = cached_logits(model, ids)
    diff = (logits - logits_cached).abs().max().item()
    assert diff < 1e-5, f"{name}: cached vs full max diff {diff}"
    assert logits.std().item() > 0.3, f"{name}: logits too flat ({logits.std().item()})"

    if spec["fmt"] == "safetensors":
        kw = {} if spec["shard"] is None else {"max_shard_size": spec["shard"]}
        model.save_pretrained(path, **kw)
        if spec["shard"] is None:
            assert os.path.exists(os.path.join(path, "model.safetensors"))
        else:
            shards = [f for f in os.listdir(path) if f.startswith("model-")]
            assert len(shards) >= 2 and os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    else:
        model.save_pretrained(path)  # config.json + generation_config.json + model.safetensors
        os.remove(os.path.join(path, "model.safetensors"))
        save_bin(model, path, spec["dtype"], spec["shard"], spec["cfg"])
        legacy_config(path, spec["dtype"])

    names = stored_tensor_names(path)
    if spec["cfg"]["tie_word_embeddings"]:
        assert "lm_head.weight" not in names, f"{name}: tied checkpoint holds lm_head.weight"
    else:
        assert "lm_head.weight" in names

    # Reload exactly as a user would, and check it reproduces the goldens.
    re = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    if spec["cfg"]["tie_word_embeddings"]:
        assert re.lm_head.weight.data_ptr() == re.model.embed_tokens.weight.data_ptr()
    assert re.config.rope_parameters["rope_theta"] == spec["cfg"]["rope_theta"]
    rediff = (full_logits(re, ids) - logits).abs().max().item()
    assert rediff < 1e-6, f"{name}: reloaded checkpoint differs by {rediff}"

    meta = dict(vers)
    meta.update(
        config=name,
        seed=str(spec["seed"]),
        T=str(T),
        prefill=str(PREFILL),
        weights_dtype=str(spec["dtype"]).removeprefix("torch."),
        max_abs_diff_logits_vs_cached=f"{diff:.3e}",
        script="tests/golden/make_llama_goldens.py",
    )
    save_file(
        {
            "input_ids": ids.to(torch.int32).numpy(),
            "logits": logits.numpy().astype(np.float32),
            "logits_cached": logits_cached.numpy().astype(np.float32),
        },
        os.path.join(path, "golden.safetensors"),
        # one key: safetensors writes a multi-key metadata map in random order (not reproducible)
        metadata={"meta": json.dumps(meta, sort_keys=True)},
    )
    files = sorted(os.listdir(path))
    print(
        f"{name}: files={files} logits std={logits.std().item():.3f} "
        f"cached diff={diff:.2e} reload diff={rediff:.2e} tensors={len(names)}"
    )


def main():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    vers = versions()
    print(vers)
    for name, spec in CONFIGS.items():
        make(name, spec, vers)


if __name__ == "__main__":
    main()
