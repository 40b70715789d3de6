"""Prefect flows over the pipeline's stage table."""
