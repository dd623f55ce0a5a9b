"""SD card multiplexers: one card, switched between the rig host (to flash it) and the board.

Every driver keeps to ``hil.parts.SdMux``. Switching to the host does not wait for the card's
block device: the rig's ``storage:`` part does that, by udev event, with its own deadline.
Switching to the DUT does not toggle card-detect on real muxes, so the board is power-cycled
after it (the rig's boot flow does that).
"""
