"""Subject storage: the protocol (:mod:`storage.base`) and its backends (memory, Redis)."""
