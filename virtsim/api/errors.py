"""libvirt's error object and the exact error texts the backup/checkpoint API raises.

A libvirt error message is `<prefix for the code>: <detail>` (or the bare prefix when there is no
detail); the prefix table is libvirt 9.0's (src/util/virerror.c), checked against the strings in
Debian's libvirt.so.0. Backup tools match on these texts and on (code, domain), so both are part of
every template below. Templates carry the error domain of the libvirt source file that reports the
error in the qemu driver (the driver virtsim stands in for), not of the test driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from virtsim.api import constants as c

# (message without detail, message format with one %s for the detail), indexed by error code.
_PREFIXES: dict[int, tuple[str, str]] = {
    c.VIR_ERR_INTERNAL_ERROR: ("internal error", "internal error: %s"),
    c.VIR_ERR_NO_MEMORY: ("out of memory", "out of memory: %s"),
    c.VIR_ERR_NO_SUPPORT: (
        "this function is not supported by the connection driver",
        "this function is not supported by the connection driver: %s",
    ),
    c.VIR_ERR_UNKNOWN_HOST: ("unknown host", "unknown host %s"),
    c.VIR_ERR_NO_CONNECT: (
        "no connection driver available",
        "no connection driver available for %s",
    ),
    c.VIR_ERR_INVALID_CONN: ("invalid connection pointer in", "invalid connection pointer in %s"),
    c.VIR_ERR_INVALID_DOMAIN: ("invalid domain pointer in", "invalid domain pointer in %s"),
    c.VIR_ERR_INVALID_ARG: ("invalid argument", "invalid argument: %s"),
    c.VIR_ERR_OPERATION_FAILED: ("operation failed", "operation failed: %s"),
    c.VIR_ERR_GET_FAILED: ("GET operation failed", "GET operation failed: %s"),
    c.VIR_ERR_POST_FAILED: ("POST operation failed", "POST operation failed: %s"),
    c.VIR_ERR_HTTP_ERROR: ("got unknown HTTP error code", "got unknown HTTP error code %s"),
    c.VIR_ERR_SEXPR_SERIAL: ("failed to serialize S-Expr", "failed to serialize S-Expr: %s"),
    c.VIR_ERR_NO_XEN: (
        "could not use Xen hypervisor entry",
        "could not use Xen hypervisor entry %s",
    ),
    c.VIR_ERR_XEN_CALL: ("failed Xen syscall", "failed Xen syscall %s"),
    c.VIR_ERR_OS_TYPE: ("unknown OS type", "unknown OS type %s"),
    c.VIR_ERR_NO_KERNEL: ("missing kernel information", "missing kernel information: %s"),
    c.VIR_ERR_NO_ROOT: ("missing root device information", "missing root device information in %s"),
    c.VIR_ERR_NO_SOURCE: (
        "missing source information for device",
        "missing source information for device %s",
    ),
    c.VIR_ERR_NO_TARGET: (
        "missing target information for device",
        "missing target information for device %s",
    ),
    c.VIR_ERR_NO_NAME: ("missing name information", "missing name information in %s"),
    c.VIR_ERR_NO_OS: (
        "missing operating system information",
        "missing operating system information for %s",
    ),
    c.VIR_ERR_NO_DEVICE: ("missing devices information", "missing devices information for %s"),
    c.VIR_ERR_NO_XENSTORE: ("could not connect to Xen Store", "could not connect to Xen Store %s"),
    c.VIR_ERR_DRIVER_FULL: ("too many drivers registered", "too many drivers registered in %s"),
    c.VIR_ERR_CALL_FAILED: ("library call failed", "library call failed: %s"),
    c.VIR_ERR_XML_ERROR: ("XML description is invalid or not well formed", "XML error: %s"),
    c.VIR_ERR_DOM_EXIST: ("this domain exists already", "domain %s exists already"),
    c.VIR_ERR_OPERATION_DENIED: (
        "operation forbidden for read only access",
        "operation forbidden: %s",
    ),
    c.VIR_ERR_OPEN_FAILED: (
        "failed to open configuration file",
        "failed to open configuration file %s",
    ),
    c.VIR_ERR_READ_FAILED: (
        "failed to read configuration file",
        "failed to read configuration file %s",
    ),
    c.VIR_ERR_PARSE_FAILED: (
        "failed to parse configuration file",
        "failed to parse configuration file %s",
    ),
    c.VIR_ERR_CONF_SYNTAX: (
        "configuration file syntax error",
        "configuration file syntax error: %s",
    ),
    c.VIR_ERR_WRITE_FAILED: (
        "failed to write configuration file",
        "failed to write configuration file: %s",
    ),
    c.VIR_ERR_XML_DETAIL: ("parser error", "%s"),
    c.VIR_ERR_INVALID_NETWORK: ("invalid network pointer in", "invalid network pointer in %s"),
    c.VIR_ERR_NETWORK_EXIST: ("this network exists already", "network %s exists already"),
    c.VIR_ERR_SYSTEM_ERROR: ("system call error", "%s"),
    c.VIR_ERR_RPC: ("RPC error", "%s"),
    c.VIR_ERR_GNUTLS_ERROR: ("GNUTLS call error", "%s"),
    c.VIR_WAR_NO_NETWORK: ("Failed to find the network", "Failed to find the network: %s"),
    c.VIR_ERR_NO_DOMAIN: ("Domain not found", "Domain not found: %s"),
    c.VIR_ERR_NO_NETWORK: ("Network not found", "Network not found: %s"),
    c.VIR_ERR_INVALID_MAC: ("invalid MAC address", "invalid MAC address: %s"),
    c.VIR_ERR_AUTH_FAILED: ("authentication failed", "authentication failed: %s"),
    c.VIR_ERR_INVALID_STORAGE_POOL: (
        "invalid storage pool pointer in",
        "invalid storage pool pointer in %s",
    ),
    c.VIR_ERR_INVALID_STORAGE_VOL: (
        "invalid storage volume pointer in",
        "invalid storage volume pointer in %s",
    ),
    c.VIR_WAR_NO_STORAGE: (
        "Failed to find a storage driver",
        "Failed to find a storage driver: %s",
    ),
    c.VIR_ERR_NO_STORAGE_POOL: ("Storage pool not found", "Storage pool not found: %s"),
    c.VIR_ERR_NO_STORAGE_VOL: ("Storage volume not found", "Storage volume not found: %s"),
    c.VIR_WAR_NO_NODE: ("Failed to find a node driver", "Failed to find a node driver: %s"),
    c.VIR_ERR_INVALID_NODE_DEVICE: (
        "invalid node device pointer",
        "invalid node device pointer in %s",
    ),
    c.VIR_ERR_NO_NODE_DEVICE: ("Node device not found", "Node device not found: %s"),
    c.VIR_ERR_NO_SECURITY_MODEL: ("Security model not found", "Security model not found: %s"),
    c.VIR_ERR_OPERATION_INVALID: (
        "Requested operation is not valid",
        "Requested operation is not valid: %s",
    ),
    c.VIR_WAR_NO_INTERFACE: (
        "Failed to find the interface",
        "Failed to find the interface: %s",
    ),
    c.VIR_ERR_NO_INTERFACE: ("Interface not found", "Interface not found: %s"),
    c.VIR_ERR_INVALID_INTERFACE: (
        "invalid interface pointer in",
        "invalid interface pointer in %s",
    ),
    c.VIR_ERR_MULTIPLE_INTERFACES: (
        "multiple matching interfaces found",
        "multiple matching interfaces found: %s",
    ),
    c.VIR_WAR_NO_NWFILTER: (
        "Failed to start the nwfilter driver",
        "Failed to start the nwfilter driver: %s",
    ),
    c.VIR_ERR_INVALID_NWFILTER: ("Invalid network filter", "Invalid network filter: %s"),
    c.VIR_ERR_NO_NWFILTER: ("Network filter not found", "Network filter not found: %s"),
    c.VIR_ERR_BUILD_FIREWALL: (
        "Error while building firewall",
        "Error while building firewall: %s",
    ),
    c.VIR_WAR_NO_SECRET: (
        "Failed to find a secret storage driver",
        "Failed to find a secret storage driver: %s",
    ),
    c.VIR_ERR_INVALID_SECRET: ("Invalid secret", "Invalid secret: %s"),
    c.VIR_ERR_NO_SECRET: ("Secret not found", "Secret not found: %s"),
    c.VIR_ERR_CONFIG_UNSUPPORTED: ("unsupported configuration", "unsupported configuration: %s"),
    c.VIR_ERR_OPERATION_TIMEOUT: ("Timed out during operation", "Timed out during operation: %s"),
    c.VIR_ERR_MIGRATE_PERSIST_FAILED: (
        "Failed to make domain persistent after migration",
        "Failed to make domain persistent after migration: %s",
    ),
    c.VIR_ERR_HOOK_SCRIPT_FAILED: (
        "Hook script execution failed",
        "Hook script execution failed: %s",
    ),
    c.VIR_ERR_INVALID_DOMAIN_SNAPSHOT: ("Invalid domain snapshot", "Invalid domain snapshot: %s"),
    c.VIR_ERR_NO_DOMAIN_SNAPSHOT: ("Domain snapshot not found", "Domain snapshot not found: %s"),
    c.VIR_ERR_INVALID_STREAM: ("invalid stream pointer", "invalid stream pointer in %s"),
    c.VIR_ERR_ARGUMENT_UNSUPPORTED: ("argument unsupported", "argument unsupported: %s"),
    c.VIR_ERR_STORAGE_PROBE_FAILED: (
        "Storage pool probe failed",
        "Storage pool probe failed: %s",
    ),
    c.VIR_ERR_STORAGE_POOL_BUILT: (
        "Storage pool already built",
        "Storage pool already built: %s",
    ),
    c.VIR_ERR_SNAPSHOT_REVERT_RISKY: ("revert requires force", "revert requires force: %s"),
    c.VIR_ERR_OPERATION_ABORTED: ("operation aborted", "operation aborted: %s"),
    c.VIR_ERR_AUTH_CANCELLED: ("authentication cancelled", "authentication cancelled: %s"),
    c.VIR_ERR_NO_DOMAIN_METADATA: ("metadata not found", "metadata not found: %s"),
    c.VIR_ERR_MIGRATE_UNSAFE: ("Unsafe migration", "Unsafe migration: %s"),
    c.VIR_ERR_OVERFLOW: ("numerical overflow", "numerical overflow: %s"),
    c.VIR_ERR_BLOCK_COPY_ACTIVE: ("block copy still active", "block copy still active: %s"),
    c.VIR_ERR_OPERATION_UNSUPPORTED: ("Operation not supported", "Operation not supported: %s"),
    c.VIR_ERR_SSH: ("SSH transport error", "SSH transport error: %s"),
    c.VIR_ERR_AGENT_UNRESPONSIVE: (
        "Guest agent is not responding",
        "Guest agent is not responding: %s",
    ),
    c.VIR_ERR_RESOURCE_BUSY: ("resource busy", "resource busy: %s"),
    c.VIR_ERR_ACCESS_DENIED: ("access denied", "access denied: %s"),
    c.VIR_ERR_DBUS_SERVICE: ("error from service", "error from service: %s"),
    c.VIR_ERR_STORAGE_VOL_EXIST: (
        "this storage volume exists already",
        "storage volume %s exists already",
    ),
    c.VIR_ERR_CPU_INCOMPATIBLE: (
        "the CPU is incompatible with host CPU",
        "the CPU is incompatible with host CPU: %s",
    ),
    c.VIR_ERR_XML_INVALID_SCHEMA: (
        "XML document failed to validate against schema",
        "XML document failed to validate against schema: %s",
    ),
    c.VIR_ERR_MIGRATE_FINISH_OK: (
        "migration successfully aborted",
        "migration successfully aborted: %s",
    ),
    c.VIR_ERR_AUTH_UNAVAILABLE: (
        "authentication unavailable",
        "authentication unavailable: %s",
    ),
    c.VIR_ERR_NO_SERVER: ("Server not found", "Server not found: %s"),
    c.VIR_ERR_NO_CLIENT: ("Client not found", "Client not found: %s"),
    c.VIR_ERR_AGENT_UNSYNCED: (
        "guest agent replied with wrong id to guest-sync command",
        "guest agent replied with wrong id to guest-sync command: %s",
    ),
    c.VIR_ERR_LIBSSH: ("libssh transport error", "libssh transport error: %s"),
    c.VIR_ERR_DEVICE_MISSING: ("device not found", "device not found: %s"),
    c.VIR_ERR_INVALID_NWFILTER_BINDING: (
        "Invalid network filter binding",
        "Invalid network filter binding: %s",
    ),
    c.VIR_ERR_NO_NWFILTER_BINDING: (
        "Network filter binding not found",
        "Network filter binding not found: %s",
    ),
    c.VIR_ERR_INVALID_DOMAIN_CHECKPOINT: (
        "Invalid domain checkpoint",
        "Invalid domain checkpoint: %s",
    ),
    c.VIR_ERR_NO_DOMAIN_CHECKPOINT: (
        "Domain checkpoint not found",
        "Domain checkpoint not found: %s",
    ),
    c.VIR_ERR_NO_DOMAIN_BACKUP: (
        "Domain backup job id not found",
        "Domain backup job id not found: %s",
    ),
    c.VIR_ERR_INVALID_NETWORK_PORT: (
        "Invalid network port pointer",
        "Invalid network port pointer: %s",
    ),
    c.VIR_ERR_NETWORK_PORT_EXIST: (
        "this network port exists already",
        "network port %s exists already",
    ),
    c.VIR_ERR_NO_NETWORK_PORT: ("network port not found", "network port not found: %s"),
    c.VIR_ERR_NO_HOSTNAME: ("no hostname found", "no hostname found: %s"),
    c.VIR_ERR_CHECKPOINT_INCONSISTENT: (
        "checkpoint inconsistent",
        "checkpoint inconsistent: %s",
    ),
    c.VIR_ERR_MULTIPLE_DOMAINS: (
        "multiple matching domains found",
        "multiple matching domains found: %s",
    ),
}


class libvirtError(Exception):  # noqa: N801 - libvirt-python's spelling, so `except` clauses port
    """An API error shaped like libvirt-python's: `err` is libvirt's 9-tuple and str() the message.

    Callers of the real library inspect `get_error_code()`/`get_error_domain()` and sometimes the
    `err` tuple directly (code, domain, message, level, str1, str2, str3, int1, int2).
    """

    def __init__(
        self,
        code: int,
        domain: int,
        message: str,
        *,
        level: int = c.VIR_ERR_ERROR,
        str1: str | None = None,
        str2: str | None = None,
        str3: str | None = None,
        int1: int = -1,
        int2: int = -1,
    ) -> None:
        super().__init__(message)
        self.err: tuple[int, int, str, int, str | None, str | None, str | None, int, int] = (
            code,
            domain,
            message,
            level,
            str1,
            str2,
            str3,
            int1,
            int2,
        )

    def get_error_code(self) -> int:
        return self.err[0]

    def get_error_domain(self) -> int:
        return self.err[1]

    def get_error_message(self) -> str:
        return self.err[2]

    def get_error_level(self) -> int:
        return self.err[3]

    def get_str1(self) -> str | None:
        return self.err[4]

    def get_str2(self) -> str | None:
        return self.err[5]

    def get_str3(self) -> str | None:
        return self.err[6]

    def get_int1(self) -> int:
        return self.err[7]

    def get_int2(self) -> int:
        return self.err[8]

    def __repr__(self) -> str:
        return f"libvirtError(code={self.err[0]}, domain={self.err[1]}, message={self.err[2]!r})"


def make_error(code: int, domain: int, detail: str | None = None) -> libvirtError:
    """The error libvirt's virReportError(code, detail) produces: prefix + detail, str1/str2 set."""
    bare, with_detail = _PREFIXES[code]
    if detail:
        return libvirtError(code, domain, with_detail % detail, str1=with_detail, str2=detail)
    return libvirtError(code, domain, bare, str1=bare)


def _invalid_arg(function: str, argname: str, message: str) -> libvirtError:
    """virReportInvalidArg: INVALID_ARG *without* the "invalid argument: " prefix, int1/int2 = 0."""
    return libvirtError(
        c.VIR_ERR_INVALID_ARG,
        _domain_of_function(function),
        message,
        str1=function,
        str2=argname,
        int1=0,
        int2=0,
    )


def _domain_of_function(function: str) -> int:
    # Public entry points report from their own file's domain; driver functions from the qemu
    # driver's. Both matter: clients log the domain number.
    if function == "virDomainQemuMonitorCommand":   # libvirt-qemu.c reports from VIR_FROM_NONE
        return c.VIR_FROM_NONE
    if function.startswith("virDomainCheckpoint") or function == "virDomainListAllCheckpoints":
        return c.VIR_FROM_DOMAIN_CHECKPOINT
    if function.startswith("vir"):
        return c.VIR_FROM_DOMAIN
    return c.VIR_FROM_QEMU


def unsupported_flags(flags: int, function: str) -> libvirtError:
    """virCheckFlags: "unsupported flags (0x8) in function qemuDomainBackupBegin"."""
    return _invalid_arg(
        function, "flags", f"unsupported flags (0x{flags:x}) in function {function}"
    )


def exclusive_flags(first: str, second: str, function: str) -> libvirtError:
    """VIR_EXCLUSIVE_FLAGS_*: two flags given together that exclude each other."""
    return _invalid_arg(function, "ctl", f"Flags '{first}' and '{second}' are mutually exclusive")


def required_flag(required: str, by: str, function: str) -> libvirtError:
    """VIR_REQUIRE_FLAG_*: a flag given without the flag it depends on."""
    return _invalid_arg(function, "ctl", f"Flag '{required}' is required by flag '{by}'")


def read_only_denied(function: str) -> libvirtError:
    """Any mutating call on a read-only connection (virCheckReadOnlyGoto)."""
    return make_error(
        c.VIR_ERR_OPERATION_DENIED,
        _domain_of_function(function),
        f"read only access prevents {function}",
    )


def secure_denied(function: str) -> libvirtError:
    """A SECURE XML flag on a read-only connection."""
    return make_error(
        c.VIR_ERR_OPERATION_DENIED, _domain_of_function(function), f"{function} with secure flag"
    )


def no_support(function: str) -> libvirtError:
    """An API the connection's driver does not implement."""
    return make_error(c.VIR_ERR_NO_SUPPORT, c.VIR_FROM_DOMAIN, function)


@dataclass(frozen=True)
class ErrorTemplate:
    """One libvirt error site: code, reporting domain and the detail format (printf %s/%d)."""

    code: int
    domain: int
    detail: str | None

    def __call__(self, *args: object) -> libvirtError:
        detail = self.detail % args if self.detail is not None and args else self.detail
        return make_error(self.code, self.domain, detail)


Q = c.VIR_FROM_QEMU
DOM = c.VIR_FROM_DOMAIN
CHK = c.VIR_FROM_DOMAIN_CHECKPOINT

# --- domains and jobs (qemu_driver.c, domain_conf.c, virdomainjob.c)
NO_DOMAIN_BY_NAME = ErrorTemplate(c.VIR_ERR_NO_DOMAIN, Q, "no domain with matching name '%s'")
NO_DOMAIN_BY_UUID = ErrorTemplate(c.VIR_ERR_NO_DOMAIN, Q, "no domain with matching uuid '%s'")
NO_DOMAIN_BY_UUID_NAME = ErrorTemplate(
    c.VIR_ERR_NO_DOMAIN, Q, "no domain with matching uuid '%s' (%s)"
)
DOMAIN_EXISTS = ErrorTemplate(
    c.VIR_ERR_OPERATION_FAILED, DOM, "domain '%s' already exists with uuid %s"
)
DOMAIN_NOT_RUNNING = ErrorTemplate(c.VIR_ERR_OPERATION_INVALID, DOM, "domain is not running")
DOMAIN_ALREADY_RUNNING = ErrorTemplate(c.VIR_ERR_OPERATION_INVALID, Q, "domain is already running")
NO_ACTIVE_JOB = ErrorTemplate(c.VIR_ERR_OPERATION_INVALID, Q, "no job is active on the domain")
STATE_LOCK_TIMEOUT = ErrorTemplate(
    c.VIR_ERR_OPERATION_TIMEOUT, c.VIR_FROM_NONE, "cannot acquire state change lock"
)
STATE_LOCK_TIMEOUT_MONITOR = ErrorTemplate(
    c.VIR_ERR_OPERATION_TIMEOUT,
    c.VIR_FROM_NONE,
    "cannot acquire state change lock (held by monitor=%s)",
)

# --- backup (qemu_backup.c)
NO_DOMAIN_BACKUP = ErrorTemplate(c.VIR_ERR_NO_DOMAIN_BACKUP, Q, "no domain backup job present")
BACKUP_INACTIVE = ErrorTemplate(
    c.VIR_ERR_OPERATION_UNSUPPORTED, Q, "cannot perform disk backup for inactive domain"
)
BACKUP_ALREADY_RUNNING = ErrorTemplate(
    c.VIR_ERR_OPERATION_INVALID, Q, "another backup job is already running"
)
BACKUP_NO_DISKS_SELECTED = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, Q, "no disks selected for backup"
)
BACKUP_TCP_PORT_REQUIRED = ErrorTemplate(
    c.VIR_ERR_OPERATION_UNSUPPORTED, Q, "<domainbackup> must specify TCP port for now"
)
BACKUP_UNEXPECTED_TRANSPORT = ErrorTemplate(
    c.VIR_ERR_INTERNAL_ERROR, Q, "unexpected transport in <domainbackup>"
)
BACKUP_TLS_NOT_CONFIGURED = ErrorTemplate(
    c.VIR_ERR_OPERATION_INVALID, Q, "backup TLS directory not configured"
)
BACKUP_PULL_REQUIRES_QCOW2 = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, Q, "pull mode backup for disk '%s' requires qcow2 driver"
)
BACKUP_CHECKPOINT_NOT_FOUND = ErrorTemplate(
    c.VIR_ERR_NO_DOMAIN_CHECKPOINT,
    Q,
    "Checkpoint '%s' for incremental backup of disk '%s' not found",
)
BACKUP_BROKEN_BITMAP = ErrorTemplate(
    c.VIR_ERR_CHECKPOINT_INCONSISTENT, Q, "missing or broken bitmap '%s' for disk '%s'"
)
BACKUP_STORE_EXISTS = ErrorTemplate(
    c.VIR_ERR_INVALID_ARG, Q, "store '%s' for backup of '%s' exists"
)

# --- backup definition (backup_conf.c)
BACKUP_UNKNOWN_MODE = ErrorTemplate(c.VIR_ERR_CONFIG_UNSUPPORTED, DOM, "unknown backup mode '%s'")
BACKUP_SERVER_NEEDS_PULL = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, DOM, "use of <server> requires pull mode backup"
)
BACKUP_RDMA_UNSUPPORTED = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, DOM, "transport rdma is not supported for <server>"
)
BACKUP_SOCKET_NOT_ABSOLUTE = ErrorTemplate(
    c.VIR_ERR_XML_ERROR, DOM, "backup socket path '%s' must be absolute"
)
BACKUP_DISK_MISSING_NAME = ErrorTemplate(
    c.VIR_ERR_XML_ERROR, DOM, "missing name from disk backup element"
)
BACKUP_DISK_UNSUPPORTED_TYPE = ErrorTemplate(
    c.VIR_ERR_XML_ERROR, DOM, "unsupported disk backup type '%s'"
)
BACKUP_NO_DISKS = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, DOM, "domain must have at least one disk to perform backup"
)
BACKUP_NO_DISK_NAMED = ErrorTemplate(c.VIR_ERR_CONFIG_UNSUPPORTED, DOM, "no disk named '%s'")
BACKUP_DISK_TWICE = ErrorTemplate(c.VIR_ERR_CONFIG_UNSUPPORTED, DOM, "disk '%s' specified twice")
BACKUP_DISK_NO_MEDIA = ErrorTemplate(c.VIR_ERR_CONFIG_UNSUPPORTED, DOM, "disk '%s' has no media")
BACKUP_INCREMENTAL_NEEDS_CHECKPOINT = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED,
    DOM,
    "'incremental' backup mode of disk '%s' requires setting 'incremental' field for disk "
    "or backup",
)
BACKUP_CANNOT_NAME_STORE = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, DOM, "refusing to generate file name for disk '%s'"
)

# --- checkpoints (qemu_checkpoint.c, checkpoint_conf.c, virdomainmomentobjlist.c)
CHECKPOINT_NOT_FOUND = ErrorTemplate(
    c.VIR_ERR_NO_DOMAIN_CHECKPOINT, Q, "no domain checkpoint with matching name '%s'"
)
CHECKPOINT_NO_PARENT = ErrorTemplate(
    c.VIR_ERR_NO_DOMAIN_CHECKPOINT, Q, "checkpoint '%s' does not have a parent"
)
CHECKPOINT_CREATE_INACTIVE = ErrorTemplate(
    c.VIR_ERR_OPERATION_UNSUPPORTED, Q, "cannot create checkpoint for inactive domain"
)
CHECKPOINT_DELETE_INACTIVE = ErrorTemplate(
    c.VIR_ERR_OPERATION_UNSUPPORTED, Q, "cannot delete checkpoint for inactive domain"
)
CHECKPOINT_BITMAP_NOT_IN_CHAIN = ErrorTemplate(
    c.VIR_ERR_INTERNAL_ERROR, Q, "bitmap '%s' not found in backing chain of '%s'"
)
CHECKPOINT_MISSING_BITMAP_NAME = ErrorTemplate(
    c.VIR_ERR_INVALID_ARG, Q, "missing bitmap name for disk '%s' of checkpoint '%s'"
)
CHECKPOINT_BITMAP_NAME_MISMATCH = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, Q, "bitmap for disk '%s' must match checkpoint name '%s'"
)
CHECKPOINT_UNSUPPORTED_STORAGE = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, Q, "checkpoint for disk %s unsupported for storage type %s"
)
CHECKPOINT_EXISTS = ErrorTemplate(
    c.VIR_ERR_OPERATION_FAILED, DOM, "domain moment %s already exists"
)
CHECKPOINT_REDEFINE_NEEDS_NAME = ErrorTemplate(
    c.VIR_ERR_XML_ERROR, CHK, "a redefined checkpoint must have a name"
)
CHECKPOINT_REDEFINE_NEEDS_TIME = ErrorTemplate(
    c.VIR_ERR_INTERNAL_ERROR, CHK, "missing creationTime from existing checkpoint"
)
CHECKPOINT_REDEFINE_UUID = ErrorTemplate(
    c.VIR_ERR_INVALID_ARG, CHK, "definition for checkpoint %s must use uuid %s"
)
CHECKPOINT_MISSING_DOMAIN = ErrorTemplate(
    c.VIR_ERR_INTERNAL_ERROR, CHK, "missing domain in checkpoint"
)
CHECKPOINT_TOO_MANY_DISKS = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, CHK, "too many disk checkpoint requests for domain"
)
CHECKPOINT_NO_DISKS = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, CHK, "domain must have at least one disk to perform checkpoints"
)
CHECKPOINT_NO_DISK_NAMED = ErrorTemplate(c.VIR_ERR_CONFIG_UNSUPPORTED, CHK, "no disk named '%s'")
CHECKPOINT_DISK_TWICE = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, CHK, "disk '%s' specified twice"
)
CHECKPOINT_DISK_EMPTY_OR_RO = ErrorTemplate(
    c.VIR_ERR_CONFIG_UNSUPPORTED, CHK, "disk '%s' is empty or readonly"
)

# --- XML (virxml.c): the parse-error text itself is built by virtsim.api.xml.safe
XML_ROOT_MISMATCH = ErrorTemplate(
    c.VIR_ERR_XML_ERROR, c.VIR_FROM_XML, "expecting root element of '%s', not '%s'"
)
XML_MISSING_ROOT = ErrorTemplate(c.VIR_ERR_XML_ERROR, c.VIR_FROM_XML, "missing root element")


def xml_detail(domain: int, text: str) -> libvirtError:
    """A well-formedness error (VIR_ERR_XML_DETAIL): the text is the whole message, no prefix."""
    return make_error(c.VIR_ERR_XML_DETAIL, domain, text)


def xml_invalid_schema(schema_path: str, problems: list[str]) -> libvirtError:
    """RNG validation failure: libvirt lists libxml2's messages, one per line, newline-ended."""
    detail = f"Unable to validate doc against {schema_path}\n" + "".join(f"{p}\n" for p in problems)
    return make_error(c.VIR_ERR_XML_INVALID_SCHEMA, c.VIR_FROM_XML, detail)
