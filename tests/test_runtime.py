"""The execution engine: autocast precision (bf16 where the CPU multiplies bf16 in hardware) and
the attention kernel choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import profile

from models.dit import dit_from_config
from tasks.training.runtime import autocast, cpu_has_native_bf16, resolve_precision, sdpa_backend

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


def test_explicit_precision_wins_and_auto_follows_the_hardware():
    assert resolve_precision(CPU, "fp32") == "fp32"
    assert resolve_precision(CPU, "bf16") == "bf16"
    assert resolve_precision(torch.device("cuda"), "auto") == "bf16"
    assert resolve_precision(CPU, "auto") == ("bf16" if cpu_has_native_bf16() else "fp32")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the Linux CPU flags")
def test_native_bf16_matches_the_kernels_cpu_flags():
    # An independent source: the kernel's flags. AMX's tiles (amx_bf16) or AVX-512's bf16 dot
    # products (avx512_bf16) make bf16 pay; without them oneDNN emulates it, slower than fp32.
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert cpu_has_native_bf16() == bool(flags & {"amx_bf16", "avx512_bf16"})


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_autocast_computes_matmuls_in_the_resolved_dtype(precision, dtype):
    layer = torch.nn.Linear(8, 8)
    with autocast(CPU, precision):
        out = layer(torch.randn(2, 8))
    assert out.dtype == dtype
    assert layer.weight.dtype == torch.float32  # weights stay fp32 for the optimizer


def _attention_ops(backend: str) -> tuple[torch.Tensor, set[str]]:
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=2).train()
    torch.manual_seed(0)
    for p in model.parameters():  # adaLN-Zero would hide the attention output
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1])
    with profile() as prof, sdpa_backend(backend):
        out = model(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.bool))
    return out, {event.key for event in prof.key_averages()}


def test_math_sdpa_backend_avoids_the_fused_kernel_and_computes_the_same():
    fused, fused_ops = _attention_ops("auto")
    math, math_ops = _attention_ops("math")
    flash = {op for op in fused_ops if "flash_attention" in op}
    assert flash, sorted(fused_ops)  # torch's default on the CPU is the fused flash kernel
    assert not flash & math_ops
    torch.testing.assert_close(math, fused, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_draw_integrates_in_the_precision_it_is_given(precision, dtype):
    """`tasks.exported.draw` runs the DiT in the precision asked for, whatever `auto` means on
    this machine: the evaluation resolves it once, draws in it and records it in the report."""
    from tasks.exported import draw

    torch.manual_seed(0)
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=2).eval()
    for p in model.parameters():  # adaLN-Zero's zero output layer would hide the dtype
        torch.nn.init.normal_(p, std=0.05)
    seen = []
    model.final_layer.linear.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    labels = torch.tensor([0, 1])
    images = draw(
        model, labels, steps=2, method="euler", cfg_scale=1.0, seed=0, precision=precision
    )
    assert seen and set(seen) == {dtype}
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 16)
    again = draw(model, labels, steps=2, method="euler", cfg_scale=1.0, seed=0, precision="fp32")
    # bf16 rounds differently (a visible but small difference); fp32 twice is the same computation.
    if precision == "fp32":
        assert torch.equal(images, again)
    else:
        assert not torch.equal(images, again)
        torch.testing.assert_close(images, again, atol=0.1, rtol=0)
