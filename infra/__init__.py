"""The local stack (SeaweedFS S3, Prefect server, MLflow server) and the files to run at scale."""
