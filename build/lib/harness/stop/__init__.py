"""Stopping: the signal flag (flag), cross-rank agreement (agreement), cloud notices (spot)."""
