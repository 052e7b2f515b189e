"""PCB's tanh (merging/methods/pcb.py ``tanh_``): numpy's on the CPU, against float64 tanh.

The expectation is the float64 tanh of the same float32 inputs. numpy's float32 tanh is
within 1.5 units in the last place (ulp) of it (1.37 seen), torch's within 0.52: the bound
below is 1.5 ulp, and a tensor numpy cannot take in place goes to torch.
"""

from __future__ import annotations

import torch

from merging.methods.pcb import tanh_


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got − want| in units of float32's spacing at want."""
    spacing = torch.nextafter(want.float().abs(), torch.tensor(float("inf"))) - want.float().abs()
    return (got.double() - want).abs() / spacing.double()


def test_tanh_is_float64_tanh_within_one_ulp_in_place():
    gen = torch.Generator().manual_seed(3)
    x = torch.cat(
        [torch.randn(200_000, generator=gen) * s for s in (1e-7, 1e-4, 1e-2, 0.5, 3.0, 20.0)]
        + [torch.tensor([0.0, -0.0, 9.0, -9.0, 1e-30])]
    )
    want = torch.tanh(x.double())
    y = x.clone()
    out = tanh_(y)
    assert out.data_ptr() == y.data_ptr()  # in place
    assert float(_ulps(y, want).max()) <= 1.5
    assert float(_ulps(torch.tanh(x), want).max()) <= 0.55  # torch's own, for scale
    assert torch.equal(torch.signbit(y), torch.signbit(x))  # odd: −0.0 stays −0.0


def test_tanh_of_a_strided_or_half_tensor_takes_torchs_path():
    x = torch.linspace(-4, 4, 2001)
    strided = x.clone()[::2]
    assert torch.equal(tanh_(strided), torch.tanh(x[::2]))
    half = x.half()
    assert torch.equal(tanh_(half.clone()), torch.tanh(half))
