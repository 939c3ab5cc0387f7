"""Running trials: the Ray Tune sweep driver and trainable, trials into trial directories, `lottery train`,
the progress line and cluster jobs. Everything written goes where orchestrator.layout says."""
