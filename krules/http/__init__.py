"""krules over HTTP: the CloudEvents ingress (a Starlette app), the server that runs it, the clients."""
