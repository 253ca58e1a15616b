"""Helpers of the tests that run `cora train` and kill it: sample-log readers and a worker killer."""

import json
import os
import signal
import threading
import time

import psutil

from trainer.checkpoint import CheckpointError, list_checkpoints, read_commit


def steps(run) -> dict[int, list[dict]]:
    """Every record of the sample logs (one per micro-batch), per optimiser step (more when a step was
    trained again after a restart)."""
    out: dict[int, list[dict]] = {}
    for r in (0, 1):
        for line in (run / "samples" / f"rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).append(dict(rec, rank=r))
    return out


def final(run) -> dict[tuple, dict]:
    """Per (step, rank, micro-batch), the last record: what the finished run's state was trained on."""
    out = {}
    for step, recs in steps(run).items():
        for rec in recs:
            out[(step, rec["rank"], rec.get("micro", 0))] = rec
    return out


def ours(proc: psutil.Process) -> bool:
    """A process of this test session's Ray instance (whose raylet is a child of this process), not of
    another session running on the same machine."""
    try:
        return any(parent.pid == os.getpid() for parent in proc.parents())
    except psutil.NoSuchProcess:
        return False


class Killer:
    """Kills one Ray Train worker process (SIGKILL) once a checkpoint at or after ``after_step`` is committed."""

    def __init__(self, uri: str, after_step: int):
        self.uri, self.after, self.killed_at = uri, after_step, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        deadline = time.time() + 600
        while time.time() < deadline and self.killed_at is None:
            committed = []
            try:
                for n in list_checkpoints(self.uri):
                    try:
                        committed.append(read_commit(self.uri, n)["step"])
                    except CheckpointError:
                        pass
            except OSError:
                pass
            if committed and max(committed) >= self.after:
                workers = [p for p in psutil.process_iter(["cmdline"])
                           if any("RayTrainWorker" in c for c in (p.info["cmdline"] or [])) and ours(p)]
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    self.killed_at = max(committed)
                    return
            time.sleep(0.05)
