#!/usr/bin/env python3
"""Tiny Hugging Face model directories plus reference values from transformers, for the
`--model DIR` tests in crates/sae-lm/tests/hf_dir.rs.

The model is a randomly initialised LlamaForCausalLM (3 layers, grouped-query attention,
tied embeddings, rope_theta and rms_norm_eps off their defaults, random norm weights) with a
byte-level BPE tokenizer trained here on a few sentences, saved with save_pretrained: the
layout and config keys transformers writes today. Weights are scaled up from the default
init so attention is far from uniform and RoPE matters.

With `gpt2` as second argument it writes a random GPT2LMHeadModel instead (learned positions,
LayerNorm with biases, fused qkv, GELU), with the same tokenizer.

Setup: see tools/make_lm_fixture.py (torch, transformers, tokenizers). Run:
    python3 tools/make_hf_fixture.py crates/sae-lm/tests/fixtures/tiny-llama
    python3 tools/make_hf_fixture.py crates/sae-lm/tests/fixtures/tiny-gpt2 gpt2
"""
import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

CTX = 24
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders find interpretable features in the residual stream.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in documentation.",
    "Python's for statement iterates over the items of any sequence.",
] * 20
TEXTS = [
    "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun.",
    "def add(a, b):\n    return a + b  # 12345 sparse features in the residual stream\n",
    "Python's for statement iterates over the items of any sequence, in the order that they "
    "appear; unlike C, it does not iterate over an arithmetic progression of numbers.",
]
TOKENIZER_STRINGS = [
    "Hello world",
    "  runs of   spaces and\ttabs\n\nnewlines",
    "digits 2024 and 3.14",
    "<|im_start|>user\nspecial tokens<|im_end|>",
    "naïve café 東京",
]


def rounded(t):
    return [float("%.7g" % v) for v in t.reshape(-1).tolist()]


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    # SmolLM2 style: every digit on its own, then GPT-2's byte-level split.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>")


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    tok = make_tokenizer()
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    gpt2 = len(sys.argv) > 2 and sys.argv[2] == "gpt2"
    if gpt2:
        cfg = GPT2Config(
            vocab_size=len(tok), n_embd=64, n_layer=3, n_head=4, n_positions=64,
            layer_norm_epsilon=1e-5, bos_token_id=bos, eos_token_id=bos, initializer_range=0.15)
        cls = GPT2LMHeadModel
    else:
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
            bos_token_id=bos, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            initializer_range=0.15,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        )
        cls = LlamaForCausalLM
    model = cls(cfg).float().eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or (gpt2 and "ln_" in name and name.endswith(".weight")):
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
        elif gpt2 and name.endswith(".bias"):
            p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # Reload from disk so the reference is what the files hold.
    model = cls.from_pretrained(out, dtype=torch.float32).eval()

    contexts = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= CTX - 1, (len(ids), text)
        contexts.append([bos] + ids[: CTX - 1])
    input_ids = torch.tensor(contexts)
    captured = {}
    layers = model.transformer.h if gpt2 else model.model.layers
    attn = (lambda l: l.attn) if gpt2 else (lambda l: l.self_attn)
    o_proj = (lambda l: l.attn.c_proj) if gpt2 else (lambda l: l.self_attn.o_proj)
    hooks = [
        o_proj(layers[1]).register_forward_pre_hook(
            lambda m, a: captured.__setitem__("blocks.1.attn.hook_z", a[0].clone())),
        layers[2].mlp.register_forward_hook(
            lambda m, a, o: captured.__setitem__("blocks.2.hook_mlp_out", o.clone())),
        attn(layers[0]).register_forward_hook(
            lambda m, a, o: captured.__setitem__("blocks.0.hook_attn_out", o[0].clone())),
    ]
    res = model(input_ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    hs = res.hidden_states  # hs[i]: input of layer i; hs[-1] has the final norm applied
    for layer in range(len(layers) - 1):
        captured[f"blocks.{layer}.hook_resid_post"] = hs[layer + 1]
    captured["blocks.1.hook_resid_pre"] = hs[1]
    logits = res.logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none")

    fixture = {
        "source": "tools/make_hf_fixture.py: transformers %s, torch %s" % (
            __import__("transformers").__version__, torch.__version__),
        "ctx": CTX,
        "bos_id": bos,
        "contexts": contexts,
        "hooks": {name: {"width": t.shape[-1], "values": rounded(t.float())}
                  for name, t in captured.items()},
        "per_token_loss": rounded(loss),
        "tokenizer": [{"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"]}
                      for s in TOKENIZER_STRINGS + TEXTS],
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print("wrote", out, sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
