"""`ringllm serve`: an OpenAI-compatible HTTP front-end over a continuously batching engine.

runner.py drives the engine on its own thread and routes its token events to the requests'
asyncio queues; app.py is the FastAPI application (endpoints, auth, limits, metrics, access
log); server.py starts uvicorn and drains on SIGINT/SIGTERM. Importing this package pulls in
none of the web dependencies (the `serve` extra); only app.py and server.py need them.
"""
