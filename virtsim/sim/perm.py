"""QEMU's block permission system, reduced to what decides conflicts and messages.

Every parent -> child edge takes some permissions on the child and shares some with others;
two edges conflict when one needs what the other refuses to share.  QEMU reports the
first conflicting pair with a fixed sentence that users' scripts match on, so the wording
and the order in which pairs are examined matter as much as the rule itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SimError

CONSISTENT_READ = 0x1
WRITE = 0x2
WRITE_UNCHANGED = 0x4
RESIZE = 0x8
ALL = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE

_NAMES = ((CONSISTENT_READ, "consistent read"), (WRITE, "write"),
          (WRITE_UNCHANGED, "write unchanged"), (RESIZE, "resize"))


def perm_names(perm: int) -> str:
    """QEMU's ``bdrv_perm_names``: the set as a comma-separated list."""
    return ", ".join(name for bit, name in _NAMES if perm & bit)


def perm_list(perm: int) -> list[str]:
    return [name for bit, name in _NAMES if perm & bit]


@dataclass
class EdgePerms:
    """What one parent asks of one child; ``who`` and ``role`` build QEMU's message."""

    perm: int
    shared: int
    who: str        # e.g. "node 'q1'", "block device '/machine/...'", "an unnamed block device"
    child_name: str  # node name of the child
    role: str       # child role: 'file', 'backing', 'root', ...

    def describe(self) -> str:
        return f"{self.who} (uses node '{self.child_name}' as '{self.role}' child)"


def check_conflicts(existing: list[EdgePerms], new: EdgePerms) -> None:
    """Raise QEMU's permission-conflict error if ``new`` cannot join ``existing`` parents.

    QEMU examines older parents against the newcomer first (older one requiring, new one
    unsharing), then the newcomer's own needs against each older parent.
    """
    for old in existing:
        clash = old.perm & ~new.shared
        if clash:
            raise SimError(_conflict(new.child_name, clash, old, new))
        clash = new.perm & ~old.shared
        if clash:
            raise SimError(_conflict(new.child_name, clash, new, old))


def _conflict(node: str, clash: int, requirer: EdgePerms, unsharer: EdgePerms) -> str:
    return (f"Permission conflict on node '{node}': permissions '{perm_names(clash)}' are both "
            f"required by {requirer.describe()} and unshared by {unsharer.describe()}.")
