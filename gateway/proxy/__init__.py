"""The aiohttp transport: the app, its request handler, the upstream client and the server process."""
