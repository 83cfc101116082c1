"""A Hugging Face Hub repo id as the model (afd/hub.py), as vLLM takes one: resolved once, before
any rank starts, to its snapshot in the HF cache; the ranks get the folder. No test reaches the
Hub (conftest sets HF_HUB_OFFLINE=1): each lays the embedded tiny checkpoint out as a cache of
its own (``models--org--name/snapshots/<commit>/`` plus ``refs/<branch>``, huggingface_hub's
layout) and points HF_HUB_CACHE at it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from afd import LLM, SamplingParams, hub
from models.default_model import default_model_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = "a" * 40  # the commits of the test repo's two snapshots
V2 = "b" * 40


def add_snapshot(cache: str, repo_id: str, commit: str, refs: tuple[str, ...] = (),
                 **config_changes) -> str:
    """The embedded tiny checkpoint as snapshot ``commit`` of ``repo_id`` in HF cache folder
    ``cache``, each branch of ``refs`` pointing at it; ``config_changes`` edit its config.json."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    shutil.copytree(default_model_path(), snapshot)
    if config_changes:
        with open(os.path.join(snapshot, "config.json")) as f:
            config = json.load(f)
        config.update(config_changes)
        with open(os.path.join(snapshot, "config.json"), "w") as f:
            json.dump(config, f)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An HF cache holding org/tiny at main (MAIN) and at branch v2 (V2: eos 2 added), for this
    process (huggingface_hub read HF_HUB_CACHE at import) and its subprocesses."""
    import huggingface_hub.constants as constants

    folder = str(tmp_path / "hf-cache")
    add_snapshot(folder, "org/tiny", MAIN, refs=("main",))
    add_snapshot(folder, "org/tiny", V2, refs=("v2",), eos_token_id=[1, 2])
    monkeypatch.setenv("HF_HUB_CACHE", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", folder)
    assert constants.HF_HUB_OFFLINE  # conftest's: nothing here may reach the Hub
    return os.path.realpath(folder)


def snapshot_of(cache: str, commit: str) -> str:
    return os.path.join(cache, "models--org--tiny", "snapshots", commit)


def test_llm_takes_a_repo_id_and_generates_what_the_local_folder_does(cache):
    """``LLM("org/tiny")`` reads the snapshot main points at, and its greedy tokens are those of
    ``LLM(<the same checkpoint's folder>)``."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["Hello, my name is", "The capital of France is"]
    with LLM(default_model_path(), seed=0) as local:
        want = [o.outputs[0].token_ids for o in local.generate(prompts, params, use_tqdm=False)]
    with LLM("org/tiny", seed=0) as from_hub:
        assert from_hub.config.model == snapshot_of(cache, MAIN)
        got = [o.outputs[0].token_ids for o in from_hub.generate(prompts, params,
                                                                 use_tqdm=False)]
    assert got == want


def test_revision_picks_its_snapshot_and_only_what_afd_reads_is_asked_for(cache, monkeypatch):
    """``revision`` (a branch or a commit) picks that snapshot; the files asked of the Hub are
    the config, generation config, tokenizer files and safetensors (with an index: the shards
    it names), never *.bin / *.pth, and no weights at all for load_format "dummy"."""
    assert hub.resolve("org/tiny") == snapshot_of(cache, MAIN)
    assert hub.resolve("org/tiny", revision="v2") == snapshot_of(cache, V2)
    assert hub.resolve("org/tiny", revision=V2) == snapshot_of(cache, V2)
    asked = []
    real = hub._snapshot

    def spy(repo_id, what, revision, download_dir, allow, ignore=None):
        asked.append(allow)
        return real(repo_id, what, revision, download_dir, allow, ignore)

    monkeypatch.setattr(hub, "_snapshot", spy)
    hub.resolve("org/tiny", revision="v2")
    first, weights = asked
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", hub.WEIGHTS_INDEX} <= set(first)
    assert not [p for p in first if p.endswith((".bin", ".pth", ".py", ".safetensors"))]
    assert weights == ["*.safetensors"]
    asked.clear()
    hub.resolve_sources("org/tiny", load_format="dummy", trust_remote_code=True)
    assert len(asked) == 1 and hub.REMOTE_CODE in asked[0]  # the tokenizer's code: trusted only
    # an index: exactly the shards it names
    folder = snapshot_of(cache, MAIN)
    with open(os.path.join(folder, hub.WEIGHTS_INDEX), "w") as f:
        json.dump({"weight_map": {"a": "model.safetensors", "b": "model.safetensors"}}, f)
    asked.clear()
    assert hub.resolve("org/tiny") == folder and asked[1] == ["model.safetensors"]
    with LLM("org/tiny", revision="v2", seed=0) as llm:  # LLM's vLLM keyword
        assert llm.config.model == snapshot_of(cache, V2)
        assert 2 in llm.engine.eos_token_ids


def test_a_repo_not_in_the_cache_offline_is_an_error_naming_it(cache):
    """Offline and not cached: a ValueError naming the argument and the repo id, saying that
    HF_HUB_OFFLINE is set, the library's own message kept; a missing revision too."""
    with pytest.raises(ValueError, match=r"model 'org/absent': .*'org/absent' .*not in the "
                       r"local HF cache .*HF_HUB_OFFLINE is set.*LocalEntryNotFoundError"):
        LLM("org/absent")
    with pytest.raises(hub.ModelSourceError, match=r"'org/tiny' at revision 'v9'"):
        hub.resolve("org/tiny", revision="v9")
    with pytest.raises(hub.ModelSourceError, match=r"tokenizer 'org/absent'"):
        hub.resolve_sources(default_model_path(), "org/absent")


@pytest.mark.parametrize(("error", "says"), [
    ("GatedRepoError", "is gated: accept its terms on huggingface.co and set HF_TOKEN"),
    ("RepositoryNotFoundError", "is not on the Hub, or is private (set HF_TOKEN"),
    ("RevisionNotFoundError", "has no revision 'v9'"),
])
def test_a_gated_or_unknown_repo_is_an_error_naming_it(monkeypatch, error, says):
    """What the Hub answers (snapshot_download stubbed: no test reaches the Hub) becomes one
    line naming the argument, the repo and what to do, the library's message kept."""
    import huggingface_hub
    import huggingface_hub.errors

    base = getattr(huggingface_hub.errors, error)

    class Answer(base):
        def __init__(self, message):  # the library's need an HTTP response
            Exception.__init__(self, message)

    def snapshot_download(*args, **kwargs):
        raise Answer("403 Client Error.\nCannot access repo at https://huggingface.co/org/x")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(hub.ModelSourceError) as err:
        hub.resolve("org/x", what="tokenizer", revision="v9")
    message = str(err.value)
    assert message.startswith("tokenizer 'org/x': Hugging Face Hub repo 'org/x' at revision "
                              "'v9' ") and says in message, message
    assert "\n" not in message and "403 Client Error. Cannot access repo" in message


@pytest.mark.parametrize("bad", ["./missing", "/abs/missing", "org/name/extra", "a--b"])
def test_a_path_neither_a_folder_nor_a_repo_id_is_refused_before_any_hub_call(bad,
                                                                            monkeypatch):
    """A path that does not exist and cannot be a repo id: an error naming ``model`` and saying
    it is neither, with no Hub call (the error was config.json missing, from each rank)."""
    monkeypatch.setattr(hub, "_snapshot", lambda *a, **k: pytest.fail("asked the Hub"))
    with pytest.raises(ValueError, match=rf"model '{bad}' is neither a local folder .*nor a "
                       r"Hugging Face Hub repo id"):
        LLM(bad)


def test_afd_serve_refuses_a_bad_model_in_one_line_before_starting_ranks(tmp_path):
    """``afd serve`` with a bad path, or a repo id offline and not cached, on a multi-rank
    layout: one line naming the model, exit status 1, no traceback, no rank started (the
    launcher is never reached: its ranks would each print a traceback)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT)
    for model, says in (("./missing", "is neither a local folder"),
                        ("org/absent", "is not in the local HF cache")):
        proc = subprocess.run([sys.executable, "-m", "afd.cli", "serve", model, "--attention",
                               "1", "--ffn", "1", "--port", "0"], capture_output=True,
                              text=True, timeout=120, env=env, cwd=str(tmp_path))
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"afd serve: model '{model}'"), lines
        assert says in lines[0] and "Traceback" not in proc.stderr


def test_launch_resolves_once_and_serves_under_the_repo_id(cache, monkeypatch):
    """launch/serve.py's flags: the positional repo id with --revision resolves to that
    snapshot, the served name stays the repo id as typed (vLLM's), --served-model-name wins;
    what afd serve handed its ranks (SOURCES_ENV) is taken with no Hub call."""
    from launch import serve

    args = serve.parse_args(["org/tiny", "--revision", "v2", "--tokenizer", "org/tiny"])
    assert serve.needs_hub(args)
    sources = serve.resolve_sources(args)
    assert sources["model"] == snapshot_of(cache, V2)  # --revision: the model's
    assert sources["tokenizer"] == snapshot_of(cache, MAIN)  # --tokenizer-revision: main
    monkeypatch.setenv(serve.SOURCES_ENV, json.dumps(sources))
    monkeypatch.setattr(serve.hub, "resolve_sources", lambda *a, **k: pytest.fail("resolved"))
    handed = serve.model_sources(args, local_rank=0, world=3)
    serve.use_sources(args, handed)
    assert (args.model, args.served_model_name) == (snapshot_of(cache, V2), ["org/tiny"])
    named = serve.parse_args(["org/tiny", "--revision", "v2", "--tokenizer", "org/tiny",
                              "--served-model-name", "mine"])
    serve.use_sources(named, serve.model_sources(named, local_rank=0, world=3))
    assert named.served_model_name == ["mine"]
    local = serve.parse_args([default_model_path()])
    assert not serve.needs_hub(local)
    monkeypatch.delenv(serve.SOURCES_ENV)
    assert serve.model_sources(local, local_rank=0, world=3) is None  # as given, no store


class DictStore:
    """torchrun's store as node_sources uses it (check/get/set/add), in memory."""

    def __init__(self):
        self.data: dict[str, bytes | int] = {}
        self.lock = threading.Lock()

    def check(self, keys):
        with self.lock:
            return all(k in self.data for k in keys)

    def get(self, key):
        with self.lock:
            return self.data[key]

    def set(self, key, value):
        with self.lock:
            self.data[key] = value.encode() if isinstance(value, str) else value

    def add(self, key, n):
        with self.lock:
            self.data[key] = self.data.get(key, 0) + n
            return self.data[key]


def test_under_torchrun_each_node_resolves_once_for_its_ranks(monkeypatch):
    """Two nodes of two ranks under torchrun: the first rank of each node resolves (one Hub
    call a node, not one a rank), its node's other rank takes its folders from the store, and
    no rank goes on before every node has its files; an error reaches every rank of the
    node."""
    from launch import serve

    store = DictStore()
    monkeypatch.setattr(serve, "_store_client", lambda: store)
    calls = []

    def fake_resolve(args):
        calls.append(args.model)
        return {"request": [], "model": f"/cache/{len(calls)}", "tokenizer": None,
                "model_is_hub_id": True}

    monkeypatch.setattr(serve, "resolve_sources", fake_resolve)
    args = serve.parse_args(["org/tiny"])
    got = {}

    def rank(node: int, local_rank: int) -> None:
        got[node, local_rank] = serve.node_sources(args, local_rank, world=4, node=str(node),
                                                   poll_s=0.01)

    threads = [threading.Thread(target=rank, args=(n, r)) for n in (0, 1) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 2 and len(got) == 4
    assert got[0, 0]["model"] == got[0, 1]["model"] != got[1, 0]["model"] == got[1, 1]["model"]
    monkeypatch.setattr(serve, "resolve_sources", lambda args: (_ for _ in ()).throw(
        hub.ModelSourceError("model 'org/tiny': gone")))
    store.data.clear()
    with pytest.raises(SystemExit, match="model 'org/tiny': gone"):
        serve.node_sources(args, 0, world=2, node="0", poll_s=0.01)
    with pytest.raises(SystemExit, match="model 'org/tiny': gone"):
        serve.node_sources(args, 1, world=2, node="0", poll_s=0.01)


def test_under_torchrun_a_slow_fetch_is_waited_for_and_a_gone_node_is_an_error(monkeypatch):
    """A download longer than --timeout is waited for while its rank beats; a node whose first
    rank never resolves (gone mid-download) fails the ranks waiting on it after --timeout with
    no beat, instead of holding them forever."""
    from launch import serve

    store = DictStore()
    monkeypatch.setattr(serve, "_store_client", lambda: store)

    def slow_resolve(args):
        time.sleep(1.5)  # over --timeout below: only the beats keep the waiting rank going
        return {"request": [], "model": "/cache/slow", "tokenizer": None,
                "model_is_hub_id": True}

    monkeypatch.setattr(serve, "resolve_sources", slow_resolve)
    # --timeout 50 beats: at 5 (0.1 s) a loaded machine's beat thread, held off the CPU past
    # it, failed the waiting rank (1 run in 40)
    args = serve.parse_args(["org/tiny", "--timeout", "1"])
    got = {}

    def rank(local_rank: int) -> None:
        got[local_rank] = serve.node_sources(args, local_rank, world=2, node="0", poll_s=0.01,
                                             beat_s=0.02)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got[0]["model"] == got[1]["model"] == "/cache/slow"
    args = serve.parse_args(["org/tiny", "--timeout", "0.1"])  # no beat below: failed at once
    store.data.clear()  # node 1's first rank never resolves: its other rank gives up
    with pytest.raises(SystemExit, match="node 1's first rank.*a node is gone"):
        serve.node_sources(args, 1, world=4, node="1", poll_s=0.01)
    store.data.clear()  # node 0 has its files, node 1 never comes: node 0 gives up too
    monkeypatch.setattr(serve, "resolve_sources", lambda args: {
        "request": [], "model": "/cache/0", "tokenizer": None, "model_is_hub_id": True})
    with pytest.raises(SystemExit, match="every node's model files.*1 of 4 have"):
        serve.node_sources(args, 0, world=4, node="0", poll_s=0.01)


def test_rank_spec_takes_its_nodes_folders():
    """A rank's spec: the model and tokenizer folders its own node resolved, not rank 0's."""
    import torch

    from afd.config import EngineConfig
    from afd.workers import Layout, WorkerSpec
    from launch import serve

    cfg = EngineConfig("/node0/hf/snap", torch.float32, "cpu", 64, 4, None, 8, 32,
                       tokenizer="/node0/hf/tok")
    template = WorkerSpec(-1, Layout(0, 1, 1), cfg, None, 1, "torch", 5.0, "127.0.0.1", 0, "",
                          ()).to_json()
    spec = serve.rank_spec(template, 1, 1, embedded=False,
                           node_folders=("/node1/hf/snap", "/node1/hf/tok"))
    assert (spec.engine_cfg.model, spec.engine_cfg.tokenizer) == ("/node1/hf/snap",
                                                                  "/node1/hf/tok")
    assert serve.rank_spec(template, 1, 1, embedded=False).engine_cfg.model == "/node0/hf/snap"


@pytest.mark.slow  # 8 s: the hand-off and the name are checked at the launch level above
def test_afd_serve_of_a_repo_id_on_two_ranks(cache):
    """``afd serve org/tiny --attention 1 --ffn 1``: resolved by afd serve, which hands both
    ranks the snapshot folder, served under the repo id, a chat completion answered."""
    import openai

    from launch.serve import SOURCES_ENV

    sys.path.append(os.path.join(ROOT, "bench"))
    from server_proc import LocalServer

    server = LocalServer("org/tiny", "--attention", "1", "--ffn", "1", afd_serve=True)
    try:
        procs = server.tree()
        (zygote,) = [p for p in procs if p.ppid() == server.proc.pid]  # the ranks' (forked)
        ranks = [p for p in procs if p.ppid() == zygote.pid]
        assert len(ranks) == 2
        for p in [zygote, *ranks]:  # a forked process's /proc environ is its zygote's
            assert json.loads(p.environ()[SOURCES_ENV])["model"] == snapshot_of(cache, MAIN)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["org/tiny"]
        r = client.chat.completions.create(model="org/tiny", max_tokens=2, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert r.usage.completion_tokens == 2 and r.model == "org/tiny"
    finally:
        server.stop()
