"""Turning records into answers: tables, statistics, Markdown, plots, and the MLflow mirror."""
