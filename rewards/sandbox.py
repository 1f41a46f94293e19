"""Run untrusted Python against its tests in a subprocess sandbox (Linux).

Every run gets:
- a fresh temp working dir (also $HOME and $TMPDIR), removed afterwards, and an environment of PATH, HOME, TMPDIR and
  LANG only, so no secret of the parent's environment is inherited (nor any open file, beyond stdout/stderr/result);
- a wall-clock timeout, after which the whole process group is SIGKILLed;
- kernel limits set before the program runs (`SandboxLimits`): address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU),
  processes (RLIMIT_NPROC), bytes per file written (RLIMIT_FSIZE; stdout and stderr are files, so this caps them);
- bounded parallelism: at most `max_workers` runs at once per `Sandbox`.
What else holds depends on the machine; `Sandbox.isolation` says which of these are in force:
- "namespaces": under `unshare --net --pid --fork --kill-child` (`--user` first when not root): no network at all
  (only a loopback that is down), and when the run ends every process it made dies with its pid namespace, even
  ones that called setsid(). Without it, a child that leaves the process group can outlive the run.
- "uid": when started as root, the program runs as a fresh random uid (`setpriv --no-new-privs`), so RLIMIT_NPROC
  counts only its own processes (the kernel never enforces it on root) and the kernel refuses writes everywhere
  except the working dir and world-writable dirs such as /tmp. If the interpreter lives under a root-only dir (pyenv
  in /root), that uid keeps CAP_DAC_READ_SEARCH to be able to import the standard library ("read_cap"); the kernel
  then lets it read any file, and only the Python-level guard below limits reads.
- always, inside the interpreter (`_sandbox_harness.py`): a PEP 578 audit hook refuses writes outside the working
  dir, reads outside the interpreter's folders and world-readable system files, sockets (the socket guard when
  there is no network namespace), subprocesses, ctypes, signals to other processes, and, when started as root
  without a uid to drop to (so RLIMIT_NPROC cannot hold: "fork" False), os.fork. It is a Python-level guard:
  code that monkeypatches `os` helpers or reads the harness's frames can get around it (and forge a pass); the
  kernel-level limits above hold regardless.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_HARNESS = str(Path(__file__).with_name("_sandbox_harness.py"))
_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `output_bytes` caps stdout, stderr and each file the program writes (RLIMIT_FSIZE)."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    max_processes: int = 32
    output_bytes: int = 1_000_000
    max_feedback_chars: int = 2000


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run. `feedback` is None when the tests passed."""

    passed: bool
    feedback: str | None
    seconds: float
    returncode: int | None
    timed_out: bool


def _truncate(text: str, limit: int) -> str:
    """Keep the head (the failing test) and the tail (the error) of a long text."""
    if len(text) <= limit:
        return text
    half = (limit - 20) // 2
    return f"{text[:half]}\n... [truncated] ...\n{text[-half:]}"


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", "replace")


def _probe(argv: list[str]) -> str | None:
    """stdout of a short command, or None when it fails (used to find out what this machine allows)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _tasks_of(uid: int) -> int:
    """Number of tasks (threads) owned by `uid`: what RLIMIT_NPROC counts when the program keeps our uid."""
    total = 0
    for entry in os.scandir("/proc"):
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


class Sandbox:
    """Runs `(code, tests)` pairs; see the module docstring for what is enforced.

    `namespaces` and `drop_privileges` default to whatever this machine allows (checked once, here); pass False to
    turn one off. `max_workers` bounds how many runs execute at once, across all threads using this object.
    `work_root` is where each run's temp dir goes (default: the system temp dir); give it mode 0o711 or wider when
    privileges are dropped, so the run's uid can reach its working dir.
    """

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),
        max_workers: int | None = None,
        namespaces: bool | None = None,
        drop_privileges: bool | None = None,
        work_root: str | None = None,
    ):
        self.limits, self.work_root = limits, work_root
        self.max_workers = max_workers or min(4, os.cpu_count() or 1)
        self._slots = threading.BoundedSemaphore(self.max_workers)
        self._python = [sys.executable, "-I", "-B"]
        is_root = os.geteuid() == 0
        self._namespace_argv: list[str] = []
        if namespaces is not False and shutil.which("unshare"):
            argv = ["unshare"] + ([] if is_root else ["--user"]) + ["--net", "--pid", "--fork", "--kill-child"]
            if _probe(argv + ["true"]) is not None:
                self._namespace_argv = argv
        self._read_cap: bool | None = None  # None: programs keep our uid
        if drop_privileges is not False and is_root and shutil.which("setpriv"):
            self._read_cap = self._find_read_cap()
        self.isolation = {
            "namespaces": bool(self._namespace_argv),
            "uid": self._read_cap is not None,
            "read_cap": bool(self._read_cap),
            "fork": self._read_cap is not None or not is_root,  # the kernel ignores RLIMIT_NPROC for root
        }

    def _setpriv_argv(self, uid: int, read_cap: bool) -> list[str]:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs"]
        if read_cap:
            argv += ["--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search"]
        return argv

    def _find_read_cap(self) -> bool | None:
        """Whether a fresh uid needs CAP_DAC_READ_SEARCH to load our interpreter's own standard library.

        Without access, Python silently falls back to another prefix (e.g. /usr), so compare `sys.base_prefix`.
        None when neither works (programs then keep our uid).
        """
        probe = self._python + ["-c", "import sys; print(sys.base_prefix)"]
        uid = 2**31 - 2
        for read_cap in (False, True):
            if _probe(self._setpriv_argv(uid, read_cap) + probe) == sys.base_prefix + "\n":
                return read_cap
        return None

    def run(self, code: str, tests: str) -> SandboxResult:
        """Run `code`, then `tests` (plain Python, e.g. asserts or `check(candidate)`) in the sandbox."""
        with self._slots, tempfile.TemporaryDirectory(
            prefix="selfdistill-sandbox-", dir=self.work_root, ignore_cleanup_errors=True
        ) as tmp:
            return self._run(code, tests, Path(tmp))

    def run_many(self, pairs: list[tuple[str, str]]) -> list[SandboxResult]:
        """`run` over `(code, tests)` pairs, `max_workers` at a time, results in input order."""
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda pair: self.run(*pair), pairs))

    def _run(self, code: str, tests: str, tmp: Path) -> SandboxResult:
        limits = self.limits
        work = tmp / "work"
        work.mkdir(mode=0o700)
        argv = list(self._namespace_argv)
        if self._read_cap is not None:
            uid = random.SystemRandom().randrange(2**30, 2**31 - 2)  # fresh per run: its own RLIMIT_NPROC count
            tmp.chmod(0o711)  # the uid may pass through to its working dir, not list or open our files next to it
            os.chown(work, uid, uid)
            argv += self._setpriv_argv(uid, self._read_cap)
            nproc = limits.max_processes
        else:
            nproc = limits.max_processes + _tasks_of(os.getuid())  # the count includes our uid's other tasks
        argv += self._python + [_HARNESS]
        nonce = uuid.uuid4().hex
        env = {"PATH": _ENV_PATH, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        # stdout and stderr go to files so that RLIMIT_FSIZE caps them; only the end of stderr is read back.
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err, open(tmp / "result", "w+b") as res:
            request = {
                "nonce": nonce,
                "result_fd": res.fileno(),
                "code": code,
                "tests": tests,
                "allow_fork": self.isolation["fork"],
                "limits": {
                    "memory_bytes": limits.memory_mb * 2**20,
                    "cpu_s": limits.cpu_s,
                    "output_bytes": limits.output_bytes,
                    "nproc": nproc,
                },
            }
            start = time.monotonic()
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=(res.fileno(),), cwd=work, env=env,
                start_new_session=True,
            )  # fmt: skip
            timed_out = False
            try:
                proc.communicate(json.dumps(request).encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                self._stop(proc)
            seconds = time.monotonic() - start
            res.seek(0)
            report = res.read(limits.output_bytes).decode("utf-8", "replace")
        return self._result(report, nonce, proc.returncode, timed_out, seconds, _tail(tmp / "stderr", 1000))

    def _stop(self, proc: subprocess.Popen) -> None:
        """Kill whatever is left of a run and reap our child.

        With namespaces our child is `unshare` and the program's pid-namespace init is its child: kill that init
        first, so the kernel kills every process of the namespace and `unshare` reaps them all before it exits (kill
        `unshare` first and the dying init would be left to the machine's pid 1 to reap). Then SIGKILL the process
        group, which is the whole run when there are no namespaces.
        """
        if self._namespace_argv and proc.poll() is None:
            for pid in _children(proc.pid):
                _kill(pid)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group's id is our child's pid
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def _result(self, report, nonce, returncode, timed_out, seconds, stderr) -> SandboxResult:
        limits = self.limits
        status, _, feedback = report.partition("\n")
        if timed_out:
            passed, feedback = False, f"timed out after {limits.timeout_s:g} s (wall clock)"
        elif status in (f"{nonce} PASS", f"{nonce} FAIL"):
            passed = status.endswith("PASS")
        elif returncode == -signal.SIGXCPU:
            passed, feedback = False, f"CPU time limit exceeded ({limits.cpu_s} s)"
        elif returncode == -signal.SIGXFSZ:
            passed, feedback = False, f"output limit exceeded: more than {limits.output_bytes} bytes written"
        elif returncode is not None and returncode < 0:
            passed, feedback = False, f"killed by {signal.Signals(-returncode).name}"
        else:
            passed, feedback = False, f"the program exited with code {returncode} before the tests finished"
        if passed:
            return SandboxResult(True, None, seconds, returncode, False)
        # `unshare` reports on stderr when its child was SIGKILLed (by us, on timeout): not the program's output.
        stderr = "\n".join(line for line in stderr.splitlines() if not line.startswith("unshare: ")).strip()
        if stderr:
            feedback += f"\nstderr (end):\n{stderr}"
        return SandboxResult(False, _truncate(feedback, limits.max_feedback_chars), seconds, returncode, timed_out)


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
