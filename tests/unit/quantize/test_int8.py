"""The int8 kernels against float references."""

from __future__ import annotations

import pytest
import torch

from llmstack.quantize._int8 import (W8A8Linear, int8_matmul, int_mm_problem,
                                     quantize_per_channel, quantize_per_token)


@pytest.mark.parametrize("m,k,n", [(1, 128, 384), (3, 7, 5), (17, 96, 40), (64, 128, 128)])
def test_int8_matmul_is_exact_against_int64_reference(m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    got = int8_matmul(a, w.t())  # weight stored [out, in], passed transposed as in W8A8Linear
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), a.long() @ w.long().t())


def test_int_mm_runs_on_this_cpu() -> None:
    assert int_mm_problem("cpu") is None


def test_symmetric_quantizers_stay_within_half_a_step() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen)
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 96, generator=gen) * torch.linspace(0.1, 10, 5)[:, None]  # rows of very different range
    xq, xs = quantize_per_token(x)
    assert xs.shape == (5, 1)
    assert ((xq.float() * xs - x).abs() <= xs / 2 + 1e-6).all()


def test_w8a8_linear_matches_float_linear_and_fake_quant() -> None:
    gen = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(128, 64, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 128, generator=gen) * 0.05)
        linear.bias.copy_(torch.randn(64, generator=gen))
    x = torch.randn(2, 9, 128, generator=gen)
    ref = linear(x)
    real = W8A8Linear.from_linear(linear, mode="int8")
    fake = W8A8Linear.from_linear(linear, mode="fake-quant")
    y_real, y_fake = real(x), fake(x)
    assert y_real.shape == ref.shape
    rel = (y_real - ref).norm() / ref.norm()
    assert rel < 0.02, rel  # 8-bit weights and activations
    # The int32 accumulation is exact; fake-quant sums the same products in float.
    torch.testing.assert_close(y_real, y_fake, rtol=1e-5, atol=1e-5)
    # bf16 activations come back as bf16
    assert real(x.bfloat16()).dtype == torch.bfloat16


def test_w8a8_state_dict_round_trips_through_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    layer = W8A8Linear.from_linear(torch.nn.Linear(32, 16))
    save_file(layer.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = W8A8Linear(32, 16, bias=True)
    loaded.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), loaded(x))
    assert loaded.weight.dtype == torch.int8
