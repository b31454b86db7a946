"""RDMA detection: the reasons a host cannot run the rdma transport."""

import sys

import pytest

from damselfly.core.errors import Unavailable
from damselfly.plugins.transport import rdma


def test_no_pyverbs_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyverbs", None)
    assert "pyverbs is not installed" in rdma.unavailable_reason(tmp_path)


def test_device_detection(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyverbs", object())
    assert "kernel has no RDMA support" in rdma.unavailable_reason(tmp_path / "absent")
    assert "no RDMA device" in rdma.unavailable_reason(tmp_path)
    (tmp_path / "mlx5_0").mkdir()
    assert rdma.rdma_devices(tmp_path) == ["mlx5_0"]
    assert "not implemented yet" in rdma.unavailable_reason(tmp_path)


async def test_this_host_says_why_it_cannot():
    assert rdma.RdmaTransport.available()  # no RDMA on CI machines
    with pytest.raises(Unavailable, match="rdma"):
        await rdma.RdmaTransport().connect("127.0.0.1:1", 1)
