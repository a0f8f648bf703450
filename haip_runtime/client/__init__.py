"""The Python HAIP client, for front-end authors: ``HaipClient``, the ``Received`` envelopes it yields, ``ClientError``.

``haip_client`` is the client; ``chat`` (with ``view`` and ``terminal``) is the ``haip-runtime chat``
terminal built on it. This package imports only ``haip_runtime.protocol`` and ``haip_runtime.exceptions``;
server code never imports it.
"""

from haip_runtime.client.haip_client import HaipClient, Received
from haip_runtime.exceptions import ClientError

__all__ = ["ClientError", "HaipClient", "Received"]
