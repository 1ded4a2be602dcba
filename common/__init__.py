"""Shared code of the Clinical Imaging Bundles: networks, losses, transforms, data tools, engines and handlers.

Bundles under ``bundles/`` wire these pieces together in their configs; nothing here knows about a particular
bundle's files.
"""

__version__ = "0.1.0"
