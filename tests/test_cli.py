"""build_info, backend choice, and the `rlhf-kernels info | bench` commands."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import rlhf_kernels
from rlhf_kernels import _dispatch, native


def test_build_info_reports_backends_and_versions():
    info = rlhf_kernels.build_info()
    assert info["torch"] == torch.__version__
    assert "torch" in info["backends"]["cpu"]
    assert info["native"]["built"] == native.available()
    if native.available():
        assert "native" in info["backends"]["cpu"]
        assert info["auto"]["cpu"] == "native"
        if info["native"]["cuda"]:
            assert set(info["native"]["cuda_archs"].split(";")) >= {"8.0", "9.0"} or torch.cuda.is_available()
    else:
        assert info["auto"]["cpu"] == "torch"


def test_auto_prefers_triton_on_cuda(monkeypatch):
    monkeypatch.setattr(_dispatch, "unavailable_reason", lambda backend, device, native_op=None: None)
    assert _dispatch.resolve("auto", torch.device("cuda")) == "triton"
    assert _dispatch.resolve("auto", torch.device("cpu")) == "native"


def test_info_command_prints_json():
    out = subprocess.run([sys.executable, "-m", "rlhf_kernels.cli", "info"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["version"] == rlhf_kernels.__version__


def test_bench_command_writes_table_json_and_plot(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_kernels.cli", "bench", "--device", "cpu", "--shape", "32x1000xfp32",
         "--op", "token_logprobs", "--op", "dpo_loss", "--repeat", "2", "--only", "native", "--only", "eager",
         "--out", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (json_file,) = tmp_path.glob("bench-cpu-*.json")
    payload = json.loads(json_file.read_text())
    assert {r["op"] for r in payload["results"]} == {"token_logprobs", "dpo_loss"}
    rows = {(r["provider"], r["mode"]): r for r in payload["results"] if r["op"] == "token_logprobs"}
    assert ("eager", "fwd+bwd") in rows
    for r in rows.values():
        assert r["error"] is None and r["median_ms"] > 0 and r["peak_mem_mb"] is not None
    # eager keeps a float32 [N, V] log_softmax for backward; the fused op keeps O(N)
    assert rows["eager", "fwd+bwd"]["saved_mb"] >= 32 * 1000 * 4 / 2**20
    if native.available():
        assert rows["rlhf_kernels[native]", "fwd+bwd"]["saved_mb"] < 0.01
    assert list(tmp_path.glob("bench-cpu-*.png")) and "median ms" in out.stdout
