"""``python -m agent.kubelab [--host IP] [--port N] [--kubeconfig PATH] [--load FILE]``:
run the lab API server (``meshagent lab up --kube`` runs it on node1's underlay
address)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from agent.kubelab.server import LabApiServer


def main() -> None:
    parser = argparse.ArgumentParser(description="the lab's Kubernetes API server "
                                     "(lab and tests only)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (plain HTTP, no authentication)")
    parser.add_argument("--port", type=int, default=6443)
    parser.add_argument("--kubeconfig", type=Path)
    parser.add_argument("--load", type=Path,
                        help="a JSON list of objects to create at start (validated)")
    parser.add_argument("--state", type=Path,
                        help="a file the objects are saved to on SIGTERM and restored from "
                        "at start (uids and resourceVersions kept, like etcd across an API "
                        "server restart)")
    parser.add_argument("--history", type=int, default=10000,
                        help="watch events kept for resuming watches")
    args = parser.parse_args()
    server = LabApiServer(port=args.port, history=args.history, host=args.host).start()
    if args.load:
        for obj in json.loads(args.load.read_text()):
            server.apply(obj)
    if args.state and args.state.exists():
        server.restore(json.loads(args.state.read_text()))
    if args.kubeconfig:
        server.kubeconfig(args.kubeconfig)
    print(f"lab API server on {server.url}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    if args.state:
        tmp = args.state.with_name(args.state.name + ".tmp")
        tmp.write_text(json.dumps(server.call(server.store.dump)))
        tmp.replace(args.state)
    server.stop()


if __name__ == "__main__":
    main()
