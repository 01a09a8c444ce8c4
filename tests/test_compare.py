"""compare.py: the --quick suite end to end (train.py and sample.py as subprocesses, 2 seeds so
that every std is a real one), its JSON checked against the per-seed numbers with the standard
library's statistics; the verdict rule on hand-worked cases; bad arguments in one line."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import compare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `compare.py --quick --seeds 2` (dense and race, 4 steps, 20 samples); its folder and JSON."""
    out = tmp_path_factory.mktemp("ablation")
    proc = subprocess.run([sys.executable, "compare.py", "--quick", "--seeds", "2", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads((out / "ablation.json").read_text()), proc.stdout


def test_quick_writes_every_result(quick):
    out, summary, stdout = quick
    assert set(summary) >= {"settings", "rule", "reference", "groups", "configs", "claims", "race_fig6", "timing"}
    assert summary["settings"]["steps"] == 4 and summary["settings"]["seeds"] == [0, 1]
    assert list(summary["configs"]) == ["dense", "race"]
    for name, c in summary["configs"].items():
        assert c["flags"] == compare.CONFIGS[name]
        assert list(c["seeds"]) == ["0", "1"]
        for seed in c["seeds"].values():
            assert set(seed) >= set(compare.METRICS)
            assert 0 <= seed["class_accuracy"] <= 1 and seed["fd_pixels"] > 0 and seed["final_loss"] > 0
    # a dense model has no routing: its MoE metrics are None, a race model's are numbers
    dense = summary["configs"]["dense"]["seeds"]["0"]
    race = summary["configs"]["race"]["seeds"]["0"]
    assert dense["maxvio"] is None and dense["combination_usage"] is None and dense["experts_per_token"] is None
    assert race["maxvio"] >= 0 and 0 <= race["combination_usage"] <= 1 and 0 < race["experts_per_token"] <= 4
    # the same active compute: T/2 with mlp_ratio 15 vs T/2-4E2A (within the router's 4D per token)
    flops = [summary["configs"][c]["gflops_per_image"] for c in ("dense", "race")]
    assert flops[0] == pytest.approx(flops[1], rel=0.01)
    # the one claim with both of its configurations run, its three quality metrics judged
    (claim,) = summary["claims"]
    assert (claim["better"], claim["worse"]) == ("race", "dense")
    assert set(claim["metrics"]) == {"final_loss", "class_accuracy", "fd_pixels"}
    # Race-DiT Fig. 6: experts per token for each of the 4 layers and 5 sampling steps
    fig6 = summary["race_fig6"]
    assert len(fig6["experts_per_token"]) == 4 and all(len(row) == 5 for row in fig6["experts_per_token"])
    assert 0.9 < summary["reference"]["classifier_heldout_accuracy"] <= 1
    for name in ["ablation-loss.png", "ablation-samples.png", "ablation-race-experts-per-token.png"]:
        assert 0 < (out / name).stat().st_size < 300_000
    assert "±" in (out / "ablation.md").read_text() and "±" in stdout
    assert stdout.count("trained in") == 4  # each configuration once per seed


def test_each_configuration_trains_once():
    # groups and claims name configurations; no two names may hide the same flags (trained twice)
    assert len({tuple(flags) for flags in compare.CONFIGS.values()}) == len(compare.CONFIGS)
    named = {c for _, names in compare.GROUPS.values() for c in names}
    named |= {c for claim in compare.CLAIMS for c in claim[2:4]}
    assert named == set(compare.CONFIGS)


def test_quick_mean_std_and_verdicts_from_the_seeds(quick):
    _, summary, _ = quick
    for c in summary["configs"].values():
        for metric, stat in c["stats"].items():
            values = [seed[metric] for seed in c["seeds"].values()]
            if values[0] is None:
                assert stat == {"mean": None, "std": None}
                continue
            assert stat["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-15)
            assert stat["std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
    # each verdict again: difference of means against 2 standard errors
    for claim in summary["claims"]:
        for metric, v in claim["metrics"].items():
            a, b = ([seed[metric] for seed in summary["configs"][c]["seeds"].values()]
                    for c in (claim["better"], claim["worse"]))
            diff = statistics.fmean(a) - statistics.fmean(b)
            se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
            assert v["difference"] == pytest.approx(diff, rel=1e-9, abs=1e-15)
            assert v["standard_error"] == pytest.approx(se, rel=1e-9, abs=1e-15)
            better = diff > 0 if compare.METRICS[metric][1] else diff < 0
            expected = "within noise" if abs(diff) <= 2 * se else "holds" if better else "does not hold"
            assert v["verdict"] == expected


@pytest.mark.parametrize("better, worse, higher_is_better, expected", [
    # means 2 and 6, stds 1 and 1: standard error sqrt(1/3 + 1/3) = 0.816, difference 4 > 1.63
    ([1, 2, 3], [5, 6, 7], False, "holds"),
    ([1, 2, 3], [5, 6, 7], True, "does not hold"),
    # difference 1 < 1.63: within noise whichever way is better
    ([1, 2, 3], [2, 3, 4], False, "within noise"),
    ([1, 2, 3], [2, 3, 4], True, "within noise"),
    # no spread, any difference is beyond noise; no difference is not
    ([0.5, 0.5], [0.4, 0.4], True, "holds"),
    ([0.5, 0.5], [0.5, 0.5], True, "within noise"),
    ([0.5], [0.4, 0.3], True, "one seed: no error bar"),
])
def test_verdict_hand_worked(better, worse, higher_is_better, expected):
    assert compare.verdict(better, worse, higher_is_better)["verdict"] == expected


def test_mean_std_sample_std_and_missing_values():
    assert compare.mean_std([1.0, 2.0, 4.0]) == pytest.approx({"mean": 7 / 3, "std": math.sqrt(7 / 3)})
    assert compare.mean_std([3.0]) == {"mean": 3.0, "std": None}
    assert compare.mean_std([None, None]) == {"mean": None, "std": None}


def test_overall_verdict_of_a_claim():
    assert compare.overall(["holds", "within noise"]) == "holds"
    assert compare.overall(["does not hold", "within noise"]) == "does not hold"
    assert compare.overall(["holds", "does not hold"]) == "mixed"
    assert compare.overall(["within noise", "within noise"]) == "within noise"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "error: argument --steps: 0 is not in [1, inf]"),
    (["--samples", "0"], "error: argument --samples: 0 is not in [1, inf]"),
    (["--seeds", "0"], "error: argument --seeds: 0 is not in [1, inf]"),
    (["--seeds", "two"], "error: argument --seeds: 'two' is not an int"),
    (["--sampling-steps", "-1"], "error: argument --sampling-steps: -1 is not in [1, inf]"),
    (["--cfg-scale", "nan"], "error: argument --cfg-scale: nan is not in [0, inf]"),
    (["--only", "banana"], "error: --only: unknown configuration 'banana'"),
    (["--out", "/proc/ablation"], "error: cannot write to /proc/ablation"),
])
def test_bad_arguments_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(compare, "run", lambda *a: pytest.fail("trained before the check"))
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith(message)


def test_upcycle_mode_writes_both_curves(tmp_path):
    proc = subprocess.run([sys.executable, "compare.py", "--upcycle", "--steps", "2", "--batch-size", "16",
                           "--out", str(tmp_path), "--docs", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "upcycle.json").read_text())
    assert set(summary["curves"]) == {"from scratch", "upcycled"}
    assert all(len(c) == 2 for c in summary["curves"].values())  # steps 1 and 2
    assert summary["first_loss"]["upcycled"] == summary["curves"]["upcycled"][0][1]
    assert (tmp_path / "upcycle.png").stat().st_size > 0
