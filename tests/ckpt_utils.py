"""Tiny random HF checkpoints for the oracle tests, built with transformers and saved to disk."""

from __future__ import annotations

import os
import shutil
import time

import torch

from models.default_model import default_model_path, random_tensor

VOCAB = 512  # the embedded tokenizer's size, so every checkpoint can share it

BASE_DEEPSEEK = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32,
    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=512,
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)

CONFIGS = {
    # DeepSeek-V3: q_lora, sigmoid + bias-corrected group-limited routing, YaRN with mscale.
    "deepseek_v3": dict(
        BASE_DEEPSEEK, q_lora_rank=32, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
    ),
    # DeepSeek-V3.2: V3 with DeepSeek Sparse Attention; index_topk small so that prompts and
    # generations run past it (the release's: 2048); 16 index heads, as with 4 a token's
    # score is exactly 0 (every head's relu 0) for 1 in 16 tokens, and ties at the top-k
    # boundary are broken as each side's torch.topk happens to (about 5% of queries with 4)
    "deepseek_v32": dict(
        BASE_DEEPSEEK, q_lora_rank=32, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, index_topk=8, index_n_heads=16, index_head_dim=16,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
    ),
    # GLM-5: V3.2's DSA with the indexer's rope interleaved and cross-layer top-k sharing:
    # layers 1 and 2 "shared" (no indexer; they attend over layer 0's selection), layer 4 over
    # layer 3's
    "glm_moe_dsa": dict(
        BASE_DEEPSEEK, num_hidden_layers=5, q_lora_rank=32, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, index_topk=8, index_n_heads=16,
        index_head_dim=16, index_topk_pattern="FSSFS", rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # DeepSeek-V2-Lite shape: no q_lora, softmax greedy top-k, two shared experts.
    "deepseek_v2_lite": dict(
        BASE_DEEPSEEK, q_lora_rank=None, n_shared_experts=2, topk_method="greedy",
        routed_scaling_factor=1.0, norm_topk_prob=False,
    ),
    # DeepSeek-V2 proper: q_lora and group-limited greedy (group score = max).
    "deepseek_v2": dict(
        BASE_DEEPSEEK, q_lora_rank=32, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, routed_scaling_factor=16.0, norm_topk_prob=False,
    ),
    # Qwen3-MoE: GQA with q/k norm; layer 1 dense through mlp_only_layers.
    "qwen3_moe": dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[1], max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, rope_theta=10000.0,
    ),
    # GLM-4.5: GQA with q/k/v bias (o_proj unbiased), q/k norm, half the head dims rotated,
    # DeepSeek-V3 routing over 2 groups (1 kept), scaled; one dense layer first
    "glm4_moe": dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1,
    ),
    # GLM-4.7-Flash: DeepSeek-V3's MLA (interleaved rope) with the GLM MoE; the dense / MoE
    # layers from mlp_layer_types
    "glm4_moe_lite": dict(
        BASE_DEEPSEEK, q_lora_rank=32, n_group=4, topk_group=2, routed_scaling_factor=1.8,
        norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "sparse"],
    ),
    # dots.llm1: Qwen3's attention (q/k norm) with DeepSeek-V3's MoE, unnormalized top-k
    "dots1": dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=False,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1,
    ),
    # MiniMax-M2: GQA with q/k norm over all heads at once, a quarter of the head dims rotated
    # (rotary_dim 4 of 16: the release rotates 64 of 128), sigmoid routing with the correction
    # bias, top-k renormalized; every layer MoE, experts intermediate_size wide
    "minimax_m2": dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
        num_experts_per_tok=2, rotary_dim=4, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    ),
    # DeepSeek-V4: every layer type (CSA, HCA, sliding) and both MLP types (hash, top-k);
    # compress rates 2 and 4, a window of 8 and index_topk 3, so that windowing, compression
    # and selection all decide outputs within tens of tokens (the release's: 4, 128, 128,
    # 512); 16 index heads, as for V3.2, so that scores rarely tie at the top-k boundary
    "deepseek_v4": dict(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, head_dim=32, q_lora_rank=32, qk_rope_head_dim=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention",
                     "sliding_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=16, index_head_dim=16,
        index_topk=3, hc_mult=4, swiglu_limit=1.0, num_nextn_predict_layers=0,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1,
    ),
    # Qwen3-Next: Gated DeltaNet layers (2 key heads, each serving 2 value heads; conv width
    # 4) around a gated full-attention layer (a quarter of its head dims rotated), a linear
    # layer after it; Qwen3's MoE with a gated shared expert, layer 1 a dense MLP
    "qwen3_next": dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "linear_attention", "full_attention",
                     "linear_attention"],
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1,
    ),
    # Qwen3.5-MoE's language model: its own projections (in_proj_qkv / z / b / a), every
    # layer MoE, mrope over text positions
    "qwen3_5_moe_text": dict(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention", "linear_attention",
                     "linear_attention"],
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0],
                         "mrope_interleaved": True},
    ),
}


def hf_classes(kind: str):
    import transformers as tf

    if kind == "qwen3_next":
        return tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM
    if kind == "qwen3_5_moe_text":
        return tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM

    if kind == "deepseek_v4":
        return tf.DeepseekV4Config, tf.DeepseekV4ForCausalLM
    if kind == "minimax_m2":
        return tf.MiniMaxM2Config, tf.MiniMaxM2ForCausalLM
    if kind.startswith("glm4_moe_lite"):
        return tf.Glm4MoeLiteConfig, tf.Glm4MoeLiteForCausalLM
    if kind.startswith("glm4_moe"):
        return tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM
    if kind.startswith("dots1"):
        return tf.Dots1Config, tf.Dots1ForCausalLM
    if kind == "glm_moe_dsa":
        return tf.GlmMoeDsaConfig, tf.GlmMoeDsaForCausalLM
    if kind == "deepseek_v32":
        return tf.DeepseekV32Config, tf.DeepseekV32ForCausalLM
    if kind == "deepseek_v3":
        return tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM
    if kind.startswith("deepseek_v2"):
        return tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM
    return tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM


def random_hf_model(model_cls, config, seed: int = 0, fill=None):
    """transformers' ``model_cls(config)`` (fp32, eager attention, eval mode) with every
    floating-point weight drawn by ``random_tensor`` (scaled so greedy outputs vary);
    ``fill(name, tensor, gen)`` may fill a tensor itself first (it returns True when it did)."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if fill is not None and fill(name, tensor, gen):
                continue
            if tensor.is_floating_point():
                tensor.copy_(random_tensor(name, tuple(tensor.shape), gen))
    return model


def build_hf_model(kind: str, seed: int = 0, **overrides):
    """An HF model of ``kind`` with weights scaled so greedy outputs vary (fp32, eval mode)."""
    config_cls, model_cls = hf_classes(kind)
    config = config_cls(**{**CONFIGS[kind], **overrides})

    def hash_routes(name: str, tensor: torch.Tensor, gen: torch.Generator) -> bool:
        if not name.endswith("tid2eid"):
            return False
        experts = config.n_routed_experts  # DeepSeek-V4's hash routing: distinct experts
        tensor.copy_(torch.rand(tensor.shape[0], experts, generator=gen)
                     .argsort(dim=-1)[:, : tensor.shape[1]])
        return True

    return random_hf_model(model_cls, config, seed, hash_routes)


def assert_fused_names_load(model, per_expert: str, folder: str, layer: int) -> None:
    """transformers' ``model`` saved in ``folder`` with its own names (save_original_format=
    False: each MoE layer's routed experts fused into ``mlp.experts.gate_up_proj`` [E, 2I, H]
    and ``down_proj`` [E, H, I], under a wrapper's prefix too; ``layer`` one of those layers)
    loads the weights its per-expert checkpoint ``per_expert`` does, each part read alone."""
    from safetensors import safe_open

    from models.weights import load_model

    model.save_pretrained(folder, save_original_format=False)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert any(k.endswith(f"layers.{layer}.mlp.experts.gate_up_proj") for k in f.keys())
    a, b = load_model(per_expert), load_model(folder)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert any(torch.count_nonzero(p) for p in b.layers[layer].mlp.experts.parameters())


def save_checkpoint(model, folder: str) -> str:
    """save_pretrained plus the embedded tokenizer's files."""
    model.save_pretrained(folder)
    tok_dir = default_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(folder, name))
    return folder


def mixed_prompts(n: int = 8, seed: int = 1, lengths=None) -> list[list[int]]:
    """Random token-id prompts of mixed lengths between 1 and 64."""
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or [1, 64, 7, 33, 2, 48, 17, 5][:n]
    return [torch.randint(2, VOCAB, (n_tok,), generator=gen).tolist() for n_tok in lengths]


def single_process_references(tmp_path_factory, new_tokens: int, **engine_args) -> dict:
    """Per model kind (DeepSeek-V3, Qwen3-MoE tiny checkpoints): (checkpoint path, prompts,
    greedy params, the single-process engine's token ids), what layouts are compared with."""
    from afd import LLM, SamplingParams

    refs = {}
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts()]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for kind in ("deepseek_v3", "qwen3_moe"):
        path = save_checkpoint(build_hf_model(kind), str(tmp_path_factory.mktemp(kind)))
        outs = LLM(path, **engine_args).generate(prompts, params, use_tqdm=False)
        refs[kind] = (path, prompts, params, [o.outputs[0].token_ids for o in outs])
    return refs


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' own greedy generate, EOS ignored: (new tokens, per-step logits [N, V])."""
    gen_cfg = model.generation_config
    gen_cfg.eos_token_id = None
    gen_cfg.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False, return_dict_in_generate=True, output_logits=True,
                             generation_config=gen_cfg)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, torch.cat(out.logits, dim=0).float()


def assert_same_logprobs(got, want, atol: float) -> None:
    """Two lists of {token id: Logprob} (None entries allowed): the same ids and ranks, values
    within ``atol``."""
    for ge, we in zip(got, want, strict=True):
        assert (ge is None) == (we is None)
        if we is None:
            continue
        assert list(ge) == list(we)
        assert [e.rank for e in ge.values()] == [e.rank for e in we.values()]
        assert max(abs(ge[t].logprob - we[t].logprob) for t in we) < atol, (ge, we)


def assert_same_outputs(got, want, atol: float = 1e-5) -> None:
    """Two lists of RequestOutputs: the same tokens and the same logprobs, of the outputs and
    of the prompts (the same token ids and ranks per step, values within ``atol``)."""
    for g, w in zip(got, want, strict=True):
        assert (g.prompt_logprobs is None) == (w.prompt_logprobs is None)
        if w.prompt_logprobs is not None:
            assert_same_logprobs(g.prompt_logprobs, w.prompt_logprobs, atol)
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            assert gc.token_ids == wc.token_ids
            assert (gc.logprobs is None) == (wc.logprobs is None)
            if wc.logprobs is None:
                continue
            assert abs(gc.cumulative_logprob - wc.cumulative_logprob) < atol * len(wc.token_ids)
            assert_same_logprobs(gc.logprobs, wc.logprobs, atol)


def add_mtp_layer(folder: str, model, seed: int = 7) -> dict[str, torch.Tensor]:
    """Give the DeepSeek-V3 checkpoint in ``folder`` (saved from ``model``) a random MTP layer,
    as DeepSeek ships one: ``model.layers.{L}.*`` tensors in a file of their own and
    ``num_nextn_predict_layers: 1`` in config.json. Returns the layer's tensors by their name
    after ``model.layers.{L}.`` (the routed experts as transformers' fused ``gate_up_proj`` /
    ``down_proj``, for ``mtp_reference``)."""
    from safetensors.torch import save_file

    cfg = model.config
    num_layers, hidden, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    block = mtp_decoder_layer(model)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    shapes.update({"enorm.weight": (hidden,), "hnorm.weight": (hidden,),
                   "eh_proj.weight": (hidden, 2 * hidden),
                   "embed_tokens.weight": (vocab, hidden), "shared_head.norm.weight": (hidden,),
                   "shared_head.head.weight": (vocab, hidden)})
    weights = {k: random_tensor(k, shape, gen) for k, shape in sorted(shapes.items())}
    prefix = f"model.layers.{num_layers}."
    inter = cfg.moe_intermediate_size
    tensors = {}
    for k, w in weights.items():
        if k == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows, then up rows
            for e in range(w.shape[0]):
                tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = w[e, :inter].contiguous()
                tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"] = w[e, inter:].contiguous()
        elif k == "mlp.experts.down_proj":
            for e in range(w.shape[0]):
                tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"] = w[e].contiguous()
        else:
            tensors[prefix + k] = w
    save_file(tensors, os.path.join(folder, "model-mtp.safetensors"))
    edit_config(folder, num_nextn_predict_layers=1)
    return weights


def mtp_decoder_layer(model):
    """transformers' decoder layer of ``model``'s kind at index num_hidden_layers (the MTP
    layer's: a MoE layer), random weights, eval mode."""
    import copy

    cfg = model.config
    layer_cls = type(model.model.layers[-1])
    if getattr(cfg, "mlp_layer_types", None) is not None:  # GLM-4.7-Flash: one type a layer
        cfg = copy.deepcopy(cfg)
        cfg.mlp_layer_types = [*cfg.mlp_layer_types, "sparse"]
    return layer_cls(cfg, model.config.num_hidden_layers).eval()


def mtp_checkpoint(folder: str, kind: str = "deepseek_v3"):
    """A tiny model of ``kind`` (DeepSeek-V3, or GLM-4.5 / GLM-4.7-Flash, whose MTP layer is
    DeepSeek's) saved in ``folder`` with a random MTP layer added: (its folder, the
    transformers model, the MTP weights)."""
    hf = build_hf_model(kind)
    path = save_checkpoint(hf, folder)
    return path, hf, add_mtp_layer(path, hf)


def edit_config(folder: str, **changes) -> dict:
    """Rewrite ``folder``/config.json with ``changes`` (a None value drops the key); returns
    the new dict."""
    import json

    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = {**json.load(f), **changes}
    raw = {k: v for k, v in raw.items() if v is not None}
    with open(path, "w") as f:
        json.dump(raw, f, indent=2)
    return raw


def mtp_reference(model, weights: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """DeepSeek-V3's MTP formula computed with transformers' modules, the whole sequence at
    once, no cache, fp32: the draft logits [len(tokens) - 1, V] at positions 0 .. n-2 (row p
    from token p+1 and the target's hidden state at p after its final norm, what its LM head
    reads: what vLLM's and SGLang's DeepSeek MTP take from the target)."""
    ref = _MTPReference(model, weights)
    return ref.rows(ref.inputs(tokens))[1]


def mtp_chain_reference(model, weights: dict[str, torch.Tensor], tokens: list[int],
                        k: int) -> list[int]:
    """The k greedy MTP drafts after ``tokens`` (n of them), chained step by step: d1 is the
    argmax of ``mtp_reference``'s row n-2; then, for r = 1 .. k-1, one more row at position
    n-2+r from token d_r and, as hidden state, the row before's MTP output after
    shared_head.norm (what its head read), the decoder layer run again over all rows (causal,
    no cache), d_{r+1} the new row's argmax."""
    ref = _MTPReference(model, weights)
    x = ref.inputs(tokens)
    drafts = []
    for _ in range(k):
        normed, logits = ref.rows(x)
        drafts.append(int(logits[-1].argmax()))
        x = torch.cat((x, ref.project(torch.tensor([[drafts[-1]]]), normed[:, -1:])), dim=1)
    return drafts


class _MTPReference:
    """DeepSeek-V3's MTP layer out of transformers' modules and the MTP weights (fp32); the
    decoder layer is ``model``'s own kind (GLM-4.5's MTP layer is DeepSeek's around a GLM
    decoder layer)."""

    def __init__(self, model, weights: dict[str, torch.Tensor]):
        cfg = model.config
        self.model, self.weights, self.cfg = model, weights, cfg
        self.block = mtp_decoder_layer(model)
        self.block.load_state_dict({k: v for k, v in weights.items()
                                    if k in self.block.state_dict()})

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

        n = DeepseekV3RMSNorm(self.cfg.hidden_size, self.cfg.rms_norm_eps)
        with torch.no_grad():
            n.weight.copy_(self.weights[name])
            return n(x)

    def project(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """eh_proj(cat[enorm(embed(ids)), hnorm(hidden)]): [1, n] ids, [1, n, H] -> [1, n, H]."""
        emb = torch.nn.functional.embedding(ids, self.weights["embed_tokens.weight"])
        x = torch.cat((self.norm("enorm.weight", emb), self.norm("hnorm.weight", hidden)),
                      dim=-1)
        return x @ self.weights["eh_proj.weight"].T

    def inputs(self, tokens: list[int]) -> torch.Tensor:
        """Rows 0 .. n-2: token p+1 and the target's hidden state at p (after its final norm)."""
        ids = torch.tensor([tokens])
        with torch.no_grad():
            h = self.model.model(ids).last_hidden_state  # after the final norm
        return self.project(ids[:, 1:], h[:, :-1])

    def rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layer over rows x [1, n, H] (positions 0 .., causal): the output after
        shared_head.norm [1, n, H] and the logits [n, V]."""
        n = x.shape[1]
        positions = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        with torch.no_grad():
            out = self.block(x, attention_mask=mask, position_ids=positions,
                             position_embeddings=self.model.model.rotary_emb(x, positions))
        out = out[0] if isinstance(out, tuple) else out
        normed = self.norm("shared_head.norm.weight", out)
        return normed, (normed @ self.weights["shared_head.head.weight"].T)[0]


def run_until_done(llm, ids: list[str], limit_s: float = 120) -> dict:
    """Step ``llm``'s engine until every request of ``ids`` has finished: their last outputs."""
    done, deadline = {}, time.monotonic() + limit_s
    while len(done) < len(ids):
        assert time.monotonic() < deadline, "requests did not finish"
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


ORACLE_NEW_TOKENS = 12
# the first prompt crosses a tiny index_topk / sliding window while it decodes
ORACLE_LENGTHS = [5, 40, 100]


def greedy(n: int = ORACLE_NEW_TOKENS):
    """Greedy sampling of ``n`` tokens, EOS ignored (the oracle tests' parameters)."""
    from afd import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def greedy_tokens(llm, prompts: list[list[int]]) -> list[list[int]]:
    """``llm``'s greedy tokens (``greedy()``) for each prompt of token ids."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def model_case(tmp_path_factory, model, name: str, lengths=ORACLE_LENGTHS,
               new_tokens: int = ORACLE_NEW_TOKENS) -> tuple:
    """transformers' ``model`` saved to a folder named after ``name``, prompts of ``lengths``
    tokens and its greedy output for each: (model, path, prompts, [(tokens, logits)])."""
    path = save_checkpoint(model, str(tmp_path_factory.mktemp(name)))
    prompts = mixed_prompts(len(lengths), lengths=lengths)
    return model, path, prompts, [hf_greedy(model, p, new_tokens) for p in prompts]


def oracle_case(tmp_path_factory, kind: str) -> tuple:
    """``model_case`` of a tiny random ``kind`` checkpoint, prompts of ``ORACLE_LENGTHS``."""
    return model_case(tmp_path_factory, build_hf_model(kind), kind)
