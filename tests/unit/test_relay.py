"""RouterService._relay over a node stream (a fake one: unit level): merged token items,
stop strings inside them, the stream interval."""

from __future__ import annotations

import numpy as np

from kvfleet.controller.router.fleet import Fleet
from kvfleet.controller.router.policy import Candidate
from kvfleet.controller.router.service import Prepared, RouterService
from kvfleet.tokenizer import Tokenizer, byte_level_tokenizer_files
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import inference_pb2 as pb
from kvfleet.v1 import node_pb2 as npb

TOK = Tokenizer(byte_level_tokenizer_files())


class FakeStream:
    """What NodeStream gives the relay: items in order; records cancel and settle."""

    def __init__(self, items) -> None:
        self.items = list(items)
        self.cancelled = False
        self.settled: list[float] = []

    async def read(self, timeout=None):
        return self.items.pop(0)

    async def settle(self, seconds: float) -> None:
        self.settled.append(seconds)

    def cancel(self) -> None:
        self.cancelled = True


def ids(text: str) -> list[int]:
    return TOK.encode(text)


def prepared(interval: float = 0.0) -> Prepared:
    return Prepared(request_id="r1", model="m", tokens=np.array(ids("prompt"), np.uint32), tokenizer=TOK,
                    max_tokens=100, tier=cpb.TIER_DEFAULT, deadline=None, tokenize_us=0.0,
                    stream_interval_s=interval)


def cand() -> Candidate:
    return Candidate(node_id="n1", eligible=True, cached_tokens=0, uncached_tokens=6, queued_prefill_tokens=0,
                     cost_s=0.0, reason="")


async def relay(p: Prepared, stop: list[str], first, rest) -> tuple[list[pb.GenerateResponse], FakeStream]:
    req = pb.GenerateRequest(model="m")
    req.sampling.stop.extend(stop)
    stream = FakeStream(rest)
    out = [m async for m in RouterService(Fleet(None))._relay(p, req, stream, first, cand(), 1)]
    return out, stream


def final(n: int) -> npb.NodeFinal:
    return npb.NodeFinal(prompt_tokens=6, cached_prompt_tokens=0, completion_tokens=n,
                         finish_reason=cpb.FINISH_REASON_LENGTH)


async def test_a_stop_string_inside_a_merged_chunk_ends_its_token_ids_at_the_stop():
    text = "hello world, stop here and more text after it"
    t = ids(text)
    out, stream = await relay(prepared(), ["stop"], ("tokens", t[:3]), [("tokens", t[3:]), ("final", final(len(t)))])
    chunks = [m.chunk for m in out if m.HasField("chunk")]
    usage = out[-1].usage
    upto = text.index("stop") + len("stop")            # byte-level: one token per byte
    assert "".join(c.text for c in chunks) == "hello world, "
    assert [i for c in chunks for i in c.token_ids] == t[:upto]
    assert usage.completion_tokens == upto and usage.finish_reason == cpb.FINISH_REASON_STOP
    assert stream.cancelled and stream.items        # the node's remaining output was not read


async def test_without_stop_strings_merged_items_go_out_whole_and_the_interval_is_kept():
    t = ids("abcdefghij")
    out, stream = await relay(prepared(0.25), [], ("tokens", t[:1]),
                              [("tokens", t[1:6]), ("tokens", t[6:]), ("final", final(len(t)))])
    chunks = [m.chunk for m in out if m.HasField("chunk")]
    assert [list(c.token_ids) for c in chunks] == [t[:1], t[1:6], t[6:]]
    assert "".join(c.text for c in chunks) == "abcdefghij"
    assert stream.settled == [0.25, 0.25, 0.25]     # after each chunk
    assert out[-1].usage.completion_tokens == len(t)


async def test_stop_strings_turn_the_interval_off_so_the_stop_is_seen_at_once():
    t = ids("one two stop three")
    out, stream = await relay(prepared(1.0), ["stop"], ("tokens", t[:4]), [("tokens", t[4:]), ("final", final(len(t)))])
    assert stream.settled == []
    assert "".join(m.chunk.text for m in out if m.HasField("chunk")) == "one two "


def test_a_generate_many_batch_is_split_into_messages_under_the_byte_limit():
    from kvfleet.controller.router.service import _parts

    def item(sid: int, tokens: int) -> pb.GenerateManyItem:
        return pb.GenerateManyItem(stream=sid, response=pb.GenerateResponse(
            chunk=pb.TokenChunk(token_ids=list(range(tokens)), text="x" * tokens)))

    items = [item(i, 1 + (i % 7) * 300) for i in range(200)]
    parts = list(_parts(items, 10_000))
    assert [it for part in parts for it in part] == items          # all, in order
    assert len(parts) > 1 and all(part for part in parts)
    assert all(sum(it.ByteSize() for it in part) <= 10_000 for part in parts)
    huge = item(1, 20_000)                                          # alone over the limit: alone in its message
    assert list(_parts([items[0], huge, items[1]], 10_000)) == [[items[0]], [huge], [items[1]]]
    assert list(_parts([], 10_000)) == []
