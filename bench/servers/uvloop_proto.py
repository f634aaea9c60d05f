"""Baseline echo server: the asyncio Protocol of asyncio_proto.py on uvloop's event loop.

python bench/servers/uvloop_proto.py --host 127.0.0.1 --port 7101 [--backlog 4096]
"""

from __future__ import annotations

import os
import sys

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from asyncio_proto import main

if __name__ == "__main__":
    main(loop_factory=uvloop.new_event_loop, description=__doc__ or "")
