"""A Linux board over SSH (a Raspberry Pi, or any board with Python 3 and numpy).

The target copies a self-contained device runner (a zipapp of the runtimes
package, see ``measure.device_runner``), each row's bundle, and for .pte
files the native ExecuTorch runner built for the board's CPU, into a private
temporary directory on the board; runs them there; streams their progress;
brings back the JSON; and removes the directory when it closes.

Nothing the user typed reaches a shell unquoted: the URL's parts must match
strict patterns, files travel under generated names, and every word of a
remote command goes through ``shlex.quote``.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from difftx_edge.runtimes.registry import links_outside
from difftx_edge.runtimes.targets.registry import CommandTarget, register_target

_URL = re.compile(r"ssh://(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@)?"
                  r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                  r"(?::(?P<port>[0-9]{1,5}))?/?")
_REMOTE_DIR = re.compile(r"/[A-Za-z0-9._/-]+")
SSH_FAILED = 255  # ssh's own exit code when it cannot connect or authenticate
CONNECT_TIMEOUT_S = 15


def parse_ssh_url(url: str) -> tuple[str | None, str, int]:
    """``ssh://[user@]host[:port]`` as (user, host, port); raises ValueError (one line) on anything else."""
    match = _URL.fullmatch(url)
    port = int(match["port"] or 22) if match else 0
    if not match or not 1 <= port <= 65535:
        raise ValueError(f"bad SSH target {url!r}: use ssh://user@host[:port] with a plain host name or address")
    return match["user"], match["host"].strip("[]"), port


@register_target("ssh")
class SshTarget(CommandTarget):
    runtimes = ("executorch", "litert", "onnxruntime", "coreml")  # eager torch is the host's baseline
    def __init__(self, url: str, ssh_config: str | None = None, remote_python: str = "python3",
                 timeout: float = 600.0):
        super().__init__(url, timeout)
        self.remote_python = remote_python
        user, host, port = parse_ssh_url(url)
        # One connection carries every command of a run: a handshake with an emulated board costs seconds.
        self.control = Path(tempfile.mkdtemp(prefix="difftx-ssh-"))
        self.base = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                     "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control}/%C", "-o", "ControlPersist=120",
                     "-p", str(port)]
        if ssh_config is not None:
            if not Path(ssh_config).is_file():
                raise ValueError(f"ssh config {ssh_config} does not exist: give an ssh_config file or leave it out")
            self.base += ["-F", str(ssh_config)]
        if user is not None:
            self.base += ["-l", user]
        self.base += ["--", host]
        self.remote_dir: str | None = None
        self.staged_jobs = 0
        self.runner_path: str | None = None
        self.native_path: str | None = None
        self.machine: dict | None = None

    # Commands -------------------------------------------------------------------------------------------------
    def _ssh(self, remote: str, *, data: bytes | None = None, what: str) -> bytes:
        """Run the shell command ``remote`` (already quoted) on the board; returns its stdout."""
        try:
            done = subprocess.run([*self.base, remote], input=data, capture_output=True, timeout=self.timeout,
                                  stdin=None if data is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise ValueError(f"{what} on {self.url} timed out after {self.timeout:g} s") from err
        except FileNotFoundError as err:
            raise ValueError("the ssh client is not installed: apt-get install openssh-client") from err
        if done.returncode != 0:
            errors = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
            raise ValueError(self.failure(done.returncode, errors, what))
        return done.stdout

    def failure(self, returncode: int, errors: list[str], what: str) -> str:
        if returncode == SSH_FAILED:
            reason = errors[-1] if errors else "no message"
            return f"cannot reach {self.url}: {reason}"
        return super().failure(returncode, errors, what)

    def command(self, argv: list[str], env: dict[str, str]) -> list[str]:
        words = [f"{name}={value}" for name, value in env.items()] + argv
        return [*self.base, f"cd {shlex.quote(self._dir())} && env " + " ".join(shlex.quote(w) for w in words)]

    def _dir(self) -> str:
        """The private directory on the board, made on first use with ``mktemp -d`` (mode 0700)."""
        if self.remote_dir is None:
            made = self._ssh('mktemp -d "${TMPDIR:-/tmp}/difftx-edge.XXXXXXXX"', what="mktemp").decode().strip()
            if not _REMOTE_DIR.fullmatch(made):
                raise ValueError(f"{self.url} made an unexpected temporary directory {made!r}")
            self.remote_dir = made
        return self.remote_dir

    def _upload(self, files: dict[str, Path], into: str) -> None:
        """Copy local files and folders to ``into`` on the board, as one tar stream under the given names."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name, path in files.items():
                if Path(path).is_dir() and links_outside(path):  # tar would copy the link; never what it names
                    raise ValueError(f"{path} holds links to files outside it: refusing to copy it to {self.url}")
                archive.add(str(path), arcname=name)
        remote = f"mkdir -p {shlex.quote(into)} && tar -xf - -C {shlex.quote(into)}"
        self._ssh(remote, data=buffer.getvalue(), what="copying files")

    # Hooks --------------------------------------------------------------------------------------------------------
    def stage(self, files: dict[str, Path], outputs: tuple[str, ...] = ()) -> dict[str, str]:
        self.staged_jobs += 1
        into = f"{self._dir()}/job{self.staged_jobs}"
        self._upload(files, into)
        return {name: f"{into}/{name}" for name in (*files, *outputs)}

    def fetch(self, path: str) -> bytes:
        return self._ssh(f"cat {shlex.quote(path)}", what="fetching results")

    def python(self, runtime: str) -> list[str]:
        if self.runner_path is None:
            from difftx_edge.runtimes.measure import device_runner

            with tempfile.TemporaryDirectory() as local:
                self._upload({"runner.pyz": device_runner(Path(local) / "runner.pyz")}, self._dir())
            self.runner_path = f"{self._dir()}/runner.pyz"
        return [self.remote_python, self.runner_path]

    def native_dir(self) -> str:
        if self.native_path is None:
            from difftx_edge.runtimes.native import build

            arch = self.describe()["machine"]
            self._upload({"native": build(_native_arch(arch))}, self._dir())
            self.native_path = f"{self._dir()}/native"
        return self.native_path

    def describe(self) -> dict:
        if self.machine is None:
            try:
                self.machine = super().describe()
            except ValueError as err:
                if "No module named" in str(err) or "not found" in str(err):
                    raise ValueError(f"{self.url} cannot run the device runner ({err}): it needs Python 3 and "
                                     "numpy on the board (choose the interpreter with --remote-python)") from err
                raise
            self.emulated = bool(self.machine.get("emulated"))
        return self.machine

    def close(self) -> None:
        try:
            if self.remote_dir is not None:
                self._ssh(f"rm -rf {shlex.quote(self.remote_dir)}", what="cleaning up")
                self.remote_dir = None
        finally:
            subprocess.run([*self.base[:-2], "-O", "exit", "--", self.base[-1]], capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=CONNECT_TIMEOUT_S)
            shutil.rmtree(self.control, ignore_errors=True)


def _native_arch(machine: str) -> str:
    import platform

    if machine == platform.machine():
        return "host"
    if machine in ("aarch64", "arm64"):
        return "aarch64"
    raise ValueError(f"the native ExecuTorch runner is built here for this machine and aarch64, not {machine}")
