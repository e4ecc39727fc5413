"""The console's screens: overview, job detail, logs, benchmarks, help and confirmation."""
