"""Capacity planning: what fits on a GPU group, before anything is deployed."""
