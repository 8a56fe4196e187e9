"""Outbound calls through the mesh: discovery, load balancing and resilient httpx transports.

The sans-I/O cores live in :mod:`meshware.outbound.endpoints`, :mod:`meshware.outbound.discovery`
and :mod:`meshware.outbound.balancing`; errors in :mod:`meshware.outbound.errors`.
"""
