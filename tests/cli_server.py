"""A warm ``llamafactory-cli`` for the tests: one interpreter of the test environment imports what the CLI imports
once, then forks one child per run, which calls the console script's own entry point.

Run as ``PYTHON tests/cli_server.py SOCKET`` with the interpreter named in the ``llamafactory-cli`` script's first
line and a user's environment (``tests.helpers.subprocess_env``). The interpreter starts as the script would: the
environment's ``.pth`` files run, so the plugin's import hook is installed before LLaMA-Factory is imported and
patches it on import, as in every ``llamafactory-cli train``. It then listens on the Unix socket ``SOCKET``; each
connection carries one JSON request ``{"argv", "cwd", "env", "log"}`` and gets back the child's pid, then its exit
status; it exits when the client's end of its standard input closes (the tests ended, however). The child takes the
request's working directory, environment (the server refuses nothing: the client only sends runs whose environment
differs from the server's only in ``RUNTIME_VARIABLES``), thread count and argv, writes stdout and stderr to ``log``
and runs ``llamafactory-cli``'s ``main``. What stays shared is only what the parent imported; no child's state
reaches another.

Nothing here runs a tensor operation before forking: an OpenMP thread pool started in the parent would not survive
the fork.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import traceback
from importlib.metadata import entry_points


RUNTIME_VARIABLES = ("OMP_NUM_THREADS",)  # read when a run starts (torch.set_num_threads), not on import
PRELOADED = (  # what every training run imports; the model code is imported by the run that needs it
    "llamafactory.launcher",
    "llamafactory.train.tuner",
    "llamafactory.hparams",
    "llamafactory.data",
    "llamafactory.model",
)


def _load_cli_main():
    (entry,) = entry_points(group="console_scripts", name="llamafactory-cli")
    return entry.load()


def _run_child(connection: socket.socket, cli_main) -> None:
    """Run one request in this forked child; never returns."""
    code = 1
    try:
        request = json.loads(connection.makefile("r").readline())
        connection.sendall(f"{os.getpid()}\n".encode())
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it; a run's own subprocesses need it
        quiet = os.open(os.devnull, os.O_RDONLY)  # not the client's pipe
        os.dup2(quiet, 0)
        os.close(quiet)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        import torch

        if "OMP_NUM_THREADS" in request["env"]:
            torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
        try:
            result = cli_main()
            code = result if isinstance(result, int) else 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, int) and stop.code is not None:
                print(stop.code, file=sys.stderr)
        except BaseException:  # noqa: B036 - the child reports every failure as the CLI would, then exits
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            connection.sendall(f"{code}\n".encode())
        finally:
            os._exit(code)


def main(socket_path: str) -> None:
    script_dir = os.path.dirname(os.path.realpath(sys.argv[0]))
    if sys.path and os.path.realpath(sys.path[0]) == script_dir:
        sys.path.pop(0)  # the tests' folder is not on the CLI's path
    cli_main = _load_cli_main()
    for name in PRELOADED:
        __import__(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished children are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(16)
    events = selectors.DefaultSelector()
    events.register(server, selectors.EVENT_READ)
    events.register(0, selectors.EVENT_READ)  # the client's pipe: its end of file means the tests are gone
    print("ready", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    while True:
        for key, _ in events.select():
            if key.fileobj == 0:
                if not os.read(0, 4096):
                    os._exit(0)
                continue
            connection, _ = server.accept()
            if os.fork() == 0:
                server.close()
                events.close()
                _run_child(connection, cli_main)
            connection.close()


if __name__ == "__main__":
    main(sys.argv[1])
