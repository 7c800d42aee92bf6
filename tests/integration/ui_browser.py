"""Playwright helpers for the Airflow UI tests."""
