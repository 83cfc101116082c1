"""The embedded default model: a tiny DeepSeek-V3-architecture checkpoint built on first use.

Random weights (seeded, so every machine builds the same files), HF tensor names, a config.json
that transformers' DeepseekV3ForCausalLM loads, and an offline byte-level BPE tokenizer with a
chat template. It exercises every code path of the real model (MLA with q_lora, YaRN-free rope,
sigmoid group-limited routing with bias correction, shared experts, a dense first layer) at a size
that runs on a laptop CPU. Its text is gibberish: it is for plumbing, tests and benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch

VERSION = "1"

TINY_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "head_dim": 16,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rope_theta": 10000.0,
    "rope_interleave": True,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "dtype": "float32",
}

SPECIAL_TOKENS = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)

# Text the tokenizer's merges are learned from (so common English pieces become single tokens).
_CORPUS = """
The quick brown fox jumps over the lazy dog. An inference engine serves a language model:
it takes prompts, runs the model over them and returns the generated text. Mixture-of-experts
models route every token to a few experts out of many, so the experts hold most of the weights
but each token touches only some of them. Attention keeps a cache of keys and values for every
token it has seen; the cache grows with the context, while the experts stay the same size.
Splitting attention from the experts lets each side run on the hardware that suits it best.
What is the capital of France? Paris is the capital of France. Hello, how are you today?
I am fine, thank you. Tell me a story about a robot who learns to paint. Once upon a time,
there was a small robot in a quiet town, and every morning it watched the sun rise over the hills.
"""


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _learn_merges(num_merges: int) -> list[tuple[str, str]]:
    """A small deterministic BPE: merge the most frequent adjacent pair, ties by text."""
    alphabet = _byte_alphabet()
    words = Counter()
    for i, word in enumerate(_CORPUS.split()):
        piece = word if i == 0 else " " + word
        words[tuple(alphabet[b] for b in piece.encode())] += 1
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def build_tokenizer_files(folder: str, vocab_size: int,
                          special_tokens: list[str] = SPECIAL_TOKENS) -> None:
    """Write tokenizer.json + tokenizer_config.json for a byte-level BPE of ``vocab_size`` ids,
    ``special_tokens`` first (tests add more, e.g. a reasoning model's ``<think>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = _byte_alphabet()
    merges = _learn_merges(vocab_size - len(special_tokens) - len(alphabet))
    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for piece in alphabet + [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, 0)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": TINY_DEEPSEEK_V3["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random weight whose scale keeps activations O(1) so outputs vary from token to token."""
    import torch

    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    fan_in = max(shape[-1], 1)  # empty tensors (zero-width shared experts) too
    return torch.randn(shape, generator=gen) * (1.5 / fan_in**0.5)


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a DeepSeek-V3 config (q_lora path)."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    ql, kvl = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    moe_i, e = cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_a_proj.weight": (ql, h),
            f"{p}.self_attn.q_a_layernorm.weight": (ql,),
            f"{p}.self_attn.q_b_proj.weight": (heads * (nope + rope), ql),
            f"{p}.self_attn.kv_a_proj_with_mqa.weight": (kvl + rope, h),
            f"{p}.self_attn.kv_a_layernorm.weight": (kvl,),
            f"{p}.self_attn.kv_b_proj.weight": (heads * (nope + v), kvl),
            f"{p}.self_attn.o_proj.weight": (h, heads * v),
        })
        if i < cfg["first_k_dense_replace"]:
            mlps = {f"{p}.mlp": cfg["intermediate_size"]}
        else:
            mlps = {f"{p}.mlp.shared_experts": moe_i * cfg["n_shared_experts"]}
            mlps.update({f"{p}.mlp.experts.{j}": moe_i for j in range(e)})
            shapes[f"{p}.mlp.gate.weight"] = (e, h)
            shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (e,)
        for mp, inter in mlps.items():
            shapes.update({f"{mp}.gate_proj.weight": (inter, h), f"{mp}.up_proj.weight": (inter, h),
                           f"{mp}.down_proj.weight": (h, inter)})
    return shapes


def build_checkpoint(folder: str, cfg: dict | None = None, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    cfg = dict(cfg or TINY_DEEPSEEK_V3)
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, shape, gen)
               for name, shape in sorted(tensor_shapes(cfg).items())}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, f)
    build_tokenizer_files(folder, cfg["vocab_size"])


def add_mtp_layer(folder: str, seed: int = 1, constant: bool = False) -> None:
    """Give the DeepSeek-V3 checkpoint in ``folder`` a random multi-token-prediction layer
    (``model.layers.{L}.*`` in ``model-mtp.safetensors``, ``num_nextn_predict_layers: 1``), as
    DeepSeek's checkpoints ship one, for speculative_config method "mtp". ``constant``: zero
    the target's and the MTP layer's final norms, so every logit is 0, greedy emits token 0
    forever and every MTP draft is right (a best case for benchmarks, not a real model). The
    embedded default model itself has no MTP layer."""
    import torch
    from safetensors.torch import load_file, save_file

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    layers, h, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    prefix = f"model.layers.{layers}."
    shapes = {n: s for n, s in tensor_shapes({**cfg, "num_hidden_layers": layers + 1}).items()
              if n.startswith(prefix)}
    shapes.update({prefix + "enorm.weight": (h,), prefix + "hnorm.weight": (h,),
                   prefix + "eh_proj.weight": (h, 2 * h),
                   prefix + "embed_tokens.weight": (vocab, h),
                   prefix + "shared_head.norm.weight": (h,),
                   prefix + "shared_head.head.weight": (vocab, h)})
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: random_tensor(n, shape, gen) for n, shape in sorted(shapes.items())}
    if constant:
        tensors[prefix + "shared_head.norm.weight"].zero_()
        main = os.path.join(folder, "model.safetensors")
        weights = load_file(main)
        weights["model.norm.weight"].zero_()
        save_file(weights, main, metadata={"format": "pt"})
    save_file(tensors, os.path.join(folder, "model-mtp.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**cfg, "num_nextn_predict_layers": 1}, f, indent=2)


def cache_root() -> str:
    return os.environ.get("AFD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "afd")


def default_model_path() -> str:
    """The embedded default checkpoint's folder, built (once, atomically) if absent."""
    key = hashlib.sha256((VERSION + json.dumps(TINY_DEEPSEEK_V3, sort_keys=True)).encode())
    folder = os.path.join(cache_root(), f"tiny-deepseek-v3-{key.hexdigest()[:12]}")
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return folder
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".build-")
    try:
        build_checkpoint(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
