"""QAPI argument validation: recorded QEMU 7.2 texts, plus differential runs on the real binary.

The CASES table holds texts observed on QEMU 7.2.22 (Debian 12).  Without QEMU the table is
checked against ``validate`` alone; with QEMU every case is also replayed on the binary, and
generated probes (every integer member, every alternate, several unknown keys at once) plus a
structural comparison with ``query-qmp-schema`` keep the definitions honest.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from virtsim.qmp import schema
from virtsim.qmp.schema import GHashTableModel, QapiType
from virtsim.sim.errors import SimError

QEMU = shutil.which("qemu-system-x86_64")

# (command, arguments, QEMU's error text, or None when the arguments pass QAPI validation)
CASES: list[tuple[str, dict[str, Any], str | None]] = [
    # --- commands without arguments, and the misc family
    ("query-status", {"x": 1}, "Parameter 'x' is unexpected"),
    ("query-chardev", {"x": 1}, "Parameter 'x' is unexpected"),
    ("query-version", {"verbose": True}, "Parameter 'verbose' is unexpected"),
    ("query-block", {"x": None}, "Parameter 'x' is unexpected"),
    ("query-jobs", {"all": 1}, "Parameter 'all' is unexpected"),
    ("query-block-jobs", {"a": 1}, "Parameter 'a' is unexpected"),
    ("query-block-exports", {"a": 1}, "Parameter 'a' is unexpected"),
    ("query-named-block-nodes", {"flat": "yes"},
     "Invalid parameter type for 'flat', expected: boolean"),
    ("query-named-block-nodes", {"flat": 1},
     "Invalid parameter type for 'flat', expected: boolean"),
    ("stop", {"now": True}, "Parameter 'now' is unexpected"),
    ("human-monitor-command", {}, "Parameter 'command-line' is missing"),
    ("human-monitor-command", {"command-line": 5},
     "Invalid parameter type for 'command-line', expected: string"),
    ("human-monitor-command", {"command-line": "info version", "cpu-index": "0"},
     "Invalid parameter type for 'cpu-index', expected: integer"),
    ("human-monitor-command", {"command-line": "info version", "cpu-index": 1.0},
     "Invalid parameter type for 'cpu-index', expected: integer"),
    ("qom-get", {"path": "/"}, "Parameter 'property' is missing"),
    ("qom-get", {"property": "type"}, "Parameter 'path' is missing"),
    ("qom-set", {"path": "/", "property": "x"}, "Parameter 'value' is missing"),
    ("qom-set", {"path": "/nosuch", "property": "x", "value": None}, None),
    ("qom-list", {"path": ["/"]}, "Invalid parameter type for 'path', expected: string"),
    ("object-add", {}, "Parameter 'qom-type' is missing"),
    ("object-add", {"qom-type": "secret"}, "Parameter 'id' is missing"),
    ("object-add", {"qom-type": "foo", "id": "s"},
     "Parameter 'qom-type' does not accept value 'foo'"),
    ("object-add", {"qom-type": "secret", "id": "s", "format": "x"},
     "Parameter 'format' does not accept value 'x'"),
    ("object-add", {"qom-type": "secret", "id": "s", "data": 5},
     "Invalid parameter type for 'data', expected: string"),
    ("object-add", {"qom-type": "tls-creds-x509", "id": "t", "endpoint": "both"},
     "Parameter 'endpoint' does not accept value 'both'"),
    ("object-add", {"qom-type": "tls-creds-psk", "id": "t", "sanity-check": True},
     "Parameter 'sanity-check' is unexpected"),
    ("object-add", {"qom-type": "can-bus", "id": "s", "x": 1}, "Parameter 'x' is unexpected"),
    ("object-add", {"qom-type": "secret_keyring", "id": "k", "serial": 1 << 31},
     "Parameter 'serial' expects int32_t"),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "m", "size": 1,
                    "host-nodes": [70000]}, "Parameter 'null' expects uint16_t"),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "m", "size": 1,
                    "host-nodes": ["0"]}, "Parameter 'host-nodes[0]' expects uint64"),
    ("object-del", {"id": 1}, "Invalid parameter type for 'id', expected: string"),
    ("device_add", {}, "Parameter 'driver' is missing"),
    ("device_del", {}, "Parameter 'id' is missing"),
    ("device_del", {"id": 5}, "Invalid parameter type for 'id', expected: string"),
    ("migrate-pause", {"x": 1}, "Parameter 'x' is unexpected"),
    ("device_add", {"driver": "nosuch-device", "whatever": 1}, None),
    # --- blockdev-add: flat union on 'driver', nested BlockdevRef alternates
    ("blockdev-add", {}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": "foo"}, "Parameter 'driver' does not accept value 'foo'"),
    ("blockdev-add", {"driver": 5}, "Invalid parameter type for 'driver', expected: string"),
    ("blockdev-add", {"driver": None}, "Invalid parameter type for 'driver', expected: string"),
    ("blockdev-add", {"driver": "file"}, "Parameter 'filename' is missing"),
    ("blockdev-add", {"driver": "file", "filename": None},
     "Invalid parameter type for 'filename', expected: string"),
    ("blockdev-add", {"driver": "file", "filename": "/x", "node-name": None},
     "Invalid parameter type for 'node-name', expected: string"),
    ("blockdev-add", {"driver": "file", "filename": "/nonexistent/virtsim", "aio": "posix"},
     "Parameter 'aio' does not accept value 'posix'"),
    ("blockdev-add", {"driver": "qcow2", "file": 5},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "file"}},
     "Parameter 'file.filename' is missing"),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "raw", "file": 7}},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "qcow2",
                                                  "file": {"driver": "file"}}},
     "Parameter 'file.file.filename' is missing"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "backing": 5},
     "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "backing": {
        "driver": "qcow2", "file": {"driver": "file", "filename": 3}}},
     "Invalid parameter type for 'backing.file.filename', expected: string"),
    ("blockdev-add", {"driver": "raw", "file": "x", "backing": None},
     "Parameter 'backing' is unexpected"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": "foo"},
     "Parameter 'overlap-check' does not accept value 'foo'"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": {"template": "foo"}},
     "Parameter 'template' does not accept value 'foo'"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": {"a": 1}},
     "Parameter 'overlap-check.a' is unexpected"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": 1},
     "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "encrypt": {}},
     "Parameter 'encrypt.format' is missing"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "encrypt": {"format": "luks", "x": 1}},
     "Parameter 'encrypt.x' is unexpected"),
    ("blockdev-add", {"driver": "null-co", "cache": {"direct": 1}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ("blockdev-add", {"driver": "null-co", "cache": 5},
     "Invalid parameter type for 'cache', expected: object"),
    ("blockdev-add", {"driver": "null-co", "size": 1.0},
     "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", {"driver": "null-co", "size": "1"},
     "Invalid parameter type for 'size', expected: integer"),
    ("blockdev-add", {"driver": "null-co", "latency-ns": -(1 << 63) - 1},
     "Parameter 'latency-ns' expects uint64"),
    ("blockdev-add", {"driver": "null-co", "detect-zeroes": "yes"},
     "Parameter 'detect-zeroes' does not accept value 'yes'"),
    ("blockdev-add", {"driver": "null-co", "filename": "x"},
     "Parameter 'filename' is unexpected"),
    ("blockdev-add", {"driver": "blkdebug", "image": "x", "take-child-perms": ["foo"]},
     "Parameter 'null' does not accept value 'foo'"),
    ("blockdev-add", {"driver": "blkdebug", "image": "x", "take-child-perms": [5]},
     "Invalid parameter type for 'take-child-perms[0]', expected: string"),
    ("blockdev-add", {"driver": "blkdebug", "image": "x", "inject-error": [{}]},
     "Parameter 'inject-error[0].event' is missing"),
    ("blockdev-add", {"driver": "blkdebug", "image": "x", "inject-error": [{"event": "foo"}]},
     "Parameter 'event' does not accept value 'foo'"),
    ("blockdev-add", {"driver": "blkdebug", "image": "x", "max-transfer": 1 << 31},
     "Parameter 'max-transfer' expects int32_t"),
    ("blockdev-add", {"driver": "nbd", "server": {"type": "inet", "host": "x"}},
     "Parameter 'server.port' is missing"),
    ("blockdev-add", {"driver": "nbd", "server": {"type": "inet", "host": "x", "port": 1}},
     "Invalid parameter type for 'server.port', expected: string"),
    ("blockdev-add", {"driver": "nbd", "server": {"type": "inet", "host": "x", "port": "1",
                                                  "to": 70000}},
     "Parameter 'to' expects uint16_t"),
    ("blockdev-add", {"driver": "nbd", "server": {"type": "unix", "path": "x"},
                      "reconnect-delay": -1}, "Parameter 'reconnect-delay' expects uint32_t"),
    ("blockdev-add", {"driver": "copy-before-write", "file": "a"},
     "Parameter 'target' is missing"),
    ("blockdev-add", {"driver": "copy-before-write", "file": "a", "target": "b",
                      "bitmap": {"node": "a"}}, "Parameter 'bitmap.name' is missing"),
    ("blockdev-add", {"driver": "copy-before-write", "file": "a", "target": "b",
                      "on-cbw-error": "ignore"},
     "Parameter 'on-cbw-error' does not accept value 'ignore'"),
    ("blockdev-add", {"driver": "copy-before-write", "file": "a", "target": "b",
                      "cbw-timeout": -1}, "Parameter 'cbw-timeout' expects uint32_t"),
    ("blockdev-add", {"driver": "snapshot-access"}, "Parameter 'file' is missing"),
    ("blockdev-add", {"driver": "throttle", "file": "x"},
     "Parameter 'throttle-group' is missing"),
    ("blockdev-add", {"driver": "vvfat"}, "Parameter 'dir' is missing"),
    ("blockdev-add", {"driver": "null-co", "node-name": "virtsim-null"}, None),
    ("blockdev-del", {}, "Parameter 'node-name' is missing"),
    ("blockdev-del", {"node-name": "nosuch"}, None),
    # --- blockdev-create
    ("blockdev-create", {"job-id": "j"}, "Parameter 'options' is missing"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "x"}},
     "Parameter 'options.size' is missing"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "x",
                                                    "size": -(1 << 63) - 1}},
     "Parameter 'options.size' expects uint64"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "x",
                                                    "size": 0, "version": "v4"}},
     "Parameter 'version' does not accept value 'v4'"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x",
                                                    "size": 0, "preallocation": "lots"}},
     "Parameter 'preallocation' does not accept value 'lots'"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "raw"}}, None),
    # --- dirty bitmaps
    ("block-dirty-bitmap-add", {"node": "a", "x": 1}, "Parameter 'name' is missing"),
    ("block-dirty-bitmap-add", {"node": "a", "name": "b", "granularity": -1},
     "Parameter 'granularity' expects uint32_t"),
    ("block-dirty-bitmap-add", {"node": "a", "name": "b", "granularity": 1 << 32},
     "Parameter 'granularity' expects uint32_t"),
    ("block-dirty-bitmap-add", {"node": "a", "name": "b", "granularity": "x"},
     "Parameter 'granularity' expects uint64"),
    ("block-dirty-bitmap-add", {"node": "a", "name": "b", "granularity": 1.5},
     "Parameter 'granularity' expects uint64"),
    ("block-dirty-bitmap-add", {"node": "a", "name": "b", "granularity": True},
     "Parameter 'granularity' expects uint64"),
    ("block-dirty-bitmap-add", {"node": "a", "name": "b", "granularity": 1 << 64},
     "Parameter 'granularity' expects uint64"),
    ("block-dirty-bitmap-add", {"node": "a", "name": "b", "granularity": None},
     "Parameter 'granularity' expects uint64"),
    ("block-dirty-bitmap-add", {"node": "a", "name": "b", "persistent": 1},
     "Invalid parameter type for 'persistent', expected: boolean"),
    ("block-dirty-bitmap-add", {"node": "a", "name": "b", "x": 1, "y": 2, "persistent": 1},
     "Invalid parameter type for 'persistent', expected: boolean"),
    ("block-dirty-bitmap-add", {"node": "nosuch", "name": "b", "granularity": 65536}, None),
    ("block-dirty-bitmap-add", {"node": "nosuch", "name": "b", "granularity": -(1 << 32)},
     "Parameter 'granularity' expects uint32_t"),
    ("block-dirty-bitmap-remove", {"node": "a"}, "Parameter 'name' is missing"),
    ("block-dirty-bitmap-clear", {"name": "b"}, "Parameter 'node' is missing"),
    ("block-dirty-bitmap-enable", {"node": "a", "name": "b", "c": 1},
     "Parameter 'c' is unexpected"),
    ("block-dirty-bitmap-disable", {"node": ["a"], "name": "b"},
     "Invalid parameter type for 'node', expected: string"),
    ("block-dirty-bitmap-merge", {"node": "a", "target": "b", "bitmaps": [1]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("block-dirty-bitmap-merge", {"node": "a", "target": "b", "bitmaps": ["x", {"node": "a"}]},
     "Parameter 'bitmaps[1].name' is missing"),
    ("block-dirty-bitmap-merge", {"node": "a", "target": "b",
                                  "bitmaps": ["x", {"node": "a", "name": "q", "z": 1}]},
     "Parameter 'bitmaps[1].z' is unexpected"),
    ("block-dirty-bitmap-merge", {"node": "a", "target": "b", "bitmaps": "x"},
     "Invalid parameter type for 'bitmaps', expected: array"),
    ("block-dirty-bitmap-merge", {"node": "a", "target": "b"},
     "Parameter 'bitmaps' is missing"),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "a", "name": 1},
     "Invalid parameter type for 'name', expected: string"),
    # --- transaction
    ("transaction", {}, "Parameter 'actions' is missing"),
    ("transaction", {"actions": {}}, "Invalid parameter type for 'actions', expected: array"),
    ("transaction", {"actions": [5]},
     "Invalid parameter type for 'actions[0]', expected: object"),
    ("transaction", {"actions": [{"data": {}}]}, "Parameter 'actions[0].type' is missing"),
    ("transaction", {"actions": [{"type": 5}]},
     "Invalid parameter type for 'actions[0].type', expected: string"),
    ("transaction", {"actions": [{"type": "foo"}]},
     "Parameter 'type' does not accept value 'foo'"),
    ("transaction", {"actions": [{"type": "abort"}, {"type": "block-dirty-bitmap-add"}]},
     "Parameter 'actions[0].data' is missing"),
    ("transaction", {"actions": [{"type": "abort", "data": {}},
                                 {"type": "block-dirty-bitmap-add"}]},
     "Parameter 'actions[1].data' is missing"),
    ("transaction", {"actions": [{"type": "abort", "data": 5}]},
     "Invalid parameter type for 'actions[0].data', expected: object"),
    ("transaction", {"actions": [{"type": "abort", "data": {"x": 1}}]},
     "Parameter 'actions[0].data.x' is unexpected"),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "x"}}]},
     "Parameter 'actions[0].data.name' is missing"),
    ("transaction", {"actions": [{"type": "blockdev-backup", "data": {
        "device": "a", "target": "b", "sync": "full", "speed": "fast"}}]},
     "Invalid parameter type for 'actions[0].data.speed', expected: integer"),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-merge", "data": {
        "node": "a", "target": "b", "bitmaps": [None]}}]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("transaction", {"actions": [{"type": "abort", "data": {}, "extra": 1}]},
     "Parameter 'actions[0].extra' is unexpected"),
    ("transaction", {"actions": [], "properties": 5},
     "Invalid parameter type for 'properties', expected: object"),
    ("transaction", {"actions": [{"type": "abort", "data": {}}],
                     "properties": {"completion-mode": "x"}},
     "Parameter 'completion-mode' does not accept value 'x'"),
    ("transaction", {"actions": []}, None),
    # --- backup and jobs
    ("blockdev-backup", {"device": "a", "target": "b"}, "Parameter 'sync' is missing"),
    ("blockdev-backup", {"device": "a", "target": "b", "sync": "foo"},
     "Parameter 'sync' does not accept value 'foo'"),
    ("blockdev-backup", {"device": "a", "target": "b", "sync": 5},
     "Invalid parameter type for 'sync', expected: string"),
    ("blockdev-backup", {"device": "a", "sync": "full"}, "Parameter 'target' is missing"),
    ("blockdev-backup", {"device": "a", "target": "b", "sync": "full", "speed": 1 << 63},
     "Invalid parameter type for 'speed', expected: integer"),
    ("blockdev-backup", {"device": "a", "target": "b", "sync": "full", "bitmap-mode": "x"},
     "Parameter 'bitmap-mode' does not accept value 'x'"),
    ("blockdev-backup", {"device": "a", "target": "b", "sync": "full",
                         "on-target-error": "retry"},
     "Parameter 'on-target-error' does not accept value 'retry'"),
    ("blockdev-backup", {"device": "a", "target": "b", "sync": "full",
                         "x-perf": {"max-chunk": "x"}},
     "Invalid parameter type for 'x-perf.max-chunk', expected: integer"),
    ("blockdev-backup", {"device": "a", "target": "b", "sync": "full",
                         "x-perf": {"workers": 1}}, "Parameter 'x-perf.workers' is unexpected"),
    ("blockdev-backup", {"device": "nosuch", "target": "b", "sync": "full", "speed": -5},
     None),
    ("drive-backup", {"device": "a", "target": "b", "sync": "full", "mode": "new"},
     "Parameter 'mode' does not accept value 'new'"),
    ("drive-backup", {"device": "a", "sync": "full", "format": 1},
     "Parameter 'target' is missing"),
    ("job-pause", {}, "Parameter 'id' is missing"),
    ("job-resume", {"id": 1}, "Invalid parameter type for 'id', expected: string"),
    ("job-cancel", {"id": "j", "force": True}, "Parameter 'force' is unexpected"),
    ("job-complete", {"device": "j"}, "Parameter 'id' is missing"),
    ("job-finalize", {"id": None}, "Invalid parameter type for 'id', expected: string"),
    ("job-dismiss", {"id": "nosuch"}, None),
    ("block-job-pause", {"id": "j"}, "Parameter 'device' is missing"),
    ("block-job-resume", {"device": 0}, "Invalid parameter type for 'device', expected: string"),
    ("block-job-cancel", {"device": "j", "force": "yes"},
     "Invalid parameter type for 'force', expected: boolean"),
    ("block-job-complete", {"device": "j", "x": 1}, "Parameter 'x' is unexpected"),
    ("block-job-finalize", {"device": "j"}, "Parameter 'id' is missing"),
    ("block-job-dismiss", {}, "Parameter 'id' is missing"),
    ("block-job-set-speed", {"device": "j"}, "Parameter 'speed' is missing"),
    ("block-job-set-speed", {"device": "j", "speed": 1.5},
     "Invalid parameter type for 'speed', expected: integer"),
    ("block-job-set-speed", {"device": "nosuch", "speed": -1}, None),
    # --- NBD server and exports
    ("nbd-server-start", {}, "Parameter 'addr' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix"}}, "Parameter 'addr.data' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix", "path": "/x"}},
     "Parameter 'addr.data' is missing"),
    ("nbd-server-start", {"addr": {"type": "tcp", "data": {}}},
     "Parameter 'type' does not accept value 'tcp'"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": 5}}},
     "Invalid parameter type for 'addr.data.path', expected: string"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/tmp/x", "q": 5}}},
     "Parameter 'addr.data.q' is unexpected"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": "1",
                                                            "to": -1}}},
     "Parameter 'to' expects uint16_t"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x"}},
                          "max-connections": -1},
     "Parameter 'max-connections' expects uint32_t"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x"}},
                          "tls-creds": 1},
     "Invalid parameter type for 'tls-creds', expected: string"),
    ("nbd-server-stop", {"force": True}, "Parameter 'force' is unexpected"),
    ("block-export-add", {}, "Parameter 'type' is missing"),
    ("block-export-add", {"type": "nbd"}, "Parameter 'id' is missing"),
    ("block-export-add", {"type": "nbd", "id": "e"}, "Parameter 'node-name' is missing"),
    ("block-export-add", {"type": "iscsi", "id": "e", "node-name": "n"},
     "Parameter 'type' does not accept value 'iscsi'"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [5]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                          "bitmaps": [{"name": "b"}]}, "Parameter 'bitmaps[0].node' is missing"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmap": "b"},
     "Parameter 'bitmap' is unexpected"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "writable": "true"},
     "Invalid parameter type for 'writable', expected: boolean"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                          "allocation-depth": 1},
     "Invalid parameter type for 'allocation-depth', expected: boolean"),
    ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n"},
     "Parameter 'mountpoint' is missing"),
    ("block-export-del", {"id": "e", "mode": "soft"},
     "Parameter 'mode' does not accept value 'soft'"),
    ("block-export-del", {"mode": "hard"}, "Parameter 'id' is missing"),
    ("nbd-server-add", {}, "Parameter 'device' is missing"),
    ("nbd-server-add", {"device": "d", "bitmaps": ["b"]}, "Parameter 'bitmaps' is unexpected"),
    ("nbd-server-add", {"device": "d", "name": 5},
     "Invalid parameter type for 'name', expected: string"),
    ("nbd-server-remove", {"name": "e", "mode": 1},
     "Invalid parameter type for 'mode', expected: string"),
    ("nbd-server-remove", {"name": "nosuch"}, None),
    # --- several unknown keys: the one named follows GLib's hash-table order
    ("block-dirty-bitmap-add", {"node": "a", "name": "b", "x": 1, "y": 2},
     "Parameter 'y' is unexpected"),
    ("query-status", {"alpha": 1, "beta": 2, "gamma": 3}, "Parameter 'beta' is unexpected"),
]

_QAPI_ERROR = re.compile(
    r"^(Parameter '.*' (is missing|is unexpected|expects .*|does not accept value '.*')"
    r"|Invalid parameter type for '.*', expected: .*)$")


def _error_of(command: str, args: dict[str, Any]) -> str | None:
    try:
        schema.validate(command, copy.deepcopy(args))
    except SimError as e:
        assert e.error_class == "GenericError"
        return e.desc
    return None


# ----------------------------------------------------------------------------------------
# without QEMU
# ----------------------------------------------------------------------------------------
# virtsim's own extensions (x-virtsim-*) have no counterpart in real QEMU
QEMU_COMMANDS = [c for c in schema.command_names() if not c.startswith("x-virtsim-")]


def test_case_table_is_large_and_covers_every_command() -> None:
    assert len(CASES) >= 60
    covered = {c for c, _, _ in CASES}
    wanted = {c for c in schema.command_names() if not c.startswith("x-virtsim-")} - {
        "qmp_capabilities", "query-commands", "query-name", "quit", "cont", "system_reset",
        "system_powerdown"}
    assert wanted <= covered, wanted - covered


@pytest.mark.parametrize(("command", "args", "expected"), CASES,
                         ids=[f"{i}-{c}" for i, (c, _, _) in enumerate(CASES)])
def test_validate_matches_recorded_qemu_text(command: str, args: dict[str, Any],
                                             expected: str | None) -> None:
    assert _error_of(command, args) == expected


def test_validate_returns_arguments_unchanged_without_defaults() -> None:
    args = {"device": "d", "target": "t", "sync": "full"}
    assert schema.validate("blockdev-backup", args) is args
    assert args == {"device": "d", "target": "t", "sync": "full"}
    assert schema.validate("query-status", {}) == {}
    assert schema.validate("query-status", None) == {}


def test_unknown_command_and_bad_arguments_object() -> None:
    with pytest.raises(SimError) as e:
        schema.validate("bogus", {})
    assert (e.value.error_class, e.value.desc) == (
        "CommandNotFound", "The command bogus has not been found")
    with pytest.raises(SimError, match="QMP input member 'arguments' must be an object"):
        schema.validate("query-status", [])  # type: ignore[arg-type]


def test_qmp_capabilities_arguments() -> None:
    # observed before negotiation (after it QEMU refuses the command before validating)
    assert _error_of("qmp_capabilities", {"enable": ["foo"]}) == \
        "Parameter 'null' does not accept value 'foo'"
    assert _error_of("qmp_capabilities", {"enable": ["oob"], "x": 1}) == \
        "Parameter 'x' is unexpected"
    assert _error_of("qmp_capabilities", {"enable": "oob"}) == \
        "Invalid parameter type for 'enable', expected: array"
    assert _error_of("qmp_capabilities", {"enable": ["oob"]}) is None


def test_command_table_flags() -> None:
    names = schema.command_names()
    assert len(names) == len(set(names))
    assert {"blockdev-add", "transaction", "nbd-server-start", "device_add"} <= set(names)
    assert all(schema.has_command(n) for n in names)
    assert not schema.has_command("bogus")
    assert [n for n in names if schema.allows_oob(n)] == ["migrate-pause"]
    # observed with --preconfig on QEMU 7.2
    for n in ("qmp_capabilities", "query-status", "quit", "blockdev-add", "qom-get",
              "block-dirty-bitmap-merge", "nbd-server-start", "block-job-cancel",
              "query-block-jobs", "blockdev-backup"):
        assert schema.allows_preconfig(n), n
    for n in ("stop", "cont", "system_reset", "human-monitor-command", "query-jobs",
              "device_add", "transaction", "job-dismiss", "bogus"):
        assert not schema.allows_preconfig(n), n
    assert schema.command_features("drive-backup") == ("deprecated",)
    assert schema.command_features("x-debug-block-dirty-bitmap-sha256") == ("unstable",)


def test_supported_driver_sets() -> None:
    drivers = set(schema.lookup_type("BlockdevDriver").values)  # type: ignore[attr-defined]
    assert schema.UNSUPPORTED_DRIVERS | schema.SUPPORTED_DRIVERS == drivers
    assert not schema.UNSUPPORTED_DRIVERS & schema.SUPPORTED_DRIVERS
    assert "vvfat" in schema.UNSUPPORTED_DRIVERS and "qcow2" not in schema.UNSUPPORTED_DRIVERS
    # unsupported drivers still validate their branch exactly, like QEMU
    assert _error_of("blockdev-add", {"driver": "vdi", "file": "x", "backing": "y"}) == \
        "Parameter 'backing' is unexpected"
    assert _error_of("blockdev-add", {"driver": "vdi", "file": "x"}) is None


def test_validate_type_for_command_line_and_nested_names() -> None:
    assert schema.validate_type("BlockdevOptions", {"driver": "null-co"}) == {"driver": "null-co"}
    with pytest.raises(SimError, match="^Parameter 'file.filename' is missing$"):
        schema.validate_type("BlockdevOptions", {"driver": "raw", "file": {"driver": "file"}})
    with pytest.raises(SimError, match=r"^Parameter 'file\.driver' is missing$"):
        schema.validate_type("BlockdevOptions", {}, "file")
    with pytest.raises(SimError, match="^Invalid parameter type for '<anonymous>', "
                                       "expected: object$"):
        schema.validate_type("BlockdevOptions", "x")
    with pytest.raises(SimError, match=r"^Parameter 'data' is missing$"):
        schema.validate_type("TransactionAction", {"type": "abort"})
    with pytest.raises(SimError, match=r"^Parameter 'acts\[1\]\.type' is missing$"):
        schema.validate_type("[TransactionAction]", [{"type": "abort", "data": {}}, {}], "acts")
    with pytest.raises(KeyError):
        schema.lookup_type("NoSuchType")


def test_integer_edges() -> None:
    base = {"node": "n", "name": "b"}
    for value, err in [(0, None), ((1 << 32) - 1, None),
                       (-1, "Parameter 'granularity' expects uint32_t"),
                       (-(1 << 63), "Parameter 'granularity' expects uint32_t"),
                       ((1 << 64) - 1, "Parameter 'granularity' expects uint32_t"),
                       (float("1e3"), "Parameter 'granularity' expects uint64")]:
        assert _error_of("block-dirty-bitmap-add", {**base, "granularity": value}) == err
    nul = {"driver": "null-co"}
    assert _error_of("blockdev-add", {**nul, "size": -(1 << 63)}) is None
    assert _error_of("blockdev-add", {**nul, "size": (1 << 63) - 1}) is None
    assert _error_of("blockdev-add", {**nul, "latency-ns": (1 << 64) - 1}) is None
    assert _error_of("blockdev-add", {**nul, "latency-ns": -1}) is None
    assert _error_of("blockdev-add", {**nul, "latency-ns": 1 << 64}) == \
        "Parameter 'latency-ns' expects uint64"
    assert _error_of("blockdev-add", {**nul, "read-zeroes": 0}) == \
        "Invalid parameter type for 'read-zeroes', expected: boolean"


def test_first_error_in_schema_order_wins() -> None:
    # members are visited in schema order: 'sync' (bad) precedes 'speed' (bad) precedes the
    # unknown key, whatever order the client wrote them in
    args = {"zzz": 1, "speed": "x", "sync": "bad", "device": "d", "target": "t"}
    assert _error_of("blockdev-backup", args) == "Parameter 'sync' does not accept value 'bad'"
    # a nested struct is checked completely (unknown keys included) before later members
    args = {"driver": "qcow2", "file": {"driver": "file", "filename": "f", "zz": 1},
            "lazy-refcounts": "x"}
    assert _error_of("blockdev-add", args) == "Parameter 'file.zz' is unexpected"
    # a missing required member is found before an unknown key
    assert _error_of("block-dirty-bitmap-add", {"node": "n", "q": 1}) == \
        "Parameter 'name' is missing"


def _libglib() -> Any:
    name = ctypes.util.find_library("glib-2.0")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def test_ghash_model_matches_installed_glib() -> None:
    """The hash-table model against the real GLib, if it is installed (QEMU's own copy)."""
    g = _libglib()
    if g is None:
        pytest.skip("libglib-2.0 not installed")
    g.g_hash_table_new.restype = ctypes.c_void_p
    g.g_hash_table_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    g.g_hash_table_insert.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    g.g_hash_table_remove.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    g.g_hash_table_get_keys.restype = ctypes.c_void_p
    g.g_hash_table_get_keys.argtypes = [ctypes.c_void_p]
    g.g_hash_table_unref.argtypes = [ctypes.c_void_p]
    g.g_list_free.argtypes = [ctypes.c_void_p]

    class GList(ctypes.Structure):
        pass

    GList._fields_ = [("data", ctypes.c_char_p), ("next", ctypes.POINTER(GList)),
                      ("prev", ctypes.POINTER(GList))]
    str_hash = ctypes.cast(g.g_str_hash, ctypes.c_void_p)
    str_equal = ctypes.cast(g.g_str_equal, ctypes.c_void_p)
    rng = random.Random(7)
    for _ in range(400):
        keys = list(dict.fromkeys(
            "".join(rng.choice("abcdefgh-_é") for _ in range(rng.randint(0, 9)))
            for _ in range(rng.randint(1, 40))))
        removed = rng.sample(keys, rng.randint(0, len(keys)))
        table = g.g_hash_table_new(str_hash, str_equal)
        buffers = [ctypes.create_string_buffer(k.encode()) for k in keys]
        for b in buffers:
            g.g_hash_table_insert(table, b, None)
        for k in removed:
            g.g_hash_table_remove(table, k.encode())
        head = g.g_hash_table_get_keys(table)
        node = ctypes.cast(head, ctypes.POINTER(GList))
        real: list[str] = []
        while node:
            real.append(node.contents.data.decode())
            node = node.contents.next
        g.g_list_free(head)
        g.g_hash_table_unref(table)
        model = GHashTableModel()
        for k in keys:
            model.insert(k)
        for k in removed:
            model.remove(k)
        assert model.order() == real[::-1]  # get_keys prepends while walking the slots


def test_validation_is_cheap() -> None:
    args = {"type": "nbd", "id": "e", "node-name": "n", "name": "exp", "writable": False,
            "bitmaps": ["b1", {"node": "n", "name": "b2"}]}
    start = time.perf_counter()
    for _ in range(2000):
        schema.validate("block-export-add", args)
    assert (time.perf_counter() - start) / 2000 < 2e-4


# ----------------------------------------------------------------------------------------
# with the real QEMU 7.2
# ----------------------------------------------------------------------------------------
class RealQemu:
    """A bare QMP client on a throw-away ``qemu-system-x86_64 -machine none``."""

    def __init__(self, binary: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="virtsim-schema-")
        path = os.path.join(self.dir, "qmp.sock")
        self.proc = subprocess.Popen(
            [binary, "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{path},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("qemu-system-x86_64 did not open its QMP socket")
            time.sleep(0.02)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        assert "return" in self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply: dict[str, Any] = json.loads(self.file.readline())
            if "event" not in reply:
                return reply

    def error(self, command: str, arguments: dict[str, Any]) -> str | None:
        reply = self.execute(command, arguments)
        return reply["error"]["desc"] if "error" in reply else None

    def close(self) -> None:
        if hasattr(self, "sock"):
            self.file.close()
            self.sock.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def qemu() -> Iterator[RealQemu]:
    if QEMU is None:
        if os.environ.get("CI") == "true":
            pytest.fail("qemu-system-x86_64 is required in CI")
        pytest.skip("qemu-system-x86_64 not installed (the differential oracle)")
    q = RealQemu(QEMU)
    try:
        yield q
    finally:
        q.close()


@pytest.mark.real_qemu
def test_case_table_against_real_qemu(qemu: RealQemu) -> None:
    """QEMU's error is a QAPI error exactly when validate raises that same text."""
    mismatches = []
    for command, args, expected in CASES:
        real = qemu.error(command, copy.deepcopy(args))
        ours = _error_of(command, args)
        if expected is None:
            ok = ours is None and (real is None or not _QAPI_ERROR.match(real))
        else:
            ok = real == expected == ours
        if not ok:
            mismatches.append((command, args, expected, real, ours))
    qemu.execute("blockdev-del", {"node-name": "virtsim-null"})
    assert not mismatches


@pytest.mark.real_qemu
def test_several_unknown_keys_against_real_qemu(qemu: RealQemu) -> None:
    rng = random.Random(11)
    letters = "abcdefghijklmnopqrstuvwxyz-_é€"
    for _ in range(120):
        keys = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 10)))
                for _ in range(rng.randint(2, 24))]
        choices: list[tuple[str, dict[str, Any]]] = [
            ("query-status", {}),
            ("block-dirty-bitmap-add", {"node": "n", "name": "b", "persistent": True}),
            ("blockdev-backup", {"device": "d", "target": "t", "sync": "full", "speed": 0,
                                 "job-id": "j", "auto-finalize": True}),
            ("blockdev-add", {"driver": "qcow2", "file": "f", "node-name": "q",
                              "read-only": True, "cache-size": 0, "lazy-refcounts": True}),
            ("block-dirty-bitmap-merge", {"node": "n", "name": "b"}),
        ]
        command, template = rng.choice(choices)
        args: dict[str, Any] = dict(template)
        for k in keys:
            args.setdefault(k, 0)
        items = list(args.items())
        rng.shuffle(items)
        args = dict(items)
        if command == "block-dirty-bitmap-merge":  # the same, one list element deep
            args = {"node": "n", "target": "t", "bitmaps": ["a", args]}
        assert _error_of(command, args) == qemu.error(command, args), args


# ---- generated probes: every integer member, every alternate, every enum ---------------
def _minimal(typ: QapiType) -> Any:
    """A small value of ``typ`` that passes validation."""
    kind = typ.kind
    if kind == "builtin":
        return {"str": "x", "bool": False, "number": 0, "any": 0, "null": None}.get(
            typ.name, 0)
    if kind == "enum":
        return typ.values[0]  # type: ignore[attr-defined]
    if kind == "array":
        return []
    if kind == "alternate":
        choices = dict(typ.choices)  # type: ignore[attr-defined]
        return "x" if any(t.name == "str" for t in choices.values()) \
            else _minimal(next(iter(choices.values())))
    return _minimal_object(typ, None)


def _minimal_object(typ: Any, tag_value: str | None) -> dict[str, Any]:
    members = typ.members
    if typ.tag is not None:
        tag_value = tag_value if tag_value is not None else next(iter(typ.branches))
        members = typ.branches[tag_value][1]
    out: dict[str, Any] = {}
    for key, optional, mtype in members:
        if not optional:
            out[key] = tag_value if key == typ.tag else _minimal(mtype)
    return out


def _probes() -> list[tuple[str, dict[str, Any], str]]:
    """(command, arguments, label): one wrong value per member kind, each in a struct that
    also carries an unknown key, so QEMU never gets past validation."""
    out: list[tuple[str, dict[str, Any], str]] = []
    seen: set[tuple[str, str | None]] = set()

    def walk(command: str, wrap: Any, typ: Any, label: str) -> None:
        cases: list[str | None] = [None] if typ.tag is None else list(typ.branches)
        for case in cases:
            if (typ.name, case) in seen:
                continue
            seen.add((typ.name, case))
            members = typ.members if case is None else typ.branches[case][1]
            base = _minimal_object(typ, case)
            base["zzz-probe"] = 1
            for key, _, mtype in members:
                if key == typ.tag:
                    continue

                target = mtype
                listed = target.kind == "array"
                if listed:
                    target = target.element

                def put(value: Any, key: str = key, base: dict[str, Any] = base,
                        listed: bool = listed) -> Any:
                    d = copy.deepcopy(base)
                    d[key] = [value] if listed else value
                    return wrap(d)

                where = f"{label}/{case or ''}.{key}"
                if target.kind == "builtin" and target.name not in ("str", "bool", "any",
                                                                    "null", "number"):
                    for value in ("x", -(1 << 63), 1 << 63, 1.5):
                        out.append((command, put(value), where))
                elif target.kind == "enum":
                    out.append((command, put("no-such-value"), where))
                    out.append((command, put(7), where))
                elif target.kind == "alternate":
                    out.append((command, put(True), where))
                    for _, choice in target.choices:
                        if choice.kind in ("object", "union"):
                            walk(command, put, choice, where)
                elif target.kind == "object":
                    out.append((command, put([]), where))
                    walk(command, put, target, where)
                elif target.name in ("str", "bool"):
                    out.append((command, put({}), where))

    for command in QEMU_COMMANDS:
        args = schema.command_arguments(command)
        if command == "device_add" or not args.members:  # type: ignore[attr-defined]
            continue
        walk(command, lambda d: d, args, command)
    return out


@pytest.mark.real_qemu
def test_generated_probes_against_real_qemu(qemu: RealQemu) -> None:
    probes = _probes()
    assert len(probes) > 500
    mismatches = []
    for command, args, where in probes:
        real = qemu.error(command, args)
        ours = _error_of(command, args)
        if real != ours:
            mismatches.append((where, args, real, ours))
    assert not mismatches[:20]


# ---- query-qmp-schema: the definitions are the real ones, structurally -----------------
_INT_NAMES = {"int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "size"}


class _SchemaComparer:
    def __init__(self, introspection: list[dict[str, Any]]) -> None:
        self.by_name = {e["name"]: e for e in introspection}
        self.done: set[tuple[str, str]] = set()
        self.problems: list[str] = []

    def fail(self, where: str, text: str) -> None:
        self.problems.append(f"{where}: {text}")

    def compare(self, ours: Any, theirs_name: str, where: str) -> None:
        key = (ours.name, theirs_name)
        if key in self.done:
            return
        self.done.add(key)
        theirs = self.by_name[theirs_name]
        meta = theirs["meta-type"]
        if ours.kind == "builtin":
            expect = "int" if ours.name in _INT_NAMES else ours.name
            if meta != "builtin" or theirs_name != expect:
                self.fail(where, f"{ours.name} vs {theirs_name}")
        elif ours.kind == "enum":
            if meta != "enum" or list(ours.values) != theirs["values"]:
                self.fail(where, f"enum {ours.name} values differ")
                return
            feats = {m["name"]: tuple(m["features"]) for m in theirs.get("members", [])
                     if m.get("features")}
            if feats != ours.features:
                self.fail(where, f"enum {ours.name} features {ours.features} vs {feats}")
        elif ours.kind == "array":
            if meta != "array":
                self.fail(where, f"array vs {meta}")
                return
            self.compare(ours.element, theirs["element-type"], where + "[]")
        elif ours.kind == "alternate":
            if meta != "alternate" or len(ours.choices) != len(theirs["members"]):
                self.fail(where, f"alternate {ours.name} vs {meta}")
                return
            for (_, choice), m in zip(ours.choices, theirs["members"], strict=True):
                self.compare(choice, m["type"], f"{where}|{choice.name}")
        else:
            self.compare_object(ours, theirs, where)

    def compare_members(self, members: Any, features: dict[str, tuple[str, ...]],
                        theirs: list[dict[str, Any]], where: str) -> None:
        names = [(k, opt) for k, opt, _ in members]
        real = [(m["name"], "default" in m) for m in theirs]
        if names != real:
            self.fail(where, f"members {names} vs {real}")
            return
        for (key, _, mtype), m in zip(members, theirs, strict=True):
            if tuple(m.get("features", ())) != features.get(key, ()):
                self.fail(f"{where}.{key}", "member features differ")
            self.compare(mtype, m["type"], f"{where}.{key}")

    def compare_object(self, ours: Any, theirs: dict[str, Any], where: str) -> None:
        if theirs["meta-type"] != "object":
            self.fail(where, f"object {ours.name} vs {theirs['meta-type']}")
            return
        self.compare_members(ours.members, ours.features, theirs["members"], where)
        if (ours.tag is None) != ("tag" not in theirs) or ours.tag != theirs.get("tag", None):
            self.fail(where, f"tag {ours.tag} vs {theirs.get('tag')}")
            return
        if ours.tag is None:
            return
        variants = {v["case"]: v["type"] for v in theirs["variants"]}
        if set(variants) != set(ours.branches):
            self.fail(where, f"variants {sorted(ours.branches)} vs {sorted(variants)}")
            return
        for case, (branch, _, _) in ours.branches.items():
            real = self.by_name[variants[case]]
            self.compare_members(branch, ours.features, real["members"], f"{where}<{case}>")


@pytest.mark.real_qemu
def test_definitions_match_query_qmp_schema(qemu: RealQemu) -> None:
    reply = qemu.execute("query-qmp-schema")
    comparer = _SchemaComparer(reply["return"])
    for name in QEMU_COMMANDS:
        real = comparer.by_name.get(name)
        assert real is not None and real["meta-type"] == "command", name
        if tuple(real.get("features", ())) != schema.command_features(name):
            comparer.fail(name, "command features differ")
        if bool(real.get("allow-oob")) != schema.allows_oob(name):
            comparer.fail(name, "allow-oob differs")
        comparer.compare(schema.command_arguments(name), real["arg-type"], name)
        comparer.compare(schema.command_returns(name), real["ret-type"], name + "->")
    assert not comparer.problems
