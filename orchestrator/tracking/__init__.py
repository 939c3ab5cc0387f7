"""MLflow, second: runs built from finished trial directories (runs.py), a sweep's experiment and parent
run (sweep.py), and `lottery sync` (sync.py). Nothing here imports the sweep driver."""
