"""The zchat client programs: the terminal client and its scriptable mode."""
