"""Loaded by subprocesses the tests start (via PYTHONPATH): blocks network sockets, as the conftest does."""
import socket

_Socket = socket.socket


class _BlockedSocket(_Socket):
    def __init__(self, family=socket.AF_INET, *args, **kwargs):
        if family != socket.AF_UNIX:
            raise RuntimeError("network access is blocked in tests (larex tests run offline)")
        super().__init__(family, *args, **kwargs)


socket.socket = _BlockedSocket
