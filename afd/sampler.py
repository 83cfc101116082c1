"""Next-token sampling for a batch of sequences, each with its own parameters.

Greedy rows take the argmax. The others are scaled by temperature, cut by top-k, top-p and min-p
(in the sorted order), and sampled by the exponential race (argmax of p / q with q ~ Exp(1)),
which draws from the same distribution as multinomial. A seeded request draws its noise from
its own generator, so its samples do not depend on what else shares the batch.
"""

from __future__ import annotations

import torch

from afd.sampling_params import SamplingParams


class Sampler:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
        """logits: [N, V] fp32, one row per sampling sequence. Returns N token ids."""
        greedy = torch.tensor([p.greedy for p in params])
        tokens = logits.argmax(dim=-1).cpu()
        if bool(greedy.all()):
            return tokens.tolist()
        rows = (~greedy).nonzero().flatten().tolist()
        sampled = self._sample(logits[rows].float().cpu(), [params[i] for i in rows],
                               [generators[i] for i in rows])
        tokens[rows] = sampled
        return tokens.tolist()

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        n, vocab = logits.shape
        temp = torch.tensor([p.temperature for p in params])[:, None]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])[:, None]
        top_p = torch.tensor([p.top_p for p in params])[:, None]
        min_p = torch.tensor([p.min_p for p in params])[:, None]

        sorted_logits, order = torch.sort(logits / temp, dim=-1, descending=True)  # [N, V]
        rank = torch.arange(vocab)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays)
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
        # min-p: drop tokens below min_p x the most likely token's probability
        probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)

        noise = torch.empty_like(probs)
        for i, gen in enumerate(generators):
            noise[i].exponential_(generator=gen or self.generator)
        choice = (probs / noise).argmax(dim=-1)  # index in sorted order
        return order.gather(1, choice[:, None])[:, 0]
