"""Paper-style reports of a sweep or of runs: pivot tables with 95% bootstrap intervals, paired McNemar
tests, Markdown + a self-contained HTML page + PNG plots (``perceive-ray report``).

data.py loads runs (MLflow or run folders; the one report module that talks to MLflow), stats.py computes the
intervals and tests, render.py builds the tables and writes the report, plots.py draws, command.py is what the
CLI calls. Nothing heavy is imported here.
"""
