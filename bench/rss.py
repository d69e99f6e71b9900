"""Peak resident memory of this process, per phase (shared by the PyTorch bench scripts)."""


def reset_peak_rss():
    """Resets the kernel's peak-RSS mark so that the next reading covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss():
    """The peak RSS (`VmHWM`) in bytes since the last reset, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
