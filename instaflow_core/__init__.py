"""instaflow_core: compute and data access for the InstaFlow pipeline. Imports no Prefect, no MLflow."""

__version__ = "0.1.0"
