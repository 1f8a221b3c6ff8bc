"""int_codes: integer codes inside the code range and the exact round trip
``codes * scale == eval output`` for every method and bit-width."""

import pytest
import torch

from qtrainer.quantizers import make_quantizer

CASES = [(m, kw, role, signed)
         for m, kw in [("lsq", {}), ("lsq", {"per_channel": True}), ("tempering", {}),
                       ("nipq", {}), ("nipq", {"learn_bits": True})]
         for role, signed in [("weight", True), ("input", True), ("input", False)]
         if not (kw.get("per_channel") and role == "input")]


@pytest.mark.parametrize("method,kwargs,role,signed", CASES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_in_range_and_exact_round_trip(method, kwargs, role, signed, bits):
    if kwargs.get("learn_bits"):
        bits = max(bits, 3)  # learned bits start strictly inside b_min..b_max
    torch.manual_seed(bits)
    q = make_quantizer(method, bits, signed, role, channels=6, **kwargs)
    x = torch.randn(6, 5, 3, 3) * 3
    if not signed:
        x = x.relu()
    q.initialize(x)
    q.eval()
    codes, scale = q.int_codes(x)
    lo, hi = q.code_range
    assert q.bits == bits
    assert torch.equal(codes, codes.round())
    assert codes.min() >= lo and codes.max() <= hi
    assert torch.equal(codes * scale, q(x))
    assert hi - lo + 1 <= 2**bits
    # saturating inputs reach both ends of the range
    ends = torch.tensor([-1e6, 1e6]).view(2, 1, 1, 1).expand(2, 5, 3, 3)
    if kwargs.get("per_channel"):
        ends = ends.repeat(3, 1, 1, 1)
    c, _ = q.int_codes(ends)
    assert c.min().item() == lo and c.max().item() == hi
