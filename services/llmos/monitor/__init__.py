"""The monitor: cluster health."""
