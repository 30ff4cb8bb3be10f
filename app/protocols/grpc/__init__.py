"""The Open Inference Protocol's gRPC service: its ``.proto``, the modules ``protoc``
generates from it, and :mod:`~app.protocols.grpc.oip`, the conversions."""
