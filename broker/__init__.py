"""The zchat broker program: its config, its event loop, and zchat-admin."""
