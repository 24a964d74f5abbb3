"""Process memory on Linux from /proc: what the demo shows and the benchmarks and tests measure."""

from __future__ import annotations

STATUS = "/proc/self/status"


def status_kib(field: str) -> int:
    """A /proc/self/status figure in KiB: "VmRSS" (resident now), "VmHWM" (peak resident)."""
    with open(STATUS) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    """Set VmHWM to the current RSS, so the next VmHWM reading is the peak from here on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
