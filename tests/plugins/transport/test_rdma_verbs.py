"""The pyverbs binding, as far as it runs without a device: real pyverbs objects, built by our code.

CI installs Debian's python3-pyverbs (rdma-core) for this. No RDMA device exists
here, so queue pairs are never created; what is checked is that every work
request, attribute set and completion translation the plugin makes is accepted by
pyverbs and says what the plugin means.
"""

import socket

import pytest

from damselfly.core.errors import Unavailable
from damselfly.plugins.transport import rdma

e = pytest.importorskip("pyverbs.enums")


def test_send_work_requests():
    wr = rdma.send_wr(3, 0x1000, 4096, 77, None)
    assert (wr.wr_id, wr.opcode, wr.num_sge) == (3, e.IBV_WR_SEND, 1)
    assert wr.send_flags == e.IBV_SEND_SIGNALED
    abort = rdma.send_wr(5, 0x1000, 0, 77, rdma.IMM_ABORT)  # an empty SEND still carries one SGE
    assert abort.opcode == e.IBV_WR_SEND_WITH_IMM
    assert socket.ntohl(abort.imm_data) == rdma.IMM_ABORT


def test_receive_work_requests_are_told_from_sends():
    wr = rdma.recv_wr(7, 0x2000, 65536, 9)
    assert wr.wr_id & ~(rdma._RECV_BIT - 1) and wr.wr_id & 0xFFFF == 7
    assert wr.num_sge == 1


def test_completions():
    from pyverbs.cq import WC

    ok = rdma.completion(WC(wr_id=rdma._RECV_BIT | 4, status=e.IBV_WC_SUCCESS, opcode=e.IBV_WC_RECV, byte_len=100))
    assert ok == rdma.Completion(recv=True, slot=4, length=100)
    imm = rdma.completion(
        WC(
            wr_id=rdma._RECV_BIT | 1,
            status=e.IBV_WC_SUCCESS,
            opcode=e.IBV_WC_RECV,
            wc_flags=e.IBV_WC_WITH_IMM,
            imm_data=socket.htonl(rdma.IMM_ABORT),
        )
    )
    assert imm.imm == rdma.IMM_ABORT
    sent = rdma.completion(WC(wr_id=2, status=e.IBV_WC_SUCCESS, opcode=e.IBV_WC_SEND, byte_len=10))
    assert sent == rdma.Completion(recv=False, slot=2, length=10)
    failed = rdma.completion(WC(wr_id=6, status=e.IBV_WC_RETRY_EXC_ERR))
    assert not failed.recv and failed.slot == 6 and "retry" in failed.error.lower()


def test_queue_pair_attributes():
    options = rdma.RdmaConfig(gid_index=3, port_num=1)
    routed = rdma.qp_attr(options, rdma.Endpoint(num=99, lid=0, gid=bytes.fromhex("fe80" + "00" * 13 + "2a")), 3)
    assert (routed.dest_qp_num, routed.path_mtu, routed.rnr_retry, routed.min_rnr_timer) == (99, 3, 7, 1)
    assert routed.ah_attr.is_global == 1
    assert routed.ah_attr.dgid == "fe80:0000:0000:0000:0000:0000:0000:002a"
    assert routed.ah_attr.sgid_index == 3
    local = rdma.qp_attr(options, rdma.Endpoint(num=5, lid=12, gid=bytes(16)), 3)
    assert (local.ah_attr.is_global, local.ah_attr.dlid) == (0, 12)


def test_no_device_is_a_one_line_unavailable():
    transport = rdma.RdmaTransport(rdma.RdmaConfig(device="mlx5_0"))
    with pytest.raises(Unavailable, match="rdma: cannot open a queue pair") as info:
        transport.open_queue_pair()
    assert "\n" not in str(info.value)
