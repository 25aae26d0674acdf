"""FSDP1 (Lightning's ``FSDPStrategy``, CUDA only) against one process on the GPU.

On one GPU FSDP1's world size is 1 (it falls back to ``NO_SHARD``): the tests then check the
FSDP1 code path (wrapped names, parameters resolved from the FSDP root, CUDA tensors); with two
GPUs they check real flat-parameter sharding. Run by ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import pytest
import torch
from harness import assert_same_figures, run_fit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROBE = "tests/distributed/probes.py:sharded_probe"
# Spectral figures under FSDP1 need the forward-hook route (the weights are 1-D flat fragments
# between steps), which the probe does not take.
PROBE_KWARGS = {"clip_to": 0.5, "spectral": False}
ON_CUDA = {"accelerator": "cuda"}


def test_fsdp1_sharding_helpers_give_single_process_figures(tmp_path):
    reference = run_fit("single", PROBE, tmp_path, callback_kwargs=PROBE_KWARGS, trainer_kwargs=ON_CUDA)
    for history in run_fit("fsdp1", PROBE, tmp_path, callback_kwargs=PROBE_KWARGS, all_ranks=True):
        assert_same_figures(history, reference, rel=1e-4, abs_=1e-6)


@pytest.mark.parametrize("monitor", ["grad_norm_watcher", "loss_spike_detector", "spectral_alignment_monitor"])
def test_monitor_under_fsdp1_gives_single_process_figures(monitor, tmp_path, request):
    # Not yet run on a GPU: the outcome (XFAIL/XPASS) is information for the refactor, not a gate.
    request.applymarker(pytest.mark.xfail(raises=(AssertionError, RuntimeError), strict=False,
                                          reason="issue 13: monitors not yet sharding-aware; never run on a GPU"))
    factory = f"tests/distributed/probes.py:{monitor}"
    reference = run_fit("single", factory, tmp_path, trainer_kwargs=ON_CUDA)
    assert_same_figures(run_fit("fsdp1", factory, tmp_path), reference, rel=1e-4, abs_=1e-6)
