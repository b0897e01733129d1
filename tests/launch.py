"""Run the trainer as the tests' separate processes: alone, or under torchrun as processes on loopback "nodes".

Everything runs on the CPU (accelerate then uses gloo) with one intra-op thread; rendezvous and collectives only
ever use the loopback address.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent  # the repository, so `-m mlcm_train` imports this checkout
TIMEOUT_S = 300  # far above a tiny run; a process stuck at a collective fails the test instead of hanging it
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def run_alone(target: list[str]) -> Finished:
    """``python TARGET...`` (e.g. ``-m mlcm_train distill ...``) as one process."""
    done = subprocess.run(
        [sys.executable, *target], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    return Finished(done.returncode, done.stdout, done.stderr)


def run_nodes(target: list[str], nnodes: int, nproc_per_node: int) -> list[Finished]:
    """One torchrun per node, all at once on this machine, rendezvousing at a free loopback port.

    When a node fails the others are stopped at once: they would otherwise wait at their next collective.
    """
    port = free_port()
    nodes, outputs = [], []
    for node_rank in range(nnodes):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc_per_node", str(nproc_per_node), "--node_rank", str(node_rank),
            "--master_addr", LOOPBACK, "--master_port", str(port), *target,
        ]  # fmt: skip
        # Files, not pipes: a full pipe would block a node that nobody reads while the others are awaited.
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        outputs.append((out, err))
        nodes.append(
            subprocess.Popen(
                command, cwd=ROOT, env=ENV, stdout=out, stderr=err, text=True, start_new_session=True
            )
        )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            codes = [node.poll() for node in nodes]
            if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.2)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # the node's torchrun and its workers: its own session
            node.wait()
    return [Finished(node.returncode, _read(out), _read(err)) for node, (out, err) in zip(nodes, outputs)]


def _read(file) -> str:
    with file:
        file.seek(0)
        return file.read()
