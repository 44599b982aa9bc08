"""The model: images, block nodes, dirty bitmaps, jobs, guest writes, clock.

Pure state and rules. Nothing here opens sockets, runs servers or speaks JSON.
"""
