"""Run a helper script as a real 2-process ``msrun`` job on this machine (CPU, ``mccl`` backend)."""

import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script, args, work_dir, timeout=600):
    """Run ``script ARGS...`` on two local workers in ``work_dir`` (logs in ``work_dir/log``); raise
    ``CalledProcessError`` if a worker fails."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")  # msrun spawns `python`
    subprocess.run([str(bin_dir / "msrun"), "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
                    f"--master_port={_free_port()}", "--join=True", f"--log_dir={Path(work_dir) / 'log'}",
                    str(script), *(str(a) for a in args)], check=True, env=env, cwd=work_dir, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
