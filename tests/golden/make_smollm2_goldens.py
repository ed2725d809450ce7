#!/usr/bin/env python3
"""Greedy-decoding and tokenizer goldens for SmolLM2-135M-Instruct (Q4_1 GGUF) from transformers.

Needs the model: bash tests/fetch-models.sh (puts it at .models/SmolLM2-135M-Instruct.Q4_1.gguf).
Run: python3 tests/golden/make_smollm2_goldens.py   (CPU only, about a minute)

transformers loads the GGUF itself: it dequantises every tensor to f32 (Q4_1 linears, Q8_0
token_embd, F32 norms), undoes llama.cpp's Q/K row permutation, and ties lm_head to
model.embed_tokens (the file has no output.weight). The tokenizer is rebuilt from the GGUF
tokenizer.ggml.* fields.

Writes tests/fixtures/smollm2/
  greedy.json            see the "format" key inside for the meaning of every field
  first_logits.safetensors
                         p0, p1, ...: float32 [vocab], the logits at the last prompt position
                         (the distribution the first generated token is drawn from), one per prompt
  tokenizer_ids.json     ids / decode of a list of tricky strings

Greedy decoding is a manual loop (argmax of the last position's logits, fed back through a
DynamicCache), 32 new tokens, never stopping at EOS. It is cross-checked against
model.generate(do_sample=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=32,
eos_token_id=None) and against one uncached forward over prompt + generated tokens.
"""

import hashlib
import inspect
import json
import os
import sys
from importlib.metadata import version

import numpy as np
import safetensors
import torch
import transformers
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, ".models")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join(ROOT, "tests", "fixtures", "smollm2")
NEW_TOKENS = 32

PLAIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
CHAT = [{"role": "user", "content": "What is 2+2?"}]

TOKENIZER_STRINGS = [
    "Hello world",
    "  leading spaces",
    "multiple   spaces",
    "new\nline\n\n",
    "digits 1234567 3.14",
    "accents: café naïve Zürich",
    "CJK: 你好世界",
    "emoji: 🙂🚀",
    "<|im_start|>user\nhi<|im_end|>",
    "text after special<|im_end|>tail",
]


def versions():
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "gguf": version("gguf"),
        "tokenizers": version("tokenizers"),
        "python": sys.version.split()[0],
    }


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_kw(model):
    # transformers 5.24 renamed forward(past_key_values=) to forward(cache=); accept both
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy(model, prompt_ids):
    """Manual greedy loop; returns generated ids, per-step logits of the last position."""
    kw = cache_kw(model)
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids])
    out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=True, **{kw: cache})
    step_logits = [out.logits[0, -1].float().clone()]
    generated = []
    pos = ids.shape[1]
    for i in range(NEW_TOKENS):
        nxt = int(torch.argmax(step_logits[-1]))
        generated.append(nxt)
        if i == NEW_TOKENS - 1:
            break
        out = model(
            input_ids=torch.tensor([[nxt]]),
            position_ids=torch.tensor([[pos]]),
            use_cache=True,
            **{kw: cache},
        )
        pos += 1
        step_logits.append(out.logits[0, -1].float().clone())
    return generated, step_logits


@torch.no_grad()
def check_with_generate(model, prompt_ids):
    out = model.generate(
        input_ids=torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=None,  # never stop at EOS (checked: generation_config's eos would stop it)
        pad_token_id=model.generation_config.pad_token_id,
        top_k=None,
        top_p=None,
        temperature=None,
    )
    return out[0, len(prompt_ids) :].tolist()


@torch.no_grad()
def check_uncached(model, prompt_ids, generated, step_logits):
    seq = torch.tensor([prompt_ids + generated[:-1]])
    logits = model(input_ids=seq, use_cache=False).logits[0].float()
    rows = logits[len(prompt_ids) - 1 :]
    cached = torch.stack(step_logits)
    assert rows.shape == cached.shape
    diff = (rows - cached).abs().max().item()
    argmax_mismatch = int((rows.argmax(-1) != torch.tensor(generated)).sum())
    return diff, argmax_mismatch


def main():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    path = os.path.join(MODEL_DIR, GGUF)
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run bash tests/fetch-models.sh")
    os.makedirs(OUT, exist_ok=True)
    vers = versions()
    print(vers)

    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, gguf_file=GGUF, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = model.config
    tied_in_memory = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    chat_prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompts = PLAIN_PROMPTS + [chat_prompt]

    add_bos = getattr(tok, "add_bos_token", None)
    results = []
    first_logits = {}
    min_margin = (float("inf"), None, None)
    for i, prompt in enumerate(prompts):
        prompt_ids = tok(prompt)["input_ids"]
        generated, step_logits = greedy(model, prompt_ids)
        margins = []
        second_ids = []
        for s, lg in enumerate(step_logits):
            top2 = torch.topk(lg, 2)
            assert int(top2.indices[0]) == generated[s]
            margins.append(float(top2.values[0] - top2.values[1]))
            second_ids.append(int(top2.indices[1]))
            if margins[-1] < min_margin[0]:
                min_margin = (margins[-1], i, s)
        gen_check = check_with_generate(model, prompt_ids)
        uncached_diff, uncached_mismatch = check_uncached(model, prompt_ids, generated, step_logits)
        top5 = torch.topk(step_logits[0], 5)
        first_logits[f"p{i}"] = step_logits[0].numpy().astype(np.float32)
        eos_steps = [s for s, t in enumerate(generated) if t == tok.eos_token_id]
        results.append(
            {
                "name": f"p{i}",
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                # the chat prompt starts with <|im_start|> (= bos_token_id 1) from the template text;
                # the tokenizer itself adds nothing
                "tokenizer_added_bos": len(prompt_ids) != len(tok(prompt, add_special_tokens=False)["input_ids"]),
                "prompt_ids_start_with_bos_id": bool(prompt_ids and prompt_ids[0] == tok.bos_token_id),
                "generated_ids": generated,
                "generated_text": tok.decode(generated),
                "margins": margins,
                "second_ids": second_ids,
                "min_margin": min(margins),
                "eos_steps": eos_steps,
                "first_logits_top5": {
                    "ids": top5.indices.tolist(),
                    "values": top5.values.tolist(),
                },
                "checks": {
                    "generate_matches": gen_check == generated,
                    "uncached_max_abs_diff": uncached_diff,
                    "uncached_argmax_mismatches": uncached_mismatch,
                },
            }
        )
        print(
            f"p{i}: {len(prompt_ids)} prompt ids, min margin {min(margins):.4f}, eos at {eos_steps}, "
            f"generate match {gen_check == generated}, uncached diff {uncached_diff:.2e} "
            f"mismatches {uncached_mismatch}\n    {tok.decode(generated)!r}"
        )
        assert gen_check == generated, (gen_check, generated)
        assert uncached_mismatch == 0 and uncached_diff < 1e-3

    greedy_json = {
        "format": {
            "prompts[].prompt": "prompt text, tokenized with tokenizer(prompt) (no BOS: add_bos_token is false)",
            "prompts[].prompt_ids": "exactly tokenizer(prompt)['input_ids']",
            "prompts[].generated_ids": f"{NEW_TOKENS} greedy tokens from a manual argmax loop with a KV cache; "
            "EOS does not stop it",
            "prompts[].margins": "per generated step: top-1 logit minus top-2 logit",
            "prompts[].second_ids": "per generated step: the runner-up token id",
            "prompts[].eos_steps": "steps whose generated token is eos_token_id",
            "prompts[].first_logits_top5": "top-5 ids and values of the logits at the last prompt position",
            "prompts[].checks": "generate(do_sample=False, num_beams=1, repetition_penalty=1.0, "
            "max_new_tokens=32, eos_token_id=None) gives the same ids; one uncached forward over prompt+generated reproduces the cached logits",
            "first_logits.safetensors": "p<i>: float32 [vocab] full logits at the last prompt position of prompt i",
        },
        "model": {
            "file": f".models/{GGUF}",
            "sha256": sha256(path),
            "loader": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32, "
            "attn_implementation='eager'); weights dequantised to f32",
        },
        "config": {
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            "rope_theta": cfg.rope_parameters["rope_theta"],
            "rope_parameters": cfg.rope_parameters,
            "rms_norm_eps": cfg.rms_norm_eps,
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "lm_head_is_embed_tokens_in_memory": tied_in_memory,
        },
        "tokenizer": {
            "class": type(tok).__name__,
            "add_bos_token": add_bos,
            "add_eos_token": getattr(tok, "add_eos_token", None),
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "unk_token_id": tok.unk_token_id,
            "generation_config_eos_token_id": model.generation_config.eos_token_id,
            "chat_template": tok.chat_template,
        },
        "decoding": {
            "method": "manual greedy loop (argmax), DynamicCache, eager attention, float32",
            "max_new_tokens": NEW_TOKENS,
            "stops_at_eos": False,
        },
        "min_margin": {"value": min_margin[0], "prompt": f"p{min_margin[1]}", "step": min_margin[2]},
        "versions": vers,
        "script": "tests/golden/make_smollm2_goldens.py",
        "prompts": results,
    }
    with open(os.path.join(OUT, "greedy.json"), "w") as f:
        json.dump(greedy_json, f, indent=1, ensure_ascii=False)
        f.write("\n")
    save_file(
        first_logits,
        os.path.join(OUT, "first_logits.safetensors"),
        metadata={"meta": json.dumps(dict(vers, script="tests/golden/make_smollm2_goldens.py"), sort_keys=True)},
    )

    # Tokenizer goldens
    entries = []
    for s in TOKENIZER_STRINGS:
        with_special = tok(s, add_special_tokens=True)["input_ids"]
        plain = tok(s, add_special_tokens=False)["input_ids"]
        entries.append(
            {
                "text": s,
                "ids_add_special_tokens": with_special,
                "ids_no_special_tokens": plain,
                "tokens": tok.convert_ids_to_tokens(plain),
                "decode_add_special_tokens": tok.decode(with_special),
                "decode_no_special_tokens": tok.decode(plain),
                "decode_roundtrips": tok.decode(plain) == s,
            }
        )
    tok_json = {
        "tokenizer": "AutoTokenizer.from_pretrained(dir, gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf)",
        "notes": "tokens = convert_ids_to_tokens(ids_no_special_tokens) (byte-level BPE pieces); "
        "decode = tokenizer.decode(ids) with default arguments (special tokens kept)",
        "add_bos_token": add_bos,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "added_tokens": {str(k): v.content for k, v in sorted(tok.added_tokens_decoder.items())},
        "versions": vers,
        "script": "tests/golden/make_smollm2_goldens.py",
        "strings": entries,
    }
    with open(os.path.join(OUT, "tokenizer_ids.json"), "w") as f:
        json.dump(tok_json, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for e in entries:
        print(repr(e["text"]), e["ids_no_special_tokens"], e["decode_roundtrips"])
    print(f"min margin {min_margin}")


if __name__ == "__main__":
    main()
