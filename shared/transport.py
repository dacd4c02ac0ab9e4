"""ZeroMQ plumbing shared by the services: addresses, sockets, framed send/recv through the codec.

Topology (docs/ARCHITECTURE.md):
  scheduler binds ROUTER at the *gateway address*; each gateway connects a DEALER.
  executor  binds ROUTER at the *executor address*; the scheduler connects a DEALER.
ROUTER sides receive ``[identity, frame]`` and answer to the same identity, so one scheduler can
serve several gateways and a gateway can front several schedulers.
"""
from __future__ import annotations

import os
import tempfile

import zmq
from zmq.utils.monitor import parse_monitor_message

from shared.config import check_address  # noqa: F401 - the one address rule; callers import it from here too
from shared.messages import Message, ProtocolError, decode, encode


def runtime_dir() -> str:
    """A private directory for ipc:// sockets (mode 0700)."""
    return tempfile.mkdtemp(prefix="pagedserve-")


def ipc_address(directory: str, name: str) -> str:
    return f"ipc://{os.path.join(directory, name)}.sock"


def router(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    sock.bind(check_address(addr))
    return sock


def dealer(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(check_address(addr))
    return sock


def monitored_dealer(ctx: zmq.Context, addr: str,
                     heartbeat_ms: tuple[int, int] | None = None) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER plus a monitor socket that reports its connection going up and down (see
    ``connection_event``). The monitor is attached before connecting, so the first connection is
    seen too. ``heartbeat_ms`` (interval, timeout): ZMTP heartbeats make a silent peer drop."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if heartbeat_ms is not None:
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms[0])
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms[1])
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    sock.connect(check_address(addr))
    return sock, monitor


def connection_event(frames) -> int:
    """The event (zmq.EVENT_CONNECTED or zmq.EVENT_DISCONNECTED) of one monitor message."""
    return parse_monitor_message(frames)["event"]


def close_monitored(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    sock.disable_monitor()
    monitor.close(linger=0)
    sock.close(linger=0)


def send(sock: zmq.Socket, msg: Message, identity: bytes | None = None) -> None:
    frame = encode(msg)
    if identity is None:
        sock.send(frame, copy=False)
    else:
        sock.send_multipart([identity, frame], copy=False)


def recv(sock: zmq.Socket):
    """DEALER side: one decoded message (raises ProtocolError on a bad frame)."""
    return decode(sock.recv(copy=False).buffer)


def recv_routed(sock: zmq.Socket) -> tuple[bytes, Message | ProtocolError]:
    """ROUTER side: (identity, message). A bad message (wrong frame count, bad frame) comes back as
    the ProtocolError saying why, not raised, so the caller can answer the sender and go on."""
    frames = sock.recv_multipart(copy=False)
    identity = frames[0].bytes
    if len(frames) != 2:
        return identity, ProtocolError(f"expected one message frame after the identity, got {len(frames) - 1}")
    try:
        return identity, decode(frames[1].buffer)
    except ProtocolError as e:
        return identity, e
