"""Trace-replay simulator for the autoscaling policy (same decision core as production)."""
