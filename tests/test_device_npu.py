"""The Ascend path, as far as it can be exercised without Ascend hardware: with a stand-in
`torch_npu` (a module that registers `torch.npu`, as the real one does) the device module
picks npu under `auto`, and everything downstream reads the NPU names from it: hccl for
torch.distributed, Ray's "NPU" resource, ASCEND_RT_VISIBLE_DEVICES. Nothing here runs a
kernel on an NPU; docs/backends.md says so."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from vlrl.device import resolve_device
from vlrl.errors import DeviceError


@pytest.fixture
def fake_npu(monkeypatch):
    calls = []
    npu = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 8, set_device=lambda i: calls.append(("set_device", i)),
        synchronize=lambda: calls.append(("synchronize",)), memory_allocated=lambda: 123,
    )
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    return calls


def test_auto_prefers_npu_and_names_its_backend_resource_and_env(fake_npu):
    spec = resolve_device("auto")
    assert (spec.kind, spec.dist_backend, spec.ray_resource, spec.visible_devices_env, spec.count) == (
        "npu", "hccl", "NPU", "ASCEND_RT_VISIBLE_DEVICES", 8,
    )
    assert resolve_device("npu") == spec
    spec.synchronize()
    assert spec.memory_allocated() == 123 and fake_npu == [("synchronize",)]


def test_ray_actors_ask_for_npus_on_ascend(fake_npu):
    from rlhf.placement import actor_options

    spec = resolve_device("npu")
    assert actor_options(spec, "split", "trainer") == {"num_cpus": 0, "resources": {"NPU": 1}}
    assert actor_options(spec, "colocate", "rollout") == {"num_cpus": 0, "resources": {"NPU": 0.25}}
    assert actor_options(spec, "split", "reward") == {"num_cpus": 0}


def test_trainer_ranks_pick_their_npu_and_hccl(fake_npu, monkeypatch):
    import torch.distributed as dist

    from rlhf import fsdp

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, init_method, rank, world_size: seen.update(backend=backend, at=init_method, rank=rank, world=world_size))
    fsdp.init_process_group(resolve_device("npu"), rank=9, world_size=16, master_port=29999)
    assert seen == {"backend": "hccl", "at": "tcp://127.0.0.1:29999", "rank": 9, "world": 16} and ("set_device", 1) in fake_npu  # rank 9 of 8 per node -> NPU 1


def test_npu_without_torch_npu_fails_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import fails, as on a machine without it
    with pytest.raises(DeviceError, match="torch_npu is not importable.*docs/backends.md"):
        resolve_device("npu")
    assert resolve_device("auto").kind in ("cpu", "cuda")
