"""Figures, tables and markdown made from results; the one place that publishes Prefect artifacts."""
