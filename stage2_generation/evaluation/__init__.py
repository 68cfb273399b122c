"""Held-out evaluation, in one place: the methods (methods.py), the metric list (metrics.py), the run with its
seeds and intervals (run.py) and its outputs (report.py). Stage 2's own held-out report and `dppmg eval` both
score with `metrics.Judges`."""
