"""The node server (`kvport server`): one cache per machine shared by every engine process, rank and engine on it.
Exports nothing at import (pyzmq and torch load only when a server or client is created); see docs/server.md."""
