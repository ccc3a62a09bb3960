"""zchat in the browser: the ``zchat-web`` gateway and the page it serves.

A browser cannot speak ZeroMQ, so ``zchat-web`` stands between: it serves
one static page (``static/``, no build step, nothing fetched from elsewhere)
and a WebSocket endpoint, and runs one zchat session through the library's
``AsyncClient`` per browser session, so ordering, gap fill, resume and
heartbeats are the library's. ``wire`` is the page's JSON protocol (pure);
``server`` is the shell (``Config``, ``Gateway``, ``main``).
"""
