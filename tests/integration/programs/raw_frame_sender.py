"""In-pod raw frame writer of the bad-input suite.

Usage: ``raw_frame_sender.py IFNAME``. Prints ``ready`` once bound; then for
each line of stdin (a frame in hex) writes that frame onto IFNAME with an
AF_PACKET socket, exactly as given (tags, truncations and all), and prints
``sent``. Runs until stdin closes or it is killed.
"""

from __future__ import annotations

import socket
import sys


def main() -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((sys.argv[1], 0))
    print("ready", flush=True)
    for line in sys.stdin:
        s.send(bytes.fromhex(line.strip()))
        print("sent", flush=True)


if __name__ == "__main__":
    main()
