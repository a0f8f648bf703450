"""The Python HAIP client and the terminal chat: for front-end authors. Server code never imports this package."""
