"""Runs one program and its tests inside the sandbox; started by `selfdistill.rewards.sandbox`, never imported.

Order of work:
1. read the request (JSON) from stdin, then point fd 0 at /dev/null so the program cannot read it again;
2. set the resource limits (hard = soft, so the program cannot raise them);
3. install an audit hook (PEP 578; it cannot be removed once added) that refuses, at the Python level: writes
   outside the working dir, reads outside the interpreter's folders and world-readable system files, sockets,
   starting programs, loading native code through ctypes, signals to other processes, and forking when the parent
   says no process limit holds;
4. run the program in a fresh namespace; an exception (SystemExit included) fails the run;
5. restore the builtins the program may have replaced, and run the tests in a fresh namespace holding the program's
   names, so test code defined after the program (e.g. `check`) wins over the program's own definitions;
6. report "<nonce> PASS|FAIL" and the feedback on the result fd, erasing whatever the program wrote there.
Only the process that started the run reports; copies made by `os.fork` in the program exit instead.

The nonce stops naive forging (printing a success line, exiting early). Code that digs the nonce out of this
module's frames can still forge a pass: the tests run in the same interpreter as the code under test, so they can
never be fully protected from it. The kernel-level limits (set by the parent) do not depend on this file.
"""

import builtins
import json
import linecache
import os
import resource
import sys
import traceback
from stat import S_IROTH

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
PATH_WRITE_EVENTS = {
    "os.chmod", "os.chown", "os.link", "os.mkdir", "os.mkfifo", "os.mknod", "os.remove", "os.rename", "os.rmdir",
    "os.setxattr", "os.removexattr", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree",
}  # fmt: skip
REFUSED_EVENTS = {
    "socket.__new__", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
}  # fmt: skip
REFUSED_IMPORTS = {"_ctypes", "_posixsubprocess"}  # native escapes that raise no audit event of their own
SOURCES = ("<solution>", "<tests>")


def set_limits(limits: dict) -> None:
    cpu_s = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU at the soft limit, SIGKILL one second later
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["output_bytes"],) * 2)  # stdout/stderr are files: caps them too
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def make_guard(work_dir: str, allow_fork: bool):
    """The audit hook. Paths are resolved (symlinks included) before they are compared. `allow_fork` is False when
    the kernel would not enforce RLIMIT_NPROC (root without a uid to drop to): then forking is refused outright."""
    read_roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, "/usr", "/lib", "/lib64", "/etc"}
    read_roots = [os.path.realpath(root) for root in read_roots]
    # Bound now: the program may replace builtins and module attributes while this hook is in force.
    my_pid, realpath, fsdecode, stat_path, is_a, path_types = (
        os.getpid(), os.path.realpath, os.fsdecode, os.stat, isinstance, (str, bytes, os.PathLike)
    )

    def within(path: str, root: str) -> bool:
        return path == root or path.startswith(root.rstrip("/") + "/")

    def check_write(path) -> None:
        if is_a(path, int):  # an already open file descriptor
            return
        resolved = realpath(fsdecode(path))
        if not (within(resolved, work_dir) or resolved == "/dev/null"):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {resolved}")

    def check_read(path) -> None:
        if is_a(path, int):
            return
        resolved = realpath(fsdecode(path))
        if within(resolved, work_dir) or resolved in ("/dev/null", "/dev/urandom", "/dev/zero"):
            return
        try:
            readable = stat_path(resolved).st_mode & S_IROTH
        except OSError:
            return  # does not exist: the open itself fails
        if not (readable and any(within(resolved, root) for root in read_roots)):
            raise PermissionError(f"sandbox: reading this file is not allowed: {resolved}")

    def guard(event: str, args: tuple) -> None:
        if event == "open":
            path, _mode, flags = args
            if path is not None and flags & WRITE_FLAGS:
                check_write(path)
            elif path is not None:
                check_read(path)
        elif event in PATH_WRITE_EVENTS:
            for arg in args:
                if is_a(arg, path_types):
                    check_write(arg)
        elif event in REFUSED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "import" and args[0] in REFUSED_IMPORTS:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        elif event in ("os.kill", "os.killpg") and args[0] not in (0, my_pid):
            raise PermissionError(f"sandbox: {event} of another process is not allowed")
        elif event in ("os.fork", "os.forkpty") and not allow_fork:
            raise PermissionError(f"sandbox: {event} is not allowed (no process limit can be enforced here)")

    return guard


def describe(error: BaseException) -> str:
    """The failing test line (last frame in the tests) and a traceback without this harness's frames."""
    try:
        exc = traceback.TracebackException.from_exception(error)
        frames = [frame for frame in exc.stack if frame.filename != __file__]
        exc.stack = traceback.StackSummary.from_list(frames)
        test_lines = [frame.line for frame in frames if frame.filename == "<tests>"]
        head = f"failed test: {test_lines[-1]}\n" if test_lines else ""
        return head + "".join(exc.format())
    except BaseException:  # the program may have broken the traceback machinery; keep the exception's type at least
        return type(error).__name__


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    nonce, result_fd, code, tests = request["nonce"], request["result_fd"], request["code"], request["tests"]
    set_limits(request["limits"])
    for name, source in zip(SOURCES, (code, tests)):
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    # Keep our own references: the program may replace module attributes such as os.write.
    my_pid, getpid, exit_now = os.getpid(), os.getpid, os._exit
    write, lseek, ftruncate = os.write, os.lseek, os.ftruncate
    explain = describe
    builtins_dict = vars(builtins)
    clean_builtins = dict(builtins_dict)
    sys.addaudithook(make_guard(os.path.realpath(os.getcwd()), request["allow_fork"]))

    passed, feedback = False, ""
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(code, SOURCES[0], "exec"), namespace)
    except BaseException as error:
        feedback = "the program failed before the tests ran:\n" + explain(error)
    else:
        if getpid() != my_pid:
            exit_now(0)
        builtins_dict.clear()
        builtins_dict.update(clean_builtins)
        try:
            exec(compile(tests, SOURCES[1], "exec"), {**namespace, "__name__": "tests", "__builtins__": builtins})
            passed = True
        except BaseException as error:
            feedback = explain(error)
    if getpid() != my_pid:
        exit_now(0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    report = f"{nonce} {'PASS' if passed else 'FAIL'}\n{feedback}".encode("utf-8", "replace")
    lseek(result_fd, 0, 0)
    ftruncate(result_fd, 0)
    write(result_fd, report)
    exit_now(0)  # skip atexit handlers and non-daemon threads the program may have left


if __name__ == "__main__":
    main()
