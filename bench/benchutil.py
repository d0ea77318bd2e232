"""Helpers shared by the bench/*.py scripts that measure a server from outside."""

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """CPU seconds (user + system) used so far by process PID, or None without a PID."""
    if not pid:
        return None
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK


def pct(samples, p):
    """The p-th percentile (nearest rank) of samples, or None if there are none."""
    if not samples:
        return None
    s = sorted(samples)
    return s[max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))]
