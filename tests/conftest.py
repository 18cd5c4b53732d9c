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


class _BlockedSocket(socket.socket):
    def __init__(self, family=socket.AF_INET, *args, **kwargs):
        if family not in (socket.AF_UNIX,):
            raise RuntimeError("network access is blocked in tests (larex tests run offline)")
        super().__init__(family, *args, **kwargs)


def _blocked_connect(*args, **kwargs):
    raise RuntimeError("network access is blocked in tests (larex tests run offline)")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setattr(socket, "socket", _BlockedSocket)
    monkeypatch.setattr(socket, "create_connection", _blocked_connect)
    yolo_dir = tmp_path_factory.mktemp("yolo_config")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(yolo_dir))
    mlflow_dir = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_dir}/mlflow.db")
    yield
