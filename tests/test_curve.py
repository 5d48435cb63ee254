"""The demo's line placing its student on the budget study's curve (studies/curve.py)."""

from __future__ import annotations

from potstill.studies.curve import curve_line, load_curve


def test_shipped_curve_is_the_studys():
    curve = load_curve()
    assert len(curve["points"]) >= 5 and curve["cpu"]["capability"]
    assert all(0 < p["reference_likelihood_kept"] < 1 and p["cpu_min"] > 0 for p in curve["points"])


def test_student_placed_against_the_best_point_it_could_have_bought():
    curve = {"cpu": {"capability": "AVX2", "bf16": False},
             "goal": {"reference_likelihood_kept_min": 0.5, "top1_agreement_min": 0.6},
             "points": [{"arm": "cheap", "cpu_min": 1.0, "reference_likelihood_kept": 0.05, "top1_agreement": 0.2},
                        {"arm": "dear", "cpu_min": 20.0, "reference_likelihood_kept": 0.30, "top1_agreement": 0.5}]}
    rows = [{"model": "teacher"}, {"model": "student", "heldout_nll_reference_kept": 0.10,
                                   "heldout_top1_agreement": 0.25}]
    line = curve_line(rows, 5.0, curve)
    assert "10.0%" in line and "above" in line and "cheap" in line and "not reached" in line
    line = curve_line(rows, 30.0, curve)  # with 30 CPU-min the study bought more than this student has
    assert "below" in line and "dear" in line
    rows[-1].update(heldout_nll_reference_kept=0.55, heldout_top1_agreement=0.61)
    assert curve_line(rows, 30.0, curve).endswith(": reached")


def test_no_held_out_measurement_no_point():
    assert "no point on the curve" in curve_line([{"model": "teacher"}, {"model": "student"}], 3.0)
