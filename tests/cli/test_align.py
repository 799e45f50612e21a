"""`earlyprop align`: the issue's acceptance command, the plot, and one-line errors (T4, T9 through the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from earlyprop.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"
ACCEPTANCE = ["align", "--json", "--sizes", "12,40,30,30,20,6", "--rho", "tanh", "--eps", "0.2", "--beta", "1e-6",
              "--dtype", "float64"]
QUICK = ["--sizes", "4,6,5,3", "--batch", "2", "--gdu-steps", "3"]  # small net: seconds, not the point of the test
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real entry point, `python -m earlyprop`, in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "earlyprop", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def acceptance() -> dict:
    proc = run_cli(*ACCEPTANCE)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # raises unless stdout is exactly one JSON document


def test_acceptance_reports_every_free_layer(acceptance):
    distances = sorted(row["distance"] for row in acceptance["layers"])
    assert distances == [0, 1, 2, 3, 4]  # output (k = 0) and all four hidden layers
    assert sorted(row["layer"] for row in acceptance["layers"]) == [1, 2, 3, 4, 5]


def test_acceptance_first_step_alignment(acceptance):
    for row in acceptance["layers"]:
        assert row["first_step"] == row["distance"] + 1, row
        assert row["cosine"] >= 1 - 1e-8, row
        assert abs(row["magnitude_ratio"] - 1) <= 1e-3, row
        assert set(row["later_cosines"]) == {"1", "3", "10"}


def test_acceptance_gdu_eps_slopes_and_residual(acceptance):
    gdu = acceptance["gdu"]
    assert gdu["max_rel_rmse"] <= 1e-3
    assert gdu["sign_error"] <= 1e-3
    assert gdu["min_cosine"] >= 0.999
    slopes = acceptance["eps_slopes"]["slopes"]
    assert set(slopes) == {"0", "1", "2", "3", "4"}
    for k, slope in slopes.items():  # T4c: the first change scales like eps^(k+1)
        assert slope == pytest.approx(int(k) + 1, abs=0.01)
    assert acceptance["residual"] <= 1e-12
    config = acceptance["config"]
    assert config["sizes"] == [12, 40, 30, 30, 20, 6] and config["rho"] == "tanh" and config["dtype"] == "float64"
    assert acceptance["warnings"] == []


def test_default_table_and_plot(tmp_path):
    png = tmp_path / "align.png"
    proc = run_cli("align", *QUICK, "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "cos(Δs, -δ)" in proc.stdout and "GDU" in proc.stdout and "residual" in proc.stdout
    data = png.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("bad", [
    ["--eps", "0"], ["--eps", "-1"], ["--sizes", "5"], ["--sizes", "a,b"], ["--temperature", "-1"],
    ["--beta", "0"], ["--beta", "nan"], ["--sizes", "4,0,3"], ["--batch", "0"], ["--rho", "relu"],
])
def test_bad_input_is_one_line_exit_2(bad, capsys):
    assert main(["align", *bad]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("earlyprop: error:"), captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_bad_input_through_the_interpreter():
    proc = run_cli("align", "--eps", "0")
    assert proc.returncode == 2
    assert proc.stderr.startswith("earlyprop: error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_missing_plot_directory_fails_before_running(tmp_path, capsys):
    assert main(["align", *QUICK, "--plot", str(tmp_path / "missing" / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("earlyprop: error: --plot: directory")


def test_sigmoid_negative_beta_in_process(capsys):
    # "--beta -1e-4": a negative number in e notation must be read as a value, not as an option
    assert main(["align", "--json", "--rho", "sigmoid", "--beta", "-1e-4", *QUICK]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["rho"] == "sigmoid" and report["config"]["beta"] == -1e-4
    for row in report["layers"]:
        assert row["first_step"] == row["distance"] + 1
        assert row["cosine"] >= 1 - 1e-6


def test_temperature_runs_the_noise_averaged_chains(capsys):
    """T > 0 adds T12 (common random numbers, M repeats) after the noise-free table, which stays as it is."""
    common = ["align", "--json", "--eps", "0.1", "--beta", "1e-3", "--gdu-steps", "3"]  # default sizes
    assert main([*common, "--temperature", "1e-4", "--repeats", "200"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["config"]["temperature"] == 1e-4 and report["config"]["temperature_applied"] is True
    assert report["config"]["repeats"] == 200
    assert "not applied" not in captured.out + captured.err and report["warnings"] == []
    noisy = report["noisy"]
    assert isinstance(noisy, list)
    assert sorted(row["distance"] for row in noisy) == [0, 1, 2, 3, 4]
    for row in noisy:
        assert row["first_step"] == row["expected_first_step"] == row["distance"] + 1, row
        assert row["mean_cosine"] >= 0.9999, row  # THEORY T12's criterion (seen: >= 0.999997)
        assert -1 <= row["sample_cosine"] <= row["mean_cosine"] + 1e-12, row
        assert row["temperature"] == 1e-4 and row["repeats"] == 200

    assert main([*common, "--temperature", "0"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean.get("noisy") is None and clean["config"]["temperature_applied"] is False
    # the noise-free results do not depend on T
    assert clean["layers"] == report["layers"] and clean["gdu"] == report["gdu"]


def test_temperature_table_shows_the_noisy_section(capsys):
    assert main(["align", *QUICK, "--temperature", "1e-4", "--repeats", "20"]) == 0
    out = capsys.readouterr().out
    assert "noise-averaged early inference" in out and "cos(mean Δs, -δ)" in out and "20 repeats" in out
    assert main(["align", *QUICK]) == 0
    assert "noise-averaged" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--repeats", "-3"], ["--repeats", "1.5"]])
def test_bad_repeats_is_one_line_exit_2(bad, capsys):
    assert main(["align", "--temperature", "1e-4", *bad]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("earlyprop: error: argument --repeats") and captured.out == ""


@pytest.mark.parametrize("where", ["top", "sub"])
def test_debug_shows_the_traceback(where, monkeypatch, capsys):
    import earlyprop.commands.align as align

    def fails(args):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(align, "run", fails)
    assert main(["align"]) == 2
    assert capsys.readouterr().err == "earlyprop: error: boom second line\n"
    with pytest.raises(ValueError, match="boom"):
        main(["--debug", "align"] if where == "top" else ["align", "--debug"])


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    import earlyprop.commands.align as align

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(align, "run", interrupted)
    assert main(["align"]) == 130


def test_help_and_version_return_zero(capsys):
    assert main(["--help"]) == 0
    assert "align" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert main([]) == 2  # a command is required
