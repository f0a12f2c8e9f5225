"""Checks of the options and helpers of benchmarks/sharpness.py, which no other test imports."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sharpness.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("sharpness_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("options, message", [
    (["--rounds", "0"], "argument --rounds: invalid value '0': expected an integer >= 1"),
    (["--gap", "x"], "argument --gap: invalid value 'x': expected an integer >= 1"),
    (["--settle-steps", "-1"], "argument --settle-steps: invalid value '-1': expected an integer >= 0"),
    (["--start-gaps", "1,0"], "invalid gaps '1,0'"),
])
def test_benchmark_rejects_bad_options(benchmark, monkeypatch, capsys, options, message):
    """--rounds 0 used to run the whole cold section and then fail on an empty median."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *options])
    with pytest.raises(SystemExit) as raised:
        benchmark.main()
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_counting_number_parses_integers(benchmark):
    assert benchmark.counting_number(0)("0") == 0
    assert benchmark.counting_number(1)("12") == 12
    with pytest.raises(argparse.ArgumentTypeError):
        benchmark.counting_number(1)("1.5")


def test_pyhessian_own_stop_by_hand(benchmark):
    """pyhessian stops once two successive values differ by less than 1e-3 relatively,
    here at the 4th product (125 then 125.05), and returns the earlier value."""
    trace = [(1.0, 100.0), (2.0, 120.0), (3.0, 125.0), (4.0, 125.05), (5.0, 125.06)]
    seconds, products, error = benchmark.pyhessian_own_stop(trace, 125.06)
    assert (seconds, products) == (4.0, 4)
    assert error == pytest.approx(0.06 / 125.06)


def test_own_stop_reads_the_residual_rule(benchmark):
    """Our rule stops at the first product whose residual is at most 1e-3·|θ| (the third
    here: 0.09 <= 0.1), which a tight trace records on its way; a trace that never gets
    there counts whole."""
    trace = [(1.0, 90.0, 95.0, 20.0), (2.0, 99.0, 99.9, 0.5), (3.0, 99.95, 99.99, 0.09), (4.0, 100.0, 100.0, 1e-5)]
    seconds, products, error = benchmark.own_stop(trace, 100.0)
    assert (seconds, products) == (3.0, 3)
    assert error == pytest.approx(5e-4)
    assert benchmark.own_stop(trace[:2], 100.0)[:2] == (2.0, 2)
