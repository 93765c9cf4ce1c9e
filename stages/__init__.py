"""DVC stage entry points: each parses its arguments and params, calls `pipeline`, writes outputs."""
