#!/usr/bin/python3
"""One CSI call over a unix socket, for tests/docker/smoke.sh.

    csi_call.py SOCKET SERVICE METHOD [JSON]

SERVICE is Identity, Controller or Node; METHOD a CSI RPC of it (CreateVolume, ...); JSON
the request in protobuf's JSON mapping (camelCase field names). Prints the response as
JSON. A gRPC error prints `CODE: message` on stderr and exits 1.

The message classes come from proto/csi.proto, compiled with protoc into a temporary
directory at each run (Debian: protobuf-compiler, python3-protobuf, python3-grpcio).
"""
import importlib
import os
import subprocess
import sys
import tempfile

import grpc
from google.protobuf import json_format

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def load_csi():
    out = tempfile.mkdtemp(prefix="csi-py-")
    subprocess.run(
        ["protoc", "-I", os.path.join(REPO, "proto"), "-I", "/usr/include", f"--python_out={out}", "csi.proto"],
        check=True,
    )
    sys.path.insert(0, out)
    return importlib.import_module("csi_pb2")


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    socket, service, method = sys.argv[1:4]
    body = sys.argv[4] if len(sys.argv) == 5 else "{}"
    csi = load_csi()
    svc = csi.DESCRIPTOR.services_by_name.get(service)
    if svc is None or method not in svc.methods_by_name:
        sys.exit(f"unknown CSI method {service}.{method}")
    m = svc.methods_by_name[method]
    req_cls = getattr(csi, m.input_type.name)
    resp_cls = getattr(csi, m.output_type.name)
    req = json_format.Parse(body, req_cls())
    with grpc.insecure_channel(f"unix://{socket}") as ch:
        call = ch.unary_unary(
            f"/{svc.full_name}/{method}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        try:
            resp = call(req, timeout=120)
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            sys.exit(1)
    print(json_format.MessageToJson(resp, indent=None))


if __name__ == "__main__":
    main()
