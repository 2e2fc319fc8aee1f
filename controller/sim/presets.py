"""Sim engine presets for real GPUs and models, derived from first principles.

Every figure of a preset's :class:`SimConfig` is computed by :func:`derive` from the
hardware and model constants below; nothing is fitted to a benchmark.

Derivation (sizes bytes, times seconds):

* KV capacity, blocks::

      num_blocks = (gpu_mem * gpus * mem_util - weights - runtime_reserve * gpus)
                   / (kv_bytes_per_token * block_size)
      kv_bytes_per_token = 2 (K and V) * layers * kv_heads * head_dim * 2 (bf16)

* Prefill throughput, tokens/s: a token costs ``2 * params`` FLOPs in the linear layers
  (Kaplan et al. 2020, "Scaling Laws", sec. 2.1) plus ``2 * layers * d_model * ctx``
  of causal attention in a prompt of ``ctx`` tokens (``prefill_context_tokens``; 0 by
  default, see limitations). QK^T and AV each cost ``2 * d_model`` FLOPs per layer per
  attended token, and a causal token attends to ``ctx / 2`` tokens on average::

      prefill_tokens_per_s = gpus * peak_bf16_dense * prefill_mfu / flops_per_token

* Decode step (memory-bound): every step streams all weights, plus the KV of every
  context token of the batch, from HBM::

      decode_step_base_s              = weights / (hbm_bw * gpus * bw_eff) + step_overhead_s
      decode_step_per_context_token_s = kv_bytes_per_token / (hbm_bw * gpus * bw_eff)
      decode_step_per_seq_s           = 2 * params / (gpus * peak_bf16_dense * decode_mfu)

  The per-sequence term is the matmul compute of one more token. It is added to the
  memory time rather than overlapped with it (a roofline would take the max), so large
  batches are modelled somewhat slow: a conservative choice for a router benchmark.

Constants and their sources:

* H100 SXM5 80GB: 989.4 TFLOPS dense BF16 (1,979 with sparsity), 3.35 TB/s HBM3
  (NVIDIA H100 datasheet); 81,559 MiB total as nvidia-smi reports it.
* A100 SXM4 80GB: 312 TFLOPS dense BF16, 2.039 TB/s HBM2e (NVIDIA A100 datasheet);
  81,920 MiB total (nvidia-smi).
* Llama 3 8B: 8.03 B params, 32 layers, d_model 4,096, 8 KV heads of dim 128,
  vocab 128,256 (Meta's ``config.json`` for Meta-Llama-3-8B / 3.1-8B).
* Llama 3 70B: 70.6 B params, 80 layers, d_model 8,192, 8 KV heads of dim 128
  (Meta-Llama-3-70B ``config.json``). TP4 shards weights and KV heads over 4 GPUs;
  a fleet node is the 4-GPU group.
* ``mem_util`` 0.9: vLLM's default ``gpu_memory_utilization``.
* ``runtime_reserve`` 1.5 GiB per GPU: activation peak + CUDA graphs + non-torch memory
  that vLLM's profiling run subtracts (typical "activation peak" lines in vLLM logs for
  8B models are 1-2 GiB). Assumed.
* ``prefill_mfu`` 0.45 (0.40 with TP4 for the all-reduces), ``decode_mfu`` 0.5,
  ``bw_eff`` 0.8, ``step_overhead_s`` 1.5 ms (scheduler, sampling and launch in vLLM v1
  with CUDA graphs): assumed typical values, not measurements.
* ``max_model_len`` 131,072: Llama 3.1's context; ``max_num_batched_tokens`` 8,192 and
  ``max_num_seqs`` 256: vLLM v1 defaults for an online server on a large GPU.

Resulting figures (``python -m kvfleet.controller.sim.presets`` prints them):
h100-llama3-8b: ~28.3 k blocks (452 k tokens), ~27.7 k prefill tok/s, 7.5 ms step at
batch 1 (~133 tok/s single stream). ``docs/presets.md`` works every figure out and
cross-checks it against published vLLM measurements: the 8B presets land within ~5 %
of vLLM's own latency benchmark and of Lambda's ShareGPT decode figures; the TP4
preset decodes ~17-20 % fast, because no tensor-parallel all-reduce time is modelled
in the decode step.

Limitations: the attention term of prefill grows with context, but ``SimConfig`` has one
flat prefill rate, so at the default ``prefill_context_tokens=0`` long prompts
(Mooncake's mean is 15 k tokens, where attention adds ~25 % to an 8B model's FLOPs) are
prefilled too fast. Pass the workload's mean context to :func:`derive` to fold it in.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvfleet.node_agent.engines.sim_core import SimConfig

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class GPU:
    name: str
    mem_bytes: int              # total HBM as nvidia-smi reports it, bytes
    peak_bf16_flops: float      # dense BF16 tensor-core peak, FLOP/s
    hbm_bytes_per_s: float      # HBM bandwidth, bytes/s


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    params: float               # parameters
    layers: int
    d_model: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    bytes_per_param: int = 2    # bf16 weights
    kv_dtype_bytes: int = 2     # bf16 KV cache

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_dtype_bytes


H100_SXM_80GB = GPU("H100-SXM5-80GB", 81_559 * MIB, 989.4e12, 3.35e12)
A100_SXM_80GB = GPU("A100-SXM4-80GB", 81_920 * MIB, 312e12, 2.039e12)
LLAMA3_8B = Model("meta-llama/Meta-Llama-3.1-8B", 8.03e9, 32, 4096, 8, 128, 128_256)
LLAMA3_70B = Model("meta-llama/Meta-Llama-3.1-70B", 70.6e9, 80, 8192, 8, 128, 128_256)


@dataclass(frozen=True, slots=True)
class Preset:
    """A (GPU, model, parallelism) choice and the assumed efficiencies."""

    gpu: GPU
    model: Model
    gpus: int = 1                       # tensor-parallel degree; one fleet node = this many GPUs
    mem_util: float = 0.9               # vLLM gpu_memory_utilization
    runtime_reserve_bytes: int = int(1.5 * GIB)  # per GPU, activations + CUDA graphs
    prefill_mfu: float = 0.45
    decode_mfu: float = 0.5
    bw_eff: float = 0.8
    step_overhead_s: float = 0.0015
    max_model_len: int = 131_072
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192


PRESETS: dict[str, Preset] = {
    "h100-llama3-8b": Preset(H100_SXM_80GB, LLAMA3_8B),
    "a100-llama3-8b": Preset(A100_SXM_80GB, LLAMA3_8B),
    "h100-llama3-70b-tp4": Preset(H100_SXM_80GB, LLAMA3_70B, gpus=4, prefill_mfu=0.40),
}


def derive(p: Preset, *, block_size: int = 16, prefill_context_tokens: int = 0) -> SimConfig:
    """The :class:`SimConfig` of preset ``p`` (formulas in the module docstring)."""
    m, g = p.model, p.gpu
    kv_bytes = g.mem_bytes * p.gpus * p.mem_util - m.weight_bytes - p.runtime_reserve_bytes * p.gpus
    if kv_bytes <= 0:
        raise ValueError(f"{m.name} does not fit on {p.gpus} x {g.name}")
    num_blocks = int(kv_bytes // (m.kv_bytes_per_token * block_size))
    flops_per_token = 2 * m.params + 2 * m.layers * m.d_model * prefill_context_tokens
    bw = g.hbm_bytes_per_s * p.gpus * p.bw_eff
    return SimConfig(
        model=m.name,
        block_size=block_size,
        num_blocks=num_blocks,
        max_model_len=p.max_model_len,
        prefill_tokens_per_s=p.gpus * g.peak_bf16_flops * p.prefill_mfu / flops_per_token,
        decode_step_base_s=m.weight_bytes / bw + p.step_overhead_s,
        decode_step_per_seq_s=2 * m.params / (p.gpus * g.peak_bf16_flops * p.decode_mfu),
        decode_step_per_context_token_s=m.kv_bytes_per_token / bw,
        max_num_seqs=p.max_num_seqs,
        max_num_batched_tokens=p.max_num_batched_tokens,
        vocab_size=m.vocab_size,
        eos_token_id=None,
    )


def preset_config(name: str, *, block_size: int = 16, prefill_context_tokens: int = 0) -> SimConfig:
    """The :class:`SimConfig` of the preset called ``name``."""
    p = PRESETS.get(name)
    if p is None:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return derive(p, block_size=block_size, prefill_context_tokens=prefill_context_tokens)


if __name__ == "__main__":
    for name in PRESETS:
        c = preset_config(name)
        step1 = c.decode_step_base_s + c.decode_step_per_seq_s
        print(f"{name}: {c.num_blocks} blocks ({c.num_blocks * c.block_size} tokens), "
              f"prefill {c.prefill_tokens_per_s:,.0f} tok/s, decode step {step1 * 1e3:.2f} ms at batch 1 "
              f"({1 / step1:.0f} tok/s), +{c.decode_step_per_seq_s * 1e6:.1f} us/seq, "
              f"+{c.decode_step_per_context_token_s * 1e9:.1f} ns/context token")
