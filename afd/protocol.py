"""Control messages between the front end and the ranks: msgpack over loopback ZeroMQ sockets.

Only plain data crosses a socket (dicts, lists, numbers, strings); nothing is unpickled.
Tensors never travel here: they go through torch.distributed.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import msgpack

from afd.core import CoreStats
from afd.sampler import PromptLogprobs
from afd.sampling_params import SamplingParams
from afd.sequence import CoreOutput, CoreRequest


def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(msg, dict) or "t" not in msg:
        raise ValueError("malformed control message")
    return msg


def request_to_wire(req: CoreRequest) -> dict[str, Any]:
    return {"id": req.request_id, "prompt": req.prompt_token_ids, "params": req.params.to_dict(),
            "eos": list(req.eos_token_ids), "arrival": req.arrival_time,
            "priority": req.priority, "salt": req.cache_salt}


def request_from_wire(d: dict[str, Any]) -> CoreRequest:
    return CoreRequest(d["id"], list(d["prompt"]), SamplingParams.from_dict(d["params"]),
                       tuple(d["eos"]), float(d["arrival"]), int(d.get("priority", 0)),
                       d.get("salt"))


def output_to_wire(out: CoreOutput) -> list[Any]:
    return [out.request_id, out.new_token_ids, out.finish_reason, out.stop_reason, out.error,
            out.metrics, out.logprobs,
            None if out.prompt_logprobs is None else out.prompt_logprobs.to_wire()]


def output_from_wire(row: list[Any]) -> CoreOutput:
    return CoreOutput(row[0], list(row[1]), row[2], row[3], row[4], row[5], row[6],
                      None if row[7] is None else PromptLogprobs.from_wire(row[7]))


def stats_to_wire(stats: CoreStats) -> dict[str, Any]:
    return asdict(stats)


def stats_from_wire(d: dict[str, Any]) -> CoreStats:
    return CoreStats(**d)
