"""The benchmark's analytic FLOP count of the per-pair head agrees with PyTorch's counter."""

import pytest
import torch

from bench.engine_bench import TorchEager, head_flops, profiler_gemm_flops
from model import build_model, list_variants


@pytest.mark.parametrize("name", [v for v in list_variants() if v.endswith("-small")])
def test_head_gemm_flops_match_the_profiler(name):
    torch.manual_seed(0)
    net = build_model(name).eval()
    flops = head_flops(net)
    assert flops["gemm"] == profiler_gemm_flops(net)
    assert flops["total"] == flops["gemm"] + flops["elementwise"] == sum(flops["parts"].values())
    assert flops["elementwise"] > 0


def test_the_torch_design_leaves_the_callers_network_where_it_was():
    # --providers cuda crashed: the design moved the shared network to the GPU in place, and
    # the FLOP count then fed it CPU tensors. "meta" stands in for the GPU here.
    net = build_model("dsmi-small").eval()
    design = TorchEager(net, "meta")
    assert next(design.net.parameters()).device.type == "meta"
    assert {p.device.type for p in net.parameters()} == {"cpu"}
    assert head_flops(net)["total"] > 0
