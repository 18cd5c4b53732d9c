"""Test harness: offline, CPU-only, deterministic.

Every test runs with sockets blocked (only AF_UNIX is allowed), the hub/YOLO offline switches set,
and a temporary MLflow store, so no test can download anything or write outside tmp dirs.
"""
from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


_REAL_CREATE_CONNECTION = socket.create_connection


class _BlockedSocket(socket.socket):
    def __init__(self, family=socket.AF_INET, *args, **kwargs):
        if family not in (socket.AF_UNIX,):
            raise RuntimeError("network access is blocked in tests (larex tests run offline)")
        super().__init__(family, *args, **kwargs)


def _blocked_connect(*args, **kwargs):
    raise RuntimeError("network access is blocked in tests (larex tests run offline)")


LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _LoopbackSocket(socket.socket):
    """Sockets that connect to this machine only (a test's own server); any other address is refused."""

    def connect(self, address):
        if self.family != socket.AF_UNIX and address[0] not in LOOPBACK:
            raise RuntimeError(f"network access is blocked in tests except loopback; got {address[0]}")
        return super().connect(address)

    def connect_ex(self, address):
        if self.family != socket.AF_UNIX and address[0] not in LOOPBACK:
            raise RuntimeError(f"network access is blocked in tests except loopback; got {address[0]}")
        return super().connect_ex(address)


@pytest.fixture
def loopback(monkeypatch):
    """Allow connections to 127.0.0.1 / ::1 only, for a test that talks to its own server (mlflow serve)."""
    monkeypatch.setattr(socket, "socket", _LoopbackSocket)

    def create_connection(address, *args, **kwargs):
        if address[0] not in LOOPBACK:
            raise RuntimeError(f"network access is blocked in tests except loopback; got {address[0]}")
        return _REAL_CREATE_CONNECTION(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setattr(socket, "socket", _BlockedSocket)
    monkeypatch.setattr(socket, "create_connection", _blocked_connect)
    yolo_dir = tmp_path_factory.mktemp("yolo_config")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(yolo_dir))
    mlflow_dir = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_dir}/mlflow.db")
    yield
