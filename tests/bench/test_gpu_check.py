"""The GPU check's report gathers what the CUDA tests, the presets and the benchmark left."""

from __future__ import annotations

from cast.bench.gpu_check import report


def test_report_gathers_tests_presets_and_targets(tmp_path):
    (tmp_path / "tests.log").write_text("....s\n16 passed, 1 failed, 2 skipped in 41.0s\n")
    (tmp_path / "presets.csv").write_text("preset,attention,status,steps,samples_per_s,peak_mem_mb,val_acc_best\n"
                                          "listops,cast,ok,200,5120.5,812,0.2\n")
    (tmp_path / "bench.log").write_text("measuring...\nPASS cast[Nc=64,k=64] at 4K: speed-up 7.1\nFAIL slope 1.2\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.md").write_text("| mechanism | speed 4K |\n")
    text = report(tmp_path)
    assert "16 passed, 1 failed, 2 skipped in 41.0s" in text
    assert "| listops | cast | ok | 200 | 5120.5 | 812 |" in text
    assert "PASS cast[Nc=64,k=64] at 4K: speed-up 7.1\nFAIL slope 1.2" in text and "measuring" not in text
    assert "| mechanism | speed 4K |" in text
    assert (tmp_path / "report.md").read_text() == text


def test_report_says_what_is_missing(tmp_path):
    text = report(tmp_path)
    assert "no test log" in text and "no bench log" in text and "LRA presets" not in text
