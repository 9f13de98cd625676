"""Autoscaling: a pure decision core, its Ray Serve adapter, and the signals it reads."""
