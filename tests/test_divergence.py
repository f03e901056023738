"""A diverged run fails in one line before anything is saved as a result: the rule (lab/train.py
divergence) on synthetic curves and on the shipped recipes' real ones, then the real CLI."""

import pytest
from conftest import TINY, run_lab

from lab.train import divergence, divergence_message


def curve(*losses, every=5):
    return [(every * i, loss) for i, loss in enumerate(losses, 1)]


def test_a_curve_that_ends_above_its_start_diverged():
    d = divergence(curve(3.2, 2.1, 1.8, 2.9, 7.6))
    assert d == {"rule": "ended above its first", "step": 25, "loss": 7.6, "ref_step": 5, "ref_loss": 3.2}
    assert divergence_message(d, 1e12) == ("training diverged: loss 7.6 at step 25, above its first logged 3.2 "
                                           "(step 5); lower train.learning_rate (now 1e12) and start a new run")


def test_a_curve_that_rose_and_stayed_up_diverged_though_it_ended_below_its_start():
    d = divergence(curve(6.3, 3.0, 1.1, 0.9, 2.4, 3.9, 5.8))
    assert d["rule"] == "rose and stayed up" and (d["ref_step"], d["ref_loss"]) == (20, 0.9)
    assert divergence_message(d, 0.05) == ("training diverged: loss rose from its lowest 0.9 (step 20) and stayed "
                                           "up, to 5.8 at step 35; lower train.learning_rate (now 0.05) and start "
                                           "a new run")


def test_noisy_converging_curves_are_not_divergence():
    assert divergence(curve(6.3, 4.1, 4.4, 2.2, 2.6, 1.1, 1.4, 0.6, 0.9, 0.7)) is None  # bumps, each recovered
    assert divergence(curve(2.0, 1.2, 0.05, 0.13, 0.12, 0.14)) is None  # tiny losses bounce by more than 50%
    assert divergence(curve(1.0, 1.04)) is None  # flat within noise: a run with nothing left to learn
    assert divergence(curve(0.02, 0.06)) is None  # near zero, the absolute margin holds
    assert divergence(curve(3.0, 0.5, 4.0, 0.6)) is None  # a spike it recovered from


# Real curves: metrics.jsonl of the shipped recipes on the embedded model on CPU, as shipped (a loss
# logged every 5 steps) and logged every step for a few epochs (the noisiest a run logs), 4 decimals.
SHIPPED_CURVES = {
    "identity-lora": (5, [3.741, 3.0121, 2.3389, 1.5739, 0.7803, 0.3007, 0.0879, 0.0358, 0.02, 0.012, 0.008, 0.0079,
                          0.0067, 0.0046, 0.0046, 0.0041, 0.0046, 0.0041, 0.004, 0.0028, 0.0042, 0.0036, 0.0035,
                          0.0035, 0.0038, 0.0032, 0.0033, 0.0034]),
    "identity-full": (5, [3.4651, 1.9437, 0.529, 0.045, 0.0081, 0.0076, 0.0033, 0.0019, 0.0019, 0.0014, 0.001, 0.0012,
                          0.001, 0.0008, 0.0008, 0.0007, 0.0007, 0.0007, 0.0007, 0.0005, 0.0007, 0.0007, 0.0006,
                          0.0006, 0.0007, 0.0006, 0.0006, 0.0006]),
    "roleplay-lora": (5, [6.2671, 5.7179, 5.2913, 5.0553, 4.7113, 4.391, 4.1041, 3.7784, 3.6326, 3.4757, 3.3552, 3.36]),
    "identity-lora, 3 epochs, every step": (1, [
        3.8074, 3.4653, 3.7142, 3.4865, 3.3756, 2.5198, 2.5033, 2.6489, 2.5777, 2.5635, 2.293, 2.0145, 2.2463, 1.7448,
        1.6682, 1.4321, 1.5248, 1.399, 1.078, 1.1052, 1.1375, 0.8835, 0.852, 0.7585, 0.7242, 0.6538, 0.7848, 0.6602,
        0.4979, 0.5997, 0.5456, 0.4918, 0.5752, 0.5271, 0.5024, 0.6439]),
    "identity-full, 3 epochs, every step": (1, [
        3.8074, 3.4653, 3.1814, 2.6179, 2.3145, 1.6105, 1.3785, 1.1496, 0.7802, 0.5433, 0.3588, 0.2017, 0.1574, 0.0816,
        0.0395, 0.0304, 0.0267, 0.0188, 0.0154, 0.0166, 0.0111, 0.0086, 0.0079, 0.0077, 0.0055, 0.0064, 0.0063, 0.0075,
        0.0098, 0.0047, 0.0051, 0.0048, 0.0069, 0.0052, 0.0046, 0.0062]),
    "roleplay-lora, 5 epochs, every step": (1, [
        6.37, 6.3799, 6.2837, 6.0089, 5.9768, 5.9386, 5.5742, 5.686, 5.6274, 5.5819, 5.6162, 5.2605, 5.3875, 5.3733,
        5.4644]),
}


@pytest.mark.parametrize("name", SHIPPED_CURVES)
def test_the_shipped_recipes_real_curves_never_look_diverged(name):
    """Stopped at any point (a shorter run, or max_steps), a healthy run is never judged diverged."""
    every, losses = SHIPPED_CURVES[name]
    full = curve(*losses, every=every)
    assert all(divergence(full[:end]) is None for end in range(1, len(full) + 1))


def test_the_margins():
    assert divergence(curve(1.0, 1.2)) is None and divergence(curve(1.0, 1.26))["rule"] == "ended above its first"
    assert divergence(curve(0.1, 0.19)) is None  # near zero the absolute margin (0.1) rules
    assert divergence(curve(2.0, 1.0, 1.45, 1.6, 1.55)) is None  # 1.5x its lowest is the bar
    assert divergence(curve(2.0, 1.0, 1.55, 1.6, 1.51))["rule"] == "rose and stayed up"


def test_fewer_than_two_logged_losses_are_no_judgement():
    assert divergence([]) is None and divergence(curve(9.0)) is None




@pytest.mark.slow
def test_a_diverged_run_fails_in_one_line_and_leaves_no_model(runs_dir, embedded_model):
    """The real CLI, train.learning_rate=1e12 on the embedded model for one epoch (12 steps): the
    loss ends far above where it began; the run goes (its checkpoints with it), its loss curve is
    kept in runs/.failed/, and `latest` points nowhere new."""
    import re

    r = run_lab("train", "--hw", "cpu", "--set", f"{TINY} train.learning_rate=1e12 train.num_train_epochs=1 "
                "train.logging_steps=2 train.disable_tqdm=true", timeout=900)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("lab train:")]
    [kept] = (runs_dir / ".failed").iterdir()
    assert len(errors) == 1 and errors == [r.stderr.strip().splitlines()[-1]], r.stderr[-2000:]
    assert re.fullmatch(r"lab train: error: training diverged: loss [\d.]+ at step 12, above its first logged "
                        r"[\d.]+ \(step 2\); lower train.learning_rate \(now 1e12\) and start a new run; no model "
                        rf"was saved \(losses: {re.escape(str(kept / 'metrics.jsonl'))}\)", errors[0]), errors[0]
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.jsonl", "recipe.yaml", "timings.json"]
    assert f"lab: removed {kept.name} (no checkpoint to resume from)" in r.stdout
    # no adapter/, no run, no `latest`: its checkpoints (one every tenth of the run) went first; the run
    # browser was rebuilt after the failed command (it lists the failed run's log)
    assert sorted(p.name for p in runs_dir.iterdir()) == [".failed", "index.html"]
    assert f'href=".failed/{kept.name}/"' in (runs_dir / "index.html").read_text()
