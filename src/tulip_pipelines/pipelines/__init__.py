"""Kedro pipelines: thin nodes over the ML core."""
