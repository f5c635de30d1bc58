"""`sana serve`: an HTTP server over one shared `SanaPipeline`.

engine.py   the batching engine: a bounded job queue, one worker thread that gathers compatible jobs into
            one forward pass, live job events for asyncio consumers, and a bounded store of encoded images
app.py      the HTTP application on top of the engine
"""
