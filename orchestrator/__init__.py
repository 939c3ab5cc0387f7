"""filter-lottery's driver side: specs, sweeps, tracking, aggregation.

MLflow 3 sends usage events to its vendor from every process that imports it, decided when
`mlflow` is first imported; like Ray's usage stats (RAY_USAGE_STATS_ENABLED=0, set by the
driver), that is off here unless the caller set MLFLOW_DISABLE_TELEMETRY. Set in the package,
so it holds before any module of it can import MLflow, and reaches the servers it starts.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
