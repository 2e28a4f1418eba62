"""The ``geoconnect demo`` command keeps the promise the README makes for it."""

from __future__ import annotations

import re

import pytest

from geoconnect.cli import main


def test_the_demo_connects_the_digits_pair_and_writes_its_figure(tmp_path, capsys):
    figure = tmp_path / "figures" / "demo.png"
    assert main(["demo", "--output", str(figure), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out

    ends = re.search(r"model_a ([\d.]+)%, model_b ([\d.]+)%", printed)
    assert ends is not None, printed
    worse_end = min(float(ends[1]), float(ends[2]))
    rows = {}
    for name in ("linear", "geodesic"):
        match = re.search(
            rf"^{name}\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
            printed,
            flags=re.M,
        )
        assert match is not None, printed
        rows[name] = [float(v) for v in match.groups()]
    (
        (line_barrier, line_min_acc, line_fr, line_chords, *_),
        (geo_barrier, geo_min_acc, geo_fr, _, *_),
    ) = (
        rows["linear"],
        rows["geodesic"],
    )
    # The README's claims, on this run's own numbers.
    assert line_barrier > 0.5
    assert geo_barrier <= line_barrier / 10
    assert geo_min_acc >= worse_end - 3.0
    assert line_min_acc < worse_end - 3.0
    assert geo_fr < line_fr
    assert line_chords <= line_fr  # the networks between the points are measured too
    shortest = re.search(r"shorter than ([\d.]+) rad", printed)
    assert shortest is not None and float(shortest[1]) <= min(geo_fr, line_chords)
    assert f"Figure written to {figure.resolve()}" in printed
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_demo_refuses_a_path_of_fewer_than_two_points(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--n-points", "1"])
    assert exited.value.code == 2
    assert "--n-points must be at least 2" in capsys.readouterr().err


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "demo" in capsys.readouterr().err
