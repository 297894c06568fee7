"""Where things sit in a kvmnumad guest's physical address space.

These are a contract between the VM and its payload (the code at ENTRY, the
memory above GUEST_RAM_BASE) and with persistence (saved slots are at these
addresses), so they live in one place.
"""

from __future__ import annotations

BOOT_SLOT = 0
BOOT_GPA = 0
BOOT_SIZE = 0x100000  # 1 MiB: payload code lives at ENTRY; guest NUMA memory starts above it
ENTRY = 0x1000
GUEST_RAM_BASE = 0x100000
GUEST_ADDR_LIMIT = 1 << 32  # the built-in payload runs in 32-bit flat mode
MAX_PAYLOAD = BOOT_SIZE - ENTRY
MAX_GUEST_NODES = 64

