"""Loaded by subprocesses the tests start (via PYTHONPATH): blocks network sockets, as the conftest does.

With ``LAREX_TEST_ALLOW_LOOPBACK=1`` (a test that runs its own server or a multi-process job) internet sockets
may be made, but they bind and connect to this machine only (127.0.0.1 / ::1 / localhost)."""
import os
import socket

_Socket = socket.socket
_LOOPBACK = ("127.0.0.1", "::1", "localhost", "")


def _check(family, address):
    if family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
        raise RuntimeError(f"network access is blocked in tests except loopback; got {address[0]}")


class _BlockedSocket(_Socket):
    def __init__(self, family=socket.AF_INET, *args, **kwargs):
        if family != socket.AF_UNIX:
            raise RuntimeError("network access is blocked in tests (larex tests run offline)")
        super().__init__(family, *args, **kwargs)


class _LoopbackSocket(_Socket):
    def connect(self, address):
        _check(self.family, address)
        return super().connect(address)

    def connect_ex(self, address):
        _check(self.family, address)
        return super().connect_ex(address)

    def bind(self, address):
        if address[0] == "0.0.0.0":
            address = ("127.0.0.1", *address[1:])
        _check(self.family, address)
        return super().bind(address)


socket.socket = _LoopbackSocket if os.environ.get("LAREX_TEST_ALLOW_LOOPBACK") == "1" else _BlockedSocket
