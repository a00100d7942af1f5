import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

# The CI machine has 2 cores: pin torch so tests never oversubscribe them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def unavailable(reason: str):
    """A tool a test needs is missing: under CI that is a failure, never a skip; elsewhere, a skip naming it."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


# -----------------------------------------------------------------------------
# What the convert tests share: a small float model, hostile .npz files, and the one-line refusal.


class MLP(nn.Module):
    """(B, 12) -> (B, 5): a float program every format converts, in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Payload:
    """Pickled into an object array, it creates ``marker`` when unpickled: proof that a file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def assert_refused(code: int, err: str, needles, out: Path) -> None:
    """A CLI call refused as bad input: exit 2, one line holding every needle, no traceback, nothing written
    (no output folder, no log beside it, no marker a hostile payload would create)."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not (out.parent / f"{out.name}.convert.log").exists()
    assert not (out.parent / "PWNED").exists(), "the npz ran code"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The default model (hybrid attention) trained briefly on digits with 2 threads: the CI-sized run."""
    from difftx_edge.tasks import TaskConfig
    from difftx_edge.train import TrainConfig, train

    out = tmp_path_factory.mktemp("digits_run")
    test = train(TrainConfig(out=str(out), epochs=40, threads=2), TaskConfig("digits"), {}, progress=False)
    return out, test


# -----------------------------------------------------------------------------
# A real sshd on 127.0.0.1, for the SSH benchmark target. .ci/run installs openssh-server.


def start_sshd(root, path_dirs: list[str]) -> tuple[str, str, object]:
    """Start sshd on a free loopback port with throw-away keys, sessions seeing ``path_dirs`` first on PATH.

    Returns the ``ssh://`` URL, an ssh_config that logs in with the key, and the process.
    """
    import shutil
    import socket
    import subprocess
    import time
    from pathlib import Path

    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        unavailable("sshd is not installed: apt-get install openssh-server (.ci/run does)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (root / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", f"PidFile {root / 'sshd.pid'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no", f"SetEnv PATH={':'.join(path_dirs)}:/usr/bin:/bin", ""]))
    (root / "ssh_config").write_text("\n".join([
        "Host *", f"  IdentityFile {root / 'client_key'}", "  IdentitiesOnly yes", "  StrictHostKeyChecking no",
        "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(root / "sshd_config")], stderr=open(root / "sshd.log", "w"))
    deadline = time.time() + 20
    while time.time() < deadline:
        probe = subprocess.run(["ssh", "-F", str(root / "ssh_config"), "-p", str(port), "-o", "BatchMode=yes",
                                f"{user}@127.0.0.1", "true"], capture_output=True, timeout=20)
        if probe.returncode == 0:
            return f"ssh://{user}@127.0.0.1:{port}", str(root / "ssh_config"), proc
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"sshd did not accept a login within 20 s: {(root / 'sshd.log').read_text()[-1000:]}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A local 'board' whose python3 is this venv's: numpy and every runtime."""
    import sys
    from pathlib import Path

    url, config, proc = start_sshd(tmp_path_factory.mktemp("sshd"), [str(Path(sys.executable).parent)])
    yield url, config
    proc.terminate()
    proc.wait(timeout=10)
