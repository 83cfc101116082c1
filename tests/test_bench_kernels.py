"""bench/kernels.py's timing method and a CPU run of the script itself (its GPU runs are scarce:
a broken script must show here, not on the lent GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.fused_moe_tuning import median_and_spread, time_interleaved
from kernels.testing import forkserver_context, run_script, start_calls_ahead

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_time_interleaved_takes_variants_in_turn_and_drops_a_failing_one() -> None:
    calls: list[str] = []
    clock = iter(range(1, 100))

    def timer(fn) -> float:
        fn()
        return float(next(clock))

    def variant(name: str, fail_on: int | None = None):
        def fn() -> None:
            calls.append(name)
            if fail_on is not None and calls.count(name) == fail_on:
                raise RuntimeError(f"{name} broke")
        return fn

    errors: list[tuple[str, str]] = []
    samples = time_interleaved(
        timer, {"a": variant("a"), "b": variant("b", fail_on=2), "c": variant("c")}, 4,
        lambda name, exc: errors.append((name, str(exc))))
    # Each round starts one further along; b fails in round 2 and is not timed again.
    assert calls == ["a", "b", "c", "b", "c", "a", "a", "c", "c", "a"]
    assert errors == [("b", "b broke")]
    assert samples == {"a": [1.0, 5.0, 6.0, 9.0], "b": [2.0], "c": [3.0, 4.0, 7.0, 8.0]}
    assert median_and_spread(samples["a"]) == (5.5, 9.0)
    assert median_and_spread([]) == (None, None)


def test_time_interleaved_gives_a_variant_that_fails_at_once_no_timings() -> None:
    def broken() -> None:
        raise ValueError("no")

    errors: list[str] = []
    samples = time_interleaved(lambda fn: fn() or 1.0, {"x": broken, "y": lambda: None}, 3,
                               lambda name, exc: errors.append(name))
    assert samples == {"x": [], "y": [1.0, 1.0, 1.0]}
    assert errors == ["x"]
    # Past the deadline: the first round still runs (every variant gets a timing), no other.
    late = time_interleaved(lambda fn: 1.0, {"y": lambda: None, "z": lambda: None}, 3,
                            lambda name, exc: None, deadline=0.0)
    assert late == {"y": [1.0], "z": [1.0]}


def _bench_module():
    # Not importable as "kernels": that is the package it benchmarks.
    spec = importlib.util.spec_from_file_location("bench_kernels",
                                                  os.path.join(ROOT, "bench", "kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_timer_replays_graphs_and_falls_back_to_host_launch(monkeypatch) -> None:
    import triton.testing

    bench = _bench_module()
    seen, events = [], []

    def graph(fn, rep, return_mode):
        seen.append(("graph", rep))
        if getattr(fn, "capture_fails", False):
            raise RuntimeError("operation not permitted when stream is capturing")
        if getattr(fn, "feature_fails", False):
            events.append("pdl off after the w13 GEMM failed: ...")
        return 1.0

    def host(fn, warmup, rep, return_mode):
        seen.append(("host", rep))
        return 2.0

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", graph)
    monkeypatch.setattr(triton.testing, "do_bench", host)
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bench.Timer, "graph_failures", [])
    monkeypatch.setattr(bench, "fallback_events", lambda: list(events))
    timer = bench.Timer(cuda=True, rep_ms=100)
    calls = []
    broken = lambda: calls.append("broken")  # noqa: E731
    broken.capture_fails = True
    switching = lambda: None  # noqa: E731
    switching.feature_fails = True
    assert timer(lambda: None) == 1.0
    assert timer(bench.eager(lambda: None)) == 2.0
    assert timer(broken) == 2.0
    assert calls == ["broken"]  # run once outside the capture first (compiles, real failures)
    assert timer(switching) == 2.0  # a feature went off mid-capture: timed again, eagerly
    assert bench.Timer(cuda=True, rep_ms=100, graphs=False)(lambda: None) == 2.0
    assert seen == [("graph", 10), ("host", 100), ("graph", 10), ("host", 100),
                    ("graph", 10), ("host", 100), ("host", 100)]
    assert len(bench.Timer.graph_failures) == 2
    assert "capturing" in bench.Timer.graph_failures[0]
    assert "switched off during capture" in bench.Timer.graph_failures[1]


def _run_bench(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """``python bench/SCRIPT ARGS`` on CPU (``SCRIPT`` an absolute path: that script), this
    environment less OUT and AFD_KERNEL_BACKEND (or ``env``), as a process forked from the test
    fork server (kernels.testing.run_script: torch imported once, not once a script); fails with
    the script's output unless it exits 0, else returns that output."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in ("OUT", "AFD_KERNEL_BACKEND")}
    code, out = run_script(os.path.join(ROOT, "bench", script), list(args), env)
    assert code == 0, out[-6000:]
    return out


def test_run_script_runs_a_script_as_python_would(tmp_path) -> None:
    """kernels.testing.run_script, which runs the bench scripts here: ``__main__``, its argv,
    its folder first on the path, the given environment, the repository root as working
    folder; the exit status as the interpreter gives it (a SystemExit message on stderr and
    1, a traceback and 1), the output returned."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        "print(__name__, sys.argv[1:], sys.path[0] == os.path.dirname(__file__),\n"
        "      os.environ.get('PROBE'), os.getcwd() == sys.argv[1])\n"
        "if sys.argv[2] == 'say': sys.exit('bad flag')\n"
        "if sys.argv[2] == 'raise': raise ValueError('boom')\n"
        "sys.exit(int(sys.argv[2]))\n")
    code, out = run_script(str(script), [ROOT, "0"], {**os.environ, "PROBE": "p"})
    assert code == 0 and out == f"__main__ {[ROOT, '0']} True p True\n", out
    assert run_script(str(script), [ROOT, "3"], dict(os.environ))[0] == 3
    code, out = run_script(str(script), [ROOT, "say"], dict(os.environ))
    assert code == 1 and out.endswith("bad flag\n"), out
    code, out = run_script(str(script), [ROOT, "raise"], dict(os.environ))
    assert code == 1 and "Traceback" in out and "ValueError: boom" in out, out


def test_calls_ahead_run_down_to_where_the_test_process_reached(tmp_path) -> None:
    """kernels.testing.start_calls_ahead, which compiles tests/test_kernels_sm90.py's kernels
    ahead of its checks: the calls in the order given, in the module loaded under the given
    name, past a call that raised or skipped, and none at or below the reached index."""
    module = tmp_path / "ahead_probe.py"
    module.write_text(
        "import pytest\n"
        "def record(out, i, how=''):\n"
        "    with open(out, 'a') as f:\n"
        "        f.write(f'{__name__} {i}\\n')\n"
        "    if how == 'fail':\n"
        "        raise AssertionError(i)\n"
        "    if how == 'skip':\n"
        "        pytest.skip('no')\n")
    out = str(tmp_path / "calls.txt")
    reached = forkserver_context().Value("i", 2)
    calls = [(i, "record", {"out": out, "i": i, "how": how})
             for i, how in ((6, "fail"), (5, "skip"), (4, ""), (3, ""), (2, ""), (1, ""))]
    proc = start_calls_ahead(str(module), "probe_name", calls, reached, str(tmp_path))
    proc.join(120)
    assert proc.exitcode == 0
    assert Path(out).read_text().split("\n") == [f"probe_name {i}" for i in (6, 5, 4, 3)] + [""]


def _smoke(tmp_path, *flags: str) -> dict:
    """``bench/kernels.py --smoke *flags`` on CPU: its JSON result."""
    out = tmp_path / "kernels.json"
    _run_bench("kernels.py", "--smoke", *flags, "--json", str(out))
    return json.loads(out.read_text())


def test_bench_kernels_quick_smoke_runs_on_cpu(tmp_path) -> None:
    # FP8: the test below; --gpt-oss adds its rows after the MoE table (the test below too)
    result = _smoke(tmp_path, "--quick", "--rounds", "1", "--no-fp8", "--gpt-oss")
    assert result["errors"] == []
    assert [(r["experts"], r["m"]) for r in result["gpt_oss"]] == [(4, 8)]
    assert {c["op"] for c in result["checks"]} >= {"fused_moe", "fused_moe gpt-oss"}
    assert result["ceilings_end"]["copy_bytes_per_s"] > 0  # measured again at the end: drift
    assert result["checks"] and all(c["ok"] for c in result["checks"])
    # every cell's feature sets have a row; a set is run again only where its kernels differ
    # from those of a set run before it in the cell: on the CPU no set has PDL, and grouped_moe
    # never takes the inline route, so no_tma (both entries) and fused no_inline still run
    sets = {"default", "no_pdl", "no_tma", "no_inline"}
    for cell in ((8, 16), (32, 3)):
        rows = [c for c in result["checks"] if (c.get("experts"), c.get("m")) == cell
                and c["op"] in ("fused_moe", "grouped_moe")]
        assert {(c["op"], c["features"]) for c in rows} == {
            (op, s) for op in ("fused_moe", "grouped_moe") for s in sets}, cell
        assert {(c["op"], c["features"], c["same_as"]) for c in rows if "same_as" in c} == {
            ("fused_moe", "no_pdl", "default"), ("grouped_moe", "no_pdl", "default"),
            ("grouped_moe", "no_inline", "default")}, cell
    for row in result["moe"]:
        for entry in ("fused", "grouped", "grouped_eager", "loop"):
            assert row[f"{entry}_ms"] > 0 and row[f"{entry}_spread"] >= 1.0
    first = result["feature_ab"][0]
    assert first["grouped_default_ms"] > 0 and first["grouped_no_pdl_ms"] > 0
    assert first["fused_default_ms"] > 0
    for row in result["tile_ab"]:
        assert row["timings"][0]["tile"] == row["table_tile"] and row["table_ms"] > 0
        assert len(row["timings"]) > 1  # the candidates beside the table's tile
    assert {r["gemm"] for r in result["tile_ab"]} == {"w13", "w2"}
    (best,) = result["best_tiles"]  # smoke: run for the one A/B cell even if the table won
    assert best["ok"] and all(e < 1e-2 for e in best["rel_err"].values())
    for key in ("grouped_table_ms", "grouped_best_ms", "fused_table_ms", "fused_best_ms"):
        assert best[key] > 0


def test_bench_kernels_fp8_smoke_runs_on_cpu(tmp_path) -> None:
    """The FP8 section (what ``FP8=1 bash bench/gpu_kernels.sh`` runs): its device checks and
    the FP8 table beside bf16, at tiny dims under the interpreter."""
    result = _smoke(tmp_path, "--fp8-only")
    assert result["errors"] == [] and result["moe"] == []
    checks = result["checks"]
    assert {c["op"] for c in checks} == {"fused_moe fp8", "grouped_moe fp8"}
    assert all(c["ok"] and 0.0 < c["rel_err_vs_bf16"] < 0.1 for c in checks)
    assert result["fp8"]
    for row in result["fp8"]:
        assert 0 < row["floor_fp8_ms"] < row["floor_bf16_ms"]
        for entry in ("fused_bf16", "fused_fp8", "grouped_fp8"):
            assert row[f"{entry}_ms"] > 0


def test_bench_kernels_gpt_oss_smoke_runs_on_cpu(tmp_path) -> None:
    """The gpt-oss section (``GPT_OSS=1 bash bench/gpu_kernels.sh``): Triton with the expert
    biases, alpha and limit checked against the torch reference (which the options must
    change), then each cell's six variants timed beside the floor, at tiny dims under the
    interpreter, top-4."""
    result = _smoke(tmp_path, "--gpt-oss-only")
    assert result["errors"] == [] and result["moe"] == [] and result["fp8"] == []
    checks = result["checks"]
    assert {c["op"] for c in checks} == {"fused_moe gpt-oss", "grouped_moe gpt-oss"}
    assert all(c["ok"] and c["rel_err"] < 1e-2 and c["rel_err_without_options"] > 0.1
               for c in checks)
    rows = result["gpt_oss"]
    assert [(r["experts"], r["m"], r["top_k"]) for r in rows] == [(4, 8, 4)]  # smoke: one cell
    for row in rows:
        assert 0 < row["floor_ms"] <= row["floor_grouped_ms"]
        for entry in ("fused_oss", "fused_plain", "torch_fused", "torch_loop", "grouped_oss",
                      "grouped_plain"):
            assert row[f"{entry}_ms"] > 0, entry


def test_bench_kernels_mxfp4_smoke_runs_on_cpu(tmp_path) -> None:
    """The MXFP4 section (``--mxfp4``): both entries checked against the torch route, then
    MXFP4 beside bf16 on the same weights dequantized, each beside its floor (MXFP4's at 4.25
    bits a weight), at tiny dims under the interpreter, top-4."""
    result = _smoke(tmp_path, "--mxfp4")
    assert result["errors"] == [] and result["moe"] == [] and result["fp8"] == []
    checks = result["checks"]
    assert {c["op"] for c in checks} == {"fused_moe mxfp4", "grouped_moe mxfp4"}
    assert all(c["ok"] and c["rel_err"] < 1e-2 for c in checks)
    (row,) = result["mxfp4"]
    assert (row["experts"], row["m"], row["top_k"]) == (4, 8, 4)
    assert 0 < row["floor_mx_ms"] <= row["floor_ms"] <= row["floor_grouped_ms"]
    for entry in ("fused_mx", "fused_bf16", "grouped_mx", "grouped_bf16"):
        assert row[f"{entry}_ms"] > 0, entry


def test_bench_kernels_prefill_smoke_runs_on_cpu(tmp_path) -> None:
    """The prefill attention section (full run, or ``PREFILL=1 bash bench/gpu_kernels.sh``):
    checked against the per-sequence loop, timed beside it and the floor, a launch variant."""
    result = _smoke(tmp_path, "--prefill-only")
    assert result["errors"] == [] and result["moe"] == [] and result["fp8"] == []
    checks = result["checks"]
    assert {c["op"].split()[1] for c in checks} == {"mla", "gqa"} and len(checks) == 4
    assert all(c["ok"] for c in checks)
    rows = [r for r in result["prefill"] if "block_m" not in r]
    assert len(rows) == 4
    for row in rows:
        assert row["floor_ms"] > 0 and row["triton_ms"] > 0 and row["torch_ms"] > 0
    assert any(r.get("block_m") and r["triton_ms"] > 0 for r in result["prefill"])


_OTHERS_SMOKE = """
import importlib.util, json, sys
sys.path.insert(0, ".")  # the repository root (the working folder), as python -c has it
sys.argv.append("--smoke")  # bench/kernels.py then loads the kernels under the interpreter
spec = importlib.util.spec_from_file_location("bench_kernels", "bench/kernels.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
errors = []
rows = bench.bench_others(bench.Timer(cuda=False, rep_ms=1),
                          {"copy_bytes_per_s": 1e11, "matmul_flops_per_s": 1e13}, errors, "cpu",
                          smoke=True)
print(json.dumps({"rows": rows, "errors": [e["case"] for e in errors]}))
"""


def test_bench_others_smoke_runs_on_cpu(tmp_path) -> None:
    """The "other kernels" section (not in --quick): each op checked and timed beside its
    torch reference, GQA decode included."""
    script = tmp_path / "others_smoke.py"
    script.write_text(_OTHERS_SMOKE)
    out = _run_bench(str(script))
    result = json.loads(out.strip().splitlines()[-1])
    assert result["errors"] == []
    ops = {row["op"]: row for row in result["rows"]}
    for op in ("rms_norm+residual", "rotary interleaved", "mla_decode", "gqa_decode",
               "gqa_decode 1 seq"):
        row = ops[op]
        assert row["rel_err"] < 1e-2 and row["triton_ms"] > 0 and row["torch_ms"] > 0, row
        assert row["floor_ms"] > 0
    assert any(op.startswith("gqa_decode bn=") for op in ops)


def test_bench_kernels_verify_smoke_runs_on_cpu(tmp_path) -> None:
    """The verify-row section (full run, or ``VERIFY=1 bash bench/gpu_kernels.sh``): MLA and GQA
    decode of sequences x 2 and 4 rows, per row beside grouped, both checked against the
    per-row torch reference; MLA's grouped launch variants."""
    result = _smoke(tmp_path, "--verify-only")
    assert result["errors"] == [] and result["moe"] == [] and result["fp8"] == []
    ops = {row["op"]: row for row in result["verify"]}
    for per_seq in (2, 4):
        row = ops[f"mla_verify {per_seq} rows/seq"]
        assert set(row["rel_err"]) == {"per_row", "grouped", "grouped_torch"}
        assert all(err < 1e-2 for err in row["rel_err"].values())
        for entry in ("per_row", "grouped", "torch_per_row", "torch_grouped"):
            assert row[f"{entry}_ms"] > 0, (entry, row)
        assert row["floor_ms"] > 0
        assert any(op.startswith(f"mla_verify {per_seq} rows/seq grouped bh=") for op in ops)
        row = ops[f"gqa_verify {per_seq} rows/seq"]
        assert set(row["rel_err"]) == {"per_row", "grouped"}
        assert all(err < 1e-2 for err in row["rel_err"].values())
        assert row["per_row_ms"] > 0 and row["grouped_ms"] > 0 and row["floor_ms"] > 0


def test_host_overhead_mock_runs_on_cpu(tmp_path) -> None:
    out = tmp_path / "host.json"
    _run_bench("host_overhead.py", "--mock", "--calls", "50", "--json", str(out), "--profile",
               str(tmp_path / "profile.txt"), env=dict(os.environ))
    result = json.loads(out.read_text())
    assert result["fused_moe_us"] > 0 and result["grouped_moe_us"] > 0
    profile = (tmp_path / "profile.txt").read_text()
    for entry in ("fused_moe_triton", "grouped_moe_triton", "launch_w13", "launch_w2"):
        assert entry in profile


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_moe_profile_smoke_runs_on_cpu(tmp_path) -> None:
    """``bench/moe_profile.py`` (per-kernel device time of a MoE call, for the next GPU run)
    at tiny dims under the interpreter: both entries profiled, floors and call times there."""
    out = tmp_path / "moe_profile.json"
    _run_bench("moe_profile.py", "--smoke", "--json", str(out))
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["floor_w13_us"] > 0 and cell["floor_w2_us"] > 0
    for entry in ("fused_moe", "grouped_moe"):
        assert cell[entry]["kernels_us"] and cell[entry]["kernels_sum_us"] > 0
        assert cell[entry]["call_us_no_pdl"] > 0 and cell[entry]["call_us_defaults"] > 0


def test_ws_probe_smoke_runs_on_cpu(tmp_path) -> None:
    """``bench/ws_probe.py`` (the 128-row ws tiles' probe and timing, for the next GPU run) at
    tiny dims under the interpreter: one JSON line per tile and GEMM, each tile's output equal
    to the table tile's, times and floors there."""
    out = tmp_path / "ws_probe.jsonl"
    _run_bench("ws_probe.py", "--smoke", "--experts", "8", "--json", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["gemm"] for r in rows] == ["w13", "w2"]
    for r in rows:
        assert "ws=True" in r["tile"] and r["rel_err"] < 1e-2
        assert r["warp_specialized"] is True  # the ws path ran, not its plain twin
        assert r["ws_us"] > 0 and r["table_us"] > 0 and r["floor_us"] > 0


def test_mla_probe_smoke_runs_on_cpu(tmp_path) -> None:
    """``bench/mla_probe.py`` (the MLA decode launch variants, for the next GPU run) at tiny
    dims under the interpreter: one JSON line per variant, each checked against the torch
    reference and timed, the default first (the others' ratios are to it); plain rows through
    the per-row kernel's variants, then verify rows (3 a sequence) through the grouped one's."""
    out = tmp_path / "mla_probe.jsonl"
    _run_bench("mla_probe.py", "--smoke", "--json", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["variant"], r["rows_per_seq"]) for r in rows] == [
        ("default", 1), ("bh64", 1), ("bh64 tma", 1), ("default", 3), ("tma", 3)]
    assert rows[1]["knobs"]["block_h"] == 64 and rows[2]["knobs"]["tma"] is True
    assert rows[4]["knobs"]["tma"] is True
    for r in rows:
        assert "error" not in r, r
        assert r["rel_err"] < 1e-2 and r["us"] > 0 and r["floor_us"] > 0
        assert r["over_default"] is not None


def test_dsa_kernels_smoke_runs_on_cpu(tmp_path) -> None:
    """``bench/dsa_kernels.py`` (DeepSeek-V3.2's sparse decode: Triton, its parts, the torch
    path and the dense MLA kernel) at tiny dims under the interpreter: one JSON line per
    (shape, case), every case timed, the Triton op within bf16's error of the torch path."""
    out = tmp_path / "dsa.jsonl"
    _run_bench("dsa_kernels.py", "--smoke", "--json", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cases = ["triton", "index_keys", "topk", "selected", "torch", "dense_mla"]
    assert [(r["ctx"], r["case"]) for r in rows] == [(c, n) for c in (40, 72) for n in cases]
    for r in rows:
        assert "error" not in r, r
        assert r["us"] > 0 and r["floor_us"] > 0 and r["rel_err_triton_vs_torch"] < 1e-2
        assert r["graph"] == (r["case"] != "torch")


def test_ws_probe_runs_a_64_row_control_before_the_128_row_tiles(monkeypatch) -> None:
    """Each GEMM's 128-row ws tiles come after one 64-row ws tile, which makes its activation
    descriptor on the device as they do but is not split between the consumers: if the GPU run
    fails at the control, the device-made descriptor is what broke, not the split."""
    from kernels import moe_gemm_triton as g
    from kernels.fused_moe_tuning import WS_128_TILES

    # the probe imports bench/probe_setup.py, which puts the root first and bench/ last
    monkeypatch.setattr(sys, "path", list(sys.path) + [os.path.join(ROOT, "bench")])
    spec = importlib.util.spec_from_file_location("ws_probe",
                                                  os.path.join(ROOT, "bench", "ws_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    environ = dict(os.environ)
    spec.loader.exec_module(probe)
    # Importing it changes no switch of this process (it once imported bench/moe_profile.py,
    # which sets AFD_MOE_PDL=0 at import: every later test then ran without PDL's default).
    assert dict(os.environ) == environ
    import torch

    rows = g.RowGroups(g.ROWS, 8, counts=torch.tensor([8]))
    tiles = probe.ws_tiles(128, 128)
    assert set(tiles) == {"w13", "w2"}
    for gemm, chosen in tiles.items():
        control = chosen[0]
        assert control == probe.CONTROL_TILES[gemm] and control.ws and control.block_m == 64
        assert g.ws_wanted(gemm, rows, control, tma=True)  # warp-specializes by default
        assert chosen[1:] == WS_128_TILES[gemm]


def _stub(path, text: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(0o755)


def test_gpu_recheck_keeps_the_last_whole_archive_when_a_pack_is_cut(tmp_path) -> None:
    """``bench/gpu_recheck.sh`` packs everything into one recheck.tgz after each stage, so a call
    cut at the device tool's limit keeps what ran. A pack cut itself (the second here: its tar
    writes half an archive and dies as a kill would leave it) must leave the previous whole
    archive, not a truncated one. python3, nvidia-smi and that tar are stubs: no GPU, no run."""
    import tarfile

    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs / "python3", 'echo "1 passed"\n')
    _stub(stubs / "nvidia-smi", 'echo "stub GPU"\n')
    real_tar = subprocess.run(["bash", "-c", "command -v tar"], capture_output=True,
                              text=True, check=True).stdout.strip()
    count = tmp_path / "tar_calls"
    # the second tar writes half an archive where it was told, then the whole call is killed
    # (its process group: the script runs in a session of its own)
    _stub(stubs / "tar", "\n".join([
        f'n=$(( $(cat "{count}" 2>/dev/null || echo 0) + 1 )); echo $n > "{count}"',
        'if [ "$n" = 2 ]; then',
        '  while [ $# -gt 0 ]; do [ "$1" = czf ] && printf "\\037\\213half" > "$2"; shift; done',
        '  kill -9 0',
        'fi',
        f'exec "{real_tar}" "$@"', ""]))
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(out),
           "TMPDIR": str(tmp_path)}  # the script's mktemp work folder
    subprocess.run(["bash", "bench/gpu_recheck.sh"], cwd=ROOT, env=env, capture_output=True,
                   text=True, timeout=120, start_new_session=True)
    assert int(count.read_text()) >= 2  # the second pack ran (and was cut)
    with tarfile.open(out / "recheck.tgz") as archive:  # a truncated one raises here
        names = archive.getnames()
    assert "./graphs_tests.log" in names and "./env.txt" in names, names


def test_gpu_recheck_header_sums_its_stage_timeouts() -> None:
    """``bench/gpu_recheck.sh``'s header lists its stage timeouts and their sum with setup
    (the device tool's 590 s call): the list is the script's own timeouts, in stage order
    (1-4 ``timeout -k 5 N``, then each gpu_kernels.sh mode's ``seconds``), and the sum is
    right and within 590 s."""
    import re

    with open(os.path.join(ROOT, "bench", "gpu_recheck.sh")) as f:
        text = f.read()
    head = re.search(r"Stage timeouts: ([\d +]+) s plus ~(\d+) s of setup = (\d+) s", text)
    assert head, "the header's 'Stage timeouts: ...' line"
    listed = [int(n) for n in head.group(1).split("+")]
    assert sum(listed) + int(head.group(2)) == int(head.group(3)) <= 590, head.group(0)
    seconds = int(re.search(r"^  seconds=(\d+)$", text, re.M).group(1))
    modes = re.search(r"^for mode in ([A-Z0-9 ]+); do$", text, re.M).group(1).split()
    script = [int(n) for n in re.findall(r"timeout -k 5 (\d+) python3", text)]
    script += [seconds] * len(modes)
    assert listed == script, (listed, script)


def test_v4_decode_smoke_runs_on_cpu(tmp_path) -> None:
    """``bench/v4_decode.py`` (DeepSeek-V4's decode attention and CSA index scores: Triton
    beside the torch path) at tiny dims under the interpreter: one JSON line per (shape, case),
    every case timed, the Triton kernels within bf16's error of the torch path."""
    out = tmp_path / "v4.jsonl"
    _run_bench("v4_decode.py", "--smoke", "--json", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["layer"], r["case"]) for r in rows] == [
        ("hca", "triton"), ("hca", "torch"),
        *(("csa", n) for n in ("triton", "torch", "index_triton", "index_torch"))]
    for r in rows:
        assert "error" not in r, r
        assert r["us"] > 0 and r["floor_us"] > 0 and r["rel_err_triton_vs_torch"] < 1e-2


def test_window_decode_smoke_runs_on_cpu(tmp_path) -> None:
    """``bench/window_decode.py`` (MiMo-V2-Flash's decode rows and a prefill chunk: the Triton
    kernels beside window_attention_torch) at tiny dims under the interpreter: one JSON line
    per (shape, case), every case timed, the kernels within bf16's error of the torch path."""
    out = tmp_path / "window.jsonl"
    _run_bench("window_decode.py", "--smoke", "--json", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["layer"], r["case"]) for r in rows] == [
        ("swa", "triton"), ("swa", "torch"), ("full", "triton"), ("full", "torch"),
        ("swa", "triton"), ("swa", "torch")]
    assert [r["queries"] for r in rows] == [1, 1, 1, 1, 12, 12]
    for r in rows:
        assert "error" not in r, r
        assert r["us"] > 0 and r["floor_us"] > 0 and r["rel_err_triton_vs_torch"] < 1e-2


def test_gdn_decode_smoke_runs_on_cpu(tmp_path) -> None:
    """``bench/gdn_decode.py`` (Qwen3-Next's linear-attention decode rows: the Triton conv and
    recurrent-step kernels beside the torch path) at tiny dims under the interpreter: one JSON
    line per (rows, case), every case timed, Triton within bf16's error of the torch path."""
    out = tmp_path / "gdn.jsonl"
    _run_bench("gdn_decode.py", "--smoke", "--json", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["rows"], r["case"]) for r in rows] == [(3, "triton"), (3, "torch")]
    for r in rows:
        assert "error" not in r, r
        assert r["us"] > 0 and r["floor_us"] > 0 and r["rel_err_triton_vs_torch"] < 1e-2
