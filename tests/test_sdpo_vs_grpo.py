"""The study script (benchmarks/sdpo_vs_grpo.py) end to end on the fixture model: 1 seed, 2 steps, 2 arms, then a
second run that finds both results on disk and runs nothing; and its --diagnose mode on the same model."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sdpo_vs_grpo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def study_argv(model: str, output: Path, *extra: str) -> list[str]:
    # --workers 0: in this process, where torch and TRL are already imported (a child process would import them
    # again, ~10 s on a busy core); the parallel path runs the same run_one in a child per run.
    return ["--model", model, "--tasks", "add2", "--arms", "grpo", "sdpo", "--seeds", "0", "--steps", "2",
            "--eval_steps", "0", "2", "--eval_size", "4", "--workers", "0", "--output", str(output), *extra]


def test_study_runs_both_arms_then_resumes_without_rerunning(tmp_path, student_dir):
    first = sdpo_vs_grpo.main(study_argv(student_dir, tmp_path))
    assert sorted(first["ran"]) == [("add2", "grpo", 0), ("add2", "sdpo", 0)]
    files = {arm: tmp_path / "add2" / arm / "seed0.json" for arm in ("grpo", "sdpo")}
    for arm, path in files.items():
        result = json.loads(path.read_text())
        assert (result["arm"], result["seed"], result["settings"]["method"]) == (arm, 0, arm)
        assert [point["step"] for point in result["curve"]] == [0, 2]
        assert result["rollouts"] == 16 and result["completion_tokens"] > 0 and result["train_wall_s"] > 0
        assert len(result["answers_before"]) == len(result["answers_after"]) == 4
        assert sum("reward" in h for h in result["log_history"]) == 2  # one log per step
    sdpo_log = [h for h in json.loads(files["sdpo"].read_text())["log_history"] if "reward" in h]
    assert all("distill/frac_with_teacher" in h for h in sdpo_log)  # it was self-distillation, not GRPO
    summary = first["summary"]["add2"]
    assert set(summary) == {"grpo", "sdpo"} and summary["sdpo"]["curve"][2]["n"] == 1
    assert (tmp_path / "summary_selection.md").exists() and (tmp_path / "curves_selection_add2.png").exists()

    written = {arm: path.stat().st_mtime_ns for arm, path in files.items()}
    again = sdpo_vs_grpo.main(study_argv(student_dir, tmp_path))
    assert again["ran"] == []
    assert {arm: path.stat().st_mtime_ns for arm, path in files.items()} == written
    assert again["summary"]["add2"]["sdpo"]["final"] == summary["sdpo"]["final"]

    # A result made with other settings is never taken for this one.
    with pytest.raises(SystemExit, match="other settings"):
        sdpo_vs_grpo.main(study_argv(student_dir, tmp_path, "--eval_size", "5"))


def test_diagnose_scores_the_same_rollouts_under_each_arms_context(tmp_path, student_dir):
    report = sdpo_vs_grpo.main(["--model", student_dir, "--tasks", "add2", "--arms", "sdpo-paper", "sdpo-qlast",
                                "--seeds", "0", "--diagnose", "--batches", "1", "--output", str(tmp_path)])["add2"]
    sdpo, qlast = report["rows"]["sdpo-paper"], report["rows"]["sdpo-qlast"]
    assert len(sdpo) == len(qlast) == 8  # one group of the budget's 8 rollouts
    assert [r["completion"] for r in sdpo] == [r["completion"] for r in qlast]
    # The random model fails every rollout; each failure gets feedback, so a context, in both arms.
    assert all(r["failed"] and r["has_teacher"] and r["feedback"] for r in sdpo + qlast)
    failed = report["stats"]["sdpo-paper"]["failed"]
    assert failed["n"] == 8 and failed["with_context"] == 1
    assert "Correctly solve the original question" in report["teacher_prompt_example"]["sdpo-paper"][-1]["content"]
    assert report["teacher_prompt_example"]["sdpo-qlast"][-1]["content"].endswith("Answer with just the number.")
    assert (tmp_path / "diagnose" / "add2.json").exists()
