"""What ``virtsim:///session?statedir=DIR`` keeps on disk, the way libvirtd keeps its
config and status directories.

Layout (directories 0700, files 0600; written to a temporary name, fsynced, renamed, so
a process killed mid-write never leaves a half file behind):

    DIR/domains/NAME.xml              the persistent definition (secure form)
    DIR/checkpoints/NAME/CHK.xml      one file per checkpoint (redefine form, secure)
    DIR/checkpoints/NAME/current      the current checkpoint's name, if any
    DIR/run/NAME.pid                  pid of the domain's emulator process while it runs

On reopen the definitions and checkpoint metadata come back; an emulator left running
by a dead API process is ended (SIGTERM, so it stores its persistent bitmaps), and the
domain is shut off.  Bitmaps an emulator could not store (it was SIGKILLed) stay marked
in-use in the qcow2 image; libvirt then calls the checkpoint inconsistent, and so do we.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time


class StateDir:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        for sub in ("", "domains", "checkpoints", "run"):
            d = os.path.join(self.path, sub)
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)

    # ----- files -----------------------------------------------------------------------
    @staticmethod
    def _write(path: str, text: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @staticmethod
    def _read(path: str) -> str | None:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    # ----- domains ---------------------------------------------------------------------
    def save_domain(self, name: str, xml: str) -> None:
        self._write(os.path.join(self.path, "domains", f"{name}.xml"), xml)

    def remove_domain(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, "domains", f"{name}.xml"))
        cdir = os.path.join(self.path, "checkpoints", name)
        if os.path.isdir(cdir):
            for f in os.listdir(cdir):
                os.unlink(os.path.join(cdir, f))
            os.rmdir(cdir)

    def domains(self) -> list[tuple[str, str]]:
        ddir = os.path.join(self.path, "domains")
        out = []
        for f in sorted(os.listdir(ddir)):
            if f.endswith(".xml"):
                text = self._read(os.path.join(ddir, f))
                if text is not None:
                    out.append((f[:-4], text))
        return out

    # ----- checkpoints -------------------------------------------------------------------
    def _cdir(self, dom: str) -> str:
        d = os.path.join(self.path, "checkpoints", dom)
        os.makedirs(d, mode=0o700, exist_ok=True)
        return d

    def save_checkpoint(self, dom: str, name: str, xml: str) -> None:
        self._write(os.path.join(self._cdir(dom), f"{name}.xml"), xml)

    def remove_checkpoint(self, dom: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._cdir(dom), f"{name}.xml"))

    def save_current(self, dom: str, name: str | None) -> None:
        path = os.path.join(self._cdir(dom), "current")
        if name is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            self._write(path, name)

    def checkpoints(self, dom: str) -> tuple[list[str], str | None]:
        """The checkpoint XML documents of ``dom`` (oldest first) and the current name."""
        d = self._cdir(dom)
        files = [f for f in os.listdir(d) if f.endswith(".xml")]
        files.sort(key=lambda f: os.stat(os.path.join(d, f)).st_mtime_ns)
        docs = [t for f in files if (t := self._read(os.path.join(d, f))) is not None]
        cur = self._read(os.path.join(d, "current"))
        return docs, (cur.strip() if cur else None)

    # ----- running emulators ---------------------------------------------------------------
    def save_pid(self, dom: str, pid: int | None) -> None:
        path = os.path.join(self.path, "run", f"{dom}.pid")
        if pid is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            self._write(path, str(pid))

    def reap_stale(self, dom: str, timeout: float = 5.0) -> bool:
        """End an emulator a previous API process left running; True if there was one."""
        path = os.path.join(self.path, "run", f"{dom}.pid")
        text = self._read(path)
        if not text:
            return False
        try:
            pid = int(text)
        except ValueError:
            pid = 0
        found = False
        if pid > 0 and _is_emulator(pid):
            found = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.01)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _is_emulator(pid: int) -> bool:
    """Only ever signal a process that is one of our emulators (pids get reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(b"virtsim-qemu" in a or b"qemu-system" in a for a in argv[:2])
