"""Shared pytest configuration. Each group of fixtures lives in its own module, registered below."""

pytest_plugins = [
    "fixtures_mlflow",  # postgres_db, mlflow_server: the compose-defined MLflow server on PostgreSQL
]
