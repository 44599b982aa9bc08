"""Image formats implemented by virtsim itself: raw files and qcow2 v3 with bitmaps.

qemu-img and qemu-io are only test oracles: nothing here runs them.
"""
