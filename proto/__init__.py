"""Everything dinet puts on the wire.

- ``*.proto``: the single source of truth for AMQP messages and the gRPC block service;
  ``*_pb2.py`` are generated from them by ``scripts/gen_proto.sh``.
- :mod:`proto.codec`: tensors as raw bytes + dtype + shape, with size limits.
- :mod:`proto.topology`: RabbitMQ queue names and their declaration.
- :mod:`proto.errors`: typed errors that map onto :class:`ErrorCode`.
- :mod:`proto.settings`: connection settings read from the environment.
"""
