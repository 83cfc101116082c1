"""A model or tokenizer argument as vLLM takes it: a local checkpoint folder, used as it is, or a
Hugging Face Hub repo id (``org/name``), resolved to its folder in the local HF cache and
downloaded there first where missing.

Resolution happens once, in the process that starts the ranks (``LLM``, ``afd serve``, and under
torchrun the first rank of each node), before any rank starts: ranks get the local folder and
never reach the Hub. huggingface_hub does the work and reads its own environment:
``HF_HUB_OFFLINE=1`` (the cache only), ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is),
``HF_TOKEN`` (gated and private repos); ``download_dir`` (vLLM's ``--download-dir``) is a cache
folder of that same layout in place of the default one.
"""

from __future__ import annotations

import json
import os

# What afd reads of a checkpoint, all at the folder's top level: config.json (models/config.py),
# generation_config.json (afd/llm.py), the tokenizer through transformers' AutoTokenizer, and
# the safetensors shards that model.safetensors.index.json names (models/weights.py), or every
# *.safetensors where there is no index. Nothing else is fetched: no *.bin / *.pth, no
# original/ or other subfolders, no duplicate consolidated weights.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "tiktoken.model", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
WEIGHTS_INDEX = "model.safetensors.index.json"
REMOTE_CODE = "*.py"  # a tokenizer's own Python code (auto_map), fetched only when trusted


class ModelSourceError(ValueError):
    """A model or tokenizer argument that is neither a local folder nor a Hub repo afd could
    get; its message is one line, naming the argument and what to do."""


def is_hub_id(name: str) -> bool:
    """True if ``name`` is no local path that exists but has the shape of a Hub repo id
    (``name`` or ``org/name``: letters, digits, ``-_.``, neither ``--`` nor ``..``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(os.path.expanduser(name)):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_name(name: str | os.PathLike, what: str = "model") -> None:
    """ModelSourceError naming ``what`` unless ``name`` is a path that exists or has the shape
    of a Hub repo id: no Hub call, so every process may check it, before any rank starts."""
    name = os.fspath(name)
    if not os.path.exists(os.path.expanduser(name)) and not is_hub_id(name):
        raise ModelSourceError(
            f"{what} {name!r} is neither a local folder (no such path) nor a Hugging Face Hub "
            f"repo id ('name' or 'org/name'): give a checkpoint folder, or a repo id such as "
            f"'deepseek-ai/DeepSeek-V3'")


def resolve(name: str | os.PathLike, *, what: str = "model", revision: str | None = None,
            download_dir: str | None = None, weights: bool = True,
            trust_remote_code: bool = False) -> str:
    """The local folder for ``name`` (the argument called ``what``): an existing path as it is
    (``revision`` does not apply to it; no Hub call), a Hub repo id as its snapshot in the
    cache, fetched where missing: the config and tokenizer files, the tokenizer's Python
    files with ``trust_remote_code``, and with ``weights`` the safetensors shards.
    ModelSourceError for anything else, naming ``what``."""
    name = os.fspath(name)
    local = os.path.expanduser(name)
    if os.path.exists(local):
        return local
    check_name(name, what)
    files = list(CONFIG_FILES + TOKENIZER_FILES) + [WEIGHTS_INDEX]
    if trust_remote_code:
        files.append(REMOTE_CODE)
    folder = _snapshot(name, what, revision, download_dir, files)
    if weights:
        index = os.path.join(folder, WEIGHTS_INDEX)
        if os.path.isfile(index):  # the shards the index names, and only those
            with open(index) as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            folder = _snapshot(name, what, revision, download_dir, shards)
        else:  # one file or a few, at the top level
            folder = _snapshot(name, what, revision, download_dir, ["*.safetensors"],
                               ignore=["*/*"])
    return folder


def _snapshot(repo_id: str, what: str, revision: str | None, download_dir: str | None,
              allow: list[str], ignore: list[str] | None = None) -> str:
    """huggingface_hub's snapshot_download of the files matching ``allow``; its errors as a
    ModelSourceError naming ``what`` and ``repo_id``, the library's message kept."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                 allow_patterns=allow, ignore_patterns=ignore)
    except GatedRepoError as exc:
        hint = ("is gated: accept its terms on huggingface.co and set HF_TOKEN "
                "(or 'hf auth login')")
        err = exc
    except RevisionNotFoundError as exc:
        hint = f"has no revision {revision!r} (a branch, tag or commit of the repo)"
        err = exc
    except RepositoryNotFoundError as exc:
        hint = ("is not on the Hub, or is private (set HF_TOKEN to a token that may read it); "
                "a local folder of that name does not exist either")
        err = exc
    except LocalEntryNotFoundError as exc:
        cache = download_dir or constants.HF_HUB_CACHE
        how = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else "the Hub could not be reached")
        get = " ".join(["hf download", repo_id, *(["--revision", revision] if revision else []),
                        *(["--cache-dir", download_dir] if download_dir else [])])
        hint = (f"is not in the local HF cache ({cache}) and {how}: download it where "
                f"there is a network ('{get}'), or give a local folder (no path {repo_id!r} "
                f"exists here)")
        err = exc
    except Exception as exc:  # noqa: BLE001 - any other failure of the download, named
        hint = "could not be fetched from the Hugging Face Hub"
        err = exc
    message = " ".join(str(err).split())  # one line: `afd serve` prints it as one
    raise ModelSourceError(f"{what} {repo_id!r}: Hugging Face Hub repo {repo_id!r}{at} {hint} "
                           f"({type(err).__name__}: {message})") from err


def resolve_sources(model: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None,
                    *, revision: str | None = None, tokenizer_revision: str | None = None,
                    download_dir: str | None = None, load_format: str = "auto",
                    trust_remote_code: bool = False) -> tuple[str | None, str | None]:
    """(model folder, tokenizer folder), None where not given, for vLLM's ``model`` /
    ``tokenizer`` / ``revision`` / ``tokenizer_revision`` / ``download_dir``, each resolved as
    ``resolve`` does; ``load_format="dummy"`` fetches no weights (it reads config.json alone)."""
    path = model if model is None else resolve(
        model, what="model", revision=revision, download_dir=download_dir,
        weights=load_format != "dummy", trust_remote_code=trust_remote_code)
    if tokenizer is not None:
        tokenizer = resolve(tokenizer, what="tokenizer", revision=tokenizer_revision,
                            download_dir=download_dir, weights=False,
                            trust_remote_code=trust_remote_code)
    return path, tokenizer
