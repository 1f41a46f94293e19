"""The code sandbox against hostile programs: reward 0, clear feedback, bounded time, nothing left behind.

Run with `-s` to see the table of cases, seconds and feedback.
"""

import os
import re
import resource
import shutil
import socket
import tempfile
import time
import uuid

import pytest

from selfdistill.rewards import FEEDBACK_KEY, CodeTests, Sandbox, SandboxLimits, build_program, extract_code

TIMEOUT_S = 2.0
LIMITS = SandboxLimits(timeout_s=TIMEOUT_S, cpu_s=2, memory_mb=512, max_processes=16, output_bytes=1_000_000)
SECRET = f"s3cret-{uuid.uuid4().hex}"
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
HONEST_ADD = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def run_dir():
    """Sandbox runs of this module make their temp dirs here, so that live processes of *these* runs can be found
    by their working directory (forks inherit it), whatever else runs on the machine."""
    path = tempfile.mkdtemp(prefix="selfdistill-test-")
    os.chmod(path, 0o711)  # like the system temp dir: a dropped uid may pass through
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sandbox_processes(run_dir: str) -> list[str]:
    """Live processes whose working directory is inside `run_dir`."""
    found = []
    for entry in os.scandir("/proc"):
        try:
            cwd = os.readlink(f"{entry.path}/cwd") if entry.name.isdigit() else ""
        except OSError:  # gone, or a zombie
            continue
        if cwd.startswith(run_dir):
            found.append(f"{entry.name}: {cwd}")
    return found


@pytest.fixture(scope="module")
def code_reward(run_dir):
    return CodeTests(LIMITS, max_workers=2, work_root=run_dir)


@pytest.fixture(scope="module")
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


def hostile_cases(outside_dir, port):
    """(name, program, tests, feedback pattern). Where a test passes only if the attack worked, reward 0 proves
    it failed."""
    outside_tmp = f"/tmp/selfdistill-outside-{uuid.uuid4().hex}.txt"
    return [
        ("infinite loop", "def add(a, b):\n    while True:\n        pass\n", ADD_TESTS, "timed out after 2 s"),
        (
            "fork bomb",
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            ADD_TESTS,
            "timed out after 2 s",
        ),
        ("allocate 10 GB", "block = bytearray(10 * 1024**3)\n" + HONEST_ADD, ADD_TESTS, "MemoryError"),
        (
            "print 100 MB",
            "for _ in range(100):\n    print('x' * 1_000_000)\n" + HONEST_ADD,
            ADD_TESTS,
            "File too large|output limit",
        ),
        (
            "write outside (world-writable /tmp)",
            f"open({outside_tmp!r}, 'w').write('pwned')\n" + HONEST_ADD,
            ADD_TESTS,
            "writing outside the working directory is not allowed",
        ),
        (
            "write outside (test's tmp dir)",
            f"open({str(outside_dir / 'pwned.txt')!r}, 'w').write('pwned')\n" + HONEST_ADD,
            ADD_TESTS,
            "writing outside the working directory is not allowed",
        ),
        (
            "read environment secret",
            "import os\n"
            "def leak():\n"
            "    found = os.environ.get('SELFDISTILL_TEST_SECRET', '')\n"
            "    try:\n"
            "        found += open(f'/proc/{os.getppid()}/environ').read()\n"
            "    except OSError:\n"
            "        pass\n"
            "    return found\n",
            "assert 's3cret-' in leak()\n",  # names only the secret's public prefix
            "failed test: assert",
        ),
        (
            "socket to 127.0.0.1",
            "import socket\n"
            f"connection = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "def connected():\n    return True\n",
            "assert connected()\n",
            "not allowed|unreachable",
        ),
        ("sys.exit(0) before the tests", HONEST_ADD + "import sys\nsys.exit(0)\n", ADD_TESTS, "SystemExit: 0"),
        (
            "os._exit(0) before the tests",
            HONEST_ADD + "import os\nos._exit(0)\n",
            ADD_TESTS,
            "exited with code 0 before the tests finished",
        ),
        (
            "redefine the harness",
            "import builtins, os, __main__\n"
            "def add(a, b):\n    return 0\n"
            "def check(candidate):\n    return True\n"
            "builtins.AssertionError = type('Nothing', (Exception,), {})\n"
            "builtins.abs = lambda x: 0\n"
            "for name in ('describe', 'main', 'make_guard', 'set_limits'):\n"
            "    setattr(__main__, name, lambda *args, **kwargs: None)\n"
            "for fd in range(3, 12):\n"
            "    try:\n        os.write(fd, b'PASS\\n')\n    except OSError:\n        pass\n"
            "os.write = lambda fd, data: len(data)\n"
            "print('PASS')\n",
            "def check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-6\n\ncheck(add)\n",
            "failed test: assert abs\\(candidate\\(2, 3\\) - 5\\) < 1e-6",
        ),
    ], outside_tmp


def test_hostile_programs_get_zero_and_clear_feedback(code_reward, listener, tmp_path, monkeypatch, run_dir):
    monkeypatch.setenv("SELFDISTILL_TEST_SECRET", SECRET)
    cases, outside_tmp = hostile_cases(tmp_path, listener.getsockname()[1])
    limits_before = {r: resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_NPROC)}
    cwd_before = os.getcwd()
    rows = []
    for name, program, tests, pattern in cases:
        slots = [[]]
        start = time.monotonic()
        rewards = code_reward([program], tests=[tests], **{FEEDBACK_KEY: slots})
        seconds = time.monotonic() - start
        feedback = slots[0][0] if slots[0] else ""
        assert rewards == [0.0], name
        lines = [line.strip() for line in feedback.splitlines() if line.strip()] or [""]
        rows.append((name, seconds, rewards[0], " … ".join(dict.fromkeys([lines[0], lines[-1]]))[:120]))
        assert re.search(pattern, feedback), (name, feedback)
        assert SECRET not in feedback
        assert seconds < TIMEOUT_S + 3, name
        assert sandbox_processes(run_dir) == [], name
    print("\n| case | seconds | reward | feedback (start) |\n|---|---|---|---|")
    for name, seconds, reward, feedback in rows:
        print(f"| {name} | {seconds:.2f} | {reward} | {feedback} |")
    # the test process is unaffected
    assert not os.path.exists(outside_tmp) and not (tmp_path / "pwned.txt").exists()
    with pytest.raises(TimeoutError):
        listener.accept()  # nobody connected
    assert os.environ["SELFDISTILL_TEST_SECRET"] == SECRET and os.getcwd() == cwd_before
    assert {r: resource.getrlimit(r) for r in limits_before} == limits_before
    socket.socket().close()


def test_honest_and_wrong_programs(code_reward):
    slots = [[], [], []]
    programs = [
        HONEST_ADD,
        "```python\n" + HONEST_ADD + "```\nThis adds.",
        "def add(a, b):\n    return a - b\n",
    ]
    rewards = code_reward(programs, tests=[ADD_TESTS] * 3, **{FEEDBACK_KEY: slots})
    assert rewards == [1.0, 1.0, 0.0]
    assert slots[:2] == [[], []]
    assert slots[2][0].startswith("failed test: assert add(2, 3) == 5\nTraceback")
    assert "AssertionError" in slots[2][0] and "_sandbox_harness" not in slots[2][0]
    assert code_reward(["x = 1"], tests=[""]) == [None]  # no tests: skipped


def test_process_limit_holds(run_dir):
    sandbox = Sandbox(LIMITS, work_root=run_dir)
    if not sandbox.isolation["fork"]:
        pytest.skip("root without a uid to drop to: the kernel ignores RLIMIT_NPROC, so forking is refused instead")
    program = (
        "import os, time\nforks = 0\ntry:\n    while forks < 200:\n        if os.fork() == 0:\n"
        "            time.sleep(60)\n            os._exit(0)\n        forks += 1\nexcept OSError:\n    pass\n"
    )
    # Near max_processes (the count also holds the harness, and for a shared uid the kernel's own bookkeeping),
    # far below the 200 forks attempted.
    result = sandbox.run(program, f"assert forks < {2 * LIMITS.max_processes}, forks\n")
    assert result.passed, result.feedback
    assert sandbox_processes(run_dir) == []  # the sleeping children died with the run


def test_network_namespace_has_only_a_down_loopback():
    sandbox = Sandbox(LIMITS)
    if not sandbox.isolation["namespaces"]:
        pytest.skip("unshare is not usable here")
    result = sandbox.run("import socket\ninterfaces = socket.if_nameindex()\n", "assert interfaces == [(1, 'lo')]\n")
    assert result.passed, result.feedback


def test_children_that_leave_the_session_die_with_the_namespace(run_dir):
    sandbox = Sandbox(LIMITS, work_root=run_dir)
    if not sandbox.isolation["namespaces"]:
        pytest.skip("unshare is not usable here: such a child would survive (see the sandbox docstring)")
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n"
    assert sandbox.run(program, "pass\n").passed
    assert sandbox_processes(run_dir) == []


def test_runs_as_a_fresh_uid_when_root():
    sandbox = Sandbox(LIMITS)
    if os.geteuid() != 0 or not sandbox.isolation["uid"]:
        pytest.skip("only when started as root")
    result = sandbox.run("import os\nuid = os.getuid()\n", "assert uid >= 2**30\n")
    assert result.passed, result.feedback


def test_python_guard_alone_blocks_sockets_and_writes(tmp_path):
    """Without namespaces or a uid change, the audit hook still refuses sockets and writes outside the work dir."""
    sandbox = Sandbox(LIMITS, namespaces=False, drop_privileges=False)
    assert sandbox.isolation["namespaces"] is False and sandbox.isolation["uid"] is False
    blocked = sandbox.run("import _socket\n_socket.socket()\n", "")
    assert not blocked.passed and "socket.__new__ is not allowed" in blocked.feedback
    target = tmp_path / "x.txt"
    blocked = sandbox.run(f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\n", "")
    assert not blocked.passed and "writing outside" in blocked.feedback and not target.exists()
    if os.geteuid() == 0:  # root keeping its uid: RLIMIT_NPROC would not hold, so forking is refused instead
        refused = sandbox.run("import os\nos.fork()\n", "")
        assert not refused.passed and "os.fork is not allowed" in refused.feedback
    program = "open('inside.txt', 'w').write('ok')\nwith open('inside.txt') as f:\n    text = f.read()\n"
    allowed = sandbox.run(program, "assert text == 'ok'\n")
    assert allowed.passed, allowed.feedback


def test_parallelism_is_bounded(run_dir):
    reward = CodeTests(SandboxLimits(timeout_s=1.0, cpu_s=5), max_workers=2, work_root=run_dir)
    start = time.monotonic()
    rewards = reward(["import time\ntime.sleep(30)\n"] * 4, tests=["pass"] * 4)
    elapsed = time.monotonic() - start
    assert rewards == [0.0] * 4
    assert 2.0 <= elapsed < 6.0  # 4 runs of 1 s, two at a time
    assert sandbox_processes(run_dir) == []


def test_extract_code_and_build_program():
    text = "Plan.\n```\nnot this\n```\n```python\ndef f():\n    return 1\n```\nDone."
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("```python\nx = 1\n") == "x = 1\n"  # an unclosed fence runs to the end
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("    return x\n") == "    return x\n"  # no fence: the whole text, indentation kept
    prompt = "def f(x):\n    \"\"\"Doc.\"\"\"\n"
    assert build_program("    return x\n", "f", prompt) == prompt + "    return x\n"  # a body continuation
    assert build_program("def f(x):\n    return x\n", "f", prompt) == "def f(x):\n    return x\n"
    assert build_program("x = 1\n", None, prompt) == "x = 1\n"
