"""Chapter 8 of the demo: the host daemon and the ``strata`` command line (architecture §9).

A fourth host, ``host-d``, runs ``strata serve`` in the background with a config file that
connects the demo's two repositories; an operator drives it with ``strata`` commands over its
Unix socket: a disk made with a progress bar fed by the daemon's event stream, its status as
JSON, a typed error with its code and exit status 1, and SIGTERM, which stops the daemon cleanly
(exit status 0).

Imports: nothing of the engine: the daemon and its client are separate programs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from demo.story import say


class ServeChapter:
    def __init__(self, roots: dict[str, str], scratch: str) -> None:
        self.roots, self.scratch = roots, scratch
        self.socket = os.path.join(scratch, "d.sock")
        self.config = os.path.join(scratch, "strata.toml")

    def run(self) -> dict[str, bool]:
        say("\n8. The host daemon and the strata command line")
        self._write_config()
        log = open(os.path.join(self.scratch, "serve.log"), "w")  # noqa: SIM115 (kept open)
        server = subprocess.Popen(
            [sys.executable, "-m", "strata_server.cli", "serve", "--config", self.config],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        checks: dict[str, bool] = {}
        try:
            up = self._wait_for_socket(server)
            checks["strata serve listens on its Unix socket"] = up
            if not up:
                return checks
            say("    $ strata repo list")
            self._show(self.strata("repo", "list"))
            say("    $ strata image create r1 32M --wait")
            made = self.strata("image", "create", "r1", "32M", "--wait", show=True)
            image = made.stdout.strip().split()[-1] if made.returncode == 0 else ""
            status = self.strata("--json", "image", "status", "r1", image)
            say(f"    $ strata --json image status r1 {image[:8]}...")
            self._show(status)
            try:
                fields = json.loads(status.stdout)
            except ValueError:
                fields = {}
            checks["a disk made through the daemon is optimized"] = (
                fields.get("status") == "optimized"
            )
            self.strata("image", "remove", "r1", image)
            gone = self.strata("image", "info", "r1", image)
            say(f"    $ strata image info r1 {image[:8]}...  (removed)")
            self._show(gone)
            checks["a typed error exits 1 and names its code"] = (
                gone.returncode == 1 and "image_not_found" in gone.stdout + gone.stderr
            )
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = server.wait()
            log.close()
        say(f"    SIGTERM: strata serve exited with status {code}")
        checks["strata serve stops cleanly on SIGTERM"] = code == 0
        return checks

    def strata(self, *args: str, show: bool = False) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "strata_server.cli", "--socket", self.socket, *args]
        if show:  # the progress bar draws on the terminal
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=120)
            say(f"    {done.stdout.strip()}")
            return done
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def _write_config(self) -> None:
        lines = [
            'host_id = "host-d"',
            f'state_dir = "{os.path.join(self.scratch, "host-d")}"',
            f'socket = "{self.socket}"',
        ]
        for repo, root in self.roots.items():
            lines += ["", "[[repositories]]", f'id = "{repo}"', 'format = "localfs-1.0"']
            lines.append(f'path = "{root}"')
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _wait_for_socket(self, server: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and server.poll() is None:
            if os.path.exists(self.socket):
                return True
            time.sleep(0.1)
        return False

    @staticmethod
    def _show(done: subprocess.CompletedProcess[str]) -> None:
        for line in (done.stdout + done.stderr).strip().splitlines()[:12]:
            say(f"      {line}")
