"""A seccomp filter for the process backend's sandboxes: the system calls a function never needs and a
sandbox escape would, refused with ``EPERM`` (bubblewrap loads it, ``--seccomp FD``, before the host
starts; nothing can lift it afterwards).

Refused, as Docker's default profile refuses them for a container without capabilities: new
namespaces (``unshare``, ``setns``, and ``clone`` with any ``CLONE_NEW*`` flag; ``clone3`` answers
``ENOSYS`` so the C library falls back to ``clone``), mounts and ``pivot_root``/``chroot``, kernel
modules, ``kexec``, the kernel keyrings, ``bpf``, ``perf_event_open``, ``userfaultfd``, handle-based
opens, clock and host-name changes, swap, ``reboot``, ``acct``, quotas, I/O port access.  Every other
call is allowed.  A call made through another ABI (i386 ``int 0x80``, x32) kills the process.

Only x86-64 has the table: elsewhere ``filter_program`` returns None and the sandbox runs without a
filter (``Sandbox`` says so in ``isolation``).
"""

from __future__ import annotations

import errno
import platform
import struct

__all__ = ["filter_program"]

# struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_OFFSET_NR, _OFFSET_ARCH, _OFFSET_ARG0_LOW = 0, 4, 16  # struct seccomp_data, little-endian

# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_CLONE_NEW_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

_X86_64_CLONE = 56
_X86_64_CLONE3 = 435
_X86_64_REFUSED = {
    "uselib": 134, "pivot_root": 155, "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
    "setdomainname": 171, "iopl": 172, "ioperm": 173, "create_module": 174, "init_module": 175,
    "delete_module": 176, "get_kernel_syms": 177, "query_module": 178, "quotactl": 179, "nfsservctl": 180,
    "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249,
    "keyctl": 250, "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "open_tree": 428, "move_mount": 429, "mount_setattr": 442,
}  # fmt: skip


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def filter_program() -> bytes | None:
    """The filter as bubblewrap reads it (an array of ``struct sock_filter``), or None off x86-64."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    eperm = _RET_ERRNO | errno.EPERM
    enosys = _RET_ERRNO | errno.ENOSYS
    refused = sorted(_X86_64_REFUSED.values())
    prog = [
        _insn(_LD_W_ABS, 0, 0, _OFFSET_ARCH),
        _insn(_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _OFFSET_NR),
        _insn(_JGE_K, 0, 1, _X32_SYSCALL_BIT),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_JEQ_K, 0, 1, _X86_64_CLONE3),
        _insn(_RET_K, 0, 0, enosys),
        # clone: refused when its flags (the first argument's low word) ask for a new namespace.
        _insn(_JEQ_K, 0, 3, _X86_64_CLONE),
        _insn(_LD_W_ABS, 0, 0, _OFFSET_ARG0_LOW),
        _insn(_JSET_K, len(refused) + 2, len(refused) + 1, _CLONE_NEW_FLAGS),  # -> EPERM / ALLOW
        _insn(_LD_W_ABS, 0, 0, _OFFSET_NR),  # not reached: keeps the jump arithmetic plain
    ]
    # Each refused number jumps to the EPERM return after the list; none of them falls through to ALLOW.
    for i, nr in enumerate(refused):
        prog.append(_insn(_JEQ_K, len(refused) - i, 0, nr))
    prog.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    prog.append(_insn(_RET_K, 0, 0, eperm))
    return b"".join(prog)
