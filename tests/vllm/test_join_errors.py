"""`node join --engine vllm` with a bad model or bad engine arguments fails at once, with
a message that names the problem, instead of looping or joining a node that cannot serve.

No engine ever comes up here: the failures happen before vLLM loads a model (argparse,
vLLM's config checks), so these are cheap.
"""

from __future__ import annotations

import json

import pytest

from tests.vllm.conftest import MODEL_DIR, SERVER_MODULE, run_join

pytestmark = pytest.mark.vllm


def no_engine_left(marker: str) -> bool:
    import psutil   # comes with vLLM; imported here so the default suite collects without it

    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if SERVER_MODULE in cmd and marker in " ".join(cmd) and p.info["status"] != psutil.STATUS_ZOMBIE:
            return False
    return True


def test_a_missing_model_directory_fails_join_naming_the_directory(control_plane, tmp_path):
    missing = tmp_path / "no-such-model"
    r = run_join(control_plane, "--engine", "vllm", "--model", str(missing), timeout=60)
    assert r.returncode != 0
    assert "no such model directory" in r.stderr and str(missing) in r.stderr, r.stderr


def test_a_directory_without_config_json_is_not_taken_for_a_model(control_plane, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    r = run_join(control_plane, "--engine", "vllm", "--model", str(tmp_path), timeout=60)
    assert r.returncode != 0
    assert "config.json" in r.stderr and str(tmp_path) in r.stderr, r.stderr


def test_an_unknown_engine_argument_fails_join_with_vllms_own_complaint(control_plane):
    r = run_join(control_plane, "--engine", "vllm", "--model", str(MODEL_DIR), "--engine-arg=--no-such-flag")
    assert r.returncode != 0
    assert "unrecognized arguments: --no-such-flag" in r.stderr, r.stderr
    assert "vllm-" in r.stderr and ".log" in r.stderr, "the message should point at the engine log"
    assert no_engine_left("--no-such-flag")


def test_an_engine_argument_vllm_rejects_after_parsing_fails_join_with_the_root_cause(control_plane):
    r = run_join(control_plane, "--engine", "vllm", "--model", str(MODEL_DIR), "--engine-arg=--max-model-len=99999999")
    assert r.returncode != 0
    assert "max_model_len" in r.stderr and "99999999" in r.stderr, r.stderr
    assert no_engine_left("99999999")


def test_an_engine_argument_the_agent_owns_is_refused_before_starting_vllm(control_plane):
    r = run_join(control_plane, "--engine", "vllm", "--model", str(MODEL_DIR), "--engine-arg=--port=9999", timeout=60)
    assert r.returncode != 0
    assert "--port" in r.stderr and "set by the node agent" in r.stderr, r.stderr


def test_failed_joins_leave_no_node_behind(control_plane):
    r = control_plane.cluster.cli("nodes", "list", "--json", check=True)
    assert json.loads(r.stdout) == []
