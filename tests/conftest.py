"""Shared pytest configuration. Each group of fixtures lives in its own module, registered below."""

pytest_plugins = [
    "fixtures_mlflow",  # postgres_db, mlflow_server: the compose-defined MLflow server on PostgreSQL
    "fixtures_s3",  # s3_store, s3_env: the compose-defined SeaweedFS S3 server with a bucket
    "barrier",  # ray_tmpdir: a driver's private Ray, killed by PID; Barrier and kill_driver for kill tests
]
