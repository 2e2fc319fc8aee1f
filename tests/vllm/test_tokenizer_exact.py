"""The router's cut, cached tokenisation is exact for the tiny real model (SmolLM2).

No engine is started; this lives here because ``make test-vllm`` runs after ``make
tiny-model`` and fails (never skips) when the model is missing, so CI always runs it.
``tests/unit/test_tokencache.py`` runs the same check when the model happens to be there.
"""

from __future__ import annotations

import pytest

from tests.unit.test_tokencache import assert_exact
from tests.vllm.conftest import tokenizer

pytestmark = pytest.mark.vllm


def test_smollm2_cuts_at_chat_special_tokens_and_matches_full_encoding_on_random_chats():
    tok = tokenizer()
    assert tok.segments.plan.special is not None, tok.segments.plan.reason
    assert_exact(tok, seed=7, n=400)
