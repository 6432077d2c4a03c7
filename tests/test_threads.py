"""The default thread choice on a shared machine (latentforge/threads.py)."""

import os
import subprocess
import sys

from latentforge.threads import default_threads


def test_default_threads_leave_busy_cores_alone():
    assert default_threads(cores=2, load=0.1) == 2  # idle: every core
    assert default_threads(cores=2, load=1.0) == 1  # one other busy process: the free core only
    assert default_threads(cores=2, load=7.5) == 1  # overloaded: still one
    assert default_threads(cores=16, load=3.2) == 13
    assert default_threads(cores=1, load=0.0) == 1


def test_cli_sets_passive_wait_policy_and_respects_the_users_choice():
    code = "import os; from latentforge import cli; cli.main([]); print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "PASSIVE"  # set by the CLI (after its help text)
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split()[-1] == "ACTIVE"
    code = "from latentforge import threads; print(threads.configure())"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "1"  # the user's OMP_NUM_THREADS wins over the load-based default
