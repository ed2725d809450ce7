#!/usr/bin/env python3
"""Writes tests/fixtures/minigpt4/vicuna0_tiny_orig/: the tiny Vicuna-v0 MiniGPT-4 of
tests/fixtures/minigpt4/vicuna0_tiny/ (same values) in the exact formats users download
(spec section 8.1), as `torch.save` writes them:

    eva_vit_g.pth                   flat state dict, ViT keys without `visual_encoder.`, fp16
    blip2_pretrained_flant5xxl.pth  {'model': Q-Former + query_tokens + ln_vision + t5_proj
                                    + the int64 position_ids buffer}, fp32
    pretrained_minigpt4.pth         {'model': llama_proj, 'optimizer': AdamW state,
                                    'config': ..., 'scaler': ..., 'epoch': 3}, fp32
    vicuna/                         HF directory: config.json, generation_config.json,
                                    tokenizer.model, two pytorch_model-*.bin shards + index, fp16

Run from the repository root:  python3 tests/golden/make_original_checkpoints.py
"""

import json
import os
import shutil
from collections import OrderedDict

import torch
from safetensors.torch import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SRC = os.path.join(ROOT, "tests", "fixtures", "minigpt4", "vicuna0_tiny")
OUT = os.path.join(ROOT, "tests", "fixtures", "minigpt4", "vicuna0_tiny_orig")


def main():
    torch.manual_seed(4321)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(os.path.join(OUT, "vicuna"))
    vision = load_file(os.path.join(SRC, "vision.safetensors"))

    vit = OrderedDict(
        (k[len("visual_encoder."):], v.to(torch.float16).clone())
        for k, v in vision.items()
        if k.startswith("visual_encoder.")
    )
    torch.save(vit, os.path.join(OUT, "eva_vit_g.pth"))

    blip2 = OrderedDict()
    for k, v in vision.items():
        if k.startswith("Qformer.") or k in ("query_tokens", "ln_vision.weight", "ln_vision.bias"):
            blip2[k] = v.float().clone()
    blip2["Qformer.bert.embeddings.position_ids"] = torch.arange(32, dtype=torch.int64)[None]
    hidden = vision["query_tokens"].shape[-1]
    blip2["t5_proj.weight"] = torch.randn(48, hidden)
    blip2["t5_proj.bias"] = torch.randn(48)
    torch.save({"model": blip2}, os.path.join(OUT, "blip2_pretrained_flant5xxl.pth"))

    proj = OrderedDict((k, vision[k].float().clone()) for k in ("llama_proj.weight", "llama_proj.bias"))
    params = [torch.nn.Parameter(v.clone()) for v in proj.values()]
    opt = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.05)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    scaler_state = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                    "growth_interval": 2000, "_growth_tracker": 17}
    torch.save(
        {
            "model": proj,
            "optimizer": opt.state_dict(),
            "config": {"run": {"task": "image_text_pretrain", "init_lr": 3e-5, "max_epoch": 5},
                       "model": {"arch": "mini_gpt4", "max_txt_len": 160}},
            "scaler": scaler_state,
            "epoch": 3,
        },
        os.path.join(OUT, "pretrained_minigpt4.pth"),
    )

    llm = load_file(os.path.join(SRC, "llm", "model.safetensors"))
    names = list(llm.keys())
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half],
              "pytorch_model-00002-of-00002.bin": names[half:]}
    weight_map = {}
    total = 0
    for fn, keys in shards.items():
        sd = OrderedDict((k, llm[k].to(torch.float16).clone()) for k in keys)
        torch.save(sd, os.path.join(OUT, "vicuna", fn))
        for k in keys:
            weight_map[k] = fn
            total += sd[k].numel() * 2
    with open(os.path.join(OUT, "vicuna", "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for fn in ("config.json", "generation_config.json", "tokenizer.model"):
        shutil.copy(os.path.join(SRC, "llm", fn), os.path.join(OUT, "vicuna", fn))
    for dp, _, fns in sorted(os.walk(OUT)):
        for fn in sorted(fns):
            p = os.path.join(dp, fn)
            print(f"{os.path.relpath(p, ROOT)}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
