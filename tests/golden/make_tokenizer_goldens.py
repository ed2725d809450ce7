#!/usr/bin/env python3
"""Reference token ids for the tokenizer tests.

Writes
  tests/fixtures/tokenizer/llama_ids.json    LLaMA SentencePiece model, transformers 4.30 slow
                                             LlamaTokenizer behaviour (legacy=True)
  tests/fixtures/tokenizer/smollm2_ids.json  SmolLM2-135M-Instruct GGUF tokenizer as loaded by
                                             transformers (AutoTokenizer(..., gguf_file=...))

Run from anywhere: python3 tests/golden/make_tokenizer_goldens.py
Needs sentencepiece, transformers, gguf; the LLaMA tokenizer.model at $LLAMA_TOKENIZER (default
/work/shared/data/llama-tokenizer/tokenizer.model) and the SmolLM2 GGUF at
.models/SmolLM2-135M-Instruct.Q4_1.gguf (bash tests/fetch-models.sh).

The reference for LLaMA is MiniGPT-4's tokenizer: transformers 4.30.0 `LlamaTokenizer` (slow,
SentencePiece), which is no longer shipped: transformers >= 5 `LlamaTokenizer(vocab_file=...)` is
a `tokenizers`-backed class that ignores the .model file. So the 4.30 slow code path is
reproduced here over `sentencepiece` directly (it is short):
  encode: `tokenize()` splits the text on the special tokens <unk>, <s>, </s> (its Trie; they
          are AddedTokens with lstrip=rstrip=False, so no whitespace is stripped around them),
          each remaining non-empty chunk goes through `sp_model.encode` (which prepends the dummy
          "▁" to every chunk: the legacy behaviour), special tokens map to their ids, and BOS
          (id 1) is prepended when add_special_tokens=True (add_bos_token=True, no EOS).
  decode: skip_special_tokens=True drops ids 0/1/2, then `convert_tokens_to_string` is
          `sp_model.decode(pieces)`; LlamaTokenizer has clean_up_tokenization_spaces=False.
The encode path is cross-checked against transformers' own SentencePiece backend with
legacy=True (`SentencePieceBackend`, add_special_tokens=False), and the script asserts that it
reproduces the verified ids of spec §6.3 exactly.
"""

import hashlib
import json
import os
import re
import sys

import sentencepiece as spm
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
LLAMA = os.environ.get("LLAMA_TOKENIZER", "/work/shared/data/llama-tokenizer/tokenizer.model")
SMOL_DIR = os.path.join(ROOT, ".models")
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

EDGE = [
    "",
    " ",
    "Hello world",
    "  leading spaces",
    "multiple   spaces",
    "trailing space ",
    "new\nline\n\n",
    "\ttab",
    "digits 1234567 3.14",
    "accents: café naïve Zürich",
    "CJK: 你好世界",
    "emoji: 🙂🚀",
    "<s>[INST] hi [/INST]",
    "text after special</s>tail",
    "###Human: x###Assistant: ",
]

SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once "
    "I provide it to you. Please answer my questions."
)
Q = "Describe this image in detail."
PROMPTS = {
    "vicuna0": SYSTEM + "###Human: <Img><ImageHere></Img> " + Q + "###Assistant: ",
    "llama2": SYSTEM + "<s>[INST] <Img><ImageHere></Img> " + Q + " [/INST] ",
    "minigptv2": "<s>[INST] <Img><ImageHere></Img> [vqa] What is in the image? [/INST]",
}
SYS_IDS = [1, 25538, 278, 1494, 1967, 29901, 529, 25518, 29958, 2940, 3916, 829, 25518, 15513,
           887, 674, 367, 2221, 304, 1074, 278, 1967, 2748, 306, 3867, 372, 304, 366, 29889,
           3529, 1234, 590, 5155, 29889]
# spec §6.3, verified with transformers 4.30.0
SPEC = {
    "vicuna0": [
        SYS_IDS + [2277, 29937, 29950, 7889, 29901, 529, 25518, 29958],
        [1533, 25518, 29958, 20355, 915, 445, 1967, 297, 9493, 29889, 2277, 29937, 7900, 22137,
         29901, 29871],
    ],
    "llama2": [
        SYS_IDS + [1, 518, 25580, 29962, 529, 25518, 29958],
        [1533, 25518, 29958, 20355, 915, 445, 1967, 297, 9493, 29889, 518, 29914, 25580, 29962,
         29871],
    ],
    "minigptv2": [
        [1, 1, 518, 25580, 29962, 529, 25518, 29958],
        [1533, 25518, 29958, 518, 29894, 25621, 29962, 1724, 338, 297, 278, 1967, 29973, 518,
         29914, 25580, 29962],
    ],
}


def llama():
    sp = spm.SentencePieceProcessor(model_file=LLAMA)
    assert sp.get_piece_size() == 32000
    special = {"<unk>": 0, "<s>": 1, "</s>": 2}
    split = re.compile("(" + "|".join(re.escape(s) for s in special) + ")")

    def encode(text, add_bos):
        ids = [1] if add_bos else []
        for chunk in split.split(text):
            if chunk in special:
                ids.append(special[chunk])
            elif chunk:
                ids.extend(sp.encode(chunk))
        return ids

    def decode(ids):
        return sp.decode([i for i in ids if i not in special.values()])

    # cross-check the encode path against transformers' SentencePiece backend (legacy=True)
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    hf = SentencePieceBackend(vocab_file=LLAMA, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>", legacy=True)

    cases = []
    for name, prompt in PROMPTS.items():
        segs = prompt.split("<ImageHere>")
        for i, seg in enumerate(segs):
            ids = encode(seg, i == 0)
            assert ids == SPEC[name][i], (name, i, ids, SPEC[name][i])
            cases.append({"name": f"{name}/seg{i}", "text": seg, "add_bos": i == 0, "ids": ids,
                          "decoded": decode(ids)})
    for text in EDGE:
        for add_bos in (False, True):
            ids = encode(text, add_bos)
            cases.append({"name": f"edge{'+bos' if add_bos else ''}: {text!r}", "text": text,
                          "add_bos": add_bos, "ids": ids, "decoded": decode(ids)})
    for c in cases:
        want = c["ids"][1:] if c["add_bos"] else c["ids"]
        got = hf.encode(c["text"], add_special_tokens=False)
        assert got == want, (c["name"], got, want)

    md5 = hashlib.md5(open(LLAMA, "rb").read()).hexdigest()
    return {
        "reference": "transformers 4.30 slow LlamaTokenizer (legacy) reproduced over sentencepiece;"
                     " decoded = decode(ids, skip_special_tokens=True)",
        "tokenizer_model_md5": md5,
        "versions": {"sentencepiece": spm.__version__, "transformers": transformers.__version__},
        "bos": 1, "eos": 2, "add_bos_default": True, "vocab_size": 32000,
        "cases": cases,
    }


def smollm2():
    from transformers import AutoTokenizer

    path = os.path.join(SMOL_DIR, SMOL_FILE)
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run bash tests/fetch-models.sh")
    t = AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_FILE)
    chat = t.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                 tokenize=False, add_generation_prompt=True)
    texts = EDGE + ["<|im_start|>user\nhi<|im_end|>\n", "Ġ literal and ✓ check", chat]
    cases = []
    for text in texts:
        ids = t.encode(text)  # add_special_tokens=True: whatever the GGUF tokenizer adds
        cases.append({"name": repr(text), "text": text, "ids": ids,
                      "decoded": t.decode(ids, skip_special_tokens=True)})
    return {
        "reference": "transformers AutoTokenizer.from_pretrained(dir, gguf_file=...); ids = "
                     "encode(text) (default add_special_tokens); decoded = "
                     "decode(ids, skip_special_tokens=True)",
        "versions": {"transformers": transformers.__version__},
        "bos": t.bos_token_id, "eos": t.eos_token_id,
        "add_bos_default": bool(getattr(t, "add_bos_token", False)),
        "vocab_size": len(t),
        "chat_template_prompt": chat,
        "cases": cases,
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, fn in (("llama_ids.json", llama), ("smollm2_ids.json", smollm2)):
        data = fn()
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"wrote {os.path.join(OUT, name)} ({len(data['cases'])} cases)")


if __name__ == "__main__":
    main()
