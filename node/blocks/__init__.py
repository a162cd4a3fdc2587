"""Sharded block serving: a node loads a range of a model's decoder blocks, serves it over
gRPC (:mod:`node.blocks.server`), announces it in the hivemind DHT (:mod:`node.blocks.dht`),
and drives requests through a chain of such nodes (:mod:`node.blocks.chain_engine`).
See docs/node-serving.md.
"""
