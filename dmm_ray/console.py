"""What the jobs print: one timestamped line per event, `[dmm-<job> HH:MM:SS] message`."""

from __future__ import annotations

import time


def say(job: str, msg: str) -> None:
    print(f"[dmm-{job} {time.strftime('%H:%M:%S')}] {msg}", flush=True)
