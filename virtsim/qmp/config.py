"""What an emulator is asked to be: plain classes, cheap to import.

``virtsim-qemu`` parses its command line into these before anything heavy is imported, so
a bare emulator can be listening (and greeting) a few milliseconds after exec.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~8 ms to import; virtsim-qemu starts without it
if TYPE_CHECKING:
    import socket
    from typing import Any

DEBIAN_VERSION: dict[str, Any] = {"qemu": {"major": 7, "minor": 2, "micro": 22},
                                  "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}


class MonitorSpec:
    """Where a QMP monitor listens: ``unix`` (path) or ``tcp`` (host, port).

    ``sock`` may hold an already listening socket and ``accepted`` a client connection
    that was already greeted (see ``virtsim.qmp.cli``'s early greeting).
    """

    def __init__(self, kind: str, path: str = "", host: str = "127.0.0.1", port: int = 0,
                 pretty: bool = False) -> None:
        self.kind = kind
        self.path = path
        self.host = host
        self.port = port
        self.pretty = pretty
        self.sock: socket.socket | None = None
        self.accepted: socket.socket | None = None
        self.label: str | None = None  # the -chardev id, when the monitor came from one

    def __repr__(self) -> str:
        where = self.path if self.kind == "unix" else f"{self.host}:{self.port}"
        return f"MonitorSpec({self.kind}:{where})"


class DeviceSpec:
    """A ``-device`` / ``device_add``: a simulated guest disk on a node or -drive."""

    def __init__(self, driver: str, id: str | None, drive: str | None,
                 props: dict[str, str] | None = None) -> None:
        self.driver = driver
        self.id = id
        self.drive = drive
        self.props = props if props is not None else {}


class AgentChannelSpec:
    """A ``virtserialport`` named ``org.qemu.guest_agent.0`` on a listening socket chardev:
    the host end of the simulated guest's QEMU Guest Agent."""

    def __init__(self, chardev: str, socket: MonitorSpec, port_id: str | None,
                 name: str = "org.qemu.guest_agent.0", arg: str = "") -> None:
        self.arg = arg  # the -chardev argument, for QEMU's error messages
        self.chardev = chardev
        self.socket = socket
        self.port_id = port_id
        self.name = name


class EmulatorConfig:
    """Everything the command line (or an embedding test) decides about an emulator."""

    def __init__(self, name: str | None = None, machine: str = "none",
                 start_paused: bool = False, version: dict[str, Any] | None = None,
                 monitors: list[MonitorSpec] | None = None,
                 blockdevs: list[dict[str, Any]] | None = None,
                 drives: list[dict[str, str]] | None = None,
                 devices: list[DeviceSpec] | None = None, seed: int | None = None,
                 echo_qemu_io: bool = True,
                 agent_channels: list[AgentChannelSpec] | None = None,
                 guest_agent: bool = True) -> None:
        self.name = name
        self.machine = machine
        self.start_paused = start_paused
        self.version = version if version is not None else {
            "qemu": dict(DEBIAN_VERSION["qemu"]), "package": DEBIAN_VERSION["package"]}
        self.monitors = monitors if monitors is not None else []
        self.blockdevs = blockdevs if blockdevs is not None else []
        self.drives = drives if drives is not None else []
        self.devices = devices if devices is not None else []
        self.seed = seed
        self.echo_qemu_io = echo_qemu_io  # print qemu-io output on stdout, as QEMU does
        self.agent_channels = agent_channels if agent_channels is not None else []
        # whether the simulated guest runs an agent that opens its port once the VM runs
        # (off: the channel exists but stays closed, like a real QEMU with no guest OS)
        self.guest_agent = guest_agent
