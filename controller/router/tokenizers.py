"""Tokenizers fetched from the nodes that serve each model, cached by digest."""

from __future__ import annotations

import asyncio
import logging

from kvfleet.tokenizer import Tokenizer, TokenizerFiles
from kvfleet.controller.router.fleet import Fleet
from kvfleet.v1 import node_pb2 as npb

log = logging.getLogger(__name__)


class TokenizerUnavailable(Exception):
    pass


class TokenizerCache:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._by_digest: dict[str, Tokenizer] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, model: str) -> Tokenizer:
        """The model's tokenizer, as a node serving it reports it (one RPC per new digest)."""
        conns = [c for c in self.fleet.serving(model) if c.connected] or self.fleet.serving(model)
        digests = {c.models[model].tokenizer_digest for c in conns}
        for d in digests:
            if d and d in self._by_digest:
                return self._by_digest[d]
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            for d in digests:
                if d in self._by_digest:
                    return self._by_digest[d]
            # Ask every node at once with a short timeout; the first valid answer wins, so
            # a hung node costs at most the timeout, not the timeout per node.
            errors: list[str] = []
            pending = {asyncio.create_task(self._fetch(c, model)): c for c in conns}
            try:
                while pending:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        c = pending.pop(task)
                        try:
                            files = task.result()
                        except Exception as exc:
                            errors.append(f"{c.entry.node_id}: {exc}")
                            continue
                        tok = Tokenizer(files)
                        self._by_digest[files.digest] = tok
                        log.info("router: tokenizer for %s (%s) from %s", model, files.digest[:12], c.entry.node_id)
                        return tok
            finally:
                for task in pending:
                    task.cancel()
            raise TokenizerUnavailable(f"no node serving {model!r} returned its tokenizer: {'; '.join(errors)}")

    @staticmethod
    async def _fetch(conn, model: str) -> TokenizerFiles:
        resp = await conn.stub.GetTokenizer(npb.GetTokenizerRequest(model=model), timeout=3.0)
        files = TokenizerFiles(
            tokenizer_json=resp.tokenizer_json, chat_template=resp.chat_template,
            eos_token_ids=list(resp.eos_token_ids), bos_token=resp.bos_token, eos_token=resp.eos_token,
        )
        if files.digest != resp.digest:
            raise ValueError("tokenizer digest mismatch")
        return files
