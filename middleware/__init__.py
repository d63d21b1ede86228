"""Built-in middleware: one module per middleware, and the chain contract in :mod:`middleware.base`."""
