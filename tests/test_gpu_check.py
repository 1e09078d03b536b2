"""``bench gpu-check``: the dry run executes every section at tiny shapes on the CPU with no crash and no
failed correctness check, sections are isolated, and the JSON is complete after every section."""

import json

import torch
from conftest import load_cli
from magihuman.benchmarks import gpu_check
from magihuman.benchmarks.check_report import ERROR, FAIL, INFO, PASS


def test_dry_run_runs_every_section_through_the_cli(tmp_path, capsys):
    assert load_cli().main(["bench", "gpu-check", "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and [s["number"] for s in report["sections"]] == list(gpu_check.SECTIONS)
    checks = {c["id"]: c for s in report["sections"] for c in s["checks"]}
    assert not [c for c in checks.values() if c["status"] in (ERROR, FAIL)]
    # Every section measured something; the correctness checks ran and passed (CPU can run them all).
    assert all(s["checks"] and s["seconds"] is not None for s in report["sections"])
    for id in (
        "scaled_mm.tensorwise_sqnr_db",
        "scaled_mm.experts_row_0_3_5",
        "gemm.down_proj_m33.fp8_sqnr_db",
        "attention.s40.no_flash_max_diff",
        "caps.swap_bit_equal",
        "vae.nearest_last_frame_correct",
    ):
        assert checks[id]["status"] == PASS, id
    # Speed and memory targets mean nothing on a CPU: never judged in a dry run.
    assert checks["dit.256p_fp8_speedup"]["status"] == INFO
    assert "CHECK dit.256p_fp8_speedup INFO" in printed and "== summary" in printed


def test_a_failing_section_does_not_stop_the_others(tmp_path, monkeypatch):
    written = []

    def broken(scale, device, report):
        report.check("broken.started", INFO, 1)
        written.append(json.loads((tmp_path / "gpu_check.json").read_text()))  # section 0 already saved
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 35.00 GiB")

    monkeypatch.setitem(gpu_check.SECTIONS, 5, ("broken", broken))
    report = gpu_check.run_gpu_check(torch.device("cpu"), tmp_path, dry_run=True, sections=[0, 5, 8])
    assert [s["number"] for s in written[0]["sections"]] == [0, 5]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["number"] for s in saved["sections"]] == [0, 5, 8]
    broken_checks = saved["sections"][1]["checks"]
    assert [c["status"] for c in broken_checks] == [INFO, ERROR]
    assert "35.00 GiB" in broken_checks[1]["note"] and "OutOfMemoryError" in saved["sections"][1]["traceback"]
    assert saved["sections"][2]["checks"] and report.checks()[-1].id.startswith("dequantize.")
