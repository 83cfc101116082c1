"""Host-side costs docs/ quotes (speculative.md, limits.md) for n-gram drafts, penalties and
structured output.

    python bench/host_lookups.py [--json out]

n-gram lookup: per sequence and step, what the scheduler does for a speculating sequence
(``TokenArray.sync`` of one appended token, then ``propose_ngram`` with lookup 4 down to 2 and
k = 4), over random token ids of a 512- and a 129,280-id vocabulary, at 1,000 / 8,000 / 32,000
tokens; best of 5 runs of 200 steps, process CPU time.

Penalties: a penalised sequence's first sampled step folds its whole history into its state
(``PenaltyPool.fold``), 1,024 + 256 and 8,192 + 1,024 random ids; median of 20, process CPU
time.

Grammars, with the embedded default model's tokenizer (512 ids): the first use of the tokenizer
on a rank (``GrammarCompiler._tokenizer``, in a fresh process that has not imported
transformers, wall time); then, for a JSON schema of three fields, building its matcher, a
further sequence's matcher once built (``GrammarCompiler.state``: a copy), and per step one
row's allowed-token mask plus the advance by the token taken (``GrammarState.fill`` and
``accept``, over a valid output of the schema); medians, process CPU time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import commit_id, write_result  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
OUTPUT = '{"name": "Ada Lovelace", "age": 36, "tags": ["mathematician", "writer"]}'
FIRST_USE = """
import sys, time
from afd.structured_output import GrammarCompiler
from models.default_model import default_model_path
had = "transformers" in sys.modules
t0 = time.perf_counter()
GrammarCompiler(default_model_path(), 512)._tokenizer((0,))
print(time.perf_counter() - t0, had)
"""


def ngram_rows() -> list[dict]:
    from afd.spec_decode import TokenArray, propose_ngram

    rows = []
    for vocab in (512, 129_280):
        for length in (1_000, 8_000, 32_000):
            ids = np.random.default_rng(0).integers(0, vocab, length + 200).tolist()
            best = float("inf")
            for _ in range(5):
                tokens, arr = ids[:length], TokenArray()
                arr.sync(tokens)
                start = time.process_time()
                for i in range(200):
                    tokens.append(ids[length + i])
                    propose_ngram(arr.sync(tokens), 2, 4, 4)
                best = min(best, (time.process_time() - start) / 200 * 1e6)
            rows.append({"vocab": vocab, "tokens": length, "us_per_step": round(best, 1)})
            print(f"n-gram lookup, vocab {vocab:>7}, {length:>6} tokens: {best:6.1f} us")
    return rows


def penalty_rows() -> list[dict]:
    """A penalised sequence's first sampled step: its whole history folded into a fresh
    ``PenaltyState`` (afd.penalties), random ids of DeepSeek-V3's vocabulary."""
    from afd.penalties import PenaltyPool, PenaltyState

    rows = []
    for prompt, output in ((1_024, 256), (8_192, 1_024)):
        ids = np.random.default_rng(0).integers(0, 129_280, prompt + output).tolist()
        pool, times = PenaltyPool("cpu"), []
        for _ in range(20):
            state = PenaltyState()
            start = time.process_time()
            pool.fold([state], [(ids, prompt)])
            times.append((time.process_time() - start) * 1e3)
            del state
        rows.append({"prompt": prompt, "output": output, "distinct": len(set(ids)),
                     "first_fold_ms": round(statistics.median(times), 2)})
        print(f"penalties, first fold of {prompt} + {output} tokens: "
              f"{rows[-1]['first_fold_ms']:.2f} ms")
    return rows


def grammar_rows() -> dict:
    import llguidance
    import torch

    from afd.sampling_params import StructuredOutputsParams
    from afd.structured_output import GrammarCompiler, GrammarState, grammar_source
    from models.default_model import default_model_path

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = subprocess.run([sys.executable, "-c", FIRST_USE], capture_output=True, text=True,
                           check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
    load_s, had = first.stdout.split()
    compiler = GrammarCompiler(default_model_path(), 512)
    tok = compiler._tokenizer((0,))
    so = StructuredOutputsParams(json=SCHEMA)
    source = grammar_source(so)
    compiler.state(so, (0,))  # built once: later sequences get copies

    def median_ms(fn, calls: int) -> float:
        """Median over 5 runs of ``calls`` calls, per call."""
        times = []
        for _ in range(5):
            start = time.process_time()
            for _ in range(calls):
                fn()
            times.append((time.process_time() - start) * 1e3 / calls)
        return statistics.median(times)

    built = llguidance.LLMatcher(tok, source, log_level=0)
    words = -(-tok.vocab_size // 32)
    output = compiler._hf_tokenizer.encode(OUTPUT, add_special_tokens=False)
    row = torch.zeros(words, dtype=torch.int32)

    def decode_one() -> None:
        """One sequence's steps through OUTPUT: each step's mask, then the token taken."""
        state = GrammarState(built.deep_copy(), words)
        for token in output:
            state.fill(row)
            state.accept(token)
        assert state.error is None

    result = {"tokenizer_first_use_s": round(float(load_s), 3),
              "transformers_imported_before": had == "True",
              "build_ms": median_ms(lambda: llguidance.LLMatcher(tok, source, log_level=0), 20),
              "copy_ms": median_ms(lambda: compiler.state(so, (0,)), 1000),
              "output_tokens": len(output),
              "mask_and_advance_ms_per_step": median_ms(decode_one, 50) / len(output)}
    print(f"grammar: tokenizer first use {result['tokenizer_first_use_s']:.2f} s; 3-field JSON "
          f"schema: build {result['build_ms']:.3f} ms, copy {result['copy_ms']:.4f} ms, mask "
          f"+ advance {result['mask_and_advance_ms_per_step']:.4f} ms a row and step "
          f"({len(output)}-token output)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    result = {"bench": "host_lookups", "commit": commit_id(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch_threads": torch.get_num_threads(),
              "clock": "process CPU time (tokenizer first use: wall)",
              "ngram": ngram_rows(), "penalties": penalty_rows(), "grammar": grammar_rows()}
    write_result(result, args.json, "host_lookups.json")


if __name__ == "__main__":
    main()
