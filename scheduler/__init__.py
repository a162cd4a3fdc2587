"""MetaInf: picks an acceleration method and a consumer group for each request.

A library with no I/O beyond model files. The broker talks to it only through
:class:`scheduler.interface.SchedulingPolicy`.
"""
