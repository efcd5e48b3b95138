"""The fast subset on the 64-bit PyPI VM (unix64), beside the suite's reference VM (unix32).

The default suite runs every firmware test on the 32-bit VM, the ESP32's word size and float width.
These few run the same scripts on the 64-bit VM too, so a difference between the two VMs shows up as
a failure here rather than as a surprise on whichever VM a developer happens to have."""

import pytest

from hil_tests.support import vm
from tests.firmware import test_sampling_path as sampling
from tests.protocol import test_cbor

VM = "unix64"


def test_sampling_allocates_nothing_on_the_64_bit_vm_too():
    verdict, up_s, total, truth, *_rest = vm.run(sampling.SCRIPT, timeout=300, vm=VM).split()
    assert verdict == "NO_ALLOC" and int(total) == int(truth) > 0


def test_totals_past_2_30_on_the_64_bit_vm_too(monkeypatch):
    run = vm.run
    monkeypatch.setattr(vm, "run", lambda script, **kw: run(script, vm=VM, **kw))
    sampling.test_totals_and_counts_past_2_30_and_2_31_stay_exact_and_allocate_nothing()


def test_rfc8949_appendix_a_comes_back_whole_on_a_double_float_vm():
    hexes = [h for _, h in test_cbor.APPENDIX_A]
    out = vm.run(test_cbor.ROUND_TRIP, stdin="\n".join(hexes) + "\n", vm=VM).split()
    assert out == hexes                               # doubles: every float comes back as it went


@pytest.mark.parametrize("script, expected", [
    ("import sys\nprint(sys.maxsize > 2**31)", "True"),
    ("print(16777217.0 == 16777216.0)", "False"),     # float64: 2**24 + 1 is a float
])
def test_the_64_bit_vm_is_what_it_says(script, expected):
    assert vm.run(script, vm=VM).strip() == expected
